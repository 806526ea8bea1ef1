"""A small, real, checkable image-text task: grids of scikit-learn's handwritten digits captioned by position.

Each image tiles `grid x grid` 8x8 digit scans (1797 real handwritten digits) and is upscaled; the caption
names the digit at every position ("top left 3, top right 7, ..."). The source scans are split into
disjoint train/val/test pools first, so the test split measures generalisation to unseen handwriting.

`--shapes 2x2,1x2,2x1` mixes grid shapes (rows x columns) at the square grid's pixels per digit, so a 1x2 image
is half as tall as a 2x2 one: LLaVA-1.6's anyres then picks different crop layouts for real handwriting.
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


# Words for one to three rows (columns); None: a single row (column) needs no word.
ROW_WORDS = {1: (None,), 2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
COLUMN_WORDS = {1: (None,), 2: ("left", "right"), 3: ("left", "center", "right")}
# How a question places a position named by one word ("What digit is on the left?"); others are "in the".
PREPOSITIONS = {"left": "on the", "right": "on the", "top": "at the", "bottom": "at the"}


def position_names(rows: int, cols: int | None = None) -> list[list[str]]:
    """Words for each cell of a rows x cols grid (cols defaults to rows), row-major: top/middle/bottom x
    left/center/right for up to three rows and columns ("top left", "center"; a single row or column drops its
    word: 1x2 -> left/right, 2x1 -> top/bottom), else "row r column c"."""
    cols = rows if cols is None else cols
    if rows not in ROW_WORDS or cols not in COLUMN_WORDS:
        return [[f"row {r + 1} column {c + 1}" for c in range(cols)] for r in range(rows)]

    def name(r: str | None, c: str | None) -> str:
        words = [w for w in (r, c) if w is not None and (r, c) != ("middle", "center")]
        return " ".join(words) or "center"

    return [[name(r, c) for c in COLUMN_WORDS[cols]] for r in ROW_WORDS[rows]]


def _names_for(digits: list[list[int]]) -> list[list[str]]:
    return position_names(len(digits), len(digits[0]))


def caption_for(digits: list[list[int]]) -> str:
    """"top left 3, top right 7, bottom left 0, bottom right 5" for digits [[3, 7], [0, 5]]; "left 3, right 7"
    for [[3, 7]]."""
    names = _names_for(digits)
    return ", ".join(f"{names[r][c]} {d}" for r, row in enumerate(digits) for c, d in enumerate(row))


def render_grid(cells: np.ndarray, image_size: int | tuple[int, int], resample: str = "nearest") -> Image.Image:
    """Tile [rows, cols, 8, 8] uint8 scans and upscale the whole tile to an RGB image of image_size: a side (a
    square image, as a square grid always had) or (width, height)."""
    rows, cols = cells.shape[:2]
    tile = cells.transpose(0, 2, 1, 3).reshape(rows * 8, cols * 8)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return Image.fromarray(tile).resize(size, RESAMPLING[resample]).convert("RGB")


def question_for(name: str) -> str:
    if name.startswith("row"):
        return f"What digit is at {name}?"
    return f"What digit is {PREPOSITIONS.get(name, 'in the')} {name}?"


def qa_turns(digits: list[list[int]], rng: np.random.Generator) -> list[dict]:
    """One question per position (shuffled order), each answered with one digit; <image> leads the first turn."""
    names = _names_for(digits)
    cells = [(names[r][c], d) for r, row in enumerate(digits) for c, d in enumerate(row)]
    turns = []
    for i in rng.permutation(len(cells)):
        name, digit = cells[i]
        turns += [{"from": "human", "value": question_for(name)}, {"from": "gpt", "value": str(digit)}]
    turns[0]["value"] = "<image>\n" + turns[0]["value"]
    return turns


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"2x2,1x2,2x1" -> [(2, 2), (1, 2), (2, 1)] (rows x columns), in the given order, repeats refused."""
    shapes = []
    for part in text.split(","):
        rows, x, cols = part.strip().lower().partition("x")
        if not (x and rows.isdigit() and cols.isdigit() and int(rows) >= 1 and int(cols) >= 1):
            raise UserError(f"--shapes {text!r}: {part.strip()!r} is not ROWSxCOLUMNS with whole numbers >= 1; "
                            "write e.g. --shapes 2x2,1x2,2x1")
        if (int(rows), int(cols)) in shapes:
            raise UserError(f"--shapes {text!r} names {int(rows)}x{int(cols)} twice; name each shape once")
        shapes.append((int(rows), int(cols)))
    return shapes


