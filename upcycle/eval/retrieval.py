"""Zero-shot image-text retrieval of a dense CLIP or a CLIP-MoE: recall at 1, 5 and 10 both ways, as papers report it,
and the per-query hits behind it (for paired statistics across models, see `upcycle.research.intervals`).

The functions take L2-normalised embeddings (see `upcycle.eval.embedding.encode_pairs`) and score by dot product.
Zero-shot classification is in zero_shot.py.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import torch

from encoder.utils.errors import require_finite

RECALL_KS = (1, 5, 10)


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
    return recalls(retrieval_hits(image_emb, text_emb, captions, image_ids, chunk_size))


def retrieval_hits(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: Sequence[str],
                   image_ids: Sequence[Hashable] | None = None, chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    """Per query, whether it hits at 1, 5 and 10, both ways: what `retrieval_metrics` averages, kept per item
    so that two models scored on the same queries can be compared pair by pair (see `upcycle.research.intervals`).

    Arguments and the deduplication as in `retrieval_metrics`. Returns i2t_r1, i2t_r5, i2t_r10 as bool
    tensors [n_images] (the unique images in order of first appearance) and t2i_r1, t2i_r5, t2i_r10 as bool
    tensors [n_texts] (the unique captions in order of first appearance).
    """
    if not len(captions) == len(image_emb) == len(text_emb):
        raise ValueError(f"{len(image_emb)} image and {len(text_emb)} text embeddings for {len(captions)} captions")
    require_finite(image_emb, "image embeddings")
    require_finite(text_emb, "text embeddings")
    text_group, text_first = _groups(captions)
    image_group, image_first = _groups(image_ids if image_ids is not None else range(len(captions)))
    images, texts = image_emb[image_first].float(), text_emb[text_first].float()
    i2t = _ranks(images, texts, image_group, text_group, chunk_size)
    t2i = _ranks(texts, images, text_group, image_group, chunk_size)
    return {**{f"i2t_r{k}": i2t < k for k in RECALL_KS}, **{f"t2i_r{k}": t2i < k for k in RECALL_KS}}


def recalls(hits: dict[str, torch.Tensor]) -> dict:
    """Recall in percent from `retrieval_hits`' per-query hits, plus the query counts n_images and n_texts."""
    return {**{key: 100.0 * h.double().mean().item() for key, h in hits.items()},
            "n_images": len(hits["i2t_r1"]), "n_texts": len(hits["t2i_r1"])}


def _groups(keys: Iterable[Hashable]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item its group index (groups numbered by first appearance), and per group its first item."""
    index: dict = {}
    group = [index.setdefault(key, len(index)) for key in keys]
    first = [0] * len(index)
    for item in reversed(range(len(group))):
        first[group[item]] = item
    return torch.tensor(group, dtype=torch.long), torch.tensor(first, dtype=torch.long)


def _ranks(queries: torch.Tensor, gallery: torch.Tensor, query_group: torch.Tensor, gallery_group: torch.Tensor,
           chunk_size: int) -> torch.Tensor:
    """Per query the number of negatives scoring at least as high as its best positive (it hits at k when this
    is below k); pair i makes gallery item gallery_group[i] a positive of query query_group[i]. Queries are
    scored in chunks so N x N similarities never sit in memory at once."""
    ranks = torch.empty(len(queries), dtype=torch.long)
    for start in range(0, len(queries), chunk_size):
        stop = min(start + chunk_size, len(queries))
        scores = queries[start:stop] @ gallery.T
        positive = torch.zeros_like(scores, dtype=torch.bool)
        inside = (query_group >= start) & (query_group < stop)
        positive[query_group[inside] - start, gallery_group[inside]] = True
        best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        ranks[start:stop] = ((scores >= best) & ~positive).sum(dim=1)
    return ranks
