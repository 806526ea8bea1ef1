"""`upcycle sparse` of SigLIP and SigLIP2 bases (transformers directories and open_clip SigLIPs): the written
SigLIP-MoE directory loads with AutoModel and computes the dense model's logits (logit_bias included), judged by
transformers' own SiglipModel / Siglip2Model and by open_clip; its preprocessing comes along; bad input is one line.

Every model is built here (tiny, random); the SentencePiece vocabulary is trained in-process; nothing is downloaded.
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file
from timm.models import register_model
from timm.models.vision_transformer import _create_vision_transformer
from transformers import (
    AutoModel,
    AutoTokenizer,
    Siglip2ImageProcessor,
    Siglip2Model,
    SiglipImageProcessor,
    SiglipModel,
    SiglipTokenizer,
    SiglipVisionModel,
)

import encoder  # noqa: F401  (registers every family)
from conftest import assert_max_abs_diff, siglip_sentencepiece_dir, tiny_siglip_config
from encoder.family import family_of
from encoder.loading import load_clip
from encoder.siglip import SiglipMoEModel
from encoder.siglip2 import Siglip2MoEModel
from upcycle.cli import main
from upcycle.recipes.sparse import sparse_upcycle

VOCAB = 40  # the SentencePiece vocabulary trained below
CTX = 16
# The text tower over that vocabulary (tests/conftest.py builds the rest: width 32, 4 layers).
TEXT = {"vocab_size": VOCAB, "max_position_embeddings": CTX, "pad_token_id": 0, "eos_token_id": 1}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return siglip_sentencepiece_dir(tmp_path_factory.mktemp("siglip_tokenizer"), CTX)


def _randomised(model):
    """transformers zero-inits the logit scale and bias and the head's probe neighbours: make every tensor count."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-1.5)
    return model.eval()


def _siglip_dir(path, tokenizer_dir) -> SiglipModel:
    torch.manual_seed(0)
    model = _randomised(SiglipModel(tiny_siglip_config(**TEXT)))
    model.save_pretrained(path)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    SiglipTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return model


def _siglip2_dir(path) -> Siglip2Model:
    torch.manual_seed(0)
    model = _randomised(Siglip2Model(tiny_siglip_config(siglip2=True, **TEXT)))
    model.save_pretrained(path)
    Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(path)
    return model


def _siglip_batch(seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(3, 3, 32, 32, generator=g), "input_ids": torch.randint(0, VOCAB, (3, CTX),
                                                                                               generator=g)}


