"""The official CLIP-MoE release import reproduces the reference implementation's outputs on the tiny fixture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import REPO_ROOT

import encoder
from encoder.cli import main
from encoder.convert.official import import_official
from encoder.utils.errors import UserError

FIXTURE_NAME = Path("fixtures") / "official_clipmoe_tiny"
SHARED = Path(os.environ.get("CLIP_MOE_SHARED") or REPO_ROOT.parent / "shared")
FIXTURE = SHARED / FIXTURE_NAME
CKPT = FIXTURE / "clip-moe-tiny-official.pt"
REPO = REPO_ROOT

pytestmark = pytest.mark.skipif(
    not FIXTURE.is_dir(), reason=f"fixture directory {FIXTURE} not found (set CLIP_MOE_SHARED to the shared/ folder)"
)
TOL = 1e-5  # the fixture's own criterion; observed ~5e-7


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(FIXTURE / "expected.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def official_sd() -> dict[str, torch.Tensor]:
    return torch.load(CKPT, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def imported():
    return import_official(CKPT)


def embeddings(model, expected, **kwargs):
    with torch.no_grad():
        image = model.get_image_features(expected["pixel_values"], **kwargs)
        text = model.get_text_features(expected["input_ids"], **kwargs)
    return image, text


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_reproduces_reference_embeddings(imported, expected):
    image, text = embeddings(imported[0], expected)
    assert max_diff(image.pooler_output, expected["image_embeds"]) <= TOL
    assert max_diff(text.pooler_output, expected["text_embeds"]) <= TOL


def test_router_logits_match_reference(imported, expected):
    image, text = embeddings(imported[0], expected, output_router_logits=True)
    for ours, theirs in ((image.router_logits, expected["image_router_logits"]),
                         (text.router_logits, expected["text_router_logits"])):
        assert len(ours) == theirs.shape[0]
        for layer, logits in enumerate(ours):
            # The reference runs OpenAI's sequence-first layout: its rows are token-major (token, batch).
            batch = 3
            ref = theirs[layer].view(-1, batch, theirs.shape[-1]).transpose(0, 1).reshape_as(logits)
            assert max_diff(logits, ref) <= TOL


def test_logit_scale_is_stored_as_log(imported, expected):
    assert imported[0].logit_scale.exp().item() == pytest.approx(expected["logit_scale"], rel=1e-6)


def test_config_inferred_from_shapes(imported):
    model, processor = imported
    v, t = model.config.vision_config, model.config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.patch_size, v.image_size, v.num_attention_heads) == (128, 2, 8, 32, 2)
    # arch.json says 2 text heads; only width // 64 = 1 reproduces the reference.
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.max_position_embeddings, t.vocab_size) == (
        64, 2, 1, 248, 1000)
    assert v.moe_layers == t.moe_layers == [0, 1]
    assert (v.num_experts, v.top_k, t.num_experts, t.top_k) == (4, 2, 4, 2)
    assert v.hidden_act == t.hidden_act == "quick_gelu"
    assert model.config.projection_dim == 32
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    assert processor.crop_size == {"height": 32, "width": 32} and processor.size == {"shortest_edge": 32}
    assert list(processor.image_mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_text_pools_at_argmax_even_without_end_of_text(imported):
    """OpenAI/Long-CLIP pool at argmax(input_ids) for any input, e.g. a sequence missing its end-of-text id."""
    ids = torch.tensor([[998, 5, 870, 12, 0, 0], [998, 17, 3, 999, 0, 0]])
    with torch.no_grad():
        out = imported[0].text_model(ids)
    rows = torch.arange(2)
    assert torch.equal(out.pooler_output, out.last_hidden_state[rows, ids.argmax(-1)])


def test_wrong_text_heads_do_not_reproduce(expected):
    model, _ = import_official(CKPT, text_heads=2)
    assert model.config.text_config.num_attention_heads == 2
    _, text = embeddings(model, expected)
    assert max_diff(text.pooler_output, expected["text_embeds"]) > 1e-2


def test_wrapped_prefixed_half_precision_state_dict(tmp_path, official_sd, imported, expected):
    wrapped = {"state_dict": {f"module.{k}": v.half() for k, v in official_sd.items()}}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    model, _ = import_official(tmp_path / "wrapped.pt")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    image, _ = embeddings(model, expected)
    assert max_diff(image.pooler_output, expected["image_embeds"]) < 0.05  # fp16 weights, fp32 compute


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("ln_final.weight"), "missing keys ln_final.weight"),
        (lambda sd: sd.pop("visual.transformer.resblocks.1.experts.2.c_fc.bias"), "experts.2.c_fc.bias"),
        (lambda sd: sd.__setitem__("extra.weight", torch.zeros(1)), "unexpected keys extra.weight"),
        (lambda sd: sd.__setitem__("ln_final.bias", torch.zeros(65)),
         "ln_final.bias (65,) (-> text_model.final_layer_norm.bias (65,), expected (64,))"),
        (lambda sd: sd.pop("visual.conv1.weight"), "'visual.conv1.weight' missing"),
    ],
    ids=["missing", "missing_expert_tensor", "unexpected", "wrong_shape", "missing_shape_source"],
)
def test_keys_that_do_not_fit_are_named(tmp_path, official_sd, edit, message):
    sd = dict(official_sd)
    edit(sd)
    torch.save(sd, tmp_path / "edited.pt")
    with pytest.raises(UserError) as error:
        import_official(tmp_path / "edited.pt")
    assert message in str(error.value)


def test_dense_blocks_stay_dense(tmp_path, official_sd):
    """A block with `mlp.c_fc` (no experts, no gate) imports as a dense CLIP MLP."""
    sd = dict(official_sd)
    block = "visual.transformer.resblocks.1."
    for name in ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"):
        sd[f"{block}mlp.{name}"] = sd[f"{block}experts.0.{name}"]
        for e in range(4):
            del sd[f"{block}experts.{e}.{name}"]
    del sd[f"{block}gate.weight"]
    torch.save(sd, tmp_path / "mixed.pt")
    model, _ = import_official(tmp_path / "mixed.pt")
    assert model.config.vision_config.moe_layers == [0] and model.config.text_config.moe_layers == [0, 1]
    assert torch.equal(model.vision_model.encoder.layers[1].mlp.fc1.weight, sd[f"{block}mlp.c_fc.weight"])


def test_expert_count_and_top_k_checked():
    with pytest.raises(UserError, match="--num-experts 8 disagrees"):
        import_official(CKPT, num_experts=8)
    with pytest.raises(UserError, match="--top-k 5 exceeds"):
        import_official(CKPT, top_k=5)


def test_cli_round_trip(tmp_path, imported, expected, capsys):
    out = tmp_path / "clip-moe"
    assert main(["import-official", str(CKPT), "--out", str(out)]) == 0
    assert "active per token" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert CKPT.name in card and "official CLIP-MoE release import" in card and "tokenizer" in card

    loaded = encoder.CLIPMoEModel.from_pretrained(out).eval()
    for ours, reference in zip(embeddings(loaded, expected), embeddings(imported[0], expected), strict=True):
        assert torch.equal(ours.pooler_output, reference.pooler_output)
    assert type(transformers.AutoModel.from_pretrained(out)) is encoder.CLIPMoEModel
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 32, "width": 32} and processor["resample"] == 3


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["import-official", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--num-experts" in help_text and "--overwrite" in help_text and "--text-heads" in help_text


def _missing_key_checkpoint(tmp_path: Path) -> Path:
    sd = torch.load(CKPT, map_location="cpu", weights_only=True)
    del sd["text_projection"]
    torch.save(sd, tmp_path / "missing.pt")
    return tmp_path / "missing.pt"


@pytest.mark.parametrize(
    "case, expected_error",
    [
        ("missing_file", "does not exist"),
        ("tensor", "holds a Tensor, not a state dict"),
        ("not_tensors", "not tensors"),
        ("missing_key", "text_projection"),
        ("existing_out", "already exists; pass --overwrite"),
        ("top_k", "--top-k 3 exceeds --num-experts 2"),
    ],
    ids=["missing_file", "tensor", "not_tensors", "missing_key", "existing_out", "top_k"],
)
def test_cli_user_errors(tmp_path, capsys, case, expected_error):
    ckpt, out, extra = CKPT, tmp_path / "out", []
    if case == "missing_file":
        ckpt = tmp_path / "nope.pt"
    elif case == "tensor":
        ckpt = tmp_path / "tensor.pt"
        torch.save(torch.zeros(3), ckpt)
    elif case == "not_tensors":
        ckpt = tmp_path / "numbers.pt"
        torch.save({"logit_scale": 1.0}, ckpt)
    elif case == "missing_key":
        ckpt = _missing_key_checkpoint(tmp_path)
    elif case == "existing_out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "top_k":
        extra = ["--num-experts", "2", "--top-k", "3"]
    before = sorted(p.name for p in tmp_path.iterdir())

    assert main(["import-official", str(ckpt), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected_error in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary left behind
    if case == "existing_out":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.slow
@pytest.mark.end_to_end
def test_python_m_encoder_user_error_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "encoder", "import-official", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2
    missing = tmp_path / "nope.pt"
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoint {missing} does not exist or is not a file; pass the path of the released .pt"
    ]
    assert not (tmp_path / "o").exists()
