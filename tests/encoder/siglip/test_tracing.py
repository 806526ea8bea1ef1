"""torch.compile(fullgraph=True) and torch.export of SigLIP-MoE: whole graphs (the experts as the custom ops, the
losses masked by weights), the same numbers as eager."""

import pytest
import torch

from encoder.siglip import sparse_upcycle_siglip

pytestmark = pytest.mark.compile


def experts_apart(model):
    """Experts made different, so routing matters to the numbers."""
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "up_proj"):
                module.up_proj.add_(0.05 * torch.randn_like(module.up_proj))
    return model.eval()


def host_reads(exported: torch.export.ExportedProgram) -> set[str]:
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    return {o for o in ops if "_local_scalar_dense" in o or "nonzero" in o or "masked_select" in o}


def test_vision_tower_exports_and_matches_eager(dense_siglip, siglip_batch):
    model = experts_apart(sparse_upcycle_siglip(dense_siglip.vision_model,
                                                vision_moe=dict(moe_layers=[0, 2, 3], moe_head=True, capacity_factor=0.5)))
    px = siglip_batch["pixel_values"]
    exported = torch.export.export(model, (px,))
    assert not host_reads(exported)
    other = torch.randn_like(px) * 3  # other routing: the graph did not bake in this batch's expert counts
    with torch.no_grad():
        for x in (px, other):
            got, expected = exported.module()(x), model(x)
            torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-5)


def test_full_model_compiles_fullgraph_forward_and_backward(dense_siglip, siglip_batch):
    model = experts_apart(sparse_upcycle_siglip(dense_siglip, vision_moe=dict(moe_layers=[1, 3], moe_head=True),
                                                text_moe=dict(moe_layers=[0, 2])))
    model.train()  # (no dropout in these configs: train mode only records the graph)
    batch = {k: v for k, v in siglip_batch.items() if k != "attention_mask"}  # padding found from the pad token
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(**batch, return_loss=True, output_router_logits=True)
    got.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    expected = model(**batch, return_loss=True, output_router_logits=True)
    expected.loss.backward()
    for name in ("loss", "aux_loss", "logits_per_image"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-5, rtol=1e-5)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-4, rtol=1e-4, msg=name)
