"""The settings of a contrastive training run (`TrainConfig`) and the values each accepts.

Every field that takes numbers or names carries its Limits and its command-line flag, so `upcycle train`,
`upcycle dmu` (DMUConfig reuses these limits) and the Python API refuse the same nonsense with the same one
line, before any model is loaded or anything is written.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Any

from encoder.utils.errors import UserError

from .params import TRAINABLE_CHOICES

# TrainConfig fields that change neither the weights nor the schedule, so a resume may change them.
NOT_SHAPING = ("desc", "checkpoint_every", "num_workers")


# -- settings and the values they accept -------------------------------------------------------------------
# Every TrainConfig field that takes numbers or names says here which values make sense and which command-line
# flag sets it, so `upcycle train`, `upcycle dmu` (DMUConfig reuses these limits) and the Python API refuse the
# same nonsense with the same one line, before any model is loaded or anything is written.
LIMITS = "limits"


@dataclass(frozen=True)
class Limits:
    """The values a setting accepts: a whole or a finite number within bounds, or one of `choices`."""

    flag: str  # how the message names the setting
    kind: type = float  # int: whole numbers; float: finite numbers; str: one of `choices`
    low: float | None = None
    low_open: bool = False  # True: the value must be > low (else >= low)
    high: float | None = None
    high_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False  # None is allowed (it means something: see `hint`)
    hint: str = ""  # appended to the message, e.g. how to ask for what None means

    def check(self, value: Any) -> None:
        if value is None and self.optional:
            return
        if self.kind is str:
            if value not in self.choices:
                self._refuse(f"must be one of {', '.join(self.choices)}", value)
            return
        whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if self.kind is int and not whole:
            self._refuse("must be a whole number", value)
        if not whole and not (isinstance(value, numbers.Real) and not isinstance(value, bool)):
            self._refuse("must be a number", value)
        if not math.isfinite(value):
            self._refuse("must be a finite number", value)
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            self._refuse(f"must be {self.describe()}", value)

    def describe(self) -> str:
        low = None if self.low is None else f"{'>' if self.low_open else '>='} {_num(self.low)}"
        high = None if self.high is None else f"{'<' if self.high_open else '<='} {_num(self.high)}"
        if low and high and not (self.low_open or self.high_open):
            return f"between {_num(self.low)} and {_num(self.high)}"
        return " and ".join(part for part in (low, high) if part)

    def _refuse(self, rule: str, value: Any) -> None:
        raise UserError(f"{self.flag} {rule}, got {value!r}" + (f"; {self.hint}" if self.hint else ""))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def setting(default: Any, flag: str, kind: type = float, **limits) -> Any:
    """A config field whose values are checked by `check_settings` (see Limits)."""
    return field(default=default, metadata={LIMITS: Limits(flag, kind, **limits)})


def check_settings(config) -> None:
    """Raise UserError naming the flag of the first field of `config` outside its Limits."""
    for f in fields(config):
        limits = f.metadata.get(LIMITS)
        if limits is not None:
            limits.check(getattr(config, f.name))


PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    trainable: str = setting("all", "--trainable", str, choices=TRAINABLE_CHOICES)
    epochs: float = setting(1.0, "--epochs", low=0, low_open=True)
    # optimizer steps; overrides epochs when set
    max_steps: int | None = setting(None, "--max-steps", int, low=1, optional=True,
                                    hint="leave it out to train for --epochs")
    # global batch: pairs per optimizer micro-step over all processes
    batch_size: int = setting(64, "--batch-size", int, low=1)
    grad_accum: int = setting(1, "--grad-accum", int, low=1)
    lr: float = setting(1e-5, "--lr", low=0, low_open=True)
    weight_decay: float = setting(0.2, "--weight-decay", low=0)
    warmup_ratio: float = setting(0.03, "--warmup-ratio", low=0, high=1)
    label_smoothing: float = setting(0.0, "--label-smoothing", low=0, high=1, high_open=True)
    # a fixed multiplier (DMU: 100); None = the model's learnable one
    logit_scale: float | None = setting(None, "--logit-scale", low=0, low_open=True, optional=True,
                                        hint="pass 'learnable' for the model's own")
    aux_loss_coef: float = setting(0.01, "--aux-loss-coef", low=0)
    z_loss_coef: float = setting(0.0, "--z-loss-coef", low=0)
    max_grad_norm: float | None = setting(1.0, "--max-grad-norm", low=0, low_open=True, optional=True,
                                          hint="use 'none' to train without clipping")
    checkpoint_every: int = setting(500, "--checkpoint-every", int, low=1)  # optimizer steps
    # None: 0 on CPU, min(8, cores) on GPU
    num_workers: int | None = setting(None, "--num-workers", int, low=0, optional=True)
    # auto (bf16 on capable GPUs) | fp32 | bf16
    precision: str = setting("auto", "--precision", str, choices=PRECISIONS)
    seed: int = setting(0, "--seed", int, low=0)
    desc: str = "train"

    def __post_init__(self):
        check_settings(self)

    @staticmethod
    def limits(name: str) -> Limits:
        """The Limits of field `name`, for other configs whose fields become this one's (DMUConfig)."""
        return next(f.metadata[LIMITS] for f in fields(TrainConfig) if f.name == name)


def same_limits(name: str, default: Any, flag: str | None = None, hint: str | None = None) -> Any:
    """A field of another config that accepts what TrainConfig's `name` accepts (under its own flag)."""
    limits = TrainConfig.limits(name)
    renamed = replace(limits, flag=flag or limits.flag, hint=limits.hint if hint is None else hint)
    return field(default=default, metadata={LIMITS: renamed})
