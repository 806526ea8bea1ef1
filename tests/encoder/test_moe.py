"""The MoE layer: routing against a slow reference, weights, capacity (padding kept out of it), auxiliary losses."""

import pytest
import torch
from transformers.models.clip.modeling_clip import CLIPMLP

from encoder import CLIPMoESparseMLP, CLIPMoEVisionConfig, load_balance_loss, router_z_loss


def moe_layer(num_experts=4, top_k=2, seed=0, **kw) -> CLIPMoESparseMLP:
    cfg = CLIPMoEVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_experts=num_experts, top_k=top_k, moe_layers=[0], **kw)
    torch.manual_seed(seed)
    layer = CLIPMoESparseMLP(cfg)
    with torch.no_grad():  # distinct experts and a non-trivial router
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def reference_forward(layer: CLIPMoESparseMLP, x: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """Token by token: softmax over all experts, take top-k, renormalise, sum the weighted expert MLPs."""
    flat = x.reshape(-1, x.shape[-1])
    ex = layer.experts
    out = torch.zeros_like(flat)
    used = [0] * layer.num_experts
    for t in range(flat.shape[0]):
        probs = torch.softmax(layer.router(flat[t]).float(), -1)
        w, idx = torch.topk(probs, layer.top_k)
        w = w / w.sum()
        for weight, e in zip(w, idx.tolist()):
            used[e] += 1
            if capacity is not None and used[e] > capacity:
                continue
            h = ex.act_fn(flat[t] @ ex.up_proj[e].T + ex.up_proj_bias[e])
            out[t] += weight * (h @ ex.down_proj[e].T + ex.down_proj_bias[e])
    return out.view_as(x)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_layer_matches_token_by_token_reference(top_k):
    layer = moe_layer(top_k=top_k)
    x = torch.randn(3, 7, 32)
    out, _ = layer(x)
    torch.testing.assert_close(out, reference_forward(layer, x), atol=1e-5, rtol=1e-5)


def test_gradients_match_reference():
    layer = moe_layer()
    x = torch.randn(2, 5, 32, requires_grad=True)
    layer(x)[0].square().sum().backward()
    fast = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    reference_forward(layer, x).square().sum().backward()
    slow = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_capacity_factor_drops_choices_past_capacity():
    layer = moe_layer(capacity_factor=0.5)
    x = torch.randn(1, 16, 32)
    capacity = 4  # ceil(0.5 * 16 tokens * 2 choices / 4 experts)
    out, _ = layer(x)
    torch.testing.assert_close(out, reference_forward(layer, x, capacity), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, reference_forward(layer, x))


def test_top_k_weights_sum_to_one_and_pick_the_largest_probabilities():
    layer = moe_layer()
    logits, index, weights = layer.route(torch.randn(10, 32))
    torch.testing.assert_close(weights.sum(-1), torch.ones(10))
    assert torch.equal(index, logits.topk(2, dim=-1).indices)


def test_identical_experts_compute_the_dense_mlp():
    layer = moe_layer()
    cfg = CLIPMoEVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    dense = CLIPMLP(cfg)
    with torch.no_grad():
        layer.experts.up_proj.copy_(dense.fc1.weight.expand_as(layer.experts.up_proj))
        layer.experts.up_proj_bias.copy_(dense.fc1.bias.expand_as(layer.experts.up_proj_bias))
        layer.experts.down_proj.copy_(dense.fc2.weight.expand_as(layer.experts.down_proj))
        layer.experts.down_proj_bias.copy_(dense.fc2.bias.expand_as(layer.experts.down_proj_bias))
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(layer(x)[0], dense(x), atol=1e-6, rtol=1e-6)


def test_load_balance_loss_is_k_for_uniform_routing():
    tokens, experts = 8, 4
    probs = torch.full((tokens, experts), 1 / experts)
    for k in (1, 2, 4):
        index = torch.stack([(torch.arange(tokens) + j) % experts for j in range(k)], dim=1)
        assert load_balance_loss(probs, index, experts).item() == pytest.approx(k)


def test_load_balance_loss_penalises_collapse():
    probs = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(8, 1)
    index = torch.tensor([[0, 1]]).repeat(8, 1)
    assert load_balance_loss(probs, index, 4).item() > 2.5


def test_router_z_loss_is_mean_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(router_z_loss(logits), expected)


def test_auxiliary_losses_ignore_padding_tokens():
    layer = moe_layer()
    x = torch.randn(2, 6, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    _, router = layer(x, mask, output_router_logits=True)
    x2 = x.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), 32) * 10  # padding content must not matter
    _, router2 = layer(x2, mask, output_router_logits=True)
    torch.testing.assert_close(router.load_balance_loss, router2.load_balance_loss)
    torch.testing.assert_close(router.z_loss, router2.z_loss)
    # ... and equals the loss over the real tokens alone
    _, only_real = layer(x[mask][None], output_router_logits=True)
    torch.testing.assert_close(router.load_balance_loss, only_real.load_balance_loss)
    assert router.logits.shape == (12, 4)  # logits cover all tokens, padding included


