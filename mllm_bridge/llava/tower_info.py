"""What a LLaVA checkpoint needs to know about a vision tower, read from its directory without loading weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import PretrainedConfig

from encoder.family import Family, families, family_named, find_family, read_model_type
from encoder.image_processors import load_tower_image_processor
from encoder.model_dir import check_clip_moe_dir, read_config_json
from encoder.tower import square_images_problem, tower_family
from encoder.utils.errors import UserError, first_line

TOWER_KINDS = ("model", "vision")  # a full model or a vision tower's export: what LLaVA may take as its tower


@dataclass(frozen=True)
class ImageProcessorInfo:
    """The fields of a tower's image processor that LLaVA's preprocessing uses (a CLIP's resizes the shortest edge,
    a SigLIP's squashes every image to `resize_to`, height x width)."""

    shortest_edge: int | None
    crop_height: int
    crop_width: int
    image_mean: list[float]
    image_std: list[float]
    resize_to: tuple[int, int] | None = None

    def describe(self) -> str:
        resize = (f"shortest edge {self.shortest_edge}" if self.resize_to is None
                  else f"resize to {self.resize_to[0]}x{self.resize_to[1]}")
        return (f"{resize}, crop {self.crop_height}x{self.crop_width}, "
                f"mean {_rounded(self.image_mean)}, std {_rounded(self.image_std)}")


@dataclass(frozen=True)
class TowerInfo:
    """A vision tower of a registered family (CLIP, CLIP-MoE, SigLIP, SigLIP-MoE, ...) as LLaVA will see it."""

    path: str
    is_moe: bool
    hidden_size: int
    num_layers: int
    image_size: int
    patch_size: int
    num_experts: int = 1
    top_k: int = 1
    moe_layers: list[int] = field(default_factory=list)
    processor: ImageProcessorInfo | None = None  # None: the directory has no preprocessor_config.json
    family: str = "clip"  # the `encoder.family` name

    @property
    def kind(self) -> str:
        """"CLIP-MoE", "CLIP", ...: the family's name for a MoE or dense model."""
        return family_named(self.family).label(self.is_moe)

    @property
    def has_cls_token(self) -> bool:
        """Whether the tower's sequence starts with a CLS token ('cls_patch' keeps it; a SigLIP has none)."""
        return family_named(self.family).has_cls_token

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2

    def moe_layout(self) -> str:
        if not self.moe_layers:
            return f"dense ({self.num_layers} layers, no MoE layers)"
        return (f"top-{self.top_k} of {self.num_experts} experts in layers {self.moe_layers} "
                f"of {self.num_layers}")


def read_tower(name: str | Path) -> TowerInfo:
    """Describe the tower `name` (see `tower_kinds`): a directory (a full model or a vision-only export) or
    a hub id already in the local Hugging Face cache.

    Raises UserError when `name` is neither, or holds another kind of model.
    """
    model_type = _model_type(name)
    match = find_family({"model_type": model_type})
    if match is None or match.kind not in TOWER_KINDS or not _has_tower_classes(match.family, match.is_moe):
        labels, types = _towers_known()
        raise UserError(f"{name} holds a {model_type!r} model, not a vision tower; pass a {' or '.join(labels)} "
                        f"directory (model_type one of {', '.join(types)})")
    family, is_moe = match.family, match.is_moe
    try:
        if is_moe:  # the checks of the tower's own loader: a damaged directory is refused here, as it would be there
            config = check_clip_moe_dir(name, family.moe_models["vision"])
        else:
            config = family.dense_vision_config.from_pretrained(name)
        problem = square_images_problem(name, match.label, config)  # before its processor, which LLaVA cannot use
        if problem:
            raise UserError(problem)
        processor = _read_processor(name, family)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"cannot read the {model_type} tower {name} ({first_line(err)}); re-export it") from err
    moe = dict(num_experts=config.num_experts, top_k=config.top_k, moe_layers=list(config.moe_layers)) if is_moe else {}
    return TowerInfo(
        path=str(name),
        is_moe=is_moe,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        image_size=config.image_size,
        patch_size=config.patch_size,
        processor=processor,
        family=family.name,
        **moe,
    )


def _towers_known() -> tuple[list[str], list[str]]:
    """(names, model types) of what LLaVA may take as its tower: each family's full model and vision export, MoE
    and dense, where the family registered the classes they are read with and its tower takes square images (not
    SigLIP2's naflex patch sequences)."""
    labels, types = [], []
    for family in families():
        for moe, family_types in ((True, family.moe_model_types), (False, family.dense_model_types)):
            if _has_tower_classes(family, moe) and _takes_square_images(family, moe):
                labels.append(family.label(moe))
                types += family_types[:len(TOWER_KINDS)]
    return labels, types


def tower_kinds() -> str:
    """What a LLaVA tower may be, for messages and help: "CLIP-MoE, CLIP, SigLIP-MoE or SigLIP" (the registered
    families' labels)."""
    labels = _towers_known()[0]
    return " or ".join(labels) if len(labels) < 3 else f"{', '.join(labels[:-1])} or {labels[-1]}"


def _takes_square_images(family: Family, moe: bool) -> bool:
    """Whether the family's vision config has an `image_size` (LLaVA gives its tower square images of that size)."""
    config_class = family.moe_configs["vision"] if moe else family.dense_vision_config
    return "image_size" in config_class().to_dict()


def _has_tower_classes(family: Family, moe: bool) -> bool:
    """Whether the family registered the classes a (MoE or dense) tower of it is read with."""
    return "vision" in family.moe_models if moe else family.dense_vision_config is not None


def _model_type(name: str | Path) -> str | None:
    if Path(name).is_dir():
        if (Path(name) / "config.json").is_file():
            read_config_json(name)  # present but not a JSON object: the line says why
        model_type = read_model_type(name)
        if model_type is None:
            raise UserError(f"{name} is not a model directory (no readable config.json); "
                            f"pass a {tower_kinds()} directory")
        return model_type
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(str(name))
    except (OSError, ValueError) as err:
        raise UserError(f"vision tower {name} is neither a directory nor a hub id readable here "
                        f"({first_line(err)}); pass an existing {tower_kinds()} directory") from err
    return config_dict.get("model_type")


def _read_processor(name: str | Path, family: Family) -> ImageProcessorInfo | None:
    """The tower's image processor as the tower loads it (`load_tower_image_processor`: the family's own class, with
    LLaVA's attributes); None when it has none (a directory without preprocessor_config.json, or a hub id whose
    processor is not cached)."""
    if Path(name).is_dir():
        if not (Path(name) / "preprocessor_config.json").is_file():
            return None
        processor = load_tower_image_processor(name, family)
    else:
        try:
            processor = tower_family(name).image_processor.from_pretrained(name)
        except OSError:
            return None
    size = {k: v for k, v in dict(processor.size).items() if v is not None}
    return ImageProcessorInfo(
        shortest_edge=size.get("shortest_edge"),
        resize_to=(size["height"], size["width"]) if "shortest_edge" not in size and "height" in size else None,
        crop_height=processor.crop_size["height"],
        crop_width=processor.crop_size["width"],
        image_mean=list(processor.image_mean),
        image_std=list(processor.image_std),
    )


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]
