"""CLIP-MoE models: CLIP's interface and numbers, routing outputs, save/load, Auto registration."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel

import encoder
from conftest import BOS, EOS, eager_and_grouped_mm_outputs
from encoder import (
    CLIPMoEConfig,
    CLIPMoEModel,
    CLIPMoEOutput,
    CLIPMoETextModel,
    CLIPMoEVisionConfig,
    CLIPMoEVisionModel,
)
from upcycle import sparse_upcycle


def dense_as_moe_config(dense):
    return CLIPMoEConfig.from_clip_config(dense.config)


def test_dense_config_reproduces_transformers_clip_exactly(dense_clip, batch):
    model = CLIPMoEModel(dense_as_moe_config(dense_clip)).eval()
    model.load_state_dict(dense_clip.state_dict(), strict=True)
    with torch.no_grad():
        a = dense_clip(**batch, output_hidden_states=True)
        b = model(**batch, output_hidden_states=True)
    for name in ("image_embeds", "text_embeds", "logits_per_image"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for tower in ("vision_model_output", "text_model_output"):
        x, y = getattr(a, tower), getattr(b, tower)
        assert len(y.hidden_states) == len(x.hidden_states) == 5  # layers + 1
        for p, q in zip(x.hidden_states, y.hidden_states):
            assert torch.equal(p, q)
        assert torch.equal(x.last_hidden_state, y.last_hidden_state)


def test_feature_getters_follow_transformers_5(dense_clip, batch):
    model = sparse_upcycle(dense_clip)
    with torch.no_grad():
        img = model.get_image_features(batch["pixel_values"])
        ref = dense_clip.get_image_features(batch["pixel_values"])
        txt = model.get_text_features(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert img.pooler_output.shape == (3, 16) and txt.pooler_output.shape == (3, 16)
    torch.testing.assert_close(img.pooler_output, ref.pooler_output, atol=1e-5, rtol=0)


def test_router_outputs_and_aux_loss(dense_clip, batch):
    model = sparse_upcycle(dense_clip, num_experts=4, top_k=2, moe_layers="even")
    out = model(**batch, output_router_logits=True, return_loss=True)
    v, t = out.vision_model_output, out.text_model_output
    assert len(v.router_logits) == 2 and v.router_logits[0].shape == (3 * 17, 4)
    assert len(t.router_logits) == 2 and t.router_logits[0].shape == (3 * 12, 4)
    expected_aux = sum(0.01 * o.load_balance_loss + 0.001 * o.router_z_loss for o in (v, t))
    torch.testing.assert_close(out.aux_loss, expected_aux)
    plain = model(**batch, return_loss=True)
    assert plain.aux_loss is None and v.aux_loss is not None
    torch.testing.assert_close(out.loss, plain.loss + out.aux_loss)
    out.loss.backward()
    assert model.vision_model.encoder.layers[0].mlp.router.weight.grad is not None


def test_text_padding_without_mask_is_inferred_from_eos(dense_clip, batch):
    model = sparse_upcycle(dense_clip)
    with torch.no_grad():
        with_mask = model.text_model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                     output_router_logits=True)
        no_mask = model.text_model(batch["input_ids"], output_router_logits=True)
    torch.testing.assert_close(with_mask.load_balance_loss, no_mask.load_balance_loss)
    torch.testing.assert_close(with_mask.pooler_output, no_mask.pooler_output)


def test_return_dict_false_gives_a_tuple(dense_clip, batch):
    model = sparse_upcycle(dense_clip).vision_model
    out = model(batch["pixel_values"], return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (3, 17, 32)


def test_save_and_load_round_trip_exactly(dense_clip, batch, tmp_path):
    model = sparse_upcycle(dense_clip, moe_layers="last:2", seed=3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "clip_moe"
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is CLIPMoEModel
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).image_embeds, loaded.eval()(**batch).image_embeds, atol=0, rtol=0)
    assert type(AutoConfig.from_pretrained(tmp_path)) is CLIPMoEConfig


def test_a_tower_loads_from_a_full_directory_and_from_its_own(dense_clip, batch, tmp_path):
    model = sparse_upcycle(dense_clip, seed=1)
    model.save_pretrained(tmp_path / "full")
    vision = CLIPMoEVisionModel.from_pretrained(tmp_path / "full")
    assert vision.config.moe_layers == [0, 1, 2, 3]
    for key, value in model.vision_model.state_dict().items():
        assert torch.equal(value, vision.state_dict()[key]), key
    text = CLIPMoETextModel.from_pretrained(tmp_path / "full")
    assert torch.equal(text.state_dict()["embeddings.token_embedding.weight"],
                       model.text_model.state_dict()["embeddings.token_embedding.weight"])

    vision.save_pretrained(tmp_path / "vision-only")
    again = AutoModel.from_pretrained(tmp_path / "vision-only")
    assert type(again) is CLIPMoEVisionModel
    with torch.no_grad():
        assert torch.equal(again(batch["pixel_values"]).pooler_output, vision(batch["pixel_values"]).pooler_output)


def test_auto_registration_happens_on_import():
    assert AutoConfig.for_model("clip_moe").__class__ is CLIPMoEConfig
    assert encoder.CLIPMoEVisionConfig.model_type == "clip_moe_vision_model"


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=2, top_k=3), "top_k"),
        (dict(moe_layers=[5]), "out of range"),
        (dict(capacity_factor=0.0), "capacity_factor"),
    ],
)
def test_config_rejects_impossible_moe_settings(fields, message):
    with pytest.raises(Exception, match=message):
        CLIPMoEVisionConfig(num_hidden_layers=4, **fields)


def test_experts_implementation_can_be_switched(dense_clip, batch):
    ours, theirs = eager_and_grouped_mm_outputs(sparse_upcycle(dense_clip), batch, "image_embeds")
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# PreTrainedModel contracts: config.return_dict and config.output_router_logits as defaults.


def test_config_return_dict_false_gives_tuples_everywhere(dense_clip, batch):
    model = sparse_upcycle(dense_clip).eval()
    with torch.no_grad():
        ref = model(**batch)
        ref_img = model.get_image_features(batch["pixel_values"])
        ref_txt = model.get_text_features(batch["input_ids"], attention_mask=batch["attention_mask"])
        model.config.return_dict = False
        out = model(**batch)
        img = model.get_image_features(batch["pixel_values"])
        txt = model.get_text_features(batch["input_ids"], attention_mask=batch["attention_mask"])
        explicit = model(**batch, return_dict=True)  # the argument wins over the config
    assert isinstance(out, tuple) and torch.equal(out[0], ref.logits_per_image)
    assert isinstance(explicit, CLIPMoEOutput)
    # (last_hidden_state, projected pooler_output), like transformers' CLIPModel.get_*_features tuples.
    assert isinstance(img, tuple) and len(img) == 2 and torch.equal(img[1], ref_img.pooler_output)
    assert isinstance(txt, tuple) and len(txt) == 2 and torch.equal(txt[1], ref_txt.pooler_output)

    for tower, inputs in ((model.vision_model, (batch["pixel_values"],)), (model.text_model, (batch["input_ids"],))):
        tower.config.return_dict = False
        with torch.no_grad():
            as_tuple, as_output = tower(*inputs), tower(*inputs, return_dict=True)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], as_output.pooler_output)


def test_feature_getters_tuple_contract_matches_transformers_clip(dense_clip, batch):
    model = CLIPMoEModel(dense_as_moe_config(dense_clip)).eval()
    model.load_state_dict(dense_clip.state_dict(), strict=True)
    with torch.no_grad():
        pairs = [
            (dense_clip.get_image_features(batch["pixel_values"], return_dict=False),
             model.get_image_features(batch["pixel_values"], return_dict=False)),
            (dense_clip.get_text_features(batch["input_ids"], return_dict=False),
             model.get_text_features(batch["input_ids"], return_dict=False)),
            (dense_clip.get_image_features(batch["pixel_values"], output_hidden_states=True, return_dict=False),
             model.get_image_features(batch["pixel_values"], output_hidden_states=True, return_dict=False)),
        ]
    for theirs, ours in pairs:
        assert type(theirs) is type(ours) is tuple and len(theirs) == len(ours)
        for a, b in zip(theirs, ours, strict=True):
            if isinstance(a, tuple):
                assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
            else:
                assert torch.equal(a, b)


def test_config_output_router_logits_is_the_default(dense_clip, batch, tmp_path):
    model = sparse_upcycle(dense_clip, num_experts=4, top_k=2, moe_layers="even")
    assert model.config.output_router_logits is False
    with torch.no_grad():
        assert model(**batch).aux_loss is None
        model.config.output_router_logits = True
        out = model(**batch, return_loss=True)
        off = model(**batch, output_router_logits=False)  # the argument wins over the config
    assert out.aux_loss is not None and len(out.vision_model_output.router_logits) == 2
    assert len(out.text_model_output.router_logits) == 2
    assert off.aux_loss is None and off.vision_model_output.router_logits is None
    with torch.no_grad():
        assert model.get_image_features(batch["pixel_values"]).router_logits is not None

    vision = model.vision_model
    with torch.no_grad():
        assert vision(batch["pixel_values"]).router_logits is None  # the tower's own config: still False
        vision.config.output_router_logits = True
        assert len(vision(batch["pixel_values"]).router_logits) == 2
        assert vision(batch["pixel_values"], output_router_logits=False).router_logits is None
        model.text_model.config.output_router_logits = True
        assert model.text_model(batch["input_ids"]).aux_loss is not None

    model.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.output_router_logits is True
    assert loaded.vision_config.output_router_logits is True and loaded.text_config.output_router_logits is True
    assert CLIPMoEVisionConfig().output_router_logits is False


# transformers 5's output conventions: outputs recorded through `_can_record_outputs` / `capture_outputs`.


def test_router_logits_are_recorded_from_each_moe_router(dense_clip, batch):
    """Router logits are registered for recording, as in transformers' MoE models, and what is recorded (with the
    auxiliary losses computed from it) is what each MoE layer computes for itself on the same input."""
    model = sparse_upcycle(dense_clip, num_experts=4, top_k=2, moe_layers="even").eval()
    text = model.text_model
    recorder = text._can_record_outputs["router_logits"]
    routers = [m for m in text.modules() if isinstance(m, recorder.target_class)]
    assert routers == [layer.mlp.router for layer in text.encoder.layers if layer.is_moe] and len(routers) == 2
    inputs, outputs = [], []
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
             for layer in text.encoder.layers if layer.is_moe]
    hooks += [r.register_forward_hook(lambda _m, _args, out: outputs.append(out)) for r in routers]
    with torch.no_grad():
        out = text(batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    for hook in hooks:
        hook.remove()
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        own = [layer.mlp(x, mask, output_router_logits=True)[1]
               for layer, x in zip([lay for lay in text.encoder.layers if lay.is_moe], inputs, strict=True)]
    assert len(out.router_logits) == len(outputs) == 2
    for recorded, seen, router in zip(out.router_logits, outputs, own, strict=True):
        assert recorded is seen and recorded.dtype == torch.float32
        assert torch.equal(recorded, router.logits)
    assert torch.equal(out.load_balance_loss, torch.stack([r.load_balance_loss for r in own]).mean())
    assert torch.equal(out.router_z_loss, torch.stack([r.z_loss for r in own]).mean())


def test_a_list_of_hidden_layers_keeps_only_those(dense_clip, batch):
    model = sparse_upcycle(dense_clip).eval()
    with torch.no_grad():
        full = model.vision_model(batch["pixel_values"], output_hidden_states=True).hidden_states
        some = model.vision_model(batch["pixel_values"], output_hidden_states=[-2, 0]).hidden_states
        one = model.text_model(batch["input_ids"], output_hidden_states=-1).hidden_states
        theirs = dense_clip.vision_model(batch["pixel_values"], output_hidden_states=[-2, 0]).hidden_states
    assert len(some) == len(full) == 5  # still indexed by layer, as LLaVA's hidden_states[select_layer]
    assert [i for i, h in enumerate(some) if h is not None] == [0, 3]
    assert torch.equal(some[-2], full[-2]) and torch.equal(some[0], full[0])
    assert [h is None for h in some] == [h is None for h in theirs]  # transformers' CLIP convention
    assert len(one) == 5 and [i for i, h in enumerate(one) if h is not None] == [4]


def test_a_tower_config_flag_applies_inside_the_full_model(dense_clip, batch):
    model = sparse_upcycle(dense_clip, num_experts=4, top_k=2, moe_layers="even").eval()
    model.config.text_config.output_router_logits = True
    with torch.no_grad():
        out = model(**batch, return_loss=True)
        off = model(**batch, output_router_logits=False)
    assert len(out.text_model_output.router_logits) == 2 and out.vision_model_output.router_logits is None
    torch.testing.assert_close(out.aux_loss, out.text_model_output.aux_loss)
    assert off.aux_loss is None and off.text_model_output.router_logits is None


def test_attentions_are_recorded_as_in_transformers_clip(dense_clip, batch):
    model = CLIPMoEModel(dense_as_moe_config(dense_clip)).eval()
    model.load_state_dict(dense_clip.state_dict(), strict=True)
    dense_clip.set_attn_implementation("eager")
    model.set_attn_implementation("eager")  # sdpa computes no attention weights (transformers warns and records none)
    with torch.no_grad():
        theirs, ours = dense_clip(**batch, output_attentions=True), model(**batch, output_attentions=True)
    for tower in ("vision_model_output", "text_model_output"):
        a, b = getattr(theirs, tower).attentions, getattr(ours, tower).attentions
        assert len(a) == len(b) == 4 and all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_capacity_keeps_text_padding_out_of_the_real_tokens(dense_clip):
    # With a capacity factor the padding takes no expert capacity: right-padded captions give their real tokens (and
    # the pooled EOS token) the outputs of the same captions unpadded.
    model = sparse_upcycle(dense_clip, num_experts=4, top_k=2, towers=("text",), capacity_factor=0.5)
    torch.manual_seed(0)
    with torch.no_grad():  # experts apart, so which choices capacity drops shows in the outputs
        for layer in model.text_model.encoder.layers:
            layer.mlp.experts.up_proj.add_(0.3 * torch.randn_like(layer.mlp.experts.up_proj))
    captions = torch.randint(1, BOS, (2, 6), generator=torch.Generator().manual_seed(3))
    captions[:, 0], captions[:, -1] = BOS, EOS
    padded = torch.cat([captions, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones_like(captions), torch.zeros(2, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model.text_model(captions)
        masked = model.text_model(padded, attention_mask=mask)
        all_real = model.text_model(padded, attention_mask=torch.ones_like(padded))
    torch.testing.assert_close(masked.last_hidden_state[:, :6], alone.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked.pooler_output, alone.pooler_output, atol=1e-5, rtol=1e-5)
    # The padding called real (attention is causal, so only the capacity changes): it takes capacity from the captions.
    assert not torch.allclose(all_real.last_hidden_state[:, :6], alone.last_hidden_state, atol=1e-3)
