"""Measuring a CLIP or CLIP-MoE: embedding pairs, image-text retrieval, zero-shot classification, routing
statistics, the dense-vs-MoE function check, and the eval / routing commands."""
