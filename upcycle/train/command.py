"""`python -m upcycle train`: continued contrastive training of any CLIP or SigLIP directory, dense or MoE, with its
family's loss."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from encoder.family import find_family
from encoder.loading import load_clip
from encoder.save import save_clip_moe
from encoder.utils.errors import UserError
from encoder.utils.files import check_output_dir
from encoder.utils.options import check_options, option, options_of
from encoder.weight_files import weights_sha256

from ..data import ImageTextDataset, model_tokenizer_fn, processor_transform, read_pairs
from .config import RESUME_LOWER_LR, TrainConfig, TrainingData, TrainOutput
from .trainer import ContrastiveTrainer, check_launch_fits, latest_checkpoint, sigmoid_loss_for


@dataclass(frozen=True)
class TrainCommand:
    """continued contrastive training of a CLIP or SigLIP, dense or MoE

    Contrastive training of any CLIP / CLIP-MoE (symmetric InfoNCE) or SigLIP / SigLIP-MoE directory (the pairwise
    sigmoid loss, its logit_bias trained too), e.g. the CLIP-UP recipe after `upcycle sparse`: --trainable all, a
    reduced --lr, load balance + z-loss. One CPU process or several GPUs via `accelerate launch`.
    """

    model: str = option("--model", "CLIP or SigLIP directory, dense or MoE (or a dense base spec)")
    out: str = option("--out", "output directory for the trained model")
    data: TrainingData = options_of(TrainingData)
    train: TrainConfig = options_of(TrainConfig, exclude=("desc",))
    output: TrainOutput = options_of(TrainOutput)

    def __post_init__(self):
        check_options(self)


def run_train(cmd: TrainCommand) -> int:
    # Every flag was checked when `cmd` was made, before anything is read, loaded or written; the loss weights
    # left to the model's config (None) are the trainer's to read from the model.
    out, data, output = cmd.out, cmd.data, cmd.output
    check_output_dir(out, output.overwrite)
    work = Path(output.work_dir) if output.work_dir else Path(out).with_name(Path(out).name + ".train-work")
    if latest_checkpoint(work) is not None and not output.resume:
        raise UserError(f"{work} holds checkpoints of an earlier run; pass --resume to continue it or remove it")
    check_launch_fits(cmd.train)  # before the model loads: a 7B-scale load is minutes to lose to a config typo
    if find_family(cmd.model) is not None:
        sigmoid_loss_for(cmd.train, cmd.model)  # a loss the model cannot train with, refused before it loads
    loaded = load_clip(cmd.model)
    if loaded.tokenizer is None:
        raise UserError(f"{cmd.model} has no tokenizer files; save its tokenizer into the directory")
    cfg = replace(cmd.train, desc="train")
    pairs = read_pairs(data.train_data, data.image_root, data.skip_missing)
    dataset = ImageTextDataset(pairs, processor_transform(loaded.image_processor),
                               model_tokenizer_fn(loaded.tokenizer, loaded.model.config))
    identity = {"model": str(cmd.model), "train_data": str(data.train_data), "image_root": str(data.image_root),
                "model_sha256": weights_sha256(cmd.model) if Path(cmd.model).is_dir() else None}
    trainer = ContrastiveTrainer(loaded.model, dataset, dataset.collate, cfg, work, identity=identity,
                                 lower_lr_resume=f"--resume {RESUME_LOWER_LR}")
    model = trainer.train(resume=output.resume)
    if trainer.accelerator.is_main_process:
        card = {
            "base": loaded.source,
            "recipe": f"continued contrastive training ({cfg.trainable} parameters) on {data.train_data}",
            "metrics": {"pairs seen": trainer.pairs_seen, "optimizer steps": trainer.total_steps},
            "details": {"train": card_settings(cmd), "work_dir": str(work)},
        }
        save_clip_moe(model, out, loaded.image_processor, loaded.tokenizer, card, overwrite=output.overwrite)
        print(f"trained model written to {out} ({trainer.pairs_seen} pairs seen, "
              f"{trainer.total_steps} steps; logs in {work})")
    return 0


def card_settings(cmd: TrainCommand) -> dict:
    """The flags as the model card has recorded them: one flat mapping, field name -> value, as given."""
    flat = {"model": cmd.model, "out": cmd.out}
    for part in (cmd.data, cmd.train, cmd.output):
        flat.update(vars(part))
    flat.pop("desc")
    return flat
