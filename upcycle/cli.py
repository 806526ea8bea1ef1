"""Command line of the upcycle package.

    python -m upcycle sparse --base DENSE_CLIP_DIR --out clip-moe-dir --num-experts 4 --top-k 2

Every command is a config dataclass (its fields are the flags: encoder.utils.options; its docstring the help) and
the function that runs it, which lives next to what it runs; this module only lists them and generates the
parsers. It is the one module that wires the product (recipes, train, eval, data) together with the fenced-off
CPU demo (upcycle.embedded) and research harness (upcycle.research).
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from encoder.utils.cli import command_parser, run_cli
from encoder.utils.options import add_options, options_from_args


@dataclass(frozen=True)
class Command:
    """A command: its config (whose docstring is the command's help line, then its description) and runner."""

    name: str
    config: type
    run: Callable[[Any], int]
    # old flag -> its replacement here, where the old name means something else in other commands
    renamed: dict[str, str] = field(default_factory=dict)

    @property
    def help(self) -> str:
        return inspect.cleandoc(self.config.__doc__).split("\n", 1)[0]

    @property
    def description(self) -> str:
        return " ".join(inspect.cleandoc(self.config.__doc__).split("\n", 1)[1].split())


def commands() -> list[Command]:
    from .embedded.digit_accuracy import DigitEvalConfig, run_digit_eval
    from .embedded.digit_grids import DigitGridsConfig, run_make_digit_grids
    from .embedded.main_job import MainJobConfig, run_main_job
    from .embedded.small_base import InitBaseConfig, run_init_base
    from .embedded.sparse_demo import SparseDemoConfig, run_demo
    from .eval.commands import RoutingConfig, run_routing
    from .recipes.dmu.command import DMUCommand, run_dmu_command
    from .recipes.sparse_command import run_sparse
    from .recipes.sparse_config import SparseConfig
    from .research.compare.arms import CompareConfig
    from .research.compare.run import run_compare
    from .research.replicate import ReplicateConfig, run_replicate
    from .train.command import TrainCommand, run_train

    # eval/routing batch pairs for speed only; --batch-size is the training batch whose pairs are negatives
    forward_batch = {"--batch-size": "--forward-batch-size"}
    return [
        Command("sparse", SparseConfig, run_sparse),
        Command("demo", MainJobConfig, run_main_job),
        Command("sparse-demo", SparseDemoConfig, run_demo),
        Command("make-digit-grids", DigitGridsConfig, run_make_digit_grids),
        Command("init-base", InitBaseConfig, run_init_base),
        Command("train", TrainCommand, run_train),
        Command("dmu", DMUCommand, run_dmu_command),
        Command("compare", CompareConfig, run_compare),
        Command("replicate", ReplicateConfig, run_replicate),
        # eval, with the digit-grid demo's --digit-positions (the evaluator itself knows no demo)
        Command("eval", DigitEvalConfig, run_digit_eval, forward_batch),
        Command("routing", RoutingConfig, run_routing, forward_batch),
    ]


class _Renamed(argparse.Action):
    """An old flag whose name means something else in other commands: refused with the name to use here."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="?", help=argparse.SUPPRESS)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is the training batch of train, dmu and compare (pairs that are each "
                     f"other's negatives); this command batches only for speed: use {self.new} {values or 'N'}")


def build_parser() -> argparse.ArgumentParser:
    parser, sub = command_parser("python -m upcycle", __doc__)
    for command in commands():
        p = sub.add_parser(command.name, help=command.help, description=command.description)
        add_options(p, command.config)
        for old, new in command.renamed.items():
            p.add_argument(old, action=_Renamed, new=new)
        p.set_defaults(run=partial(_run, command))
    return parser


def _run(command: Command, args: argparse.Namespace) -> int:
    """Inside run_cli's error handling, so a value the config refuses is one `error:` line."""
    return command.run(options_from_args(command.config, args))


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)
