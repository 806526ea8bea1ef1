"""Functions the digit-grid task YAML names: the image, the LLaVA-style question, exact-match scoring.

Referenced by absolute module path (`!function mllm_bridge.lmms.tasks.digit_grids.utils.doc_to_text`), so the
YAML works from any folder it is copied to, and this file stays the only copy of the scoring rule.
"""

from __future__ import annotations

import string

from encoder.utils.user_files import image_rgb

DIGITS = [str(d) for d in range(10)]


def doc_to_visual(doc: dict) -> list:
    """The grid as 8-bit RGB, decoded as LLaVA training decodes images (`encoder.utils.user_files`)."""
    return [image_rgb(doc["image"], "of a digit_grids document")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_choice(doc: dict) -> list[str]:
    return DIGITS


def normalize_answer(text: str) -> str:
    """Lower case, surrounding whitespace and punctuation removed: '3.' and ' 3' both read as '3'."""
    return text.strip().strip(string.punctuation + string.whitespace).lower()


def process_results(doc: dict, results: list[str]) -> dict:
    """Exact match of the normalised answer with the one-word gold answer."""
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
