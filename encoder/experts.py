"""Stacked expert MLPs and their token dispatch, with the implementations registered by name.

The experts follow transformers' experts interface (`up_proj` [E, h, d], `up_proj_bias` [E, h],
`down_proj` [E, d, h], `down_proj_bias` [E, d], `act_fn`), so `experts_implementation=` picks
transformers' kernels (`grouped_mm`, `batched_mm`, GPU kernels) by name. The module's own forward
(`"eager"`, our default) sorts token-choices by expert and hands the expert-sorted rows to one of the
implementations in `EXPERT_DISPATCH`, chosen by `CLIPMoEExperts.dispatch` (None: `default_expert_dispatch`):

- "segments" (the CPU default): one contiguous addmm per expert segment, with the bias fused into
  it: no per-row bias gather, no [tokens, experts, hidden] tensor, no padding. It reads the per-expert
  counts on the host; under torch.compile / torch.export it runs as the custom op
  `clip_moe::segment_mlp`, whose output shapes do not depend on the data, so the graph traces whole.
- "grouped_mm" (the CUDA default): `torch.nn.functional.grouped_mm` with device-side offsets, no host
  sync. It also runs on the CPU (forced), where it is slower but gives the same numbers.

On the segment path the expert MLP is one autograd node (`segment_mlp`) for CLIP's activations: QuickGELU
runs as `silu(1.702 z) / 1.702` with both scales folded into the matmuls' alpha / beta, the activation
and its gradient are computed in per-expert buffers reused across segments, and only the [T*k, h]
pre-activation is kept for backward. Fresh multi-MB CPU buffers cost page faults on every call and
each elementwise pass over [T*k, h] is memory-bound, so this is what keeps the MoE FFN at or below the
cost of a dense FFN with the same active FLOPs (see scripts/bench_moe.py).

Under autocast the experts compute in the autocast dtype (they cast inputs and weights themselves: the
`out=` kernels are invisible to autocast).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.activations import (
    ACT2FN,
    GELUActivation,
    QuickGELUActivation,
    SiLUActivation,
)
from transformers.integrations.moe import use_experts_implementation

QUICK_GELU_SCALE = 1.702


class _SegmentLinear(torch.autograd.Function):
    """y[s] = x[s] @ W[e].T + b[e] for the rows s of each expert's contiguous segment.

    Written as one autograd node so forward and backward fill preallocated buffers segment by segment
    (`out=`), instead of concatenating per-expert results (an extra [T*k, h] copy each way).
    `ctx` is None when no graph is recorded.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, counts: list[int]) -> torch.Tensor:
        out = x.new_empty(x.shape[0], weight.shape[1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.addmm(bias[e], x[start : start + n], weight[e].t(), out=out[start : start + n])
            start += n
        if ctx is not None:
            ctx.save_for_backward(x, weight)
            ctx.counts = counts
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        grad_x = x.new_empty(x.shape) if need_x else None
        grad_w = _expert_grad_buffer(weight, ctx.counts) if need_w else None
        grad_b = weight.new_zeros(weight.shape[:2]) if need_b else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if n:
                g = grad_out[start : start + n]
                if need_x:
                    torch.mm(g, weight[e], out=grad_x[start : start + n])
                if need_w:
                    torch.mm(g.t(), x[start : start + n], out=grad_w[e])
                if need_b:
                    torch.sum(g, dim=0, out=grad_b[e])
            start += n
        return grad_x, grad_w, grad_b, None


def _expert_grad_buffer(weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Uninitialised [E, ...] gradient whose experts without tokens are zeroed (the rest get written whole).

    Stacked expert weights are big (tens of MB): a full zero fill would be a wasted pass over them.
    """
    grad = torch.empty_like(weight)
    for e, n in enumerate(counts):
        if not n:
            grad[e].zero_()
    return grad


def segment_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per-expert linear over expert-sorted rows. x [S, in], weight [E, out, in], bias [E, out]."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return _SegmentLinear.apply(x, weight, bias, counts)
    return _SegmentLinear.forward(None, x, weight, bias, counts)


@dataclass(frozen=True)
class _FusedActivation:
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


_SILU = _FusedActivation("silu", _silu_forward, _silu_backward)
_GELU = _FusedActivation("gelu", _gelu_forward, _gelu_backward)
# z * sigmoid(1.702 z) == silu(1.702 z) / 1.702
_QUICK_GELU = _FusedActivation("quick_gelu", _silu_forward, _silu_backward, QUICK_GELU_SCALE, 1.0 / QUICK_GELU_SCALE)
_FUSED_BY_NAME = {a.name: a for a in (_SILU, _GELU, _QUICK_GELU)}


def fused_activation(act_fn: nn.Module) -> _FusedActivation | None:
    """The fused form of transformers' QuickGELU, SiLU and (exact) GELU modules; None for anything else.

    transformers' QuickGELU runs three elementwise ops with two [T*k, h] temporaries forward and about
    five backward; as a scaled SiLU it is one kernel each way.
    """
    kind = type(act_fn)
    if kind is QuickGELUActivation:
        return _QUICK_GELU
    if kind in (SiLUActivation, nn.SiLU):
        return _SILU
    if kind is GELUActivation and act_fn.act is nn.functional.gelu:
        return _GELU
    return None


class _SegmentMLP(torch.autograd.Function):
    """y[s] = fc2_e(act(fc1_e(x[s]))) over expert-sorted rows, one autograd node for the whole MLP.

    The only [T*k, h] tensor is the saved pre-activation, and only when a graph is recorded; the
    activation and its gradient live in per-segment buffers (reused across experts) and the activation
    is recomputed in backward, so forward and backward each touch the big activations once.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor, down: torch.Tensor,
                down_bias: torch.Tensor, counts: list[int], act: _FusedActivation) -> torch.Tensor:
        record = ctx is not None
        pre, post = act.pre_scale, act.post_scale
        y = x.new_empty(x.shape[0], down.shape[1])
        z_all = x.new_empty(x.shape[0], up.shape[1]) if record else None
        buf = x.new_empty(max(counts, default=0), up.shape[1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                z = z_all[rows] if record else buf[:n]
                torch.addmm(up_bias[e], x[rows], up[e].t(), beta=pre, alpha=pre, out=z)
                a = act.forward(z, buf[:n])
                torch.addmm(down_bias[e], a, down[e].t(), alpha=post, out=y[rows])
            start += n
        if record:
            ctx.save_for_backward(x, up, down, z_all)
            ctx.counts, ctx.act = counts, act
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, up, down, z_all = ctx.saved_tensors
        act: _FusedActivation = ctx.act
        pre, post = act.pre_scale, act.post_scale
        grad_y = grad_y.contiguous()
        need_x, need_up, need_up_b, need_down, need_down_b = ctx.needs_input_grad[:5]
        grad_x = torch.empty_like(x) if need_x else None
        grad_up = _expert_grad_buffer(up, ctx.counts) if need_up else None
        grad_up_b = up.new_zeros(up.shape[:2]) if need_up_b else None
        grad_down = _expert_grad_buffer(down, ctx.counts) if need_down else None
        grad_down_b = down.new_zeros(down.shape[:2]) if need_down_b else None
        width = max(ctx.counts, default=0)
        grad_buf = x.new_empty(width, up.shape[1])
        act_buf = x.new_empty(width, up.shape[1]) if need_down else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if not n:
                continue
            rows = slice(start, start + n)
            g, z = grad_y[rows], z_all[rows]
            if need_down:
                a = act.forward(z, act_buf[:n])
                torch.addmm(grad_down[e], g.t(), a, beta=0.0, alpha=post, out=grad_down[e])
            if need_down_b:
                torch.sum(g, dim=0, out=grad_down_b[e])
            gz = grad_buf[:n]
            torch.addmm(gz, g, down[e], beta=0.0, alpha=post, out=gz)
            act.backward(gz, z, gz)
            if need_up:
                torch.addmm(grad_up[e], gz.t(), x[rows], beta=0.0, alpha=pre, out=grad_up[e])
            if need_up_b:
                torch.sum(gz, dim=0, out=grad_up_b[e]).mul_(pre)
            if need_x:
                torch.addmm(grad_x[rows], gz, up[e], beta=0.0, alpha=pre, out=grad_x[rows])
            start += n
        return grad_x, grad_up, grad_up_b, grad_down, grad_down_b, None, None


def segment_mlp(x: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor, down: torch.Tensor,
                down_bias: torch.Tensor, counts: list[int], act_fn: nn.Module) -> torch.Tensor:
    """Per-expert `fc2(act(fc1(x)))` over expert-sorted rows x [S, d]; weights as in `CLIPMoEExperts`.

    Fused (see `_SegmentMLP`) for the activations `fused_activation` knows; otherwise two
    `segment_linear` calls around `act_fn` under ordinary autograd.
    """
    act = fused_activation(act_fn)
    if act is None:
        return segment_linear(act_fn(segment_linear(x, up, up_bias, counts)), down, down_bias, counts)
    tensors = (x, up, up_bias, down, down_bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _SegmentMLP.apply(*tensors, counts, act)
    return _SegmentMLP.forward(None, *tensors, counts, act)


class ExpertWeights(NamedTuple):
    """The stacked expert parameters as one implementation receives them (already in the compute dtype)."""

    up: torch.Tensor  # [E, h, d]
    up_bias: torch.Tensor  # [E, h]
    down: torch.Tensor  # [E, d, h]
    down_bias: torch.Tensor  # [E, d]


# torch.compile / torch.export cannot trace `counts.tolist()` (a data-dependent host read), but they can
# trace a custom op whose output shapes do not depend on the data: the segment kernels above run inside
# `clip_moe::segment_mlp` (fused activations) or `clip_moe::segment_linear` (any other act_fn), which the
# traced graph keeps as opaque nodes, forward and backward.


class _Record:
    """Stands in for autograd's ctx when `_SegmentMLP`'s forward / backward run inside the custom ops."""

    def __init__(self, counts: list[int], act: _FusedActivation | None, saved: tuple = (), needs: tuple = ()):
        self.counts, self.act, self.saved_tensors, self.needs_input_grad = counts, act, saved, needs

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        self.saved_tensors = tensors


def _counts(ends: torch.Tensor) -> list[int]:
    return torch.diff(ends, prepend=ends.new_zeros(1)).tolist()


@torch.library.custom_op("clip_moe::segment_mlp", mutates_args=())
def _segment_mlp_op(x: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor, down: torch.Tensor,
                    down_bias: torch.Tensor, ends: torch.Tensor, activation: str,
                    keep_pre_activation: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [S, d], the pre-activation [S, h] kept for backward, or [0, h] in inference)."""
    record = _Record(_counts(ends), _FUSED_BY_NAME[activation])
    y = _SegmentMLP.forward(record if keep_pre_activation else None, x, up, up_bias, down, down_bias,
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
    record = _Record(_counts(ends), _FUSED_BY_NAME[activation], (x, up, down, pre), tuple(needs))
    grads = _SegmentMLP.backward(record, grad_y)[:5]
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_segment_mlp_backward_op.register_fake
def _(grad_y, x, up, down, pre, ends, activation, needs):
    shapes = (x.shape, up.shape, up.shape[:2], down.shape, down.shape[:2])
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


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
    return _SegmentLinear.forward(None, x, weight, bias, _counts(ends))


@_segment_linear_op.register_fake
def _(x, weight, bias, ends):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("clip_moe::segment_linear_backward", mutates_args=())
def _segment_linear_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor,
                                needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    record = _Record(_counts(ends), None, (x, weight), (*needs, False))
    grads = _SegmentLinear.backward(record, grad_out)[:3]
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_segment_linear_backward_op.register_fake
def _(grad_out, x, weight, ends, needs):
    shapes = (x.shape, weight.shape, weight.shape[:2])
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _segment_linear_setup_context(ctx, inputs, output) -> None:
    x, weight, _, ends = inputs
    ctx.save_for_backward(x, weight, ends)
    ctx.needs = list(ctx.needs_input_grad[:3])


def _segment_linear_op_backward(ctx, grad_out: torch.Tensor):
    x, weight, ends = ctx.saved_tensors
    grads = _segment_linear_backward_op(grad_out, x, weight, ends, ctx.needs)
    return (*(g if need else None for g, need in zip(grads, ctx.needs)), None)


_segment_linear_op.register_autograd(_segment_linear_op_backward, setup_context=_segment_linear_setup_context)


def traceable_segment_mlp(x: torch.Tensor, w: ExpertWeights, act_fn: nn.Module, ends: torch.Tensor) -> torch.Tensor:
    """`segment_mlp` through the custom ops: the same kernels, traceable (output shapes fixed by the inputs')."""
    act = fused_activation(act_fn)
    if act is None:
        h = act_fn(_segment_linear_op(x, w.up, w.up_bias, ends))
        return _segment_linear_op(h, w.down, w.down_bias, ends)
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *w))
    return _segment_mlp_op(x, *w, ends, act.name, keep)[0]


# fn(x [S, d] sorted by expert, weights, act_fn, expert_ids [S] (sorted), ends [E] (int64, one past each
# expert's last row; experts without rows repeat the previous end)) -> [S, d].
ExpertFn = Callable[[torch.Tensor, ExpertWeights, nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExpertDispatch:
    """A registered way of running the expert MLPs over expert-sorted rows.

    host_sync: the implementation reads the per-expert row counts on the host (`.tolist()`), a stall
        on a GPU stream. In eager mode such an implementation gets only the rows within capacity
        (boolean indexing, so nothing is computed for dropped rows); otherwise, and always while
        torch.compile / torch.export trace, every row is computed and the dropped rows' combine weights
        are zeroed, so no shape depends on the data.
    """

    fn: ExpertFn
    host_sync: bool
    description: str


EXPERT_DISPATCH: dict[str, ExpertDispatch] = {}


def register_expert_dispatch(name: str, *, host_sync: bool, description: str) -> Callable[[ExpertFn], ExpertFn]:
    """Register an experts implementation under `name` (selectable through `CLIPMoEExperts.dispatch`)."""

    def register(fn: ExpertFn) -> ExpertFn:
        EXPERT_DISPATCH[name] = ExpertDispatch(fn, host_sync, description)
        return fn

    return register


@register_expert_dispatch(
    "segments", host_sync=True,
    description="one addmm per expert segment, fused bias and activation (`segment_mlp`); the CPU eager default",
)
def segments_experts(x: torch.Tensor, w: ExpertWeights, act_fn: nn.Module, expert_ids: torch.Tensor,
                     ends: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return traceable_segment_mlp(x, w, act_fn, ends)
    return segment_mlp(x, w.up, w.up_bias, w.down, w.down_bias, _counts(ends), act_fn)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, expert_ids: torch.Tensor,
                   offsets: torch.Tensor) -> torch.Tensor:
    """Per-expert linear through `grouped_mm` with device-side int32 offsets (no host sync, traceable).

    grouped_mm cannot add a per-expert bias (its `bias` is one tensor for every group), so the bias is
    gathered per row here: one extra [S, out] read that the segment path avoids by fusing it into addmm.
    On the CPU, grouped_mm's backward needs 16-byte aligned rows (in/out widths a multiple of 4 in fp32,
    8 in bf16), which every CLIP width satisfies.
    """
    out = torch.nn.functional.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    return out + bias.index_select(0, expert_ids)


@register_expert_dispatch(
    "grouped_mm", host_sync=False,
    description="torch.nn.functional.grouped_mm with device-side offsets; the CUDA and torch.compile/export default",
)
def grouped_mm_experts(x: torch.Tensor, w: ExpertWeights, act_fn: nn.Module, expert_ids: torch.Tensor,
                       ends: torch.Tensor) -> torch.Tensor:
    offsets = ends.to(torch.int32)
    h = act_fn(grouped_linear(x, w.up, w.up_bias, expert_ids, offsets))
    return grouped_linear(h, w.down, w.down_bias, expert_ids, offsets)


def default_expert_dispatch(device: torch.device, dtype: torch.dtype) -> str:
    """The implementation `CLIPMoEExperts` uses when its `dispatch` is None, for the compute device / dtype.

    "grouped_mm" on CUDA: device-side offsets, no host sync. "segments" on the CPU, where it is the fastest
    (scripts/bench_moe.py), eager or traced (as the `clip_moe::segment_mlp` custom op). Also "segments"
    when tracing a non-bf16 CUDA model, because torch's fake-tensor rule for grouped_mm accepts only
    bf16 (fp16 with cuBLASLt), and on torch builds without grouped_mm.
    """
    if device.type != "cuda" or not hasattr(torch.nn.functional, "grouped_mm"):
        return "segments"
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        return "segments"
    return "grouped_mm"


def _expert_dispatch(name: str) -> ExpertDispatch:
    try:
        return EXPERT_DISPATCH[name]
    except KeyError:
        raise ValueError(
            f"unknown experts dispatch {name!r}; registered: {sorted(EXPERT_DISPATCH)} (or None for the default)"
        ) from None


def set_expert_dispatch(model: nn.Module, name: str | None) -> int:
    """Force every `CLIPMoEExperts` in `model` onto the implementation `name` (None = per-call default).

    Returns how many experts modules were set, so a caller can tell a dense model (0) apart.
    """
    if name is not None:
        _expert_dispatch(name)
    modules = [m for m in model.modules() if isinstance(m, CLIPMoEExperts)]
    for m in modules:
        m.dispatch = name
    return len(modules)


def expert_compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The autocast dtype of x's device when autocast is on, else the weights' dtype.

    The segment path writes through `out=` kernels, which autocast never sees, so the experts cast
    their inputs and weights themselves; the casts are differentiable, so fp32 master weights still get
    fp32 gradients.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


@use_experts_implementation(has_bias=True, has_gate=False)
class CLIPMoEExperts(nn.Module):
    """`num_experts` CLIP MLPs (fc1 -> act -> fc2) with weights stacked along dim 0.

    `dispatch` names the implementation in `EXPERT_DISPATCH` that runs the expert MLPs ("segments",
    "grouped_mm", ...); None (the default) picks per call with `default_expert_dispatch`. It is a plain
    attribute, not a config field, because the best choice depends on the device, not on the checkpoint.
    """

    dispatch: str | None = None

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        d, h = config.hidden_size, config.intermediate_size
        self.up_proj = nn.Parameter(torch.empty(self.num_experts, h, d))
        self.up_proj_bias = nn.Parameter(torch.zeros(self.num_experts, h))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, d, h))
        self.down_proj_bias = nn.Parameter(torch.zeros(self.num_experts, d))
        self.act_fn = ACT2FN[config.hidden_act]
        self.capacity_factor = config.capacity_factor

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states [T, d], top_k_index / top_k_weights [T, k] -> [T, d] (sum of weighted expert outputs).

        The weighted sum is accumulated in hidden_states' dtype (fp32 under autocast, like the residual
        stream it is added to); the expert matmuls run in `expert_compute_dtype`.
        """
        num_tokens, k = top_k_index.shape
        dtype = expert_compute_dtype(hidden_states, self.up_proj)
        impl = _expert_dispatch(self.dispatch or default_expert_dispatch(hidden_states.device, dtype))
        # Stable sort keeps token order inside each expert segment (capacity drops the latest tokens).
        expert_sorted, order = torch.sort(top_k_index.reshape(-1), stable=True)
        # Segment ends from the sorted ids (not bincount, whose output size depends on the data).
        ends = torch.searchsorted(expert_sorted, torch.arange(1, self.num_experts + 1, device=expert_sorted.device))
        weights = top_k_weights.reshape(-1).index_select(0, order)
        if self.capacity_factor is not None:
            keep = self._within_capacity(expert_sorted, ends, num_tokens * k)
            if impl.host_sync and not torch.compiler.is_compiling():
                # Compute only the kept rows: this path reads the counts on the host anyway.
                expert_sorted, order, weights = expert_sorted[keep], order[keep], weights[keep]
                counts = torch.diff(ends, prepend=ends.new_zeros(1))
                ends = torch.cumsum(counts.clamp(max=self._capacity(num_tokens * k)), 0)
            else:  # Traceable: dropped rows still run, but add nothing and get no gradient.
                weights = weights * keep
        token_of_choice = order // k

        params = ExpertWeights(*(p.to(dtype) for p in (self.up_proj, self.up_proj_bias, self.down_proj,
                                                        self.down_proj_bias)))
        x = hidden_states.index_select(0, token_of_choice).to(dtype)
        y = impl.fn(x, params, self.act_fn, expert_sorted, ends)

        weights = weights.to(y.dtype).unsqueeze(1)
        y = y.mul_(weights) if not (y.requires_grad or weights.requires_grad) else y * weights
        out = hidden_states.new_zeros(num_tokens, hidden_states.shape[-1])
        return out.index_add_(0, token_of_choice, y.to(out.dtype))

    def _capacity(self, num_choices: int) -> int:
        return math.ceil(self.capacity_factor * num_choices / self.num_experts)

    def _within_capacity(self, expert_sorted: torch.Tensor, ends: torch.Tensor, num_choices: int) -> torch.Tensor:
        """[S] bool: the choice is among its expert's first `capacity` (in token order); the rest are dropped."""
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        rank_in_expert = torch.arange(expert_sorted.numel(), device=expert_sorted.device) - starts[expert_sorted]
        return rank_in_expert < self._capacity(num_choices)
