"""Output dataclasses of the SigLIP-MoE: transformers' SigLIP field names plus the shared routing fields."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.siglip.modeling_siglip import SiglipOutput

from ..outputs import RoutingOutput


@dataclass
class SiglipMoEOutputWithPooling(RoutingOutput, BaseModelOutputWithPooling):
    r"""`BaseModelOutputWithPooling` of a SigLIP-MoE tower plus the `RoutingOutput` fields."""


@dataclass
class SiglipMoEOutput(SiglipOutput):
    r"""`SiglipOutput` plus `aux_loss` (both towers' weighted auxiliary losses, summed).

    With `return_loss=True`, `loss` = sigmoid loss + `aux_loss` (when router outputs were requested).
    """

    aux_loss: torch.Tensor | None = None
