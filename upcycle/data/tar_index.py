"""Tar shards as random-access image-caption pairs: member headers and captions are read once, images stay in
the shards as references `SHARD.tar#OFFSET+SIZE` that a DataLoader worker decodes on demand. Random access
is what the training commands need (clustering a whole set, per-cluster batches); streaming is in tar_shards.py.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from encoder.utils.errors import UserError
from encoder.utils.user_files import decode_utf8

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
    """The bytes of an image reference made by `index_tar_pairs`, or None when `ref` is a plain path.
    Raises UserError when the shard is gone or now shorter than when it was indexed."""
    m = _TAR_REF.match(ref)
    if m is None:
        return None
    size = int(m.group("size"))
    try:
        with open(m.group("shard"), "rb") as f:
            f.seek(int(m.group("offset")))
            data = f.read(size)
    except OSError as err:
        raise UserError(f"cannot read tar shard {m.group('shard')} ({err.strerror or err}); it was readable when "
                        "the data was indexed: restore it and rerun") from None
    if len(data) != size:
        raise UserError(f"tar shard {m.group('shard')} ends before image {ref} ({len(data)} of {size} bytes): the "
                        "shard changed after it was indexed; restore it and rerun")
    return data


def describe_image(ref: str) -> str:
    """A plain path as it is; a tar reference as 'SHARD member NAME' (the member's header, read back from the
    block before its data), for error messages. Falls back to the byte range when that header cannot be read."""
    m = _TAR_REF.match(ref)
    if m is None:
        return ref
    shard, offset, size = m.group("shard"), int(m.group("offset")), int(m.group("size"))
    try:
        with open(shard, "rb") as f:
            f.seek(offset - tarfile.BLOCKSIZE)
            header = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), tarfile.ENCODING, "surrogateescape")
        if header.size == size:
            return f"{shard} member {header.name}"
    except (OSError, ValueError, tarfile.TarError):
        pass
    return f"{shard} member at bytes {offset}..{offset + size}"


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


def sample_role(ext: str) -> str | None:
    """What a member with this extension is in a sample: 'image', 'caption' (.txt) or None (ignored)."""
    return "image" if ext in IMAGE_EXTENSIONS else "caption" if ext == "txt" else None


def iter_shard_files(shard: str, read: Callable[[str], bool]) -> Iterator[tuple[str, str, tarfile.TarInfo,
                                                                                bytes | None]]:
    """(key, extension, member, bytes) for each regular file of one uncompressed tar shard, in member order;
    the bytes are read when `read(extension)`, else None.

    Raises UserError naming the shard when it is not an uncompressed tar, when a member header is corrupt or the
    file is cut short (in a header, at a member boundary, or inside a member's data), or when an image member is
    empty. `tarfile` itself ends the iteration silently at a bad or missing header after the first, which would
    quietly drop the rest of the shard; here the walk must end at the archive's end-of-archive block.
    """
    fix = "re-download or re-write the shard"
    try:
        size = os.path.getsize(shard)
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    raise UserError(f"tar shard {shard} is truncated: member {member.name} needs bytes up to "
                                    f"{member.offset_data + member.size} but the file has {size}; {fix}")
                key, ext = _split_key(member.name)
                if member.size == 0 and sample_role(ext) == "image":
                    raise UserError(f"tar shard {shard}: image {member.name} is empty (0 bytes); {fix} without "
                                    "that sample")
                yield key, ext, member, tar.extractfile(member).read() if read(ext) else None
            end = tar.offset  # where tarfile stopped looking for the next header
        with open(shard, "rb") as f:
            f.seek(end)
            block = f.read(tarfile.BLOCKSIZE)
    except tarfile.TarError as err:
        raise UserError(f"tar shard {shard} is not a readable uncompressed tar archive ({err}); {fix} "
                        "(compressed .tar.gz shards are not supported: decompress them)") from None
    except OSError as err:
        raise UserError(f"cannot read tar shard {shard} ({err.strerror or err}); check the file") from None
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        what = "ends" if len(block) < tarfile.BLOCKSIZE else "has a corrupt member header"
        raise UserError(f"tar shard {shard} {what} at byte {end} of {size} (no end-of-archive block there), so the "
                        f"samples after it cannot be read; {fix}")


def index_tar_pairs(spec: str | Path) -> list[tuple[str, str, str]]:
    """(where, image reference, caption) for every complete sample of the shards, reading headers and captions
    only; images stay in the shards until a DataLoader worker decodes them. A broken shard, a caption that is not
    UTF-8, or a sample with two images or two captions is a UserError naming the shard and member."""
    rows = []
    for shard in expand_shards(spec):
        samples: dict[str, dict[str, object]] = {}
        for key, ext, member, data in iter_shard_files(shard, lambda ext: ext == "txt"):
            entry = samples.setdefault(key, {})
            role = sample_role(ext)
            if role is None:
                continue
            if role in entry:
                raise UserError(f"tar shard {shard}: sample {key} has two {role} members (the second is "
                                f"{member.name}), so which one belongs to the sample is unknown; keep one")
            if role == "image":
                entry["image"] = tar_image_ref(str(Path(shard).absolute()), member.offset_data, member.size)
            else:
                entry["caption"] = decode_utf8(data, f"tar shard {shard}: caption {member.name}",
                                               "re-write the shard with UTF-8 captions")
        for key, entry in samples.items():
            if "image" in entry and "caption" in entry:
                rows.append((f"{shard}:{key}", entry["image"], entry["caption"]))
            else:
                logger.warning("%s: sample %s lacks an image or a .txt caption; skipped", shard, key)
    return rows
