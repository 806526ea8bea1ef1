"""LLaVA's training flags (the ModelArguments / DataArguments / TrainingArguments of `llava/train/train.py`),
parsed as LLaVA's HfArgumentParser parses them: `--flag value`, booleans as `--flag True|False` or bare.

Every flag maps 1:1 to a dataclass field with LLaVA's name, typed from its annotation (so `-2` is the int -2).
Defaults are the values of LLaVA-1.5's scripts (`scripts/v1_5/pretrain.sh`, `finetune.sh`; per stage in
`stages.py`), so a LLaVA command line runs as is. Flags that LLaVA has but that change nothing here are accepted
with a one-line note (`ACCEPTED_ONLY`); values this loop cannot honour and unknown flags are errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from encoder.tower import SELECT_FEATURES
from encoder.training import lower_lr
from encoder.training.run_log import REPORT_TARGETS
from encoder.utils.errors import UserError
from encoder.utils.options import OPTION, Option, option, value_kwargs

from ..llava.image_tokens import ASPECT_RATIOS, MERGE_TYPES
from .conversation import TEMPLATES
from .projector import check_projector_type

# LLaVA-NeXT's --mm_tunable_parts names, in its order (its mm_vision_resampler has no counterpart here).
TUNABLE_PARTS = ("mm_vision_tower", "mm_mlp_adapter", "mm_language_model")
TOWER_PART, PROJECTOR_PART, LLM_PART = TUNABLE_PARTS
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


def str2bool(text: str) -> bool:
    """HfArgumentParser's booleans: true/false, yes/no, 1/0 (any case)."""
    value = str(text).strip().lower()
    if value in ("true", "yes", "y", "1"):
        return True
    if value in ("false", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; use True or False")


def optional_int(text: str) -> int | None:
    return None if str(text).lower() == "none" else int(text)


def _flag(default: Any, help: str, type=None, choices=None, nargs=None):
    """A LLaVA argument: an `option` flagged by its field name (`--learning_rate`), parsed by `type`; the values
    are checked by `validate` with LLaVA-shaped messages, so the field carries no Limits."""
    return option(None, help, default, parse=type, choices=choices or (), nargs=nargs)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = _flag(None, "the language model: a Llama-family directory or hub id "
                                           "(LLaVA-1.5: lmsys/vicuna-7b-v1.5); stage 2 uses the same base as stage 1")
    version: str = _flag("plain", "conversation template: plain (stage 1) or v1 (stage 2, Vicuna)",
                         choices=tuple(TEMPLATES))
    vision_tower: str | None = _flag(None, "a CLIP(-MoE) or SigLIP(-MoE) directory (or a CLIP hub id in the local cache)")
    mm_vision_select_layer: int = _flag(-2, "tower hidden state fed to the projector (-2: penultimate block)",
                                        type=int)
    mm_vision_select_feature: str = _flag("patch", "patch (drop CLS) or cls_patch", choices=SELECT_FEATURES)
    mm_projector_type: str = _flag("mlp2x_gelu", "linear or mlpNx_gelu")
    pretrain_mm_mlp_adapter: str | None = _flag(None, "stage 1's mm_projector.bin to start the projector from")
    tune_mm_mlp_adapter: bool = _flag(False, "train the projector only and save config.json + mm_projector.bin "
                                      "(stage 1); False trains projector + LLM and saves a full checkpoint",
                                      type=str2bool)
    freeze_backbone: bool = _flag(False, "keep the LLM's decoder and embeddings frozen", type=str2bool)
    freeze_mm_mlp_adapter: bool = _flag(False, "keep the projector frozen", type=str2bool)
    mm_use_im_start_end: bool = _flag(False, "only False (LLaVA-1.5) is supported", type=str2bool)
    mm_use_im_patch_token: bool = _flag(False, "only False (LLaVA-1.5) is supported", type=str2bool)
    mm_patch_merge_type: str = _flag("flat", "how anyres crops reach the LLM: flat (every crop's patches in turn, "
                                     "LLaVA-1.5), spatial (one patch grid) or spatial_unpad (the grid without the "
                                     "padding, each row ended by a learned image_newline: LLaVA-1.6)",
                                     choices=MERGE_TYPES)
    unfreeze_mm_vision_tower: bool = _flag(False, "train the vision tower too (LLaVA-NeXT's flag; stage 2): the output "
                                           "holds the trained tower in vision_tower/ and its config points there",
                                           type=str2bool)
    mm_tunable_parts: str | None = _flag(None, "LLaVA-NeXT's spelling of what trains, a comma list of "
                                         f"{', '.join(TUNABLE_PARTS)}; when given it alone decides (projector only "
                                         "saves mm_projector.bin, as --tune_mm_mlp_adapter True)")
    balance_loss_coef: float | None = _flag(None, "weight of a MoE tower's router load-balance loss in the "
                                            "training loss when the tower trains (CuMo's flag; default: the tower "
                                            "config's aux_loss_coef)", type=float)
    router_z_loss_coef: float | None = _flag(None, "weight of a MoE tower's router z-loss in the training loss "
                                             "when the tower trains (CuMo's flag; default: the tower config's "
                                             "router_z_loss_coef)", type=float)


@dataclass
class DataArguments:
    data_path: str | None = _flag(None, "LLaVA JSON: a list of {id, image, conversations} "
                                  "(stage 1: blip_laion_cc_sbu_558k.json; stage 2: llava_v1_5_mix665k.json)")
    image_folder: str | None = _flag(None, "folder the records' image paths are relative to "
                                     "(default: the JSON file's folder)")
    image_aspect_ratio: str = _flag("square", "square (resize + centre crop), pad (pad to a square with the "
                                    "mean colour first) or anyres (LLaVA-1.6: a global view plus crops on the "
                                    "--image_grid_pinpoints resolution that fits the image best)",
                                    choices=ASPECT_RATIOS)
    image_grid_pinpoints: str | None = _flag(None, "anyres resolutions as [width, height] pairs, e.g. \"[[336, 672], "
                                             "[672, 336], [672, 672]]\", or LLaVA-NeXT's range \"(1x1),...,(2x2)\" "
                                             "in crops of the tower's image size; each a multiple of that size")
    lazy_preprocess: bool = _flag(True, "tokenize and decode images per sample in the DataLoader (as LLaVA's lazy "
                                  "data set); False is accepted with a note, data is always processed lazily",
                                  type=str2bool)
    is_multimodal: bool = _flag(True, "set by LLaVA itself; False is accepted with a note, training is always "
                                "multimodal", type=str2bool)


@dataclass
class TrainingArguments:
    output_dir: str | None = _flag(None, "run directory: checkpoint-N/, metrics.jsonl, logs/ and the final output")
    overwrite_output_dir: bool = _flag(False, "start afresh in an output directory that holds a finished run or "
                                       "checkpoints (which are deleted) instead of refusing or resuming", type=str2bool)
    resume_from_checkpoint: str | None = _flag(None, "a checkpoint-N directory to resume from (default: the newest "
                                               "one in --output_dir, as LLaVA does)")
    resume_lower_lr: bool = _flag(False, lower_lr.HELP, type=str2bool)
    num_train_epochs: float = _flag(1.0, "passes over the data", type=float)
    max_steps: int = _flag(-1, "optimizer steps; > 0 overrides --num_train_epochs", type=int)
    per_device_train_batch_size: int = _flag(32, "samples per process per micro-batch", type=int)
    gradient_accumulation_steps: int = _flag(1, "micro-batches per optimizer step", type=int)
    learning_rate: float = _flag(1e-3, "peak learning rate (AdamW)", type=float)
    mm_vision_tower_lr: float | None = _flag(None, "peak learning rate of the vision tower's weights when it trains "
                                             "(LLaVA-NeXT's flag, e.g. 2e-6; default: --learning_rate); the same "
                                             "schedule", type=float)
    weight_decay: float = _flag(0.0, "AdamW weight decay on matrices (not biases or norms)", type=float)
    warmup_ratio: float = _flag(0.03, "linear warm-up share of the optimizer steps", type=float)
    warmup_steps: int = _flag(0, "warm-up steps; > 0 overrides --warmup_ratio", type=int)
    lr_scheduler_type: str = _flag("cosine", "learning-rate schedule after warm-up", choices=SCHEDULERS)
    max_grad_norm: float = _flag(1.0, "gradient clipping norm (0: off)", type=float)
    model_max_length: int = _flag(2048, "longest sequence in tokens, image tokens included; longer samples are "
                                  "cut at the end and counted", type=int)
    bf16: bool | None = _flag(None, "bf16 autocast, on GPUs and on CPUs that run bf16 matmuls; frozen modules are "
                              "held in bf16 (default: on GPUs that support it)", type=str2bool)
    fp16: bool = _flag(False, "fp16 autocast (GPU only)", type=str2bool)
    tf32: bool | None = _flag(None, "allow TF32 matmuls on NVIDIA GPUs (no effect on the CPU, said in a note)",
                              type=str2bool)
    gradient_checkpointing: bool = _flag(True, "recompute each decoder layer's activations in the backward pass "
                                         "(less memory, one more forward of the LLM per step)", type=str2bool)
    dataloader_num_workers: int | None = _flag(None, "DataLoader worker processes that tokenize and decode images "
                                               "(default: 4 on GPUs as in LLaVA's scripts, 0 on the CPU)", type=int)
    save_strategy: str = _flag("steps", "steps: a checkpoint every --save_steps; no: only the final output",
                               choices=("steps", "no"))
    save_steps: int = _flag(24000, "optimizer steps between checkpoints", type=int)
    save_total_limit: int | None = _flag(1, "checkpoints kept (older ones are deleted; None keeps all)",
                                         type=optional_int)
    logging_steps: int = _flag(1, "optimizer steps per metrics line (loss averaged over them)", type=int)
    logging_dir: str | None = _flag(None, "TensorBoard folder (default: OUTPUT_DIR/logs)")
    report_to: list[str] = _flag(("tensorboard",), f"trackers: {', '.join(REPORT_TARGETS)}; metrics.jsonl is "
                                 "always written; W&B logs offline (WANDB_MODE=offline) when no API key is set up",
                                 nargs="+")
    seed: int = _flag(42, "seed for the projector's initialisation and the data order", type=int)
    deepspeed: str | None = _flag(None, "a DeepSpeed JSON config (LLaVA's: scripts/zero2.json, scripts/zero3.json): "
                                  "trains under DeepSpeed when the run is started by a launcher (deepspeed, torchrun, "
                                  "accelerate launch); needs pip install 'clip-moe-toolkit[deepspeed]'; a single "
                                  "process started without a launcher ignores it, said in a note")
    local_rank: int = _flag(-1, "set by the deepspeed launcher (--local_rank=N); the rank is read from the "
                            "launcher's environment", type=int)
    group_by_modality_length: bool = _flag(False, "LLaVA's modality- and length-grouped batches: every micro-batch "
                                           "holds only image or only text-only samples, mega-batches sorted by length "
                                           "(False: plain shuffled batches)", type=str2bool)
    evaluation_strategy: str = _flag("no", "only no (LLaVA trains without evaluation)", choices=("no",))
    eval_strategy: str = _flag("no", "only no", choices=("no",))
    per_device_eval_batch_size: int = _flag(4, "accepted with a note; there is no evaluation", type=int)
    optim: str = _flag("adamw_torch", "only adamw_torch", choices=("adamw_torch",))
    lora_enable: bool = _flag(False, "only False: LoRA is not supported", type=str2bool)
    bits: int = _flag(16, "only 16: no quantized training", type=int, choices=(16,))
    cache_dir: str | None = _flag(None, "Hugging Face cache folder for hub ids")
    remove_unused_columns: bool = _flag(False, "accepted with a note; the collator builds every column itself",
                                        type=str2bool)


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments)
# flag -> (the one value this loop honours, or None where no value changes anything; why). A note is printed
# when a flag is set to another value (for None: whenever it is passed or set off its default). Flags that
# `choices` restrict to what this loop implements (e.g. --optim adamw_torch) are honoured, not listed here.
ACCEPTED_ONLY: dict[str, tuple[Any, str]] = {
    "per_device_eval_batch_size": (None, "there is no evaluation (LLaVA-1.5 trains with --evaluation_strategy no)"),
    "lazy_preprocess": (True, "data is always processed lazily, per sample in the DataLoader"),
    "is_multimodal": (True, "training is always multimodal"),
    "remove_unused_columns": (False, "the collator builds every column the model needs itself"),
}
GIVEN = "_given_flags"  # namespace attribute: the flags named on the command line

