"""Tar shards as random-access image-caption pairs: member headers and captions are read once, images stay in
the shards as references `SHARD.tar#OFFSET+SIZE` that a DataLoader worker decodes on demand. Random access
is what the training commands need (clustering a whole set, per-cluster batches); streaming is in tar_shards.py.
"""

from __future__ import annotations

import glob
import logging
import re
import tarfile
from pathlib import Path

from encoder.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_TAR_REF = re.compile(r"^(?P<shard>.+\.tar)#(?P<offset>\d+)\+(?P<size>\d+)$")


def is_tar_spec(spec: str | Path) -> bool:
    """A data argument naming tar shards: `x.tar`, `x-{000..009}.tar` or a glob ending in .tar."""
    return str(spec).lower().endswith(".tar")


def tar_image_ref(shard: str, offset: int, size: int) -> str:
    return f"{shard}#{offset}+{size}"


def read_tar_image(ref: str) -> bytes | None:
    """The bytes of an image reference made by `index_tar_pairs`, or None when `ref` is a plain path."""
    m = _TAR_REF.match(ref)
    if m is None:
        return None
    with open(m.group("shard"), "rb") as f:
        f.seek(int(m.group("offset")))
        return f.read(int(m.group("size")))


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


def index_tar_pairs(spec: str | Path) -> list[tuple[str, str, str]]:
    """(where, image reference, caption) for every complete sample of the shards, reading headers and captions
    only; images stay in the shards until a DataLoader worker decodes them."""
    rows = []
    for shard in expand_shards(spec):
        samples: dict[str, dict[str, object]] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                entry = samples.setdefault(key, {})
                if ext in IMAGE_EXTENSIONS:
                    entry["image"] = tar_image_ref(str(Path(shard).absolute()), member.offset_data, member.size)
                elif ext == "txt":
                    entry["caption"] = tar.extractfile(member).read().decode("utf-8")
        for key, entry in samples.items():
            if "image" in entry and "caption" in entry:
                rows.append((f"{shard}:{key}", entry["image"], entry["caption"]))
            else:
                logger.warning("%s: sample %s lacks an image or a .txt caption; skipped", shard, key)
    return rows
