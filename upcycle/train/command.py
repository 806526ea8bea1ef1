"""`python -m upcycle train`: continued contrastive training of any CLIP or CLIP-MoE directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from encoder.errors import UserError
from encoder.export import check_output_dir, file_sha256, save_clip_moe
from encoder.loading import load_clip

from ..data import ImageTextDataset, processor_transform, read_pairs, tokenizer_fn
from .trainer import ContrastiveTrainer, TrainConfig, latest_checkpoint


def parse_logit_scale(text: str) -> float | None:
    """'learnable' -> None (the model's own, trained with --trainable all); a number -> fixed multiplier."""
    if text == "learnable":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use 'learnable' or a number such as 100") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a logit scale must be positive")
    return value


def run_train(args: argparse.Namespace) -> int:
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
    pairs = read_pairs(args.train_data, args.image_root, args.skip_missing)
    dataset = ImageTextDataset(pairs, processor_transform(loaded.image_processor),
                               tokenizer_fn(loaded.tokenizer, loaded.model.config.text_config.max_position_embeddings))
    cfg = TrainConfig(trainable=args.trainable, epochs=args.epochs, max_steps=args.max_steps,
                      batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                      weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                      label_smoothing=args.label_smoothing, logit_scale=args.logit_scale, aux_loss_coef=aux,
                      z_loss_coef=z, checkpoint_every=args.checkpoint_every, num_workers=args.num_workers,
                      precision=args.precision, seed=args.seed, desc="train")
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
