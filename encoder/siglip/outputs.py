"""Output dataclasses of the SigLIP-MoE: transformers' SigLIP field names plus the shared routing fields."""

from __future__ import annotations

from dataclasses import dataclass

from transformers.models.siglip.modeling_siglip import SiglipOutput

from ..outputs import AuxLossOutput, CLIPMoEOutputWithPooling

# A tower's output: the family-agnostic one (BaseModelOutputWithPooling's fields, the same in transformers' SigLIP).
SiglipMoEOutputWithPooling = CLIPMoEOutputWithPooling


@dataclass
class SiglipMoEOutput(AuxLossOutput, SiglipOutput):
    r"""`SiglipOutput` plus `aux_loss` (`AuxLossOutput`); `loss` is the sigmoid loss (+ `aux_loss`)."""
