"""SigLIP2-MoE models, judged by transformers' own SigLIP2 on naflex inputs (padded patch sequences): its numbers
(dense and upcycled), padded patches kept out of the auxiliary losses, its interface, save/load, Auto registration."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, Siglip2VisionModel

import encoder  # noqa: F401  (registers every family)
from conftest import upcycled_siglip
from encoder import moe_pretrained
from encoder.family import family_of
from encoder.moe import routing_losses
from encoder.siglip.weight_map import moe_config_of
from encoder.siglip2 import (
    NaflexInputError,
    Siglip2MoEConfig,
    Siglip2MoEModel,
    Siglip2MoEOutput,
    Siglip2MoETextModel,
    Siglip2MoEVisionConfig,
    Siglip2MoEVisionModel,
    sparse_upcycle_siglip2,
)
from encoder.siglip2.weight_map import DENSE_TO_MOE_CONFIG
from encoder.utils.errors import UserError

VISION_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


def vision_inputs(batch):
    return {k: batch[k] for k in VISION_KEYS}


def dense_as_moe(dense) -> Siglip2MoEModel:
    model = Siglip2MoEModel(moe_config_of(dense.config, dense_to_moe=DENSE_TO_MOE_CONFIG)).eval()
    model.load_state_dict(dense.state_dict(), strict=True)
    return model


def upcycled(dense, *args, **kwargs):
    return upcycled_siglip(dense, sparse_upcycle_siglip2, *args, **kwargs)


def test_dense_config_reproduces_transformers_siglip2_exactly(dense_siglip2, siglip2_batch):
    model = dense_as_moe(dense_siglip2)
    assert type(model.config) is Siglip2MoEConfig
    with torch.no_grad():
        a = dense_siglip2(**siglip2_batch, output_hidden_states=True, return_loss=True)
        b = model(**siglip2_batch, output_hidden_states=True, return_loss=True)
    for name in ("image_embeds", "text_embeds", "logits_per_image", "loss"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for tower in ("vision_model_output", "text_model_output"):
        x, y = getattr(a, tower), getattr(b, tower)
        assert len(y.hidden_states) == 5
        assert all(torch.equal(p, q) for p, q in zip(x.hidden_states, y.hidden_states, strict=True))
        assert torch.equal(x.pooler_output, y.pooler_output)
    assert b.vision_model_output.last_hidden_state.shape == (3, 20, 32)


@pytest.mark.parametrize("vision_layers, text_layers, num_experts, top_k, moe_head", [
    ((0, 1, 2, 3), (0, 1, 2, 3), 4, 2, False),
    ((1, 3), (2,), 3, 1, True),
    ((0,), (), 8, 3, True),
])
def test_sparse_upcycling_preserves_the_dense_siglip2(dense_siglip2, siglip2_batch, vision_layers, text_layers,
                                                      num_experts, top_k, moe_head):
    model = upcycled(dense_siglip2, vision_layers, text_layers, num_experts, top_k, moe_head, seed=5)
    with torch.no_grad():
        a = dense_siglip2(**siglip2_batch, output_hidden_states=True, return_loss=True)
        b = model(**siglip2_batch, output_hidden_states=True, output_router_logits=True, return_loss=True)
    for name in ("logits_per_image", "image_embeds", "text_embeds"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.loss, a.loss + b.aux_loss, atol=1e-5, rtol=0)  # transformers' sigmoid loss + aux
    for tower in ("vision_model_output", "text_model_output"):
        for p, q in zip(getattr(a, tower).hidden_states, getattr(b, tower).hidden_states, strict=True):
            torch.testing.assert_close(q, p, atol=1e-5, rtol=0)
    assert len(b.vision_model_output.router_logits) == len(vision_layers) + moe_head


def test_padded_patches_are_kept_out_of_the_aux_losses(dense_siglip2, siglip2_batch):
    model = upcycled(dense_siglip2, (0, 1, 3), (), top_k=2, moe_head=True)
    inputs = vision_inputs(siglip2_batch)
    padded = ~inputs["pixel_attention_mask"].bool()
    changed = dict(inputs, pixel_values=torch.where(padded[..., None], 5.0, inputs["pixel_values"]))
    with torch.no_grad():
        out = model.vision_model(**inputs, output_router_logits=True)
        other = model.vision_model(**changed, output_router_logits=True)
    # The padded patches' routing changed; what the real patches give, the losses included, did not.
    pad_rows = padded.reshape(-1)
    assert not torch.allclose(out.router_logits[0][pad_rows], other.router_logits[0][pad_rows])
    for name in ("load_balance_loss", "router_z_loss", "aux_loss", "pooler_output"):
        torch.testing.assert_close(getattr(other, name), getattr(out, name), atol=1e-6, rtol=0, msg=name)
    # The losses are those of the real patches' router logits; the head's (one pooled token per image) all count.
    real = ~pad_rows
    losses = [routing_losses(logits[real], 2) for logits in out.router_logits[:3]]
    losses.append(routing_losses(out.router_logits[3], 2))
    assert out.router_logits[3].shape == (3, 4)
    torch.testing.assert_close(out.load_balance_loss, torch.stack([b for b, _ in losses]).mean())
    torch.testing.assert_close(out.router_z_loss, torch.stack([z for _, z in losses]).mean())


@pytest.mark.parametrize("missing", ["pixel_attention_mask", "spatial_shapes"])
def test_a_naflex_input_without_its_mask_is_refused_in_one_line(dense_siglip2, siglip2_batch, missing):
    model = upcycled(dense_siglip2, (0,), ())
    inputs = {k: v for k, v in vision_inputs(siglip2_batch).items() if k != missing}
    with pytest.raises(NaflexInputError, match=f"without {missing}: .* Siglip2ImageProcessor") as error:
        model.vision_model(**inputs)
    assert isinstance(error.value, UserError) and isinstance(error.value, ValueError)
    assert "\n" not in str(error.value)
    with pytest.raises(NaflexInputError):
        model(**{k: v for k, v in siglip2_batch.items() if k != missing})


def test_return_dict_false_gives_transformers_tuples(dense_siglip2, siglip2_batch):
    model = dense_as_moe(dense_siglip2)
    with torch.no_grad():
        theirs = dense_siglip2.get_image_features(**vision_inputs(siglip2_batch), return_dict=False)
        ours = model.get_image_features(**vision_inputs(siglip2_batch), return_dict=False)
        full = model(**siglip2_batch, return_dict=False)
        ref = model(**siglip2_batch)
    assert type(theirs) is type(ours) is tuple and len(theirs) == len(ours)
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True))
    assert isinstance(full, tuple) and torch.equal(full[0], ref.logits_per_image)
    assert isinstance(ref, Siglip2MoEOutput)


def test_hidden_states_by_index_attentions_and_sdpa(dense_siglip2, siglip2_batch):
    model = upcycled(dense_siglip2, (1, 2), (0,), moe_head=True)
    inputs = vision_inputs(siglip2_batch)
    with torch.no_grad():
        full = model.vision_model(**inputs, output_hidden_states=True).hidden_states
        some = model.vision_model(**inputs, output_hidden_states=[-1, 1]).hidden_states
        sdpa = model(**siglip2_batch, output_router_logits=True)
        model.set_attn_implementation("eager")
        dense_siglip2.set_attn_implementation("eager")
        eager = model(**siglip2_batch, output_router_logits=True, output_attentions=True)
        theirs = dense_siglip2(**siglip2_batch, output_attentions=True)
    assert [i for i, h in enumerate(some) if h is not None] == [1, 4]
    assert torch.equal(some[1], full[1]) and torch.equal(some[-1], full[-1])
    for name in ("logits_per_image", "aux_loss"):
        torch.testing.assert_close(getattr(sdpa, name), getattr(eager, name), atol=1e-5, rtol=1e-5)
    for tower in ("vision_model_output", "text_model_output"):
        a, b = getattr(theirs, tower).attentions, getattr(eager, tower).attentions
        assert len(b) == 4
        for p, q in zip(a, b, strict=True):
            torch.testing.assert_close(q, p, atol=1e-6, rtol=0)


def test_save_and_load_round_trip_and_towers_from_a_full_directory(dense_siglip2, siglip2_batch, tmp_path):
    model = upcycled(dense_siglip2, (1, 3), (0,), moe_head=True, seed=3)
    model.save_pretrained(tmp_path / "full")
    saved = json.loads((tmp_path / "full" / "config.json").read_text())
    assert saved["model_type"] == "siglip2_moe" and saved["vision_config"]["moe_head"] is True
    loaded = AutoModel.from_pretrained(tmp_path / "full")
    assert type(loaded) is Siglip2MoEModel and type(AutoConfig.from_pretrained(tmp_path / "full")) is Siglip2MoEConfig
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**siglip2_batch).logits_per_image,
                                   model(**siglip2_batch).logits_per_image, atol=1e-6, rtol=0)
    assert (family_of(tmp_path / "full").family.name, family_of(tmp_path / "full").is_moe) == ("siglip2", True)

    vision = Siglip2MoEVisionModel.from_pretrained(tmp_path / "full")
    text = Siglip2MoETextModel.from_pretrained(tmp_path / "full")
    for tower, ours in ((vision, model.vision_model), (text, model.text_model)):
        for key, value in ours.state_dict().items():
            assert torch.equal(value, tower.state_dict()[key]), key
    vision.save_pretrained(tmp_path / "vision-only")
    again = AutoModel.from_pretrained(tmp_path / "vision-only")
    assert type(again) is Siglip2MoEVisionModel
    with torch.no_grad():
        assert torch.equal(again(**vision_inputs(siglip2_batch)).pooler_output,
                           vision(**vision_inputs(siglip2_batch)).pooler_output)
    dense_siglip2.save_pretrained(tmp_path / "dense")
    assert (family_of(tmp_path / "dense").family.name, family_of(tmp_path / "dense").is_moe) == ("siglip2", False)


def test_a_dense_vision_tower_upcycles_alone(dense_siglip2, siglip2_batch):
    dense = Siglip2VisionModel(dense_siglip2.config.vision_config).eval()
    dense.load_state_dict(dense_siglip2.vision_model.state_dict())
    model = sparse_upcycle_siglip2(dense, vision_moe=dict(num_experts=2, top_k=1, moe_layers=[0, 3]))
    assert type(model) is Siglip2MoEVisionModel
    with torch.no_grad():
        a, b = dense(**vision_inputs(siglip2_batch)), model(**vision_inputs(siglip2_batch))
    torch.testing.assert_close(b.pooler_output, a.pooler_output, atol=1e-5, rtol=0)


def test_a_freshly_built_model_trains(siglip2_batch):
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = Siglip2MoEConfig(
        text_config=dict(tower, vocab_size=100, max_position_embeddings=16, moe_layers=[0]),
        vision_config=dict(tower, patch_size=8, num_patches=16, moe_layers=[1], moe_head=True),
    )
    torch.manual_seed(0)
    model = Siglip2MoEModel(config)
    out = model(**siglip2_batch, return_loss=True, output_router_logits=True)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    experts = model.vision_model.encoder.layers[1].mlp.experts
    assert experts.up_proj.grad is not None and experts.up_proj.grad.abs().sum() > 0


@pytest.mark.parametrize("fields, message", [
    (dict(num_experts=0), "num_experts"),
    (dict(moe_layers=[4]), "out of range"),
    (dict(moe_head=True, vision_use_head=False), "vision_use_head"),
])
def test_config_rejects_impossible_settings(fields, message):
    with pytest.raises(Exception, match=message):
        Siglip2MoEVisionConfig(num_hidden_layers=4, **fields)


def test_capacity_keeps_padded_patches_out_of_the_real_patches(dense_siglip2, monkeypatch):
    # With a capacity factor the padded patches take no expert capacity: images padded to a longer patch sequence give
    # their real patches (and the pooled output) the outputs of the same images unpadded.
    moe = dict(num_experts=4, top_k=2, moe_layers=[0, 1, 2, 3], capacity_factor=0.5)
    model = sparse_upcycle_siglip2(dense_siglip2, vision_moe=moe).vision_model
    torch.manual_seed(0)
    with torch.no_grad():  # experts apart, so which choices capacity drops shows in the outputs
        for layer in model.encoder.layers:
            layer.mlp.experts.up_proj.add_(0.3 * torch.randn_like(layer.mlp.experts.up_proj))
    grid, real, padded_len = (2, 3), 6, 10
    pixels = torch.randn(2, real, 3 * 8 * 8, generator=torch.Generator().manual_seed(3))
    unpadded = {"pixel_values": pixels, "pixel_attention_mask": torch.ones(2, real, dtype=torch.long),
                "spatial_shapes": torch.tensor([grid, grid])}
    pad = torch.zeros(2, padded_len - real, dtype=torch.long)
    padded = dict(unpadded, pixel_values=torch.cat([pixels, torch.zeros(2, padded_len - real, 3 * 8 * 8)], dim=1),
                  pixel_attention_mask=torch.cat([unpadded["pixel_attention_mask"], pad], dim=1))
    with torch.no_grad():
        alone, masked = model(**unpadded), model(**padded)
    torch.testing.assert_close(masked.last_hidden_state[:, :real], alone.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked.pooler_output, alone.pooler_output, atol=1e-5, rtol=1e-5)
    # Without the mask reaching the MoE layers the padded patches take capacity from the real ones.
    run_mlp = moe_pretrained.run_mlp

    def unwired(mlp, hidden_states, token_mask=None):
        return run_mlp(mlp, hidden_states)

    monkeypatch.setattr(moe_pretrained, "run_mlp", unwired)
    with torch.no_grad():
        unwired = model(**padded)
    assert not torch.allclose(unwired.last_hidden_state[:, :real], alone.last_hidden_state, atol=1e-3)
