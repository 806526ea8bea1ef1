"""The settings of a DMU run (`DMUConfig`): checked when made, fingerprinted so a --resume must repeat them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ...train.config import check_settings, same_limits, setting

# Settings that may change between a run and its --resume without invalidating finished work.
RESUMABLE_SETTINGS = ("out", "work_dir", "overwrite", "num_workers", "checkpoint_every")


@dataclass
class DMUConfig:
    base: str
    train_data: str
    out: str
    image_root: str | None = None
    skip_missing: bool = False
    # The training fields accept what TrainConfig's accept (its Limits, under DMU's flag names), checked when
    # the config is made: nonsense stops before the base is loaded, not at the stage that first uses it.
    num_experts: int = setting(4, "--num-experts", int, low=2,
                               hint="DMU needs at least 2 experts (the base + 1 stage)")
    top_k: int = 2
    moe_layers: str = "all"
    towers: tuple[str, ...] = ("vision", "text")
    clusters_per_modality: int = setting(3, "--clusters-per-modality", int, low=1)
    stage_epochs: float = same_limits("epochs", 1.0, "--stage-epochs")
    router_epochs: float = same_limits("epochs", 1.0, "--router-epochs")
    stage_max_steps: int | None = same_limits("max_steps", None, "--stage-max-steps",
                                              hint="leave it out to train for --stage-epochs")
    router_max_steps: int | None = same_limits("max_steps", None, "--router-max-steps",
                                               hint="leave it out to train for --router-epochs")
    batch_size: int = same_limits("batch_size", 64)
    lr: float = same_limits("lr", 1e-5)
    router_lr: float = same_limits("lr", 1e-6, "--router-lr")
    weight_decay: float = same_limits("weight_decay", 0.2)
    warmup_ratio: float = same_limits("warmup_ratio", 0.03)
    label_smoothing: float = same_limits("label_smoothing", 0.1)
    # None: the base's own (frozen) logit scale
    logit_scale: float | None = same_limits("logit_scale", 100.0)
    aux_loss_coef: float = same_limits("aux_loss_coef", 0.01)
    z_loss_coef: float = same_limits("z_loss_coef", 0.0)
    checkpoint_every: int = same_limits("checkpoint_every", 500)
    num_workers: int | None = same_limits("num_workers", None)
    precision: str = same_limits("precision", "auto")
    seed: int = same_limits("seed", 0)
    work_dir: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        check_settings(self)

    def fingerprint(self) -> dict:
        """The settings that decide the result; a --resume must repeat them."""
        return {k: jsonable(v) for k, v in asdict(self).items() if k not in RESUMABLE_SETTINGS}


def default_work_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.dmu-work"


def jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return value
