"""Contrastive losses over a global batch whose negatives are gathered from every process, with gradients:
CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid loss."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for the gathered rows and keeps this rank's slice
    (an all_reduce, so it also runs on gloo, which has no reduce_scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows:(dist.get_rank() + 1) * rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (same shape on every rank) from all processes in rank order, keeping gradients.

    A plain all_gather would cut the graph at the other ranks' embeddings, so each rank would only train
    through its own rows of the similarity matrix. With DDP's gradient averaging, the mean of the ranks'
    local losses then has exactly the gradient of the loss over the global batch.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _AllGather.apply(x)


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


def siglip_sigmoid_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float,
                        logit_bias: torch.Tensor | float) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss of this rank's images against every text of the global batch.

    image_emb / text_emb: this rank's L2-normalised embeddings [b, D] (the same b on every rank); `logit_scale`
    is the multiplier itself (`model.logit_scale.exp()`, as for `clip_contrastive_loss`), `logit_bias` the
    learned bias. Every (image, text) pair is a binary problem, +1 for the matching pair and -1 for all others:
    `-logsigmoid(labels * (logit_scale * image_emb @ texts.T + logit_bias)).sum() / b`.

    On one process this is `SiglipModel(return_loss=True)`'s loss. On several, each rank's images meet its own
    positives and every other rank's texts as negatives, normalised by the local b as open_clip's `SigLipLoss`
    does (its exchange of text blocks is replaced by one all_gather that keeps gradients): the mean of the
    ranks' losses is the loss over the concatenated batch, and DDP's gradient average is its gradient.
    """
    all_texts = gather_with_grad(text_emb)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    b = image_emb.shape[0]
    logits = (logit_scale * image_emb @ all_texts.t() + logit_bias).float()
    labels = -torch.ones_like(logits)
    labels[:, rank * b:(rank + 1) * b] += 2 * torch.eye(b, device=logits.device, dtype=logits.dtype)
    return -F.logsigmoid(labels * logits).sum() / b
