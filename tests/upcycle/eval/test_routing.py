"""Routing statistics of a CLIP-MoE: shares checked against a hand count of the router logits, padding left
out, the heat map, and `python -m upcycle routing` refusing dense models and bad input in one line."""

import json

import pytest
import torch

from encoder.loading import load_clip
from encoder.save import save_clip_moe
from encoder.utils.errors import UserError
from upcycle.cli import main
from upcycle.data import ImageTextDataset, Pair, processor_transform, read_pairs, tokenizer_fn
from upcycle.eval.routing import routing_figure, routing_stats
from upcycle.recipes.sparse import sparse_upcycle


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, base_clip_dir):  # noqa: F811
    """A CLIP-MoE of the tiny base CLIP: 3 experts, top-2, every layer of both towers."""
    out = tmp_path_factory.mktemp("routing") / "moe"
    base = load_clip(base_clip_dir)
    save_clip_moe(sparse_upcycle(base.model, num_experts=3, top_k=2, seed=1), out, base.image_processor,
                  base.tokenizer)
    return out


@pytest.fixture(scope="module")
def moe(moe_dir):
    return load_clip(moe_dir)


@pytest.fixture(scope="module")
def val_data(grids_dir):  # noqa: F811
    return grids_dir / "val.json"


@pytest.fixture(scope="module")
def pairs(val_data):
    """Six grid images with captions of different lengths, so text batches carry padding."""
    images = [p.image for p in read_pairs(val_data)][:6]
    captions = ["top left 3", "top left 3, top right 7", "bottom right 0", "top left 1, top right 2, bottom left 4",
                "top right 9", "bottom left 5, bottom right 6"]
    return [Pair(image, caption) for image, caption in zip(images, captions, strict=True)]


def hand_count(model, pairs, image_processor, tokenizer, top_k: int = 2) -> tuple[dict, int]:
    """Top-k choices per expert counted token by token from one padded batch's router logits, and the number
    of real (non-padding) text tokens."""
    max_length = model.config.text_config.max_position_embeddings
    dataset = ImageTextDataset(pairs, processor_transform(image_processor), tokenizer_fn(tokenizer, max_length))
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        outputs = {"vision": model.vision_model(pixel_values=batch["pixel_values"], output_router_logits=True),
                   "text": model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                            output_router_logits=True)}
    real = {"vision": [True] * batch["pixel_values"].shape[0] * 17, "text": batch["attention_mask"].flatten().tolist()}
    counts = {}
    for tower, out in outputs.items():
        counts[tower] = []
        for logits in out.router_logits:
            per_expert = [0] * logits.shape[1]
            for token, keep in enumerate(real[tower]):
                if keep:
                    for e in torch.softmax(logits[token], dim=-1).topk(top_k).indices.tolist():
                        per_expert[e] += 1
            counts[tower].append(per_expert)
    return counts, int(batch["attention_mask"].sum())


def test_shares_match_a_hand_count_and_exclude_padding(moe, pairs):
    stats = routing_stats(moe.model, pairs, moe.image_processor, moe.tokenizer, batch_size=4)
    counts, real_text_tokens = hand_count(moe.model, pairs, moe.image_processor, moe.tokenizer)
    assert list(stats["towers"]) == ["vision", "text"]
    for tower, tally in stats["towers"].items():
        assert (tally["num_experts"], tally["top_k"]) == (3, 2)
        assert [layer["layer"] for layer in tally["layers"]] == [0, 1]
        for layer, per_expert in zip(tally["layers"], counts[tower], strict=True):
            assert sum(layer["expert_fraction"]) == pytest.approx(1.0)
            assert layer["expert_fraction"] == pytest.approx([c / sum(per_expert) for c in per_expert])
            assert layer["tokens"] == sum(per_expert) // 2
            assert 0.0 < layer["router_entropy_norm"] <= 1.0 and 0.0 < layer["usage_entropy_norm"] <= 1.0
    assert stats["towers"]["vision"]["layers"][0]["tokens"] == len(pairs) * 17  # 16 patches + CLS per image
    assert stats["towers"]["text"]["layers"][0]["tokens"] == real_text_tokens  # padding is not counted
    assert len({tuple(layer["expert_fraction"]) for layer in stats["towers"]["text"]["layers"]}) == 2


def test_only_towers_with_moe_layers_are_reported(base_clip_dir, pairs):  # noqa: F811
    dense = load_clip(base_clip_dir)
    vision_only = sparse_upcycle(dense.model, num_experts=2, top_k=1, moe_layers="last:1", towers=("vision",))
    stats = routing_stats(vision_only, pairs, dense.image_processor, tokenizer=None, batch_size=6)
    assert list(stats["towers"]) == ["vision"]
    (layer,) = stats["towers"]["vision"]["layers"]
    assert layer["layer"] == 1 and layer["tokens"] == len(pairs) * 17
    with pytest.raises(UserError, match="nothing to route"):
        routing_stats(dense.model, pairs, dense.image_processor, dense.tokenizer)


def test_routing_cli_writes_json_and_heat_map(moe_dir, val_data, tmp_path, capsys):
    png, out_json = tmp_path / "plots" / "routing.png", tmp_path / "routing.json"
    rc = main(["routing", "--model", str(moe_dir), "--data", str(val_data),
               "--forward-batch-size", "4", "--out-png", str(png), "--out-json", str(out_json)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out_json.read_text())
    assert printed["n_pairs"] == len(read_pairs(val_data)) and set(printed["towers"]) == {"vision", "text"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [f for folder in (tmp_path, png.parent) for f in folder.iterdir() if f.name.startswith(".")]
    (axes, _colorbar) = routing_figure(printed, "moe").axes
    assert [t.get_text() for t in axes.get_yticklabels()] == ["vision L0", "vision L1", "text L0", "text L1"]
    assert len(axes.texts) == 4 * 3  # every cell annotated with its share


@pytest.mark.parametrize("case", ["dense", "missing_data"])
def test_routing_cli_refusals_are_one_line(case, base_clip_dir, moe_dir, val_data, tmp_path, capsys):  # noqa: F811
    model = base_clip_dir if case == "dense" else moe_dir
    data = val_data if case == "dense" else tmp_path / "nowhere.json"
    png = tmp_path / "routing.png"
    rc = main(["routing", "--model", str(model), "--data", str(data), "--out-png", str(png)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and not png.exists()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert ("not a CLIP-MoE" in err and "nothing to route" in err) if case == "dense" else "does not exist" in err
