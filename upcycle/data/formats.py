"""Reading image-caption pairs from the formats people ship them in: LLaVA / ShareGPT4V JSON, JSONL, CSV, TSV.

One validated reader: every format yields its raw fields per record, and `_pair` checks them the same way
(the image a path string, the caption a non-empty string: JSON `null`, numbers, lists are refused, never turned
into the text "None" or "[...]"). Files are decoded as UTF-8 (a BOM is allowed) with the offending byte named.
Everything is validated up front (record types, captions present, images on disk and not empty) so a training
run fails in its first second with the row to fix, not hours later in a DataLoader worker.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoder.utils.errors import UserError
from encoder.utils.user_files import json_kind, llava_records, missing_or_empty, read_utf8

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
    (default: the data file's folder). Missing or empty (0-byte) images are an error unless `skip_missing` drops
    them. Tar shards (`x.tar`, `x-{000..009}.tar`, a glob) are indexed; their images are references into the
    shards."""
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
    root = Path(image_root) if image_root is not None else path.parent
    text = read_text_file(path, "data file")
    pairs = [_pair(path, root, *fields) for fields in _READERS[suffix](path, text)]
    if not pairs:
        raise UserError(f"{path} holds no image-caption pairs; expected at least one row")
    return _check_images(pairs, path, skip_missing)


def read_text_file(path: str | Path, what: str) -> str:
    """The text of a file the user named (UTF-8, see `read_utf8`); `what` ("classes file") names it in the error
    when it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; check the path")
    return read_utf8(path, f"{what} {path}")


def _pair(path: Path, root: Path, where: str, image: Any, caption: Any, caption_from: str = "") -> Pair:
    """The one check of a record's fields, whatever the format; `caption_from` says where in the record the
    caption was taken from (a LLaVA record's turn)."""
    if caption is None:
        raise UserError(f"{path}: caption at {where}{caption_from} is null; write the caption text or remove the row")
    if not isinstance(caption, str):
        raise UserError(f"{path}: caption at {where}{caption_from} is a JSON {json_kind(caption)}, not a string; "
                        "write the caption as one string")
    caption = caption.strip()
    if not caption:
        raise UserError(f"{path}: empty caption at {where}{caption_from}; fill it in or remove the row")
    if image is None or image == "":
        raise UserError(f"{path}: no image at {where}; every row needs an image path")
    if not isinstance(image, str):
        raise UserError(f"{path}: \"image\" at {where} is a JSON {json_kind(image)}; expected one image path "
                        "(a string)")
    return Pair(str((root / image).absolute()), caption)


def _check_images(pairs: list[Pair], path: Path, skip_missing: bool) -> list[Pair]:
    """One stat per image, up front (see `encoder.utils.user_files.missing_or_empty`): missing, not a file, or empty
    (0 bytes, e.g. a failed download); an undecodable image is found where it is decoded (`datasets.load_rgb`)."""
    missing, empty = missing_or_empty(p.image for p in pairs)
    if not missing and not empty:
        return pairs
    if not skip_missing:
        if missing:
            raise UserError(f"{path}: {len(missing)} of {len(pairs)} images not found, e.g. {', '.join(missing[:3])}; "
                            "fix --image-root or pass --skip-missing to drop them")
        raise UserError(f"{path}: {len(empty)} of {len(pairs)} images are empty files (0 bytes), e.g. "
                        f"{', '.join(empty[:3])}; fetch them again, or pass --skip-missing to drop them")
    logger.warning("%s: dropped %d of %d pairs whose image is missing or empty (0 bytes)", path,
                   len(missing) + len(empty), len(pairs))
    gone = set(missing) | set(empty)
    kept = [p for p in pairs if p.image not in gone]
    if not kept:
        raise UserError(f"{path}: none of the {len(pairs)} images exist (or all are empty); check --image-root")
    return kept


def _llava_caption(rec: dict, where: str) -> tuple[Any, str]:
    """(the caption, where in the record it is): the first answer (`from: gpt`) of a LLaVA / ShareGPT4V record,
    or its "caption" field. Raises UserError for a `conversations` that is not a list of objects."""
    if "conversations" not in rec:
        return rec.get("caption", ""), ""
    turns = rec["conversations"]
    if not isinstance(turns, list):
        raise UserError(f"\"conversations\" at {where} is a JSON {json_kind(turns)}; expected a list of "
                        "{\"from\": ..., \"value\": ...} turns")
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"conversations[{j}] at {where} is a JSON {json_kind(turn)}; expected an object "
                            "{\"from\": ..., \"value\": ...}")
    for j, turn in enumerate(turns):
        if turn.get("from") == "gpt":
            return turn.get("value", ""), f" (conversations[{j}], the first gpt turn)"
    raise UserError(f"no gpt turn at {where}; the caption is the value of the first turn with \"from\": \"gpt\"")


def _read_llava_json(path: Path, text: str) -> Iterator[tuple]:
    for i, rec in enumerate(llava_records(text, path)):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: record at index {i} is a JSON {json_kind(rec)}, not an object; expected "
                            "LLaVA records")
        where = f"index {i}" + (f" (id {rec['id']})" if "id" in rec else "")
        try:
            caption, caption_from = _llava_caption(rec, where)
        except UserError as err:
            raise UserError(f"{path}: {err}") from None
        yield where, rec.get("image", ""), caption, caption_from


def _read_jsonl(path: Path, text: str) -> Iterator[tuple]:
    # split("\n"), not splitlines(): a JSON string may hold U+2028 and friends, which splitlines() breaks on.
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: line {n} is not valid JSON ({err}); expected one object per line") from None
        if not isinstance(rec, dict) or "image" not in rec:
            raise UserError(f"{path}: line {n} has no \"image\" field; expected {{\"image\": ..., \"caption\": ...}}")
        yield f"line {n}", rec["image"], rec.get("caption", "")


def _read_table(path: Path, text: str, delimiter: str) -> Iterator[tuple]:
    kind, separator = ("TSV", "a tab") if delimiter == "\t" else ("CSV", f"the delimiter {delimiter!r}")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        if reader.fieldnames is None:
            return
        absent = [c for c in ("image", "caption") if c not in reader.fieldnames]
        if absent:
            raise UserError(f"{path}: header {reader.fieldnames} lacks column(s) {absent}; "
                            "expected a header row with image and caption columns")
        width = len(reader.fieldnames)
        for row in reader:
            where = f"line {reader.line_num}"
            # DictReader puts the fields past the header's under None and fills a short row with None: either
            # way a field was split or lost (an unquoted delimiter in a caption), and the caption would be cut.
            fields = width + len(row.get(None, ())) - sum(v is None for k, v in row.items() if k is not None)
            if fields != width:
                raise UserError(f"{path}: {where} has {fields} fields but the header has {width}; quote fields "
                                f"that contain {separator} or a line break")
            yield where, row["image"], row["caption"]
    except csv.Error as err:
        raise UserError(f"{path}: line {reader.line_num} is not valid {kind} ({err}); fix that line") from None


_READERS = {
    ".json": _read_llava_json,
    ".jsonl": _read_jsonl,
    ".csv": lambda p, t: _read_table(p, t, ","),
    ".tsv": lambda p, t: _read_table(p, t, "\t"),
}
