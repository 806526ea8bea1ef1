"""The experts and their implementations registered by name: the grouped_mm path forced on the CPU
against the default segment path, forward and backward, with empty experts and with a capacity factor;
how the default is chosen; and mixed precision (under autocast the experts' matmuls run in the autocast
dtype: the segment kernels' `out=` calls are invisible to autocast, so the experts cast for themselves),
the CUDA path against the CPU one."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import MatmulLog, tiny_batch, tiny_dense_clip
from encoder.clip.configuration import CLIPMoEVisionConfig
from encoder.experts import (
    EXPERT_DISPATCH,
    FALLBACK_EXPERT_DISPATCH,
    CLIPMoEExperts,
    default_expert_dispatch,
    register_expert_dispatch,
    segments_experts,
    set_expert_dispatch,
)
from encoder.moe import CLIPMoESparseMLP
from upcycle import sparse_upcycle

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


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_pytorch_tanh", "gelu_new"])
def test_other_activations_agree_across_implementations(hidden_act):
    # gelu and gelu_pytorch_tanh have fused segment kernels; gelu_new takes the unfused segment path.
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



def test_while_tracing_non_bf16_cuda_falls_back_to_segments(monkeypatch):
    # grouped_mm traces only in bf16 (torch's fake-tensor rule), so a traced fp32 CUDA model takes the segments.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert default_expert_dispatch(torch.device("cuda"), torch.float32) == FALLBACK_EXPERT_DISPATCH == "segments"
    assert default_expert_dispatch(torch.device("cuda"), torch.bfloat16) == "grouped_mm"
    assert default_expert_dispatch(torch.device("cpu"), torch.bfloat16) == "segments"


def test_a_registered_default_takes_over_its_device_and_nothing_else(monkeypatch):
    monkeypatch.setattr("encoder.experts.EXPERT_DISPATCH", dict(EXPERT_DISPATCH))  # leave the real one alone
    from encoder import experts as experts_mod

    register_expert_dispatch("test_cpu_kernel", host_sync=True, default_on=("cpu",), description="test")(
        segments_experts)
    assert list(experts_mod.EXPERT_DISPATCH)[-1] == "test_cpu_kernel"
    assert default_expert_dispatch(torch.device("cpu"), torch.float32) == "test_cpu_kernel"
    assert default_expert_dispatch(torch.device("cuda"), torch.bfloat16) == "grouped_mm"
    register_expert_dispatch("test_missing", host_sync=False, default_on=("cpu",), available=False,
                             description="test")(segments_experts)
    assert default_expert_dispatch(torch.device("cpu"), torch.float32) == "test_cpu_kernel"
    experts = experts_module()
    experts.dispatch = "test_missing"
    index, weights = routing(4, 2, [0, 1])
    with pytest.raises(ValueError, match="test_missing.*not available"):
        experts(torch.randn(4, 32), index, weights)

def clip_moe():
    """A CLIP-MoE whose every layer (both towers) is MoE, with the experts perturbed apart."""
    model = sparse_upcycle(tiny_dense_clip(), num_experts=4, top_k=2, moe_layers="all")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CLIPMoEExperts):
                m.up_proj.add_(0.3 * m.up_proj.std() * torch.randn(m.up_proj.shape, generator=g))
    return model


def forward_backward(model, batch, device_type: str | None):
    """(loss, image_embeds, grads by name) of one step, under `device_type` bf16 autocast when given."""
    model.zero_grad()
    if device_type is None:
        out = model(**batch, return_loss=True, output_router_logits=True)
    else:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = model(**batch, return_loss=True, output_router_logits=True)
    out.loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach().float().cpu(), out.image_embeds.detach().float().cpu(), grads


@contextlib.contextmanager
def matmuls_of(model):
    """A `MatmulLog` recording while the block runs; its hooks on `model`'s experts are removed afterwards."""
    log = MatmulLog()
    handles = log.watch(model)
    try:
        with log:
            yield log
    finally:
        for h in handles:
            h.remove()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.mark.parametrize("dispatch", [None, "grouped_mm"])
