"""The LLaVA vision tower over a MoE encoder: `CLIPVisionTower`'s interface, backed by the family's MoE vision model.

LLaVA's model code talks to its vision tower through an interface that `llava`'s `CLIPVisionTower`
defines but never writes down; `LlavaVisionTower` below writes it down. `CLIPMoEVisionTower` implements
it for a MoE directory of any registered family (`encoder.family`: a full model or a vision-only export, e.g. a
CLIP-MoE's `CLIPMoEVisionModel` or a SigLIP-MoE's `SiglipMoEVisionModel`) and, for a dense CLIP directory or hub id,
behaves exactly like LLaVA's own tower (it loads the same `CLIPVisionModel`); a dense SigLIP directory loads as
transformers' `SiglipVisionModel`. The family's rules decide the rest: its classes, its image processor (given the
attributes LLaVA reads: `encoder.image_processors`), and whether the first token is a CLS token that the 'patch'
select drops (SigLIP has none: every patch token is kept, as LLaVA-NeXT's SigLIP tower does). This module does not
import `llava`: `mllm_bridge` makes LLaVA build this tower.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .family import Family, family_named, find_family, is_moe_dir
from .image_processors import load_tower_image_processor, with_llava_attributes
from .model_dir import clip_moe_config, load_clip_moe, read_config_json
from .utils.errors import UserError

logger = logging.getLogger(__name__)

SELECT_FEATURES = ("patch", "cls_patch")
# LLaVA's own tower is a CLIP: a hub id, or a directory of no registered family, loads as one (as LLaVA loads it).
DEFAULT_FAMILY = "clip"


def tower_family(vision_tower: str | os.PathLike) -> Family:
    """The family whose rules the tower follows: the directory's, else (a hub id) LLaVA's default, a CLIP."""
    match = find_family(vision_tower) if Path(vision_tower).is_dir() else None
    return match.family if match is not None else family_named(DEFAULT_FAMILY)


def needs_our_tower(vision_tower) -> bool:
    """Whether LLaVA's own builder would build the wrong tower for `vision_tower`: a MoE directory of any family (it
    would lose its experts), or a dense directory of a family other than LLaVA's CLIP (a SigLIP would be read as a
    CLIP). Dense CLIP directories and hub ids stay LLaVA's own."""
    if not isinstance(vision_tower, (str, os.PathLike)) or not Path(vision_tower).is_dir():
        return False
    match = find_family(vision_tower)
    return match is not None and (match.is_moe or match.family.name != DEFAULT_FAMILY)


def square_images_problem(name, label: str, config: PretrainedConfig) -> str | None:
    """Why the tower `name` (a `label` model, e.g. "SigLIP2-MoE") cannot be a LLaVA tower, or None: LLaVA gives its
    tower square images of `config.image_size`, and a family whose vision config has no such size (SigLIP2's naflex
    tower takes padded patch sequences with their mask and grid shapes) takes no such images."""
    if getattr(config, "image_size", None) is not None:
        return None
    return (f"{name} is a {label} tower, which takes variable-resolution patch sequences (no vision_config.image_size), "
            "not the square images LLaVA gives its vision tower; use a CLIP or SigLIP (-MoE) directory as the LLaVA "
            "tower")


def has_cls_token(tower) -> bool:
    """Whether a LLaVA tower's sequence starts with a CLS token: ours says by its family; LLaVA's own is a CLIP."""
    family = getattr(tower, "family", None)
    return family.has_cls_token if isinstance(family, Family) else family_named(DEFAULT_FAMILY).has_cls_token


