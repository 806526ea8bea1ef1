"""Command line of the upcycle package.

    python -m upcycle sparse --base DENSE_CLIP_DIR --out clip-moe-dir --num-experts 4 --top-k 2
"""

from __future__ import annotations

import argparse

from encoder.cli_support import UserErrorParser, run_cli

from . import commands
from .data import cli_commands as data_commands


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

    p = sub.add_parser("demo", help="the embedded default: build a small CLIP, sparse-upcycle it, check it",
                       description="Builds a small dense CLIP, sparse-upcycles it through the same code as "
                       "`upcycle sparse`, prints the summary and checks that the CLIP-MoE reproduces the dense "
                       "model on real images (scikit-learn's handwritten digits).")
    p.add_argument("--out", default="runs/demo", help="working directory (default runs/demo)")
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
    return parser


def _add_moe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-experts", type=int, default=4, help="experts per MoE layer (default 4)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--moe-layers", default="all",
                   help="which layers become MoE: all, even, odd, last:N or comma-separated indices (default all)")
    p.add_argument("--towers", default="vision,text", help="towers to upcycle: vision, text or vision,text")


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)
