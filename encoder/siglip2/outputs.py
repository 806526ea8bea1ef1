"""Output dataclasses of the SigLIP2-MoE (the towers use `SiglipMoEOutputWithPooling`, the same fields)."""

from __future__ import annotations

from dataclasses import dataclass

from transformers.models.siglip2.modeling_siglip2 import Siglip2Output

from ..outputs import AuxLossOutput


@dataclass
class Siglip2MoEOutput(AuxLossOutput, Siglip2Output):
    r"""`Siglip2Output` plus `aux_loss` (`AuxLossOutput`); `loss` is the sigmoid loss (+ `aux_loss`)."""
