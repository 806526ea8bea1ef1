"""Output dataclasses of the SigLIP2-MoE (the towers use `SiglipMoEOutputWithPooling`, the same fields)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.siglip2.modeling_siglip2 import Siglip2Output


@dataclass
class Siglip2MoEOutput(Siglip2Output):
    r"""`Siglip2Output` plus `aux_loss` (both towers' weighted auxiliary losses, summed).

    With `return_loss=True`, `loss` = sigmoid loss + `aux_loss` (when router outputs were requested).
    """

    aux_loss: torch.Tensor | None = None
