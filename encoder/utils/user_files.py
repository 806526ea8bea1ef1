"""Decoding the files a user hands in — data files as UTF-8 text (and LLaVA JSON), images as 8-bit RGB — with
one-line errors.

Shared by every reader of user data sets (upcycle.data's pair readers and tar shards, mllm_bridge's LLaVA
training records, the lmms-eval model for the images its tasks hand over: `image_rgb`), so a file that one of
them reads the others read the same way and refuse with the same line:
text is UTF-8 with a BOM allowed and the offending byte named; an image keeps the range of its 16-bit pixels and
whatever PIL raises on it names the file (or the shard member); an image path that is missing or empty (0 bytes)
is found with one stat, before any decoding.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from .errors import UserError

_BOM = b"\xef\xbb\xbf"


def decode_utf8(data: bytes, name: str, fix: str = "re-save it as UTF-8") -> str:
    """`data` as text (UTF-8, a leading BOM dropped); a UserError naming `name`, the byte and its offset otherwise."""
    bom = len(_BOM) if data.startswith(_BOM) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = bom + err.start
        line = data.count(b"\n", 0, offset) + 1
        raise UserError(f"{name} is not UTF-8 (byte 0x{data[offset]:02x} at offset {offset}, line {line}); "
                        f"{fix}") from None


def read_utf8(path: str | Path, name: str) -> str:
    """The text of the file at `path` (see `decode_utf8`); `name` says what it is in errors ('data file x.json')."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {name} ({err.strerror or err}); check its permissions") from None
    return decode_utf8(data, name)


def json_kind(value: Any) -> str:
    """How JSON calls the type of a parsed value, with a short preview: 'null', 'array [1, 2]', 'number 3'."""
    kind = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)
    if value is None:
        return kind
    preview = json.dumps(value, ensure_ascii=False)
    return f"{kind} {preview[:40] + '...' if len(preview) > 40 else preview}"


def llava_records(text: str, path: str | Path) -> list:
    """The records of a LLaVA / ShareGPT4V JSON file (`text`, read from `path`): a JSON list, each record checked
    by its reader; a UserError naming `path` when the text is not JSON or not a list."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); expected a LLaVA list of records") from None
    if not isinstance(records, list):
        raise UserError(f"{path} holds a JSON {type(records).__name__}; expected a list of LLaVA records "
                        '({"image": ..., "conversations": [...]})')
    return records


def missing_or_empty(paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """(missing, empty): the paths that are not a regular file, and those that are 0 bytes (a failed download).

    One stat per path, the up-front check of a data set's images. Headers and pixels are not read here: opening
    each image's header costs an open and a read per image on top of the stat (a million random reads for a
    million-image set: minutes on a local disk, far longer on network storage) and would still pass a truncated
    file, which only a full decode finds. So the decode, which happens anyway in the DataLoader worker
    (`decode_rgb`), is where an undecodable, truncated or oversized image stops the run with its path.
    """
    missing, empty = [], []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            missing.append(path)
            continue
        if not stat.S_ISREG(st.st_mode):
            missing.append(path)
        elif st.st_size == 0:
            empty.append(path)
    return missing, empty


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


def decode_rgb(source: str | bytes, name: str | Callable[[], str], record: str = "row") -> Image.Image:
    """Decode an image file path or an image's bytes to RGB (greyscale, palette, RGBA and 16-bit images all become
    3 channels of 8 bits, see `rgb_or_problem`). Anything that stops the decode (not an image, a truncated file,
    more pixels than PIL's decompression-bomb limit `Image.MAX_IMAGE_PIXELS`, pixels of unknown scale) is a
    UserError naming `name` (a callable is asked only then, e.g. to read a shard member's name); its fix says to
    remove the image's `record` ('row', 'record')."""
    try:
        with warnings.catch_warnings(), _truncated_images_refused():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that, and decodes: gigabytes per image per worker.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                img.load()
                rgb = rgb_or_problem(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UserError(f"image {_name(name)} is too large to decode safely ({err}); downscale it (CLIP sees a "
                        f"few hundred pixels a side) or remove its {record}") from None
    except Exception as err:  # noqa: BLE001 - whatever PIL raises on these bytes, the bytes are at fault
        detail = " ".join(str(err).split()) or type(err).__name__
        raise UserError(f"cannot decode image {_name(name)} ({detail}); replace the file or remove its "
                        f"{record}") from None
    return _rgb_or_error(rgb, name)


def image_rgb(img: Image.Image, name: str | Callable[[], str]) -> Image.Image:
    """An image someone else decoded (lmms-eval's data sets hand over PIL images) as 8-bit RGB by the same rules
    as `decode_rgb` (`rgb_or_problem`), so an evaluation sees the pixels training saw: PIL's own
    `convert("RGB")` would turn a 16-bit greyscale image into black and white. UserError naming `name` when its
    pixels are of unknown scale."""
    return _rgb_or_error(rgb_or_problem(img), name)


def _rgb_or_error(rgb: Image.Image | str, name: str | Callable[[], str]) -> Image.Image:
    if isinstance(rgb, str):
        raise UserError(f"image {_name(name)} {rgb}")
    return rgb


@contextlib.contextmanager
def _truncated_images_refused() -> Iterator[None]:
    """PIL's process-wide LOAD_TRUNCATED_IMAGES off for one decode. lmms-eval sets it on when imported (its
    `api/task.py`), after which PIL fills a cut-off file's missing rows with grey and says nothing: in a process
    that also imported lmms-eval, a truncated image would otherwise be trained on as a half-grey one."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _name(name: str | Callable[[], str]) -> str:
    return name if isinstance(name, str) else name()
