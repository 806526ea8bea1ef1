"""Encoding image-caption pairs into L2-normalised embeddings, for CLIPs and SigLIPs, dense or MoE, alike.

Used by zero-shot evaluation and by training stages that cluster a whole training set, so only the
final embeddings are kept: [N, D] float32 on the CPU, filled batch by batch. Each model is fed as its family was
trained: its own image processor, and captions tokenized by `upcycle.data.model_tokenizer_fn` (SigLIP: padded to
its fixed length with no attention mask, the last position pooled).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from encoder.utils.errors import UserError

from ..data import ImageTextDataset, Pair, processor_transform, tokenizer_fn, uses_sigmoid_loss
from ..data.family_inputs import check_image_inputs


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def text_max_length(model: PreTrainedModel) -> int:
    """The text tower's context length: longer captions are truncated to it, as CLIP was trained."""
    return model.config.text_config.max_position_embeddings


def fixed_length_text(model: PreTrainedModel) -> bool:
    """Whether the model's text tower takes captions padded to its full length, unmasked (SigLIP, SigLIP2)."""
    return uses_sigmoid_loss(model.config)


def embedding_dim(model: PreTrainedModel) -> int:
    """The width of the embeddings both towers pool to: CLIP's `projection_dim`, SigLIP's text head width."""
    config = model.config
    dim = getattr(config, "projection_dim", None)
    return dim if dim is not None else config.text_config.projection_size


def pair_loader(pairs: Sequence[Pair], image_processor, tokenizer, max_length: int, batch_size: int = 64,
                num_workers: int = 0, pin_memory: bool = False, fixed_length: bool = False) -> DataLoader:
    """Batches of {"pixel_values", "captions", "input_ids", "attention_mask"} in pair order (no tokens when
    `tokenizer` is None; no attention_mask when `fixed_length`, see `fixed_length_text`); images are decoded in the
    workers."""
    if batch_size < 1:
        raise UserError(f"batch size {batch_size}: expected 1 or more")
    tokenize = tokenizer_fn(tokenizer, max_length, fixed_length) if tokenizer is not None else None
    dataset = ImageTextDataset(pairs, processor_transform(image_processor), tokenize)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=dataset.collate, pin_memory=pin_memory)


@contextlib.contextmanager
def inference(model: torch.nn.Module) -> Iterator[torch.device]:
    """Eval mode (no router jitter), inference mode and bf16 autocast on CUDA; restores the model's mode.

    Yields the model's device. Callers inside a training loop get their model back in training mode.
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            yield device
    finally:
        model.train(was_training)


def _normalized(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1).cpu()


def _text_features(model: PreTrainedModel, batch: dict, device: torch.device) -> torch.Tensor:
    mask = batch.get("attention_mask")  # none for SigLIP: its text tower attends to every position
    out = model.get_text_features(input_ids=batch["input_ids"].to(device, non_blocking=True),
                                  attention_mask=mask.to(device, non_blocking=True) if mask is not None else None)
    return _normalized(out.pooler_output)


def encode_pairs(model: PreTrainedModel, pairs: Sequence[Pair], image_processor, tokenizer, batch_size: int = 64,
                 num_workers: int = 0, device: str | torch.device | None = None,
                 desc: str = "encoding") -> tuple[torch.Tensor, torch.Tensor]:
    """Image and caption embeddings of `pairs` (a CLIP or SigLIP full model, dense or MoE), L2-normalised.

    Returns (image_emb, text_emb), each [len(pairs), D] float32 on the CPU, row i = pair i (D: `embedding_dim`).
    `device`: where to run (the model is moved there); default: where the model already is.
    """
    if tokenizer is None:
        raise UserError("the model has no tokenizer; save one into its directory (tokenizer.json) to encode captions")
    check_image_inputs(model.config)
    if device is not None:
        model.to(device)
    dim = embedding_dim(model)
    image_emb = torch.empty(len(pairs), dim)
    text_emb = torch.empty(len(pairs), dim)
    with inference(model) as dev:
        loader = pair_loader(pairs, image_processor, tokenizer, text_max_length(model), batch_size, num_workers,
                             pin_memory=dev.type == "cuda", fixed_length=fixed_length_text(model))
        start = 0
        for batch in tqdm(loader, desc=desc, unit="batch"):
            end = start + len(batch["captions"])
            pixels = batch["pixel_values"].to(dev, non_blocking=True)
            image_emb[start:end] = _normalized(model.get_image_features(pixel_values=pixels).pooler_output)
            text_emb[start:end] = _text_features(model, batch, dev)
            start = end
    return image_emb, text_emb


def encode_texts(model: PreTrainedModel, tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings [len(texts), D] (float32, CPU), e.g. of class prompts, tokenized as the
    model's family was trained."""
    if tokenizer is None:
        raise UserError("the model has no tokenizer; save one into its directory (tokenizer.json) to encode text")
    tokenize = tokenizer_fn(tokenizer, text_max_length(model), fixed_length_text(model))
    chunks = [torch.empty(0, embedding_dim(model))]
    with inference(model) as device:
        for start in range(0, len(texts), batch_size):
            chunks.append(_text_features(model, tokenize(list(texts[start:start + batch_size])), device))
    return torch.cat(chunks)
