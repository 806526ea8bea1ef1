"""A DeepSpeed config checked against the run before anything is built, and recorded for an exact resume.

The loop decides itself how many micro-batches make a step, how large they are, how gradients are clipped, and it
brings its own AdamW and learning-rate schedule. A DeepSpeed config (LLaVA's `--deepspeed zero3.json`, `accelerate
launch --deepspeed_config_file`, or accelerate's `--use_deepspeed --zero_stage N ...` flags) may only repeat those
values or leave them "auto": otherwise DeepSpeed takes its own with a warning (4 "optimizer steps" counted, 1
update made), or runs a schedule nobody asked for, or fails with a traceback on every rank once the model is built.
`check_launch` refuses all of that in one line before the Accelerator exists, and `engine_settings` gives the
config's content (not its path) to the resume settings, so a config edited between a kill and the resume is
refused like any other changed flag.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils.errors import UserError, first_line

# The top-level keys DeepSpeed 0.19 reads (found by recording what `DeepSpeedConfig` looks up), plus
# `sequence_parallel_size` (read by the engine) and `msamp` (set by accelerate). DeepSpeed ignores any other key
# without a word, so a misspelt section (`zero_optimisation`) would silently train with the defaults.
KNOWN_KEYS = frozenset({
    "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "bfloat16", "checkpoint", "comet",
    "comms_logger", "communication_data_type", "compile", "compression_training", "csv_monitor",
    "curriculum_learning", "data_efficiency", "data_types", "dataloader_drop_last", "datastates_ckpt",
    "disable_allgather", "disable_python_gc", "dump_state", "eigenvalue", "elasticity", "expert_parallel",
    "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping",
    "gradient_predivide_factor", "graph_harvesting", "hybrid_engine", "log_level", "managed_gradient_accumulation",
    "memory_breakdown", "msamp", "nebula", "optimizer", "pipeline", "prescale_gradients", "progressive_layer_drop",
    "quantize_training", "scheduler", "seq_parallel_communication_data_type", "sequence_parallel_size",
    "sparse_attention", "sparse_gradients", "steps_per_print", "tensor_parallel", "tensorboard", "timers",
    "torch_autocast", "train_batch_size", "train_micro_batch_size_per_gpu", "use_data_before_expert_parallelism",
    "vocabulary_size", "wall_clock_breakdown", "wandb", "weight_quantization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "zero_optimization",
})

# Where "auto" is filled in before the engine is made, and by whom: the loop's flags (micro-batch, batch,
# accumulation, clipping; see `sharded.configure_deepspeed`), the precision flags (accelerate), the model's hidden
# size (bucket sizes), accelerate's launch settings (stage, offload). Anywhere else "auto" reaches DeepSpeed as it
# is and fails there. The values are what the up-front validation puts in their place.
FILLED_AUTO: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": None, "train_batch_size": None, "gradient_accumulation_steps": None,
    "gradient_clipping": None, "fp16.enabled": None, "bf16.enabled": None,
    "zero_optimization.reduce_bucket_size": 500_000_000, "zero_optimization.stage3_prefetch_bucket_size": 50_000_000,
    "zero_optimization.stage3_param_persistence_threshold": 100_000, "zero_optimization.stage": 2,
    "zero_optimization.offload_optimizer.device": "none", "zero_optimization.offload_param.device": "none",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": True,
}
# accelerate launch's DeepSpeed flags, as the environment carries them to accelerate's DeepSpeedPlugin: each fills
# its key where a config file leaves "auto", or builds the config when there is no file.
LAUNCH_VALUES = {
    "gradient_accumulation_steps": ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", int),
    "gradient_clipping": ("ACCELERATE_GRADIENT_CLIPPING", float),
    "zero_optimization.stage": ("ACCELERATE_DEEPSPEED_ZERO_STAGE", int),
    "zero_optimization.offload_optimizer.device": ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", str),
    "zero_optimization.offload_param.device": ("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", str),
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": ("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
                                                                     lambda text: text.lower() == "true"),
}
_checked: tuple[str, dict[str, Any]] | None = None  # what the last `check_launch` of this process read
SETTING_PREFIX = "deepspeed_config."  # resume settings: one per value of the config, e.g. deepspeed_config.bf16.enabled


@dataclass(frozen=True)
class LoopOwned:
    """What the loop decides from the run's flags, and the flags that say it (for the messages)."""

    accumulation: int  # micro-batches per optimizer step
    batch: int  # samples per micro-batch: per process, or over all processes when `batch_is_global`
    max_grad_norm: float  # 0: no clipping
    precision: str  # "no", "bf16" or "fp16": what the run's flags ask for
    accumulation_flag: str
    batch_flag: str
    clipping_flag: str
    precision_flag: str
    optimizer_flags: str  # what sets the run's own AdamW
    schedule_flags: str  # what sets the run's own learning-rate schedule
    batch_is_global: bool = False

    def micro_batch(self, processes: int) -> int:
        return max(1, self.batch // processes) if self.batch_is_global else self.batch


def launched_processes() -> int:
    """The number of processes the launcher started (every launcher sets WORLD_SIZE; 1 without a launcher)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes")


def launch_config() -> tuple[str, dict[str, Any]] | None:
    """(how to name it, the config) of the DeepSpeed run the launch asks for, as accelerate's DeepSpeedPlugin will
    read it: the config file with "auto" filled from accelerate launch's flags, or the config those flags build
    without a file. None when the launch does not ask for DeepSpeed."""
    if not deepspeed_requested():
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path != "none":
        source, config = f"the DeepSpeed config {path}", read_config(path)
    else:
        source = "accelerate launch's DeepSpeed flags"
        config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                  "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                  "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"},
                                        "offload_param": {"device": "none"},
                                        "stage3_gather_16bit_weights_on_model_save": False}}
    for key, (variable, parse) in LAUNCH_VALUES.items():
        text = os.environ.get(variable)
        parent, name = _node(config, key)
        if text is not None and text != "auto" and parent is not None and parent.get(name) == "auto":
            parent[name] = parse(text)
    return source, config


def read_config(path: str) -> dict[str, Any]:
    """A DeepSpeed JSON config as a dict; one line naming the file when it is not one."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"DeepSpeed config {path} cannot be read as JSON ({first_line(err)}); pass a DeepSpeed "
                        "JSON config such as scripts/zero2.json") from None
    if not isinstance(config, dict):
        raise UserError(f"DeepSpeed config {path} holds a {type(config).__name__}, not a JSON object; pass a "
                        "DeepSpeed JSON config such as scripts/zero2.json")
    return config


