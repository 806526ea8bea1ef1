"""The process group of a run, however it was launched (python, torchrun, accelerate launch).

accelerate only forms a CPU process group (gloo) when told the run is on the CPU; otherwise processes
started by torchrun on a machine without GPUs would each train alone, silently. Every entry point asks for
the state through `process_state()` before creating an Accelerator, so CPU runs join their group too.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..utils.errors import UserError

# What `accelerate launch --use_deepspeed / --use_fsdp` (or its config file) asks for, through the environment.
ENGINE_REQUESTS = {"ACCELERATE_USE_DEEPSPEED": ("DeepSpeed", "DEEPSPEED", "--use_deepspeed"),
                   "ACCELERATE_USE_FSDP": ("FSDP", "FSDP", "--use_fsdp")}


def on_cpu() -> bool:
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def process_state():
    from accelerate import PartialState

    return PartialState(cpu=on_cpu())


def make_accelerator(mixed_precision: str = "no", **kwargs):
    """An Accelerator that has joined the process group; kwargs go to `Accelerator` (e.g. gradient accumulation)."""
    from accelerate import Accelerator

    asked = requested_engine()
    if asked is not None and asked[0] == "DeepSpeed" and importlib.util.find_spec("deepspeed") is None:
        raise UserError("accelerate launch --use_deepspeed: DeepSpeed is not installed here; pip install deepspeed, "
                        "or launch without --use_deepspeed to train with DDP")
    process_state()
    _forget_earlier_precision(mixed_precision)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=on_cpu(), **kwargs)
    check_engine(accelerator, asked)
    return accelerator


def requested_engine() -> tuple[str, str, str] | None:
    """(name, accelerate's DistributedType name, launch flag) of the sharding engine the launch asked for."""
    for variable, engine in ENGINE_REQUESTS.items():
        if os.environ.get(variable, "").lower() in ("1", "true", "yes"):
            return engine
    return None


def check_engine(accelerator, asked: tuple[str, str, str] | None) -> None:
    """Refuse to train with another engine than the one asked for, or with one this loop would run wrongly.

    accelerate silently drops DeepSpeed and FSDP on the CPU (a run launched with --use_fsdp then trains as one
    process, or as DDP), and FSDP shards the parameters that checkpoints and the final output are written from
    on the main process: both would give results that are not what the command line says, without a word.
    """
    actual = accelerator.distributed_type.name
    if asked is not None and actual != asked[1]:
        raise UserError(f"accelerate was launched with {asked[2]} but runs this as {actual}: accelerate runs "
                        f"{asked[0]} only on GPUs; launch without {asked[2]} (DDP) on this machine")
    if actual == "FSDP":
        raise UserError("FSDP is not supported by this training loop yet (its checkpoints and final output are "
                        "written from the main process's parameters, which FSDP shards); launch without --use_fsdp "
                        "(DDP), or with --use_deepspeed and ZeRO-2 (scripts/zero2.json)")


def _forget_earlier_precision(mixed: str) -> None:
    """accelerate fixes one precision per process and refuses another; a second run in the same process (the
    embedded `finetune` runs stage 1 first, in fp32 unless told otherwise; DMU's stages after a bf16 run in a
    notebook) may need another one. Only the accelerator's state is reset; the process group (PartialState)
    stays."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != mixed:
        AcceleratorState._reset_state()
