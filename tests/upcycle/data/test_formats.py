"""upcycle.data: pair readers, lazy datasets, tar shards, and the digit-grid task (`make-digit-grids`)."""

import csv
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from encoder.utils.errors import UserError
from upcycle.cli import main
from upcycle.data import (
    ImageTextDataset,
    TarShardDataset,
    collate,
    expand_shards,
    processor_transform,
    read_pairs,
    write_tar_shard,
)
from upcycle.data import datasets as datasets_module
from upcycle.embedded.digit_grids import caption_for, load_digit_source, make_digit_grids, position_names

CAPTIONS = ["a red square", "a green square", "a blue square"]
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1) / 255


def fake_tokenize(captions: list[str]) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(c.split()) for c in captions])
    mask = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).long()
    return {"input_ids": mask * 7, "attention_mask": mask}


@pytest.fixture
def images(tmp_path):
    """Three small PNGs under tmp_path/imgs, one colour each."""
    (tmp_path / "imgs").mkdir()
    for i, color in enumerate(COLORS):
        Image.new("RGB", (20, 12), color).save(tmp_path / "imgs" / f"{i}.png")
    return [f"imgs/{i}.png" for i in range(3)]


def llava_record(i, image, caption):
    return {"id": str(i), "image": image, "conversations": [
        {"from": "human", "value": "Describe.\n<image>"}, {"from": "gpt", "value": f"  {caption} "},
        {"from": "human", "value": "More?"}, {"from": "gpt", "value": "not the caption"}]}


def write_rows(path, images, captions):
    if path.suffix == ".json":
        path.write_text(json.dumps([llava_record(i, im, c) for i, (im, c) in enumerate(zip(images, captions))]))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"image": im, "caption": c}) + "\n" for im, c in zip(images, captions)))
    else:
        with path.open("w", newline="") as f:
            w = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            w.writerow(["image", "caption"])
            w.writerows(zip(images, captions))
    return path


@pytest.mark.parametrize("ext", [".json", ".jsonl", ".csv", ".tsv"])
def test_each_format_reads_absolute_paths_and_captions(tmp_path, images, ext):
    pairs = read_pairs(write_rows(tmp_path / f"data{ext}", images, CAPTIONS))
    assert [p.caption for p in pairs] == CAPTIONS  # LLaVA: the first gpt turn, stripped
    assert [p.image for p in pairs] == [str(tmp_path / im) for im in images]


def test_image_root_overrides_the_data_folder(tmp_path, images):
    (tmp_path / "meta").mkdir()
    path = write_rows(tmp_path / "meta" / "data.jsonl", [im.split("/")[1] for im in images], CAPTIONS)
    assert read_pairs(path, image_root=tmp_path / "imgs")[0].image == str(tmp_path / "imgs" / "0.png")


def test_missing_images_are_named_or_skipped(tmp_path, images, caplog):
    names = images + [f"imgs/gone{i}.png" for i in range(4)]
    path = write_rows(tmp_path / "data.csv", names, CAPTIONS + ["x"] * 4)
    with pytest.raises(UserError, match="4 of 7 images not found") as err:
        read_pairs(path)
    assert "gone0.png" in str(err.value) and "gone2.png" in str(err.value) and "gone3.png" not in str(err.value)
    assert "--skip-missing" in str(err.value)
    with caplog.at_level(logging.WARNING):
        pairs = read_pairs(path, skip_missing=True)
    assert len(pairs) == 3 and "dropped 4 of 7" in caplog.text


@pytest.mark.parametrize("ext, where", [(".json", "index 1"), (".jsonl", "line 2"), (".csv", "line 3")])
def test_empty_caption_names_the_row(tmp_path, images, ext, where):
    path = write_rows(tmp_path / f"data{ext}", images, ["ok", "  ", "ok"])
    with pytest.raises(UserError, match=f"empty caption at {where}"):
        read_pairs(path)


