"""Stacked expert MLPs and the registry of named implementations that run them over token-choices.

The experts follow transformers' experts interface (`up_proj` [E, h, d], `up_proj_bias` [E, h],
`down_proj` [E, d, h], `down_proj_bias` [E, d], `act_fn`), so `experts_implementation=` picks
transformers' kernels (`grouped_mm`, `batched_mm`, GPU kernels) by name. The module's own forward
(`"eager"`, our default) sorts token-choices by expert and hands the expert-sorted rows to one of the
implementations in `EXPERT_DISPATCH`, chosen by `CLIPMoEExperts.dispatch` (None: `default_expert_dispatch`,
the most recently registered implementation that declares itself the default for the compute device):

- "segments" (the CPU default, and the fallback everywhere): one contiguous addmm per expert segment
  with the bias and activation fused in (`encoder.kernels`). It reads the per-expert counts on the
  host; under torch.compile / torch.export it runs as the custom op `clip_moe::segment_mlp`, whose
  output shapes do not depend on the data, so the graph traces whole.
- "grouped_mm" (the CUDA default): `torch.nn.functional.grouped_mm` with device-side offsets, no host
  sync, biases gathered per row. It also runs on the CPU (forced), where it is slower but gives the
  same numbers.

Under autocast the experts compute in the autocast dtype (they cast inputs and weights themselves: the
segment kernels' `out=` calls are invisible to autocast).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation

from .kernels.ops import traceable_segment_mlp
from .kernels.segment_mlp import segment_counts, segment_mlp


class ExpertWeights(NamedTuple):
    """The stacked expert parameters as one implementation receives them (already in the compute dtype)."""

    up: torch.Tensor  # [E, h, d]
    up_bias: torch.Tensor  # [E, h]
    down: torch.Tensor  # [E, d, h]
    down_bias: torch.Tensor  # [E, d]


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
    default_on: device types ("cpu", "cuda", ...) on which it is the default when `dispatch` is None.
    traceable_dtypes: the compute dtypes torch.compile / torch.export can trace it in (None: any); while
        tracing in another dtype the default falls back to `FALLBACK_EXPERT_DISPATCH`.
    available: False when this torch build lacks what it needs (then never a default, and forcing it fails).
    """

    fn: ExpertFn
    host_sync: bool
    description: str
    default_on: tuple[str, ...] = ()
    traceable_dtypes: tuple[torch.dtype, ...] | None = None
    available: bool = True

    def is_default_for(self, device: torch.device, dtype: torch.dtype, tracing: bool) -> bool:
        traceable = self.traceable_dtypes is None or dtype in self.traceable_dtypes
        return self.available and device.type in self.default_on and (traceable or not tracing)


EXPERT_DISPATCH: dict[str, ExpertDispatch] = {}

# Runs on every device and traces in every dtype: what `default_expert_dispatch` picks when nothing claims it.
FALLBACK_EXPERT_DISPATCH = "segments"


def register_expert_dispatch(
    name: str,
    *,
    host_sync: bool,
    description: str,
    default_on: tuple[str, ...] = (),
    traceable_dtypes: tuple[torch.dtype, ...] | None = None,
    available: bool = True,
) -> Callable[[ExpertFn], ExpertFn]:
    """Register an experts implementation under `name` (selectable through `CLIPMoEExperts.dispatch`).

    The fields are those of `ExpertDispatch`. Registering with `default_on` makes it the default on those
    devices, over any implementation registered before it (re-registering a name replaces it).
    """

    def register(fn: ExpertFn) -> ExpertFn:
        EXPERT_DISPATCH.pop(name, None)  # re-registered: moves to the end, the most recent
        EXPERT_DISPATCH[name] = ExpertDispatch(fn, host_sync, description, tuple(default_on),
                                               traceable_dtypes, available)
        return fn

    return register


@register_expert_dispatch(
    "segments", host_sync=True, default_on=("cpu",),
    description="one addmm per expert segment, fused bias and activation (encoder.kernels); the CPU default",
)
def segments_experts(x: torch.Tensor, w: ExpertWeights, act_fn: nn.Module, expert_ids: torch.Tensor,
                     ends: torch.Tensor) -> torch.Tensor:
    """The segment kernels: eager with the counts read on the host, or as the custom ops while tracing."""
    if torch.compiler.is_compiling():
        return traceable_segment_mlp(x, *w, ends, act_fn)
    return segment_mlp(x, *w, segment_counts(ends), act_fn)


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, expert_ids: torch.Tensor,
                    offsets: torch.Tensor) -> torch.Tensor:
    out = torch.nn.functional.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    # grouped_mm's `bias` is one tensor for every group, so the per-expert bias is gathered per row.
    return out + bias.index_select(0, expert_ids)


