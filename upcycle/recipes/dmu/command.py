"""`python -m upcycle dmu`: argument handling around `run_dmu`."""

from __future__ import annotations

import argparse

from ...commands import parse_towers
from .config import DMUConfig
from .pipeline import run_dmu


def run_dmu_command(args: argparse.Namespace) -> int:
    cfg = DMUConfig(
        base=args.base, train_data=args.train_data, out=args.out, image_root=args.image_root,
        skip_missing=args.skip_missing, num_experts=args.num_experts, top_k=args.top_k, moe_layers=args.moe_layers,
        towers=parse_towers(args.towers), clusters_per_modality=args.clusters_per_modality,
        stage_epochs=args.stage_epochs, router_epochs=args.router_epochs, stage_max_steps=args.stage_max_steps,
        router_max_steps=args.router_max_steps, batch_size=args.batch_size, lr=args.lr, router_lr=args.router_lr,
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, logit_scale=args.logit_scale,
        aux_loss_coef=args.aux_loss_coef, z_loss_coef=args.z_loss_coef, checkpoint_every=args.checkpoint_every,
        num_workers=args.num_workers, precision=args.precision, seed=args.seed, work_dir=args.work_dir,
        overwrite=args.overwrite,
    )
    run_dmu(cfg, resume=args.resume)
    return 0
