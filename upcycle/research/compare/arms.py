"""The arms of the upcycling comparison, each trained from the same base with the same budget of pairs.

Budget: DMU sees the training set (E-1) x stage_epochs times in its MCL stages plus router_epochs times in
router training; every other arm trains for that many whole epochs. Whole epochs show every pair exactly
once (the batch plan guarantees it), so "pairs seen" is equal by construction, and `train_arm` returns the
count so the caller can assert it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from encoder.loading import load_clip
from encoder.save import save_clip_moe
from encoder.utils.errors import UserError
from encoder.utils.options import check_options, option, option_like, options_of

from ...data import ImageTextDataset, model_tokenizer_fn, processor_transform, read_pairs
from ...recipes.dmu import DMUConfig, run_dmu
from ...recipes.sparse import sparse_upcycle
from ...recipes.sparse_config import SparseConfig
from ...train import ContrastiveTrainer, TrainConfig

ARMS = ("base", "dense", "dense-ffn", "sparse-even", "sparse-all", "dmu")
ARM_TITLES = {
    "base": "base (no extra training)",
    "dense": "dense, continued fine-tuning (all weights)",
    "dense-ffn": "dense, continued fine-tuning of the FFNs only (DMU's trainable set, without its clusters)",
    "sparse-even": "sparse upcycling, MoE every other layer + continued training (CLIP-UP)",
    "sparse-all": "sparse upcycling, MoE in all layers + continued training (CLIP-UP)",
    "dmu": "DMU: MCL stages + router training (CLIP-MoE)",
}


@dataclass(frozen=True)
class ArmSettings:
    """One recipe per arm family; learning rates are per arm because the recipes differ in what they train.
    The fields without a flag are fixed for the comparison."""

    num_experts: int = option_like(SparseConfig, "num_experts")
    top_k: int = option_like(SparseConfig, "top_k")
    # whole epochs, so every arm's budget is a whole number of passes (see the module docstring)
    stage_epochs: int = option("--stage-epochs", "epochs per DMU stage", 1, kind=int, low=1)
    router_epochs: int = option("--router-epochs", "epochs of DMU router training", 1, kind=int, low=1)
    small_clusters: str = option_like(DMUConfig, "small_clusters")
    batch_size: int = option_like(TrainConfig, "batch_size")
    dense_lr: float = option_like(TrainConfig, "lr", 1e-4, flag="--dense-lr",
                                  help="dense fine-tuning learning rate")
    ffn_lr: float = option_like(TrainConfig, "lr", 2e-4, flag="--ffn-lr",
                                help="dense FFN-only fine-tuning learning rate (default: DMU's stage rate)")
    sparse_lr: float = option_like(TrainConfig, "lr", 5e-5, flag="--sparse-lr",
                                   help="sparse-upcycled training learning rate (reduced as in CLIP-UP)")
    stage_lr: float = option_like(TrainConfig, "lr", 2e-4, flag="--stage-lr", help="DMU MCL stage learning rate")
    router_lr: float = option_like(TrainConfig, "lr", 1e-3, flag="--router-lr", help="DMU router learning rate")
    # Every arm (and each DMU stage and its router training) checkpoints this often, so a killed comparison loses
    # at most that many steps of the arm it was in: at replicate's scale (2,000 pairs, batch 64) an arm runs
    # ~400 steps of well under a second each on 2 cores, so 50 steps are less than a minute of work, while the
    # trainers' own default (500) would never checkpoint an arm at all. Changing it never invalidates a run.
    checkpoint_every: int = option_like(TrainConfig, "checkpoint_every", 50,
                                        help="optimizer steps between each arm's checkpoints (an interrupted "
                                        "comparison resumes every unfinished arm from its last one)")
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001

    def __post_init__(self):
        check_options(self)

    @property
    def budget_epochs(self) -> int:
        return (self.num_experts - 1) * self.stage_epochs + self.router_epochs


@dataclass(frozen=True)
class CompareConfig:
    """dense fine-tuning vs sparse upcycling vs DMU vs the base, equal budgets

    Trains every arm from the same base with the same number of image-text pairs (DMU's (E-1) x stage epochs +
    router epochs), over several seeds, and writes compare.md / compare.json: test retrieval, zero-shot digit
    accuracy per grid position, parameters and forward time per image. Finished arm/seed results are reused when
    run again.
    """

    base: str = option("--base", "the dense CLIP every arm starts from")
    data: str = option("--data", "digit-grid directory (train.json, test.json)")
    out: str = option("--out", "output directory (arms/, compare.md, compare.json, plots)")
    arms: str = option("--arms", f"comma-separated subset of {', '.join(ARMS)}", ",".join(ARMS), default_text="all")
    seeds: str = option("--seeds", "comma-separated seeds", "0,1,2")
    lr_factors: str = option("--lr-factors", "learning-rate sweep: comma-separated factors applied to each arm's own "
                             "rate (DMU: its stage rate), each trained with the first seed and scored on the data's "
                             "val.json; every seed then trains at the factor with the best validation R@1, and only "
                             "those are evaluated on test", "1")
    dmu_stage_epochs: str = option("--dmu-stage-epochs", "DMU's epochs per stage tried on val after its learning rate "
                                   "is chosen (comma-separated, each at most --stage-epochs): the budget stays the "
                                   "one --stage-epochs sets and router training gets the rest", "",
                                   default_text="only --stage-epochs")
    dmu_small_clusters: str = option("--dmu-small-clusters", "DMU's small-cluster handlings tried on val after its "
                                     "stage epochs are chosen (comma-separated of merge, drop, bin)", "",
                                     default_text="only --small-clusters")
    settings: ArmSettings = options_of(ArmSettings)


# The settings that shape each arm's result beyond the budget (epochs, batch, weight decay) that all trained arms
# share: a re-run reuses an arm's folder only when these are unchanged.
ARM_FIELDS = {
    "base": (),
    "dense": ("dense_lr",),
    "dense-ffn": ("ffn_lr",),
    "sparse-even": ("num_experts", "top_k", "sparse_lr", "aux_loss_coef", "z_loss_coef"),
    "sparse-all": ("num_experts", "top_k", "sparse_lr", "aux_loss_coef", "z_loss_coef"),
    "dmu": ("num_experts", "top_k", "stage_epochs", "router_epochs", "stage_lr", "router_lr", "aux_loss_coef",
            "small_clusters"),
}


# The learning rate a sweep factor scales, per trained arm (DMU's router rate stays: routers-only training at a
# fixed small rate is part of the recipe).
SWEPT_LR = {"dense": "dense_lr", "dense-ffn": "ffn_lr", "sparse-even": "sparse_lr", "sparse-all": "sparse_lr",
            "dmu": "stage_lr"}


# DMU's own settings a comparison may choose on validation, besides its learning rate. Stage epochs are tried at
# the budget the comparison's --stage-epochs sets: fewer epochs per stage leave the rest to router training.
DMU_VARIED = ("stage_epochs", "small_clusters")


@dataclass(frozen=True)
class Setting:
    """One point of an arm's sweep: a learning-rate factor and the DMU settings that differ from the comparison's
    own (empty for every other arm), in DMU_VARIED order. Hashable, so sweeps can key scores by it."""

    factor: float = 1.0
    overrides: tuple[tuple[str, object], ...] = ()

    def with_override(self, name: str, value, settings: ArmSettings) -> "Setting":
        """This setting with `name` = `value`; an override equal to the comparison's own value is left out, so
        that the run it names is the one the learning-rate sweep already trained."""
        kept = {k: v for k, v in self.overrides if k != name}
        if value != getattr(settings, name):
            kept[name] = value
        return Setting(self.factor, tuple((k, kept[k]) for k in DMU_VARIED if k in kept))

    def tag(self) -> str:
        """Folder name: lr-xF, then -NAME-VALUE per override (lr-x3-stage-epochs-2-small-clusters-bin)."""
        return f"lr-x{self.factor:g}" + "".join(f"-{k.replace('_', '-')}-{v}" for k, v in self.overrides)

    def describe(self) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.overrides) or "as set"


def scaled(arm: str, settings: ArmSettings, choice: "float | Setting") -> ArmSettings:
    """`settings` with `arm`'s swept learning rate multiplied by the factor and, for DMU, the setting's overrides
    applied (fewer stage epochs hand the rest of the budget to router training, so the budget is unchanged)."""
    choice = choice if isinstance(choice, Setting) else Setting(float(choice))
    if arm == "base":
        return settings
    changed = dict(choice.overrides)
    if choice.factor != 1:
        name = SWEPT_LR[arm]
        changed[name] = getattr(settings, name) * choice.factor
    if "stage_epochs" in changed:
        changed["router_epochs"] = settings.budget_epochs - (settings.num_experts - 1) * changed["stage_epochs"]
    return replace(settings, **changed) if changed else settings


def check_dmu_stage_epochs(values: list[int], settings: ArmSettings) -> None:
    """Each tried stage-epoch count must leave at least one epoch of the budget for router training."""
    for value in values:
        if value < 1 or (settings.num_experts - 1) * value + 1 > settings.budget_epochs:
            raise UserError(f"--dmu-stage-epochs {value}: DMU's {settings.num_experts - 1} stages would leave no epoch "
                            f"of the {settings.budget_epochs}-epoch budget for router training (the budget is "
                            f"(experts - 1) x --stage-epochs {settings.stage_epochs} + --router-epochs "
                            f"{settings.router_epochs}); try 1 to {settings.stage_epochs}, or raise --stage-epochs")


def arm_settings(arm: str, seed: int, settings: ArmSettings, inputs: dict[str, str]) -> dict:
    """Everything that makes one arm x seed's result: the arm's recipe fields, the budget and the inputs' hashes."""
    shared = {} if arm == "base" else {"seed": seed, "budget_epochs": settings.budget_epochs,
                                       "batch_size": settings.batch_size, "weight_decay": settings.weight_decay}
    return {"arm": arm, **shared, **{name: getattr(settings, name) for name in ARM_FIELDS[arm]}, **inputs}


