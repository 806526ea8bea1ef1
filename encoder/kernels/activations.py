"""The towers' MLP activations as `out=` kernels, for the fused expert MLP (`segment_mlp.SegmentMLP`).

transformers' QuickGELU (CLIP) runs three elementwise ops with two [T*k, h] temporaries forward and about five
backward; as a scaled SiLU (`z * sigmoid(1.702 z) == silu(1.702 z) / 1.702`) it is one kernel each way,
with both scales folded into the surrounding matmuls' alpha / beta. SigLIP / SigLIP2's `gelu_pytorch_tanh`
(transformers' GELUTanh, `gelu(z, approximate="tanh")`) and the exact `gelu` of open_clip SigLIPs converted to
transformers are already one aten kernel each way; fusing them only saves the [T*k, h] temporaries and the
second pass of an unfused act_fn (and keeps the MLP one autograd node), with the very kernels transformers'
modules call, so the numbers are theirs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import GELUActivation, GELUTanh, QuickGELUActivation, SiLUActivation

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


def _gelu_tanh_forward(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu.out(z, approximate="tanh", out=out)


def _gelu_tanh_backward(grad: torch.Tensor, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward.grad_input(grad, z, approximate="tanh", grad_input=out)


SILU = FusedActivation("silu", _silu_forward, _silu_backward)
GELU = FusedActivation("gelu", _gelu_forward, _gelu_backward)
GELU_TANH = FusedActivation("gelu_tanh", _gelu_tanh_forward, _gelu_tanh_backward)
QUICK_GELU = FusedActivation("quick_gelu", _silu_forward, _silu_backward, QUICK_GELU_SCALE, 1.0 / QUICK_GELU_SCALE)
FUSED_BY_NAME = {a.name: a for a in (SILU, GELU, GELU_TANH, QUICK_GELU)}


def _calls_gelu(act, approximate: str) -> bool:
    """act is torch's gelu with that `approximate` (a bare `gelu` or a `functools.partial` of it, as
    transformers' GELUTanh holds), so the fused kernel computes exactly what the module would."""
    if act is nn.functional.gelu:
        return approximate == "none"
    return (isinstance(act, functools.partial) and act.func is nn.functional.gelu and not act.args
            and act.keywords == {"approximate": approximate})


def fused_activation(act_fn: nn.Module) -> FusedActivation | None:
    """The fused form of an activation module, or None (the caller then runs act_fn itself, unfused).

    Fused: transformers' QuickGELU (`quick_gelu`, CLIP), SiLU, exact GELU (`gelu`) and GELUTanh
    (`gelu_pytorch_tanh`, SigLIP / SigLIP2), and torch's nn.SiLU / nn.GELU. Their pure-Python variants
    (`gelu_python`, `gelu_python_tanh`, `gelu_new`, ...) round differently from the aten kernels, so they stay
    unfused, as does anything else.
    """
    kind = type(act_fn)
    if kind is QuickGELUActivation:
        return QUICK_GELU
    if kind in (SiLUActivation, nn.SiLU):
        return SILU
    if kind is GELUActivation and _calls_gelu(act_fn.act, "none"):
        return GELU
    if kind is GELUTanh and _calls_gelu(act_fn.act, "tanh"):
        return GELU_TANH
    if kind is nn.GELU:
        return {"none": GELU, "tanh": GELU_TANH}.get(act_fn.approximate)
    return None
