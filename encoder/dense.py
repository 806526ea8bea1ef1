"""Loading a dense CLIP base from wherever users keep one, as a transformers `CLIPModel`.

Accepted specs: a transformers CLIP directory, a hub id (where a network exists), or
`open_clip:MODEL_NAME[:CHECKPOINT_FILE]` (converted to the transformers layout).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

from .errors import UserError

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


def _load_directory(path: Path) -> DenseCLIP:
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
