"""Streaming WebDataset-style tar shards (`key.jpg` + `key.txt` members) with the stdlib `tarfile`; shards are
split across DataLoader workers. For random access (what the training commands need) see tar_index.py."""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from encoder.utils.errors import UserError
from encoder.utils.user_files import decode_rgb, decode_utf8

from .datasets import ImageTransform, Tokenize, collate
from .tar_index import expand_shards, iter_shard_files, sample_role

logger = logging.getLogger(__name__)


def iter_tar_samples(shard: str) -> Iterator[tuple[str, bytes, str]]:
    """(key, image bytes, caption) for each complete sample of one shard, in member order.

    A broken shard (see `tar_index.iter_shard_files`), an empty caption or one that is not UTF-8, or a sample
    with two images or two captions is a UserError naming the shard; a truncated shard is found when the walk
    reaches the cut, after the samples before it were yielded.
    """
    key, image, caption = None, None, None

    def complete() -> bool:
        if image is not None and caption is not None:
            return True
        if key is not None:
            logger.warning("%s: sample %s lacks an image or a .txt caption; skipped", shard, key)
        return False

    for k, ext, member, data in iter_shard_files(shard, lambda ext: sample_role(ext) is not None):
        if k != key:
            if complete():
                yield key, image, caption
            key, image, caption = k, None, None
        role = sample_role(ext)
        if role is not None and (image if role == "image" else caption) is not None:
            raise UserError(f"tar shard {shard}: sample {k} has two {role} members (the second is {member.name}), "
                            "so which one belongs to the sample is unknown; keep one")
        if role == "image":
            image = data
        elif role == "caption":
            caption = decode_utf8(data, f"tar shard {shard}: caption {member.name}",
                                  "re-write the shard with UTF-8 captions").strip()
            if not caption:
                raise UserError(f"tar shard {shard}: caption {member.name} is empty; fill it in or remove the sample")
    if complete():
        yield key, image, caption


class TarShardDataset(IterableDataset):
    """Stream {"pixel_values", "caption", "key"} from tar shards; DataLoader worker w of n reads shards w, w+n, ..."""

    def __init__(self, shards: str | Path | list[str], image_transform: ImageTransform,
                 tokenize: Tokenize | None = None):
        self.shards = list(shards) if isinstance(shards, list) else expand_shards(shards)
        self.image_transform = image_transform
        self.tokenize = tokenize

    def _my_shards(self) -> list[str]:
        info = get_worker_info()
        if info is None:
            return self.shards
        if len(self.shards) < info.num_workers and info.id == 0:
            logger.warning("%d shards for %d DataLoader workers: some workers will idle", len(self.shards),
                           info.num_workers)
        return self.shards[info.id :: info.num_workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for shard in self._my_shards():
            for key, data, caption in iter_tar_samples(shard):
                image = decode_rgb(data, f"{shard} sample {key}")
                yield {"pixel_values": self.image_transform(image), "caption": caption, "key": key}

    def collate(self, samples: list[dict]) -> dict[str, Any]:
        return collate(samples, self.tokenize)


def write_tar_shard(path: str | Path, samples: list[tuple[str, bytes, str, str]]) -> Path:
    """Write (key, image bytes, image extension, caption) samples as one shard (for tests and small exports)."""
    path = Path(path)
    with tarfile.open(path, "w") as tar:
        for key, data, ext, caption in samples:
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.txt", caption.encode("utf-8"))):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path