# The flags that change neither the trained weights nor the schedule, so a resumed run may change them. Every
# other field of the three argument classes shapes the result: a resume compares it with the checkpoint's record
# and refuses any difference, naming it (a new field is compared unless it is added here, with its reason).
NOT_SHAPING = frozenset({
    # where the run reads and writes: the checkpoint is compared by what it holds, not by where it lies
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "cache_dir",
    # lets a resume lower --learning_rate, which is then checked on its own and recorded (encoder.training.lower_lr)
    lower_lr.FIELD,
    # when progress is saved and where it is logged
    "save_strategy", "save_steps", "save_total_limit", "logging_steps", "logging_dir", "report_to",
    # how fast, not what: the processes that load data, and recomputing activations instead of keeping them
    "dataloader_num_workers", "gradient_checkpointing",
    # which process this is: the launcher's business (the number of processes is compared on its own)
    "local_rank",
    # the DeepSpeed config is compared by its content, value by value, where it is used (deepspeed_config)
    "deepspeed",
    # there is no evaluation, and these take the one value "no" anyway
    "evaluation_strategy", "eval_strategy",
    # accepted but without effect here (each has its note)
    *ACCEPTED_ONLY,
})


@dataclass
class LlavaArguments:
    """The three argument groups of one run."""

    model: ModelArguments
    data: DataArguments
    training: TrainingArguments
    given: frozenset[str] = frozenset()  # flags named on the command line (for the notes on ignored ones)

    def as_dict(self) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data),
                "training": dataclasses.asdict(self.training)}


