"""The `eval` and `routing` commands of `python -m upcycle`: their configs and what they do.

    python -m upcycle eval --model runs/clip-moe --data coco_test.json --classes classes.txt

A command built on `eval` adds its own flags (a subclass of `EvalConfig`) and metrics (`ExtraMetric`) without this
module knowing them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoder.family import is_full_moe, read_model_type
from encoder.loading import load_clip
from encoder.utils.cli import parse_device
from encoder.utils.errors import UserError
from encoder.utils.files import check_output_file, write_atomic
from encoder.utils.options import check_options, option, option_like, options_of

from ..data import Pair, read_pairs
from ..train.config import TrainingData
from .embedding import encode_pairs
from .retrieval import retrieval_metrics
from .routing import not_moe_error, routing_figure, routing_stats
from .zero_shot import DEFAULT_TEMPLATES, labels_for, read_classes, read_templates, zero_shot_accuracy


@dataclass(frozen=True)
class EvalData:
    """The pairs `eval` and `routing` encode, and how: the batch here only trades memory for speed (the
    metrics do not depend on it), unlike the training batch `--batch-size` whose pairs are each other's
    negatives, hence its own flag."""

    data: str = option("--data", "image-caption pairs: LLaVA JSON, JSONL, CSV, TSV or tar shards")
    image_root: str | None = option_like(TrainingData, "image_root")
    skip_missing: bool = option_like(TrainingData, "skip_missing")
    forward_batch_size: int = option("--forward-batch-size", "pairs per forward pass", 64, kind=int, low=1)
    num_workers: int = option("--num-workers", "image decoding worker processes", 0, kind=int, low=0)
    device: str | None = option("--device", "cpu, cuda or cuda:N", None,
                                default_text="cuda when available, else cpu")

    def __post_init__(self):
        check_options(self)


@dataclass(frozen=True)
class EvalConfig:
    """zero-shot retrieval and classification metrics of a CLIP or SigLIP, dense or MoE

    Encodes every image-caption pair of --data and prints JSON: image->text and text->image recall@1/5/10 in
    percent (identical caption strings count as one text; an image hits when its caption is among the top-k
    texts, a caption when any image carrying it is among the top-k images); with --classes zero-shot top-1/top-5
    accuracy where each pair's class is its caption. Works for dense CLIPs and SigLIPs and their MoE directories alike,
    each fed as its family was trained (its image processor; SigLIP: captions padded to its fixed length, no mask).
    """

    model: str = option("--model", "CLIP-MoE / SigLIP-MoE directory or dense CLIP / SigLIP (transformers "
                        "directory, hub id, open_clip:NAME[:CHECKPOINT])")
    pairs: EvalData = options_of(EvalData)
    classes: str | None = option("--classes", "class names for zero-shot classification, one per line or a JSON "
                                 "list; every caption must equal one of them", None)
    templates: str | None = option("--templates", "prompt templates for --classes, one per line with {} for the "
                                   "class name", None, default_text=f"{len(DEFAULT_TEMPLATES)} built-in, e.g. "
                                   f"{DEFAULT_TEMPLATES[1]!r}")
    out: str | None = option("--out", "also write the JSON to this file", None)


@dataclass(frozen=True)
class RoutingConfig:
    """expert usage and router entropy of a CLIP-MoE on data, with a heat map

    Routes every image-caption pair of --data through a CLIP-MoE and prints JSON per tower and MoE layer: the
    share of top-k choices each expert received (sums to 1), the mean per-token router entropy and the usage
    entropy normalised by log(experts) (1 = balanced), and token counts (text padding excluded; vision counts
    patches and CLS). Writes a PNG heat map of the shares.
    """

    model: str = option("--model", "CLIP-MoE directory (a dense CLIP has nothing to route)")
    pairs: EvalData = options_of(EvalData)
    out_png: str | None = option("--out-png", "heat map to write", "routing.png")
    out_json: str | None = option("--out-json", "also write the JSON to this file", None)


@dataclass(frozen=True)
class ExtraMetric:
    """A metric a command built on `eval` adds to its JSON under `name`. `prepare(data, pairs)` runs before the (long)
    encoding pass, so its input is checked first, and returns what computes the result from the image embeddings
    (one row per pair, in order), the model and its tokenizer."""

    name: str
    prepare: Callable[[EvalData, list[Pair]], Callable[[Any, Any, Any], Any]]


def run_eval(cfg: EvalConfig, extras: Sequence[ExtraMetric] = ()) -> int:
    data = cfg.pairs
    if cfg.templates and not cfg.classes:
        raise UserError("--templates applies to zero-shot classification; give --classes too")
    if cfg.out:
        check_output_file(cfg.out, "--out")  # not after the (long) encoding pass
    pairs = read_pairs(data.data, data.image_root, data.skip_missing)
    captions = [p.caption for p in pairs]
    # Every input is checked before the (long) encoding pass.
    if cfg.classes:
        class_names = read_classes(cfg.classes)
        templates = read_templates(cfg.templates) if cfg.templates else None
        labels = labels_for(captions, class_names, cfg.classes)
    computes = {extra.name: extra.prepare(data, pairs) for extra in extras}
    device = parse_device(data.device)
    loaded = load_clip(cfg.model)
    image_emb, text_emb = encode_pairs(loaded.model, pairs, loaded.image_processor, loaded.tokenizer,
                                       data.forward_batch_size, data.num_workers, device)
    result = {"model": loaded.source, "data": str(data.data), "n_pairs": len(pairs),
              **retrieval_metrics(image_emb, text_emb, captions, [p.image for p in pairs])}
    if cfg.classes:
        accuracy = zero_shot_accuracy(image_emb, labels, class_names, loaded.model, loaded.tokenizer, templates)
        result.update(zero_shot_top1=accuracy["top1"], zero_shot_top5=accuracy["top5"])
    for name, compute in computes.items():
        result[name] = compute(image_emb, loaded.model, loaded.tokenizer)
    _emit(result, cfg.out)
    return 0


def run_routing(cfg: RoutingConfig) -> int:
    data = cfg.pairs
    for flag, path in (("--out-png", cfg.out_png), ("--out-json", cfg.out_json)):
        if path:
            check_output_file(path, flag)  # not after routing every pair
    model_type = read_model_type(cfg.model)
    if model_type is not None and not is_full_moe(cfg.model):
        raise not_moe_error(f"{cfg.model} (model_type {model_type!r})")  # refuse before loading the weights
    pairs = read_pairs(data.data, data.image_root, data.skip_missing)
    device = parse_device(data.device)
    loaded = load_clip(cfg.model)
    stats = routing_stats(loaded.model.to(device), pairs, loaded.image_processor, loaded.tokenizer,
                          data.forward_batch_size, data.num_workers)
    if cfg.out_png:
        figure = routing_figure(stats, Path(loaded.source).name)
        write_atomic(cfg.out_png, lambda tmp: figure.savefig(tmp, format="png", dpi=150), "--out-png")
        print(f"routing heat map written to {cfg.out_png}", file=sys.stderr)
    _emit({"model": loaded.source, "data": str(data.data), "n_pairs": len(pairs), **stats}, cfg.out_json, "--out-json")
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
