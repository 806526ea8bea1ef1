"""Command line of the LLaVA bridge: check, re-point and benchmark LLaVA checkpoints with CLIP(-MoE) or SigLIP(-MoE) towers.

    python -m mllm_bridge swap-tower checkpoints/llava-v1.5-7b --tower clip-moe-l14-336

Every command's parser is here, as data; the function that runs a command lives next to what it runs and gets
the parsed arguments. (LLaVA training has its own command line, `python -m mllm_bridge.train`, with LLaVA's flags.)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from encoder.tower import SELECT_FEATURES
from encoder.utils.cli import command_parser, positive_int, run_cli

# The command line wires the CPU demo in as defaults (make-tiny-llm, make-lmms-task, eval-lmms without --checkpoint);
# the fence allows this to command lines only.
from .embedded.evaluation import DEFAULT_BATCH_SIZE, DEFAULT_LIMIT, default_checkpoints
from .embedded.task_data import TASK_NAMES
from .llava.tower_info import tower_kinds
from .lmms.run import CHECKPOINT_ARGS, LLAVA_15_TASKS

Argument = tuple[tuple[str, ...], dict[str, Any]]


def arg(*flags: str, **kwargs: Any) -> Argument:
    """One `add_argument(*flags, **kwargs)`, kept as data."""
    return flags, kwargs


@dataclass(frozen=True)
class Command:
    name: str
    run: Callable[[argparse.Namespace], int]
    help: str
    description: str
    arguments: tuple[Argument, ...]
    epilog: str | None = None


def _limit(text: str) -> int | float:
    """lmms-eval's --limit: a count of documents, or a fraction of each task below 1."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive count (or a fraction below 1)")
    return int(value) if value >= 1 else value


OVERWRITE = arg("--overwrite", action="store_true", help="replace --out if it exists")
DIGIT_GRIDS = "a folder written by `python -m upcycle make-digit-grids`"