def test_transformers_experts_implementations_agree_with_ours():
    layer = moe_layer()
    x = torch.randn(2, 5, 32)
    ours = layer(x)[0]
    layer.experts.config._experts_implementation = "grouped_mm"
    try:
        theirs = layer(x)[0]
    finally:
        layer.experts.config._experts_implementation = "eager"
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_router_jitter_only_while_training():
    layer = moe_layer(router_jitter=0.5)
    x = torch.randn(4, 32)
    layer.eval()
    assert torch.equal(layer.route(x)[0], layer.route(x)[0])
    layer.train()
    assert not torch.equal(layer.route(x)[0], layer.route(x)[0])


# Padding and capacity: row 0 has 3 real tokens then 5 padding, which come before row 1's real tokens in token order,
# so padding that took capacity would push row 1's tokens past it.
PADDING_MASK = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)


def real_tokens_step(layer: CLIPMoESparseMLP, x: torch.Tensor, mask: torch.Tensor | None):
    """(output at the real tokens, grad of x at the real tokens, parameter grads) of one step whose loss reads
    only the real tokens' outputs; mask None: x is the real tokens alone, [1, R, d]."""
    layer.zero_grad()
    x = x.detach().clone().requires_grad_()
    out, _ = layer(x, mask)
    real_out = out[mask] if mask is not None else out[0]
    real_out.square().sum().backward()
    real_grad = x.grad[mask] if mask is not None else x.grad[0]
    return real_out.detach(), real_grad, [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("dispatch", [None, "grouped_mm", "traced"])
def test_capacity_routes_real_tokens_as_without_the_padding(dispatch, monkeypatch):
    # None: the CPU default (segments, only kept rows computed); grouped_mm and "traced" (what torch.compile /
    # torch.export run: every row computed, dropped ones weighted 0) take the other branch.
    if dispatch == "traced":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    layer = moe_layer(capacity_factor=0.5)
    layer.experts.dispatch = None if dispatch == "traced" else dispatch
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(4))
    x[~PADDING_MASK] = torch.randn(int((~PADDING_MASK).sum()), 32) * 10  # padding content must not matter

    padded = real_tokens_step(layer, x, PADDING_MASK)
    alone = real_tokens_step(layer, x[PADDING_MASK][None], None)
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1], alone[1], atol=1e-5, rtol=1e-5)
    for got, want in zip(padded[2], alone[2]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The real tokens alone, token by token, with capacity ceil(0.5 * 10 real tokens * 2 / 4) = 3.
    with torch.no_grad():
        torch.testing.assert_close(padded[0], reference_forward(layer, x[PADDING_MASK], capacity=3),
                                   atol=1e-5, rtol=1e-5)
        out, _ = layer(x, PADDING_MASK)
        unmasked, _ = layer(x)
    assert torch.count_nonzero(out[~PADDING_MASK]) == 0  # padding takes no expert: zero MLP output
    # Without the mask the padding takes capacity and the real tokens' outputs change: the case bites.
    assert not torch.allclose(unmasked[PADDING_MASK], padded[0], atol=1e-3)


def test_dropless_layer_computes_padding_as_before():
    # Without a capacity factor the mask changes nothing: padding's outputs stay the MLP's (as the dense base's).
    layer = moe_layer()
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        assert torch.equal(layer(x, PADDING_MASK)[0], layer(x)[0])


def test_transformers_experts_implementations_ignore_the_mask():
    # They are dropless and take no token mask: the layer does not pass it to them.
    layer = moe_layer(capacity_factor=0.5)
    layer.experts.config._experts_implementation = "grouped_mm"
    try:
        with torch.no_grad():
            masked, unmasked = layer(torch.ones(2, 8, 32), PADDING_MASK)[0], layer(torch.ones(2, 8, 32))[0]
    finally:
        layer.experts.config._experts_implementation = "eager"
    assert torch.equal(masked, unmasked)


@pytest.mark.compile
def test_capacity_with_padding_compiles_fullgraph_and_exports():
    # The real-token count and ranks stay on the device (no host read), so the masked capacity traces whole.
    layer = moe_layer(capacity_factor=0.5)
    layer.experts.config._experts_implementation = "eager"  # as in a model (a standalone module has None)
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    xg = x.clone().requires_grad_()
    out, _ = compiled(xg, PADDING_MASK)
    out.square().sum().backward()
    expected = real_tokens_step(layer, x, PADDING_MASK)
    torch.testing.assert_close(out[PADDING_MASK], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xg.grad[PADDING_MASK], expected[1], atol=1e-4, rtol=1e-4)
    exported = torch.export.export(layer, (x, PADDING_MASK))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x, PADDING_MASK)[0], layer(x, PADDING_MASK)[0],
                                   atol=1e-5, rtol=1e-5)
