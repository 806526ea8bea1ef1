"""Where a training run's numbers go: `metrics.jsonl` always, TensorBoard and W&B as `--report_to` asks.

Only the main process writes; the others get a log that drops everything, so the loop never branches on rank.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..utils.errors import UserError

logger = logging.getLogger(__name__)

REPORT_TARGETS = ("tensorboard", "wandb", "all", "none")


class RunLog:
    """Appends one JSON line per logged step to `metrics.jsonl` and mirrors the scalars to the trackers.

    `start_step`: the step the run (re)starts from. Lines of later steps are what an interrupted run logged
    after its last checkpoint; the resumed run logs those steps again, so they are dropped first (a fresh run
    starts from 0 and keeps none) and metrics.jsonl never holds a step twice.
    """

    def __init__(self, output_dir: Path, logging_dir: Path, report_to: list[str], run_name: str, config: dict,
                 start_step: int = 0):
        unknown = [t for t in report_to if t not in REPORT_TARGETS]
        if unknown:
            raise UserError(f"--report_to {' '.join(unknown)} is not supported; use any of {', '.join(REPORT_TARGETS)}")
        wanted = set(report_to)
        if "all" in wanted:
            wanted = {"tensorboard", "wandb"}
        output_dir.mkdir(parents=True, exist_ok=True)
        _drop_replayed(output_dir / "metrics.jsonl", start_step)
        self._metrics = open(output_dir / "metrics.jsonl", "a")
        self._tensorboard = _tensorboard(logging_dir) if "tensorboard" in wanted else None
        self._wandb = _wandb(run_name, config, output_dir) if "wandb" in wanted else None

    def log(self, step: int, values: dict[str, float]) -> None:
        self._metrics.write(json.dumps({"step": step, **values}) + "\n")
        self._metrics.flush()
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(f"train/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self._metrics.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def _drop_replayed(path: Path, start_step: int) -> None:
    """Keep only the lines of steps <= start_step (and none that cannot be read: a line cut by a kill)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if step <= start_step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)


class NullLog:
    """The log of a non-main process."""

    def log(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # a dependency, but its absence must not stop a long run
        logger.warning("tensorboard is not installed; only metrics.jsonl is written")
        return None
    return SummaryWriter(str(log_dir))


def _wandb(run_name: str, config: dict, output_dir: Path):
    try:
        import wandb
    except ImportError:
        raise UserError("--report_to wandb needs the wandb package; install it or use --report_to tensorboard") from None
    return wandb.init(name=run_name, config=config, dir=str(output_dir))
