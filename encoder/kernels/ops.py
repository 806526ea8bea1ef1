"""The segment kernels as torch custom ops, so torch.compile / torch.export trace models that use them.

A tracer cannot follow `segment_counts(ends)` (a data-dependent host read), but it can keep a custom op
whose output shapes do not depend on the data as one opaque node, forward and backward. The kernels of
`segment_mlp` run inside `clip_moe::segment_mlp` (fused activations) or `clip_moe::segment_linear` (any
other act_fn); exported graphs name these ops (`clip_moe.segment_mlp.default`), so the names are stable.
Each op has a fake (meta) kernel giving its output shapes, and a backward that is a custom op too.
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import FUSED_BY_NAME, FusedActivation, fused_activation
from .segment_mlp import SegmentLinear, SegmentMLP, segment_counts


class _Record:
    """Stands in for autograd's ctx when the kernels' forward / backward run inside the custom ops."""

    def __init__(self, counts: list[int], act: FusedActivation | None, saved: tuple = (), needs: tuple = ()):
        self.counts, self.act, self.saved_tensors, self.needs_input_grad = counts, act, saved, needs

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        self.saved_tensors = tensors


def _needed_grads(grads: tuple, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A custom op cannot return None: a [0] tensor stands for each gradient not asked for."""
    return tuple(g if g is not None else like.new_empty(0) for g in grads)


def _fake_grads(like: torch.Tensor, shapes: tuple, needs: list[bool]) -> tuple[torch.Tensor, ...]:
    return tuple(like.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


@torch.library.custom_op("clip_moe::segment_mlp", mutates_args=())
def _segment_mlp_op(x: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor, down: torch.Tensor,
                    down_bias: torch.Tensor, ends: torch.Tensor, activation: str,
                    keep_pre_activation: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [S, d], the pre-activation [S, h] kept for backward, or [0, h] in inference)."""
    record = _Record(segment_counts(ends), FUSED_BY_NAME[activation])
    y = SegmentMLP.forward(record if keep_pre_activation else None, x, up, up_bias, down, down_bias,
                           record.counts, record.act)
    pre = record.saved_tensors[3] if keep_pre_activation else x.new_empty(0, up.shape[1])
    return y, pre


@_segment_mlp_op.register_fake
def _(x, up, up_bias, down, down_bias, ends, activation, keep_pre_activation):
    rows = x.shape[0] if keep_pre_activation else 0
    return x.new_empty(x.shape[0], down.shape[1]), x.new_empty(rows, up.shape[1])


@torch.library.custom_op("clip_moe::segment_mlp_backward", mutates_args=())
def _segment_mlp_backward_op(grad_y: torch.Tensor, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                             pre: torch.Tensor, ends: torch.Tensor, activation: str,
                             needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                         torch.Tensor]:
    """Gradients of x, up, up_bias, down, down_bias (a [0] tensor for each one not needed)."""
    record = _Record(segment_counts(ends), FUSED_BY_NAME[activation], (x, up, down, pre), tuple(needs))
    return _needed_grads(SegmentMLP.backward(record, grad_y)[:5], x)


@_segment_mlp_backward_op.register_fake
def _(grad_y, x, up, down, pre, ends, activation, needs):
    return _fake_grads(x, (x.shape, up.shape, up.shape[:2], down.shape, down.shape[:2]), needs)


def _segment_mlp_setup_context(ctx, inputs, output) -> None:
    x, up, _, down, _, ends, activation, _ = inputs
    ctx.save_for_backward(x, up, down, output[1], ends)
    ctx.activation = activation
    ctx.needs = list(ctx.needs_input_grad[:5])


def _segment_mlp_op_backward(ctx, grad_y: torch.Tensor, _grad_pre: torch.Tensor):
    x, up, down, pre, ends = ctx.saved_tensors
    grads = _segment_mlp_backward_op(grad_y, x, up, down, pre, ends, ctx.activation, ctx.needs)
    return (*(g if need else None for g, need in zip(grads, ctx.needs)), None, None, None)


_segment_mlp_op.register_autograd(_segment_mlp_op_backward, setup_context=_segment_mlp_setup_context)


@torch.library.custom_op("clip_moe::segment_linear", mutates_args=())
def _segment_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """`segment_linear` for activations without a fused kernel (the MLP is then two of these around act_fn)."""
    return SegmentLinear.forward(None, x, weight, bias, segment_counts(ends))


@_segment_linear_op.register_fake
def _(x, weight, bias, ends):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("clip_moe::segment_linear_backward", mutates_args=())
def _segment_linear_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor,
                                needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    record = _Record(segment_counts(ends), None, (x, weight), (*needs, False))
    return _needed_grads(SegmentLinear.backward(record, grad_out)[:3], x)


@_segment_linear_backward_op.register_fake
def _(grad_out, x, weight, ends, needs):
    return _fake_grads(x, (x.shape, weight.shape, weight.shape[:2]), needs)


def _segment_linear_setup_context(ctx, inputs, output) -> None:
    x, weight, _, ends = inputs
    ctx.save_for_backward(x, weight, ends)
    ctx.needs = list(ctx.needs_input_grad[:3])


def _segment_linear_op_backward(ctx, grad_out: torch.Tensor):
    x, weight, ends = ctx.saved_tensors
    grads = _segment_linear_backward_op(grad_out, x, weight, ends, ctx.needs)
    return (*(g if need else None for g, need in zip(grads, ctx.needs)), None)


_segment_linear_op.register_autograd(_segment_linear_op_backward, setup_context=_segment_linear_setup_context)


def traceable_segment_mlp(x: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor, down: torch.Tensor,
                          down_bias: torch.Tensor, ends: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
    """`segment_mlp.segment_mlp` through the custom ops: the same kernels, with the segment ends as a tensor.

    ends [E] (int64): one past each expert's last row; experts without rows repeat the previous end.
    """
    act = fused_activation(act_fn)
    if act is None:
        h = act_fn(_segment_linear_op(x, up, up_bias, ends))
        return _segment_linear_op(h, down, down_bias, ends)
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (x, up, up_bias, down, down_bias))
    return _segment_mlp_op(x, up, up_bias, down, down_bias, ends, act.name, keep)[0]
