"""`python -m upcycle make-digit-grids`: its settings and what it prints (the parser is generated in cli.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from encoder.utils.options import option, switch

from .digit_grids import make_digit_grids


@dataclass
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
