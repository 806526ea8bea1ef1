"""Torch datasets over image-caption pairs: images are decoded in __getitem__, i.e. inside DataLoader
workers, so the main process only holds paths and strings. A file that cannot be decoded stops the run with
a `SampleError` naming it, which reaches the command line as one line even from a worker process."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from encoder.errors import UserError

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
    """list[str] -> padded `input_ids` / `attention_mask` through a transformers tokenizer."""

    def __init__(self, tokenizer: Any, max_length: int = 77):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        out = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


def tokenizer_fn(tokenizer: Any, max_length: int = 77) -> Tokenize:
    """The tokenize callable of a transformers tokenizer (CLIP's 77-token context by default)."""
    return TokenizerFn(tokenizer, max_length)


class SampleError(UserError):
    """A sample that cannot be loaded (an undecodable image, a broken shard), raised where it is loaded.

    A DataLoader worker's exception comes back to the main process as `SampleError(text)`, where torch's text is
    "Caught SampleError in DataLoader worker process N.\nOriginal Traceback ...\n<module>.SampleError: <message>";
    the message is taken back out of it, so the command still prints the one line and not a traceback.
    """

    def __init__(self, message: str):
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            last = message.rstrip().rsplit("\n", 1)[-1]
            message = last.partition(": ")[2] or last
        super().__init__(message)


def rgb_or_problem(img: Image.Image) -> Image.Image | str:
    """`img` as 8-bit RGB, or what is wrong with its pixels. Keeps the range of high-bit-depth greyscale: PIL's
    own `convert("RGB")` clips 16- and 32-bit values at 255, which turns a 16-bit gradient into black and white.

    16-bit ("I;16*") and 32-bit integer ("I", how PIL may hold a 16-bit PNG) pixels must lie in 0..65535 and keep
    their top 8 bits; float ("F") pixels must lie in 0..1 and are scaled by 255. Other values are refused: their
    scale is unknown, and a guessed one would train on wrong pixels.
    """
    mode = img.mode
    if mode == "I" or mode.startswith("I;16"):
        pixels = np.asarray(img)
        low, high = (int(pixels.min()), int(pixels.max())) if pixels.size else (0, 0)
        if low < 0 or high > 65535:
            return (f"holds {mode} pixels from {low} to {high}, outside the 16-bit range 0..65535; save it as an 8- "
                    "or 16-bit image")
        grey = (pixels.astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        pixels = np.asarray(img, dtype=np.float32)
        finite = bool(np.isfinite(pixels).all())
        low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
        if not finite or low < 0 or high > 1:
            what = "non-finite values" if not finite else f"values from {low:g} to {high:g}"
            return (f"holds float pixels with {what}, outside 0..1; save it as an 8- or 16-bit image, or with float "
                    "pixels in 0..1")
        return Image.fromarray(np.rint(pixels * 255).astype(np.uint8), mode="L").convert("RGB")
    return img.convert("RGB")


def decode_rgb(source: str | bytes, name: str | Callable[[], str]) -> Image.Image:
    """Decode an image file path or an image's bytes to RGB (greyscale, palette, RGBA and 16-bit images all become
    3 channels of 8 bits, see `rgb_or_problem`). Anything that stops the decode (not an image, a truncated file,
    more pixels than PIL's decompression-bomb limit `Image.MAX_IMAGE_PIXELS`, pixels of unknown scale) is a
    SampleError naming `name` (a callable is asked only then)."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that, and decodes: gigabytes per image per worker.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                img.load()
                rgb = rgb_or_problem(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SampleError(f"image {_name(name)} is too large to decode safely ({err}); downscale it (CLIP sees a "
                          "few hundred pixels a side) or remove its row") from None
    except Exception as err:  # noqa: BLE001 - whatever PIL raises on these bytes, the bytes are at fault
        detail = " ".join(str(err).split()) or type(err).__name__
        raise SampleError(f"cannot decode image {_name(name)} ({detail}); replace the file or remove its "
                          "row") from None
    if isinstance(rgb, str):
        raise SampleError(f"image {_name(name)} {rgb}")
    return rgb


def _name(name: str | Callable[[], str]) -> str:
    return name if isinstance(name, str) else name()


def load_rgb(path: str) -> Image.Image:
    """Decode an image file, or an image inside a tar shard (see `tar_index.index_tar_pairs`), to RGB
    (see `decode_rgb`); a SampleError names the file, or the shard and member, when it cannot be read or decoded."""
    try:
        data = read_tar_image(path)
    except UserError as err:
        raise SampleError(str(err)) from None
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
