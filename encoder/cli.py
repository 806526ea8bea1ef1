"""Command line of the encoder package: checkpoint imports that write a CLIP-MoE directory.

    python -m encoder import-official clip-moe.pt --out clip-moe-vit-l14-336
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .model_card import summary_lines
from .save import save_clip_moe
from .utils.cli import command_parser, positive_int, run_cli
from .utils.errors import UserError
from .utils.files import check_output_dir


def build_parser() -> argparse.ArgumentParser:
    parser, commands = command_parser("python -m encoder", __doc__)

    p = commands.add_parser(
        "import-official",
        help="convert the official CLIP-MoE release (.pt state dict) into a CLIP-MoE directory",
        description="Convert the official CLIP-MoE release (a pickled OpenAI-CLIP-style state dict, read with "
        "weights_only=True) into a CLIP-MoE directory (config.json, model.safetensors, "
        "preprocessor_config.json, README.md). The architecture is read from the tensor shapes.",
    )
    p.add_argument("checkpoint", help="the released .pt state dict")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--num-experts", type=positive_int, default=None,
                   help="expected experts per MoE layer; an error if the checkpoint disagrees (default: inferred)")
    p.add_argument("--top-k", type=positive_int, default=2, help="experts per token (default: 2, as released)")
    p.add_argument("--vision-heads", type=positive_int, default=None,
                   help="vision attention heads (default: width // 64, OpenAI's rule)")
    p.add_argument("--text-heads", type=positive_int, default=None,
                   help="text attention heads (default: width // 64, OpenAI's rule)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=_import_official)
    return parser


def _import_official(args: argparse.Namespace) -> int:
    from .convert.official import import_official, model_card_fields

    if args.num_experts is not None and args.top_k > args.num_experts:
        raise UserError(f"--top-k {args.top_k} exceeds --num-experts {args.num_experts}; pass --top-k <= {args.num_experts}")
    check_output_dir(args.out, args.overwrite)  # before the (large) checkpoint is read
    model, processor = import_official(args.checkpoint, num_experts=args.num_experts, top_k=args.top_k,
                                       vision_heads=args.vision_heads, text_heads=args.text_heads)
    card = model_card_fields(args.checkpoint, model)
    out = save_clip_moe(model, args.out, image_processor=processor, card=card, overwrite=args.overwrite)

    print(f"CLIP-MoE written to {out}")
    print("\n".join(summary_lines(model)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv)
