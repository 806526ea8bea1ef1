"""The image processor of a LLaVA vision tower: the tower family's own, with the attributes LLaVA reads.

llava-torch reads three things off `tower.image_processor` besides `preprocess`: `image_mean` (the pad colour of
`image_aspect_ratio pad`), `crop_size['height'/'width']` (the crops of anyres, the blank image of a text-only
sample) and `size['shortest_edge']` (the side of anyres's global view, a square resize). A CLIP processor has all
three. transformers' SigLIP processor squashes every image to `size` {height, width} and has neither `crop_size` nor
a shortest edge; LLaVA-NeXT's own SigLIP tower gives its processor `crop_size` = the tower's square side. So a
square SigLIP processor is given that `crop_size` and a `size` that also answers `['shortest_edge']` with the
side, without changing how it resizes (SigLIP's squash, as the checkpoint was trained) or what it saves.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import CLIPImageProcessor

from .convert.dense import (
    PREPROCESSOR_FILE,
    _processor_problem,
    image_size_problem,
    load_image_processor,
)
from .family import Family
from .utils.errors import UserError


class SquareSize(dict):
    """A processor's `size` {"height": S, "width": S} that also answers `size["shortest_edge"]` with S.

    Iterating, `.get`, `in` and JSON see only height and width, so transformers' own resizing (which would take a
    shortest edge over height and width, keeping the aspect ratio) and the saved preprocessor_config.json are those
    of the SigLIP processor; only LLaVA's `size['shortest_edge']` lookup (a square resize to S) gets the side.
    """

    def __missing__(self, key):
        if key == "shortest_edge":
            return self["height"]
        raise KeyError(key)


def _square_side(processor) -> int | None:
    size = {k: v for k, v in dict(processor.size or {}).items() if v is not None}
    if set(size) == {"height", "width"} and size["height"] == size["width"]:
        return size["height"]
    return None


def with_llava_attributes(processor, image_size: int, where: str = "the image processor"):
    """`processor` (a SigLIP-style processor resizing to `size` height x width) with LLaVA's attributes: `crop_size`
    {"height", "width"} = `image_size` when it has none, and `size['shortest_edge']` answering `image_size` (see
    `SquareSize`). A processor of another shape than the model's `image_size` x `image_size` is a UserError naming
    `where`: LLaVA would crop and pad to a size the tower's position embeddings do not take."""
    if _square_side(processor) != image_size:
        raise UserError(f"{where}: size is {dict(processor.size or {})}, but the tower takes {image_size}x{image_size} "
                        f"images (vision_config.image_size); set size to {{\"height\": {image_size}, \"width\": "
                        f"{image_size}}} in {PREPROCESSOR_FILE}")
    if getattr(processor, "crop_size", None) is None:
        processor.crop_size = {"height": image_size, "width": image_size}
    problem = _processor_problem(processor) or image_size_problem(processor, image_size)
    if problem:
        raise UserError(f"{where}: {problem} in {PREPROCESSOR_FILE}")
    processor.size = SquareSize(height=image_size, width=image_size)
    return processor


def load_tower_image_processor(directory: str | os.PathLike, family: Family, image_size: int | None = None):
    """DIR's image processor for a LLaVA tower of `family`, read by `load_image_processor` (one UserError line
    naming the file when it is missing, unreadable or of another size than `image_size`, the model's, when given):
    a CLIP's exactly as LLaVA's own tower has it; another family's (SigLIP's `SiglipImageProcessor`) by its own class,
    given LLaVA's attributes (`with_llava_attributes`)."""
    if family.image_processor is None or issubclass(family.image_processor, CLIPImageProcessor):
        return load_image_processor(directory, image_size)
    processor = load_image_processor(directory, image_size, family.image_processor)
    file = Path(directory) / PREPROCESSOR_FILE
    side = image_size if image_size is not None else _square_side(processor)
    if side is None:
        raise UserError(f"{file}: size is {dict(processor.size or {})}, not a square height x width; set size to "
                        "{\"height\": S, \"width\": S}, S the model's vision_config.image_size")
    return with_llava_attributes(processor, side, str(file))
