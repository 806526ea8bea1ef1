"""Mixed precision: under autocast the experts' matmuls run in the autocast dtype (their `out=` kernels
are invisible to autocast, so the experts cast for themselves), and the CUDA path against the CPU one."""

import pytest
import torch

from conftest import MatmulLog, tiny_batch, tiny_dense_clip
from encoder.experts import CLIPMoEExperts, set_expert_dispatch
from upcycle import sparse_upcycle

aten = torch.ops.aten

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


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.mark.parametrize("dispatch", [None, "grouped_mm"])
def test_cpu_bf16_autocast_runs_the_experts_in_bf16(dispatch):
    model = clip_moe().train()
    set_expert_dispatch(model, dispatch)
    batch = tiny_batch()
    ref_loss, ref_embeds, ref_grads = forward_backward(model, batch, None)

    log = MatmulLog()
    handles = log.watch(model)
    try:
        with log:
            loss, embeds, grads = forward_backward(model, batch, "cpu")
    finally:
        for h in handles:
            h.remove()

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
    log = MatmulLog()
    handles = log.watch(model)
    try:
        with log, torch.no_grad():
            model(**tiny_batch())
    finally:
        for h in handles:
            h.remove()
    assert log.calls and all(dtypes == {torch.float32} for _, _, dtypes in log.calls)


@pytest.mark.cuda
def test_cuda_grouped_mm_bf16_matches_the_cpu_reference():
    """The CUDA default (grouped_mm) under bf16 autocast against the fp32 CPU segment path."""
    model = clip_moe().train()
    batch = tiny_batch()
    ref_loss, ref_embeds, ref_grads = forward_backward(model, batch, None)

    model.cuda()
    log = MatmulLog()
    handles = log.watch(model)
    try:
        with log:
            loss, embeds, grads = forward_backward(model, {k: v.cuda() for k, v in batch.items()}, "cuda")
    finally:
        for h in handles:
            h.remove()
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
    model = clip_moe().train()
    batch = tiny_batch()
    ref_loss, ref_embeds, ref_grads = forward_backward(model, batch, None)
    model.cuda()
    loss, embeds, grads = forward_backward(model, {k: v.cuda() for k, v in batch.items()}, None)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(embeds, ref_embeds, atol=1e-4, rtol=1e-4)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.cuda
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
