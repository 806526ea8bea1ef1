"""Command line of the LLaVA bridge: check, re-point and benchmark LLaVA checkpoints with CLIP or CLIP-MoE towers.

    python -m mllm_bridge swap-tower checkpoints/llava-v1.5-7b --tower clip-moe-l14-336
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from encoder.tower import SELECT_FEATURES
from encoder.utils.cli import UserErrorParser, run_cli

from .lmms.commands import add_lmms_commands


def build_parser() -> argparse.ArgumentParser:
    parser = UserErrorParser(prog="python -m mllm_bridge", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "check",
        help="show the vision tower LLaVA will build for a checkpoint and every mismatch",
        description="Show which vision tower class LLaVA will build for LLAVA_DIR (clip-moe-toolkit's "
        "CLIPMoEVisionTower or LLaVA's CLIPVisionTower), its MoE layout, hidden sizes (tower vs "
        "mm_hidden_size), select layer and feature, image processor, and every mismatch found.",
        epilog="Exit status: 0 when the checkpoint and its tower fit, 1 when a mismatch was found, "
        "2 on bad input.",
    )
    p.add_argument("llava_dir", metavar="LLAVA_DIR",
                   help="a LLaVA checkpoint directory (config.json with mm_vision_tower)")
    p.set_defaults(run=_check)

    p = commands.add_parser(
        "swap-tower",
        help="point a LLaVA checkpoint's config.json at another CLIP or CLIP-MoE tower",
        description="Rewrite LLAVA_DIR/config.json to use TOWER_DIR as its vision tower (absolute path), after "
        "checking that the tower is a CLIP or CLIP-MoE directory whose hidden size equals mm_hidden_size (the "
        "projector's input width) and whose image size, patches and image processor fit. The old config is "
        "kept as config.json.bak (or config.json.bak-<time> if that exists); the new one is written atomically. "
        "On any mismatch nothing is written.",
    )
    p.add_argument("llava_dir", metavar="LLAVA_DIR", help="a LLaVA checkpoint directory")
    p.add_argument("--tower", required=True, metavar="TOWER_DIR", help="a CLIP or CLIP-MoE directory")
    p.add_argument("--select-layer", type=int, default=None, metavar="N",
                   help="hidden state LLaVA takes (index into the L+1 hidden states; -2 = penultimate block, "
                   "as in LLaVA-1.5; default: keep the checkpoint's)")
    p.add_argument("--select-feature", choices=SELECT_FEATURES, default=None,
                   help="'patch' drops the CLS token, 'cls_patch' keeps it (default: keep the checkpoint's)")
    p.set_defaults(run=_swap_tower)

    p = commands.add_parser(
        "make-tiny-llm",
        help="write a tiny random Llama with a tokenizer trained on a data set's texts (CPU demos)",
        description="Writes a 2-layer Llama (random weights) and a Llama tokenizer trained offline on every text "
        "LLaVA's stage 1 and stage 2 would feed it from a digit-grid directory (train.json, train_qa.json): the "
        "language model of the embedded CPU runs. Real runs use a real LLM (e.g. lmsys/vicuna-7b-v1.5).",
    )
    p.add_argument("--data", required=True, help="digit-grid directory (python -m upcycle make-digit-grids)")
    p.add_argument("--out", required=True, help="output LLM directory")
    p.add_argument("--hidden-size", type=int, default=128, help="model width (default 128)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.set_defaults(run=_make_tiny_llm)
    add_lmms_commands(commands)
    return parser


def _make_tiny_llm(args: argparse.Namespace) -> int:
    from pathlib import Path

    from encoder.utils.errors import UserError
    from encoder.utils.files import check_output_dir

    from .train.embedded_default import save_tiny_llm, training_texts

    data = Path(args.data)
    missing = [n for n in ("train.json", "train_qa.json") if not (data / n).is_file()]
    if missing:
        raise UserError(f"{data} lacks {', '.join(missing)}; give a digit-grid directory "
                        "(python -m upcycle make-digit-grids)")
    if Path(args.out).exists():
        raise UserError(f"{args.out} exists; remove it or choose another --out")
    check_output_dir(args.out, overwrite=False)  # a folder that is a file or not writable: before any work
    save_tiny_llm(Path(args.out), training_texts(data), hidden_size=args.hidden_size, seed=args.seed)
    print(f"tiny Llama written to {args.out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .llava.checks import check_llava_dir

    report = check_llava_dir(args.llava_dir)
    print("\n".join(report.lines))
    if not report.problems:
        print("mismatches: none")
        return 0
    print(f"mismatches ({len(report.problems)}):")
    print("\n".join(f"  - {problem}" for problem in report.problems))
    return 1


def _swap_tower(args: argparse.Namespace) -> int:
    from .llava.swap_tower import swap_tower

    result = swap_tower(args.llava_dir, args.tower, args.select_layer, args.select_feature)
    print(f"{result.config.config_path}: mm_vision_tower = {result.config.vision_tower}, "
          f"select layer {result.config.select_layer}, feature {result.config.select_feature!r}")
    print(f"previous config kept as {result.backup}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv)
