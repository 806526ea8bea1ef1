"""The `eval` and `routing` commands of `python -m upcycle` (registered by `add_eval_commands`).

    python -m upcycle eval --model runs/clip-moe --data digits/test.json --digit-positions
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from encoder.loading import load_clip, model_type_of
from encoder.utils.cli import parse_device
from encoder.utils.errors import UserError
from encoder.utils.files import check_output_file, write_atomic

from ..data import read_pairs
from ..experiments.digit_accuracy import digit_position_accuracy, read_digit_labels
from .embedding import encode_pairs
from .retrieval import retrieval_metrics
from .routing import not_moe_error, routing_figure, routing_stats
from .zero_shot import DEFAULT_TEMPLATES, labels_for, read_classes, read_templates, zero_shot_accuracy


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """Register `eval` and `routing` on the subcommands of `python -m upcycle`."""
    p = sub.add_parser("eval", help="zero-shot retrieval and classification metrics of a CLIP or CLIP-MoE",
                       description="Encodes every image-caption pair of --data and prints JSON: image->text and "
                       "text->image recall@1/5/10 in percent (identical caption strings count as one text; an "
                       "image hits when its caption is among the top-k texts, a caption when any image carrying "
                       "it is among the top-k images); with --classes zero-shot top-1/top-5 accuracy where each "
                       "pair's class is its caption; with --digit-positions digit accuracy per grid position. "
                       "Works for dense CLIPs and CLIP-MoE directories alike.")
    p.add_argument("--model", required=True, help="CLIP-MoE directory or dense CLIP (transformers directory, hub "
                   "id, open_clip:NAME[:CHECKPOINT])")
    _add_data_args(p)
    p.add_argument("--classes", help="class names for zero-shot classification, one per line or a JSON list; "
                   "every caption must equal one of them")
    p.add_argument("--templates", help="prompt templates for --classes, one per line with {} for the class name "
                   f"(default: {len(DEFAULT_TEMPLATES)} built-in, e.g. {DEFAULT_TEMPLATES[1]!r})")
    p.add_argument("--digit-positions", action="store_true", help="also classify the digit at every grid position "
                   "zero-shot with prompts like 'top left 3' (make-digit-grids data: records with \"digits\")")
    p.add_argument("--out", help="also write the JSON to this file")
    p.set_defaults(run=run_eval)

    p = sub.add_parser("routing", help="expert usage and router entropy of a CLIP-MoE on data, with a heat map",
                       description="Routes every image-caption pair of --data through a CLIP-MoE and prints JSON "
                       "per tower and MoE layer: the share of top-k choices each expert received (sums to 1), the "
                       "mean per-token router entropy and the usage entropy normalised by log(experts) (1 = "
                       "balanced), and token counts (text padding excluded; vision counts patches and CLS). "
                       "Writes a PNG heat map of the shares.")
    p.add_argument("--model", required=True, help="CLIP-MoE directory (a dense CLIP has nothing to route)")
    _add_data_args(p)
    p.add_argument("--out-png", default="routing.png", help="heat map to write (default routing.png)")
    p.add_argument("--out-json", help="also write the JSON to this file")
    p.set_defaults(run=run_routing)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="image-caption pairs: LLaVA JSON, JSONL, CSV, TSV or tar shards")
    p.add_argument("--image-root", help="folder the image paths are relative to (default: the data file's folder)")
    p.add_argument("--skip-missing", action="store_true", help="drop pairs whose image is missing instead of failing")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per forward pass (default 64)")
    p.add_argument("--num-workers", type=int, default=0, help="image decoding worker processes (default 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")


def run_eval(args: argparse.Namespace) -> int:
    if args.templates and not args.classes:
        raise UserError("--templates applies to zero-shot classification; give --classes too")
    if args.out:
        check_output_file(args.out, "--out")  # not after the (long) encoding pass
    pairs = read_pairs(args.data, args.image_root, args.skip_missing)
    captions = [p.caption for p in pairs]
    # Every input is checked before the (long) encoding pass.
    if args.classes:
        class_names = read_classes(args.classes)
        templates = read_templates(args.templates) if args.templates else None
        labels = labels_for(captions, class_names, args.classes)
    if args.digit_positions:
        digit_labels = read_digit_labels(args.data, args.image_root)
        digits = [digit_labels[p.image] for p in pairs]
    device = parse_device(args.device)
    loaded = load_clip(args.model)
    image_emb, text_emb = encode_pairs(loaded.model, pairs, loaded.image_processor, loaded.tokenizer,
                                       args.batch_size, args.num_workers, device)
    result = {"model": loaded.source, "data": str(args.data), "n_pairs": len(pairs),
              **retrieval_metrics(image_emb, text_emb, captions, [p.image for p in pairs])}
    if args.classes:
        accuracy = zero_shot_accuracy(image_emb, labels, class_names, loaded.model, loaded.tokenizer, templates)
        result.update(zero_shot_top1=accuracy["top1"], zero_shot_top5=accuracy["top5"])
    if args.digit_positions:
        result["digit_positions"] = digit_position_accuracy(image_emb, digits, loaded.model, loaded.tokenizer)
    _emit(result, args.out)
    return 0


def run_routing(args: argparse.Namespace) -> int:
    for flag, path in (("--out-png", args.out_png), ("--out-json", args.out_json)):
        if path:
            check_output_file(path, flag)  # not after routing every pair
    model_type = model_type_of(args.model)
    if model_type not in (None, "clip_moe"):
        raise not_moe_error(f"{args.model} (model_type {model_type!r})")  # refuse before loading the weights
    pairs = read_pairs(args.data, args.image_root, args.skip_missing)
    device = parse_device(args.device)
    loaded = load_clip(args.model)
    stats = routing_stats(loaded.model.to(device), pairs, loaded.image_processor, loaded.tokenizer,
                          args.batch_size, args.num_workers)
    if args.out_png:
        figure = routing_figure(stats, Path(loaded.source).name)
        write_atomic(args.out_png, lambda tmp: figure.savefig(tmp, format="png", dpi=150), "--out-png")
        print(f"routing heat map written to {args.out_png}", file=sys.stderr)
    _emit({"model": loaded.source, "data": str(args.data), "n_pairs": len(pairs), **stats}, args.out_json, "--out-json")
    return 0


def _emit(result: dict, out: str | None, flag: str = "--out") -> None:
    """Print the result as JSON (4 decimals) and write it to `out` (the value of `flag`) when given."""
    text = json.dumps(_rounded(result), indent=2)
    print(text)
    if out:
        write_atomic(out, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"), flag)


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value
