"""CLIP's activations as `out=` kernels, for the fused expert MLP (`segment_mlp.SegmentMLP`).

transformers' QuickGELU runs three elementwise ops with two [T*k, h] temporaries forward and about five
backward; as a scaled SiLU (`z * sigmoid(1.702 z) == silu(1.702 z) / 1.702`) it is one kernel each way,
with both scales folded into the surrounding matmuls' alpha / beta.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import GELUActivation, QuickGELUActivation, SiLUActivation

QUICK_GELU_SCALE = 1.702


@dataclass(frozen=True)
class FusedActivation:
    """An activation given by out= kernels, with act_fn(z) == post_scale * forward(pre_scale * z).

    The scales fold into the matmuls' alpha / beta, and `forward(z, out)` / `backward(grad, z, out)` may
    write over their own input, so the fused expert MLP needs no [T*k, h] temporaries.
    """

    name: str  # how the traceable custom op (`clip_moe::segment_mlp`) refers to it
    forward: Callable[[torch.Tensor, torch.Tensor], object]
    backward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]
    pre_scale: float = 1.0
    post_scale: float = 1.0


def _silu_forward(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.silu.out(z, out=out)


def _silu_backward(grad: torch.Tensor, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.silu_backward.grad_input(grad, z, grad_input=out)


def _gelu_forward(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu.out(z, out=out)


def _gelu_backward(grad: torch.Tensor, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward.grad_input(grad, z, grad_input=out)


SILU = FusedActivation("silu", _silu_forward, _silu_backward)
GELU = FusedActivation("gelu", _gelu_forward, _gelu_backward)
QUICK_GELU = FusedActivation("quick_gelu", _silu_forward, _silu_backward, QUICK_GELU_SCALE, 1.0 / QUICK_GELU_SCALE)
FUSED_BY_NAME = {a.name: a for a in (SILU, GELU, QUICK_GELU)}


def fused_activation(act_fn: nn.Module) -> FusedActivation | None:
    """The fused form of transformers' QuickGELU, SiLU and (exact) GELU modules; None for anything else."""
    kind = type(act_fn)
    if kind is QuickGELUActivation:
        return QUICK_GELU
    if kind in (SiLUActivation, nn.SiLU):
        return SILU
    if kind is GELUActivation and act_fn.act is nn.functional.gelu:
        return GELU
    return None
