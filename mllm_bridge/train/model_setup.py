"""The LLaVA model and tokenizer of a training run, assembled and frozen as LLaVA's `train.py` does.

The tower and projector come from LLaVA's own `initialize_vision_modules` (our CLIP-MoE tower through the
hook); the tower is checked against the flags before anything large is loaded, and a stage-1 projector is
loaded with width checks instead of LLaVA's bare `load_state_dict`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from encoder.tower import CLIPMoEVisionTower
from encoder.utils.errors import UserError, first_line

from ..llava.checks import tower_problems
from ..llava.config import LlavaCheckpointConfig
from ..llava.image_tokens import ImageLayout
from ..llava.model import build_llava_model
from ..llava.tower_info import TowerInfo, read_tower
from .arguments import (
    LLM_PART,
    PROJECTOR_PART,
    TOWER_PART,
    LlavaArguments,
    trainable_parts,
    trains_tower,
)
from .projector import load_pretrained_projector

LLAMA_MODEL_TYPES = ("llama", "llava_llama")


@dataclass
class TrainingModel:
    """What the loop trains and the data set needs from it."""

    model: nn.Module  # LlavaLlamaForCausalLM, parameters frozen or trainable per the flags
    tokenizer: object
    image_processor: object  # the tower's CLIPImageProcessor
    layout: ImageLayout  # an image's pixels and the LLM positions it takes


def check_tower(args: LlavaArguments) -> TowerInfo:
    """Read the tower's config (no weights) and refuse select layers, processors or lengths that cannot work."""
    tower = read_tower(args.model.vision_tower)
    planned = _planned_config(args, tower)
    problems = tower_problems(planned, tower)
    layout = image_layout(args, tower)  # bad pinpoints or merge settings: one line, before anything is loaded
    tokens, max_length = layout.fewest_tokens(), args.training.model_max_length
    if max_length <= tokens:
        problems.append(f"--model_max_length {max_length} leaves no room for text: one image alone takes "
                        f"{'at least ' if layout.variable else ''}{tokens} tokens; raise --model_max_length")
    m = args.model
    for flag in ("balance_loss_coef", "router_z_loss_coef"):
        if getattr(m, flag) is not None and not (tower.is_moe and tower.moe_layers):
            problems.append(f"--{flag} {getattr(m, flag)} weighs a router loss, and --vision_tower {tower.path} is a "
                            f"dense {tower.kind} without routers; drop --{flag}")
    if problems:
        raise UserError("; ".join(problems))
    return tower


def image_layout(args: LlavaArguments, tower: TowerInfo) -> ImageLayout:
    """How this run turns images into pixels and tokens: --image_aspect_ratio, --image_grid_pinpoints (range form
    expanded with the tower's image size), --mm_patch_merge_type, --mm_vision_select_feature."""
    try:
        return ImageLayout.from_config({
            "image_aspect_ratio": args.data.image_aspect_ratio, "image_grid_pinpoints": args.data.image_grid_pinpoints,
            "mm_patch_merge_type": args.model.mm_patch_merge_type,
            "mm_vision_select_feature": args.model.mm_vision_select_feature}, tower.image_size, tower.patch_size,
            tower.has_cls_token)
    except UserError as err:
        raise UserError(f"--{err}") from None


def _planned_config(args: LlavaArguments, tower: TowerInfo) -> LlavaCheckpointConfig:
    """The tower-related config keys this run will write (the context is checked against the flags instead)."""
    return LlavaCheckpointConfig(Path(args.training.output_dir), {
        "mm_vision_tower": tower.path, "mm_hidden_size": tower.hidden_size,
        "mm_vision_select_layer": args.model.mm_vision_select_layer,
        "mm_vision_select_feature": args.model.mm_vision_select_feature,
    })


def load_tokenizer(args: LlavaArguments):
    """The LLM's tokenizer, right-padded with <unk> (LLaVA's choice for its v1 and plain templates)."""
    path = args.model.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=args.training.model_max_length,
                                                  padding_side="right", cache_dir=args.training.cache_dir)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer of --model_name_or_path {path} ({first_line(err)}); pass a "
                        "language model directory with its tokenizer") from None
    tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


