"""Streaming WebDataset-style tar shards (`key.jpg` + `key.txt` members) with the stdlib `tarfile`; shards are
split across DataLoader workers. For random access (what the training commands need) see tar_index.py."""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .datasets import ImageTransform, Tokenize, collate
from .tar_index import IMAGE_EXTENSIONS, _split_key, expand_shards

logger = logging.getLogger(__name__)

def iter_tar_samples(shard: str) -> Iterator[tuple[str, bytes, str]]:
    """(key, image bytes, caption) for each complete sample of one shard, in member order."""
    key, image, caption = None, None, None
    with tarfile.open(shard) as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = _split_key(member.name)
            if k != key:
                if image is not None and caption is not None:
                    yield key, image, caption
                elif key is not None:
                    logger.warning("%s: sample %s lacks an image or a .txt caption; skipped", shard, key)
                key, image, caption = k, None, None
            if ext in IMAGE_EXTENSIONS:
                image = tar.extractfile(member).read()
            elif ext == "txt":
                caption = tar.extractfile(member).read().decode("utf-8").strip()
        if image is not None and caption is not None:
            yield key, image, caption
        elif key is not None:
            logger.warning("%s: sample %s lacks an image or a .txt caption; skipped", shard, key)


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
                with Image.open(io.BytesIO(data)) as img:
                    image = img.convert("RGB")
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
