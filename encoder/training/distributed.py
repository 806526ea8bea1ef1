"""The process group of a run, however it was launched (python, torchrun, accelerate launch).

accelerate only forms a CPU process group (gloo) when told the run is on the CPU; otherwise processes
started by torchrun on a machine without GPUs would each train alone, silently. Every entry point asks for
the state through `process_state()` before creating an Accelerator, so CPU runs join their group too.
"""

from __future__ import annotations

import os

import torch


def on_cpu() -> bool:
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def process_state():
    from accelerate import PartialState

    return PartialState(cpu=on_cpu())


def make_accelerator(mixed_precision: str = "no", **kwargs):
    """An Accelerator that has joined the process group; kwargs go to `Accelerator` (e.g. gradient accumulation)."""
    from accelerate import Accelerator

    process_state()
    _forget_earlier_precision(mixed_precision)
    return Accelerator(mixed_precision=mixed_precision, cpu=on_cpu(), **kwargs)


def _forget_earlier_precision(mixed: str) -> None:
    """accelerate fixes one precision per process and refuses another; a second run in the same process (the
    embedded `finetune` runs stage 1 first, in fp32 unless told otherwise; DMU's stages after a bf16 run in a
    notebook) may need another one. Only the accelerator's state is reset; the process group (PartialState)
    stays."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != mixed:
        AcceleratorState._reset_state()
