"""torch.compile(fullgraph=True) and torch.export on the default experts: no data-dependent host read in
the traced graph (the segment kernels run as the `clip_moe::segment_mlp` custom op), same numbers as eager."""

import pytest
import torch

from conftest import tiny_batch, tiny_dense_clip
from encoder import CLIPMoEVisionConfig, CLIPMoEVisionModel
from encoder.moe import CLIPMoESparseMLP
from upcycle import sparse_upcycle

pytestmark = pytest.mark.compile


def moe_layer(capacity_factor=None, seed=0, hidden_act="quick_gelu") -> CLIPMoESparseMLP:
    cfg = CLIPMoEVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              num_experts=4, top_k=2, moe_layers=[0], capacity_factor=capacity_factor,
                              hidden_act=hidden_act)
    cfg._experts_implementation = "eager"  # a standalone layer: our own forward
    torch.manual_seed(seed)
    layer = CLIPMoESparseMLP(cfg).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def vision_model(capacity_factor=None) -> CLIPMoEVisionModel:
    cfg = CLIPMoEVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, num_experts=4, top_k=2, moe_layers=[0, 1],
                              capacity_factor=capacity_factor)
    torch.manual_seed(0)
    model = CLIPMoEVisionModel(cfg).eval()
    with torch.no_grad():  # experts apart, so routing matters
        for layer in model.encoder.layers:
            layer.mlp.experts.up_proj.normal_(0, 0.3)
    return model


def graph_ops(exported: torch.export.ExportedProgram) -> set[str]:
    return {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}


