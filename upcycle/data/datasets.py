"""Torch datasets over image-caption pairs: images are decoded in __getitem__, i.e. inside DataLoader
workers, so the main process only holds paths and strings. A file that cannot be decoded stops the run with
a UserError naming it, which reaches the command line as one line even from a worker process (see
`encoder.utils.errors.UserError`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from encoder.utils.user_files import decode_rgb

from .formats import Pair
from .tar_index import describe_image, read_tar_image

ImageTransform = Callable[[Image.Image], torch.Tensor]
Tokenize = Callable[[list[str]], dict[str, torch.Tensor]]


class ProcessorTransform:
    """PIL image -> [3, H, W] pixel tensor through a transformers image processor (a class, so it pickles
    into spawned workers)."""

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def processor_transform(image_processor: Any) -> ImageTransform:
    """The image transform of a transformers CLIPImageProcessor (resize, crop, normalise)."""
    return ProcessorTransform(image_processor)


class TokenizerFn:
    """list[str] -> padded `input_ids` (and `attention_mask`) through a transformers tokenizer.

    `fixed_length`: pad every caption to `max_length` and return no attention mask, as SigLIP's text tower was
    trained (big_vision, open_clip): it attends to every position, padding included, and pools the last one,
    so a caption's embedding depends on the padded length and a mask would change it. Otherwise CLIP's way:
    pad to the batch's longest caption and mask the padding."""

    def __init__(self, tokenizer: Any, max_length: int = 77, fixed_length: bool = False):
        self.tokenizer, self.max_length, self.fixed_length = tokenizer, max_length, fixed_length

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        out = self.tokenizer(captions, padding="max_length" if self.fixed_length else True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        if self.fixed_length:
            return {"input_ids": out["input_ids"]}
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


def tokenizer_fn(tokenizer: Any, max_length: int = 77, fixed_length: bool = False) -> Tokenize:
    """The tokenize callable of a transformers tokenizer (CLIP's 77-token context by default); see
    `upcycle.data.family_inputs.model_tokenizer_fn` for the one a given model was trained with."""
    return TokenizerFn(tokenizer, max_length, fixed_length)


def load_rgb(path: str) -> Image.Image:
    """Decode an image file, or an image inside a tar shard (see `tar_index.index_tar_pairs`), to RGB
    (see `encoder.utils.user_files.decode_rgb`); a UserError names the file, or the shard and member, when it cannot be
    read or decoded."""
    data = read_tar_image(path)
    if data is None:
        return decode_rgb(path, path)
    return decode_rgb(data, lambda: describe_image(path))


def collate(samples: Sequence[dict], tokenize: Tokenize | None = None) -> dict[str, Any]:
    """Stack `pixel_values`, keep `captions`, and tokenize them as one padded batch when `tokenize` is given."""
    captions = [s["caption"] for s in samples]
    batch: dict[str, Any] = {"pixel_values": torch.stack([s["pixel_values"] for s in samples]), "captions": captions}
    if tokenize is not None:
        batch.update(tokenize(captions))
    return batch


class ImageTextDataset(Dataset):
    """Pairs -> {"pixel_values", "caption"}; use `collate_fn=dataset.collate` to tokenize per batch."""

    def __init__(self, pairs: Sequence[Pair], image_transform: ImageTransform, tokenize: Tokenize | None = None):
        self.pairs = list(pairs)
        self.image_transform = image_transform
        self.tokenize = tokenize

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        return {"pixel_values": self.image_transform(load_rgb(pair.image)), "caption": pair.caption}

    def collate(self, samples: Sequence[dict]) -> dict[str, Any]:
        return collate(samples, self.tokenize)
