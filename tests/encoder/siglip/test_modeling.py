"""SigLIP-MoE models, judged by transformers' own SigLIP: its numbers (dense and upcycled), its interface and output
conventions, routing outputs, save/load and Auto registration."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, SiglipModel, SiglipVisionModel

import encoder  # noqa: F401  (registers every family)
from conftest import eager_and_grouped_mm_outputs, upcycled_siglip
from encoder.family import family_of
from encoder.moe import routing_losses
from encoder.siglip import (
    SiglipMoEConfig,
    SiglipMoEModel,
    SiglipMoEOutput,
    SiglipMoETextConfig,
    SiglipMoETextModel,
    SiglipMoEVisionConfig,
    SiglipMoEVisionModel,
    sparse_upcycle_siglip,
)
from encoder.siglip.modeling import SiglipMoEAttentionPoolingHead
from encoder.siglip.weight_map import moe_config_of


def dense_as_moe(dense: SiglipModel) -> SiglipMoEModel:
    model = SiglipMoEModel(SiglipMoEConfig.from_siglip_config(dense.config)).eval()
    model.load_state_dict(dense.state_dict(), strict=True)
    return model


def upcycled(dense, *args, **kwargs):
    return upcycled_siglip(dense, sparse_upcycle_siglip, *args, **kwargs)


def assert_all_equal(a, b):
    assert len(a) == len(b)
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)


def test_dense_config_reproduces_transformers_siglip_exactly(dense_siglip, siglip_batch):
    model = dense_as_moe(dense_siglip)
    with torch.no_grad():
        a = dense_siglip(**siglip_batch, output_hidden_states=True, return_loss=True)
        b = model(**siglip_batch, output_hidden_states=True, return_loss=True)
    for name in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text", "loss"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for tower in ("vision_model_output", "text_model_output"):
        x, y = getattr(a, tower), getattr(b, tower)
        assert len(y.hidden_states) == 5  # layers + 1
        assert_all_equal(x.hidden_states, y.hidden_states)
        assert torch.equal(x.last_hidden_state, y.last_hidden_state)
        assert torch.equal(x.pooler_output, y.pooler_output)
    assert b.vision_model_output.last_hidden_state.shape == (3, 16, 32)  # every patch, no class token
    assert b.aux_loss is None and b.vision_model_output.router_logits is None


@pytest.mark.parametrize("vision_layers, text_layers, num_experts, top_k, moe_head", [
    ((0, 1, 2, 3), (0, 1, 2, 3), 4, 2, False),
    ((1, 3), (), 3, 1, True),
    ((), (0, 2), 2, 2, False),
    ((2,), (3,), 8, 3, True),
])
def test_sparse_upcycling_preserves_the_dense_siglip(dense_siglip, siglip_batch, vision_layers, text_layers,
                                                     num_experts, top_k, moe_head):
    model = upcycled(dense_siglip, vision_layers, text_layers, num_experts, top_k, moe_head, seed=5)
    assert hasattr(model.vision_model.head.mlp, "experts") is moe_head
    for inputs in (siglip_batch, {k: v for k, v in siglip_batch.items() if k != "attention_mask"}):
        with torch.no_grad():
            a = dense_siglip(**inputs, output_hidden_states=True)
            b = model(**inputs, output_hidden_states=True, output_router_logits=True)
        for name in ("logits_per_image", "image_embeds", "text_embeds"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=0)
        for tower in ("vision_model_output", "text_model_output"):
            for p, q in zip(getattr(a, tower).hidden_states, getattr(b, tower).hidden_states, strict=True):
                torch.testing.assert_close(q, p, atol=1e-5, rtol=0)
    # The logit bias is carried over, not re-initialised.
    assert model.logit_bias.item() == dense_siglip.logit_bias.item() == -1.5


def test_return_loss_is_the_sigmoid_loss_plus_aux(dense_siglip, siglip_batch):
    model = upcycled(dense_siglip, (0, 2), (1, 3))
    with torch.no_grad():
        theirs = dense_siglip(**siglip_batch, return_loss=True)
    out = model(**siglip_batch, return_loss=True, output_router_logits=True)
    plain = model(**siglip_batch, return_loss=True)
    v, t = out.vision_model_output, out.text_model_output
    expected_aux = sum(0.01 * o.load_balance_loss + 0.001 * o.router_z_loss for o in (v, t))
    torch.testing.assert_close(out.aux_loss, expected_aux)
    torch.testing.assert_close(plain.loss, theirs.loss, atol=1e-5, rtol=0)
    assert plain.aux_loss is None
    torch.testing.assert_close(out.loss, plain.loss + out.aux_loss)
    out.loss.backward()
    assert model.logit_bias.grad is not None and model.vision_model.encoder.layers[0].mlp.router.weight.grad is not None


def test_router_logits_one_per_moe_layer_and_the_head(dense_siglip, siglip_batch):
    model = upcycled(dense_siglip, (0, 2), (1,), num_experts=4, moe_head=True)
    with torch.no_grad():
        out = model(**siglip_batch, output_router_logits=True)
    v, t = out.vision_model_output.router_logits, out.text_model_output.router_logits
    assert [r.shape for r in v] == [(3 * 16, 4), (3 * 16, 4), (3, 4)]  # two layers, then the head's pooled token
    assert [r.shape for r in t] == [(3 * 12, 4)]
    head_only = upcycled(dense_siglip, (), (), moe_head=True)
    with torch.no_grad():
        logits = head_only.vision_model(siglip_batch["pixel_values"], output_router_logits=True).router_logits
    assert len(logits) == 1 and logits[0].shape == (3, 4)


@pytest.mark.parametrize("with_mask", [True, False])
def test_text_aux_losses_exclude_padding(dense_siglip, siglip_batch, with_mask):
    """Without a mask the padding is the pad token (SigLIP's usual call); either way the losses are those of the
    real tokens' router logits alone."""
    model = upcycled(dense_siglip, (), (0, 1, 3), top_k=2)
    ids, mask = siglip_batch["input_ids"], siglip_batch["attention_mask"]
    with torch.no_grad():
        out = model.text_model(ids, attention_mask=mask if with_mask else None, output_router_logits=True)
    real = mask.reshape(-1).bool()
    assert torch.equal(real, (ids != 1).reshape(-1)) and not real.all()
    losses = [routing_losses(logits[real], 2) for logits in out.router_logits]
    torch.testing.assert_close(out.load_balance_loss, torch.stack([b for b, _ in losses]).mean())
    torch.testing.assert_close(out.router_z_loss, torch.stack([z for _, z in losses]).mean())
    everything = [routing_losses(logits, 2) for logits in out.router_logits]
    assert not torch.allclose(out.router_z_loss, torch.stack([z for _, z in everything]).mean())


def test_return_dict_false_gives_transformers_tuples(dense_siglip, siglip_batch):
    model = dense_as_moe(dense_siglip)
    px, ids = siglip_batch["pixel_values"], siglip_batch["input_ids"]
    with torch.no_grad():
        pairs = [
            (dense_siglip.get_image_features(px, return_dict=False), model.get_image_features(px, return_dict=False)),
            (dense_siglip.get_text_features(ids, return_dict=False), model.get_text_features(ids, return_dict=False)),
            (dense_siglip.vision_model(px, output_hidden_states=True, return_dict=False),
             model.vision_model(px, output_hidden_states=True, return_dict=False)),
        ]
        full = model(**siglip_batch, return_dict=False)
        ref = model(**siglip_batch)
    for theirs, ours in pairs:
        assert type(theirs) is type(ours) is tuple and len(theirs) == len(ours)
        for a, b in zip(theirs, ours, strict=True):
            if isinstance(a, tuple):
                assert_all_equal(a, b)
            else:
                assert torch.equal(a, b)
    assert isinstance(full, tuple) and torch.equal(full[0], ref.logits_per_image)  # no loss: logits first
    model.config.return_dict = False
    with torch.no_grad():
        assert isinstance(model(**siglip_batch), tuple)
        assert isinstance(model(**siglip_batch, return_dict=True), SiglipMoEOutput)  # the argument wins


def test_hidden_states_by_index_or_list_keep_only_those(dense_siglip, siglip_batch):
    model = upcycled(dense_siglip)
    px = siglip_batch["pixel_values"]
    with torch.no_grad():
        full = model.vision_model(px, output_hidden_states=True).hidden_states
        some = model.vision_model(px, output_hidden_states=[-2, 0]).hidden_states
        one = model.text_model(siglip_batch["input_ids"], output_hidden_states=-1).hidden_states
        theirs = dense_siglip.vision_model(px, output_hidden_states=[-2, 0]).hidden_states
    assert len(some) == len(full) == 5  # still indexed by layer, as LLaVA's hidden_states[select_layer]
    assert [i for i, h in enumerate(some) if h is not None] == [0, 3]
    assert torch.equal(some[-2], full[-2]) and torch.equal(some[0], full[0])
    assert [h is None for h in some] == [h is None for h in theirs]
    assert [i for i, h in enumerate(one) if h is not None] == [4]


def test_attentions_are_recorded_as_in_transformers_siglip(dense_siglip, siglip_batch):
    dense_siglip.set_attn_implementation("eager")
    model = dense_as_moe(dense_siglip)
    model.set_attn_implementation("eager")  # sdpa computes no attention weights
    with torch.no_grad():
        theirs, ours = dense_siglip(**siglip_batch, output_attentions=True), model(**siglip_batch, output_attentions=True)
    for tower in ("vision_model_output", "text_model_output"):
        a, b = getattr(theirs, tower).attentions, getattr(ours, tower).attentions
        assert len(b) == 4
        assert_all_equal(a, b)


def test_sdpa_and_eager_attention_agree(dense_siglip, siglip_batch):
    model = upcycled(dense_siglip, (0, 3), (1, 2), moe_head=True)
    assert model.vision_model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        sdpa = model(**siglip_batch, output_router_logits=True)
        model.set_attn_implementation("eager")
        eager = model(**siglip_batch, output_router_logits=True)
    for name in ("logits_per_image", "image_embeds", "text_embeds", "aux_loss"):
        torch.testing.assert_close(getattr(sdpa, name), getattr(eager, name), atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip_through_the_auto_classes(dense_siglip, siglip_batch, tmp_path):
    model = upcycled(dense_siglip, (1, 3), (0,), moe_head=True, seed=3)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "siglip_moe"
    assert saved["vision_config"]["moe_head"] is True and saved["vision_config"]["moe_layers"] == [1, 3]
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is SiglipMoEModel and type(AutoConfig.from_pretrained(tmp_path)) is SiglipMoEConfig
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with torch.no_grad():
        # Equal weights; the numbers to float rounding only: the loaded (memory-mapped) expert stacks sit at other
        # alignments, and the CPU matmul kernels' summation order depends on alignment.
        torch.testing.assert_close(model(**siglip_batch).logits_per_image,
                                   loaded.eval()(**siglip_batch).logits_per_image, atol=1e-6, rtol=0)
    match = family_of(tmp_path)
    assert (match.family.name, match.is_moe) == ("siglip", True)
    dense_siglip.save_pretrained(tmp_path / "dense")
    assert (family_of(tmp_path / "dense").family.name, family_of(tmp_path / "dense").is_moe) == ("siglip", False)


def test_a_tower_loads_from_a_full_directory_and_from_its_own(dense_siglip, siglip_batch, tmp_path):
    model = upcycled(dense_siglip, (0, 1), (2, 3), seed=1)
    model.save_pretrained(tmp_path / "full")
    vision = SiglipMoEVisionModel.from_pretrained(tmp_path / "full")
    assert vision.config.moe_layers == [0, 1]
    for key, value in model.vision_model.state_dict().items():
        assert torch.equal(value, vision.state_dict()[key]), key
    text = SiglipMoETextModel.from_pretrained(tmp_path / "full")
    for key, value in model.text_model.state_dict().items():
        assert torch.equal(value, text.state_dict()[key]), key

    vision.save_pretrained(tmp_path / "vision-only")
    again = AutoModel.from_pretrained(tmp_path / "vision-only")
    assert type(again) is SiglipMoEVisionModel
    assert family_of(tmp_path / "vision-only").model_type == "siglip_moe_vision_model"
    with torch.no_grad():
        px = siglip_batch["pixel_values"]
        assert torch.equal(again(px).pooler_output, vision(px).pooler_output)


def test_a_dense_vision_tower_upcycles_alone(dense_siglip, siglip_batch):
    dense_vision = SiglipVisionModel(dense_siglip.config.vision_config).eval()
    dense_vision.load_state_dict(dense_siglip.vision_model.state_dict())
    model = sparse_upcycle_siglip(dense_vision, vision_moe=dict(num_experts=2, top_k=1, moe_layers=[3], moe_head=True))
    assert type(model) is SiglipMoEVisionModel
    with torch.no_grad():
        a, b = dense_vision(siglip_batch["pixel_values"]), model(siglip_batch["pixel_values"])
    torch.testing.assert_close(b.pooler_output, a.pooler_output, atol=1e-5, rtol=0)


def test_a_vision_tower_without_the_head(make_dense_siglip, siglip_batch):
    dense = make_dense_siglip(vision_use_head=False).vision_model
    model = sparse_upcycle_siglip(dense, vision_moe=dict(moe_layers=[0, 2]))
    assert not hasattr(model, "head")
    with torch.no_grad():
        a, b = dense(siglip_batch["pixel_values"]), model(siglip_batch["pixel_values"], output_router_logits=True)
    assert b.pooler_output is None and len(b.router_logits) == 2
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, atol=1e-5, rtol=0)


def test_the_head_mlp_is_dense_unless_moe_head(dense_siglip):
    dense_head = upcycled(dense_siglip).vision_model.head
    assert isinstance(dense_head, SiglipMoEAttentionPoolingHead)
    assert set(dict(dense_head.mlp.named_parameters())) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    moe_head = upcycled(dense_siglip, moe_head=True).vision_model.head
    assert moe_head.mlp.experts.up_proj.shape == (4, 64, 32)
    # Each expert is the dense head MLP.
    for e in range(4):
        assert torch.equal(moe_head.mlp.experts.up_proj[e], dense_siglip.vision_model.head.mlp.fc1.weight)
        assert torch.equal(moe_head.mlp.experts.down_proj_bias[e], dense_siglip.vision_model.head.mlp.fc2.bias)


def test_a_freshly_built_model_trains(siglip_batch):
    config = SiglipMoEConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=16, moe_layers=[1]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, moe_layers=[0, 1], moe_head=True),
    )
    torch.manual_seed(0)
    model = SiglipMoEModel(config)
    experts = model.vision_model.encoder.layers[0].mlp.experts
    assert experts.up_proj.std() > 0 and not torch.equal(experts.up_proj[0], experts.up_proj[1])
    out = model(**siglip_batch, return_loss=True, output_router_logits=True)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert experts.up_proj.grad is not None and experts.up_proj.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "config_class, fields, message",
    [
        (SiglipMoEVisionConfig, dict(num_experts=0), "num_experts"),
        (SiglipMoEVisionConfig, dict(num_experts=2, top_k=3), "top_k"),
        (SiglipMoEVisionConfig, dict(moe_layers=[4]), "out of range"),
        (SiglipMoEVisionConfig, dict(moe_head=True, vision_use_head=False), "vision_use_head"),
        (SiglipMoEVisionConfig, dict(moe_head="yes"), "moe_head"),
        (SiglipMoETextConfig, dict(capacity_factor=0.0), "capacity_factor"),
        (SiglipMoETextConfig, dict(hidden_act="nope"), "hidden_act"),
    ],
)
def test_config_rejects_impossible_settings(config_class, fields, message):
    # `@strict` wraps the ValueError / TypeError of a validator in its own error, keeping the message.
    with pytest.raises(Exception, match=message):
        config_class(num_hidden_layers=4, **fields)


