"""Reading image-caption pairs from the formats people ship them in: LLaVA / ShareGPT4V JSON, JSONL, CSV, TSV.

Everything is validated up front (captions present, images on disk) so a training run fails in its first
second with the row to fix, not hours later in a DataLoader worker.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from encoder.errors import UserError

from .tar_index import index_tar_pairs, is_tar_spec

logger = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".csv", ".tsv", ".tar")


@dataclass(frozen=True)
class Pair:
    """One training example: an absolute image path and its caption."""

    image: str
    caption: str


def read_pairs(path: str | Path, image_root: str | Path | None = None, skip_missing: bool = False) -> list[Pair]:
    """Read image-caption pairs; the format comes from the extension, image paths resolve against `image_root`
    (default: the data file's folder). Missing images are an error unless `skip_missing` drops them.
    Tar shards (`x.tar`, `x-{000..009}.tar`, a glob) are indexed; their images are references into the shards."""
    if is_tar_spec(path):
        pairs = []
        for where, image, caption in index_tar_pairs(path):
            if not caption.strip():
                raise UserError(f"{where}: empty caption; fill it in or remove the sample")
            pairs.append(Pair(image, caption.strip()))
        if not pairs:
            raise UserError(f"tar shards {path} hold no image-caption samples (key.jpg + key.txt)")
        return pairs
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise UserError(f"data file {path} has extension {suffix or '(none)'!r}; supported: "
                        f"{', '.join(SUPPORTED_EXTENSIONS)} (LLaVA JSON, JSONL/CSV/TSV with image and caption columns, "
                        "WebDataset tar shards such as data-{000..009}.tar)")
    if not path.is_file():
        raise UserError(f"data file {path} does not exist; check the path")
    root = Path(image_root) if image_root is not None else path.parent
    rows = _READERS[suffix](path)
    pairs = []
    for where, image, caption in rows:
        caption = (caption or "").strip()
        if not caption:
            raise UserError(f"{path}: empty caption at {where}; fill it in or remove the row")
        if not image:
            raise UserError(f"{path}: no image at {where}; every row needs an image path")
        pairs.append(Pair(str((root / image).absolute()), caption))
    if not pairs:
        raise UserError(f"{path} holds no image-caption pairs; expected at least one row")
    return _check_images(pairs, path, skip_missing)


def _check_images(pairs: list[Pair], path: Path, skip_missing: bool) -> list[Pair]:
    missing = [p.image for p in pairs if not Path(p.image).is_file()]
    if not missing:
        return pairs
    if not skip_missing:
        raise UserError(f"{path}: {len(missing)} of {len(pairs)} images not found, e.g. {', '.join(missing[:3])}; "
                        "fix --image-root or pass --skip-missing to drop them")
    logger.warning("%s: dropped %d of %d pairs whose image is missing", path, len(missing), len(pairs))
    gone = set(missing)
    kept = [p for p in pairs if p.image not in gone]
    if not kept:
        raise UserError(f"{path}: none of the {len(pairs)} images exist; check --image-root")
    return kept


def first_gpt_turn(conversations: Iterable[dict]) -> str:
    """The caption of a LLaVA / ShareGPT4V record: the first answer (`from: gpt`)."""
    for turn in conversations:
        if turn.get("from") == "gpt":
            return str(turn.get("value", ""))
    return ""


def _read_llava_json(path: Path) -> Iterator[tuple[str, str, str]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); expected a LLaVA list of records") from None
    if not isinstance(records, list):
        raise UserError(f"{path} holds a JSON {type(records).__name__}; expected a list of LLaVA records "
                        '({"image": ..., "conversations": [...]})')
    for i, rec in enumerate(records):
        where = f"index {i}" + (f" (id {rec.get('id')})" if isinstance(rec, dict) and "id" in rec else "")
        if not isinstance(rec, dict):
            raise UserError(f"{path}: record at index {i} is not an object; expected LLaVA records")
        caption = first_gpt_turn(rec.get("conversations", [])) if "conversations" in rec else rec.get("caption", "")
        yield where, rec.get("image", ""), caption


def _read_jsonl(path: Path) -> Iterator[tuple[str, str, str]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: line {n} is not valid JSON ({err}); expected one object per line") from None
            if not isinstance(rec, dict) or "image" not in rec:
                raise UserError(f"{path}: line {n} has no \"image\" field; expected {{\"image\": ..., \"caption\": ...}}")
            yield f"line {n}", rec["image"], rec.get("caption", "")


def _read_table(path: Path, delimiter: str) -> Iterator[tuple[str, str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            return
        absent = [c for c in ("image", "caption") if c not in reader.fieldnames]
        if absent:
            raise UserError(f"{path}: header {reader.fieldnames} lacks column(s) {absent}; "
                            "expected a header row with image and caption columns")
        for row in reader:
            yield f"line {reader.line_num}", row["image"], row["caption"]


_READERS = {
    ".json": _read_llava_json,
    ".jsonl": _read_jsonl,
    ".csv": lambda p: _read_table(p, ","),
    ".tsv": lambda p: _read_table(p, "\t"),
}
