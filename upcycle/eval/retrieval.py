"""Zero-shot evaluation of a dense CLIP or a CLIP-MoE: image-text retrieval (R@1/5/10 both ways, as papers
report it), classification with CLIP's prompt ensembling, and digit classification per grid position.

All functions take L2-normalised embeddings (see `upcycle.eval.embedding.encode_pairs`) and score by dot product.
The `eval` and `routing` commands are in analysis_commands.py.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from encoder.utils.errors import UserError, require_finite

from ..experiments.digit_grids import position_names
from .embedding import encode_texts

RECALL_KS = (1, 5, 10)
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


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: Sequence[str],
                      image_ids: Sequence[Hashable] | None = None, chunk_size: int = 1024) -> dict:
    """Image->text and text->image recall at 1, 5 and 10, in percent.

    image_emb, text_emb: [N, D] embeddings of N pairs; captions: the N caption strings; image_ids: optional
    N keys (e.g. image paths) so that one image with several captions (COCO's five) is one image.
    Queries and galleries are deduplicated first: identical caption strings are one text (the embedding of
    its first pair), so two images captioned alike do not compete for "their own" copy of the caption. An
    image query hits at k when any of its captions is among the k best unique texts; a text query hits when
    any image carrying that caption is among the k best images. Ties count against the query, so a model whose
    embeddings collapse to one point scores nothing.
    Returns i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10 and the query counts n_images, n_texts.
    """
    if not len(captions) == len(image_emb) == len(text_emb):
        raise ValueError(f"{len(image_emb)} image and {len(text_emb)} text embeddings for {len(captions)} captions")
    require_finite(image_emb, "image embeddings")
    require_finite(text_emb, "text embeddings")
    text_group, text_first = _groups(captions)
    image_group, image_first = _groups(image_ids if image_ids is not None else range(len(captions)))
    images, texts = image_emb[image_first].float(), text_emb[text_first].float()
    i2t = _recalls(images, texts, image_group, text_group, chunk_size)
    t2i = _recalls(texts, images, text_group, image_group, chunk_size)
    return {**{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()},
            "n_images": len(image_first), "n_texts": len(text_first)}


def _groups(keys: Iterable[Hashable]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item its group index (groups numbered by first appearance), and per group its first item."""
    index: dict = {}
    group = [index.setdefault(key, len(index)) for key in keys]
    first = [0] * len(index)
    for item in reversed(range(len(group))):
        first[group[item]] = item
    return torch.tensor(group, dtype=torch.long), torch.tensor(first, dtype=torch.long)


def _recalls(queries: torch.Tensor, gallery: torch.Tensor, query_group: torch.Tensor, gallery_group: torch.Tensor,
             chunk_size: int) -> dict[int, float]:
    """Recall@k of each query's best positive; pair i makes gallery item gallery_group[i] a positive of query
    query_group[i]. Queries are scored in chunks so N x N similarities never sit in memory at once."""
    ranks = torch.empty(len(queries), dtype=torch.long)
    for start in range(0, len(queries), chunk_size):
        stop = min(start + chunk_size, len(queries))
        scores = queries[start:stop] @ gallery.T
        positive = torch.zeros_like(scores, dtype=torch.bool)
        inside = (query_group >= start) & (query_group < stop)
        positive[query_group[inside] - start, gallery_group[inside]] = True
        best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        ranks[start:stop] = ((scores >= best) & ~positive).sum(dim=1)
    return {k: 100.0 * (ranks < k).double().mean().item() for k in RECALL_KS}


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
    ranks = _label_ranks(image_emb.float() @ class_emb.float().T, torch.as_tensor(labels, dtype=torch.long))
    return {f"top{k}": 100.0 * (ranks < k).double().mean().item() for k in ks}


def _label_ranks(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """scores [..., C], labels [...] -> how many other classes score at least as high as the label (ties count
    against it, as in retrieval)."""
    own = scores.gather(-1, labels.unsqueeze(-1))
    return (scores >= own).sum(dim=-1) - 1


def zero_shot_accuracy(image_emb: torch.Tensor, labels: Sequence[int] | torch.Tensor, class_names: Sequence[str],
                       model, tokenizer, templates: Sequence[str] | None = None) -> dict[str, float]:
    """Zero-shot classification top-1 / top-5 accuracy (percent); DEFAULT_TEMPLATES when none are given."""
    return topk_accuracy(image_emb, class_embeddings(model, tokenizer, class_names, templates), labels)


def digit_prompts(grid: int) -> list[list[str]]:
    """Per grid position (row-major) the ten prompts "top left 0" ... "top left 9", worded as the captions."""
    return [[f"{name} {digit}" for digit in range(10)] for row in position_names(grid) for name in row]


def position_accuracy(image_emb: torch.Tensor, digits: torch.Tensor, prompt_emb: torch.Tensor) -> torch.Tensor:
    """Accuracy (percent) per position of picking the right digit among ten prompts.

    image_emb [N, D]; digits [N, P] (positions row-major); prompt_emb [P, 10, D] -> [P].
    """
    require_finite(image_emb, "image embeddings")
    require_finite(prompt_emb, "digit prompt embeddings")
    scores = torch.einsum("nd,pcd->npc", image_emb.float(), prompt_emb.float())
    return 100.0 * (_label_ranks(scores, digits) == 0).double().mean(dim=0)


def digit_position_accuracy(image_emb: torch.Tensor, digits, model, tokenizer) -> dict[str, float]:
    """Zero-shot digit classification at every position of digit-grid images (chance = 10%).

    digits: [N, grid, grid] labels (the records' "digits"). Returns accuracy per position name and "mean".
    """
    try:
        digits = torch.as_tensor(digits, dtype=torch.long)
    except (ValueError, TypeError):
        raise UserError("digit labels differ in grid size or are not integers; evaluate one grid size at a "
                        "time") from None
    if digits.dim() != 3 or digits.shape[1] != digits.shape[2]:
        raise UserError(f"digit labels of shape {list(digits.shape)}: expected [images, grid, grid]")
    prompts = digit_prompts(digits.shape[1])
    prompt_emb = encode_texts(model, tokenizer, [p for position in prompts for p in position])
    accuracy = position_accuracy(image_emb, digits.flatten(1), prompt_emb.view(len(prompts), 10, -1))
    names = [name for row in position_names(digits.shape[1]) for name in row]
    return {**dict(zip(names, accuracy.tolist(), strict=True)), "mean": accuracy.mean().item()}


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
    text = _read_text(path, "classes file")
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
    lines = [line.strip() for line in _read_text(Path(path), "templates file").splitlines() if line.strip()]
    return check_templates(lines)


def read_digit_labels(path: str | Path, image_root: str | Path | None = None) -> dict[str, list[list[int]]]:
    """Image path (resolved as `read_pairs` resolves it) -> the record's "digits", from a digit-grid data file
    (LLaVA JSON or JSONL, as written by `make-digit-grids`)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise UserError(f"--digit-positions needs a JSON or JSONL data file with \"digits\" per record; {path} is "
                        f"{suffix or 'neither'} (make-digit-grids writes JSON)")
    text = _read_text(path, "data file")
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


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; check the path")
    return path.read_text(encoding="utf-8")
