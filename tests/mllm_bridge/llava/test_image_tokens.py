"""One image -> tokens: pixels and per-image token counts equal what llava-torch's own `process_images` and
`prepare_inputs_labels_for_multimodal` produce on the same batch, for every aspect ratio and merge type."""

import pytest
import torch
from PIL import Image

from encoder.utils.constants import IMAGE_TOKEN_INDEX
from encoder.utils.errors import UserError
from mllm_bridge.embedded.tiny_lm import tiny_llama_config
from mllm_bridge.llava.image_tokens import ImageLayout, parse_grid_pinpoints
from mllm_bridge.llava.model import build_llava_model

# Tower: 32x32 images, 8x8 patches (4x4 = 16 per crop). Shapes: square, wide, tall, and odd ones that unpad.
SIZES = [(32, 32), (64, 32), (32, 64), (50, 20), (90, 70), (20, 80)]
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [96, 32]]
CASES = [("square", "flat"), ("pad", "flat"), ("pad", "spatial_unpad"), ("anyres", "flat"), ("anyres", "spatial"),
         ("anyres", "spatial_unpad")]


def images(sizes=SIZES):
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
            for w, h in sizes]


@pytest.fixture(scope="module")
def models(clip_moe_dir, llama_tokenizer):
    """One tiny CLIP-MoE LLaVA per merge type (spatial_unpad's has LLaVA's `image_newline`)."""
    built = {}
    for merge in ("flat", "spatial", "spatial_unpad"):
        torch.manual_seed(0)
        model = build_llava_model(tiny_llama_config(llama_tokenizer, hidden_size=32), clip_moe_dir,
                                  patch_merge_type=merge).eval()
        built[merge] = model
    return built


def configured(model, aspect, pinpoints=PINPOINTS):
    model.config.image_aspect_ratio = aspect
    model.config.image_grid_pinpoints = pinpoints if aspect == "anyres" else None
    tower = model.get_vision_tower()
    return ImageLayout.for_tower(model.config, tower), tower.image_processor


def llava_embeds(model, pixels, sizes):
    """LLaVA's own splicing of one image per row after [BOS, <image>, 5, 6]: (embeddings, rows' lengths)."""
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, 6]] * len(sizes))
    with torch.no_grad():
        _, _, mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
            ids, None, torch.ones_like(ids, dtype=torch.bool), None, None, pixels, sizes)
    return embeds, mask.sum(1).tolist()


@pytest.mark.parametrize("aspect, merge", CASES)
def test_token_counts_and_pixels_equal_llavas_own(models, aspect, merge):
    from llava.mm_utils import process_images

    model = models[merge]
    layout, processor = configured(model, aspect)
    batch = images()
    expected = process_images(batch, processor, model.config)
    pixels, sizes = layout.pixels(batch, processor)
    assert sizes == SIZES
    if isinstance(expected, list):
        assert isinstance(pixels, list) and all(torch.equal(a, b) for a, b in zip(pixels, expected))
    else:
        assert torch.equal(pixels, expected)

    embeds, lengths = llava_embeds(model, expected, sizes)
    counts = [layout.count(size) for size in SIZES]
    assert [n - 3 for n in lengths] == counts  # three text tokens besides the image
    assert min(counts) >= layout.fewest_tokens()
    if aspect == "anyres":
        assert len(set(counts)) > 1  # really variable per image

    # The training path: each image alone, then collated, gives the same embeddings as LLaVA's whole batch.
    one_by_one = layout.collate([layout.one_image(image, processor) for image in batch])
    ours, our_lengths = llava_embeds(model, one_by_one, sizes)
    assert our_lengths == lengths and torch.equal(ours, embeds)


def test_counts_follow_the_merge_type_by_hand(models):
    layout, _ = configured(models["spatial_unpad"], "anyres")
    # 64x32 fits [64, 32]: 2 crops side by side, an 8x4 patch grid with nothing to unpad; each row gets a newline.
    assert layout.grid((64, 32)) == (2, 1)
    assert layout.count((64, 32)) == 16 + 4 * (8 + 1)
    flat = ImageLayout.from_config({"image_aspect_ratio": "anyres", "image_grid_pinpoints": PINPOINTS}, 32, 8)
    assert flat.count((64, 32)) == 3 * 16
    cls = ImageLayout.from_config({"image_aspect_ratio": "anyres", "image_grid_pinpoints": PINPOINTS,
                                   "mm_vision_select_feature": "cls_patch"}, 32, 8)
    assert cls.count((64, 32)) == 3 * 17
    assert ImageLayout.from_config({"image_aspect_ratio": "pad"}, 32, 8).count((90, 70)) == 16


def test_pinpoints_in_every_form_llava_code_takes():
    listed = [[32, 32], [32, 64], [64, 32], [64, 64]]
    assert parse_grid_pinpoints(listed, 32) == listed
    assert parse_grid_pinpoints(str(listed), 32) == listed
    assert parse_grid_pinpoints([(32, 32), (64, 32)], 32) == [[32, 32], [64, 32]]
    # LLaVA-NeXT's range form, expanded with the tower's image size: grid (i x j) is i crops wide, j high.
    assert parse_grid_pinpoints("(1x1),...,(2x2)", 32) == listed
    assert parse_grid_pinpoints("(1x1),...,(2x3)", 336)[-1] == [672, 1008]
    assert parse_grid_pinpoints(None, 32) is None


@pytest.mark.parametrize("config, message", [
    ({"image_aspect_ratio": "anyres"}, "anyres needs image_grid_pinpoints"),
    ({"image_aspect_ratio": "anyres", "image_grid_pinpoints": [[32, 48]]}, r"\[\[32, 48\]\] are not multiples .* 32"),
    ({"image_aspect_ratio": "anyres", "image_grid_pinpoints": "(2x2),...,(1x1)"}, "not a non-empty list"),
    ({"image_aspect_ratio": "anyres", "image_grid_pinpoints": "[[32, 32"}, "is not understood"),
    ({"image_aspect_ratio": "anyres", "image_grid_pinpoints": [[32]]}, "pairs of whole numbers"),
    ({"image_aspect_ratio": "crop"}, "image_aspect_ratio 'crop' is not supported; use one of square, pad, anyres"),
    ({"mm_patch_merge_type": "spatial_pad"}, "mm_patch_merge_type 'spatial_pad' is not supported"),
    ({"image_aspect_ratio": "anyres", "image_grid_pinpoints": [[32, 32]], "mm_patch_merge_type": "spatial",
      "mm_vision_select_feature": "cls_patch"}, "no place for the CLS token"),
])
def test_bad_input_is_one_line(config, message):
    with pytest.raises(UserError, match=message) as err:
        ImageLayout.from_config(config, 32, 8)
    assert "\n" not in str(err.value)


def test_anyres_refuses_a_processor_that_crops_another_size():
    from encoder.convert.dense import default_image_processor

    layout = ImageLayout.from_config({"image_aspect_ratio": "anyres", "image_grid_pinpoints": PINPOINTS}, 32, 8)
    with pytest.raises(UserError, match="crops 48x48 but the tower takes 32x32"):
        layout.pixels(images(), default_image_processor(48))
