"""What a bare `bash scripts/eval_lmms.sh` evaluates: the digit-grid tasks, on the CPU, on the LLaVA checkpoints the
embedded training run made (`scripts/pretrain_projector.sh`, `scripts/finetune.sh` without flags), each with its
CLIP-MoE tower and once more with the dense CLIP it was upcycled from, swapped in through `vision_tower=`.

Before any training has run, the same parts (data, towers, tiny LLM; built by `embedded.training` and shared with
the training run) make one untrained checkpoint, so the whole evaluation path runs end to end. Sparse upcycling
preserves the dense function and the tower stays frozen in training, so the two tower columns should agree;
the expert-usage table shows how the CLIP-MoE's routers spread the image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from encoder.utils.errors import UserError

from ..lmms.checkpoints import Checkpoint
from .task_data import TASK_NAMES

DEFAULT_LIMIT = 100  # questions per task (the multiple-choice task scores 10 answers each)
DEFAULT_BATCH_SIZE = 8
DENSE_BASE = "clip-base"  # where training.ensure_assets keeps the dense CLIP it upcycles


@dataclass(frozen=True)
class DefaultPlan:
    checkpoints: list[Checkpoint]
    include_path: Path  # the digit-grid task folder
    tasks: list[str]


def default_plan(root: str | Path) -> DefaultPlan:
    """Checkpoints and task folder of the embedded default under `root` (the training runs' folder), building the
    shared parts, an untrained checkpoint (when no stage has run) and the task folder where they are missing."""
    from ..llava.init import init_llava
    from .task_data import make_lmms_task
    from .training import FINETUNE_OUTPUT, PRETRAIN_OUTPUT, ensure_assets

    root = Path(root)
    assets = ensure_assets(root)
    stage1, stage2 = root / PRETRAIN_OUTPUT, root / FINETUNE_OUTPUT
    trained = []
    if (stage2 / "config.json").is_file():
        trained.append(Checkpoint("stage2", str(stage2)))
    if (stage1 / "config.json").is_file():
        trained.append(Checkpoint("stage1", str(stage1), {"model_base": str(assets.llm), "conv_template": "plain"}))
    if not trained:
        untrained = root / "llava-untrained"
        if not (untrained / "config.json").is_file():
            init_llava(untrained, assets.tower, llm=assets.llm, overwrite=True)
        trained.append(Checkpoint("untrained", str(untrained)))
    checkpoints = []
    for c in trained:
        checkpoints.append(Checkpoint(f"{c.name}-clip-moe", c.pretrained, c.args))
        if (root / DENSE_BASE / "config.json").is_file():
            checkpoints.append(Checkpoint(f"{c.name}-dense-tower", c.pretrained,
                                          {**c.args, "vision_tower": str(root / DENSE_BASE)}))
    tasks_dir = root / "lmms-tasks"
    make_lmms_task(assets.data, tasks_dir, overwrite=True)  # seconds; keeps the YAML in step with the package
    return DefaultPlan(checkpoints, tasks_dir, list(TASK_NAMES))


def default_checkpoints(args) -> list[Checkpoint]:
    """eval-lmms without --checkpoint: the embedded default's checkpoints; it fills in the task folder, tasks, limit,
    batch size and device too, where no flag gave them."""
    if args.include_path is not None:
        raise UserError("--include-path needs --checkpoint; the embedded default brings its own task folder")
    plan = default_plan(args.default_dir)
    args.include_path = str(plan.include_path)
    args.tasks = args.tasks or ",".join(plan.tasks)
    args.limit = DEFAULT_LIMIT if args.limit is None else args.limit
    args.batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    args.device = args.device or "cpu"
    return plan.checkpoints
