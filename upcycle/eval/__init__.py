"""Measuring a CLIP or CLIP-MoE: embedding pairs, zero-shot retrieval and classification, routing statistics, the
dense-vs-MoE function check, and the eval / routing commands."""
