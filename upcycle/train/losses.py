"""Symmetric InfoNCE over a global batch whose negatives are gathered from every process, with gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all processes in rank order; gradients flow back to every rank's share.

    A plain all_gather would cut the graph at the other ranks' embeddings, so each rank would only train
    through its own rows of the similarity matrix.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def clip_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float,
                          label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy for this rank's rows against the global batch.

    image_emb / text_emb: this rank's L2-normalised embeddings [b, D]; `logit_scale` is the multiplier itself
    (e.g. 100, or `model.logit_scale.exp()`). On one process this is CLIP's loss over the batch.
    """
    all_images, all_texts = gather_with_grad(image_emb), gather_with_grad(text_emb)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    labels = torch.arange(image_emb.shape[0], device=image_emb.device) + rank * image_emb.shape[0]
    logits_i2t = logit_scale * image_emb @ all_texts.t()
    logits_t2i = logit_scale * text_emb @ all_images.t()
    return 0.5 * (F.cross_entropy(logits_i2t.float(), labels, label_smoothing=label_smoothing)
                  + F.cross_entropy(logits_t2i.float(), labels, label_smoothing=label_smoothing))
