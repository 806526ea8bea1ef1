"""Fault tier, inputs that gave a wrong number without a word: the same image or the same base directory read two
ways by two commands. Training and evaluation must see one image's pixels alike, and every command must read a
model directory's weights from the file transformers' `from_pretrained` reads."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from encoder.utils.errors import UserError


@pytest.fixture
def grey16_png(tmp_path):
    """A 16-bit greyscale PNG whose pixels span 0..65535 (a horizontal ramp)."""
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as img:
        assert img.mode in ("I", "I;16"), img.mode  # PIL holds a 16-bit PNG in one of these
    return path


def test_16_bit_greyscale_is_decoded_alike_for_llava_training_and_lmms_eval(grey16_png):
    """lmms-eval hands the model PIL images its data set decoded; they go through training's decoder, not PIL's
    `convert("RGB")` (which clips at 255 and leaves 2 of 256 levels)."""
    from mllm_bridge.lmms.model import _images
    from mllm_bridge.lmms.tasks.digit_grids.utils import doc_to_visual
    from mllm_bridge.train.data import load_rgb

    trained = np.asarray(load_rgb(str(grey16_png)))
    assert trained.shape == (64, 64, 3) and trained.dtype == np.uint8
    assert trained.min() == 0 and trained.max() == 255 and len(np.unique(trained)) == 256  # full dynamic range

    def open_doc(doc):
        return [Image.open(doc["path"])]

    (evaluated,) = _images(open_doc, {"path": grey16_png}, "a-task")
    np.testing.assert_array_equal(np.asarray(evaluated), trained)
    (task_visual,) = doc_to_visual({"image": Image.open(grey16_png)})
    (evaluated,) = _images(lambda doc: [task_visual], {}, "digit_grids_qa")
    np.testing.assert_array_equal(np.asarray(evaluated), trained)


def test_lmms_eval_refuses_an_image_of_unknown_scale_as_training_does(tmp_path):
    from mllm_bridge.lmms.model import _images

    wide = Image.fromarray(np.full((8, 8), 70000, dtype=np.int32), mode="I")
    with pytest.raises(UserError, match="image of task a-task holds I pixels from 70000 to 70000, outside"):
        _images(lambda doc: [wide], {}, "a-task")
