"""A small, real, checkable image-text task: grids of scikit-learn's handwritten digits captioned by position.

Each image tiles `grid x grid` 8x8 digit scans (1797 real handwritten digits) and is upscaled; the caption
names the digit at every position ("top left 3, top right 7, ..."). The source scans are split into
disjoint train/val/test pools first, so the test split measures generalisation to unseen handwriting.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from encoder.utils.errors import UserError
from encoder.utils.files import atomic_output_dir
from encoder.utils.options import option, switch

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CAPTION_INSTRUCTION = "Describe the digits in the image."
RESAMPLING = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class DigitSource:
    """The 1797 scans as uint8 [N, 8, 8] (0-255, white ink on black) with labels, and the split pools."""

    images: np.ndarray
    labels: np.ndarray
    pools: dict[str, np.ndarray]


def load_digit_source(seed: int = 0, fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)) -> DigitSource:
    """Load sklearn's digits and split their indices into disjoint train/val/test pools, stratified by digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    pools: dict[str, list[int]] = {s: [] for s in SPLITS}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        n_train = round(fractions[0] * len(idx))
        n_val = round(fractions[1] * len(idx))
        pools["train"] += idx[:n_train].tolist()
        pools["val"] += idx[n_train : n_train + n_val].tolist()
        pools["test"] += idx[n_train + n_val :].tolist()
    return DigitSource(images, labels, {s: np.array(sorted(v)) for s, v in pools.items()})


def position_names(grid: int) -> list[list[str]]:
    """Words for each cell, row-major: 2 -> top/bottom x left/right; 3 -> adds middle/center; else row/column."""
    if grid == 1:
        return [["center"]]
    if grid == 2:
        return [["top left", "top right"], ["bottom left", "bottom right"]]
    if grid == 3:
        rows, cols = ("top", "middle", "bottom"), ("left", "center", "right")
        return [["center" if (r, c) == ("middle", "center") else f"{r} {c}" for c in cols] for r in rows]
    return [[f"row {r + 1} column {c + 1}" for c in range(grid)] for r in range(grid)]


def caption_for(digits: list[list[int]]) -> str:
    """"top left 3, top right 7, bottom left 0, bottom right 5" for digits [[3, 7], [0, 5]]."""
    names = position_names(len(digits))
    return ", ".join(f"{names[r][c]} {d}" for r, row in enumerate(digits) for c, d in enumerate(row))


def render_grid(cells: np.ndarray, image_size: int, resample: str = "nearest") -> Image.Image:
    """Tile [grid, grid, 8, 8] uint8 scans and upscale the whole tile to an RGB image_size x image_size image."""
    grid = cells.shape[0]
    tile = cells.transpose(0, 2, 1, 3).reshape(grid * 8, grid * 8)
    return Image.fromarray(tile).resize((image_size, image_size), RESAMPLING[resample]).convert("RGB")


def qa_turns(digits: list[list[int]], rng: np.random.Generator) -> list[dict]:
    """One question per position (shuffled order), each answered with one digit; <image> leads the first turn."""
    names = position_names(len(digits))
    cells = [(names[r][c], d) for r, row in enumerate(digits) for c, d in enumerate(row)]
    turns = []
    for i in rng.permutation(len(cells)):
        name, digit = cells[i]
        question = f"What digit is at {name}?" if name.startswith("row") else f"What digit is in the {name}?"
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": str(digit)}]
    turns[0]["value"] = "<image>\n" + turns[0]["value"]
    return turns


def _check_args(counts: dict[str, int], image_size: int, grid: int, resample: str, source: DigitSource) -> None:
    if grid < 1:
        raise UserError(f"--grid {grid}: expected 1 or more digits per side")
    if image_size < 8 * grid:
        raise UserError(f"--image-size {image_size} is smaller than the {8 * grid} px of a {grid}x{grid} grid of "
                        f"8x8 digits; use at least {8 * grid}")
    if resample not in RESAMPLING:
        raise UserError(f"resample {resample!r} not understood; use one of {', '.join(RESAMPLING)}")
    for split, n in counts.items():
        if n < 0:
            raise UserError(f"--num-{split} {n}: expected 0 or more samples")
        if n and grid * grid > len(source.pools[split]):
            raise UserError(f"--grid {grid} needs {grid * grid} distinct digits per image but the {split} pool "
                            f"holds {len(source.pools[split])}; use a smaller --grid")
    if counts["train"] < 1:
        raise UserError("--num-train 0: expected at least one training sample")