def shaping_settings(groups: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`--flag: value` for every flag that shapes the result, from `LlavaArguments.as_dict()` (or a checkpoint's
    record of it): what a resumed run must share with the checkpoint it continues."""
    return {f"--{name}": value for group in groups.values() for name, value in group.items()
            if name not in NOT_SHAPING}


class _Given(argparse.Action):
    """Store the value and remember that the flag was named, so ignored flags get their note even at defaults."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        given = set(getattr(namespace, GIVEN, ()))
        setattr(namespace, GIVEN, given | {self.dest})


# Annotations whose values argparse must convert (everything else is a str); a field so annotated without a
# `type` is a programming error, caught when the parser is built: an untyped int flag stays the string '-2'.
_CONVERTED = ("int", "float", "bool", "int | None", "float | None", "bool | None")


def add_llava_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """One option per dataclass field, in three groups; `defaults` overrides field defaults (per stage)."""
    for cls in ARGUMENT_CLASSES:
        group = parser.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            opt: Option = f.metadata[OPTION]
            default = defaults.get(f.name, f.default)
            if opt.parse is None and str(f.type) in _CONVERTED:
                raise TypeError(f"{cls.__name__}.{f.name} is annotated {f.type} but has no type= to parse it with")
            kwargs: dict[str, Any] = dict(default=default, help=f"{opt.help} (default: {_show(default)})",
                                          action=_Given, **value_kwargs(opt))
            if opt.parse is str2bool:  # `--bf16 True`, `--bf16 False` or a bare `--bf16`
                kwargs.update(nargs="?", const=True, metavar="BOOL")
            group.add_argument(f"--{f.name}", **kwargs)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def split_arguments(namespace: argparse.Namespace) -> LlavaArguments:
    """The parsed flags as the three dataclasses, validated."""
    values = vars(namespace)
    groups = [cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)}) for cls in ARGUMENT_CLASSES]
    groups[2].report_to = list(groups[2].report_to)
    args = LlavaArguments(*groups, given=frozenset(values.get(GIVEN, ())))
    validate(args)
    return args