def _siglip2_batch(seed: int = 3) -> dict:
    """Three images of 16, 6 and 12 real patches of 16 (padding after each image's patches)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 4), (2, 3), (3, 4)]
    mask = torch.zeros(3, 16, dtype=torch.long)
    for i, (h, w) in enumerate(shapes):
        mask[i, : h * w] = 1
    return {"pixel_values": torch.randn(3, 16, 3 * 8 * 8, generator=g) * mask[..., None],
            "pixel_attention_mask": mask, "spatial_shapes": torch.tensor(shapes),
            "input_ids": torch.randint(0, VOCAB, (3, CTX), generator=g)}


@torch.no_grad()
def _same_function(dense, moe, batch) -> None:
    """Logits (scale and bias included), embeddings and every hidden state of both towers equal."""
    a = dense(**batch, output_hidden_states=True)
    b = moe(**batch, output_hidden_states=True)
    assert a.logits_per_image.mean() < 0  # the bias (-1.5) is in the dense logits: it must be in the MoE's too
    assert_max_abs_diff(b.logits_per_image, a.logits_per_image, "logits_per_image")
    assert_max_abs_diff(b.image_embeds, a.image_embeds, "image_embeds")
    assert_max_abs_diff(b.text_embeds, a.text_embeds, "text_embeds")
    for tower in ("vision_model_output", "text_model_output"):
        for i, (p, q) in enumerate(zip(getattr(a, tower).hidden_states, getattr(b, tower).hidden_states)):
            assert_max_abs_diff(q, p, f"{tower} hidden state {i}")


def _sparse(base, out, *flags) -> int:
    return main(["sparse", "--base", str(base), "--out", str(out), "--num-experts", "3", "--top-k", "2", *flags])


@pytest.mark.parametrize("layers,moe_head", [("all", True), ("odd", False)])
def test_a_siglip_directory_upcycles_to_a_siglip_moe_with_the_same_logits(layers, moe_head, tmp_path, tokenizer_dir,
                                                                         capsys):
    dense = _siglip_dir(tmp_path / "dense", tokenizer_dir)
    out = tmp_path / "moe"
    assert _sparse(tmp_path / "dense", out, "--moe-layers", layers, *(["--moe-head"] if moe_head else [])) == 0
    printed = capsys.readouterr().out
    assert f"SigLIP-MoE written to {out}" in printed and "identical to the dense model" in printed
    match = family_of(out)
    assert (match.family.name, match.is_moe, match.kind) == ("siglip", True, "model")
    moe = AutoModel.from_pretrained(out).eval()
    assert type(moe) is SiglipMoEModel
    assert moe.config.vision_config.moe_head is moe_head
    assert moe.config.vision_config.moe_layers == ([0, 1, 2, 3] if layers == "all" else [1, 3])
    keys = load_file(out / "model.safetensors")
    assert ("vision_model.head.mlp.router.weight" in keys) is moe_head
    assert ("vision_model.head.mlp.fc1.weight" in keys) is not moe_head
    _same_function(dense, moe, _siglip_batch())
    # The base's preprocessing comes along: the same processor and the same token ids.
    loaded = load_clip(out)
    assert loaded.is_moe and isinstance(loaded.image_processor, SiglipImageProcessor)
    assert dict(loaded.image_processor.size)["height"] == 32
    texts = ["a photo of a cat", "two big red house"]
    base_tok, moe_tok = SiglipTokenizer.from_pretrained(tokenizer_dir), AutoTokenizer.from_pretrained(out)
    assert moe_tok(texts, padding="max_length", max_length=CTX)["input_ids"] == base_tok(
        texts, padding="max_length", max_length=CTX)["input_ids"]
    card = json.loads((out / "clip_moe_recipe.json").read_text())
    assert card["details"].get("moe_head", False) is moe_head
    readme = (out / "README.md").read_text()
    assert readme.startswith("# SigLIP-MoE\n\nA sparse Mixture-of-Experts SigLIP made with clip-moe-toolkit.")
    assert ("MoE layers [0, 1, 2, 3] and the pooling head's MLP" in readme) is moe_head


def test_the_streamed_siglip_moe_equals_the_in_memory_upcycling(tmp_path, tokenizer_dir):
    """One mechanism: `upcycle sparse` (streamed) and `sparse_upcycle` (in memory) write the same tensors, routers
    included, for the same seed."""
    dense = _siglip_dir(tmp_path / "dense", tokenizer_dir)
    assert _sparse(tmp_path / "dense", tmp_path / "moe", "--moe-head", "--seed", "5") == 0
    in_memory = sparse_upcycle(dense, num_experts=3, top_k=2, seed=5, moe_head=True).state_dict()
    streamed = load_file(tmp_path / "moe" / "model.safetensors")
    assert set(streamed) == set(in_memory)
    for key, value in in_memory.items():
        assert torch.equal(streamed[key], value), key


def test_a_siglip2_directory_upcycles_to_a_siglip2_moe_with_the_same_logits(tmp_path, capsys):
    dense = _siglip2_dir(tmp_path / "dense")
    out = tmp_path / "moe"
    assert _sparse(tmp_path / "dense", out, "--moe-layers", "0,2", "--moe-head") == 0
    assert f"SigLIP2-MoE written to {out}" in capsys.readouterr().out
    match = family_of(out)
    assert (match.family.name, match.is_moe, match.kind) == ("siglip2", True, "model")
    moe = AutoModel.from_pretrained(out).eval()
    assert type(moe) is Siglip2MoEModel and moe.config.vision_config.moe_head
    _same_function(dense, moe, _siglip2_batch())
    processor = load_clip(out).image_processor
    assert isinstance(processor, Siglip2ImageProcessor) and processor.max_num_patches == 16


# --- open_clip SigLIPs -------------------------------------------------------------------------------------------

TIMM_TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "class_token": False,
             "global_pool": "map"}


@register_model
def sparse_siglip_vit_tiny(pretrained: bool = False, **kwargs):
    """timm's SigLIP ViT (as vit_base_patch16_siglip_224), at width 32."""
    return _create_vision_transformer("sparse_siglip_vit_tiny", pretrained=pretrained, **{**TIMM_TINY, **kwargs})


