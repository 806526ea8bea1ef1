"""WebDataset-style tar shards (`key.jpg` + `key.txt` members) read with the stdlib `tarfile`, so streaming
large caption corpora needs no extra dependency. Shards are split across DataLoader workers."""

from __future__ import annotations

import glob
import io
import logging
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from encoder.errors import UserError

from .datasets import ImageTransform, Tokenize, collate

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(spec: str | Path) -> list[str]:
    """`data/{000..009}.tar` (numeric braces, zero-padded as written), a glob, or one `.tar` path -> shard paths."""
    spec = str(spec)
    patterns = [spec]
    while any(_BRACE.search(p) for p in patterns):
        expanded = []
        for p in patterns:
            m = _BRACE.search(p)
            if m is None:
                expanded.append(p)
                continue
            lo, hi = m.group(1), m.group(2)
            width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
            expanded += [p[: m.start()] + str(i).zfill(width) + p[m.end():] for i in range(int(lo), int(hi) + 1)]
        patterns = expanded
    shards = []
    for p in patterns:
        shards += sorted(glob.glob(p)) if glob.has_magic(p) else [p]
    missing = [s for s in shards if not Path(s).is_file()]
    if not shards:
        raise UserError(f"tar shards {spec!r}: no file matches; expected a .tar path, a glob or a {{000..009}} range")
    if missing:
        raise UserError(f"tar shards {spec!r}: {len(missing)} of {len(shards)} not found, e.g. "
                        f"{', '.join(missing[:3])}; check the path or the range")
    return shards


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the member path up to the first dot of its file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


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