def test_dense_configs_map_to_moe_configs_per_kind(dense_siglip):
    assert type(moe_config_of(dense_siglip.config)) is SiglipMoEConfig
    vision = moe_config_of(dense_siglip.config.vision_config, vision_moe=dict(moe_layers=[1]))
    assert type(vision) is SiglipMoEVisionConfig and vision.moe_layers == [1] and vision.image_size == 32
    assert type(moe_config_of(dense_siglip.config.text_config)) is SiglipMoETextConfig
    with pytest.raises(TypeError, match="not one of the dense configs"):
        moe_config_of(SiglipMoEVisionConfig().to_dict())


def test_config_output_router_logits_is_the_default_and_the_argument_wins(dense_siglip, siglip_batch, tmp_path):
    model = upcycled(dense_siglip, (0, 2), (1,))
    with torch.no_grad():
        assert model(**siglip_batch).aux_loss is None
        model.config.output_router_logits = True
        on = model(**siglip_batch)
        off = model(**siglip_batch, output_router_logits=False)
        assert model.vision_model(siglip_batch["pixel_values"]).router_logits is None  # the tower's own config
        model.vision_model.config.output_router_logits = True
        assert len(model.vision_model(siglip_batch["pixel_values"]).router_logits) == 2
    assert on.aux_loss is not None and len(on.text_model_output.router_logits) == 1
    assert off.aux_loss is None and off.vision_model_output.router_logits is None
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).output_router_logits is True


