"""Command line of the upcycle package.

    python -m upcycle sparse --base DENSE_CLIP_DIR --out clip-moe-dir --num-experts 4 --top-k 2
"""

from __future__ import annotations

import argparse

from encoder.utils.cli import UserErrorParser, run_cli

from . import commands
from .eval.commands import add_eval_commands
from .experiments import data_commands


def build_parser() -> argparse.ArgumentParser:
    parser = UserErrorParser(prog="python -m upcycle", description=__doc__.split("\n")[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sparse", help="sparse-upcycle a dense CLIP (experts = copies of the MLP, new routers)",
                       description="Sparse upcycling (CLIP-UP recipe): every expert starts as an exact copy of "
                       "the dense MLP, routers are new; the result computes exactly the dense function.")
    p.add_argument("--base", required=True,
                   help="dense CLIP: a transformers CLIP directory, a hub id, or open_clip:MODEL_NAME[:CHECKPOINT]")
    p.add_argument("--out", required=True, help="output CLIP-MoE directory")
    _add_moe_args(p)
    p.add_argument("--seed", type=int, default=0, help="router initialisation seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=commands.run_sparse)

    p = sub.add_parser("demo", help="the main job on its embedded default: data -> base -> DMU -> LLaVA -> lmms-eval",
                       description="Runs the whole product on a CPU with no downloads: digit-grid data (real "
                       "handwriting), a small dense CLIP trained from scratch, a CLIP-MoE by DMU, LLaVA stage 1 and "
                       "stage 2 with a tiny Llama for the dense and the CLIP-MoE tower, lmms-eval on the digit-grid "
                       "QA task for both, and OUT/report/report.md. Every step is a printed user command; finished "
                       "steps are skipped when run again.")
    p.add_argument("--out", default="runs/demo", help="working directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="minimal sizes and steps (a smoke test, ~3 min)")
    p.set_defaults(run=_run_main_job)

    p = sub.add_parser("sparse-demo", help="build a small CLIP, sparse-upcycle it, check function preservation",
                       description="Builds a small dense CLIP, sparse-upcycles it through the same code as "
                       "`upcycle sparse`, prints the summary and checks that the CLIP-MoE reproduces the dense "
                       "model on real images (scikit-learn's handwritten digits).")
    p.add_argument("--out", default="runs/sparse-demo", help="working directory (default runs/sparse-demo)")
    p.set_defaults(run=commands.run_demo)

    p = sub.add_parser("make-digit-grids", help="write a captioned image data set of handwritten-digit grids",
                       description="Writes grids of scikit-learn's real handwritten digits with position captions "
                       "(LLaVA caption JSON per split) and one-word question/answer files (LLaVA instruction JSON). "
                       "Train, val and test draw from disjoint digit scans.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-train", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--num-val", type=int, default=200, help="validation images (default 200)")
    p.add_argument("--num-test", type=int, default=200, help="test images (default 200)")
    p.add_argument("--image-size", type=int, default=224, help="image side in pixels (default 224)")
    p.add_argument("--grid", type=int, default=2, help="digits per side of the grid (default 2)")
    p.add_argument("--resample", choices=("nearest", "bilinear"), default="nearest",
                   help="upscaling filter (default nearest)")
    p.add_argument("--seed", type=int, default=0, help="seed for the pool split and the sampling (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=data_commands.run_make_digit_grids)

    p = sub.add_parser("init-base", help="write a small randomly initialised CLIP with a tokenizer fitted to captions",
                       description="Writes a small dense CLIP (transformers layout, image processor, word-level "
                       "tokenizer built from the data's captions) to train from scratch with `upcycle train "
                       "--trainable all`: the base of the embedded demo. Real runs start from a real CLIP instead.")
    p.add_argument("--captions", required=True, help="image-caption data file whose captions define the vocabulary")
    p.add_argument("--out", required=True, help="output CLIP directory")
    p.add_argument("--width", type=int, default=64, help="hidden size of both towers (default 64)")
    p.add_argument("--layers", type=int, default=4, help="layers per tower (default 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--image-size", type=int, default=32, help="model input size in pixels (default 32)")
    p.add_argument("--patch-size", type=int, default=8, help="ViT patch size (default 8)")
    p.add_argument("--max-length", type=int, default=32, help="text context in tokens (default 32)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=commands.run_init_base)

    _add_train_parser(sub)
    _add_dmu_parser(sub)
    _add_compare_parser(sub)
    _add_replicate_parser(sub)
    add_eval_commands(sub)
    return parser


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-data", required=True,
                   help="image-caption pairs: LLaVA/ShareGPT4V JSON, JSONL, CSV or TSV with image and caption "
                   "columns, or WebDataset tar shards (data-{000..099}.tar)")
    p.add_argument("--image-root", help="folder the image paths are relative to (default: the data file's folder)")
    p.add_argument("--skip-missing", action="store_true",
                   help="drop pairs whose image is missing or empty (0 bytes), counted")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64,
                   help="global batch over all processes (default 64); its pairs are each other's negatives")
    p.add_argument("--weight-decay", type=float, default=0.2, help="AdamW weight decay (default 0.2)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="optimizer steps between checkpoints (default 500)")
    p.add_argument("--num-workers", type=int, help="DataLoader workers (default: 0 on CPU, up to 8 on GPU)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto = bf16 autocast on GPUs that support it, else fp32 (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed for batch order and routers (default 0)")
    p.add_argument("--work-dir", help="checkpoints, logs (metrics.jsonl, TensorBoard) and state "
                   "(default: next to --out)")
    p.add_argument("--resume", action="store_true", help="continue the run found in the work directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _add_train_parser(sub) -> None:
    from .train.command import parse_logit_scale, parse_max_grad_norm, run_train
    from .train.params import TRAINABLE_CHOICES

    p = sub.add_parser("train", help="continued contrastive training of a CLIP or CLIP-MoE",
                       description="Symmetric InfoNCE training of any CLIP or CLIP-MoE directory (e.g. the CLIP-UP "
                       "recipe after `upcycle sparse`: --trainable all, a reduced --lr, load balance + z-loss). "
                       "One CPU process or several GPUs via `accelerate launch`.")
    p.add_argument("--model", required=True, help="CLIP or CLIP-MoE directory (or a dense base spec)")
    p.add_argument("--out", required=True, help="output directory for the trained model")
    _add_data_args(p)
    p.add_argument("--trainable", choices=TRAINABLE_CHOICES, default="all",
                   help="parameters to train: all, ffn (MLPs / experts) or router (default all)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default 1e-5)")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="linear warm-up share of the steps (default 0.03)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="InfoNCE label smoothing (default 0)")
    p.add_argument("--logit-scale", type=parse_logit_scale, default=None,
                   help="'learnable' (the model's own; default) or a fixed multiplier such as 100")
    p.add_argument("--aux-loss-coef", type=float, help="load-balance weight (default: the CLIP-MoE config's)")
    p.add_argument("--z-loss-coef", type=float, help="router z-loss weight (default: the CLIP-MoE config's)")
    p.add_argument("--max-grad-norm", type=parse_max_grad_norm, default=1.0,
                   help="gradient clipping norm, or 'none' for no clipping (default 1.0)")
    _add_run_args(p)
    p.set_defaults(run=run_train)


def _add_dmu_parser(sub) -> None:
    from .recipes.dmu.command import run_dmu_command
    from .train.command import parse_logit_scale

    p = sub.add_parser("dmu", help="Diversified Multiplet Upcycling: MCL stages, assembly, router training",
                       description="Builds a CLIP-MoE whose experts learned different features: stage s encodes the "
                       "data with stage s-1, clusters image and text embeddings, and fine-tunes the base's FFNs with "
                       "every global batch drawn from one accumulated cluster; expert i = stage i's FFNs (expert 0 = "
                       "the base); then only the routers train. Interrupted runs continue with --resume.")
    p.add_argument("--base", required=True,
                   help="dense CLIP: a transformers CLIP directory, a hub id, or open_clip:MODEL_NAME[:CHECKPOINT]")
    p.add_argument("--out", required=True, help="output CLIP-MoE directory")
    _add_data_args(p)
    _add_moe_args(p)
    p.add_argument("--clusters-per-modality", type=int, default=3,
                   help="k-means clusters for images and for texts per stage (default 3: 9 joint clusters)")
    p.add_argument("--stage-epochs", type=float, default=1.0, help="epochs per MCL stage (default 1)")
    p.add_argument("--router-epochs", type=float, default=1.0, help="epochs of router training (default 1)")
    p.add_argument("--stage-max-steps", type=int, help="cap the optimizer steps per stage (overrides --stage-epochs)")
    p.add_argument("--router-max-steps", type=int, help="cap the router-training steps (overrides --router-epochs)")
    p.add_argument("--lr", type=float, default=1e-5, help="MCL stage learning rate (default 1e-5)")
    p.add_argument("--router-lr", type=float, default=1e-6, help="router learning rate (default 1e-6)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="InfoNCE label smoothing (default 0.1)")
    p.add_argument("--logit-scale", type=parse_logit_scale, default=100.0,
                   help="fixed logit multiplier (default 100, as published) or 'learnable' = the base's own, frozen")
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="load-balance weight in router training "
                   "(default 0.01)")
    p.add_argument("--z-loss-coef", type=float, default=0.0, help="router z-loss weight (default 0)")
    _add_run_args(p)
    p.set_defaults(run=run_dmu_command)


def _add_moe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-experts", type=int, default=4, help="experts per MoE layer (default 4)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--moe-layers", default="all",
                   help="which layers become MoE: all, even, odd, last:N or comma-separated indices (default all)")
    p.add_argument("--towers", default="vision,text", help="towers to upcycle: vision, text or vision,text")


def _add_compare_parser(sub) -> None:
    from .experiments.compare.arms import ARMS
    from .experiments.compare.run import run_compare

    p = sub.add_parser("compare", help="dense fine-tuning vs sparse upcycling vs DMU vs the base, equal budgets",
                       description="Trains every arm from the same base with the same number of image-text pairs "
                       "(DMU's (E-1) x stage epochs + router epochs), over several seeds, and writes compare.md / "
                       "compare.json: test retrieval, zero-shot digit accuracy per grid position, parameters and "
                       "forward time per image. Finished arm/seed results are reused when run again.")
    p.add_argument("--base", required=True, help="the dense CLIP every arm starts from")
    p.add_argument("--data", required=True, help="digit-grid directory (train.json, test.json)")
    p.add_argument("--out", required=True, help="output directory (arms/, compare.md, compare.json, plots)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)} (default all)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--num-experts", type=int, default=4, help="experts per MoE layer (default 4)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--stage-epochs", type=int, default=1, help="epochs per DMU stage (default 1)")
    p.add_argument("--router-epochs", type=int, default=1, help="epochs of DMU router training (default 1)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (default 64)")
    p.add_argument("--dense-lr", type=float, default=1e-4, help="dense fine-tuning learning rate (default 1e-4)")
    p.add_argument("--sparse-lr", type=float, default=5e-5, help="sparse-upcycled training learning rate "
                   "(default 5e-5, reduced as in CLIP-UP)")
    p.add_argument("--stage-lr", type=float, default=2e-4, help="DMU MCL stage learning rate (default 2e-4)")
    p.add_argument("--router-lr", type=float, default=1e-3, help="DMU router learning rate (default 1e-3)")
    p.set_defaults(run=run_compare)


def _add_replicate_parser(sub) -> None:
    p = sub.add_parser("replicate", help="the papers' comparison at tiny scale, CLIP arms and MLLMs (up to an hour)",
                       description="Digit grids -> a briefly trained base -> `upcycle compare` (base, dense "
                       "fine-tuning, sparse upcycling every other / all layers, DMU; equal budgets; several seeds) "
                       "-> LLaVA stage 1 + 2 on the dense, sparse-upcycled and DMU towers -> lmms-eval -> "
                       "OUT/report.md. Run again after an interruption: finished steps, arms and seeds are reused.")
    p.add_argument("--out", default="runs/replicate", help="working directory (default runs/replicate)")
    p.add_argument("--num-train", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--num-test", type=int, default=400, help="test images (default 400)")
    p.add_argument("--base-epochs", type=int, default=3, help="epochs of base pre-training (default 3: brief)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the CLIP arms (default 0,1,2)")
    p.add_argument("--stage-steps", type=int, default=300, help="LLaVA stage 1 and stage 2 steps (default 300)")
    p.add_argument("--eval-limit", type=int, default=400, help="lmms-eval questions per checkpoint (default 400)")
    p.set_defaults(run=_run_replicate)


def _run_replicate(args: argparse.Namespace) -> int:
    from .experiments.replicate import run_replicate

    return run_replicate(args)


def _run_main_job(args: argparse.Namespace) -> int:
    from .experiments.main_job import run_main_job

    return run_main_job(args)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)
