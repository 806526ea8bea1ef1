"""`make-digit-grids --shapes`: grids of several shapes (rows x columns) at the square grid's pixels per digit, captions
and questions naming the positions of each shape, and a default run that is unchanged by the option's existence."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from encoder.utils.errors import UserError
from upcycle.cli import main
from upcycle.embedded import digit_accuracy
from upcycle.embedded.digit_accuracy import digit_position_accuracy, digit_prompts
from upcycle.embedded.digit_grids import (
    caption_for,
    load_digit_source,
    make_digit_grids,
    position_names,
)

SHAPES = [(2, 2), (1, 2), (2, 1), (1, 3), (3, 1)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "digits"
    make_digit_grids(out, num_train=10, num_val=0, num_test=5, image_size=64, grid=2, seed=3,
                     shapes="2x2,1x2,2x1,1x3,3x1")
    return out


def test_position_names_of_non_square_grids():
    assert position_names(1, 2) == [["left", "right"]]
    assert position_names(2, 1) == [["top"], ["bottom"]]
    assert position_names(3, 1) == [["top"], ["middle"], ["bottom"]]
    assert position_names(1, 3) == [["left", "center", "right"]]
    assert position_names(2, 3)[1] == ["bottom left", "bottom center", "bottom right"]
    assert position_names(3, 2)[1] == ["middle left", "middle right"]
    assert position_names(1, 4)[0][3] == "row 1 column 4"
    for grid in range(1, 6):  # the square names are the ones every existing data set was written with
        assert position_names(grid, grid) == position_names(grid)
    assert caption_for([[3, 7]]) == "left 3, right 7" and caption_for([[3], [7]]) == "top 3, bottom 7"


def test_every_shape_is_drawn_with_its_digits_where_the_caption_says(mixed):
    source = load_digit_source(seed=3)
    records = json.loads((mixed / "train.json").read_text())
    assert [(len(r["digits"]), len(r["digits"][0])) for r in records] == SHAPES * 2
    for rec in records:
        rows, cols = len(rec["digits"]), len(rec["digits"][0])
        pixels = np.asarray(Image.open(mixed / rec["image"]))
        assert pixels.shape == (32 * rows, 32 * cols, 3)  # 32 px per digit, as the 64 px 2x2 grid
        words = dict(part.rsplit(" ", 1) for part in rec["conversations"][1]["value"].split(", "))
        assert len(words) == rows * cols
        for r in range(rows):
            for c in range(cols):
                index = rec["source_indices"][r][c]
                expected = np.kron(source.images[index], np.ones((4, 4), dtype=np.uint8))
                np.testing.assert_array_equal(pixels[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32, 0], expected)
                assert int(words[position_names(rows, cols)[r][c]]) == source.labels[index] == rec["digits"][r][c]


def test_questions_name_each_position_of_each_shape(mixed):
    source = load_digit_source(seed=3)
    asked = set()
    for rec in json.loads((mixed / "test_qa.json").read_text()):
        rows, cols = len(rec["digits"]), len(rec["digits"][0])
        names = position_names(rows, cols)
        truth = {names[r][c]: int(source.labels[rec["source_indices"][r][c]]) for r in range(rows) for c in range(cols)}
        turns = rec["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and len(turns) == 2 * rows * cols
        answers = {}
        for q, a in zip(turns[::2], turns[1::2]):
            question = q["value"].removeprefix("<image>\n")
            name = next(n for n in truth if question.endswith(f" {n}?"))
            answers[name] = int(a["value"])
            asked.add(question)
        assert answers == truth
    assert {"What digit is on the left?", "What digit is at the bottom?", "What digit is in the middle?",
            "What digit is in the center?", "What digit is in the top right?"} <= asked


def test_a_default_run_is_unchanged_and_one_square_shape_reproduces_it(tmp_path):
    make_digit_grids(tmp_path / "plain", num_train=4, num_val=1, num_test=2, image_size=64, grid=2, seed=5)
    make_digit_grids(tmp_path / "square", num_train=4, num_val=1, num_test=2, image_size=64, grid=2, seed=5,
                     shapes=[(2, 2)])
    plain = sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*") if p.is_file())
    assert plain == sorted(p.relative_to(tmp_path / "square") for p in (tmp_path / "square").rglob("*") if p.is_file())
    for name in plain:  # the option only changes the README's description of the shapes
        same = (tmp_path / "plain" / name).read_bytes() == (tmp_path / "square" / name).read_bytes()
        assert same == (name.name != "README.md"), name
    readme = (tmp_path / "plain" / "README.md").read_text()
    assert "2x2 grids of scikit-learn handwritten digits, 64 px (nearest" in readme
    records = json.loads((tmp_path / "plain" / "train.json").read_text())
    assert all(np.array(r["digits"]).shape == (2, 2) and "shape" not in r for r in records)


@pytest.mark.parametrize("args, message", [
    (["--shapes", "2x2,1by2"], "'1by2' is not ROWSxCOLUMNS"),
    (["--shapes", "0x2"], "'0x2' is not ROWSxCOLUMNS"),
    (["--shapes", "1x2,1X2"], "names 1x2 twice"),
    (["--shapes", "1x2", "--image-size", "33"], "not a multiple of --grid 2"),
])
def test_bad_shapes_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert main(["make-digit-grids", "--out", str(out), "--num-train", "2", "--num-val", "0", "--num-test", "0",
                 "--image-size", "32", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists()


def test_cli_writes_the_shapes_it_is_given(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["make-digit-grids", "--out", str(out), "--num-train", "2", "--num-val", "0", "--num-test", "1",
                 "--image-size", "32", "--shapes", "1x2, 2x1"]) == 0
    sizes = [Image.open(out / r["image"]).size for r in json.loads((out / "train.json").read_text())]
    assert sizes == [(32, 16), (16, 32)]  # (width, height): 16 px per digit, the 32 px 2x2 grid's


def test_digit_accuracy_reads_one_non_square_shape_and_refuses_mixed_ones(monkeypatch):
    def encode(model, tokenizer, texts):  # a text model whose embedding is one-hot in (position word, digit)
        emb = torch.zeros(len(texts), 20)
        for i, text in enumerate(texts):
            word, digit = text.rsplit(" ", 1)
            emb[i, 10 * (word == "right") + int(digit)] = 1.0
        return emb

    monkeypatch.setattr(digit_accuracy, "encode_texts", encode)
    assert digit_prompts(1, 2) == [[f"left {d}" for d in range(10)], [f"right {d}" for d in range(10)]]
    labels = torch.zeros(10, 1, 2, dtype=torch.long)
    labels[:, 0, 0] = torch.arange(10)
    images = encode(None, None, [f"left {d}" for d in range(10)])  # each image shows its left digit only
    accuracy = digit_position_accuracy(images, labels, None, None)
    assert list(accuracy) == ["left", "right", "mean"] and accuracy["left"] == 100.0 and accuracy["right"] < 100.0
    with pytest.raises(UserError, match="differ in grid shape") as err:
        digit_position_accuracy(images[:2], [[[1, 2]], [[1], [2]]], None, None)
    assert "\n" not in str(err.value)
