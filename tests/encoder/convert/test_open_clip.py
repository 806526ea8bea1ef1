"""open_clip -> transformers CLIPModel: exact features, tokenizer, checkpoints and clear refusals.

Tiny open_clip configs are registered from a temporary directory; every model is open_clip's random
init (or a checkpoint saved here), so nothing is downloaded.
"""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch
from transformers import AutoTokenizer, CLIPModel

from conftest import assert_max_abs_diff, one_line_user_error, perturbed_open_clip
from encoder.convert.open_clip import OpenCLIPDense, convert_open_clip_model, load_open_clip, parse_open_clip_spec
from encoder.utils.errors import UserError

CTX = 16
BASE = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": CTX, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _variant(name: str, top: dict | None = None, vision: dict | None = None, text: dict | None = None) -> tuple:
    cfg = copy.deepcopy(BASE)
    cfg.update(top or {})
    cfg["vision_cfg"].update(vision or {})
    cfg["text_cfg"].update(text or {})
    return f"test-occ-{name}", cfg


GOOD = dict([
    _variant("gelu"),
    _variant("quickgelu", top={"quick_gelu": True}),
    _variant("customtext-projbias", top={"custom_text": True}, text={"proj_bias": True}),
    _variant("eos-pool", top={"custom_text": True}, text={"pool_type": "eos", "eos_id": 49407}),
    _variant("final-ln-after-pool", vision={"final_ln_after_pool": True}),
])
BAD = {  # name -> (config, words the error must contain)
    name: (cfg, words) for (name, cfg), words in [
        (_variant("attnpool", vision={"attentional_pool": True, "attn_pooler_heads": 2}), "attentional pooler"),
        (_variant("avgpool", vision={"pool_type": "avg"}), "global average pool"),
        (_variant("no-ln-pre", vision={"no_ln_pre": True}), "no_ln_pre"),
        (_variant("layerscale", vision={"ls_init_value": 0.1}), "layer scale"),
        (_variant("qknorm", vision={"qk_norm": True}), "custom attention blocks"),
        (_variant("bidir-text", top={"custom_text": True}, text={"no_causal_mask": True}), "causal mask"),
        (_variant("last-pool", top={"custom_text": True}, text={"pool_type": "last"}), "text pooling"),
        (_variant("text-cls", top={"custom_text": True}, text={"embed_cls": True}), "embed_cls"),
        (_variant("sigmoid", top={"init_logit_bias": -10.0}), "logit_bias"),
        (_variant("timm", vision={"timm_model_name": "vit_tiny_patch16_224"}), "timm vision tower"),
        (_variant("resnet", vision={"layers": [1, 1, 1, 1], "width": 32}), "ResNet"),
        (_variant("hftext", text={"hf_model_name": "roberta-base"}), "Hugging Face text tower"),
        (_variant("coca", top={"multimodal_cfg": {"width": 32, "layers": 1, "heads": 2}}), "CoCa"),
    ]
}


@pytest.fixture(scope="module", autouse=True)
def registered(tmp_path_factory):
    """Register every tiny config with open_clip (its registry is global; names are unique to this file).

    Runs single-threaded: these models are tiny, and two threads stall badly when the 2 cores are shared.
    """
    root = tmp_path_factory.mktemp("open_clip_configs")
    for name, cfg in {**GOOD, **{n: c for n, (c, _) in BAD.items()}}.items():
        (root / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _open_clip(name: str, seed: int = 0) -> torch.nn.Module:
    model = perturbed_open_clip(name, seed)
    if isinstance(getattr(model, "text", None), torch.nn.Module) and hasattr(model.text.text_projection, "bias"):
        with torch.no_grad():
            model.text.text_projection.bias.zero_()  # a non-zero bias is rejected; see its own test
    return model


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images plus BOS ... EOT token ids, zero-padded like open_clip's tokenizer, EOT at varying positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(4, CTX, dtype=torch.long)
    for b, n in enumerate((3, 7, 12, CTX)):
        ids[b, 0], ids[b, n - 1] = 49406, 49407
        ids[b, 1 : n - 1] = torch.randint(1, 49406, (n - 2,), generator=g)
    return torch.randn(4, 3, 32, 32, generator=g), ids


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(GOOD))
def test_converted_model_reproduces_open_clip(name):
    oc = _open_clip(name)
    hf = convert_open_clip_model(oc, name)
    pixels, ids = _inputs()
    assert not hf.training and hf.dtype == torch.float32
    expected_act = "quick_gelu" if GOOD[name].get("quick_gelu") else "gelu"
    assert hf.config.vision_config.hidden_act == hf.config.text_config.hidden_act == expected_act
    assert_max_abs_diff(hf.get_image_features(pixel_values=pixels).pooler_output,
                        oc.encode_image(pixels), "encode_image")
    assert_max_abs_diff(hf.get_text_features(input_ids=ids).pooler_output, oc.encode_text(ids), "encode_text")
    out = hf(input_ids=ids, pixel_values=pixels)
    assert_max_abs_diff(out.logits_per_image, oc.get_logits(pixels, ids)[0], "logits", tol=1e-4)

    visual, states = oc.visual, hf.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
    x = visual._embeds(pixels)
    assert_max_abs_diff(states[0], x, "vision embeddings + ln_pre")
    for i, block in enumerate(visual.transformer.resblocks):
        x = block(x)
        assert_max_abs_diff(states[i + 1], x, f"vision layer {i}")

    text_out = hf.text_model(input_ids=ids, output_hidden_states=True)
    if hasattr(oc, "text"):
        x, mask = oc.text._embeds(ids)
        blocks, ln_final = oc.text.transformer.resblocks, oc.text.ln_final
    else:
        x, mask = oc.token_embedding(ids) + oc.positional_embedding, oc.attn_mask
        blocks, ln_final = oc.transformer.resblocks, oc.ln_final
    assert_max_abs_diff(text_out.hidden_states[0], x, "text embeddings")
    for i, block in enumerate(blocks):
        x = block(x, attn_mask=mask)
        assert_max_abs_diff(text_out.hidden_states[i + 1], x, f"text layer {i}")
    assert_max_abs_diff(text_out.last_hidden_state, ln_final(x), "text final layer norm")


