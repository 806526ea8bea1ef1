"""Resuming a run with a lower learning rate, the way out of a divergence stop.

A resume must share every setting that shapes the result with its checkpoint, the learning rate included. After
a NaN loss, though, continuing from the last good checkpoint at a lower rate is the usual cure, so both trainers
accept one deliberate change: with `FIELD` set (`--resume-lower-lr` / `--resume_lower_lr True`) the rate may be
lower than the checkpoint's, never higher; every other setting must still match. The schedule then continues
from the checkpoint's step as if the run had started at the new rate (the optimizer's moments are kept), and the
change is recorded in the checkpoints that follow (`HISTORY`) and on the first metrics line after the resume
(`LOG_KEY`), so a finished run says that its rate was lowered, when, and from what.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch.optim.lr_scheduler import LambdaLR

from ..utils.options import show
from ..utils.step_record import SettingsChanged

FIELD = "resume_lower_lr"  # the flag's field in both trainers' argument dataclasses
HELP = ("resume from the checkpoint with a learning rate below the one it was trained with (the cure after a "
        "divergence stop); every other setting must still match, and the change is recorded")
HISTORY = "lr_lowered"  # state-file key: [{"step", "from", "to"}, ...], one entry per lowered resume
LOG_KEY = "lr_lowered_from"  # metrics key on the first line logged after a lowered resume: the rate before


class LowerLrResume:
    """A trainer's part in a lowered resume: checks the change against the checkpoint, applies it to the restored
    schedule, and keeps its record (the history for the state file, the note for the first metrics line).

    `lr_flag` and `allow_flag` name the trainer's flags in messages."""

    def __init__(self, lr_flag: str, allow_flag: str):
        self.lr_flag, self.allow_flag = lr_flag, allow_flag
        self.history: list[dict[str, Any]] = []
        self.pending: tuple[float, float] | None = None  # (old, new) between the settings check and the restore
        self.unlogged: float | None = None  # the old rate, until the first metrics line after the resume says it

    def accept(self, path: Path, recorded: float, wanted: float, allowed: bool) -> bool:
        """Whether this resume changes the rate from checkpoint `path`'s `recorded` to `wanted`: only when `allowed`
        and lower (`restore` then applies it). False leaves any difference to the settings comparison, which
        refuses it. Raises SettingsChanged when `allowed` but `wanted` is higher."""
        self.pending = None
        if not allowed or _same(recorded, wanted):
            return False
        if wanted > recorded:
            raise SettingsChanged(f"{self.allow_flag} resumes only with a lower {self.lr_flag}: {show(wanted)} is "
                                  f"above the {show(recorded)} that {path} was trained with; pass a value below it")
        self.pending = (recorded, wanted)
        return True

    def refusal_note(self, recorded: float, wanted: float, allowed: bool) -> str:
        """What the settings refusal adds when the rate alone could have been accepted: the flag that allows it."""
        if allowed or not wanted < recorded:
            return ""
        return f" (a lower {self.lr_flag} is accepted with {self.allow_flag})"

    def restore(self, record: dict[str, Any], scheduler, step: int) -> None:
        """After the checkpoint's optimizer and schedule are loaded: take its history and apply the pending change."""
        self.history = list(record.get(HISTORY, []))
        if self.pending is None:
            return
        old, new = self.pending
        lower_lr(scheduler, new)
        self.history.append({"step": step, "from": old, "to": new})
        self.unlogged, self.pending = old, None

    def record(self) -> dict[str, Any]:
        return {HISTORY: self.history} if self.history else {}

    def note(self, values: dict[str, float]) -> dict[str, float]:
        """`values` of a metrics line, with the rate before the resume on the first line after a lowered one."""
        if self.unlogged is None:
            return values
        values, self.unlogged = {**values, LOG_KEY: self.unlogged}, None
        return values


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


def lower_lr(scheduler, new: float) -> None:
    """Continue the schedule just restored from a checkpoint with every group's peak rate at `new`: the rates of a
    run started at `new`, at the checkpoint's step (the optimizer's moments stay as they are). The restored
    schedule and its optimizer hold the old peak rate. The scheduler's own optimizer is changed: under DeepSpeed
    that is the torch optimizer inside the engine's wrapper, whose groups the engine steps with."""
    groups = scheduler.optimizer.param_groups
    old_bases = list(scheduler.base_lrs)
    scheduler.base_lrs = [new] * len(old_bases)
    if isinstance(scheduler, LambdaLR):  # every transformers schedule: rate = peak x a factor of the step
        rates = [new * factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
    else:
        rates = [group["lr"] * new / old for group, old in zip(groups, old_bases)]
    for group, rate in zip(groups, rates):
        group["lr"], group["initial_lr"] = rate, new
    scheduler._last_lr = [group["lr"] for group in groups]
