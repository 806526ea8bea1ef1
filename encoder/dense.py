"""Loading a dense CLIP base from wherever users keep one, as a transformers `CLIPModel`.

Accepted specs: a transformers CLIP directory, a hub id (where a network exists), or
`open_clip:MODEL_NAME[:CHECKPOINT_FILE]` (converted to the transformers layout).

`load_dense_clip` builds the model in memory; `open_dense_clip` opens a base for streaming (config and
preprocessing now, weights one tensor at a time), which is what real-size upcycling needs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

from .errors import UserError
from .tensor_stream import CheckpointError, SafetensorsCheckpoint, StateDictSource, TensorSource

logger = logging.getLogger(__name__)

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


@dataclass
class DenseCLIP:
    """A dense CLIP and what preprocesses its inputs."""

    model: CLIPModel
    image_processor: CLIPImageProcessor
    tokenizer: object | None  # a transformers CLIP tokenizer, or None when the base ships none
    source: str


@dataclass
class DenseCLIPSource:
    """A dense CLIP opened for streaming: config and preprocessing, and its weights one tensor at a time.

    `tensors` reads a transformers directory's safetensors lazily; for bases that only exist in memory
    (open_clip conversions, hub ids, `pytorch_model.bin` directories) it is the loaded model's state dict
    and `model` is that model. `dtype` is the dtype `CLIPModel.from_pretrained` would load the weights in.
    """

    config: CLIPConfig
    dtype: torch.dtype
    tensors: TensorSource
    image_processor: CLIPImageProcessor
    tokenizer: object | None
    source: str
    model: CLIPModel | None = None

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
        image_mean=OPENAI_MEAN,
        image_std=OPENAI_STD,
        resample=3,
    )


def load_dense_clip(spec: str | CLIPModel) -> DenseCLIP:
    """Load a dense CLIP from a directory, hub id, `open_clip:` spec, or take a `CLIPModel` as is."""
    if isinstance(spec, CLIPModel):
        size = spec.config.vision_config.image_size
        return DenseCLIP(spec.eval(), default_image_processor(size), None, "in-memory CLIPModel")
    spec = str(spec)
    if spec.startswith("open_clip:"):
        from .open_clip_convert import load_open_clip

        oc = load_open_clip(spec)
        return DenseCLIP(oc.model, oc.image_processor, oc.tokenizer, spec)
    path = Path(spec)
    if path.exists():
        return _load_directory(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _load_hub(spec)
    raise UserError(
        f"CLIP {spec!r} not found: give a transformers CLIP directory, a hub id, or open_clip:MODEL_NAME[:CHECKPOINT]"
    )


def open_dense_clip(spec: str | CLIPModel) -> DenseCLIPSource:
    """A dense CLIP for streaming: read lazily from a transformers directory with safetensors weights, else
    (open_clip, hub id, .bin weights, an in-memory model) loaded with `load_dense_clip` and seen tensor-wise."""
    path = Path(str(spec)) if not isinstance(spec, CLIPModel) else None
    if path is not None and not str(spec).startswith("open_clip:") and path.exists():
        _check_clip_directory(path)
        if SafetensorsCheckpoint.exists(path):
            return _open_directory(path)
    dense = load_dense_clip(spec)
    return DenseCLIPSource(dense.model.config, next(dense.model.parameters()).dtype,
                           StateDictSource(dense.model.state_dict()), dense.image_processor, dense.tokenizer,
                           dense.source, dense.model)


def _open_directory(path: Path) -> DenseCLIPSource:
    try:
        config = CLIPConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{path}/config.json is not a usable CLIP config ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]}); re-save the model") from None
    try:
        tensors = SafetensorsCheckpoint(path)
    except (OSError, CheckpointError) as err:
        raise UserError(f"{path}: the CLIP weights cannot be loaded ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]}); re-save or re-download the model") from None
    dtype = load_dtype(config, tensors)
    config.dtype = dtype  # recorded on the config and both tower configs, as from_pretrained does (it ends up
    for sub in config.sub_configs:  # in the CLIP-MoE's config.json, which must not depend on the path taken)
        if getattr(config, sub, None) is not None:
            getattr(config, sub).dtype = dtype
    return DenseCLIPSource(config, dtype, tensors, image_processor_for(path, config), tokenizer_for(path), str(path))


def load_dtype(config: CLIPConfig, tensors: TensorSource) -> torch.dtype:
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


def _check_clip_directory(path: Path) -> None:
    """The user errors of a directory that is not a dense transformers CLIP, before any weight is read."""
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.is_file():
        raise UserError(f"{path} is not a model directory (no config.json): give a transformers CLIP directory")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise UserError(f"{path}/config.json is not valid JSON ({err}); re-save the model") from None
    if model_type == "clip_moe":
        raise UserError(f"base {path} is already a CLIP-MoE; give the dense CLIP it came from")
    if model_type != "clip":
        raise UserError(
            f"{path} is a {model_type!r} model, not a CLIP (model_type 'clip'); give a CLIP directory"
        )


def _load_directory(path: Path) -> DenseCLIP:
    _check_clip_directory(path)
    try:
        model = CLIPModel.from_pretrained(path).eval()
    except (OSError, RuntimeError, ValueError, SafetensorError) as err:  # missing/corrupt weights, wrong shapes
        raise UserError(f"{path}: the CLIP weights cannot be loaded ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]}); re-save or re-download the model") from None
    return DenseCLIP(model, image_processor_for(path, model.config), tokenizer_for(path), str(path))


def _load_hub(repo_id: str) -> DenseCLIP:
    try:
        config = CLIPConfig.from_pretrained(repo_id)
        model = CLIPModel.from_pretrained(repo_id).eval()
    except (OSError, ValueError) as err:
        raise UserError(
            f"{repo_id!r} is neither a local directory nor loadable from the hub ({type(err).__name__}); "
            "download it first and pass its directory"
        ) from None
    return DenseCLIP(model, image_processor_for(repo_id, config), tokenizer_for(repo_id), repo_id)


def image_processor_for(source, config: CLIPConfig) -> CLIPImageProcessor:
    try:
        return CLIPImageProcessor.from_pretrained(source)
    except OSError:
        logger.info("%s has no preprocessor_config.json; using OpenAI CLIP preprocessing", source)
        return default_image_processor(config.vision_config.image_size)


def tokenizer_for(source):
    if isinstance(source, Path) and not any((source / f).exists() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        logger.info("%s has no usable tokenizer files; the CLIP-MoE directory will have none", source)
        return None
