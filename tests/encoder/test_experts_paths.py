"""The experts implementations registered by name: the grouped_mm path forced on the CPU against the
default segment path, forward and backward, with empty experts and with a capacity factor."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from encoder.configuration import CLIPMoEVisionConfig
from encoder.experts import (
    EXPERT_DISPATCH,
    CLIPMoEExperts,
    default_expert_dispatch,
    set_expert_dispatch,
)
from encoder.moe import CLIPMoESparseMLP

aten = torch.ops.aten


class OpLog(TorchDispatchMode):
    """Records every aten op that runs (forward and backward), with the dtypes of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[object, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtypes = tuple(a.dtype for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        self.calls.append((func.overloadpacket, dtypes))
        return func(*args, **kwargs)

    def ran(self, packet) -> bool:
        return any(p is packet for p, _ in self.calls)


def experts_module(num_experts=4, capacity_factor=None, hidden_act="quick_gelu", seed=0) -> CLIPMoEExperts:
    cfg = CLIPMoEVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              num_experts=num_experts, top_k=2, moe_layers=[0], capacity_factor=capacity_factor,
                              hidden_act=hidden_act)
    cfg._experts_implementation = "eager"  # a standalone module: our own forward
    torch.manual_seed(seed)
    experts = CLIPMoEExperts(cfg)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    return experts


def routing(num_tokens: int, k: int, experts: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """top_k_index drawn from `experts` only (distinct per token), renormalised random weights."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts)
    index = torch.stack([pool[torch.randperm(len(experts), generator=g)[:k]] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, k, generator=g) + 0.1
    return index, weights / weights.sum(-1, keepdim=True)


def run(experts: CLIPMoEExperts, dispatch: str | None, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor):
    """Output and gradients (input, routing weights, the four expert parameters) under one implementation."""
    experts.dispatch = dispatch
    experts.zero_grad()
    x = x.detach().clone().requires_grad_()
    weights = weights.detach().clone().requires_grad_()
    y = experts(x, index, weights)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)))
    grads = {"x": x.grad, "weights": weights.grad}
    grads.update({name: p.grad for name, p in experts.named_parameters()})
    return y.detach(), grads


CASES = {
    "all experts used": {"experts": [0, 1, 2, 3]},
    "experts 1 and 3 get no tokens": {"experts": [0, 2]},
    "capacity factor drops choices": {"experts": [0, 1, 2, 3], "capacity_factor": 0.5},
    "capacity factor and empty experts": {"experts": [0, 2, 3], "capacity_factor": 0.75},
}


@pytest.mark.parametrize("case", list(CASES))
def test_grouped_mm_forced_on_cpu_matches_segments_forward_and_backward(case):
    spec = CASES[case]
    experts = experts_module(capacity_factor=spec.get("capacity_factor"))
    index, weights = routing(24, 2, spec["experts"])
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(3))

    with OpLog() as log_segments:
        y_seg, g_seg = run(experts, None, x, index, weights)  # the CPU default
    with OpLog() as log_grouped:
        y_gmm, g_gmm = run(experts, "grouped_mm", x, index, weights)
    # The forced branch really runs grouped_mm (and the default does not).
    assert log_grouped.ran(aten._grouped_mm) and not log_segments.ran(aten._grouped_mm)

    torch.testing.assert_close(y_gmm, y_seg, atol=1e-5, rtol=1e-5)
    assert g_seg.keys() == {"x", "weights", "up_proj", "up_proj_bias", "down_proj", "down_proj_bias"}
    for name in g_seg:
        torch.testing.assert_close(g_gmm[name], g_seg[name], atol=1e-5, rtol=1e-5, msg=name)
    for e in set(range(4)) - set(spec["experts"]):  # experts without tokens get exactly zero gradient
        for name in ("up_proj", "up_proj_bias", "down_proj", "down_proj_bias"):
            assert torch.count_nonzero(g_gmm[name][e]) == 0 and torch.count_nonzero(g_seg[name][e]) == 0


def test_capacity_factor_case_really_drops_choices():
    # Guards the capacity cases above against a capacity that never bites.
    dropped = experts_module(capacity_factor=0.5)
    dropless = experts_module(capacity_factor=None)
    index, weights = routing(24, 2, [0, 1, 2, 3])
    x = torch.randn(24, 32)
    with torch.no_grad():
        for dispatch in ("segments", "grouped_mm"):
            dropped.dispatch = dropless.dispatch = dispatch
            assert not torch.allclose(dropped(x, index, weights), dropless(x, index, weights))


def test_grouped_mm_path_matches_a_token_by_token_reference():
    experts = experts_module(capacity_factor=None)
    experts.dispatch = "grouped_mm"
    index, weights = routing(10, 2, [0, 2, 3])
    x = torch.randn(10, 32)
    expected = torch.zeros_like(x)
    for t in range(10):
        for j in range(2):
            e = int(index[t, j])
            h = experts.act_fn(x[t] @ experts.up_proj[e].T + experts.up_proj_bias[e])
            expected[t] += weights[t, j] * (h @ experts.down_proj[e].T + experts.down_proj_bias[e])
    with torch.no_grad():
        torch.testing.assert_close(experts(x, index, weights), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_pytorch_tanh"])
def test_other_activations_agree_across_implementations(hidden_act):
    # gelu has a fused segment kernel; gelu_pytorch_tanh takes the unfused segment path.
    experts = experts_module(hidden_act=hidden_act)
    index, weights = routing(12, 2, [0, 1, 3])
    x = torch.randn(12, 32)
    y_seg, g_seg = run(experts, "segments", x, index, weights)
    y_gmm, g_gmm = run(experts, "grouped_mm", x, index, weights)
    torch.testing.assert_close(y_gmm, y_seg, atol=1e-5, rtol=1e-5)
    for name in g_seg:
        torch.testing.assert_close(g_gmm[name], g_seg[name], atol=1e-5, rtol=1e-5, msg=name)


def test_registry_and_defaults():
    assert {"segments", "grouped_mm"} <= set(EXPERT_DISPATCH)
    assert EXPERT_DISPATCH["segments"].host_sync and not EXPERT_DISPATCH["grouped_mm"].host_sync
    assert default_expert_dispatch(torch.device("cpu"), torch.float32) == "segments"
    assert default_expert_dispatch(torch.device("cpu"), torch.bfloat16) == "segments"
    assert default_expert_dispatch(torch.device("cuda"), torch.bfloat16) == "grouped_mm"
    assert default_expert_dispatch(torch.device("cuda"), torch.float32) == "grouped_mm"


def test_unknown_dispatch_name_is_a_clear_error():
    experts = experts_module()
    index, weights = routing(4, 2, [0, 1])
    experts.dispatch = "no_such_kernel"
    with pytest.raises(ValueError, match="no_such_kernel.*registered"):
        experts(torch.randn(4, 32), index, weights)
    with pytest.raises(ValueError, match="registered"):
        set_expert_dispatch(experts, "no_such_kernel")


def test_set_expert_dispatch_reaches_every_moe_layer():
    cfg = CLIPMoEVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              moe_layers=[0])
    model = torch.nn.ModuleList([CLIPMoESparseMLP(cfg), CLIPMoESparseMLP(cfg), torch.nn.Linear(2, 2)])
    assert set_expert_dispatch(model, "grouped_mm") == 2
    assert all(m.experts.dispatch == "grouped_mm" for m in model[:2])
    assert set_expert_dispatch(model, None) == 2 and model[0].experts.dispatch is None