def test_load_open_clip_builds_model_processor_and_tokenizer(tmp_path):
    dense = load_open_clip("open_clip:test-occ-quickgelu")
    dense.model.save_pretrained(tmp_path)
    _, ids = _inputs()
    with torch.no_grad():
        reloaded = CLIPModel.from_pretrained(tmp_path).eval()
        assert_max_abs_diff(reloaded.get_text_features(input_ids=ids).pooler_output,
               dense.model.get_text_features(input_ids=ids).pooler_output, "text after save/load")
    assert isinstance(dense, OpenCLIPDense) and dense.source == "open_clip:test-occ-quickgelu"
    assert not dense.model.training and dense.model.dtype == torch.float32
    assert dense.model.config.vision_config.hidden_act == "quick_gelu"
    assert dense.model.config.vision_config.num_attention_heads == 32 // 16
    proc = dense.image_processor
    assert proc.size["shortest_edge"] == 32 and (proc.crop_size["height"], proc.crop_size["width"]) == (32, 32)
    assert proc.do_center_crop and proc.resample == 3  # bicubic
    assert tuple(proc.image_mean) == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert tuple(proc.image_std) == pytest.approx(open_clip.OPENAI_DATASET_STD)
    assert dense.tokenizer is not None and dense.tokenizer.model_max_length == CTX


@torch.no_grad()
def test_image_processor_matches_open_clip_preprocess():
    from PIL import Image
    from sklearn.datasets import load_sample_images

    oc = _open_clip("test-occ-gelu")
    proc = load_open_clip("open_clip:test-occ-gelu").image_processor
    transform = open_clip.image_transform(32, is_train=False, **{
        k: v for k, v in open_clip.get_model_preprocess_cfg(oc).items() if k in ("mean", "std", "interpolation")})
    # torchvision rounds the crop offset, transformers floors it: sizes with an even margin agree exactly
    for array in load_sample_images().images:
        image = Image.fromarray(array).resize((300, 200))
        ours = proc(images=image, return_tensors="pt").pixel_values[0]
        assert_max_abs_diff(ours, transform(image), "pixels", tol=0.05)
        assert (ours - transform(image)).abs().mean() < 1e-3


@torch.no_grad()
def test_tokenizer_matches_open_clip_ids_and_features(tmp_path):
    captions = [
        "a photo of a cat",
        "Two DOGS playing   in the snow!",
        "a café, naïve résumé with 123 and 4.5% of it's colour",
        "a very long caption that keeps going and going past the sixteen token context window for sure",
    ]
    dense = load_open_clip("open_clip:test-occ-gelu")
    dense.tokenizer.save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)  # what a saved CLIP-MoE directory gives back
    assert type(tokenizer) is type(dense.tokenizer)
    want = open_clip.get_tokenizer("test-occ-gelu")(captions)
    got = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")
    real = want != 0  # open_clip pads with 0, ours with <|endoftext|> (same pooled features)
    assert torch.equal(got.attention_mask.bool(), real)
    assert torch.equal(got.input_ids[real], want[real])
    assert (got.input_ids[~real] == tokenizer.pad_token_id).all()
    assert want[3, -1] == got.input_ids[3, -1] == 49407  # truncation keeps the EOT last

    oc = _open_clip("test-occ-gelu")
    hf = convert_open_clip_model(oc, "test-occ-gelu")
    ours = hf.get_text_features(input_ids=got.input_ids, attention_mask=got.attention_mask).pooler_output
    assert_max_abs_diff(ours, oc.encode_text(want), "text features through each side's tokenizer")


