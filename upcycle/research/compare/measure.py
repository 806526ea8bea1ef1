"""What the comparison reports per model: test retrieval (with its per-query hits, for paired intervals), zero-shot
digits per grid position, parameters, and forward time per image (measured for all arms side by side in one
process, interleaved, so load on the machine hits every arm alike)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from encoder.loading import load_clip
from encoder.model_card import parameter_summary

from ...data import read_pairs
from ...embedded.digit_accuracy import digit_position_accuracy
from ...eval.embedding import encode_pairs, inference
from ...eval.retrieval import recalls, retrieval_hits
from ..intervals import pack_hits


def metrics_on_split(model_dir: str | Path, test_data: Path) -> dict:
    """Retrieval R@1/5/10 both ways and per-position zero-shot digit accuracy (percent) on one split (`test_data`:
    test.json, or val.json for a learning-rate sweep).

    "hits" holds each retrieval key's per-query hits packed as a '0'/'1' string
    (`upcycle.research.intervals.pack_hits`): i2t keys one character per unique test image, t2i keys one per unique
    caption, in order of first appearance, so every arm's strings line up item by item.
    """
    loaded = load_clip(model_dir)
    pairs = read_pairs(test_data)
    images, texts = encode_pairs(loaded.model, pairs, loaded.image_processor, loaded.tokenizer,
                                 desc=f"evaluating {Path(model_dir).parent.name}/{Path(model_dir).name}")
    records = json.loads(Path(test_data).read_text())
    digits = [r["digits"] for r in records]
    hits = retrieval_hits(images, texts, [p.caption for p in pairs], [p.image for p in pairs])
    result = recalls(hits)
    positions = digit_position_accuracy(images, digits, loaded.model, loaded.tokenizer)
    summary = parameter_summary(loaded.model)
    vision = parameter_summary(loaded.model.vision_model)
    return {**{k: v for k, v in result.items() if not k.startswith("n_")},
            "digits_mean": positions.pop("mean"), "digits": positions,
            "params_total": summary["total_params"], "params_active": summary["active_params"],
            "vision_params_total": vision["total_params"], "vision_params_active": vision["active_params"],
            "hits": {key: pack_hits(h) for key, h in hits.items()}}


def forward_ms_per_image(model_dirs: dict[str, str], image_size: int, batch: int = 32, rounds: int = 7) -> dict:
    """Median vision-tower forward time per image for each model, rounds interleaved across models."""
    models = {name: load_clip(d).model.vision_model.eval() for name, d in model_dirs.items()}
    pixels = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(rounds + 1):
        for name, model in models.items():
            with inference(model):
                start = time.perf_counter()
                model(pixel_values=pixels)
                elapsed = time.perf_counter() - start
            if round_:  # the first round warms caches and allocators
                times[name].append(elapsed)
    return {name: 1000 * statistics.median(t) / batch for name, t in times.items()}
