"""`python -m mllm_bridge eval-lmms`: benchmark several LLaVA checkpoints with lmms-eval and compare them in one table.

Everything that would fail later is checked first, each with one line: every checkpoint and its tower (from the
files), every task name (against lmms-eval's task index and `--include-path`), and whether each task's data loads
here (the LLaVA-1.5 benchmarks need the Hugging Face hub or its cache; a task that cannot load is reported and
skipped). Each checkpoint then runs through lmms-eval's own command line (`python -m lmms_eval --model
llava_clipmoe ...`) in its own process, so one run's memory and state never reach the next.
"""

from __future__ import annotations

import difflib
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from encoder.utils.errors import UserError, first_line
from encoder.utils.files import check_output_dir

from ..llava.loading import plan_checkpoint
from .checkpoints import Checkpoint
from .plugin import MODEL_ID
from .results import RunResult, read_run, write_report

logger = logging.getLogger(__name__)

LLAVA_15_TASKS = ("mme", "mmbench_en_dev", "pope", "gqa", "textvqa_val", "scienceqa_img", "seedbench")
# llava_clipmoe model args a --checkpoint may set for itself
CHECKPOINT_ARGS = ("model_base", "vision_tower", "conv_template", "dtype", "max_new_tokens")


def parse_checkpoint(text: str, common_args: dict[str, str] | None = None) -> Checkpoint:
    """'NAME=DIR[,key=value...]' or 'DIR[,key=value...]' (the name is then the directory's name); `common_args`
    (from --model-args) apply where the checkpoint sets no value of its own."""
    head, _, extras = text.partition(",")
    name, sep, path = head.partition("=")
    if not sep:
        name, path = Path(head).name, head
    if not name or not path:
        raise UserError(f"--checkpoint {text!r}: expected NAME=DIR[,key=value...]")
    return Checkpoint(name, path, {**(common_args or {}), **parse_model_args(extras, f"--checkpoint {text!r}")})


def parse_model_args(text: str | None, where: str) -> dict[str, str]:
    """'key=value,...' with keys from CHECKPOINT_ARGS (the rest of llava_clipmoe's args are set by eval-lmms)."""
    args = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in CHECKPOINT_ARGS:
            raise UserError(f"{where}: {item!r} is not key=value with key one of {', '.join(CHECKPOINT_ARGS)}")
        args[key] = value
    return args


def check_checkpoints(checkpoints: list[Checkpoint]) -> None:
    names = [c.name for c in checkpoints]
    if len(set(names)) != len(names):
        raise UserError(f"checkpoint names repeat ({', '.join(names)}); name them with --checkpoint NAME=DIR")
    for c in checkpoints:
        try:
            plan_checkpoint(c.pretrained, c.args.get("model_base"), c.args.get("vision_tower"))
        except UserError as err:
            raise UserError(f"checkpoint {c.name}: {err}") from None


def task_manager(include_path: str | None):
    """lmms-eval's task index (its own tasks plus `include_path`), with its logging kept to warnings."""
    from loguru import logger as lmms_logger

    lmms_logger.remove()
    lmms_logger.add(sys.stderr, level="WARNING")
    from lmms_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include-path {include_path} is not a directory; pass a folder of lmms-eval task YAML "
                        "(e.g. one written by `python -m mllm_bridge make-lmms-task`)")
    return TaskManager("WARNING", include_path=include_path, model_name=MODEL_ID)


def check_task_names(manager, names: list[str]) -> None:
    """UserError (one line) naming every task lmms-eval does not know, with close matches."""
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known and "*" not in n]
    if not unknown:
        return
    hints = [f"{n} (did you mean {', '.join(close)}?)" if (close := difflib.get_close_matches(n, known, 3)) else n
             for n in unknown]
    raise UserError(f"unknown lmms-eval task(s): {'; '.join(hints)}; list them with `python -m lmms_eval --tasks "
                    "list`, and give local task folders with --include-path")


