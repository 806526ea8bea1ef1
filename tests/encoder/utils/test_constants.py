"""The shared constants are the values of the projects they copy: LLaVA's token ids and OpenAI CLIP's normalisation."""

import pytest

from encoder.utils import constants


def test_llava_values_match_llava_constants():
    llava = pytest.importorskip("llava.constants")
    assert constants.IGNORE_INDEX == llava.IGNORE_INDEX
    assert constants.IMAGE_TOKEN_INDEX == llava.IMAGE_TOKEN_INDEX
    assert constants.IMAGE_TOKEN == llava.DEFAULT_IMAGE_TOKEN


def test_clip_normalisation_matches_open_clip():
    open_clip = pytest.importorskip("open_clip")
    assert constants.OPENAI_CLIP_MEAN == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert constants.OPENAI_CLIP_STD == pytest.approx(open_clip.OPENAI_DATASET_STD)
