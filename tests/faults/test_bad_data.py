"""Fault tier, bad data: every corrupt or wrongly typed record of the image-text readers stops with one line
naming the file and the record, never trains on a wrong value (a null caption read as the text "None", a caption
cut at an unquoted comma)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from encoder.errors import UserError
from upcycle.data import read_pairs


def png(color=(200, 10, 10), size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def one_line_error(call) -> str:
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


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