def train_arm(arm: str, seed: int, base_dir: Path, train_data: Path, folder: Path, settings: ArmSettings) -> dict:
    """Train `arm` into folder/model (resuming inside folder); returns {"model": dir, "pairs_seen": n,
    "optimizer_steps": n} (the budget both ways: pairs are equal by construction, steps follow the batch plan)."""
    if arm == "base":
        return {"model": str(base_dir), "pairs_seen": 0, "optimizer_steps": 0}
    if arm == "dmu":
        return _train_dmu(seed, base_dir, train_data, folder, settings)
    out = folder / "model"
    if out.exists():
        metrics = json.loads((out / "clip_moe_recipe.json").read_text())["metrics"]
        return {"model": str(out), "pairs_seen": metrics["pairs seen"], "optimizer_steps": metrics["optimizer steps"]}
    loaded = load_clip(base_dir)
    model, lr, aux, z, trainable = loaded.model, settings.dense_lr, 0.0, 0.0, "all"
    if arm == "dense-ffn":
        lr, trainable = settings.ffn_lr, "ffn"
    elif arm.startswith("sparse-"):
        layers = arm.split("-", 1)[1]
        model = sparse_upcycle(model, settings.num_experts, settings.top_k, layers, seed=seed)
        lr, aux, z = settings.sparse_lr, settings.aux_loss_coef, settings.z_loss_coef
    elif arm != "dense":
        raise ValueError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")
    pairs = read_pairs(train_data)
    # fed as the base's family was trained; the trainer picks the family's loss (a SigLIP: the sigmoid loss)
    dataset = ImageTextDataset(pairs, processor_transform(loaded.image_processor),
                               model_tokenizer_fn(loaded.tokenizer, loaded.model.config))
    cfg = TrainConfig(trainable=trainable, epochs=settings.budget_epochs, batch_size=settings.batch_size, lr=lr,
                      weight_decay=settings.weight_decay, aux_loss_coef=aux, z_loss_coef=z, seed=seed,
                      checkpoint_every=settings.checkpoint_every, desc=f"{arm} seed {seed}")
    trainer = ContrastiveTrainer(model, dataset, dataset.collate, cfg, folder / "train")
    model = trainer.train(resume=True)
    card = {"base": str(base_dir), "recipe": ARM_TITLES[arm],
            "metrics": {"pairs seen": trainer.pairs_seen, "optimizer steps": trainer.total_steps},
            "details": {"seed": seed, "lr": lr, "aux_loss_coef": aux, "z_loss_coef": z}}
    save_clip_moe(model, out, loaded.image_processor, loaded.tokenizer, card)
    return {"model": str(out), "pairs_seen": trainer.pairs_seen, "optimizer_steps": trainer.total_steps}