def validate(args: LlavaArguments) -> None:
    """Raise UserError for values LLaVA would accept but this loop cannot honour, or that make no sense."""
    m, d, t = args.model, args.data, args.training
    missing = [name for name, value in (("--model_name_or_path", m.model_name_or_path),
                                        ("--vision_tower", m.vision_tower), ("--data_path", d.data_path),
                                        ("--output_dir", t.output_dir)) if not value]
    if missing:
        raise UserError(f"missing {', '.join(missing)}; pass them (or no data/model flags at all for the "
                        "embedded default run)")
    check_projector_type(m.mm_projector_type)
    for flag, value in (("mm_use_im_start_end", m.mm_use_im_start_end),
                        ("mm_use_im_patch_token", m.mm_use_im_patch_token), ("lora_enable", t.lora_enable)):
        if value:
            raise UserError(f"--{flag} True is not supported; LLaVA-1.5 trains with --{flag} False")
    positive = {"per_device_train_batch_size": t.per_device_train_batch_size,
                "gradient_accumulation_steps": t.gradient_accumulation_steps, "save_steps": t.save_steps,
                "logging_steps": t.logging_steps, "model_max_length": t.model_max_length,
                "learning_rate": t.learning_rate}
    for flag, value in positive.items():
        if not value > 0:
            raise UserError(f"--{flag} {value}: expected a positive number")
    if not math.isfinite(t.learning_rate):
        raise UserError(f"--learning_rate {t.learning_rate}: expected a finite positive number")
    for flag, value in (("weight_decay", t.weight_decay), ("warmup_steps", t.warmup_steps),
                        ("max_grad_norm", t.max_grad_norm)):
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"--{flag} {value}: expected 0 or a positive number"
                            + (" (0 turns clipping off)" if flag == "max_grad_norm" else ""))
    if t.max_steps <= 0 and not t.num_train_epochs > 0:
        raise UserError(f"--num_train_epochs {t.num_train_epochs}: expected a positive number (or set --max_steps)")
    if not 0 <= t.warmup_ratio <= 1:
        raise UserError(f"--warmup_ratio {t.warmup_ratio}: expected a share between 0 and 1")
    if t.save_total_limit is not None and t.save_total_limit < 1:
        raise UserError(f"--save_total_limit {t.save_total_limit}: keep at least 1 checkpoint (or None for all)")
    if t.bf16 and t.fp16:
        raise UserError("--bf16 and --fp16 are both set; choose one")
    unknown = [target for target in t.report_to if target not in REPORT_TARGETS]
    if unknown:
        raise UserError(f"--report_to {' '.join(unknown)} is not supported; use any of {', '.join(REPORT_TARGETS)}")
    if t.dataloader_num_workers is not None and t.dataloader_num_workers < 0:
        raise UserError(f"--dataloader_num_workers {t.dataloader_num_workers}: expected 0 (load in the main "
                        "process) or more")
    if m.mm_patch_merge_type != "flat" and d.image_aspect_ratio != "anyres":
        raise UserError(f"--mm_patch_merge_type {m.mm_patch_merge_type} lays out anyres crops; with "
                        f"--image_aspect_ratio {d.image_aspect_ratio} every image is one crop and LLaVA merges it flat "
                        "(an image_newline would never train); pass --image_aspect_ratio anyres or "
                        "--mm_patch_merge_type flat")
    if d.image_aspect_ratio == "anyres" and not d.image_grid_pinpoints:
        raise UserError("--image_aspect_ratio anyres needs --image_grid_pinpoints (the resolutions an image may be cut "
                        "at), e.g. \"(1x1),...,(2x2)\" or \"[[336, 672], [672, 336], [672, 672]]\"")
    _resolve_tunable_parts(args)
    if m.tune_mm_mlp_adapter and m.freeze_mm_mlp_adapter:
        raise UserError("--tune_mm_mlp_adapter True with --freeze_mm_mlp_adapter True leaves nothing to train")
    _validate_tower_training(args)