@runtime_checkable
class LlavaVisionTower(Protocol):
    """What LLaVA's model, builder and training code use of a vision tower.

    Callers also rely on `nn.Module` behaviour (`.to(device, dtype)`, `requires_grad_`), and on
    `image_processor` having `image_mean`, `crop_size['height']`, `size['shortest_edge']` and
    `preprocess(images, return_tensors='pt')['pixel_values']`. LLaVA-NeXT's anyres code also reads
    `image_size`, which llava-torch's own tower lacks, so it is not part of this protocol;
    `CLIPMoEVisionTower` has it.
    """

    is_loaded: bool
    vision_tower_name: str
    select_layer: int
    select_feature: str
    image_processor: Any

    def load_model(self, device_map=None) -> None: ...

    def feature_select(self, image_forward_outs) -> torch.Tensor: ...

    def forward(self, images): ...

    @property
    def dummy_feature(self) -> torch.Tensor: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def config(self) -> PretrainedConfig: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def num_patches_per_side(self) -> int: ...

    @property
    def num_patches(self) -> int: ...


def s2_problem(config: Any) -> str | None:
    """Why a LLaVA config (object or dict) asking for LLaVA's S2 multi-scale tower cannot have it; None without `s2`.

    LLaVA's `CLIPVisionTowerS2` runs the tower at every `s2_scales` resolution through the `s2wrapper` package and
    concatenates the features (hidden size x number of scales). Neither `s2wrapper` nor that class is installed
    (llava-torch 1.2.2.post1's builder has no S2 branch and would build a single-scale tower), so a tower built
    here would silently give single-scale features to a projector that expects the scales' multiple.
    """
    s2 = config.get("s2") if isinstance(config, dict) else getattr(config, "s2", None)
    if not s2:
        return None
    scales = config.get("s2_scales") if isinstance(config, dict) else getattr(config, "s2_scales", None)
    return (f"s2 is set (LLaVA's multi-scale S2 tower, s2_scales {scales!r}), which this toolkit does not build: "
            "it needs the s2wrapper package and LLaVA's CLIPVisionTowerS2, neither installed here, and the tower "
            "would give single-scale features; set s2 to false in the LLaVA config (and retrain the projector if it "
            "was trained on S2 features)")


def check_single_scale(config: Any) -> None:
    """Raise UserError (one line) when a LLaVA config asks for the S2 multi-scale tower (see `s2_problem`)."""
    problem = s2_problem(config)
    if problem:
        raise UserError(problem)


