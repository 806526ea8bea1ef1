"""What the data commands of `python -m upcycle` do (argument parsing lives in upcycle/cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .digit_grids import make_digit_grids


def run_make_digit_grids(args: argparse.Namespace) -> int:
    counts = make_digit_grids(args.out, args.num_train, args.num_val, args.num_test, args.image_size, args.grid,
                              args.seed, args.resample, args.overwrite)
    out = Path(args.out)
    print(f"digit grids written to {out}: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + " images")
    print(f"  images: {out / 'images'}")
    print(f"  captions (LLaVA): {', '.join(str(out / f'{s}.json') for s in counts)}")
    print(f"  questions (LLaVA): {out / 'train_qa.json'}, {out / 'test_qa.json'}")
    return 0