def _check_args(counts: dict[str, int], image_size: int, grid: int, resample: str, source: DigitSource,
                shapes: list[tuple[int, int]] | None = None) -> None:
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
        if n and grid * grid > len(source.pools[split]) and shapes is None:
            raise UserError(f"--grid {grid} needs {grid * grid} distinct digits per image but the {split} pool "
                            f"holds {len(source.pools[split])}; use a smaller --grid")
        for rows, cols in (shapes or []) if n else []:
            if rows * cols > len(source.pools[split]):
                raise UserError(f"--shapes {rows}x{cols} needs {rows * cols} distinct digits per image but the "
                                f"{split} pool holds {len(source.pools[split])}; use smaller shapes")
    if shapes is not None and image_size % grid:
        raise UserError(f"--shapes keeps the {grid}x{grid} grid's pixels per digit, but --image-size {image_size} "
                        f"is not a multiple of --grid {grid}; use e.g. --image-size {image_size // grid * grid}")
    if counts["train"] < 1:
        raise UserError("--num-train 0: expected at least one training sample")


def make_digit_grids(out: str | Path, num_train: int = 2000, num_val: int = 200, num_test: int = 200,
                     image_size: int = 224, grid: int = 2, seed: int = 0, resample: str = "nearest",
                     overwrite: bool = False, shapes: str | list[tuple[int, int]] | None = None) -> dict[str, int]:
    """Write images/{split}_{i:05d}.png, {split}.json (LLaVA captions) and train_qa.json / test_qa.json
    (LLaVA instructions) under `out`, atomically; returns the sample count per split.

    shapes (None: every image a grid x grid square of image_size px): (rows, cols) grids ("2x2,1x2" or a list)
    taken in turn, image i of a split gets shapes[i % len(shapes)], each image_size / grid px per digit."""
    counts = {"train": num_train, "val": num_val, "test": num_test}
    if isinstance(shapes, str):
        shapes = parse_shapes(shapes)
    elif shapes is not None:
        shapes = [(int(r), int(c)) for r, c in shapes]
    source = load_digit_source(seed)
    _check_args(counts, image_size, grid, resample, source, shapes)
    # Cycling (not drawing) the shapes leaves the random stream, and so a square-only data set, as it was.
    cycle = shapes or [(grid, grid)]
    per_digit = image_size // grid
    with atomic_output_dir(out, overwrite) as tmp:
        (tmp / "images").mkdir()
        progress = tqdm(total=sum(counts.values()), desc="digit grids", unit="img")
        for offset, split in enumerate(SPLITS):
            rng = np.random.default_rng([seed, offset])
            captions, qa = [], []
            for i in range(counts[split]):
                rows, cols = cycle[i % len(cycle)]
                chosen = rng.choice(source.pools[split], size=rows * cols, replace=False).reshape(rows, cols)
                digits = source.labels[chosen].tolist()
                rel = f"images/{split}_{i:05d}.png"
                size = image_size if shapes is None else (cols * per_digit, rows * per_digit)
                render_grid(source.images[chosen], size, resample).save(tmp / rel, compress_level=1)
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
        (tmp / "README.md").write_text(_readme(counts, image_size, grid, seed, resample, source, shapes))
    logger.info("digit grids written to %s: %s", out, counts)
    return counts


def _readme(counts: dict[str, int], image_size: int, grid: int, seed: int, resample: str,
            source: DigitSource, shapes: list[tuple[int, int]] | None = None) -> str:
    pools = ", ".join(f"{s} {len(source.pools[s])}" for s in SPLITS)
    if shapes is None:
        what = f"{grid}x{grid} grids of scikit-learn handwritten digits, {image_size} px"
    else:
        names = ", ".join(f"{r}x{c}" for r, c in shapes)
        what = (f"Grids of scikit-learn handwritten digits of shapes {names} (rows x columns, taken in turn), "
                f"{image_size // grid} px per digit")
    return (f"# Digit grids\n\n{what} "
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
    shapes: str | None = option("--shapes", "grid shapes ROWSxCOLUMNS taken in turn, e.g. 2x2,1x2,2x1, each at "
                                "--image-size / --grid px per digit (a 1x2 grid is half as tall)", None,
                                default_text="square --grid grids only")
    resample: str = option("--resample", "upscaling filter", "nearest", kind=str, choices=("nearest", "bilinear"))
    seed: int = option("--seed", "seed for the pool split and the sampling", 0)
    overwrite: bool = switch("--overwrite", "replace --out if it exists")


def run_make_digit_grids(cfg: DigitGridsConfig) -> int:
    counts = make_digit_grids(cfg.out, cfg.num_train, cfg.num_val, cfg.num_test, cfg.image_size, cfg.grid,
                              cfg.seed, cfg.resample, cfg.overwrite, cfg.shapes)
    out = Path(cfg.out)
    print(f"digit grids written to {out}: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + " images")
    print(f"  images: {out / 'images'}")
    print(f"  captions (LLaVA): {', '.join(str(out / f'{s}.json') for s in counts)}")
    print(f"  questions (LLaVA): {out / 'train_qa.json'}, {out / 'test_qa.json'}")
    return 0
