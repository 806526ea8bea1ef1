"""One image -> LLM tokens, LLaVA's way: the pixels LLaVA's model takes and the positions one image occupies.

LLaVA-1.5 turns every image into one fixed number of tokens. LLaVA-1.6 (`image_aspect_ratio anyres`) cuts an
image into crops on the `image_grid_pinpoints` resolution that fits it best, plus a global view, and with
`mm_patch_merge_type spatial_unpad` lays the crops' patches out as one grid, removes the rows or columns that
are padding for this image's shape and ends every row with the learned `image_newline`: the count varies per
image. Training and evaluation both take their pixels from here, through llava-torch's own `process_images`, and
count tokens with llava-torch's own grid and unpadding functions, so neither can drift from what
`prepare_inputs_labels_for_multimodal` does with the pixels.

    layout = ImageLayout.from_config(model.config, tower.config.image_size, tower.config.patch_size)
    pixels, sizes = layout.pixels(images, tower.image_processor)
    model.generate(ids, images=pixels, image_sizes=sizes, ...)
    layout.count(image.size)   # LLM positions this image takes
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from encoder.utils.errors import UserError

from .hook import install_llava_hook

ASPECT_RATIOS = ("square", "pad", "anyres")
MERGE_TYPES = ("flat", "spatial", "spatial_unpad")
# LLaVA-NeXT's range form of the pinpoints: "(1x1),...,(3x3)" is every grid from 1x1 to 3x3 crops.
_RANGE = re.compile(r"\((\d+)x(\d+)\)")


def parse_grid_pinpoints(value: Any, image_size: int) -> list[list[int]] | None:
    """`image_grid_pinpoints` as llava-torch's code needs it: a list of [width, height] lists (its
    `get_anyres_image_grid_shape` parses anything that is not a `list` with `ast.literal_eval`).

    Takes that list (or tuples), its string form ("[[32, 64], ...]"), or LLaVA-NeXT's range form
    "(1x1),...,(3x3)", expanded as LLaVA-NeXT does: grid (i x j) is width i * image_size, height j * image_size.
    None stays None. Raises UserError for anything else, or for a resolution that is not a positive multiple of
    the tower's `image_size` (its crops would not tile it, and LLaVA's grid reshape would fail).
    """
    if value is None:
        return None
    given = value
    if isinstance(value, str):
        ranges = _RANGE.findall(value)
        if ranges:
            (w0, h0), (w1, h1) = (tuple(map(int, pair)) for pair in (ranges[0], ranges[-1]))
            value = [[i * image_size, j * image_size] for i in range(w0, w1 + 1) for j in range(h0, h1 + 1)]
        else:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise UserError(f"image_grid_pinpoints {given!r} is not understood; give a list of [width, height] "
                                "resolutions such as \"[[336, 672], [672, 336], [672, 672]]\" or LLaVA-NeXT's "
                                "range \"(1x1),...,(3x3)\"") from None
    pairs = value if isinstance(value, (list, tuple)) else None
    if not pairs or not all(isinstance(p, (list, tuple)) and len(p) == 2
                            and all(isinstance(v, int) and not isinstance(v, bool) for v in p) for p in pairs):
        raise UserError(f"image_grid_pinpoints {given!r} is not a non-empty list of [width, height] pairs of whole "
                        "numbers; give e.g. \"[[336, 672], [672, 336], [672, 672]]\"")
    bad = [list(p) for p in pairs if p[0] <= 0 or p[1] <= 0 or p[0] % image_size or p[1] % image_size]
    if bad:
        raise UserError(f"image_grid_pinpoints {bad} are not multiples of the tower's image size {image_size}; every "
                        f"width and height must be a multiple of {image_size} so the crops tile the resolution")
    return [[int(w), int(h)] for w, h in pairs]


@dataclass(frozen=True)
class ImageLayout:
    """How a LLaVA model turns one image into pixels and LLM positions (see the module docstring).

    image_size, patch_size: the tower's (its crops are image_size square, each gives (image_size/patch_size)^2
    patches); cls_token: the tower also returns its CLS token (`mm_vision_select_feature cls_patch`).
    """

    aspect_ratio: str
    merge_type: str
    grid_pinpoints: list[list[int]] | None
    image_size: int
    patch_size: int
    cls_token: bool = False

    def __post_init__(self):
        if self.aspect_ratio not in ASPECT_RATIOS:
            raise UserError(f"image_aspect_ratio {self.aspect_ratio!r} is not supported; use one of "
                            f"{', '.join(ASPECT_RATIOS)}")
        if self.merge_type not in MERGE_TYPES:
            raise UserError(f"mm_patch_merge_type {self.merge_type!r} is not supported; use one of "
                            f"{', '.join(MERGE_TYPES)}")
        if self.aspect_ratio == "anyres" and not self.grid_pinpoints:
            raise UserError("image_aspect_ratio anyres needs image_grid_pinpoints (the resolutions an image may be "
                            f"cut at), e.g. \"(1x1),...,(2x2)\" or \"[[{self.image_size}, {2 * self.image_size}], ...]\"")
        if self.aspect_ratio == "anyres" and self.merge_type != "flat" and self.cls_token:
            raise UserError(f"mm_patch_merge_type {self.merge_type} lays the patches out as a grid, which has no place "
                            "for the CLS token; use mm_vision_select_feature patch, or mm_patch_merge_type flat")

    @classmethod
    def from_config(cls, config: Any, image_size: int, patch_size: int, has_cls_token: bool = True) -> ImageLayout:
        """From a LLaVA config (object or dict) or anything with its keys: `image_aspect_ratio` (default square),
        `image_grid_pinpoints`, `mm_patch_merge_type` (default flat), `mm_vision_select_feature`. `has_cls_token`:
        whether the tower's family has a CLS token for 'cls_patch' to keep (a SigLIP has none: its 'patch' and
        'cls_patch' both give the patches alone)."""
        def get(key, default=None):
            if isinstance(config, Mapping):
                return config.get(key, default)
            return getattr(config, key, default)

        return cls(
            aspect_ratio=get("image_aspect_ratio") or "square",
            merge_type=get("mm_patch_merge_type") or "flat",
            grid_pinpoints=parse_grid_pinpoints(get("image_grid_pinpoints"), image_size),
            image_size=image_size,
            patch_size=patch_size,
            cls_token=has_cls_token and get("mm_vision_select_feature", "patch") == "cls_patch",
        )

    @classmethod
    def for_tower(cls, config: Any, tower) -> ImageLayout:
        """From a LLaVA config and the model's loaded tower (anything with LLaVA's `config` attribute; ours says
        whether its family has a CLS token, LLaVA's own is a CLIP)."""
        from encoder.tower import has_cls_token

        return cls.from_config(config, tower.config.image_size, tower.config.patch_size, has_cls_token(tower))

    def config_values(self) -> dict[str, Any]:
        """The LLaVA config keys this layout writes: what `prepare_inputs_labels_for_multimodal` reads."""
        return {"image_aspect_ratio": self.aspect_ratio, "image_grid_pinpoints": self.grid_pinpoints,
                "mm_patch_merge_type": self.merge_type}

    @property
    def patches_per_crop(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + (1 if self.cls_token else 0)

    @property
    def variable(self) -> bool:
        """Whether images of different shapes get different pixel shapes and token counts."""
        return self.aspect_ratio == "anyres"

    # Pixels.

    def pixels(self, images: Sequence, processor) -> tuple[torch.Tensor | list[torch.Tensor], list[tuple[int, int]]]:
        """PIL images -> (what LLaVA's `images=` takes, their `image_sizes`), by llava-torch's `process_images`:
        [N, 3, H, W] for square and pad; under anyres [N, 1+P, 3, H, W] when every image gets P crops, else a list
        of [1+P_i, 3, H, W]. Sizes are (width, height), as LLaVA's `image_sizes` are."""
        from llava.mm_utils import process_images

        self.check_processor(processor)
        return process_images(list(images), processor, self._llava_config()), [image.size for image in images]

    def one_image(self, image, processor) -> torch.Tensor:
        """One PIL image's pixels as a sample of a batch: [3, H, W], or [1+P, 3, H, W] under anyres."""
        return self.pixels([image], processor)[0][0]

    def blank(self, processor) -> torch.Tensor:
        """The image of a text-only sample (zeros, as LLaVA's training data gives): one crop, no grid."""
        crop = processor.crop_size
        shape = (3, crop["height"], crop["width"])
        return torch.zeros((1, *shape) if self.variable else shape)

    @staticmethod
    def collate(pixels: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Per-sample pixels -> one batch: stacked when every shape agrees, else the list (process_images' rule)."""
        if all(p.shape == pixels[0].shape for p in pixels):
            return torch.stack(list(pixels))
        return list(pixels)

    def check_processor(self, processor) -> None:
        """Anyres cuts crops of the processor's crop size but LLaVA lays them out by the tower's image size."""
        if not self.variable:
            return
        crop = processor.crop_size
        if crop["height"] != self.image_size or crop["width"] != self.image_size:
            raise UserError(f"image_aspect_ratio anyres: the image processor crops {crop['width']}x{crop['height']} "
                            f"but the tower takes {self.image_size}x{self.image_size}; save the tower's own processor "
                            "with it")

    def _llava_config(self) -> SimpleNamespace:
        return SimpleNamespace(**self.config_values())

    # Tokens.

    def count(self, size: tuple[int, int]) -> int:
        """LLM positions one image of `size` (width, height) occupies after `prepare_inputs_labels_for_multimodal`.

        square / pad: the crop's patches. anyres: flat and spatial give the global view plus every crop;
        spatial_unpad gives the global view, then the crops' patch grid without the rows or columns that are
        padding for this shape, each row ending in `image_newline`.
        """
        if not self.variable:
            return self.patches_per_crop
        columns, rows = self.grid(size)
        if self.merge_type != "spatial_unpad":
            return (1 + columns * rows) * self.patches_per_crop
        from llava.model.llava_arch import unpad_image

        side = self.image_size // self.patch_size
        grid = torch.empty(1, rows * side, columns * side, device="meta")
        height, width = unpad_image(grid, size).shape[1:]
        return self.patches_per_crop + height * (width + 1)

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """(columns, rows) of crops anyres cuts an image of `size` (width, height) into."""
        install_llava_hook()
        from llava.mm_utils import get_anyres_image_grid_shape

        return get_anyres_image_grid_shape(tuple(size), self.grid_pinpoints, self.image_size)

    def fewest_tokens(self) -> int:
        """A count no image goes below (a context shorter than it fits no image): the global view alone under
        spatial_unpad (an extreme shape can unpad to an empty grid), the global view plus the fewest crops a
        pinpoint gives otherwise."""
        if not self.variable or self.merge_type == "spatial_unpad":
            return self.patches_per_crop
        crops = min((w // self.image_size) * (h // self.image_size) for w, h in self.grid_pinpoints)
        return (1 + crops) * self.patches_per_crop