def check_launch(loop: LoopOwned, processes: int | None = None) -> None:
    """Refuse, in one line and before anything is built, a launch whose settings contradict the loop's: accelerate
    launch's --gradient_accumulation_steps (which accelerate prefers to the run's own under any engine) and,
    under DeepSpeed, the config (`problems`)."""
    processes = launched_processes() if processes is None else processes
    launched = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if launched is not None and launched.isdigit() and int(launched) != loop.accumulation:
        raise UserError(f"accelerate launch --gradient_accumulation_steps {launched} but {loop.accumulation_flag} "
                        f"is {loop.accumulation}: the loop steps by its own flag; drop the launch flag or make "
                        "them agree")
    global _checked
    _checked = found = launch_config()
    if found is None:
        return
    source, config = found
    wrong = problems(config, loop, processes)
    if wrong:
        raise UserError(f"{source} does not fit this run: {'; '.join(wrong)}")


def problems(config: dict[str, Any], loop: LoopOwned, processes: int) -> list[str]:
    """Everything in `config` that contradicts the loop or that DeepSpeed (or accelerate) would reject once the
    model is built, each with its fix; [] when it fits."""
    found = []
    for key in config:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1)
            found.append(f'unknown key "{key}"' + (f' (did you mean "{close[0]}"?)' if close else "") +
                         "; DeepSpeed would ignore it, fix or remove it")
    if not isinstance(config.get("zero_optimization"), dict):
        found.append('no "zero_optimization" section; add one, e.g. {"stage": 2} (scripts/zero2.json)')
    if "optimizer" in config:
        found.append(f'an "optimizer" section, but the run trains with its own AdamW ({loop.optimizer_flags}); '
                     "remove the section")
    if "scheduler" in config:
        found.append(f'a "scheduler" section, but the run has its own learning-rate schedule ({loop.schedule_flags}); '
                     "remove the section")
    for key, value in _leaves(config):
        if value == "auto" and key not in FILLED_AUTO and key.split(".")[0] in KNOWN_KEYS - {"optimizer", "scheduler"}:
            found.append(f'"{key}": "auto", which nothing fills in for this run; give it a value')
    found += _owned_values(config, loop, processes)
    if not found:
        found += _rejected_by_deepspeed(config, loop)
    return found