@register_expert_dispatch(
    "grouped_mm", host_sync=False, default_on=("cuda",),
    # torch's fake-tensor rule for grouped_mm accepts only bf16 (fp16 with cuBLASLt).
    traceable_dtypes=(torch.bfloat16,),
    available=hasattr(torch.nn.functional, "grouped_mm"),
    description="torch.nn.functional.grouped_mm with device-side offsets, biases gathered per row; the CUDA default",
)
def grouped_mm_experts(x: torch.Tensor, w: ExpertWeights, act_fn: nn.Module, expert_ids: torch.Tensor,
                       ends: torch.Tensor) -> torch.Tensor:
    """Both projections as `grouped_mm` with device-side int32 offsets: no host sync, traceable in bf16.

    grouped_mm cannot fuse a per-expert bias yet, so each projection adds its bias through a per-row
    gather (`bias[expert_ids]`, a [T*k, h] then a [T*k, d] tensor), an extra pass the segment path
    avoids by fusing the bias into addmm. On the CPU, grouped_mm's backward needs 16-byte aligned rows
    (in/out widths a multiple of 4 in fp32, 8 in bf16), which every CLIP width satisfies.
    """
    offsets = ends.to(torch.int32)
    h = act_fn(_grouped_linear(x, w.up, w.up_bias, expert_ids, offsets))
    return _grouped_linear(h, w.down, w.down_bias, expert_ids, offsets)


def default_expert_dispatch(device: torch.device, dtype: torch.dtype) -> str:
    """The implementation `CLIPMoEExperts` uses when its `dispatch` is None, for the compute device / dtype.

    The most recently registered available implementation whose `default_on` names the device (and, while
    torch.compile / torch.export trace, that traces in `dtype`); else `FALLBACK_EXPERT_DISPATCH`. Built in:
    "grouped_mm" on CUDA (no host sync), "segments" on the CPU, where it is the fastest
    (scripts/bench_moe.py), eager or traced.
    """
    tracing = torch.compiler.is_compiling()
    for name, impl in reversed(EXPERT_DISPATCH.items()):
        if impl.is_default_for(device, dtype, tracing):
            return name
    return FALLBACK_EXPERT_DISPATCH


def _expert_dispatch(name: str) -> ExpertDispatch:
    impl = EXPERT_DISPATCH.get(name)
    if impl is None:
        raise ValueError(
            f"unknown experts dispatch {name!r}; registered: {sorted(EXPERT_DISPATCH)} (or None for the default)"
        )
    if not impl.available:
        raise ValueError(f"experts dispatch {name!r} is not available in torch {torch.__version__}; "
                         f"use another of {sorted(EXPERT_DISPATCH)} or None for the default")
    return impl


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
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states [T, d], top_k_index / top_k_weights [T, k] -> [T, d] (sum of weighted expert outputs).

        The weighted sum is accumulated in hidden_states' dtype (fp32 under autocast, like the residual
        stream it is added to); the expert matmuls run in `expert_compute_dtype`.

        token_mask [T] bool (True = real token) or None (all real) matters only with a `capacity_factor`: padding
        then takes no expert capacity (its choices are dropped, so its output is 0: the residual passes it
        through), and the capacity is counted over the real tokens, so the real tokens are routed exactly as
        they would be without the padding. Without a capacity factor every token, padding included, is computed as
        before: dropless routing of one token never changes another's output, and keeping padding's output as the
        dense MLP's keeps an upcycled model equal to its dense base at every position.
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
            real = None if token_mask is None else token_mask.reshape(-1).to(torch.bool).index_select(0, order // k)
            keep = self._within_capacity(expert_sorted, ends, num_tokens * k, real)
            if impl.host_sync and not torch.compiler.is_compiling():
                # Compute only the kept rows: this path reads the counts on the host anyway.
                expert_sorted, order, weights = expert_sorted[keep], order[keep], weights[keep]
                ends = torch.searchsorted(expert_sorted, torch.arange(1, self.num_experts + 1,
                                                                      device=expert_sorted.device))
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

    def _capacity(self, num_choices: int | torch.Tensor) -> int | torch.Tensor:
        """Choices each expert takes: ceil(capacity_factor * num_choices / E); a tensor when num_choices is one
        (the real tokens' choices, counted on the device: no host read), computed in float64 like the int form."""
        if isinstance(num_choices, torch.Tensor):
            return torch.ceil(self.capacity_factor * num_choices.double() / self.num_experts)
        return math.ceil(self.capacity_factor * num_choices / self.num_experts)

    def _within_capacity(self, expert_sorted: torch.Tensor, ends: torch.Tensor, num_choices: int,
                         real: torch.Tensor | None = None) -> torch.Tensor:
        """[S] bool: the choice is among its expert's first `capacity` (in token order); the rest are dropped.

        real [S] bool (per expert-sorted choice) or None: with it, padding's choices are dropped and neither count
        in an expert's rank nor in the capacity, which is taken over the real choices alone.
        """
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        if real is None:
            rank_in_expert = torch.arange(expert_sorted.numel(), device=expert_sorted.device) - starts[expert_sorted]
            return rank_in_expert < self._capacity(num_choices)
        # Real choices before this one in its expert's segment: real_before[j] counts the real choices among the
        # first j, so a choice's rank is its count minus its segment start's.
        real_before = torch.cat([starts.new_zeros(1), torch.cumsum(real, 0)])
        rank_in_expert = real_before[:-1] - real_before[starts][expert_sorted]
        return real & (rank_in_expert < self._capacity(real.sum()))