def assert_no_host_reads(ops: set[str]) -> None:
    # .item() / .tolist() / nonzero-style ops are what made tracing fail (GuardOnDataDependentSymNode).
    assert not {o for o in ops if "_local_scalar_dense" in o or "nonzero" in o or "masked_select" in o}, ops


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_moe_layer_exports_and_matches_eager(capacity_factor):
    layer = moe_layer(capacity_factor)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        expected = layer(x)[0]
    exported = torch.export.export(layer, (x,))
    ops = graph_ops(exported)
    assert "clip_moe.segment_mlp.default" in ops
    assert_no_host_reads(ops)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x)[0], expected, atol=1e-5, rtol=1e-5)
        # Another batch with other routing: the graph did not bake in this batch's expert counts.
        other = torch.randn(2, 9, 32) * 3
        torch.testing.assert_close(exported.module()(other)[0], layer(other)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("capacity_factor, hidden_act", [(None, "quick_gelu"), (0.5, "quick_gelu"),
                                                        (None, "gelu_pytorch_tanh"), (None, "gelu_new")])
def test_moe_layer_compiles_fullgraph_forward_and_backward(capacity_factor, hidden_act):
    # quick_gelu and gelu_pytorch_tanh (SigLIP's) run fused in clip_moe::segment_mlp; gelu_new (pure Python in
    # transformers) has no fused kernel: two clip_moe::segment_linear ops around transformers' act_fn.
    layer = moe_layer(capacity_factor, hidden_act=hidden_act)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out, _ = compiled(x)
    out.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    expected, _ = layer(x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # Gradients sum over tokens in another order in the compiled graph: float32 rounding, ~1e-5 relative.
    for got, want in zip(grads, [x.grad] + [p.grad for p in layer.parameters()], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_router_outputs_trace_too():
    # The auxiliary losses mask padding with weights (no boolean indexing), so they export as well.
    layer = moe_layer()
    x = torch.randn(2, 6, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)

    class WithRouter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, mask):
            out, router = self.layer(x, mask, output_router_logits=True)
            return out, router.load_balance_loss, router.z_loss

    exported = torch.export.export(WithRouter(), (x, mask))
    assert_no_host_reads(graph_ops(exported))
    with torch.no_grad():
        got = exported.module()(x, mask)
        out, router = layer(x, mask, output_router_logits=True)
    for a, b in zip(got, (out, router.load_balance_loss, router.z_loss), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_vision_model_exports_and_matches_eager(capacity_factor):
    model = vision_model(capacity_factor)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(px)
    exported = torch.export.export(model, (px,))
    assert_no_host_reads(graph_ops(exported))
    with torch.no_grad():
        got = exported.module()(px)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_vision_model_compiles_fullgraph_with_inductor():
    """The default backend (inductor, C++ codegen on the CPU): the custom op runs as an extern kernel."""
    model = vision_model(capacity_factor=0.5)
    px = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        got = compiled(px, output_hidden_states=True)
        expected = model(px, output_hidden_states=True)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-5)
    for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_vision_model_compiles_fullgraph_forward_and_backward():
    model = vision_model()
    model.train()  # (no dropout in CLIP: train mode only records the graph)
    px = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(px, output_router_logits=True)
    (got.pooler_output.square().sum() + got.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = model(px, output_router_logits=True)
    (expected.pooler_output.square().sum() + expected.aux_loss).backward()
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.aux_loss, expected.aux_loss, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_unfused_activation_exports_through_segment_linear():
    # gelu_new is transformers' pure-Python tanh GELU: it rounds unlike the aten kernel, so it stays unfused.
    layer = moe_layer(hidden_act="gelu_new")
    x = torch.randn(2, 9, 32)
    exported = torch.export.export(layer, (x,))
    ops = graph_ops(exported)
    assert "clip_moe.segment_linear.default" in ops and "clip_moe.segment_mlp.default" not in ops
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x)[0], layer(x)[0], atol=1e-5, rtol=1e-5)


def full_clip_moe():
    model = sparse_upcycle(tiny_dense_clip(), num_experts=4, top_k=2, moe_layers="all")
    with torch.no_grad():
        for layer in (*model.vision_model.encoder.layers, *model.text_model.encoder.layers):
            layer.mlp.experts.up_proj.add_(0.05 * torch.randn_like(layer.mlp.experts.up_proj))
    return model.eval()


def test_full_clip_moe_exports_and_matches_eager():
    model, batch = full_clip_moe(), tiny_batch()
    exported = torch.export.export(model, (), kwargs=batch)
    assert_no_host_reads(graph_ops(exported))
    with torch.no_grad():
        got, expected = exported.module()(**batch), model(**batch)
    for name in ("logits_per_image", "image_embeds", "text_embeds"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_full_clip_moe_compiles_fullgraph_with_router_outputs():
    model, batch = full_clip_moe(), tiny_batch()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(**batch, return_loss=True, output_router_logits=True)
        expected = model(**batch, return_loss=True, output_router_logits=True)
    for name in ("loss", "aux_loss", "logits_per_image"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-5, rtol=1e-5)


def test_grouped_mm_dispatch_exports_in_bf16():
    # torch's fake-tensor rule for grouped_mm takes bf16 only, which is why fp32 traces use the custom op.
    layer = moe_layer().to(torch.bfloat16)
    layer.experts.dispatch = "grouped_mm"
    x = torch.randn(2, 9, 32, dtype=torch.bfloat16)
    exported = torch.export.export(layer, (x,))
    ops = graph_ops(exported)
    assert "aten._grouped_mm.default" in ops and "clip_moe.segment_mlp.default" not in ops
    assert_no_host_reads(ops)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x)[0], layer(x)[0], atol=1e-2, rtol=1e-2)


def test_text_tower_with_capacity_and_padding_exports_and_matches_eager():
    # The padding mask reaches the MoE layers (capacity counted over the real tokens, on the device): still traceable.
    model = sparse_upcycle(tiny_dense_clip(), num_experts=4, top_k=2, towers=("text",), capacity_factor=0.5)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.text_model.encoder.layers:
            layer.mlp.experts.up_proj.add_(0.3 * torch.randn_like(layer.mlp.experts.up_proj))
    text = model.text_model.eval()
    batch = {k: v for k, v in tiny_batch().items() if k != "pixel_values"}
    exported = torch.export.export(text, (), kwargs=batch)
    assert_no_host_reads(graph_ops(exported))
    with torch.no_grad():
        got, expected = exported.module()(**batch), text(**batch)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-5)