class CLIPMoEVisionTower(nn.Module):
    """A LLaVA vision tower (`llava`'s `CLIPVisionTower` interface) over a MoE encoder (CLIP-MoE, SigLIP-MoE, ...)
    or a dense CLIP / SigLIP.

    vision_tower: a MoE directory of a registered family (full or vision-only), a dense directory of a registered
        family (a SigLIP loads as `SiglipVisionModel`), or anything else LLaVA's own tower accepts (a dense CLIP
        directory or hub id), which then loads exactly as LLaVA loads it. A family without square images (SigLIP2's
        naflex tower) is refused in one line.
    args: LLaVA's model config or training arguments: `mm_vision_select_layer` (an index into the
        L + 1 hidden states, -2 = the penultimate block), `mm_vision_select_feature` ('patch' drops
        the CLS token of a family that has one, 'cls_patch' keeps it), `unfreeze_mm_vision_tower`.
    delay_load: keep only the config until `load_model()` (LLaVA builds towers this way inside
        `from_pretrained` and loads the weights afterwards), unless `unfreeze_mm_vision_tower` is set.

    `s2` set in `args` (LLaVA's multi-scale S2 tower) is refused with a UserError: see `check_single_scale`.
    """

    def __init__(self, vision_tower: str, args, delay_load: bool = False):
        super().__init__()
        check_single_scale(args)
        self.is_loaded = False
        self.vision_tower_name = vision_tower
        self.select_layer = args.mm_vision_select_layer
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        if isinstance(vision_tower, (str, os.PathLike)) and (Path(vision_tower) / "config.json").is_file():
            read_config_json(vision_tower)  # a directory whose config.json is unreadable is no tower of any kind
        self.is_moe = is_moe_dir(vision_tower)
        self.family = tower_family(vision_tower)
        if not delay_load or getattr(args, "unfreeze_mm_vision_tower", False):
            self.load_model()
        elif self.is_moe:
            self.cfg_only = clip_moe_config(vision_tower, self._config_class)
        else:
            self.cfg_only = self._config_class.from_pretrained(vision_tower)
        if not self.is_loaded:
            self._check_square_images(self.cfg_only)

    def _check_square_images(self, config: PretrainedConfig) -> None:
        problem = square_images_problem(self.vision_tower_name, self.family.label(self.is_moe), config)
        if problem:
            raise UserError(problem)

    @property
    def _config_class(self) -> type[PretrainedConfig]:
        return self.family.moe_configs["vision"] if self.is_moe else self.family.dense_vision_config

    @property
    def _model_class(self) -> type[PreTrainedModel]:
        return self.family.moe_models["vision"] if self.is_moe else self.family.dense_vision_model

    def load_model(self, device_map=None) -> None:
        """Load the image processor and the frozen vision model (a second call does nothing, as in LLaVA)."""
        if self.is_loaded:
            logger.warning("%s is already loaded; load_model called again, skipping", self.vision_tower_name)
            return
        if self.is_moe:  # validated: a damaged directory is one UserError line, never a tower with random weights
            self.vision_tower = load_clip_moe(self.vision_tower_name, self._model_class, device_map=device_map)
            self._check_square_images(self.vision_tower.config)
            self.image_processor = load_tower_image_processor(self.vision_tower_name, self.family,
                                                              self.vision_tower.config.image_size)
        else:  # a CLIP exactly as LLaVA's own tower loads it; another family by its own classes
            self.image_processor = self.family.image_processor.from_pretrained(self.vision_tower_name)
            self.vision_tower = self._model_class.from_pretrained(self.vision_tower_name, device_map=device_map)
            self._check_square_images(self.vision_tower.config)
            if "shortest_edge" not in self.image_processor.size:  # SigLIP's squash resize: see with_llava_attributes
                self.image_processor = with_llava_attributes(self.image_processor, self.vision_tower.config.image_size,
                                                             f"{self.vision_tower_name}'s image processor")
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    def feature_select(self, image_forward_outs) -> torch.Tensor:
        """hidden_states[select_layer] [B, 1 + N, D] (a family with a CLS token; [B, N, D] without);
        'patch' -> [B, N, D] (the CLS token dropped), 'cls_patch' -> all tokens."""
        features = image_forward_outs.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            return features[:, 1:] if self.family.has_cls_token else features
        if self.select_feature == "cls_patch":
            return features
        raise ValueError(f"Unexpected select feature: {self.select_feature!r}; expected one of {SELECT_FEATURES}")

    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """A batch [B, C, H, W] -> [B, N, D]; a list of [C, H, W] -> a list of [1, N, D].

        Inputs are cast to the tower's device and dtype, features back to each input's dtype. Runs
        without autograd while the tower is frozen (LLaVA's behaviour); a tower whose parameters were
        made trainable with `requires_grad_(True)` gets gradients.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._is_trainable()):
            if isinstance(images, list):
                return [self._encode(image.unsqueeze(0)) for image in images]
            return self._encode(images)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        # return_dict=True: a config saved with return_dict=False must not turn the output into a tuple here.
        # output_hidden_states=[select_layer]: only that state is kept (the others are None, the tuple still
        # indexes by layer), for CLIP-MoE and transformers' CLIP alike.
        outs = self.vision_tower(images.to(device=self.device, dtype=self.dtype),
                                 output_hidden_states=[self.select_layer], return_dict=True)
        return self.feature_select(outs).to(images.dtype)

    def _is_trainable(self) -> bool:
        return any(p.requires_grad for p in self.vision_tower.parameters())

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device

    @property
    def config(self) -> PretrainedConfig:
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def image_size(self) -> int:
        """The side of the square crops the tower takes (LLaVA-NeXT's anyres code reads it off the tower)."""
        return self.config.image_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2