def test_unknown_format_and_empty_files(tmp_path):
    (tmp_path / "data.parquet").write_text("")
    with pytest.raises(UserError, match=r"\.json, \.jsonl, \.csv, \.tsv"):
        read_pairs(tmp_path / "data.parquet")
    for name, text in [("e.json", "[]"), ("e.jsonl", "\n"), ("e.csv", ""), ("h.tsv", "image\tcaption\n")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match="no image-caption pairs"):
            read_pairs(tmp_path / name)
    (tmp_path / "bad.csv").write_text("path,text\na.png,hi\n")
    with pytest.raises(UserError, match="image and caption columns"):
        read_pairs(tmp_path / "bad.csv")


def test_dataset_decodes_lazily_and_collates(tmp_path, images, monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(datasets_module.Image, "open", lambda p: opened.append(p) or real_open(p))
    dataset = ImageTextDataset(read_pairs(write_rows(tmp_path / "d.jsonl", images, CAPTIONS)), to_tensor,
                               fake_tokenize)
    assert opened == [] and len(dataset) == 3
    item = dataset[2]
    assert len(opened) == 1 and item["caption"] == "a blue square"
    assert torch.allclose(item["pixel_values"][:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=dataset.collate)))
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["captions"] == CAPTIONS
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 1]]
    assert "input_ids" not in collate([item])


def test_processor_transform_uses_the_clip_image_processor(tmp_path, images):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixels = processor_transform(proc)(Image.open(tmp_path / images[0]).convert("RGB"))
    assert pixels.shape == (3, 32, 32)


def png_bytes(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_tar_shards_round_trip_and_split_across_workers(tmp_path):
    for s in range(2):
        write_tar_shard(tmp_path / f"shard-{s:03d}.tar", [
            (f"sub/s{s}_{i}", png_bytes(COLORS[i]), "png", f"shard {s} {CAPTIONS[i]}") for i in range(3)])
    assert expand_shards(tmp_path / "shard-{000..001}.tar") == expand_shards(tmp_path / "shard-*.tar")
    dataset = TarShardDataset(str(tmp_path / "shard-{000..001}.tar"), to_tensor, fake_tokenize)
    samples = list(dataset)
    assert [s["key"] for s in samples] == [f"sub/s{s}_{i}" for s in range(2) for i in range(3)]
    assert samples[4]["caption"] == "shard 1 a green square"
    assert torch.allclose(samples[4]["pixel_values"][:, 0, 0], torch.tensor([0.0, 1.0, 0.0]))
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=dataset.collate)
    captions = sorted(c for batch in loader for c in batch["captions"])
    assert captions == sorted(s["caption"] for s in samples)  # every sample once, none duplicated
    with pytest.raises(UserError, match="not found"):
        expand_shards(tmp_path / "shard-{000..003}.tar")


def test_tar_shards_as_random_access_pairs_for_training(tmp_path):
    for s in range(2):
        write_tar_shard(tmp_path / f"shard-{s:03d}.tar", [
            (f"s{s}_{i}", png_bytes(COLORS[i]), "png", f"shard {s} {CAPTIONS[i]}") for i in range(3)])
    spec = str(tmp_path / "shard-{000..001}.tar")
    pairs = read_pairs(spec)
    assert [p.caption for p in pairs] == [f"shard {s} {CAPTIONS[i]}" for s in range(2) for i in range(3)]
    assert len({p.image for p in pairs}) == 6  # one reference per image, usable as an image id
    dataset = ImageTextDataset(pairs, to_tensor, fake_tokenize)
    streamed = list(TarShardDataset(spec, to_tensor))
    for index in (5, 0, 3):  # any order: the training sampler draws per cluster
        assert torch.equal(dataset[index]["pixel_values"], streamed[index]["pixel_values"])
    write_tar_shard(tmp_path / "bad.tar", [("k", png_bytes(COLORS[0]), "png", "  ")])
    with pytest.raises(UserError, match="empty caption"):
        read_pairs(tmp_path / "bad.tar")


def test_position_names_and_captions():
    assert caption_for([[3, 7], [0, 5]]) == "top left 3, top right 7, bottom left 0, bottom right 5"
    assert position_names(3)[1] == ["middle left", "center", "middle right"]
    assert position_names(3)[0][1] == "top center"


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    out = tmp_path_factory.mktemp("grids") / "digits"
    make_digit_grids(out, num_train=12, num_val=3, num_test=6, image_size=64, grid=2, seed=3)
    return out