def _open_clip_config(tokenizer: str) -> dict:
    return {
        "embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
        "vision_cfg": {"image_size": 32, "timm_model_name": "sparse_siglip_vit_tiny", "timm_model_pretrained": False,
                       "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": CTX, "vocab_size": 64, "hf_tokenizer_name": tokenizer,
                     "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 32, "heads": 2, "layers": 2,
                     "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}},
    }


@pytest.fixture(scope="module")
def open_clip_names(tmp_path_factory, tokenizer_dir):
    """Two tiny open_clip SigLIPs: one with its tokenizer, one whose tokenizer folder does not exist."""
    root = tmp_path_factory.mktemp("open_clip_configs")
    names = {"test-sparse-siglip": tokenizer_dir, "test-sparse-siglip-notok": "/nonexistent/siglip_tokenizer"}
    for name, tokenizer in names.items():
        (root / f"{name}.json").write_text(json.dumps(_open_clip_config(tokenizer)))
    open_clip.add_model_config(root)
    return sorted(names)


def test_an_open_clip_siglip_upcycles_to_a_siglip_moe_with_open_clips_logits(open_clip_names, tmp_path):
    torch.manual_seed(0)
    oc = open_clip.create_model("test-sparse-siglip", pretrained=None).eval()
    with torch.no_grad():  # open_clip and timm zero-init some tensors (biases, the MAP latent's neighbours)
        for p in oc.parameters():
            p.add_(0.02 * torch.randn_like(p))
    checkpoint = tmp_path / "oc.pt"
    torch.save(oc.state_dict(), checkpoint)
    out = tmp_path / "moe"
    assert _sparse(f"open_clip:test-sparse-siglip:{checkpoint}", out, "--moe-head") == 0
    moe = AutoModel.from_pretrained(out).eval()
    assert type(moe) is SiglipMoEModel
    g = torch.Generator().manual_seed(2)
    pixels, ids = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 64, (4, CTX), generator=g)
    with torch.no_grad():
        expected = oc.get_logits(pixels, ids)[0]
        got = moe(pixel_values=pixels, input_ids=ids).logits_per_image
    assert expected.mean() < -5  # open_clip's logit_bias (-10 at init) is in both
    assert_max_abs_diff(got, expected, "logits against open_clip", tol=1e-4)
    assert isinstance(load_clip(out).image_processor, SiglipImageProcessor)
    assert (out / "spiece.model").is_file() and isinstance(AutoTokenizer.from_pretrained(out), SiglipTokenizer)


def _refused(base, tmp_path, capsys, words: str) -> None:
    """`upcycle sparse --base BASE` exits 2 with one line holding `words`, and writes nothing (no temporary either)."""
    out = tmp_path / "moe"
    assert main(["sparse", "--base", str(base), "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], lines
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_open_clip_siglip_without_its_tokenizer_is_one_line_and_nothing_written(open_clip_names, tmp_path,
                                                                                     capsys):
    _refused("open_clip:test-sparse-siglip-notok", tmp_path, capsys, "tokenizer could not be loaded")


def test_a_model_of_no_family_is_one_line_and_nothing_written(tmp_path, capsys):
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _refused(other, tmp_path, capsys, "'bert' model, not a CLIP, SigLIP or SigLIP2")


def test_moe_head_on_a_clip_is_one_line(tmp_path, capsys):
    from conftest import tiny_dense_clip

    tiny_dense_clip().save_pretrained(tmp_path / "clip")
    assert main(["sparse", "--base", str(tmp_path / "clip"), "--out", str(tmp_path / "moe"), "--moe-head"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "CLIP has no pooling-head MLP" in lines[0], lines
    assert not (tmp_path / "moe").exists()


def test_a_siglip_tower_directory_is_refused_naming_the_full_model(tmp_path, tokenizer_dir, capsys):
    dense = _siglip_dir(tmp_path / "dense", tokenizer_dir)
    SiglipVisionModel(dense.config.vision_config).save_pretrained(tmp_path / "vision")
    _refused(tmp_path / "vision", tmp_path, capsys, "vision tower only")


def test_the_verdict_allows_float_rounding_relative_to_the_outputs():
    """A real-size model's hidden states are large: 1e-6 of them is rounding (fp32 keeps ~7 digits), a changed
    expert is not."""
    from upcycle.recipes.sparse import within_rounding

    assert within_rounding(4e-6, 0.5) and within_rounding(1.3e-5, 40.0)
    assert not within_rounding(2e-5, 1.0) and not within_rounding(1e-3, 40.0)
