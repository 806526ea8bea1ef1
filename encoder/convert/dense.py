"""Loading a dense base of any registered family (CLIP, SigLIP, SigLIP2) from wherever users keep one, as
transformers' model of its family (`CLIPModel`, `SiglipModel`, `Siglip2Model`).

Accepted specs: a transformers directory of a family's full dense model, a hub id (where a network exists), or
`open_clip:MODEL_NAME[:CHECKPOINT_FILE]` (converted to the transformers layout: a CLIP, or a `SiglipModel` for
open_clip's SigLIPs). The family's classes come from `encoder.family` (`Family.dense_configs` / `dense_models`).

`load_dense_clip` builds the model in memory; `open_dense_clip` opens a base for streaming (config and
preprocessing now, weights one tensor at a time), which is what real-size upcycling needs.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPImageProcessor,
    PretrainedConfig,
    PreTrainedModel,
)

from ..family import (
    Family,
    FamilyMatch,
    UnknownFamily,
    families,
    family_of,
    find_family,
    read_model_type,
)
from ..tensor_stream import (
    CheckpointError,
    SafetensorsCheckpoint,
    StateDictSource,
    TensorSource,
)
from ..utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ..utils.errors import UserError, first_line

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "spiece.model", "tokenizer.model")
JSON_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "special_tokens_map.json")
PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclass
class DenseCLIP:
    """A dense base (a `CLIPModel`, `SiglipModel`, ...: the family's full model) and what preprocesses its inputs."""

    model: PreTrainedModel
    image_processor: object  # the family's image processor (CLIPImageProcessor, SiglipImageProcessor, ...)
    tokenizer: object | None  # a transformers tokenizer, or None when the base ships none
    source: str


@dataclass
class DenseCLIPSource:
    """A dense base opened for streaming: config and preprocessing, and its weights one tensor at a time.

    `tensors` reads a transformers directory's safetensors lazily; for bases that only exist in memory
    (open_clip conversions, hub ids, `pytorch_model.bin` directories) it is the loaded model's state dict
    and `model` is that model. `dtype` is the dtype the family's `from_pretrained` would load the weights in.
    """

    config: PretrainedConfig
    dtype: torch.dtype
    tensors: TensorSource
    image_processor: object
    tokenizer: object | None
    source: str
    model: PreTrainedModel | None = None

    @property
    def family(self) -> Family:
        return family_of(self.config).family

    @property
    def streamed(self) -> bool:
        return self.model is None

    def close(self) -> None:
        self.tensors.close()


def default_image_processor(image_size: int) -> CLIPImageProcessor:
    """OpenAI CLIP preprocessing at `image_size`: bicubic shortest-edge resize, center crop, OpenAI mean/std."""
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        resample=3,
    )


def default_processor_for(config: PretrainedConfig):
    """The preprocessing a base of `config`'s family gets when it ships none: OpenAI CLIP's for a CLIP
    (`default_image_processor`), else the family's image processor at the model's size (SigLIP: a square resize
    with mean/std 0.5, transformers' defaults; SigLIP2: patches of the model's patch size, up to its position
    table's count)."""
    family = family_of(config).family
    vision = getattr(config, "vision_config", config)
    if family.image_processor is None or family.image_processor is CLIPImageProcessor:
        return default_image_processor(vision.image_size)
    if hasattr(vision, "image_size"):
        return family.image_processor(size={"height": vision.image_size, "width": vision.image_size})
    return family.image_processor(patch_size=vision.patch_size, max_num_patches=vision.num_patches)