def data_problem(manager, name: str) -> str | None:
    """Why task `name`'s data cannot be loaded here (first line of the loader's error), or None when it loads."""
    from lmms_eval.tasks import get_task_dict
    from tenacity import RetryError

    try:
        get_task_dict([name], manager)
    except RetryError as err:  # lmms-eval retries hub downloads, then wraps the last error
        return first_line(err.last_attempt.exception())
    except (OSError, ValueError, ImportError) as err:
        return first_line(err)
    return None


def run_checkpoint(checkpoint: Checkpoint, tasks: list[str], out: Path, include_path: str | None,
                   limit: int | None, batch_size: int, device: str | None) -> RunResult:
    """`python -m lmms_eval` for one checkpoint into out/runs/NAME; its output goes to lmms_eval.log there."""
    run_dir = out / "runs" / checkpoint.name
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "lmms_eval", "--model", MODEL_ID, "--model_args", checkpoint.model_args(),
           "--tasks", ",".join(tasks), "--batch_size", str(batch_size), "--output_path", str(run_dir),
           "--log_samples", "--verbosity", "WARNING"]
    cmd += ["--device", device] if device else []
    cmd += ["--limit", str(limit)] if limit is not None else []
    cmd += ["--include_path", str(include_path)] if include_path else []
    log = run_dir / "lmms_eval.log"
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    return read_run(checkpoint.name, checkpoint.pretrained, run_dir, log)


def evaluate(checkpoints: list[Checkpoint], tasks: list[str], out: str | Path, include_path: str | None = None,
             limit: int | None = None, batch_size: int = 1, device: str | None = None, overwrite: bool = False,
             echo=print) -> list[RunResult]:
    """Check everything, run every checkpoint on the tasks whose data loads, write results.md and summary.json."""
    out = check_output_dir(out, overwrite)
    if not checkpoints:
        raise UserError("no checkpoint given; pass --checkpoint NAME=DIR (repeat it to compare checkpoints)")
    check_checkpoints(checkpoints)
    manager = task_manager(include_path)
    check_task_names(manager, tasks)
    skipped = {}
    for name in tasks:
        problem = data_problem(manager, name)
        if problem is not None:
            skipped[name] = problem
            echo(f"task {name}: its data cannot be loaded here (offline, not in the Hugging Face cache?): "
                 f"{problem}; skipped")
    runnable = [t for t in tasks if t not in skipped]
    if not runnable:
        raise UserError("no task's data can be loaded here; run with network access (or a filled Hugging Face "
                        "cache), or evaluate local tasks (--include-path, e.g. the digit-grid task)")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    results = []
    for checkpoint in checkpoints:
        echo(f"[{checkpoint.name}] lmms-eval on {', '.join(runnable)} (log: {out / 'runs' / checkpoint.name})")
        result = run_checkpoint(checkpoint, runnable, out, include_path, limit, batch_size, device)
        echo(f"[{checkpoint.name}] " + (result.brief() if result.ok else f"FAILED: {result.error}"))
        results.append(result)
    report = write_report(out, results, runnable, skipped, limit)
    echo(f"table: {report}")
    return results


def run_eval_lmms(args, default: Callable[..., list[Checkpoint]] | None = None) -> int:
    """`python -m mllm_bridge eval-lmms`: exit status 1 when a checkpoint's run failed.

    default: what runs without --checkpoint (the command line passes the embedded default's
    `default_checkpoints`, which may fill in unset flags on `args`); the runner itself knows no demo.
    """
    import time

    common = parse_model_args(args.model_args, "--model-args")
    fallback = default(args) if not args.checkpoint and default is not None else []
    checkpoints = ([parse_checkpoint(text, common) for text in args.checkpoint]
                   or [Checkpoint(c.name, c.pretrained, {**common, **c.args}) for c in fallback])
    tasks = [t.strip() for t in (args.tasks or ",".join(LLAVA_15_TASKS)).split(",") if t.strip()]
    out = args.out or f"runs/lmms_eval/{time.strftime('%Y%m%d-%H%M%S')}"
    results = evaluate(checkpoints, tasks, out, args.include_path, args.limit, args.batch_size or 1, args.device,
                       args.overwrite)
    return 0 if all(r.ok for r in results) else 1
