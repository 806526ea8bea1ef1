"""torch.compile(fullgraph=True) and torch.export of the SigLIP2-MoE vision tower on naflex inputs: whole graphs,
the aux losses masked to the real patches, the same numbers as eager."""

import pytest
import torch

from encoder.siglip2 import sparse_upcycle_siglip2

pytestmark = pytest.mark.compile

VISION_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


def vision_tower(dense):
    model = sparse_upcycle_siglip2(dense.vision_model, vision_moe=dict(moe_layers=[0, 2, 3], moe_head=True))
    with torch.no_grad():  # experts apart, so routing matters to the numbers
        for module in model.modules():
            if hasattr(module, "up_proj"):
                module.up_proj.add_(0.05 * torch.randn_like(module.up_proj))
    return model


def test_vision_tower_exports_and_matches_eager(dense_siglip2, siglip2_batch):
    model = vision_tower(dense_siglip2).eval()
    inputs = {k: siglip2_batch[k] for k in VISION_KEYS}
    exported = torch.export.export(model, (), kwargs=inputs)
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not {o for o in ops if "_local_scalar_dense" in o or "nonzero" in o or "masked_select" in o}
    # Same grids (transformers resizes the position embeddings per image on the host), other pixels and routing.
    other = dict(inputs, pixel_values=inputs["pixel_values"] * 3)
    with torch.no_grad():
        for x in (inputs, other):
            got, expected = exported.module()(**x), model(**x)
            torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-5)


def test_vision_tower_compiles_fullgraph_forward_and_backward(dense_siglip2, siglip2_batch):
    model = vision_tower(dense_siglip2).train()
    inputs = {k: siglip2_batch[k] for k in VISION_KEYS}
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(**inputs, output_router_logits=True)
    (got.pooler_output.square().sum() + got.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    expected = model(**inputs, output_router_logits=True)
    (expected.pooler_output.square().sum() + expected.aux_loss).backward()
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.aux_loss, expected.aux_loss, atol=1e-6, rtol=1e-5)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-4, rtol=1e-4, msg=name)
