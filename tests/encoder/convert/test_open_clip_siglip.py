"""open_clip SigLIP -> transformers SiglipModel: the same embeddings and logits (logit_bias included), the tokenizer
and image processor, the real SO400M-14-384 shape, and one-line refusals.

Tiny timm SigLIP towers are registered with timm and tiny open_clip configs with open_clip (both registries are
global; the names are unique to this file); the tokenizer is a SentencePiece vocabulary trained here on a few
sentences. Every model is open_clip's random init (or a checkpoint saved here): nothing is downloaded.
"""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch
from timm.models import register_model
from timm.models.vision_transformer import _create_vision_transformer
from transformers import SiglipModel, SiglipTokenizer

from conftest import assert_max_abs_diff, one_line_user_error, perturbed_open_clip, siglip_sentencepiece_dir
from encoder.convert.dense import load_dense_clip
from encoder.convert.open_clip_siglip import (
    OpenCLIPSiglipDense,
    convert_open_clip_siglip,
    is_open_clip_siglip,
    load_open_clip_siglip,
    siglip_config_from_open_clip,
    siglip_image_processor_from_open_clip,
    siglip_preprocess_cfg,
)
from encoder.utils.errors import UserError

CTX = 16
TIMM_TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "class_token": False,
             "global_pool": "map"}


@register_model
def siglipconv_vit_tiny(pretrained: bool = False, **kwargs):
    """timm's SigLIP ViT (as vit_base_patch16_siglip_224: exact GELU), at width 32."""
    return _create_vision_transformer("siglipconv_vit_tiny", pretrained=pretrained, **{**TIMM_TINY, **kwargs})


@register_model
def siglipconv_vit_tiny_tanh(pretrained: bool = False, **kwargs):
    """timm's SigLIP ViT with big_vision's tanh GELU and a MLP that is not 4x wide (as SO400M's 4304 = 3.7362x)."""
    args = {**TIMM_TINY, "act_layer": "gelu_tanh", "mlp_ratio": 2.5}
    return _create_vision_transformer("siglipconv_vit_tiny_tanh", pretrained=pretrained, **{**args, **kwargs})


@register_model
def siglipconv_vit_tiny_cls(pretrained: bool = False, **kwargs):
    """A class token before the attention head: no SiglipModel has one."""
    args = {**TIMM_TINY, "class_token": True}
    return _create_vision_transformer("siglipconv_vit_tiny_cls", pretrained=pretrained, **{**args, **kwargs})