def test_interpolated_position_encoding_matches_transformers(dense_siglip):
    model = upcycled(dense_siglip, (1, 2), ())
    px = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = dense_siglip.vision_model(px, interpolate_pos_encoding=True)
        b = model.vision_model(px, interpolate_pos_encoding=True)
    assert b.last_hidden_state.shape == (2, 6 * 5, 32)
    torch.testing.assert_close(b.pooler_output, a.pooler_output, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(dense_siglip, siglip_batch):
    model = upcycled(dense_siglip, (0, 3), (1,), moe_head=True).train()

    def grads():
        model.zero_grad()
        out = model(**siglip_batch, return_loss=True, output_router_logits=True)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, plain = grads()
    model.activation_checkpointing_enable()  # transformers 5 name of gradient_checkpointing_enable
    assert model.vision_model.encoder.layers[0].gradient_checkpointing
    loss_ckpt, ckpt = grads()
    torch.testing.assert_close(loss_ckpt, loss)
    assert ckpt.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_experts_implementation_can_be_switched(dense_siglip, siglip_batch):
    model = upcycled(dense_siglip, (0, 1), (2,), moe_head=True)
    with torch.no_grad():  # experts apart, so the implementations' routing and combining both matter
        for module in model.modules():
            if hasattr(module, "up_proj"):
                module.up_proj.add_(0.05 * torch.randn_like(module.up_proj))
    ours, theirs = eager_and_grouped_mm_outputs(model, siglip_batch, "logits_per_image")
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_capacity_with_a_text_mask_keeps_the_pooled_last_position(dense_siglip, siglip_batch):
    # With an attention_mask the padding takes no expert capacity (its MLP output is zero), except the last position,
    # which the text tower pools (padding in every caption here). A capacity that drops no real choice (capacity_factor
    # = num_experts) then gives the dropless numbers at the real tokens and in the pooled output. Without a mask every
    # token attends to the padding, so all of it is computed: the dropless numbers everywhere.
    moe = dict(num_experts=4, top_k=2, moe_layers=[0, 1, 2, 3])
    dropless = sparse_upcycle_siglip(dense_siglip, text_moe=moe, seed=2).text_model
    capped = sparse_upcycle_siglip(dense_siglip, text_moe=dict(moe, capacity_factor=4.0), seed=2).text_model
    ids, mask = siglip_batch["input_ids"], siglip_batch["attention_mask"]
    assert not mask[:, -1].any()
    with torch.no_grad():
        want, got = dropless(ids, attention_mask=mask), capped(ids, attention_mask=mask)
        torch.testing.assert_close(capped(ids).last_hidden_state, dropless(ids).last_hidden_state, atol=1e-5, rtol=1e-5)
    real = mask.bool()
    torch.testing.assert_close(got.last_hidden_state[real], want.last_hidden_state[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-5, rtol=1e-5)
    # The rest of the padding took no expert: its states differ from the dropless ones.
    skipped = ~real
    skipped[:, -1] = False
    assert not torch.allclose(got.last_hidden_state[skipped], want.last_hidden_state[skipped], atol=1e-3)
