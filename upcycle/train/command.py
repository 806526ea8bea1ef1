"""`python -m upcycle train`: continued contrastive training of any CLIP or CLIP-MoE directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from encoder.loading import load_clip
from encoder.save import save_clip_moe
from encoder.utils.errors import UserError
from encoder.utils.files import check_output_dir, file_sha256

from ..data import ImageTextDataset, processor_transform, read_pairs, tokenizer_fn
from .config import TrainConfig
from .trainer import ContrastiveTrainer, latest_checkpoint


def parse_logit_scale(text: str) -> float | None:
    """'learnable' -> None (the model's own, trained with --trainable all); a number -> fixed multiplier.

    Which numbers make sense is TrainConfig's to say (its Limits), for the command line and the API alike."""
    if text == "learnable":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use 'learnable' or a number such as 100") from None


def parse_max_grad_norm(text: str) -> float | None:
    """'none' -> None (no clipping); a number -> the clipping norm (checked by TrainConfig)."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use a number such as 1.0, or 'none' for no clipping") from None


def train_config(args: argparse.Namespace, aux_loss_coef: float, z_loss_coef: float) -> TrainConfig:
    """The flags as a TrainConfig, which checks every value (one line naming the flag for nonsense)."""
    return TrainConfig(trainable=args.trainable, epochs=args.epochs, max_steps=args.max_steps,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                       weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                       label_smoothing=args.label_smoothing, logit_scale=args.logit_scale,
                       aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef, max_grad_norm=args.max_grad_norm,
                       checkpoint_every=args.checkpoint_every, num_workers=args.num_workers,
                       precision=args.precision, seed=args.seed, desc="train")


def run_train(args: argparse.Namespace) -> int:
    # Every flag is checked before anything is read, loaded or written; the loss weights left to the model's
    # config are checked here as 0 and again once the model says what they are.
    cfg = train_config(args, args.aux_loss_coef or 0.0, args.z_loss_coef or 0.0)
    check_output_dir(args.out, args.overwrite)
    work = Path(args.work_dir) if args.work_dir else Path(args.out).with_name(Path(args.out).name + ".train-work")
    if latest_checkpoint(work) is not None and not args.resume:
        raise UserError(f"{work} holds checkpoints of an earlier run; pass --resume to continue it or remove it")
    loaded = load_clip(args.model)
    if loaded.tokenizer is None:
        raise UserError(f"{args.model} has no tokenizer files; save its tokenizer into the directory")
    moe = loaded.is_moe
    aux = args.aux_loss_coef if args.aux_loss_coef is not None else (
        loaded.model.config.vision_config.aux_loss_coef if moe else 0.0)
    z = args.z_loss_coef if args.z_loss_coef is not None else (
        loaded.model.config.vision_config.router_z_loss_coef if moe else 0.0)
    cfg = train_config(args, aux, z)
    pairs = read_pairs(args.train_data, args.image_root, args.skip_missing)
    dataset = ImageTextDataset(pairs, processor_transform(loaded.image_processor),
                               tokenizer_fn(loaded.tokenizer, loaded.model.config.text_config.max_position_embeddings))
    weights = Path(args.model) / "model.safetensors"
    identity = {"model": str(args.model), "train_data": str(args.train_data), "image_root": str(args.image_root),
                "model_sha256": file_sha256(weights) if weights.is_file() else None}
    trainer = ContrastiveTrainer(loaded.model, dataset, dataset.collate, cfg, work, identity=identity)
    model = trainer.train(resume=args.resume)
    if trainer.accelerator.is_main_process:
        card = {
            "base": loaded.source,
            "recipe": f"continued contrastive training ({args.trainable} parameters) on {args.train_data}",
            "metrics": {"pairs seen": trainer.pairs_seen, "optimizer steps": trainer.total_steps},
            "details": {"train": {k: v for k, v in vars(args).items() if k != "run"}, "work_dir": str(work)},
        }
        save_clip_moe(model, args.out, loaded.image_processor, loaded.tokenizer, card, overwrite=args.overwrite)
        print(f"trained model written to {args.out} ({trainer.pairs_seen} pairs seen, "
              f"{trainer.total_steps} steps; logs in {work})")
    return 0
