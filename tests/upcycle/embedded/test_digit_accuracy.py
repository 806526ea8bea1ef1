"""Zero-shot digit accuracy per grid position: prompts worded like the captions, positions read row-major, and a
tiny CLIP reading its own prompt embeddings perfectly."""

import pytest
import torch
import torch.nn.functional as F

from encoder.loading import load_clip
from upcycle.embedded.digit_accuracy import digit_position_accuracy, digit_prompts, position_accuracy
from upcycle.embedded.digit_grids import caption_for
from upcycle.eval.embedding import encode_texts


@pytest.fixture(scope="module")
def dense(base_clip_dir):  # noqa: F811
    return load_clip(base_clip_dir)


def test_digit_prompts_are_worded_like_the_captions():
    digits = [[3, 7], [0, 5]]
    prompts = digit_prompts(2)
    assert ", ".join(prompts[p][d] for p, d in enumerate([3, 7, 0, 5])) == caption_for(digits)
    assert digit_prompts(1) == [[f"center {d}" for d in range(10)]]


def test_position_accuracy_reads_positions_row_major():
    g = torch.Generator().manual_seed(0)
    basis = torch.eye(40).view(4, 10, 40)  # prompt (position p, digit d) = unit vector 10 p + d
    digits = torch.randint(0, 10, (20, 4), generator=g)
    shown = digits.clone()
    shown[:10, 2] = (shown[:10, 2] + 1) % 10  # half the images show another digit at position 2
    images = F.normalize(sum(basis[p, shown[:, p]] for p in range(4)), dim=-1)
    assert position_accuracy(images, digits, basis).tolist() == [100.0, 100.0, 50.0, 100.0]


def test_digit_position_accuracy_with_a_model(dense):
    # each "image" is the embedding of the right top-left prompt, so that position must be read perfectly
    labels = torch.zeros(10, 2, 2, dtype=torch.long)
    labels[:, 0, 0] = torch.arange(10)
    images = encode_texts(dense.model, dense.tokenizer, [f"top left {d}" for d in range(10)])
    accuracy = digit_position_accuracy(images, labels, dense.model, dense.tokenizer)
    assert list(accuracy) == ["top left", "top right", "bottom left", "bottom right", "mean"]
    assert accuracy["top left"] == 100.0
    assert accuracy["mean"] == pytest.approx(sum(list(accuracy.values())[:4]) / 4)
    labels[:, 0, 0] = (labels[:, 0, 0] + 1) % 10
    assert digit_position_accuracy(images, labels, dense.model, dense.tokenizer)["top left"] == 0.0