def load_dense_clip(spec: str | PreTrainedModel) -> DenseCLIP:
    """Load a dense base of any family from a directory, hub id, `open_clip:` spec, or take a model (the full dense
    model of a family: `CLIPModel`, `SiglipModel`, `Siglip2Model`) as is."""
    if isinstance(spec, PreTrainedModel):
        _dense_match(spec.config, f"in-memory {type(spec).__name__}")
        return DenseCLIP(spec.eval(), default_processor_for(spec.config), None, f"in-memory {type(spec).__name__}")
    spec = str(spec)
    if spec.startswith("open_clip:"):
        return _load_open_clip(spec)
    path = Path(spec)
    if path.exists():
        return _load_directory(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _load_hub(spec)
    raise UserError(
        f"CLIP {spec!r} not found: give a transformers CLIP directory, a hub id, or open_clip:MODEL_NAME[:CHECKPOINT]"
    )


def open_dense_clip(spec: str | PreTrainedModel) -> DenseCLIPSource:
    """A dense base for streaming: read lazily from a transformers directory with safetensors weights, else
    (open_clip, hub id, .bin weights, an in-memory model) loaded with `load_dense_clip` and seen tensor-wise."""
    path = Path(str(spec)) if not isinstance(spec, PreTrainedModel) else None
    if path is not None and not str(spec).startswith("open_clip:") and path.exists():
        _check_clip_directory(path)
        if SafetensorsCheckpoint.exists(path):
            return _open_directory(path)
    dense = load_dense_clip(spec)
    return DenseCLIPSource(dense.model.config, next(dense.model.parameters()).dtype,
                           StateDictSource(dense.model.state_dict()), dense.image_processor, dense.tokenizer,
                           dense.source, dense.model)


def _load_open_clip(spec: str) -> DenseCLIP:
    """`open_clip:NAME[:CKPT]` through the converter of what NAME's config is: a SigLIP (`logit_bias`, timm tower)
    becomes a `SiglipModel` with its SiglipImageProcessor and SiglipTokenizer (refused without its tokenizer),
    anything else a `CLIPModel` (`encoder.convert.open_clip`, which says what it cannot convert)."""
    from .open_clip import LOCAL_DIR, load_open_clip, parse_open_clip_spec
    from .open_clip_siglip import is_open_clip_siglip, load_open_clip_siglip

    name, _ = parse_open_clip_spec(spec)
    cfg = None
    if not name.startswith(LOCAL_DIR) or Path(name[len(LOCAL_DIR):], "open_clip_config.json").is_file():
        import open_clip

        cfg = open_clip.get_model_config(name)
    loader = load_open_clip_siglip if cfg is not None and is_open_clip_siglip(cfg) else load_open_clip
    oc = loader(spec)
    return DenseCLIP(oc.model, oc.image_processor, oc.tokenizer, spec)


def _dense_match(config, where) -> FamilyMatch:
    """The family of a dense full model's config; UserError (UnknownFamily for a model_type of no family) for a MoE
    model, one tower, or a family whose dense classes are not declared."""
    match = find_family(config)
    if match is None:
        labels = [family.label(False) for family in families()]
        names = ", ".join(labels[:-1]) + " or " + labels[-1] if len(labels) > 1 else "".join(labels)
        raise UnknownFamily(f"{where} is a {read_model_type(config)!r} model, not a {names} (the model families this "
                            "toolkit knows); give a directory or hub id of one of those")
    if match.is_moe:
        raise UserError(f"base {where} is already a {match.label}; give the dense {match.family.label(False)} it came "
                        "from")
    if "model" not in match.family.dense_models:
        raise UserError(f"{where} is a {match.family.label(False)}, a family that declares no dense classes to upcycle "
                        "from (Family.dense_models)")
    if match.kind != "model":
        raise UserError(f"{where} is a {match.model_type!r} model ({match.family.label(False)} {match.kind} tower "
                        f"only), not a full {match.family.label(False)}; give a directory with both towers")
    return match


def _dense_config(path: Path) -> PretrainedConfig:
    """The directory's dense config (its family's class), checked against its weights' shapes (safetensors
    headers only)."""
    from ..model_dir import build_config, check_weights
    from ..moe_config import check_forward_fields

    family = find_family(path).family
    config_class, model_class = family.dense_configs["model"], family.dense_models["model"]
    config = build_config(path / "config.json", None, lambda: config_class.from_pretrained(path))
    for key in ("vision_config", "text_config"):  # what the MoE config will refuse, said of the base
        build_config(path / "config.json", key, lambda k=key: check_forward_fields(getattr(config, k)))
    check_weights(path, config, model_class)
    return config


def _open_directory(path: Path) -> DenseCLIPSource:
    config = _dense_config(path)
    label = find_family(path).family.label(False)
    try:
        tensors = SafetensorsCheckpoint(path)
    except (OSError, CheckpointError) as err:
        raise UserError(f"{path}: the {label} weights cannot be loaded ("
                        f"{first_line(err, with_type=True)[:200]}); re-save or re-download the model") from None
    dtype = load_dtype(config, tensors)
    config.dtype = dtype  # recorded on the config and both tower configs, as from_pretrained does (it ends up
    for sub in config.sub_configs:  # in the MoE's config.json, which must not depend on the path taken)
        if getattr(config, sub, None) is not None:
            getattr(config, sub).dtype = dtype
    return DenseCLIPSource(config, dtype, tensors, image_processor_for(path, config), tokenizer_for(path), str(path))


def load_dtype(config: PretrainedConfig, tensors: TensorSource) -> torch.dtype:
    """The dtype `from_pretrained` (dtype="auto", transformers' default) gives the model: the config's `dtype`,
    else that of the checkpoint's first floating-point tensor (by name)."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for name in sorted(tensors.keys()):
        if tensors.spec(name).dtype.is_floating_point:
            return tensors.spec(name).dtype
    return torch.get_default_dtype()


def _check_clip_directory(path: Path) -> FamilyMatch:
    """The user errors of a directory that is not a dense transformers model of a family (a full CLIP, SigLIP,
    SigLIP2), before any weight is read; its family otherwise."""
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.is_file():
        raise UserError(f"{path} is not a model directory (no config.json): give a transformers CLIP directory")
    try:
        json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise UserError(f"{path}/config.json is not valid JSON ({err}); re-save the model") from None
    return _dense_match(path, str(path))


def _load_directory(path: Path) -> DenseCLIP:
    match = _check_clip_directory(path)
    _dense_config(path)
    label = match.family.label(False)
    try:
        model = match.family.dense_models["model"].from_pretrained(path).eval()
    except (OSError, RuntimeError, ValueError, SafetensorError) as err:  # missing/corrupt weights, wrong shapes
        raise UserError(f"{path}: the {label} weights cannot be loaded ("
                        f"{first_line(err, with_type=True)[:200]}); re-save or re-download the model") from None
    return DenseCLIP(model, image_processor_for(path, model.config), tokenizer_for(path), str(path))


def _load_hub(repo_id: str) -> DenseCLIP:
    """A hub id, read as CLIP ids always were: its config first (any family's, by model_type), then its model."""
    try:
        config = AutoConfig.from_pretrained(repo_id)
    except (OSError, ValueError) as err:
        raise UserError(
            f"{repo_id!r} is neither a local directory nor loadable from the hub ({type(err).__name__}); "
            "download it first and pass its directory"
        ) from None
    match = _dense_match(config, repr(repo_id))
    try:
        model = match.family.dense_models["model"].from_pretrained(repo_id).eval()
    except (OSError, ValueError) as err:
        raise UserError(
            f"{repo_id!r} is neither a local directory nor loadable from the hub ({type(err).__name__}); "
            "download it first and pass its directory"
        ) from None
    return DenseCLIP(model, image_processor_for(repo_id, config), tokenizer_for(repo_id), repo_id)


def image_processor_for(source, config: PretrainedConfig):
    """The image processor saved with `source` (the class of the config's family: CLIPImageProcessor,
    SiglipImageProcessor, ...); the family's default preprocessing at the model's image size when it has none (a
    directory without preprocessor_config.json, a hub id without one: `default_processor_for`).

    A preprocessor_config.json that is present but unreadable is refused: the default in its place would give
    the model other inputs than it was trained on, and a MoE upcycled from it would keep that default.
    """
    directory = _local_directory(source)
    processor_class = _processor_class(config)
    image_size = getattr(config.vision_config, "image_size", None)
    if directory is not None and not (directory / PREPROCESSOR_FILE).is_file():
        logger.info("%s has no %s; using the default preprocessing", source, PREPROCESSOR_FILE)
        return default_processor_for(config)
    if directory is not None:
        return load_image_processor(directory, image_size, processor_class)
    try:
        processor = processor_class.from_pretrained(source)
    except OSError:
        logger.info("%s has no %s; using the default preprocessing", source, PREPROCESSOR_FILE)
        return default_processor_for(config)
    problem = image_size_problem(processor, image_size) if image_size is not None else None
    if problem:
        raise UserError(f"{source}: its image processor's {problem} in a local copy of it")
    return processor


def _processor_class(config: PretrainedConfig) -> type:
    """The image processor class of `config`'s family (dense or MoE); CLIP's for a config of no family."""
    match = find_family(config)
    return (match.family.image_processor if match is not None else None) or CLIPImageProcessor


def load_image_processor(directory: str | Path, image_size: int | None = None,
                         processor_class: type = CLIPImageProcessor):
    """DIR/preprocessor_config.json as a `processor_class` (a CLIP image processor by default); UserError naming the
    file when it is missing, not JSON, or holds values no preprocessing can use (a mean/std that is not 3 numbers,
    a std of 0, ...), or, given the model's `image_size`, images of another size (they would fail the model's first
    forward)."""
    file = Path(directory) / PREPROCESSOR_FILE
    fix = f"restore {file.name} from the model's source or re-save the model's image processor"
    if not file.is_file():
        raise UserError(f"{directory} has no {PREPROCESSOR_FILE}; {fix}")
    _read_json_object(file, fix)
    try:
        processor = processor_class.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001 - whatever the processor's own checks raise, it is this file's content
        raise UserError(f"{file} is not a usable image processor config ("
                        f"{first_line(err, with_type=True)}); {fix}") from None
    problem = _processor_problem(processor)
    if problem:
        raise UserError(f"{file}: {problem}; {fix}")
    problem = image_size_problem(processor, image_size) if image_size is not None else None
    if problem:
        raise UserError(f"{file}: {problem} in {file.name}, or re-save the model's image processor")
    return processor


def image_size_problem(processor, image_size: int) -> str | None:
    """What makes `processor`'s images other than `image_size` x `image_size` (what the model's position embeddings
    take), or None. For a CLIP processor `crop_size` counts even when it does not crop: LLaVA's training makes the
    blank image of a text-only sample at crop_size. Without a crop, `size` is the output: height x width, or a
    shortest edge (square images only) that must be image_size. A processor with no crop at all (SigLIP's) is
    judged by its `size`."""
    if not isinstance(processor, CLIPImageProcessor) and getattr(processor, "crop_size", None) is None:
        size = _size_values(processor.size)
        if (size.get("height"), size.get("width")) != (image_size, image_size):
            return (f"size is {size} but the model takes {image_size}x{image_size} images (vision_config.image_size); "
                    f"set size to {{\"height\": {image_size}, \"width\": {image_size}}}")
        return None
    crop = _size_values(processor.crop_size)
    if (crop.get("height"), crop.get("width")) != (image_size, image_size):
        shown = f"{crop.get('height')}x{crop.get('width')}" if crop else "unset"
        return (f"crop_size is {shown} but the model takes {image_size}x{image_size} images (vision_config."
                f"image_size); set crop_size to {{\"height\": {image_size}, \"width\": {image_size}}}")
    if processor.do_center_crop:
        return None
    size = _size_values(processor.size)
    out = (size.get("shortest_edge"),) * 2 if "shortest_edge" in size else (size.get("height"), size.get("width"))
    if out != (image_size, image_size):
        return (f"do_center_crop is false and size is {size}, which gives no {image_size}x{image_size} images (the "
                f"model's vision_config.image_size); set do_center_crop to true or size to {{\"height\": "
                f"{image_size}, \"width\": {image_size}}}")
    return None


def _size_values(size) -> dict:
    """A processor's size or crop_size (a dict, transformers' SizeDict, or None) as a dict of the values set."""
    return {k: v for k, v in dict(size).items() if v is not None} if size is not None else {}


def _processor_problem(processor) -> str | None:
    for name in ("image_mean", "image_std"):
        values = getattr(processor, name, None)
        numbers = isinstance(values, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if not numbers or len(values) != 3:
            return f"{name} is {values!r}, not 3 finite numbers (one per RGB channel)"
    if any(v <= 0 for v in processor.image_std):
        return f"image_std {list(processor.image_std)} has a value <= 0 (the pixels are divided by it)"
    sizes = {"size": processor.size, "crop_size": processor.crop_size if getattr(processor, "do_center_crop", False)
             else None}
    for name, size in sizes.items():
        if size is None:
            continue
        try:
            values = {k: v for k, v in dict(size).items() if v is not None}  # a dict, or transformers' SizeDict
        except (TypeError, ValueError):
            values = {}
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values.values()):
            return f"{name} is {size!r}, not positive pixel counts"
    return None


def tokenizer_for(source):
    """The tokenizer saved with `source`, or None when it ships none (a directory without tokenizer files).

    Tokenizer files that are present but unreadable are refused, not taken as "no tokenizer": the commands would
    go on without one (a CLIP-MoE upcycled from such a base would be written without its tokenizer).
    """
    directory = _local_directory(source)
    if directory is None:
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):
            logger.info("%s has no usable tokenizer files; the CLIP-MoE directory will have none", source)
            return None
    present = [name for name in TOKENIZER_FILES if (directory / name).exists()]
    if not present:
        return None
    fix = "restore the tokenizer files from the model's source (or remove them all to go on without a tokenizer)"
    for name in JSON_TOKENIZER_FILES:
        if (directory / name).exists():
            _read_json_object(directory / name, fix)
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001 - tokenizers raises bare Exceptions for files it cannot parse
        raise UserError(f"{directory}: the tokenizer ({', '.join(present)}) cannot be loaded ("
                        f"{first_line(err, with_type=True)[:200]}); {fix}") from None


def _local_directory(source) -> Path | None:
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return Path(source)
    return None


def _read_json_object(file: Path, fix: str) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({first_line(err, with_type=True)}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


