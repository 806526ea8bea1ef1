"""What every `python -m <package>` command line shares: the parser and its error shape, argument types, the run
wrapper."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from transformers.utils import logging as hf_logging

from .errors import UserError
from .files import environment_error_line


class UserErrorParser(argparse.ArgumentParser):
    """argparse with the project's error shape: one `error: ...` line, exit code 2, no usage dump."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def command_parser(prog: str, doc: str) -> tuple[UserErrorParser, argparse._SubParsersAction]:
    """The parser of `python -m <package>` (described by the first line of the module's `doc`) and the action its
    commands are added to; a command is required."""
    parser = UserErrorParser(prog=prog, description=doc.strip().splitlines()[0])
    return parser, parser.add_subparsers(dest="command", required=True, metavar="COMMAND")


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_device(name: str | None):
    """A --device value (cpu, cuda, cuda:N; None = a GPU when one is visible), checked as user input."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} not understood; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is visible here; use --device cpu")
    return device


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run the chosen command (`args.run`); user errors print one line and return 2, and so
    does a write or open that failed because of the disk or the path (full, read-only, permission denied, a file
    in the way) where no writer translated it."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    hf_logging.disable_progress_bar()  # per-file loading bars would drown the command's own output
    try:
        code = args.run(args) or 0
    except UserError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    except Exception as err:  # a write that failed outside the atomic writers: the disk or the path, not a bug
        line = environment_error_line(err)
        if line is None:
            raise
        print("error: " + " ".join(line.split()), file=sys.stderr)
        return 2
    # The ranks of a training command leave their process group before the interpreter exits (see there why).
    from ..training.distributed import leave_process_group

    leave_process_group()
    return code


def exit_program(code: int) -> NoReturn:
    """End a `python -m` command with its status `code` (what every package's `__main__` calls).

    A failed command whose process is still in a process group (a rank of a launch that stopped on an error) ends
    here without the interpreter's finalization. It cannot leave the group first (`leave_process_group` waits for
    the peers, which may sit in a collective that will never complete), and left alive, the group's gloo threads run
    on into the finalization, where they may abort the process: the launcher then reports SIGABRT instead of the
    command's status 2 (seen with FSDP2 on a loaded machine). Nothing is lost: the error line is printed and every
    output is written atomically, or not at all, before this point; only the standard streams need flushing."""
    dist = sys.modules.get("torch.distributed")  # a command that never imported torch has no group
    if code and dist is not None and dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
