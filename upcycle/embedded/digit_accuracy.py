"""Zero-shot digit accuracy per grid position on the digit-grid data (`make-digit-grids`): per position, does the
image score the prompt of its own digit ("top left 3") above the nine others? Chance is 10%.

Demo-only (the generic evaluator knows nothing of grids): this module adds `--digit-positions` to `python -m upcycle
eval` (`DigitEvalConfig`, run through the evaluator's `ExtraMetric` hook); the main job and the comparison report it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from encoder.utils.errors import UserError, require_finite
from encoder.utils.options import switch

from ..data.formats import Pair, read_text_file
from ..eval.commands import EvalConfig, EvalData, ExtraMetric, run_eval
from ..eval.embedding import encode_texts
from ..eval.zero_shot import label_ranks
from .digit_grids import position_names


def digit_prompts(rows: int, cols: int | None = None) -> list[list[str]]:
    """Per grid position (row-major) the ten prompts "top left 0" ... "top left 9", worded as the captions."""
    return [[f"{name} {digit}" for digit in range(10)] for row in position_names(rows, cols) for name in row]


def position_accuracy(image_emb: torch.Tensor, digits: torch.Tensor, prompt_emb: torch.Tensor) -> torch.Tensor:
    """Accuracy (percent) per position of picking the right digit among ten prompts.

    image_emb [N, D]; digits [N, P] (positions row-major); prompt_emb [P, 10, D] -> [P].
    """
    require_finite(image_emb, "image embeddings")
    require_finite(prompt_emb, "digit prompt embeddings")
    scores = torch.einsum("nd,pcd->npc", image_emb.float(), prompt_emb.float())
    return 100.0 * (label_ranks(scores, digits) == 0).double().mean(dim=0)


def digit_position_accuracy(image_emb: torch.Tensor, digits, model, tokenizer) -> dict[str, float]:
    """Zero-shot digit classification at every position of digit-grid images (chance = 10%).

    digits: [N, rows, cols] labels (the records' "digits"), one grid shape for all images: a position's name
    (and so its prompts) depends on the shape. Returns accuracy per position name and "mean".
    """
    try:
        digits = torch.as_tensor(digits, dtype=torch.long)
    except (ValueError, TypeError):
        raise UserError("digit labels differ in grid shape or are not integers; evaluate one grid shape at a "
                        "time (make-digit-grids --shapes mixes shapes)") from None
    if digits.dim() != 3:
        raise UserError(f"digit labels of shape {list(digits.shape)}: expected [images, rows, columns]")
    prompts = digit_prompts(digits.shape[1], digits.shape[2])
    prompt_emb = encode_texts(model, tokenizer, [p for position in prompts for p in position])
    accuracy = position_accuracy(image_emb, digits.flatten(1), prompt_emb.view(len(prompts), 10, -1))
    names = [name for row in position_names(digits.shape[1], digits.shape[2]) for name in row]
    return {**dict(zip(names, accuracy.tolist(), strict=True)), "mean": accuracy.mean().item()}


def read_digit_labels(path: str | Path, image_root: str | Path | None = None) -> dict[str, list[list[int]]]:
    """Image path (resolved as `read_pairs` resolves it) -> the record's "digits", from a digit-grid data file
    (LLaVA JSON or JSONL, as written by `make-digit-grids`)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise UserError(f"--digit-positions needs a JSON or JSONL data file with \"digits\" per record; {path} is "
                        f"{suffix or 'neither'} (make-digit-grids writes JSON)")
    text = read_text_file(path, "data file")
    try:
        lines = [line for line in text.splitlines() if line.strip()]
        records = json.loads(text) if suffix == ".json" else [json.loads(line) for line in lines]
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    root = Path(image_root) if image_root is not None else path.parent
    labels = {}
    for i, rec in enumerate(records if isinstance(records, list) else [records]):
        if not isinstance(rec, dict) or "digits" not in rec:
            raise UserError(f"{path}: record {i} has no \"digits\" field; --digit-positions needs digit-grid data "
                            "(python -m upcycle make-digit-grids)")
        labels[str((root / rec.get("image", "")).absolute())] = rec["digits"]
    return labels


@dataclass(frozen=True)
class DigitEvalConfig(EvalConfig):
    # The command's help: the evaluator's, plus what this flag adds.
    __doc__ = EvalConfig.__doc__.rstrip() + "\n    With --digit-positions, digit accuracy per grid position.\n"

    digit_positions: bool = switch("--digit-positions", "also classify the digit at every grid position zero-shot "
                                   "with prompts like 'top left 3' (make-digit-grids data: records with \"digits\")")


def run_digit_eval(cfg: DigitEvalConfig) -> int:
    """`eval`, plus "digit_positions" (accuracy per grid position) in its JSON with --digit-positions."""
    return run_eval(cfg, [ExtraMetric("digit_positions", _digit_metric)] if cfg.digit_positions else [])


def _digit_metric(data: EvalData, pairs: list[Pair]):
    """Reads every pair's digits before the encoding pass; the accuracy comes from the embeddings after it."""
    digit_labels = read_digit_labels(data.data, data.image_root)
    digits = [digit_labels[p.image] for p in pairs]
    return lambda image_emb, model, tokenizer: digit_position_accuracy(image_emb, digits, model, tokenizer)
