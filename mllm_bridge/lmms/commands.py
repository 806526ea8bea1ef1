"""The benchmarking commands of `python -m mllm_bridge`: make-lmms-task, init-llava, eval-lmms."""

from __future__ import annotations

import argparse

from encoder.utils.errors import UserError

from .embedded_default import DEFAULT_BATCH_SIZE, DEFAULT_LIMIT
from .run import CHECKPOINT_ARGS, LLAVA_15_TASKS
from .task_data import TASK_NAMES


def add_lmms_commands(commands) -> None:
    p = commands.add_parser(
        "make-lmms-task",
        help="turn a digit-grid data set into an lmms-eval task folder (for --include_path)",
        description="Writes TASK_DIR with the digit-grid task YAML shipped in mllm_bridge/lmms/tasks/digit_grids "
        "(digit_grids_qa: one-word answers, exact match; digit_grids_mc: likelihood of each digit, accuracy) and "
        "their data, digit_grids.parquet: one document per question, images embedded, so the folder can be moved. "
        "Use it with `python -m lmms_eval --include_path TASK_DIR --tasks digit_grids_qa,digit_grids_mc`.",
    )
    p.add_argument("--data", required=True, metavar="DIR",
                   help="a folder written by `python -m upcycle make-digit-grids`")
    p.add_argument("--out", required=True, metavar="TASK_DIR", help="task folder to write")
    p.add_argument("--split", default="test", choices=("train", "test"), help="question file to use (default test)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=_make_lmms_task)

    p = commands.add_parser(
        "init-llava",
        help="write an untrained LLaVA checkpoint from a language model and a vision tower",
        description="Builds a LLaVA-1.5-style model (mlp2x_gelu projector, select layer -2, patch features) of "
        "LLM_DIR around TOWER with LLaVA's own initialize_vision_modules, and saves it as a full checkpoint with "
        "the LLM's tokenizer (the tower stays in its directory). Its projector is untrained: a checkpoint for "
        "trying the loading and evaluation paths, not for meaningful scores.",
    )
    p.add_argument("--tower", required=True, help="CLIP or CLIP-MoE directory")
    p.add_argument("--llm", required=True, metavar="LLM_DIR", help="a saved Llama language model with its tokenizer")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed of the projector (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=_init_llava)

    p = commands.add_parser(
        "eval-lmms",
        help="benchmark LLaVA checkpoints with lmms-eval and write a comparison table",
        description="Checks every checkpoint, tower and task first, reports (one line each) tasks whose data "
        "cannot be loaded here and skips them, then runs `python -m lmms_eval --model llava_clipmoe` once per "
        "checkpoint into OUT/runs/NAME (results JSON, samples, expert usage, log) and writes OUT/results.md "
        "(metrics side by side, expert usage per MoE layer) and OUT/summary.json. Without --checkpoint: the "
        "embedded default, the digit-grid tasks on the checkpoints of the embedded training run in --default-dir "
        "(stage 2 and stage 1 when present, else an untrained one built from the same parts), each with its "
        "CLIP-MoE tower and with the dense CLIP it was upcycled from.",
        epilog="Exit status: 0 when every checkpoint ran, 1 when one failed, 2 on bad input.",
    )
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR[,key=value]",
                   help="a LLaVA checkpoint to evaluate (repeat to compare). Extra llava_clipmoe model args for this "
                   f"checkpoint after commas: {', '.join(CHECKPOINT_ARGS)}; e.g. "
                   "moe=runs/llava,vision_tower=runs/clip-moe or stage1=runs/projector,model_base=runs/llm")
    p.add_argument("--tasks", help="comma-separated lmms-eval tasks (default: LLaVA-1.5's set, "
                   f"{','.join(LLAVA_15_TASKS)}; the embedded default: {','.join(TASK_NAMES)})")
    p.add_argument("--include-path", metavar="DIR", help="folder of extra task YAML (lmms-eval's --include_path)")
    p.add_argument("--limit", type=_limit, help="documents per task (lmms-eval's --limit; default: all, "
                   f"{DEFAULT_LIMIT} in the embedded default)")
    p.add_argument("--batch-size", type=_positive, help="requests per forward pass (default 1, "
                   f"{DEFAULT_BATCH_SIZE} in the embedded default)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: a GPU when one is visible, else the CPU; "
                   "the embedded default: cpu)")
    p.add_argument("--model-args", metavar="K=V,...", help="llava_clipmoe model args for every checkpoint that "
                   "sets no value of its own (keys as for --checkpoint; e.g. conv_template=plain,dtype=bfloat16)")
    p.add_argument("--out", help="output directory (default runs/lmms_eval/<date>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--default-dir", default="runs/llava-default",
                   help="the embedded default's folder, shared with pretrain_projector.sh / finetune.sh "
                   "(default runs/llava-default)")
    p.set_defaults(run=_eval_lmms)


def _make_lmms_task(args: argparse.Namespace) -> int:
    from .task_data import TASK_NAMES, make_lmms_task

    count = make_lmms_task(args.data, args.out, args.split, args.overwrite)
    print(f"{count} questions written to {args.out}; evaluate with "
          f"`python -m lmms_eval --include_path {args.out} --tasks {','.join(TASK_NAMES)} ...`")
    return 0


def _init_llava(args: argparse.Namespace) -> int:
    from ..llava.init import init_llava

    out = init_llava(args.out, args.tower, args.llm, args.seed, args.overwrite)
    print(f"LLaVA checkpoint written to {out} (tower {args.tower}; untrained projector)")
    return 0


def _eval_lmms(args: argparse.Namespace) -> int:
    import time

    from .run import Checkpoint, evaluate, parse_checkpoint, parse_model_args

    common = parse_model_args(args.model_args, "--model-args")
    checkpoints = ([parse_checkpoint(text, common) for text in args.checkpoint]
                   or [Checkpoint(c.name, c.pretrained, {**common, **c.args}) for c in _embedded_default(args)])
    tasks = [t.strip() for t in (args.tasks or ",".join(LLAVA_15_TASKS)).split(",") if t.strip()]
    out = args.out or f"runs/lmms_eval/{time.strftime('%Y%m%d-%H%M%S')}"
    results = evaluate(checkpoints, tasks, out, args.include_path, args.limit, args.batch_size or 1, args.device,
                       args.overwrite)
    return 0 if all(r.ok for r in results) else 1


def _embedded_default(args: argparse.Namespace) -> list:
    """No --checkpoint: the embedded default's checkpoints; it fills in the task folder, tasks, limit, batch size
    and device too, where no flag gave them."""
    from .embedded_default import default_plan

    if args.include_path is not None:
        raise UserError("--include-path needs --checkpoint; the embedded default brings its own task folder")
    plan = default_plan(args.default_dir)
    args.include_path = str(plan.include_path)
    args.tasks = args.tasks or ",".join(plan.tasks)
    args.limit = DEFAULT_LIMIT if args.limit is None else args.limit
    args.batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    args.device = args.device or "cpu"
    return plan.checkpoints


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 1")
    return value


def _limit(text: str) -> int | float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive count (or a fraction below 1)")
    return int(value) if value >= 1 else value