def resolve_parts(mm_tunable_parts: str | None, tune_mm_mlp_adapter: bool, freeze_backbone: bool,
                  freeze_mm_mlp_adapter: bool, unfreeze_mm_vision_tower: bool) -> tuple[str, ...]:
    """The parts that train, in TUNABLE_PARTS' order: --mm_tunable_parts when given (LLaVA-NeXT: it alone decides),
    else LLaVA's flags (the projector alone under --tune_mm_mlp_adapter; otherwise the projector and the language
    model unless frozen; the tower when --unfreeze_mm_vision_tower). Also reads a checkpoint's recorded flags,
    so a resume compares the set whichever spelling made it."""
    if mm_tunable_parts is not None:
        named = {part.strip() for part in str(mm_tunable_parts).split(",")}
        return tuple(part for part in TUNABLE_PARTS if part in named)
    parts = {PROJECTOR_PART} if tune_mm_mlp_adapter else (
        ({PROJECTOR_PART} if not freeze_mm_mlp_adapter else set()) | ({LLM_PART} if not freeze_backbone else set()))
    if unfreeze_mm_vision_tower:
        parts.add(TOWER_PART)
    return tuple(part for part in TUNABLE_PARTS if part in parts)


def trainable_parts(args: LlavaArguments) -> tuple[str, ...]:
    m = args.model
    return resolve_parts(m.mm_tunable_parts, m.tune_mm_mlp_adapter, m.freeze_backbone, m.freeze_mm_mlp_adapter,
                         m.unfreeze_mm_vision_tower)


def trains_tower(args: LlavaArguments) -> bool:
    return TOWER_PART in trainable_parts(args)