def _owned_values(config: dict[str, Any], loop: LoopOwned, processes: int) -> list[str]:
    """The values the loop owns that the config sets otherwise."""
    found = []
    micro = loop.micro_batch(processes)
    accumulation = config.get("gradient_accumulation_steps", "auto")
    if accumulation != "auto" and accumulation != loop.accumulation:
        found.append(f'"gradient_accumulation_steps": {json.dumps(accumulation)} but {loop.accumulation_flag} is '
                     f'{loop.accumulation}; make them agree (or set it to "auto")')
    per_gpu = config.get("train_micro_batch_size_per_gpu", "auto")
    if per_gpu != "auto" and per_gpu != micro:
        per = f"{loop.batch_flag} {loop.batch} over {processes} process(es) gives {micro}" if loop.batch_is_global \
            else f"{loop.batch_flag} is {micro}"
        found.append(f'"train_micro_batch_size_per_gpu": {json.dumps(per_gpu)} but {per}; make them agree (or set '
                     'it to "auto")')
    total, run = config.get("train_batch_size", "auto"), micro * loop.accumulation * processes
    if total != "auto" and total != run:
        found.append(f'"train_batch_size": {json.dumps(total)} but the run\'s is {run} ({micro} per process x '
                     f'{loop.accumulation} accumulation x {processes} process(es)); make it agree (or set it to '
                     '"auto")')
    clipping = config.get("gradient_clipping", "auto")
    if clipping != "auto" and not (isinstance(clipping, (int, float)) and float(clipping) == float(loop.max_grad_norm)):
        found.append(f'"gradient_clipping": {json.dumps(clipping)} but {loop.clipping_flag} is {loop.max_grad_norm}; '
                     'make them agree (or set it to "auto")')
    other = {"bf16": "fp16", "fp16": "bf16"}.get(loop.precision)
    if other and str(config.get(other, {}).get("enabled", False)).lower() == "true":
        found.append(f'"{other}.enabled": true but {loop.precision_flag} asks for {loop.precision}; choose one')
    return found


def _rejected_by_deepspeed(config: dict[str, Any], loop: LoopOwned) -> list[str]:
    """What DeepSpeed's own config parser refuses (sections it validates, removed keys, bf16 with fp16), asked
    now with the loop's values in place of "auto", instead of on every rank once the engine is made."""
    try:
        from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    except ImportError:
        return []  # make_accelerator says DeepSpeed is missing
    filled = copy.deepcopy(config)
    loop_values = {"train_micro_batch_size_per_gpu": loop.micro_batch(1), "gradient_accumulation_steps":
                   loop.accumulation, "gradient_clipping": loop.max_grad_norm,
                   "fp16.enabled": loop.precision == "fp16", "bf16.enabled": loop.precision == "bf16"}
    for key, value in _leaves(config):
        if value == "auto":
            parent, name = _node(filled, key)
            parent[name] = loop_values.get(key, FILLED_AUTO.get(key))
    # The batch is checked above with the launch's process count, which DeepSpeed cannot know before the
    # process group exists.
    filled.pop("train_batch_size", None)
    filled["train_micro_batch_size_per_gpu"] = filled.get("train_micro_batch_size_per_gpu") or 1
    quiet = logging.getLogger("DeepSpeed")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        DeepSpeedConfig(filled)
    except (DeepSpeedConfigError, ValueError, TypeError, KeyError, AssertionError) as err:  # pydantic: ValueError
        return [f"DeepSpeed rejects it ({_reason(err)})"]
    finally:
        quiet.setLevel(level)
    return []


def _reason(err: BaseException) -> str:
    """One line of a DeepSpeed config error: pydantic's first complaint with where it is, else the first line."""
    errors = getattr(err, "errors", None)
    if callable(errors) and getattr(err, "title", None):
        first = errors()[0]
        return f"{err.title}: {'.'.join(map(str, first['loc']))}: {first['msg']}"
    return first_line(err, with_type=True)


def engine_settings(accelerator) -> dict[str, Any]:
    """The DeepSpeed config a run trains under, one resume setting per value (`deepspeed_config.bf16.enabled`, ...),
    so a resume compares its content and names what changed; {} under other engines. The content is the one
    `check_launch` read when the Accelerator was made (what the engine got), not the file as it is now."""
    if accelerator.distributed_type.name != "DEEPSPEED":
        return {}
    found = _checked if _checked is not None else launch_config()
    return {} if found is None else {SETTING_PREFIX + key: value for key, value in _leaves(found[1])}


def _leaves(config: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """("a.b.c", value) for every value that is not itself a section."""
    for key, value in config.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _node(config: dict[str, Any], key: str) -> tuple[dict[str, Any] | None, str]:
    """(the section holding dotted `key`, its last part); None when a section on the way is missing."""
    *path, name = key.split(".")
    for part in path:
        config = config.get(part)
        if not isinstance(config, dict):
            return None, name
    return config, name
