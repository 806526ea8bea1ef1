"""Fault tier, bad data: every corrupt or wrongly typed input of the image-text readers (upcycle's pairs and tar
shards, LLaVA's training records) stops with one line naming the file and the record, never trains on a wrong
value (a null caption read as the text "None", a 16-bit image clipped to black and white, the samples after a
tar shard's cut silently dropped), and reaches the command line as that line even from a DataLoader worker."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from encoder.utils.errors import NonFiniteValues, TrainingDiverged, UserError
from mllm_bridge.train import data as llava_data
from upcycle.data import ImageTextDataset, TarShardDataset, read_pairs, write_tar_shard


def png(color=(200, 10, 10), size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def noise_png(side=48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def one_line_error(call) -> str:
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


@pytest.fixture
def folder(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(png())
    return tmp_path


def llava(caption="a red square", image="a.png", **record):
    return {"id": "r0", "image": image, "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                         {"from": "gpt", "value": caption}], **record}


# -- records: upcycle's pair reader -------------------------------------------------------------------------
# (file name, file content, the error after "{path}: ")

RECORD_FAULTS = {
    "json null gpt value": ("d.json", json.dumps([llava(), llava(None)]),
                            "caption at index 1 (id r0) (conversations[1], the first gpt turn) is null; write the "
                            "caption text or remove the row"),
    "json null caption field": ("d.json", json.dumps([{"image": "a.png", "caption": None}]),
                                "caption at index 0 is null; write the caption text or remove the row"),
    "json null record": ("d.json", json.dumps([llava(), None]),
                         "record at index 1 is a JSON null, not an object; expected LLaVA records"),
    "json caption int": ("d.json", json.dumps([llava(7)]),
                         "caption at index 0 (id r0) (conversations[1], the first gpt turn) is a JSON number 7, not "
                         "a string; write the caption as one string"),
    "json conversations string": ("d.json", json.dumps([{"image": "a.png", "conversations": "a red square"}]),
                                  '"conversations" at index 0 is a JSON string "a red square"; expected a list of '
                                  '{"from": ..., "value": ...} turns'),
    "json conversations of strings": ("d.json", json.dumps([{"image": "a.png", "conversations": ["hi", "a cat"]}]),
                                      'conversations[0] at index 0 is a JSON string "hi"; expected an object '
                                      '{"from": ..., "value": ...}'),
    "json no gpt turn": ("d.json", json.dumps([{"image": "a.png", "conversations": [{"from": "human",
                                                                                       "value": "hi"}]}]),
                         'no gpt turn at index 0; the caption is the value of the first turn with "from": "gpt"'),
    "json image list": ("d.json", json.dumps([llava(image=["a.png", "b.png"])]),
                        '"image" at index 0 (id r0) is a JSON array ["a.png", "b.png"]; expected one image path '
                        "(a string)"),
    "jsonl null caption": ("d.jsonl", '{"image": "a.png", "caption": "ok"}\n{"image": "b.png", "caption": null}\n',
                           "caption at line 2 is null; write the caption text or remove the row"),
    "jsonl caption list": ("d.jsonl", '{"image": "a.png", "caption": ["a", "red square"]}\n',
                           'caption at line 1 is a JSON array ["a", "red square"], not a string; write the caption '
                           "as one string"),
    "jsonl image int": ("d.jsonl", '{"image": 3, "caption": "a red square"}\n',
                        '"image" at line 1 is a JSON number 3; expected one image path (a string)'),
    "csv unquoted comma": ("d.csv", "image,caption\na.png,a red square\nb.png,a red, square\n",
                           "line 3 has 3 fields but the header has 2; quote fields that contain the delimiter ',' "
                           "or a line break"),
    "tsv short row": ("d.tsv", "image\tcaption\na.png\n",
                      "line 2 has 1 fields but the header has 2; quote fields that contain a tab or a line break"),
}


@pytest.mark.parametrize("fault", RECORD_FAULTS)
def test_a_wrongly_typed_record_is_one_line_naming_file_and_record(folder, fault):
    name, content, problem = RECORD_FAULTS[fault]
    path = folder / name
    path.write_text(content, encoding="utf-8")
    assert one_line_error(lambda: read_pairs(path)) == f"{path}: {problem}"


@pytest.mark.parametrize("name, content, line", [
    ("d.json", json.dumps([llava("caf\u00e9 au lait")], ensure_ascii=False), 1),
    ("d.jsonl", '{"image": "a.png", "caption": "ok"}\n{"image": "b.png", "caption": "na\u00efve"}\n', 2),
    ("d.csv", "image,caption\na.png,r\u00e9sum\u00e9\n", 2),
])
def test_latin1_text_is_one_line_with_the_byte_and_its_offset(folder, name, content, line):
    path = folder / name
    data = content.encode("latin-1")
    path.write_bytes(data)
    offset = min(i for i, byte in enumerate(data) if byte > 127)  # the first Latin-1 letter
    assert one_line_error(lambda: read_pairs(path)) == (
        f"data file {path} is not UTF-8 (byte 0x{data[offset]:02x} at offset {offset}, line {line}); re-save it as "
        "UTF-8")


@pytest.mark.parametrize("name, header", [("d.csv", "image,caption"), ("d.tsv", "image\tcaption")])
def test_a_utf8_bom_before_the_header_is_read_as_utf8(folder, name, header):
    sep = header[5]
    path = folder / name
    path.write_bytes(b"\xef\xbb\xbf" + f"{header}\na.png{sep}caf\u00e9\nb.png{sep}two\n".encode())
    pairs = read_pairs(path)
    assert [(p.image, p.caption) for p in pairs] == [(str(folder / "a.png"), "caf\u00e9"), (str(folder / "b.png"),
                                                                                          "two")]


def test_empty_image_files_are_refused_up_front_or_dropped_when_asked(folder):
    (folder / "b.png").write_bytes(b"")
    path = folder / "d.jsonl"
    path.write_text('{"image": "a.png", "caption": "one"}\n{"image": "b.png", "caption": "two"}\n')
    assert one_line_error(lambda: read_pairs(path)) == (
        f"{path}: 1 of 2 images are empty files (0 bytes), e.g. {folder / 'b.png'}; fetch them again, or pass "
        "--skip-missing to drop them")
    assert [p.caption for p in read_pairs(path, skip_missing=True)] == ["one"]


# -- records: LLaVA's training reader ---------------------------------------------------------------------

LLAVA_FAULTS = {
    "null gpt value": ([llava(None)], "conversations[1] (from 'gpt') has a null 'value'; write the turn's text or "
                                      "remove the record"),
    "missing value": ([{**llava(), "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt"}]}],
                      "conversations[1] (from 'gpt') has a missing 'value'; write the turn's text or remove the "
                      "record"),
    "int value": ([llava(3)], "conversations[1] (from 'gpt') 'value' is a JSON number 3, not a string; write the "
                              "turn's text as one string"),
    "empty answer": ([llava("  ")], "conversations[1] is an empty gpt answer, which teaches nothing but the end of "
                                    "a turn; write the answer or remove the record"),
    "turn a string": ([{**llava(), "conversations": ["<image>", "a cat"]}],
                      "conversations[0] is a JSON string \"<image>\"; every turn must be an object with 'from' and "
                      "'value'"),
    "image int": ([llava(image=5)], "'image' must be one path, got a JSON number 5; one image per record is "
                                    "supported"),
    "image empty string": ([llava(image="")], "'image' is an empty string; give the image's path, or drop the "
                                              "field for a text-only record"),
}


@pytest.mark.parametrize("fault", LLAVA_FAULTS)
def test_llava_records_of_the_wrong_type_are_one_line_naming_the_record(folder, fault):
    records, problem = LLAVA_FAULTS[fault]
    path = folder / "llava.json"
    path.write_text(json.dumps([llava("fine"), *records]))
    message = one_line_error(lambda: llava_data.read_llava_samples(path, None, "plain"))
    assert message == f"{path}: record 1 (id r0): {problem}"


def test_llava_reader_names_non_utf8_bytes_and_reads_a_bom(folder):
    path = folder / "llava.json"
    data = json.dumps([llava("caf\u00e9")], ensure_ascii=False).encode("latin-1")
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    assert one_line_error(lambda: llava_data.read_llava_samples(path, None, "plain")) == (
        f"--data_path {path} is not UTF-8 (byte 0xe9 at offset {offset}, line 1); re-save it as UTF-8")
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([llava("caf\u00e9")]).encode())
    assert llava_data.read_llava_samples(path, None, "plain")[0].prompt.text == "<image>caf\u00e9\n"
    (folder / "a.png").write_bytes(b"")
    assert "1 of 1 images are empty files (0 bytes)" in one_line_error(
        lambda: llava_data.read_llava_samples(path, None, "plain"))


# -- images: both decoders --------------------------------------------------------------------------------

def upcycle_decode(path):
    return ImageTextDataset(read_pairs(path.parent / "one.jsonl"), to_tensor)[0]["pixel_values"]


def llava_decode(path):
    return to_tensor(llava_data.load_rgb(str(path)))


DECODERS = {"upcycle": (upcycle_decode, "row"), "llava": (llava_decode, "record")}


def write_image(folder, data: bytes):
    path = folder / "img.png"
    path.write_bytes(data)
    (folder / "one.jsonl").write_text(json.dumps({"image": "img.png", "caption": "c"}) + "\n")
    return path


def tiff(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="TIFF")
    return buf.getvalue()


IMAGE_FAULTS = {
    "not an image": (b"<html>404</html>", "cannot decode image {path} (cannot identify image file '{path}'); "
                                          "replace the file or remove its {what}"),
    "truncated png": (noise_png()[:1000], "cannot decode image {path} (image file is truncated); replace the file "
                                          "or remove its {what}"),
    "32-bit values": (tiff(np.array([[0, 70000]], dtype=np.int32)),
                      "image {path} holds I pixels from 0 to 70000, outside the 16-bit range 0..65535; save it as an "
                      "8- or 16-bit image"),
    "float values": (tiff(np.array([[0.0, 2.5]], dtype=np.float32)),
                     "image {path} holds float pixels with values from 0 to 2.5, outside 0..1; save it as an 8- or "
                     "16-bit image, or with float pixels in 0..1"),
}


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("fault", IMAGE_FAULTS)
@pytest.mark.parametrize("lenient_pil", [False, True], ids=["", "after lmms-eval's import"])
def test_an_undecodable_image_is_one_line_naming_the_file(folder, decoder, fault, lenient_pil, monkeypatch):
    # Importing lmms-eval turns on PIL's LOAD_TRUNCATED_IMAGES for the whole process; ours still refuse.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lenient_pil)
    decode, what = DECODERS[decoder]
    data, expected = IMAGE_FAULTS[fault]
    path = write_image(folder, data)
    assert one_line_error(lambda: decode(path)) == expected.format(path=path, what=what)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("side", [12, 20], ids=["PIL warns", "PIL raises"])
def test_a_decompression_bomb_is_one_line_not_a_warning_or_a_crash(folder, monkeypatch, decoder, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 12x12 = 144 > 100 warns, 20x20 = 400 > 200 raises
    decode, what = DECODERS[decoder]
    path = write_image(folder, png(size=(side, side)))
    message = one_line_error(lambda: decode(path))
    assert message.startswith(f"image {path} is too large to decode safely (Image size ({side * side} pixels) "
                              "exceeds limit of")
    assert message.endswith(f"or remove its {what}")


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("kind", ["png I;16", "png I;16B", "tiff I", "tiff F"])
def test_high_bit_depth_greyscale_keeps_its_gradient(folder, decoder, kind):
    levels = np.arange(256, dtype=np.uint16) * 257  # 0 .. 65535: every 8-bit level, as 16 bits
    if kind.startswith("png"):
        image = Image.frombytes(kind[4:], (256, 1), levels.astype("<u2" if kind.endswith("16") else ">u2").tobytes())
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
        assert Image.open(io.BytesIO(data)).mode.startswith("I")  # (PIL's "RGB" of it is 0 or 255)
    else:
        data = tiff(levels.astype(np.int32)[None] if kind.endswith("I") else (np.arange(256) / 255).astype(
            np.float32)[None])
    pixels = DECODERS[decoder][0](write_image(folder, data))
    assert pixels.shape == (3, 1, 256)
    for channel in pixels:
        np.testing.assert_array_equal(channel[0].numpy(), np.arange(256, dtype=np.float32))


def test_8_bit_colour_images_decode_as_before(folder):
    path = write_image(folder, png((200, 10, 10)))
    for decode, _ in DECODERS.values():
        assert decode(path)[:, 0, 0].tolist() == [200.0, 10.0, 10.0]


# -- tar shards: the index and the streaming reader -------------------------------------------------------

def shard(path, n=4, **override):
    samples = [(f"k{i}", png(), "png", f"caption {i}") for i in range(n)]
    for i, sample in override.items():
        samples[int(i[1:])] = sample
    return write_tar_shard(path, samples)


def both_readers(path):
    """The error of indexing the shard and of streaming it (which yields the samples before the fault first)."""
    index = one_line_error(lambda: read_pairs(path))
    stream = one_line_error(lambda: list(TarShardDataset(str(path), to_tensor)))
    return index, stream


def header_offsets(path) -> list[int]:
    with tarfile.open(path) as tar:
        return [m.offset for m in tar]


@pytest.mark.parametrize("cut", ["at a member boundary", "inside a header"])
def test_a_tar_shard_cut_short_is_one_line_not_fewer_samples(tmp_path, cut):
    path = shard(tmp_path / "s.tar")
    third = header_offsets(path)[4]  # k2.png's header: k0 and k1 are complete before it
    data = path.read_bytes()
    end = third if cut == "at a member boundary" else third + 100
    path.write_bytes(data[:end])
    expected = (f"tar shard {path} ends at byte {third} of {end} (no end-of-archive block there), so the samples "
                "after it cannot be read; re-download or re-write the shard")
    assert both_readers(path) == (expected, expected)


def test_a_tar_shard_cut_inside_a_members_data_is_one_line(tmp_path):
    path = shard(tmp_path / "s.tar")
    with tarfile.open(path) as tar:
        member = tar.getmember("k2.png")
    path.write_bytes(path.read_bytes()[:member.offset_data + 10])
    expected = (f"tar shard {path} is truncated: member k2.png needs bytes up to {member.offset_data + member.size} "
                f"but the file has {member.offset_data + 10}; re-download or re-write the shard")
    assert both_readers(path) == (expected, expected)


def test_a_corrupt_member_header_is_one_line_not_a_silent_stop(tmp_path):
    path = shard(tmp_path / "s.tar")
    data = bytearray(path.read_bytes())
    third = header_offsets(path)[4]
    data[third + 148] ^= 0x55  # the header's checksum field: tarfile stops there without a word
    path.write_bytes(bytes(data))
    expected = (f"tar shard {path} has a corrupt member header at byte {third} of {len(data)} (no end-of-archive "
                "block there), so the samples after it cannot be read; re-download or re-write the shard")
    assert both_readers(path) == (expected, expected)


@pytest.mark.parametrize("fault", ["not a tar", "gzip-compressed"])
def test_a_shard_that_is_no_uncompressed_tar_is_one_line(tmp_path, fault):
    path = tmp_path / "s.tar"
    data = shard(path).read_bytes()
    path.write_bytes(b"\x00garbage" * 100 if fault == "not a tar" else gzip.compress(data))
    index, stream = both_readers(path)
    assert index == stream and index.startswith(f"tar shard {path} is not a readable uncompressed tar archive (")
    assert index.endswith("(compressed .tar.gz shards are not supported: decompress them)")


def test_bad_members_of_a_whole_shard_are_one_line_naming_the_member(tmp_path):
    latin = shard(tmp_path / "latin.tar")
    with tarfile.open(latin, "w") as tar:  # (rewritten: write_tar_shard encodes captions as UTF-8)
        for name, payload in (("k0.png", png()), ("k0.txt", "caf\u00e9".encode("latin-1"))):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert both_readers(latin) == (f"tar shard {latin}: caption k0.txt is not UTF-8 (byte 0xe9 at offset 3, line 1); "
                                   "re-write the shard with UTF-8 captions",) * 2
    empty = shard(tmp_path / "empty.tar", k1=("k1", b"", "png", "caption 1"))
    assert both_readers(empty) == (f"tar shard {empty}: image k1.png is empty (0 bytes); re-download or re-write "
                                   "the shard without that sample",) * 2
    blank = shard(tmp_path / "blank.tar", k1=("k1", png(), "png", "  "))  # (the index: tests/upcycle/data/test_formats.py)
    assert one_line_error(lambda: list(TarShardDataset(str(blank), to_tensor))) == (
        f"tar shard {blank}: caption k1.txt is empty; fill it in or remove the sample")
    twice = tmp_path / "twice.tar"
    with tarfile.open(twice, "w") as tar:
        for name in ("k0.jpg", "k0.png", "k0.txt"):
            payload = b"c" if name.endswith("txt") else png()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert both_readers(twice) == (f"tar shard {twice}: sample k0 has two image members (the second is k0.png), so "
                                   "which one belongs to the sample is unknown; keep one",) * 2


def test_an_undecodable_image_in_a_shard_names_the_shard_and_member(tmp_path):
    path = shard(tmp_path / "s.tar", k2=("k2", noise_png()[:1000], "png", "caption 2"))
    pairs = read_pairs(path)  # headers and captions only: the image is decoded where it is used
    message = one_line_error(lambda: ImageTextDataset(pairs, to_tensor)[2])
    assert message == (f"cannot decode image {path} member k2.png (image file is truncated); replace the file or "
                       "remove its row")
    streamed = one_line_error(lambda: list(TarShardDataset(str(path), to_tensor)))
    assert streamed == (f"cannot decode image {path} sample k2 (image file is truncated); replace the file or "
                        "remove its row")
    offset, size = map(int, pairs[3].image.rsplit("#", 1)[1].split("+"))
    path.write_bytes(path.read_bytes()[:offset + 5])  # the shard changes after it was indexed
    assert one_line_error(lambda: ImageTextDataset(pairs, to_tensor)[3]) == (
        f"tar shard {path} ends before image {pairs[3].image} (5 of {size} bytes): the shard changed after it was "
        "indexed; restore it and rerun")


# -- through a DataLoader worker and the command line ------------------------------------------------------

@pytest.mark.parametrize("reader", ["upcycle", "llava"])
def test_a_workers_decode_error_arrives_as_the_same_one_line(folder, reader):
    """What a DataLoader worker does with an exception (torch's ExceptionWrapper: the type and the formatted
    traceback go to the main process, which raises `type(text)`), in-process; the real worker process is the
    `upcycle train` test below (a failed worker's shutdown costs seconds)."""
    from torch._utils import ExceptionWrapper

    decode = DECODERS[reader][0]
    broken = write_image(folder, b"not a png")
    with pytest.raises(UserError) as in_process:
        decode(broken)
    try:
        decode(broken)
    except UserError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(UserError) as from_worker:
        wrapped.reraise()
    assert type(from_worker.value) is type(in_process.value)
    assert str(from_worker.value) == str(in_process.value)  # not torch's "Caught ... Original Traceback ..."
    assert str(in_process.value).startswith(f"cannot decode image {broken} (cannot identify image file")


class _Diverges(TrainingDiverged):
    """A UserError subclass defined outside the library, with no constructor of its own."""


def _cause_then(error: UserError):
    try:
        int("not a number")
    except ValueError as cause:
        raise error from cause


@pytest.mark.parametrize("error", [
    UserError("--lr 3 is too high: the loss went up; lower it"),
    _Diverges("loss is NaN at step 7;\nthe last good checkpoint is step-5"),  # a message over two lines
    NonFiniteValues(""),
], ids=["plain, with a cause", "subclass, two lines", "empty"])
def test_any_user_error_from_a_worker_keeps_its_type_and_message(error):
    """torch's wrapper text for a UserError raised with a cause (its traceback comes first in the text) gives the
    message back to the constructor, whatever the subclass; in-process, as torch's worker loop does it."""
    from torch._utils import ExceptionWrapper

    try:
        _cause_then(error)
    except UserError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    assert wrapped.exc_msg.startswith("Traceback") and "ValueError" in wrapped.exc_msg
    with pytest.raises(UserError) as from_worker:
        wrapped.reraise()
    assert type(from_worker.value) is type(error) and str(from_worker.value) == str(error)


class _RefusesInWorker(torch.utils.data.Dataset):
    """A data set whose second item is refused with a plain UserError (no data-reading code involved)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == 1:
            _cause_then(UserError(f"item {index}: refused: the toy setting --toy 3 is out of range;\nuse 1 or 2"))
        return torch.zeros(1)


def test_a_plain_user_error_in_a_dataloader_worker_is_one_line_from_run_cli(capfd):
    """A real worker process (kept to this one test: each starts a process): whatever UserError it raises, even
    with a cause and over two lines, `run_cli` prints the original message as the command's only line and returns
    2."""
    from torch.utils.data import DataLoader

    from encoder.utils.cli import UserErrorParser, run_cli

    parser = UserErrorParser(prog="toy")
    parser.set_defaults(run=lambda args: sum(len(b) for b in DataLoader(_RefusesInWorker(), num_workers=1)))
    assert run_cli(parser, []) == 2
    assert capfd.readouterr().err == ("error: item 1: refused: the toy setting --toy 3 is out of range; use 1 or "
                                      "2\n")


def test_upcycle_train_stops_on_an_undecodable_image_with_one_error_line(tmp_path, base_clip_dir, grids_dir, capfd):
    """The image is decoded mid-run, in a DataLoader worker process; the command must still end with exit 2 and
    the one line (capfd: also what the forked worker writes), no traceback, and no model written."""
    from upcycle.cli import main

    records = json.loads((grids_dir / "train.json").read_text())[:8]
    broken = tmp_path / "broken.png"
    broken.write_bytes(noise_png()[:1000])
    lines = [{"image": str(grids_dir / r["image"]), "caption": r["conversations"][1]["value"]} for r in records]
    lines[5]["image"] = str(broken)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "trained"
    assert main(["train", "--model", str(base_clip_dir), "--train-data", str(data), "--out", str(out),
                 "--batch-size", "4", "--max-steps", "2", "--num-workers", "1"]) == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot decode image {broken} (image file is truncated); replace the file or remove "
                      "its row"], err[-2000:]
    assert "Traceback" not in err and not out.exists()


def test_llava_training_stops_on_a_null_caption_before_writing_anything(tmp_path, folder, capsys):
    from mllm_bridge.train.cli import main

    path = folder / "llava.json"
    path.write_text(json.dumps([llava("fine"), llava(None)]))
    out = tmp_path / "llava-out"
    assert main(["pretrain", "--model_name_or_path", str(tmp_path / "llm"), "--vision_tower", str(tmp_path / "t"),
                 "--data_path", str(path), "--output_dir", str(out), "--report_to", "none"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert errors == [f"error: {path}: record 1 (id r0): conversations[1] (from 'gpt') has a null 'value'; write "
                      "the turn's text or remove the record"]
    assert not out.exists()