def build_training_model(args: LlavaArguments, tower: TowerInfo, frozen_dtype: torch.dtype) -> TrainingModel:
    """LLM + tower + projector with LLaVA's config keys, the stage's parameters trainable and the rest frozen.

    frozen_dtype: dtype of modules that never train (the tower; the LLM too when only the projector
    trains), e.g. bfloat16 under --bf16 to save memory; trained weights stay float32.
    """
    m, t = args.model, args.training
    _check_language_model(m.model_name_or_path, t.cache_dir)
    tokenizer = load_tokenizer(args)
    llm_dtype = frozen_dtype if m.tune_mm_mlp_adapter else torch.float32
    torch.manual_seed(t.seed)  # the new projector's initialisation
    with _quiet_about_llava_config():
        model = build_llava_model(m.model_name_or_path, _tower_path(tower), m.mm_vision_select_layer,
                                  m.mm_vision_select_feature, m.mm_projector_type, dtype=llm_dtype,
                                  cache_dir=t.cache_dir, patch_merge_type=m.mm_patch_merge_type)
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"the tokenizer of {m.model_name_or_path} has {len(tokenizer)} tokens but the model embeds "
                        f"{model.config.vocab_size}; save the tokenizer that belongs to the model")
    if m.pretrain_mm_mlp_adapter:
        load_pretrained_projector(model, m.pretrain_mm_mlp_adapter, m.vision_tower)
    tower_trains = trains_tower(args)
    if tower_trains:
        _trainable_tower(model, m)
    vision_tower = model.get_vision_tower()
    vision_tower.to(dtype=torch.float32 if tower_trains else frozen_dtype)  # trained weights stay float32
    layout = image_layout(args, tower)
    layout.check_processor(vision_tower.image_processor)
    _record_training_config(model, args, tokenizer, layout)
    _set_trainable(model, args)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model, tower=tower_trains)
    return TrainingModel(model, tokenizer, vision_tower.image_processor, layout)


def _trainable_tower(model: nn.Module, m) -> None:
    """A tower that can train. llava-torch's own `CLIPVisionTower` (a dense CLIP) runs under `torch.no_grad()`, so
    it would never get a gradient: it is replaced by `CLIPMoEVisionTower`, which loads the same `CLIPVisionModel`
    from the same place and runs with autograd once its weights train (LLaVA-NeXT drops that no_grad too)."""
    inner = model.get_model()
    current = model.get_vision_tower()
    if isinstance(current, CLIPMoEVisionTower):
        return
    args = SimpleNamespace(mm_vision_select_layer=m.mm_vision_select_layer,
                           mm_vision_select_feature=m.mm_vision_select_feature)
    inner.vision_tower = CLIPMoEVisionTower(current.vision_tower_name, args)


def enable_gradient_checkpointing(model: nn.Module, tower: bool = False) -> None:
    """Recompute every decoder layer of the LLM in the backward pass instead of keeping its activations (LLaVA's
    `--gradient_checkpointing True`). Non-reentrant checkpointing: it needs no input that requires grad (stage 1's
    LLM is frozen) and gives the same gradients as a run without it.

    transformers 5 renamed `gradient_checkpointing_enable(gradient_checkpointing_kwargs=)` to
    `activation_checkpointing_enable(activation_checkpointing_kwargs=)`; the old name stays as a deprecated alias
    until v6, so the new one is used where it exists. The frozen tower runs without autograd, so there is nothing
    to recompute there: its layers are left unwrapped, as in LLaVA, which enables checkpointing before it adds
    the tower. A tower that trains (`tower`) keeps its layers checkpointed too.
    """
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if tower:
        return
    for module in model.get_vision_tower().modules():
        if getattr(module, "gradient_checkpointing", False):
            module.gradient_checkpointing = False


def is_gradient_checkpointing(model: nn.Module) -> bool:
    flag = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, flag))


class _quiet_about_llava_config(logging.Filter):
    """LLaVA builds `llava_llama` from a plain Llama directory by design; drop transformers' warning about it."""

    logger = logging.getLogger("transformers.configuration_utils")

    def filter(self, record: logging.LogRecord) -> bool:
        return "to instantiate a model of type `llava_llama`" not in record.getMessage()

    def __enter__(self):
        self.logger.addFilter(self)

    def __exit__(self, *exc):
        self.logger.removeFilter(self)


def _tower_path(tower: TowerInfo) -> str:
    """An absolute path for a local tower, so the saved config loads from any working directory."""
    path = Path(tower.path)
    return str(path.resolve()) if path.is_dir() else tower.path


