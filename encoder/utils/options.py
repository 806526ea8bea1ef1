"""Command-line options declared once, on the config dataclass field they set.

A field made with `option(...)` carries its flag, help, default, how argparse parses it and which values it
accepts (`Limits`). `add_options` turns a config class into argparse options, `options_from_args` turns the
parsed flags back into the config, and the config's __post_init__ calls `check_options`, so the command line
and the Python API refuse the same nonsense with the same one line naming the flag, before any work starts.

    @dataclass
    class Config:
        lr: float = option("--lr", "peak learning rate", 1e-5, low=0, low_open=True)

        def __post_init__(self):
            check_options(self)
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from typing import Any

from .errors import UserError

OPTION = "option"  # field metadata key: the field's Option
GROUP = "option_group"  # field metadata key: (config class, excluded field names) of a nested config
_SAME: Any = object()  # option_like: keep the source field's value


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


@dataclass(frozen=True)
class Option:
    """How one config field appears on the command line."""

    flag: str | None  # None: the parser names it after the field (mllm_bridge's HF-style `--learning_rate`)
    help: str
    parse: Callable[[str], Any] | None = None  # argparse `type`; it reports bad text with ArgumentTypeError
    limits: Limits | None = None  # the values accepted, checked by `check_options`
    switch: bool = False  # a flag without a value that sets True
    default_text: str | None = None  # what the help says the default is, where the value itself would not tell
    choices: tuple = ()  # the values argparse accepts (a str Limits' choices when empty)
    nargs: str | None = None  # argparse `nargs`, e.g. "+" for a list

    @property
    def parser_choices(self) -> tuple:
        if self.choices:
            return self.choices
        return self.limits.choices if self.limits is not None and self.limits.kind is str else ()

    def help_with_default(self, default: Any) -> str:
        if self.default_text is not None:
            return f"{self.help} (default: {self.default_text})"
        if self.switch or default is MISSING or default is None:
            return self.help
        return f"{self.help} (default {show(default)})"


def show(value: Any) -> str:
    """A default as a user would type it: 1e-5 (not 1e-05 or 0.00001), 0.03, 1 for 1.0, vision,text for a tuple."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(show, value))
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        if abs(value) <= 1e-3:
            mantissa, exponent = f"{value:.15e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return repr(value)
    return str(value)


def option(flag: str | None, help: str, default: Any = MISSING, *, parse: Callable[[str], Any] | None = None,
           kind: type | None = None, default_text: str | None = None, choices: tuple = (), nargs: str | None = None,
           **limits) -> Any:
    """A config field set by `flag`; without `default` the flag is required. `kind` and `limits` (Limits' low,
    high, optional, hint, ...) say which values the config accepts, and with kind=str the `choices` are the
    names it accepts; `parse` defaults to the kind (or the default's type) so that `--top-k 2` arrives as the
    int 2. `choices` without a kind only restricts the parsed text (for configs that validate themselves)."""
    if kind is str:  # a name: the config accepts exactly the parser's choices
        limits["choices"] = tuple(choices)
    checked = Limits(flag or "", kind or float, **limits) if kind is not None or limits else None
    if parse is None:
        parse = _parser_for(kind if kind is not None else type(default))
    opt = Option(flag, help, parse, checked, default_text=default_text, choices=tuple(choices or ()), nargs=nargs)
    return _field(opt, default)


def switch(flag: str, help: str) -> Any:
    """A boolean field that is False unless `flag` is given."""
    return _field(Option(flag, help, switch=True), False)


def option_like(config_cls: type, name: str, default: Any = _SAME, *, flag: str | None = None,
                help: str | None = None, default_text: Any = _SAME, **limits) -> Any:
    """A field of another config that is the same setting as `config_cls.name`: same help and accepted values,
    optionally under another flag or default, or with some Limits changed (e.g. a tighter `low`)."""
    source = next(f for f in fields(config_cls) if f.name == name)
    opt: Option = source.metadata[OPTION]
    checked = opt.limits
    if checked is None and limits:
        checked = Limits(flag or opt.flag, **limits)
    elif checked is not None:
        checked = replace(checked, flag=flag or checked.flag, **limits)
    opt = replace(opt, flag=flag or opt.flag, help=help or opt.help, limits=checked,
                  default_text=opt.default_text if default_text is _SAME else default_text)
    return _field(opt, source.default if default is _SAME else default)


def options_of(config_cls: type, exclude: Iterable[str] = ()) -> Any:
    """A field holding a whole config whose options join the command's (all but `exclude`, which keep the
    nested config's defaults)."""
    return field(default_factory=config_cls, metadata={GROUP: (config_cls, tuple(exclude))})


def _field(opt: Option, default: Any) -> Any:
    if default is MISSING:
        return field(metadata={OPTION: opt})
    return field(default=default, metadata={OPTION: opt})


def _parser_for(kind: type) -> Callable[[str], Any] | None:
    return kind if kind in (int, float) else None


def add_options(parser: argparse.ArgumentParser, config_cls: type, exclude: Iterable[str] = ()) -> None:
    """One argparse option per `option` field of `config_cls` (and of its nested configs), dest = field name."""
    exclude = set(exclude)
    for f in fields(config_cls):
        if f.name in exclude:
            continue
        if GROUP in f.metadata:
            nested, nested_exclude = f.metadata[GROUP]
            add_options(parser, nested, nested_exclude)
            continue
        opt: Option | None = f.metadata.get(OPTION)
        if opt is None:
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "help": opt.help_with_default(f.default)}
        if opt.switch:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(required=f.default is MISSING, **value_kwargs(opt))
            if f.default is not MISSING:
                kwargs["default"] = f.default
        parser.add_argument(opt.flag or f"--{f.name}", **kwargs)


def value_kwargs(opt: Option) -> dict[str, Any]:
    """The argparse keywords that read an option's value (type, choices, nargs), for parsers that add their
    options themselves (mllm_bridge's HF-style flags)."""
    kwargs: dict[str, Any] = {}
    if opt.parse is not None:
        kwargs["type"] = opt.parse
    if opt.parser_choices:
        kwargs["choices"] = opt.parser_choices
    if opt.nargs:
        kwargs["nargs"] = opt.nargs
    return kwargs


def options_from_args(config_cls: type, args: argparse.Namespace, exclude: Iterable[str] = (), **given: Any) -> Any:
    """`config_cls` built from the parsed flags (nested configs too); fields in `exclude` keep their defaults,
    `given` sets fields directly. The config's own __post_init__ checks the values."""
    values: dict[str, Any] = {}
    for f in fields(config_cls):
        if not f.init or f.name in given or f.name in exclude:
            continue
        if GROUP in f.metadata:
            nested, nested_exclude = f.metadata[GROUP]
            values[f.name] = options_from_args(nested, args, nested_exclude)
            continue
        if OPTION in f.metadata and hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return config_cls(**values, **given)


def check_options(config: Any) -> None:
    """Raise UserError naming the flag of the first field of `config` (or of a nested config) outside its
    Limits; called by __post_init__ and again by whoever runs a config that may have changed since."""
    for f in fields(config):
        value = getattr(config, f.name)
        if GROUP in f.metadata and is_dataclass(value):
            check_options(value)
            continue
        opt: Option | None = f.metadata.get(OPTION)
        if opt is not None and opt.limits is not None:
            opt.limits.check(value)