@torch.no_grad()
@pytest.mark.parametrize("wrap", ["state_dict", "training_checkpoint", "safetensors"])
def test_checkpoint_file_round_trip(tmp_path, wrap):
    oc = _open_clip("test-occ-quickgelu", seed=7)
    oc.logit_scale.fill_(4.2)
    state = oc.state_dict()
    if wrap == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "weights.pt"
        torch.save(state if wrap == "state_dict" else {"epoch": 3, "state_dict": state}, path)
    dense = load_open_clip(f"open_clip:test-occ-quickgelu:{path}")
    assert dense.model.logit_scale.item() == pytest.approx(4.2)
    pixels, ids = _inputs()
    assert_max_abs_diff(dense.model.get_image_features(pixel_values=pixels).pooler_output,
                        oc.encode_image(pixels), "image")
    assert_max_abs_diff(dense.model.get_text_features(input_ids=ids).pooler_output, oc.encode_text(ids), "text")


def test_local_dir_export_with_its_own_preprocessing(tmp_path):
    from safetensors.torch import save_file

    oc = _open_clip("test-occ-gelu", seed=3)
    save_file(oc.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear",
                  "resize_mode": "squash"}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": GOOD["test-occ-gelu"],
                                                                "preprocess_cfg": preprocess}))
    dense = load_open_clip(f"open_clip:local-dir:{tmp_path}")
    pixels, _ = _inputs()
    with torch.no_grad():
        assert_max_abs_diff(dense.model.get_image_features(pixel_values=pixels).pooler_output,
                            oc.encode_image(pixels), "image")
    proc = dense.image_processor
    assert (proc.size["height"], proc.size["width"]) == (32, 32) and not proc.do_center_crop
    assert list(proc.image_mean) == [0.5] * 3 and list(proc.image_std) == [0.25] * 3 and proc.resample == 2
    with pytest.raises(UserError, match="open_clip_config.json"):
        load_open_clip(f"open_clip:local-dir:{tmp_path / 'nowhere'}")


class _NotATensor:
    pass


def test_bad_checkpoints_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_open_clip(f"open_clip:test-occ-gelu:{tmp_path / 'missing.pt'}")
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": _open_clip("test-occ-gelu").state_dict(), "extra": _NotATensor()}, pickled)
    with pytest.raises(UserError, match="weights_only=True.* refused it .*_NotATensor"):
        load_open_clip(f"open_clip:test-occ-gelu:{pickled}")
    other = tmp_path / "other.pt"
    torch.save(_open_clip("test-occ-customtext-projbias").state_dict(), other)
    with pytest.raises(UserError, match="do not fit this architecture"):
        load_open_clip(f"open_clip:test-occ-gelu:{other}")
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not weights")
    with pytest.raises(UserError, match=r"refused it; weights must be a \.safetensors"):
        load_open_clip(f"open_clip:test-occ-gelu:{garbage}")


def test_unknown_model_and_bad_specs_raise_user_error():
    with pytest.raises(UserError, match=r"unknown open_clip model 'ViT-B-3'.*did you mean .*ViT-B-32"):
        load_open_clip("open_clip:ViT-B-3")
    for spec in ("ViT-B-32", "open_clip:", "hf:ViT-B-32"):
        with pytest.raises(UserError, match="open_clip:MODEL_NAME"):
            parse_open_clip_spec(spec)
    with pytest.raises(UserError, match="local-dir"):
        parse_open_clip_spec("open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert parse_open_clip_spec("open_clip:ViT-B/32:/w/a:b.pt") == ("ViT-B-32", "/w/a:b.pt")


@pytest.mark.parametrize("name", sorted(BAD))
def test_unsupported_variants_raise_one_line_user_error(name):
    words = BAD[name][1]
    message = one_line_user_error(load_open_clip, f"open_clip:{name}")
    assert words in message and name in message, message


def test_nonzero_text_projection_bias_is_refused():
    oc = _open_clip("test-occ-customtext-projbias")
    with torch.no_grad():
        oc.text.text_projection.bias.fill_(0.1)
    with pytest.raises(UserError, match="non-zero bias"):
        convert_open_clip_model(oc, "test-occ-customtext-projbias")