def test_cpu_bf16_autocast_runs_the_experts_in_bf16(dispatch):
    model = clip_moe().train()
    set_expert_dispatch(model, dispatch)
    batch = tiny_batch()
    ref_loss, ref_embeds, ref_grads = forward_backward(model, batch, None)

    with matmuls_of(model) as log:
        loss, embeds, grads = forward_backward(model, batch, "cpu")

    expert_calls = [c for c in log.calls if c[1]]
    # 2 projections per expert segment (or 2 grouped_mm calls) in each of the 8 MoE layers.
    assert len(expert_calls) >= 16
    if dispatch == "grouped_mm":
        assert all(op is aten._grouped_mm for op, _, _ in expert_calls)
    assert all(dtypes == {torch.bfloat16} for _, _, dtypes in expert_calls), expert_calls
    # Everything else autocast covers is bf16 too, backward included (the segment backward's matmuls).
    assert all(dtypes == {torch.bfloat16} for _, _, dtypes in log.calls), [c for c in log.calls if not c[1]]

    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    experts = next(m for m in model.modules() if isinstance(m, CLIPMoEExperts))
    assert experts.up_proj.grad.dtype == torch.float32  # fp32 master weights keep fp32 gradients
    # Close to fp32 at bf16's precision (8 mantissa bits; a near-tie token may switch experts).
    assert abs(float(loss - ref_loss)) < 5e-2 * abs(float(ref_loss)) + 1e-2
    assert relative_error(embeds, ref_embeds) < 5e-2
    for name in ("vision_model.encoder.layers.0.mlp.experts.up_proj", "text_model.encoder.layers.3.mlp.experts.down_proj"):
        assert relative_error(grads[name], ref_grads[name]) < 0.1, name


def test_autocast_off_means_fp32_experts():
    model = clip_moe().eval()
    with matmuls_of(model) as log, torch.no_grad():
        model(**tiny_batch())
    assert log.calls and all(dtypes == {torch.float32} for _, _, dtypes in log.calls)


def cuda_model_and_cpu_reference():
    """(a train-mode CLIP-MoE moved to CUDA, the batch on CUDA, its fp32 CPU step taken before the move)."""
    model, batch = clip_moe().train(), tiny_batch()
    reference = forward_backward(model, batch, None)
    return model.cuda(), {k: v.cuda() for k, v in batch.items()}, reference


@pytest.mark.cuda
def test_cuda_grouped_mm_bf16_matches_the_cpu_reference():
    """The CUDA default (grouped_mm) under bf16 autocast against the fp32 CPU segment path."""
    model, batch, (ref_loss, ref_embeds, ref_grads) = cuda_model_and_cpu_reference()
    with matmuls_of(model) as log:
        loss, embeds, grads = forward_backward(model, batch, "cuda")
    expert_calls = [c for c in log.calls if c[1]]
    assert expert_calls and all(op is aten._grouped_mm and dtypes == {torch.bfloat16}
                                for op, _, dtypes in expert_calls)
    assert torch.isfinite(loss)
    assert abs(float(loss - ref_loss)) < 5e-2 * abs(float(ref_loss)) + 1e-2
    assert relative_error(embeds, ref_embeds) < 5e-2
    for name, g in ref_grads.items():
        if ".experts." in name:
            assert relative_error(grads[name], g) < 0.1, name


@pytest.mark.cuda
def test_cuda_fp32_default_matches_the_cpu_reference():
    """The CUDA default in fp32 (grouped_mm, whatever kernel torch picks for fp32) against the CPU path."""
    model, batch, (ref_loss, ref_embeds, ref_grads) = cuda_model_and_cpu_reference()
    loss, embeds, grads = forward_backward(model, batch, None)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(embeds, ref_embeds, atol=1e-4, rtol=1e-4)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.cuda
@pytest.mark.compile
def test_cuda_bf16_vision_model_exports_with_grouped_mm():
    import torch.export

    model = clip_moe().vision_model.eval().cuda().to(torch.bfloat16)
    px = tiny_batch()["pixel_values"].cuda().to(torch.bfloat16)
    exported = torch.export.export(model, (px,))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "aten._grouped_mm.default" in ops
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(px).pooler_output, model(px).pooler_output,
                                   atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dispatch", ["segments", "grouped_mm"])
def test_capacity_with_a_token_mask_of_padding_only_computes_nothing(dispatch):
    # Every token padding: no real choice, no capacity taken, a zero output and zero gradients, on both branches.
    experts = experts_module(capacity_factor=0.5)
    index, weights = routing(6, 2, [0, 1, 2, 3])
    experts.dispatch = dispatch
    x = torch.randn(6, 32, requires_grad=True)
    y = experts(x, index, weights, token_mask=torch.zeros(6, dtype=torch.bool))
    y.sum().backward()
    assert torch.count_nonzero(y) == 0 and torch.count_nonzero(x.grad) == 0
    assert all(torch.count_nonzero(p.grad) == 0 for p in experts.parameters() if p.grad is not None)


def test_capacity_with_a_token_mask_agrees_across_implementations():
    experts = experts_module(capacity_factor=0.75)
    index, weights = routing(24, 2, [0, 1, 2, 3])
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(3))
    mask = torch.rand(24, generator=torch.Generator().manual_seed(5)) > 0.3
    results = {}
    for dispatch in ("segments", "grouped_mm"):
        experts.dispatch = dispatch
        experts.zero_grad()
        xg = x.clone().requires_grad_()
        y = experts(xg, index, weights, token_mask=mask)
        y.square().sum().backward()
        results[dispatch] = [y.detach(), xg.grad] + [p.grad.clone() for p in experts.parameters()]
    for got, want in zip(results["grouped_mm"], results["segments"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(results["segments"][0][~mask]) == 0