def make_digit_grids(out: str | Path, num_train: int = 2000, num_val: int = 200, num_test: int = 200,
                     image_size: int = 224, grid: int = 2, seed: int = 0, resample: str = "nearest",
                     overwrite: bool = False) -> dict[str, int]:
    """Write images/{split}_{i:05d}.png, {split}.json (LLaVA captions) and train_qa.json / test_qa.json
    (LLaVA instructions) under `out`, atomically; returns the sample count per split."""
    counts = {"train": num_train, "val": num_val, "test": num_test}
    source = load_digit_source(seed)
    _check_args(counts, image_size, grid, resample, source)
    with atomic_output_dir(out, overwrite) as tmp:
        (tmp / "images").mkdir()
        progress = tqdm(total=sum(counts.values()), desc="digit grids", unit="img")
        for offset, split in enumerate(SPLITS):
            rng = np.random.default_rng([seed, offset])
            captions, qa = [], []
            for i in range(counts[split]):
                chosen = rng.choice(source.pools[split], size=grid * grid, replace=False).reshape(grid, grid)
                digits = source.labels[chosen].tolist()
                rel = f"images/{split}_{i:05d}.png"
                render_grid(source.images[chosen], image_size, resample).save(tmp / rel, compress_level=1)
                meta = {"id": f"{split}_{i:05d}", "image": rel, "digits": digits, "source_indices": chosen.tolist()}
                captions.append({**meta, "conversations": [
                    {"from": "human", "value": "<image>\n" + CAPTION_INSTRUCTION},
                    {"from": "gpt", "value": caption_for(digits)}]})
                qa.append({**meta, "conversations": qa_turns(digits, rng)})
                progress.update()
            (tmp / f"{split}.json").write_text(json.dumps(captions, indent=1) + "\n")
            if split != "val":
                (tmp / f"{split}_qa.json").write_text(json.dumps(qa, indent=1) + "\n")
        progress.close()
        (tmp / "README.md").write_text(_readme(counts, image_size, grid, seed, resample, source))
    logger.info("digit grids written to %s: %s", out, counts)
    return counts


def _readme(counts: dict[str, int], image_size: int, grid: int, seed: int, resample: str,
            source: DigitSource) -> str:
    pools = ", ".join(f"{s} {len(source.pools[s])}" for s in SPLITS)
    return (f"# Digit grids\n\n{grid}x{grid} grids of scikit-learn handwritten digits, {image_size} px "
            f"({resample} upscaling), seed {seed}.\n\nSamples: {counts}. Source scans split into disjoint pools "
            f"({pools}), so test digits are never seen in training.\n\n"
            "- `{split}.json`: LLaVA caption format (caption = digits by position)\n"
            "- `train_qa.json`, `test_qa.json`: LLaVA instruction format, one-word answers\n"
            "- every record also has `digits` (row-major labels) and `source_indices` (rows of load_digits)\n")


@dataclass(frozen=True)
class DigitGridsConfig:
    """write a captioned image data set of handwritten-digit grids

    Writes grids of scikit-learn's real handwritten digits with position captions (LLaVA caption JSON per split)
    and one-word question/answer files (LLaVA instruction JSON). Train, val and test draw from disjoint digit
    scans.
    """

    out: str = option("--out", "output directory")
    num_train: int = option("--num-train", "training images", 2000)
    num_val: int = option("--num-val", "validation images", 200)
    num_test: int = option("--num-test", "test images", 200)
    image_size: int = option("--image-size", "image side in pixels", 224)
    grid: int = option("--grid", "digits per side of the grid", 2)
    resample: str = option("--resample", "upscaling filter", "nearest", kind=str, choices=("nearest", "bilinear"))
    seed: int = option("--seed", "seed for the pool split and the sampling", 0)
    overwrite: bool = switch("--overwrite", "replace --out if it exists")


def run_make_digit_grids(cfg: DigitGridsConfig) -> int:
    counts = make_digit_grids(cfg.out, cfg.num_train, cfg.num_val, cfg.num_test, cfg.image_size, cfg.grid,
                              cfg.seed, cfg.resample, cfg.overwrite)
    out = Path(cfg.out)
    print(f"digit grids written to {out}: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + " images")
    print(f"  images: {out / 'images'}")
    print(f"  captions (LLaVA): {', '.join(str(out / f'{s}.json') for s in counts)}")
    print(f"  questions (LLaVA): {out / 'train_qa.json'}, {out / 'test_qa.json'}")
    return 0
