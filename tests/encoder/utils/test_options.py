"""encoder.utils.options: one config field = one flag (name, help with its default, parsing, accepted values)."""

import argparse
from dataclasses import dataclass

import pytest

from encoder.utils.errors import UserError
from encoder.utils.options import (
    check_options,
    option,
    option_like,
    options_from_args,
    options_of,
    show,
    switch,
)


@dataclass
class Inner:
    lr: float = option("--lr", "peak learning rate", 1e-5, kind=float, low=0, low_open=True)
    steps: int | None = option("--steps", "optimizer steps", None, kind=int, low=1, optional=True,
                               hint="leave it out to train for --epochs")
    mode: str = option("--mode", "what to train", "all", kind=str, choices=("all", "ffn"))

    def __post_init__(self):
        check_options(self)


@dataclass
class Outer:
    data: str = option("--data", "the pairs")
    inner: Inner = options_of(Inner, exclude=("steps",))
    router_lr: float = option_like(Inner, "lr", 1e-3, flag="--router-lr", help="router learning rate")
    towers: tuple = option("--towers", "towers", ("vision", "text"), parse=lambda t: tuple(t.split(",")))
    workers: int = option("--workers", "worker processes", 0, default_text="0 on CPU")
    overwrite: bool = switch("--overwrite", "replace the output")

    def __post_init__(self):
        check_options(self)


def parser_for(cls) -> argparse.ArgumentParser:
    from encoder.utils.options import add_options

    parser = argparse.ArgumentParser()
    add_options(parser, cls)
    return parser


def parse(argv) -> Outer:
    return options_from_args(Outer, parser_for(Outer).parse_args(argv))


def test_flags_parse_into_the_config_with_types_and_nested_configs():
    cfg = parse(["--data", "d.json", "--lr", "2e-4", "--mode", "ffn", "--router-lr", "0.5", "--towers", "vision",
                 "--workers", "3", "--overwrite"])
    assert cfg == Outer(data="d.json", inner=Inner(lr=2e-4, mode="ffn"), router_lr=0.5, towers=("vision",),
                        workers=3, overwrite=True)
    assert type(cfg.workers) is int and type(cfg.inner.lr) is float


def test_defaults_come_from_the_fields_and_excluded_fields_have_no_flag():
    cfg = parse(["--data", "d"])
    assert cfg == Outer(data="d")
    assert (cfg.inner.lr, cfg.inner.steps, cfg.router_lr, cfg.towers) == (1e-5, None, 1e-3, ("vision", "text"))
    with pytest.raises(SystemExit):
        parser_for(Outer).parse_args(["--data", "d", "--steps", "3"])  # excluded: not an option here
    with pytest.raises(SystemExit):
        parser_for(Outer).parse_args([])  # --data has no default: required


def test_help_shows_each_default_as_a_user_would_type_it():
    helps = {a.option_strings[0]: a.help for a in parser_for(Outer)._actions if a.option_strings}
    assert helps["--lr"] == "peak learning rate (default 1e-5)"
    assert helps["--router-lr"] == "router learning rate (default 1e-3)"
    assert helps["--towers"] == "towers (default vision,text)"
    assert helps["--workers"] == "worker processes (default: 0 on CPU)"
    assert helps["--overwrite"] == "replace the output" and helps["--data"] == "the pairs"
    assert [show(v) for v in (0.03, 1.0, 5e-5, 100.0)] == ["0.03", "1", "5e-5", "100"]


def test_limits_refuse_with_one_line_naming_the_flag_from_the_cli_and_the_api():
    with pytest.raises(UserError, match=r"^--lr must be > 0, got 0.0$"):
        parse(["--data", "d", "--lr", "0"])
    with pytest.raises(UserError, match=r"^--router-lr must be > 0, got -1.0$"):  # the copied field, its own flag
        Outer(data="d", router_lr=-1.0)
    with pytest.raises(UserError, match=r"^--steps must be >= 1, got 0; leave it out to train for --epochs$"):
        Inner(steps=0)
    with pytest.raises(UserError, match=r"^--mode must be one of all, ffn, got 'router'$"):
        Inner(mode="router")
    with pytest.raises(UserError, match=r"^--steps must be a whole number, got 1.5"):
        Inner(steps=1.5)


def test_a_nested_config_changed_after_it_was_made_is_refused_by_check_options():
    cfg = Outer(data="d")
    cfg.inner.lr = float("nan")
    with pytest.raises(UserError, match="--lr must be a finite number, got nan"):
        check_options(cfg)


def test_choices_are_enforced_by_the_parser_too():
    with pytest.raises(SystemExit):
        parser_for(Outer).parse_args(["--data", "d", "--mode", "router"])


def test_a_field_without_a_flag_is_named_after_the_field():
    @dataclass
    class HFStyle:
        learning_rate: float = option(None, "peak learning rate", 1e-3)

    assert options_from_args(HFStyle, parser_for(HFStyle).parse_args(["--learning_rate", "2e-5"])).learning_rate \
        == 2e-5