def _train_dmu(seed: int, base_dir: Path, train_data: Path, folder: Path, settings: ArmSettings) -> dict:
    out = folder / "model"
    if not out.exists():
        cfg = DMUConfig(base=str(base_dir), train_data=str(train_data), out=str(out), work_dir=str(folder / "dmu"),
                        num_experts=settings.num_experts, top_k=settings.top_k, stage_epochs=settings.stage_epochs,
                        router_epochs=settings.router_epochs, batch_size=settings.batch_size, lr=settings.stage_lr,
                        router_lr=settings.router_lr, weight_decay=settings.weight_decay, logit_scale=None,
                        small_clusters=settings.small_clusters,
                        aux_loss_coef=settings.aux_loss_coef, checkpoint_every=settings.checkpoint_every,
                        seed=seed)
        run_dmu(cfg, resume=(folder / "dmu" / "manifest.json").exists())
    details = json.loads((out / "clip_moe_recipe.json").read_text())["details"]
    stages = [s["clusters"] for s in details["stages"].values()]
    seen = sum(s["pairs_seen"] for s in stages) + details["router"]["pairs_seen"]
    steps = sum(s.get("steps", 0) for s in stages) + details["router"].get("steps", 0)
    return {"model": str(out), "pairs_seen": seen, "optimizer_steps": steps}


def loss_curve(folder: Path, arm: str) -> list[tuple[int, float]]:
    """(pairs seen, contrastive loss) along an arm's training, DMU stages and router training back to back."""
    logs = sorted((folder / "dmu").glob("stage-*/train/metrics.jsonl")) + [folder / "dmu" / "router" / "metrics.jsonl"] \
        if arm == "dmu" else [folder / "train" / "metrics.jsonl"]
    curve, offset = [], 0
    for log in logs:
        if not log.exists():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        curve += [(offset + int(r["pairs_seen"]), r["contrastive"]) for r in rows]
        offset += int(rows[-1]["pairs_seen"]) if rows else 0
    return curve
