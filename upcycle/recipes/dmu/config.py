"""The settings of a DMU run (`DMUConfig`): checked when made, fingerprinted so a --resume must repeat them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from encoder.utils.options import check_options, option, option_like

from ...train.config import NOT_SHAPING, TrainConfig, TrainingData, TrainOutput
from ..sparse_config import SparseConfig
from .clustering import SMALL_CLUSTER_RULES

# Settings that may change between a run and its --resume without invalidating finished work: where the run
# writes, and the training settings that shape nothing (TrainConfig's list, the one home of that choice).
RESUMABLE_SETTINGS = ("out", "work_dir", "overwrite", *NOT_SHAPING)
# Settings added after work directories were made, with the value those runs had: an older manifest that lacks
# one recorded that value, so its --resume is not refused for a setting it could not name.
ADDED_SETTINGS = {"small_clusters": "merge"}


@dataclass(frozen=True)
class DMUConfig:
    """Every field is the `upcycle dmu` flag of the same name. The base, layout and training fields are the
    same settings as `upcycle sparse`'s and TrainConfig's (help and accepted values; DMU's flag names and
    defaults), checked when the config is made: nonsense stops before the base is loaded, not at the stage that
    first uses it."""

    base: str = option_like(SparseConfig, "base")
    train_data: str = option_like(TrainingData, "train_data")
    out: str = option_like(SparseConfig, "out")
    image_root: str | None = option_like(TrainingData, "image_root")
    skip_missing: bool = option_like(TrainingData, "skip_missing")
    num_experts: int = option_like(SparseConfig, "num_experts", kind=int, low=2,
                                   hint="DMU needs at least 2 experts (the base + 1 stage)")
    top_k: int = option_like(SparseConfig, "top_k")
    moe_layers: str = option_like(SparseConfig, "moe_layers")
    towers: tuple[str, ...] = option_like(SparseConfig, "towers")
    clusters_per_modality: int = option("--clusters-per-modality", "k-means clusters for images and for texts per "
                                        "stage (3 makes 9 joint clusters)", 3, kind=int, low=1)
    small_clusters: str = option("--small-clusters", "what becomes of accumulated clusters smaller than one global "
                                 "batch: merge = fold each into the cluster with the nearest centroid (may mix "
                                 "earlier-stage clusters); drop = leave their pairs out of the stage, as the "
                                 "reference code does; bin = group them into batch-sized bins inside their "
                                 "earlier-stage cluster (no pair lost, stages stay nested)", "merge", kind=str,
                                 choices=tuple(SMALL_CLUSTER_RULES),
                                 default_text="merge, what runs made before this option did")
    stage_epochs: float = option_like(TrainConfig, "epochs", flag="--stage-epochs", help="epochs per MCL stage")
    router_epochs: float = option_like(TrainConfig, "epochs", flag="--router-epochs",
                                       help="epochs of router training")
    stage_max_steps: int | None = option_like(TrainConfig, "max_steps", flag="--stage-max-steps",
                                              help="cap the optimizer steps per stage (overrides --stage-epochs)",
                                              hint="leave it out to train for --stage-epochs")
    router_max_steps: int | None = option_like(TrainConfig, "max_steps", flag="--router-max-steps",
                                               help="cap the router-training steps (overrides --router-epochs)",
                                               hint="leave it out to train for --router-epochs")
    batch_size: int = option_like(TrainConfig, "batch_size")
    lr: float = option_like(TrainConfig, "lr", help="MCL stage learning rate")
    router_lr: float = option_like(TrainConfig, "lr", 1e-6, flag="--router-lr", help="router learning rate")
    weight_decay: float = option_like(TrainConfig, "weight_decay")
    warmup_ratio: float = option_like(TrainConfig, "warmup_ratio")
    label_smoothing: float = option_like(TrainConfig, "label_smoothing", 0.1,
                                         help="InfoNCE label smoothing of a CLIP base's stages and router training "
                                         "(a SigLIP base trains with its sigmoid loss, which has none)")
    # None: the base's own (frozen) logit scale
    logit_scale: float | None = option_like(TrainConfig, "logit_scale", 100.0, default_text=None,
                                            help="fixed logit multiplier (DMU's published value by default) or "
                                            "'learnable' = the base's own, frozen")
    # DMU's own weights (no z-loss by default), written into the CLIP-MoE config it makes, where router training
    # reads them like any training of that model
    aux_loss_coef: float = option_like(TrainConfig, "aux_loss_coef", 0.01, default_text=None, optional=False,
                                       help="load-balance weight in router training")
    z_loss_coef: float = option_like(TrainConfig, "z_loss_coef", 0.0, default_text=None, optional=False)
    checkpoint_every: int = option_like(TrainConfig, "checkpoint_every")
    num_workers: int | None = option_like(TrainConfig, "num_workers")
    precision: str = option_like(TrainConfig, "precision")
    seed: int = option_like(TrainConfig, "seed")
    work_dir: str | None = option_like(TrainOutput, "work_dir")
    overwrite: bool = option_like(TrainOutput, "overwrite")

    def __post_init__(self):
        check_options(self)

    def fingerprint(self) -> dict:
        """The settings that decide the result; a --resume must repeat them."""
        return {k: jsonable(v) for k, v in asdict(self).items() if k not in RESUMABLE_SETTINGS}

    def train_config(self, phase: str, desc: str, sigmoid: bool = False) -> TrainConfig:
        """The TrainConfig of one phase ("ffn": an MCL stage; "router": router training). Every field of this
        config that is a TrainConfig setting (the same option, under the same name) passes as given; the phase
        picks what trains, its learning rate and length; the loss weights are left to the model trained (the
        CLIP-MoE config they were written into; none on the dense base a stage trains). The loss is the base
        family's (`sigmoid`: a SigLIP base's pairwise sigmoid loss, which takes no label smoothing)."""
        lr, epochs, max_steps = ((self.lr, self.stage_epochs, self.stage_max_steps) if phase == "ffn" else
                                 (self.router_lr, self.router_epochs, self.router_max_steps))
        shared = {f.name: getattr(self, f.name) for f in fields(TrainConfig) if f.name in _FIELD_NAMES}
        if sigmoid:
            shared["label_smoothing"] = 0.0
        return TrainConfig(**{**shared, "trainable": phase, "lr": lr, "epochs": epochs, "max_steps": max_steps,
                              "aux_loss_coef": None, "z_loss_coef": None, "desc": desc})


_FIELD_NAMES = frozenset(f.name for f in fields(DMUConfig))


def recorded_settings(manifest: dict) -> dict:
    """The settings a manifest records, with `ADDED_SETTINGS` filled in where it predates them."""
    return {**ADDED_SETTINGS, **manifest.get("settings", {})}


def default_work_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.dmu-work"


def jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return value