def _config(vision: dict | None = None, text: dict | None = None, **top) -> dict:
    cfg = {
        "embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
        "vision_cfg": {"image_size": 32, "timm_model_name": "siglipconv_vit_tiny", "timm_model_pretrained": False,
                       "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": CTX, "vocab_size": 64, "hf_tokenizer_name": "TOKENIZER_DIR",
                     "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 32, "heads": 2, "layers": 2,
                     "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}},
    }
    cfg.update(top)
    cfg["vision_cfg"].update(vision or {})
    cfg["text_cfg"].update(text or {})
    return cfg


GOOD = {
    "test-occ-siglip": _config(),
    "test-occ-siglip-tanh": _config(vision={"timm_model_name": "siglipconv_vit_tiny_tanh"},
                                    text={"act_kwargs": {"approximate": "tanh"}, "mlp_ratio": 2.5}),
}
BAD = {  # name -> (config, words the error must contain)
    "test-occ-siglip-gap": (_config(vision={"timm_pool": "avg"}), "timm pooling 'avg'"),
    "test-occ-siglip-vproj": (_config(vision={"timm_proj": "linear"}), "timm_proj 'linear'"),
    "test-occ-siglip-hftext": (_config(text={"hf_model_name": "roberta-base"}), "Hugging Face text tower"),
    "test-occ-siglip-cls": (_config(vision={"timm_model_name": "siglipconv_vit_tiny_cls"}), "class"),
    "test-occ-siglip-causal": (_config(text={"no_causal_mask": False}), "causal"),
    "test-occ-siglip-argmax": (_config(text={"pool_type": "argmax"}), "text pooling 'argmax'"),
    "test-occ-siglip-noprojbias": (_config(text={"proj_bias": False}), "Linear with bias"),
    "test-occ-siglip-nobias": (_config(init_logit_bias=None), "no logit_bias"),
    "test-occ-siglip-inline-text": (_config(custom_text=False), "custom_text false"),
}
NO_TOKENIZER = {  # name -> (config, words the error must contain): models fine, tokenizers not
    "test-occ-siglip-tok-missing": (_config(text={"hf_tokenizer_name": "/nonexistent/siglip_tokenizer"}),
                                    "could not be loaded"),
    "test-occ-sl-tok-simple": (_config(text={"hf_tokenizer_name": None, "tokenizer_kwargs": None}),
                                   "is SimpleTokenizer"),
    "test-occ-siglip-tok-whitespace": (_config(text={"tokenizer_kwargs": {"clean": "whitespace"}}),
                                       "does not canonicalize"),
}


@pytest.fixture(scope="module", autouse=True)
def registered(tmp_path_factory):
    """Register every tiny config with open_clip, its tokenizer pointing at the SentencePiece folder made here.

    Runs single-threaded: these models are tiny, and two threads stall badly when the 2 cores are shared.
    """
    tokenizer_dir = siglip_sentencepiece_dir(tmp_path_factory.mktemp("siglip_tokenizer"))
    root = tmp_path_factory.mktemp("open_clip_siglip_configs")
    everything = {**GOOD, **{n: c for n, (c, _) in {**BAD, **NO_TOKENIZER}.items()}}
    for name, cfg in everything.items():
        cfg = copy.deepcopy(cfg)
        if cfg["text_cfg"].get("hf_tokenizer_name") == "TOKENIZER_DIR":
            cfg["text_cfg"]["hf_tokenizer_name"] = tokenizer_dir
        cfg["text_cfg"] = {k: v for k, v in cfg["text_cfg"].items() if v is not None}
        if cfg.get("init_logit_bias") is None:
            cfg.pop("init_logit_bias", None)
        (root / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tokenizer_dir
    torch.set_num_threads(threads)


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and token ids anywhere in the vocabulary: SigLIP attends to every position and pools the last."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 64, (4, CTX), generator=g)


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(GOOD))
def test_converted_model_reproduces_open_clip(name):
    oc = perturbed_open_clip(name)
    hf = convert_open_clip_siglip(oc, GOOD[name])
    pixels, ids = _inputs()
    assert isinstance(hf, SiglipModel) and not hf.training and hf.dtype == torch.float32
    act = "gelu_pytorch_tanh" if name.endswith("tanh") else "gelu"
    assert hf.config.vision_config.hidden_act == hf.config.text_config.hidden_act == act
    assert hf.config.vision_config.intermediate_size == (80 if name.endswith("tanh") else 128)

    trunk = oc.visual.trunk
    assert_max_abs_diff(hf.vision_model(pixel_values=pixels).last_hidden_state, trunk.forward_features(pixels),
           "vision tokens after post_layernorm")
    assert_max_abs_diff(hf.get_image_features(pixel_values=pixels).pooler_output,
                        oc.encode_image(pixels), "encode_image")
    assert_max_abs_diff(hf.get_text_features(input_ids=ids).pooler_output, oc.encode_text(ids), "encode_text")
    out = hf(input_ids=ids, pixel_values=pixels)
    expected = oc.get_logits(pixels, ids)[0]
    assert expected.mean() < -5  # the bias (about -10) is in open_clip's logits: it must be in ours too
    assert_max_abs_diff(out.logits_per_image, expected, "logits with logit_bias", tol=1e-4)
    assert_max_abs_diff(hf.logit_bias, oc.logit_bias.reshape(1), "logit_bias")


@pytest.mark.parametrize("name", ["ViT-SO400M-14-SigLIP-384", "ViT-B-16-SigLIP"])
def test_real_config_shapes_map_to_siglip_config(name):
    """The published architectures, built on the meta device (modules only, no weight allocated)."""
    with torch.device("meta"):
        oc = open_clip.create_model(name, pretrained=None, device="meta")
    config, prefix = siglip_config_from_open_clip(oc, name)
    vision, text = config.vision_config, config.text_config
    so400m = name.startswith("ViT-SO400M")
    width, mlp, layers, heads = (1152, 4304, 27, 16) if so400m else (768, 3072, 12, 12)
    for tower in (vision, text):
        assert (tower.hidden_size, tower.intermediate_size, tower.num_hidden_layers, tower.num_attention_heads) == (
            width, mlp, layers, heads)
        assert tower.layer_norm_eps == 1e-6
        assert tower.hidden_act == "gelu"  # open_clip's timm and text towers use exact GELU: so must we
    assert (vision.image_size, vision.patch_size) == ((384, 14) if so400m else (224, 16))
    assert (vision.image_size // vision.patch_size) ** 2 == (729 if so400m else 196)
    assert (text.vocab_size, text.max_position_embeddings, text.projection_size) == (32000, 64, width)
    assert vision.vision_use_head and prefix == "text."
    assert is_open_clip_siglip(open_clip.get_model_config(name))
    assert not is_open_clip_siglip(open_clip.get_model_config("ViT-B-16"))


def test_published_preprocessing_becomes_siglip_image_processor():
    """A SigLIP built without a pretrained tag carries open_clip's CLIP defaults; its tags' SigLIP preprocessing
    (mean/std 0.5, squash resize, bicubic) is what the processor gets."""
    with torch.device("meta"):
        oc = open_clip.create_model("ViT-SO400M-14-SigLIP-384", pretrained=None, device="meta")
    processor = siglip_image_processor_from_open_clip(siglip_preprocess_cfg(oc, "ViT-SO400M-14-SigLIP-384"))
    assert list(processor.image_mean) == list(processor.image_std) == [0.5, 0.5, 0.5]
    assert processor.size == {"height": 384, "width": 384} and not processor.do_center_crop
    assert processor.crop_size == {"height": 384, "width": 384} and processor.resample == 3  # bicubic
    pixels = processor(images=torch.full((3, 500, 300), 255, dtype=torch.uint8), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 384, 384) and torch.allclose(pixels, torch.ones_like(pixels))


def test_load_gives_model_tokenizer_and_processor(tmp_path, registered):
    """From a checkpoint file, as a user would: weights, tokenizer ids and text embeddings all open_clip's."""
    name = "test-occ-siglip-tanh"
    oc = perturbed_open_clip(name, seed=3)
    torch.save(oc.state_dict(), tmp_path / "weights.pt")
    loaded = load_open_clip_siglip(f"open_clip:{name}:{tmp_path / 'weights.pt'}")
    assert isinstance(loaded, OpenCLIPSiglipDense) and isinstance(loaded.tokenizer, SiglipTokenizer)
    texts = ["A photo of two cats!", "the  RED car, on water", "sky", "blue " * 30, "zebra & xylophone?"]
    expected_ids = open_clip.get_tokenizer(name)(texts)
    ids = loaded.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, expected_ids)
    assert loaded.model.config.text_config.pad_token_id == loaded.tokenizer.pad_token_id == 1
    with torch.no_grad():
        assert_max_abs_diff(loaded.model.get_text_features(input_ids=ids).pooler_output, oc.encode_text(expected_ids),
               "text features through the converted tokenizer")
    processor = loaded.image_processor
    assert processor.crop_size == {"height": 32, "width": 32}
    assert list(processor.image_mean) == list(open_clip.get_model_preprocess_cfg(oc)["mean"])
    pixels = processor(images=torch.zeros(3, 40, 64, dtype=torch.uint8), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 32, 32)  # open_clip's default: shortest side to 32, then the center crop


def test_the_dense_loader_hands_a_siglip_to_the_siglip_converter(tmp_path, registered):
    """`load_dense_clip` (what every command's `open_clip:` specs go through) gives a SigLIP config to
    `load_open_clip_siglip` instead of the CLIP converter, which refuses its logit_bias: the same weights, tokenizer
    and processor."""
    name = "test-occ-siglip"
    torch.save(perturbed_open_clip(name, seed=4).state_dict(), tmp_path / "weights.pt")
    spec = f"open_clip:{name}:{tmp_path / 'weights.pt'}"
    through_clip, direct = load_dense_clip(spec), load_open_clip_siglip(spec)
    assert isinstance(through_clip.model, SiglipModel)
    assert through_clip.source == spec and isinstance(through_clip.tokenizer, SiglipTokenizer)
    expected = direct.model.state_dict()
    got = through_clip.model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert through_clip.image_processor.to_dict() == direct.image_processor.to_dict()


def test_tokenizer_that_differs_from_open_clip_is_refused(monkeypatch):
    """The ids are checked, not assumed: with '_' among the probe texts (open_clip turns it into a space,
    SiglipTokenizer drops it) the twin is refused in one line."""
    monkeypatch.setattr("encoder.convert.open_clip_siglip.TOKENIZER_PROBES", ("a photo", "big_house"))
    with pytest.raises(UserError, match="gives other ids than SiglipTokenizer for 'big_house'") as error:
        load_open_clip_siglip("open_clip:test-occ-siglip")
    assert "without its tokenizer" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("name", sorted(BAD))
def test_unsupported_models_are_refused_in_one_line(name):
    words = BAD[name][1]
    assert words in one_line_user_error(load_open_clip_siglip, f"open_clip:{name}")


@pytest.mark.parametrize("name", sorted(NO_TOKENIZER))
def test_siglip_without_its_tokenizer_is_refused_in_one_line(name):
    words = NO_TOKENIZER[name][1]
    message = one_line_user_error(load_open_clip_siglip, f"open_clip:{name}")
    assert words in message and "without its tokenizer" in message


def test_converting_a_built_model_checks_its_config_first():
    oc = perturbed_open_clip("test-occ-siglip")
    with pytest.raises(UserError, match="timm pooling 'avg'"):
        convert_open_clip_siglip(oc, BAD["test-occ-siglip-gap"][0])
