"""Load a LLaVA checkpoint for evaluation: a full model, or a stage-1 projector over its base LLM; any tower, any dtype.

This does what `llava.model.builder.load_pretrained_model` does for LLaVA-Llama checkpoints (config, weights,
projector over `model_base`, tokenizer with LLaVA's image tokens, tower loaded from its own directory), but not
what makes that function unfit for benchmarking here: it always loads fp16 (slow and lossy on a CPU), builds a
multimodal model only when the directory name contains 'llava', cannot point a checkpoint at another tower
without editing config.json, and loads `mm_projector.bin` with `strict=False`, so a wrong file loads silently.
Everything that can be checked without loading weights is checked first, with one-line errors.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from encoder.utils.errors import UserError, first_line
from encoder.weight_files import ORDER, weights_entry

from .checks import tower_problems
from .config import LlavaCheckpointConfig, read_llava_config
from .hook import install_llava_hook
from .tower_info import TowerInfo, read_tower, tower_kinds

WEIGHT_FILES = ORDER  # what from_pretrained looks for, in its order
PROJECTOR_FILE = "mm_projector.bin"
PROJECTOR_PREFIX = "model.mm_projector."
TOWER_PREFIX = "model.vision_tower."  # tower weights saved inside a LLaVA checkpoint; the tower loads from its own dir
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")  # a Hugging Face hub id: owner/name
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class CheckpointPlan:
    """What will be loaded, decided from the files alone."""

    config: LlavaCheckpointConfig  # with the tower override applied
    tower: TowerInfo
    weights_dir: Path  # the checkpoint itself, or model_base for a projector-only checkpoint
    projector_file: Path | None  # mm_projector.bin to load over weights_dir, or None for a full checkpoint
    tokenizer_dir: Path

    @property
    def kind(self) -> str:
        return "projector-only (stage 1) over model_base" if self.projector_file else "full"


@dataclass
class LoadedLlava:
    model: torch.nn.Module  # LlavaLlamaForCausalLM, eval mode, on its device and dtype
    tokenizer: object
    image_processor: object
    plan: CheckpointPlan


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """'auto' (or None): fp32 on a CPU, fp16 on a GPU (LLaVA's evaluation precision); else a named dtype."""
    if name in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in DTYPES:
        raise UserError(f"dtype={name} not understood; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def plan_checkpoint(pretrained: str | Path, model_base: str | Path | None = None,
                    vision_tower: str | Path | None = None) -> CheckpointPlan:
    """Check a checkpoint, its tower and its base LLM from their files; UserError naming the fix when they do not fit.

    vision_tower: a tower directory (`tower_kinds`) that replaces the checkpoint's `mm_vision_tower` for this load
        only (config.json is not touched).
    """
    config = read_llava_config(local_dir(pretrained, "checkpoint", "pretrained=DIR, a LLaVA checkpoint directory"))
    if vision_tower is not None:
        if not Path(vision_tower).is_dir():
            raise UserError(f"vision_tower={vision_tower} is not a directory; pass a {tower_kinds()} directory")
        config = config.with_values(mm_vision_tower=str(Path(vision_tower).resolve()))
    try:
        tower = read_tower(config.vision_tower)
    except UserError as err:
        raise UserError(f"{config.config_path}: {err}, or override it with vision_tower=DIR") from None
    problems = tower_problems(config, tower)
    if problems:
        raise UserError(f"{config.directory} does not fit its tower {tower.path}: " + "; ".join(problems))
    directory = config.directory
    has_weights = weights_entry(directory) is not None
    projector = directory / PROJECTOR_FILE
    if model_base is None:
        if not has_weights:
            hint = (f"it holds only {PROJECTOR_FILE} (a stage-1 output): pass model_base=LLM_DIR, the language model "
                    "it was trained on" if projector.is_file() else f"expected one of {', '.join(WEIGHT_FILES)}")
            raise UserError(f"{directory} has no model weights; {hint}")
        return CheckpointPlan(config, tower, directory, None, directory)
    if not projector.is_file():
        raise UserError(f"model_base={model_base} is given but {directory} has no {PROJECTOR_FILE} to load over it; "
                        "drop model_base for a full checkpoint")
    base = local_dir(model_base, "model_base", "model_base=LLM_DIR, the language model the projector was trained on")
    if weights_entry(base) is None:
        raise UserError(f"model_base={model_base} holds no language model weights ({', '.join(WEIGHT_FILES)}); "
                        "pass the LLM directory the projector was trained on")
    tokenizer_dir = directory if (directory / "tokenizer_config.json").is_file() else base
    return CheckpointPlan(config, tower, base, projector, tokenizer_dir)


def local_dir(name: str | Path, what: str, fix: str) -> Path:
    """`name` as a local directory: itself, or the snapshot of the Hugging Face hub repo `name` (fetched unless
    offline; from the cache when offline)."""
    path = Path(name)
    if path.exists():
        return path
    if not REPO_ID.fullmatch(str(name)):
        raise UserError(f"{what} {name} does not exist; pass {fix}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name)))
    except (OSError, ValueError) as err:  # offline and not cached, no such repo, no access
        raise UserError(f"{what} {name} is neither a directory nor a hub repo available here ({first_line(err)}); "
                        f"pass {fix}") from None


def load_llava(plan: CheckpointPlan, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedLlava:
    """Build the model of `plan` on `device` in `dtype`, with its tokenizer and the tower's image processor."""
    install_llava_hook()  # before llava is imported, in case the start-up hook is switched off
    from llava.model.language_model.llava_llama import (
        LlavaConfig,
        LlavaLlamaForCausalLM,
    )
    from transformers import AutoTokenizer

    device = torch.device(device)
    hf_config = LlavaConfig.from_pretrained(plan.config.directory)
    hf_config.mm_vision_tower = plan.config.vision_tower
    with quiet_transformers():
        model, info = LlavaLlamaForCausalLM.from_pretrained(
            plan.weights_dir, config=hf_config, dtype=dtype, output_loading_info=True)
    _check_loaded_keys(plan, info)
    if plan.projector_file is not None:
        _load_projector(model, plan.projector_file)
    tokenizer = AutoTokenizer.from_pretrained(plan.tokenizer_dir, use_fast=False)
    _add_image_tokens(model, tokenizer)
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        with quiet_transformers():
            tower.load_model()
    model.to(device=device, dtype=dtype).eval()
    return LoadedLlava(model, tokenizer, tower.image_processor, plan)


def _check_loaded_keys(plan: CheckpointPlan, info: dict) -> None:
    allowed_missing = PROJECTOR_PREFIX if plan.projector_file is not None else None
    missing = [k for k in info.get("missing_keys", ()) if not (allowed_missing and k.startswith(allowed_missing))]
    if missing:
        raise UserError(f"{plan.weights_dir} lacks {len(missing)} weights of the LLaVA model (e.g. {min(missing)}); "
                        "pass the checkpoint (or model_base) that matches config.json")
    unexpected = [k for k in info.get("unexpected_keys", ()) if not k.startswith(TOWER_PREFIX)]
    if unexpected:
        raise UserError(f"{plan.weights_dir} holds {len(unexpected)} weights the LLaVA model has no place for "
                        f"(e.g. {min(unexpected)}); is it a checkpoint of another architecture?")


def _load_projector(model, path: Path) -> None:
    """Load a stage-1 `mm_projector.bin` ({'model.mm_projector.0.weight': ...}) strictly into the projector."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    foreign = [k for k in state if not k.startswith(PROJECTOR_PREFIX)]
    if foreign:
        raise UserError(f"{path} holds keys outside {PROJECTOR_PREFIX}* (e.g. {foreign[0]}); "
                        "it is not a LLaVA stage-1 projector file")
    projector = model.get_model().mm_projector
    state = {k[len(PROJECTOR_PREFIX):]: v for k, v in state.items()}
    try:
        projector.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UserError(f"{path} does not fit the projector that config.json describes ({first_line(err)})") from None


def _add_image_tokens(model, tokenizer) -> None:
    # LLaVA's loader adds these tokens when the config asks for them (note its default True for the patch token).
    from llava.constants import (
        DEFAULT_IM_END_TOKEN,
        DEFAULT_IM_START_TOKEN,
        DEFAULT_IMAGE_PATCH_TOKEN,
    )

    if getattr(model.config, "mm_use_im_patch_token", True):
        tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
    if getattr(model.config, "mm_use_im_start_end", False):
        tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    if len(tokenizer) != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


@contextlib.contextmanager
def quiet_transformers():
    """transformers prints a load report for the tower weights a LLaVA checkpoint carries but never uses; the keys
    that matter are checked by `_check_loaded_keys` instead."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