def test_grid_pixels_and_captions_match_the_source_digits(grids):
    source = load_digit_source(seed=3)
    records = json.loads((grids / "train.json").read_text())
    assert len(records) == 12
    for rec in records:
        pixels = np.asarray(Image.open(grids / rec["image"]))
        assert pixels.shape == (64, 64, 3) and (pixels[..., 0] == pixels[..., 2]).all()
        labels = []
        for r in range(2):
            for c in range(2):
                index = rec["source_indices"][r][c]
                expected = np.kron(source.images[index], np.ones((4, 4), dtype=np.uint8))
                np.testing.assert_array_equal(pixels[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32, 0], expected)
                assert source.labels[index] == rec["digits"][r][c]
                labels.append(int(source.labels[index]))
        caption = rec["conversations"][1]["value"]
        assert caption == caption_for(rec["digits"])
        assert [int(part.split()[-1]) for part in caption.split(", ")] == labels
        assert rec["conversations"][0]["value"].startswith("<image>\n")
    assert [p.caption for p in read_pairs(grids / "train.json")] == [r["conversations"][1]["value"] for r in records]


def test_grids_are_deterministic_and_splits_use_disjoint_digits(grids, tmp_path):
    again = tmp_path / "again"
    make_digit_grids(again, num_train=12, num_val=3, num_test=6, image_size=64, grid=2, seed=3)
    for name in ("train.json", "test_qa.json", "images/test_00005.png"):
        assert (again / name).read_bytes() == (grids / name).read_bytes()
    used = {s: {i for rec in json.loads((grids / f"{s}.json").read_text()) for row in rec["source_indices"]
                for i in row} for s in ("train", "val", "test")}
    assert not used["train"] & used["test"] and not used["train"] & used["val"] and not used["val"] & used["test"]
    pools = load_digit_source(seed=3).pools
    assert set(pools["train"]).isdisjoint(pools["test"]) and sum(len(p) for p in pools.values()) == 1797


def test_qa_answers_match_the_captions(grids):
    for split in ("train", "test"):
        captions = {r["id"]: r["conversations"][1]["value"] for r in json.loads((grids / f"{split}.json").read_text())}
        for rec in json.loads((grids / f"{split}_qa.json").read_text()):
            turns = rec["conversations"]
            assert turns[0]["value"].startswith("<image>\n") and len(turns) == 8
            answers = {}
            for q, a in zip(turns[::2], turns[1::2]):
                assert q["from"] == "human" and a["from"] == "gpt" and len(a["value"].split()) == 1
                answers[q["value"].removeprefix("<image>\n").removeprefix("What digit is in the ").rstrip("?")] = a["value"]
            assert ", ".join(f"{k} {answers[k]}" for k in ("top left", "top right", "bottom left", "bottom right")) \
                == captions[rec["id"]]


def test_grid_of_three_and_bilinear(tmp_path):
    make_digit_grids(tmp_path / "g3", num_train=2, num_val=0, num_test=1, image_size=48, grid=3, resample="bilinear")
    rec = json.loads((tmp_path / "g3" / "train.json").read_text())[0]
    assert "center" in rec["conversations"][1]["value"] and len(rec["digits"]) == 3
    assert Image.open(tmp_path / "g3" / rec["image"]).size == (48, 48)
    assert json.loads((tmp_path / "g3" / "val.json").read_text()) == []


def test_cli_writes_all_files_and_refuses_an_existing_dir(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["make-digit-grids", "--out", str(out), "--num-train", "4", "--num-val", "2", "--num-test", "2",
            "--image-size", "32"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "4 train, 2 val, 2 test" in printed
    for name in ("train.json", "val.json", "test.json", "train_qa.json", "test_qa.json", "images/val_00001.png"):
        assert (out / name).is_file()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--overwrite" in err[0]
    assert main(args + ["--overwrite", "--num-train", "5"]) == 0
    assert len(json.loads((out / "train.json").read_text())) == 5
    assert main(["make-digit-grids", "--out", str(tmp_path / "x"), "--image-size", "8"]) == 2
    assert "at least 16" in capsys.readouterr().err