def commands() -> list[Command]:
    from .embedded.task_data import run_make_lmms_task
    from .embedded.training import run_make_tiny_llm
    from .llava.checks import run_check
    from .llava.init import run_init_llava
    from .llava.swap_tower import run_swap_tower
    from .lmms.run import run_eval_lmms

    return [
        Command(
            "check", run_check,
            "show the vision tower LLaVA will build for a checkpoint and every mismatch",
            "Show which vision tower class LLaVA will build for LLAVA_DIR (clip-moe-toolkit's CLIPMoEVisionTower or "
            "LLaVA's CLIPVisionTower), its MoE layout, hidden sizes (tower vs mm_hidden_size), select layer and "
            "feature, image processor, and every mismatch found.",
            (arg("llava_dir", metavar="LLAVA_DIR",
                 help="a LLaVA checkpoint directory (config.json with mm_vision_tower)"),),
            epilog="Exit status: 0 when the checkpoint and its tower fit, 1 when a mismatch was found, 2 on bad input.",
        ),
        Command(
            "swap-tower", run_swap_tower,
            f"point a LLaVA checkpoint's config.json at another {tower_kinds()} tower",
            "Rewrite LLAVA_DIR/config.json to use TOWER_DIR as its vision tower (absolute path), after checking that "
            f"the tower is a {tower_kinds()} directory whose hidden size equals mm_hidden_size (the projector's input "
            "width) and whose image size, patches and image processor fit. The old config is kept as config.json.bak "
            "(or config.json.bak-<time> if that exists); the new one is written atomically. On any mismatch nothing "
            "is written.",
            (arg("llava_dir", metavar="LLAVA_DIR", help="a LLaVA checkpoint directory"),
             arg("--tower", required=True, metavar="TOWER_DIR", help=f"a {tower_kinds()} directory"),
             arg("--select-layer", type=int, default=None, metavar="N",
                 help="hidden state LLaVA takes (index into the L+1 hidden states; -2 = penultimate block, as in "
                 "LLaVA-1.5; default: keep the checkpoint's)"),
             arg("--select-feature", choices=SELECT_FEATURES, default=None,
                 help="'patch' drops the CLS token, 'cls_patch' keeps it (default: keep the checkpoint's)")),
        ),
        Command(
            "make-tiny-llm", run_make_tiny_llm,
            "write a tiny random Llama with a tokenizer trained on a data set's texts (CPU demos)",
            "Writes a 2-layer Llama (random weights) and a Llama tokenizer trained offline on every text LLaVA's "
            "stage 1 and stage 2 would feed it from a digit-grid directory (train.json, train_qa.json): the language "
            "model of the embedded CPU runs. Real runs use a real LLM (e.g. lmsys/vicuna-7b-v1.5).",
            (arg("--data", required=True, help=DIGIT_GRIDS),
             arg("--out", required=True, help="output LLM directory"),
             arg("--hidden-size", type=int, default=128, help="model width (default 128)"),
             arg("--seed", type=int, default=0, help="initialisation seed (default 0)")),
        ),
        Command(
            "make-lmms-task", run_make_lmms_task,
            "turn a digit-grid data set into an lmms-eval task folder (for --include_path)",
            "Writes TASK_DIR with the digit-grid task YAML shipped in mllm_bridge/lmms/tasks/digit_grids "
            "(digit_grids_qa: one-word answers, exact match; digit_grids_mc: likelihood of each digit, accuracy) and "
            "their data, digit_grids.parquet: one document per question, images embedded, so the folder can be "
            "moved. Use it with `python -m lmms_eval --include_path TASK_DIR --tasks digit_grids_qa,digit_grids_mc`.",
            (arg("--data", required=True, metavar="DIR", help=DIGIT_GRIDS),
             arg("--out", required=True, metavar="TASK_DIR", help="task folder to write"),
             arg("--split", default="test", choices=("train", "test"), help="question file to use (default test)"),
             OVERWRITE),
        ),
        Command(
            "init-llava", run_init_llava,
            "write an untrained LLaVA checkpoint from a language model and a vision tower",
            "Builds a LLaVA-1.5-style model (mlp2x_gelu projector, select layer -2, patch features) of LLM_DIR around "
            "TOWER with LLaVA's own initialize_vision_modules, and saves it as a full checkpoint with the LLM's "
            "tokenizer (the tower stays in its directory). Its projector is untrained: a checkpoint for trying the "
            "loading and evaluation paths, not for meaningful scores.",
            (arg("--tower", required=True, help=f"a {tower_kinds()} directory"),
             arg("--llm", required=True, metavar="LLM_DIR", help="a saved Llama language model with its tokenizer"),
             arg("--out", required=True, help="output checkpoint directory"),
             arg("--seed", type=int, default=0, help="initialisation seed of the projector (default 0)"),
             OVERWRITE),
        ),
        Command(
            # without --checkpoint the embedded default (a demo) supplies the checkpoints; the runner knows no demo
            "eval-lmms", partial(run_eval_lmms, default=default_checkpoints),
            "benchmark LLaVA checkpoints with lmms-eval and write a comparison table",
            "Checks every checkpoint, tower and task first, reports (one line each) tasks whose data cannot be "
            "loaded here and skips them, then runs `python -m lmms_eval --model llava_clipmoe` once per checkpoint "
            "into OUT/runs/NAME (results JSON, samples, expert usage, log) and writes OUT/results.md (metrics side "
            "by side, expert usage per MoE layer) and OUT/summary.json. Without --checkpoint: the embedded default, "
            "the digit-grid tasks on the checkpoints of the embedded training run in --default-dir (stage 2 and "
            "stage 1 when present, else an untrained one built from the same parts), each with its CLIP-MoE tower "
            "and with the dense CLIP it was upcycled from.",
            (arg("--checkpoint", action="append", default=[], metavar="NAME=DIR[,key=value]",
                 help="a LLaVA checkpoint to evaluate (repeat to compare). Extra llava_clipmoe model args for this "
                 f"checkpoint after commas: {', '.join(CHECKPOINT_ARGS)}; e.g. "
                 "moe=runs/llava,vision_tower=runs/clip-moe or stage1=runs/projector,model_base=runs/llm"),
             arg("--tasks", help="comma-separated lmms-eval tasks (default: LLaVA-1.5's set, "
                 f"{','.join(LLAVA_15_TASKS)}; the embedded default: {','.join(TASK_NAMES)})"),
             arg("--include-path", metavar="DIR", help="folder of extra task YAML (lmms-eval's --include_path)"),
             arg("--limit", type=_limit, help="documents per task (lmms-eval's --limit; default: all, "
                 f"{DEFAULT_LIMIT} in the embedded default)"),
             arg("--batch-size", type=positive_int, help="requests per forward pass (default 1, "
                 f"{DEFAULT_BATCH_SIZE} in the embedded default)"),
             arg("--device", help="cpu, cuda or cuda:N (default: a GPU when one is visible, else the CPU; the "
                 "embedded default: cpu)"),
             arg("--model-args", metavar="K=V,...", help="llava_clipmoe model args for every checkpoint that sets "
                 "no value of its own (keys as for --checkpoint; e.g. conv_template=plain,dtype=bfloat16)"),
             arg("--out", help="output directory (default runs/lmms_eval/<date>-<time>)"),
             OVERWRITE,
             arg("--default-dir", default="runs/llava-default",
                 help="the embedded default's folder, shared with pretrain_projector.sh / finetune.sh "
                 "(default runs/llava-default)")),
            epilog="Exit status: 0 when every checkpoint ran, 1 when one failed, 2 on bad input.",
        ),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser, sub = command_parser("python -m mllm_bridge", __doc__)
    for command in commands():
        p = sub.add_parser(command.name, help=command.help, description=command.description, epilog=command.epilog)
        for flags, kwargs in command.arguments:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv)
