"""Zero-shot classification with a CLIP or SigLIP, dense or MoE: class embeddings by CLIP's prompt ensembling, top-k
accuracy, and the class and template files `python -m upcycle eval --classes / --templates` reads.

Image embeddings are L2-normalised (see `upcycle.eval.embedding.encode_pairs`) and scored by dot product. For a
SigLIP that is also the order of its own logits: `sigmoid(logit_scale.exp() * cosine + logit_bias)` rises with the
cosine (the scale is positive), so the top-k classes by cosine are the top-k by SigLIP's logits and probabilities
(tested against `SiglipModel`'s `logits_per_image`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from encoder.utils.errors import UserError, require_finite

from ..data.formats import read_text_file
from .embedding import encode_texts

# A short ensemble in the style of OpenAI's ImageNet prompts; "{}" alone keeps captions that are themselves
# class names (as in the digit-grid data) scored exactly as written.
DEFAULT_TEMPLATES = (
    "{}",
    "a photo of a {}.",
    "a photo of the {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "an image of a {}.",
    "a picture of a {}.",
)


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """The templates as a tuple, each with the {} a class name goes into."""
    if not templates:
        raise UserError("no prompt templates given; give at least one, e.g. 'a photo of a {}.'")
    for template in templates:
        if "{}" not in template:
            raise UserError(f"prompt template {template!r} has no {{}} for the class name; write e.g. "
                            "'a photo of a {}.'")
    return tuple(templates)


def class_embeddings(model, tokenizer, class_names: Sequence[str], templates: Sequence[str] | None = None,
                     batch_size: int = 256) -> torch.Tensor:
    """[C, D] zero-shot classifier: per class the mean of its normalised template embeddings, renormalised
    (CLIP's prompt ensembling, which beats any single prompt)."""
    templates = check_templates(templates if templates is not None else DEFAULT_TEMPLATES)
    prompts = [t.replace("{}", name) for name in class_names for t in templates]
    emb = encode_texts(model, tokenizer, prompts, batch_size).view(len(class_names), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def topk_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: Sequence[int] | torch.Tensor,
                  ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Percent of images whose label is among their k best-scoring classes (all of them when k >= classes)."""
    require_finite(image_emb, "image embeddings")
    require_finite(class_emb, "class (prompt) embeddings")
    ranks = label_ranks(image_emb.float() @ class_emb.float().T, torch.as_tensor(labels, dtype=torch.long))
    return {f"top{k}": 100.0 * (ranks < k).double().mean().item() for k in ks}


def label_ranks(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """scores [..., C], labels [...] -> how many other classes score at least as high as the label (ties count
    against it, as in retrieval)."""
    own = scores.gather(-1, labels.unsqueeze(-1))
    return (scores >= own).sum(dim=-1) - 1


def zero_shot_accuracy(image_emb: torch.Tensor, labels: Sequence[int] | torch.Tensor, class_names: Sequence[str],
                       model, tokenizer, templates: Sequence[str] | None = None) -> dict[str, float]:
    """Zero-shot classification top-1 / top-5 accuracy (percent); DEFAULT_TEMPLATES when none are given."""
    return topk_accuracy(image_emb, class_embeddings(model, tokenizer, class_names, templates), labels)


def labels_for(captions: Sequence[str], class_names: Sequence[str], source: str) -> list[int]:
    """Class index of every caption; the caption text must equal a class name exactly."""
    index = {name: i for i, name in enumerate(class_names)}
    unmatched = [c for c in captions if c not in index]
    if unmatched:
        raise UserError(f"{len(unmatched)} of {len(captions)} captions match no class in {source}, first: "
                        f"{unmatched[0]!r}; with --classes every caption must be exactly one class name")
    return [index[c] for c in captions]


def read_classes(path: str | Path) -> list[str]:
    """Class names from a JSON list of strings or a text file with one name per line."""
    path = Path(path)
    text = read_text_file(path, "classes file")
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"classes file {path} is not valid JSON ({err}); give a JSON list or one name per "
                            "line") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UserError(f"classes file {path}: the JSON list must hold strings only")
        names = [n.strip() for n in names]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise UserError(f"classes file {path} holds no class names; write one per line")
    twice = [name for name, count in Counter(names).items() if count > 1]
    if twice:
        raise UserError(f"classes file {path} lists {twice[0]!r} more than once; list every class once")
    return names


def read_templates(path: str | Path) -> tuple[str, ...]:
    """Prompt templates, one per line, each with {} where the class name goes."""
    lines = [line.strip() for line in read_text_file(path, "templates file").splitlines() if line.strip()]
    return check_templates(lines)