def _check_language_model(path: str, cache_dir: str | None) -> None:
    try:
        config = AutoConfig.from_pretrained(path, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read --model_name_or_path {path} ({first_line(err)}); pass a Llama-family "
                        "language model directory (config.json, weights, tokenizer)") from None
    if config.model_type not in LLAMA_MODEL_TYPES:
        raise UserError(f"--model_name_or_path {path} is a {config.model_type!r} model; LLaVA-1.5's "
                        "LlavaLlamaForCausalLM needs a Llama-family model (Vicuna, Llama)")


def _record_training_config(model: nn.Module, args: LlavaArguments, tokenizer, layout: ImageLayout) -> None:
    """The config keys LLaVA's train.py sets, so saved outputs load and behave as LLaVA's do. The pinpoints are
    written as the list llava-torch's grid code parses (LLaVA-NeXT's range form expanded)."""
    config = model.config
    for key, value in layout.config_values().items():  # image_aspect_ratio, image_grid_pinpoints, mm_patch_merge_type
        setattr(config, key, value)
    config.tokenizer_padding_side = tokenizer.padding_side
    config.tokenizer_model_max_length = tokenizer.model_max_length
    config.architectures = [type(model).__name__]
    config.tune_mm_mlp_adapter = args.model.tune_mm_mlp_adapter
    config.freeze_mm_mlp_adapter = args.model.freeze_mm_mlp_adapter
    config.mm_use_im_start_end = False
    config.mm_use_im_patch_token = False
    config.mm_projector_lr = None
    config.mm_tunable_parts = ",".join(trainable_parts(args))  # LLaVA-NeXT records what trained
    config.mm_vision_tower_lr = args.training.mm_vision_tower_lr
    config.use_cache = False  # set back to True when saving


def _set_trainable(model: nn.Module, args: LlavaArguments) -> None:
    m = args.model
    projector = model.get_model().mm_projector
    if m.mm_tunable_parts is not None:
        _set_tunable_parts(model, trainable_parts(args))
        return
    if m.tune_mm_mlp_adapter:
        model.requires_grad_(False)
        projector.requires_grad_(True)
        return
    model.requires_grad_(True)
    model.get_vision_tower().requires_grad_(False)
    if m.freeze_backbone:
        model.get_model().requires_grad_(False)
        projector.requires_grad_(True)
        if getattr(model.get_model(), "image_newline", None) is not None:  # LLaVA adds it after freezing the LLM
            model.get_model().image_newline.requires_grad_(True)
    if m.freeze_mm_mlp_adapter:
        projector.requires_grad_(False)
    if m.unfreeze_mm_vision_tower:
        model.get_vision_tower().requires_grad_(True)
        freeze_unused_tower_parts(model.get_vision_tower())


def freeze_unused_tower_parts(tower) -> None:
    """Keep frozen what cannot reach the features LLaVA takes, hidden_states[select_layer]: the blocks after it, the
    post-layernorm and, for a SigLIP, its attention-pooling head (the pooled output's). They would get no gradient
    from the LM loss (the routers of later MoE blocks only their own balance loss, on features nobody uses), and DDP
    requires every trained weight to get one."""
    model = getattr(tower.vision_tower, "vision_model", tower.vision_tower)  # a dense vision model nests its own
    layers = model.encoder.layers
    first_unused = tower.select_layer % (len(layers) + 1)  # hidden state i is the output of block i - 1
    for layer in layers[first_unused:]:
        layer.requires_grad_(False)
    model.post_layernorm.requires_grad_(False)
    head = getattr(model, "head", None)  # SigLIP's pooling head (vision_use_head)
    if head is not None:
        head.requires_grad_(False)


def _set_tunable_parts(model: nn.Module, parts: tuple[str, ...]) -> None:
    """LLaVA-NeXT's rule for --mm_tunable_parts: everything frozen, then each named part by its weights' names (the
    language model: every weight that belongs to neither the tower nor the projector, image_newline included)."""
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        in_tower, in_projector = "vision_tower" in name, "mm_projector" in name
        if ((TOWER_PART in parts and in_tower) or (PROJECTOR_PART in parts and in_projector)
                or (LLM_PART in parts and not in_tower and not in_projector)):
            param.requires_grad_(True)
    if TOWER_PART in parts:
        freeze_unused_tower_parts(model.get_vision_tower())