# The LLaVA flags that --mm_tunable_parts replaces, and the value each takes under a set of parts.
_LEGACY_SPELLING = {
    "tune_mm_mlp_adapter": lambda parts: parts == (PROJECTOR_PART,),
    "unfreeze_mm_vision_tower": lambda parts: TOWER_PART in parts,
    "freeze_backbone": lambda parts: LLM_PART not in parts,
    "freeze_mm_mlp_adapter": lambda parts: PROJECTOR_PART not in parts,
}


def _resolve_tunable_parts(args: LlavaArguments) -> None:
    """Check --mm_tunable_parts and make LLaVA's flags say the same (one source of truth): --tune_mm_mlp_adapter
    then decides the output (projector only when the projector alone trains, as LLaVA-NeXT saves it) and
    --unfreeze_mm_vision_tower whether the tower trains. A LLaVA flag named on the command line that says
    otherwise is refused rather than silently overruled (LLaVA-NeXT ignores it)."""
    m = args.model
    if m.mm_tunable_parts is None:
        return
    names = [part.strip() for part in m.mm_tunable_parts.split(",")]
    unknown = [name for name in names if name not in TUNABLE_PARTS]
    if unknown:
        raise UserError(f"--mm_tunable_parts {m.mm_tunable_parts}: {', '.join(repr(n) for n in unknown)} is not a part "
                        f"this LLaVA has; use a comma list of {', '.join(TUNABLE_PARTS)}")
    parts = resolve_parts(m.mm_tunable_parts, False, False, False, False)
    conflicts = [f"--{flag} {getattr(m, flag)}" for flag, value in _LEGACY_SPELLING.items()
                 if flag in args.given and getattr(m, flag) != value(parts)]
    if conflicts:
        raise UserError(f"--mm_tunable_parts {m.mm_tunable_parts} decides what trains, and {', '.join(conflicts)} says "
                        "otherwise; drop one of them")
    m.mm_tunable_parts = ",".join(parts)
    for flag, value in _LEGACY_SPELLING.items():
        setattr(m, flag, value(parts))


def _validate_tower_training(args: LlavaArguments) -> None:
    """The tower's own flags need a tower that trains; stage 1's projector-only output would drop a trained one."""
    m, t = args.model, args.training
    if m.unfreeze_mm_vision_tower and m.tune_mm_mlp_adapter:
        raise UserError("--unfreeze_mm_vision_tower True with --tune_mm_mlp_adapter True: the output would be "
                        "mm_projector.bin alone and the trained tower lost; train the tower in stage 2 (finetune), "
                        "or pass --mm_tunable_parts mm_vision_tower,mm_mlp_adapter for a full checkpoint")
    tower = trains_tower(args)
    for flag, value in (("mm_vision_tower_lr", t.mm_vision_tower_lr), ("balance_loss_coef", m.balance_loss_coef),
                        ("router_z_loss_coef", m.router_z_loss_coef)):
        if value is None:
            continue
        if not tower:
            raise UserError(f"--{flag} {value} applies to a vision tower that trains, and this run keeps it frozen; "
                            "pass --unfreeze_mm_vision_tower True (or mm_vision_tower in --mm_tunable_parts), or drop "
                            f"--{flag}")
        lowest = "a positive number" if flag == "mm_vision_tower_lr" else "0 or a positive number"
        if not math.isfinite(value) or value < 0 or (value == 0 and flag == "mm_vision_tower_lr"):
            raise UserError(f"--{flag} {value}: expected {lowest}")
    if t.mm_vision_tower_lr is not None and t.resume_lower_lr:
        raise UserError("--resume_lower_lr True sets one learning rate for every weight, which would overwrite "
                        "--mm_vision_tower_lr; resume without --resume_lower_lr, or start afresh")


def accepted_only_notes(args: LlavaArguments) -> list[str]:
    """One line per flag that was passed (or set off its default) but changes nothing here."""
    notes = []
    for name, (honoured, why) in ACCEPTED_ONLY.items():
        cls, group = next((cls, group) for cls, group in zip(ARGUMENT_CLASSES, (args.model, args.data, args.training))
                          if name in {f.name for f in dataclasses.fields(cls)})
        value = getattr(group, name)
        ignored = (name in args.given or value != _field_default(cls, name)) if honoured is None else value != honoured
        if ignored:
            notes.append(f"--{name} {value}: accepted, but {why}")
    return notes


def _field_default(cls, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)
