"""LLaVA training data: prompts and labels match LLaVA's own preprocessing, bad records fail with one line,
long samples are cut and counted."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from encoder.utils.errors import UserError
from mllm_bridge.llava.image_tokens import ImageLayout
from mllm_bridge.train.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX, plain_prompt, tokenize_prompt, v1_prompt
from mllm_bridge.train.data import LlavaCollator, LlavaDataset, read_llava_samples

SQUARE = ImageLayout.from_config({}, 32, 8)  # a 32-pixel tower with 8-pixel patches: 16 tokens per image


@pytest.fixture(scope="module")
def tokenizer(digit_llm_dir):
    tok = AutoTokenizer.from_pretrained(digit_llm_dir, padding_side="right", model_max_length=2048)
    tok.pad_token = tok.unk_token
    return tok


@pytest.fixture
def llava_train(monkeypatch):
    """llava.train.train (LLaVA's preprocess_plain / preprocess_v1), importable on transformers 5 once its
    trainer module, which needs a name transformers 5 removed, is replaced by a stub."""
    stub = types.ModuleType("llava.train.llava_trainer")
    stub.LLaVATrainer = object
    monkeypatch.setitem(sys.modules, "llava.train.llava_trainer", stub)
    monkeypatch.delitem(sys.modules, "llava.train.train", raising=False)
    from llava import conversation
    from llava.train import train

    monkeypatch.setattr(conversation, "default_conversation", conversation.default_conversation)
    yield train, conversation
    sys.modules.pop("llava.train.train", None)


def llava_labels(train, conversation, record, tokenizer, version):
    """LLaVA's own input ids and labels for one record."""
    conversation.default_conversation = conversation.conv_templates[version]
    sources = train.preprocess_multimodal(copy.deepcopy([record["conversations"]]),
                                          SimpleNamespace(is_multimodal=True, mm_use_im_start_end=False))
    with contextlib.redirect_stdout(io.StringIO()):  # its 'tokenization mismatch' warning, if any
        if version == "plain":
            out = train.preprocess_plain(sources, tokenizer)
        else:
            out = train.preprocess_v1(sources, tokenizer, has_image=True)
    return out["input_ids"][0].tolist(), out["labels"][0].tolist()


def target_runs(ids, labels):
    """Contiguous runs of target positions, as lists of token ids."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


def test_plain_labels_equal_llavas(grids_dir, tokenizer, llava_train):
    records = json.loads((grids_dir / "train.json").read_text())[:20]
    for record in records:
        ids, labels = tokenize_prompt(plain_prompt(record["conversations"]), tokenizer)
        assert (ids, labels) == llava_labels(*llava_train, record, tokenizer, "plain")
        assert ids[:2] == [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX] and labels[:2] == [IGNORE_INDEX] * 2
        caption = record["conversations"][1]["value"]
        assert tokenizer.decode(ids[2:]) == caption + "\n"  # everything after the image is the target


def test_v1_labels_are_the_answers_and_equal_llavas(grids_dir, tokenizer, llava_train):
    # LLaVA's preprocess_v1 locates answers by re-tokenizing pieces and subtracting lengths, with a correction
    # chosen by `tokenizer.legacy`. This tokenizer splits text after '</s>' the legacy way (no '▁' prefix),
    # so LLaVA's reference is computed with legacy=True.
    assert tokenizer.tokenize("a</s>USER")[-1] == "USER"
    tokenizer.legacy = True
    records = json.loads((grids_dir / "train_qa.json").read_text())[:20]
    for record in records:
        prompt = v1_prompt(record["conversations"])
        ids, labels = tokenize_prompt(prompt, tokenizer)
        assert (ids, labels) == llava_labels(*llava_train, record, tokenizer, "v1")
        answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
        runs = target_runs(ids, labels)
        assert [tokenizer.decode(run).strip() for run in runs] == [a + "</s>" for a in answers]
        assert ids.count(IMAGE_TOKEN_INDEX) == 1 and prompt.text.count("<image>\n") == 1


def test_v1_template_text_and_turn_order():
    turns = [{"from": "gpt", "value": "dropped"}, {"from": "human", "value": "What is it?\n<image>"},
             {"from": "gpt", "value": "A 3."}, {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes"}]
    prompt = v1_prompt(turns)
    assert prompt.text == ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                           "gives helpful, detailed, and polite answers to the user's questions. USER: <image>\n"
                           "What is it? ASSISTANT: A 3.</s>USER: Sure? ASSISTANT: Yes</s>")
    assert [prompt.text[s:e] for s, e in prompt.targets] == [" A 3.</s>", " Yes</s>"]
    with pytest.raises(UserError, match="turn 2 is from 'human' where 'gpt' was expected"):
        v1_prompt([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}])


@pytest.mark.parametrize("build, turns, message", [
    (plain_prompt, [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": None}],
     "turn 2 (from 'gpt') has a null 'value'; write the turn's text or remove the record"),
    (plain_prompt, [{"from": "human"}, {"from": "gpt", "value": "a 3"}],
     "turn 1 (from 'human') has a missing 'value'; write the turn's text or remove the record"),
    (v1_prompt, [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": 3}],
     "turn 2 (from 'gpt') 'value' is a JSON number 3, not a string; write the turn's text as one string"),
], ids=["plain null", "plain missing", "v1 number"])
def test_templates_refuse_a_turn_value_that_is_not_text(build, turns, message):
    """Called directly (not through read_llava_samples' checks), a template must not train on str(None)."""
    with pytest.raises(UserError) as refused:
        build(turns)
    assert str(refused.value) == message


def write_records(tmp_path, records, images=()):
    for name in images:
        Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / name)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def caption_record(image="a.png", caption="top left 1"):
    return {"id": "r0", "image": image, "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                         {"from": "gpt", "value": caption}]}


@pytest.mark.parametrize("records, message", [
    ([], "holds no records; the training set is empty"),
    ({"a": 1}, "holds a JSON dict; expected a list of LLaVA records"),
    ([caption_record("missing.png")], "1 of 1 images not found"),
    ([{**caption_record(), "conversations": [{"from": "human", "value": "<image> <image>"},
                                             {"from": "gpt", "value": "x"}]}], "mentions <image> 2 times"),
    ([{"id": 7, "conversations": "nope"}], "record 0 (id 7) has no 'conversations' list"),
])
def test_bad_data_is_one_clear_error(tmp_path, records, message):
    path = write_records(tmp_path, records, images=["a.png"])
    with pytest.raises(UserError, match=re.escape(message)):
        read_llava_samples(path, None, "plain")


def test_plain_needs_image_caption_records(tmp_path):
    record = caption_record()
    record["conversations"].append({"from": "human", "value": "more"})
    path = write_records(tmp_path, [record], images=["a.png"])
    with pytest.raises(UserError, match="record 0 .*'plain' template needs exactly one human turn"):
        read_llava_samples(path, None, "plain")


class FakeProcessor:
    image_mean = [0.5, 0.5, 0.5]
    crop_size = {"height": 8, "width": 8}

    def __call__(self, images, return_tensors="pt"):  # how LLaVA's process_images calls it for square
        return {"pixel_values": torch.zeros(len(images), 3, 8, 8)}


def test_long_samples_are_cut_counted_and_never_crash(tmp_path, tokenizer):
    long_caption = " ".join(["top left 3, bottom right 7"] * 10)
    path = write_records(tmp_path, [caption_record(caption="top left 1"), caption_record(caption=long_caption)],
                         images=["a.png"])
    samples = read_llava_samples(path, None, "plain")
    dataset = LlavaDataset(samples, tokenizer, FakeProcessor(), SQUARE, max_length=24)
    short, long = dataset[0], dataset[1]
    assert not short["truncated"] and long["truncated"]
    assert len(long["input_ids"]) == 24 - 15  # the <image> placeholder stands for 16 positions
    batch = LlavaCollator(tokenizer.pad_token_id)([short, long])
    assert batch["num_truncated"] == 1 and batch["num_targets"] > 0
    assert batch["attention_mask"].sum(1).tolist() == [len(short["input_ids"]), 9]

    nothing_left = LlavaDataset(samples, tokenizer, FakeProcessor(), SQUARE, max_length=17)[1]
    assert nothing_left["truncated"] and (nothing_left["labels"] == IGNORE_INDEX).all()
    with pytest.raises(UserError, match="--model_max_length 16 leaves no room for text"):
        LlavaDataset(samples, tokenizer, FakeProcessor(), SQUARE, max_length=16)


def test_pad_pixels_are_llavas_own(tmp_path, tokenizer):
    from llava.mm_utils import process_images

    from encoder.convert.dense import default_image_processor

    processor = default_image_processor(32)
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "wide.png")
    path = write_records(tmp_path, [caption_record(image="wide.png")], images=[])
    pad = ImageLayout.from_config({"image_aspect_ratio": "pad"}, 32, 8)
    item = LlavaDataset(read_llava_samples(path, None, "plain"), tokenizer, processor, pad, max_length=64)[0]
    expected = process_images([Image.open(tmp_path / "wide.png").convert("RGB")], processor, SimpleNamespace(
        image_aspect_ratio="pad"))
    assert item["image_size"] == (40, 20) and torch.equal(item["image"], expected[0])


def test_text_only_records_get_a_blank_image_and_no_placeholder(tmp_path, tokenizer):
    record = {"id": "t", "conversations": [{"from": "human", "value": "Say 3."}, {"from": "gpt", "value": "3"}]}
    samples = read_llava_samples(write_records(tmp_path, [record]), None, "v1")
    item = LlavaDataset(samples, tokenizer, FakeProcessor(), SQUARE, max_length=64)[0]
    assert IMAGE_TOKEN_INDEX not in item["input_ids"].tolist() and not item["truncated"]
    assert torch.equal(item["image"], torch.zeros(3, 8, 8))  # LLaVA feeds zeros so every sample has one image


def test_anyres_token_counts_drive_truncation_and_the_collator_keeps_shapes_apart(tmp_path, tokenizer):
    from encoder.convert.dense import default_image_processor

    processor = default_image_processor(32)
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "square.png")
    Image.new("RGB", (64, 32), (9, 9, 9)).save(tmp_path / "wide.png")
    long_caption = " ".join(["top left 3, bottom right 7"] * 20)
    path = write_records(tmp_path, [caption_record("square.png", long_caption), caption_record("wide.png", long_caption)])
    layout = ImageLayout.from_config({"image_aspect_ratio": "anyres", "image_grid_pinpoints": "(1x1),...,(2x2)",
                                      "mm_patch_merge_type": "spatial_unpad"}, 32, 8)
    dataset = LlavaDataset(read_llava_samples(path, None, "plain"), tokenizer, processor, layout, max_length=100)
    square, wide = dataset[0], dataset[1]
    assert square["image"].shape == (2, 3, 32, 32) and wide["image"].shape == (3, 3, 32, 32)  # global view + crops
    assert layout.count((32, 32)) == 36 and layout.count((64, 32)) == 52
    assert square["truncated"] and len(square["input_ids"]) == 100 - 35
    assert wide["truncated"] and len(wide["input_ids"]) == 100 - 51

    batch = LlavaCollator(tokenizer.pad_token_id)([square, wide])
    assert isinstance(batch["images"], list) and batch["image_sizes"] == [(32, 32), (64, 32)]
    same = LlavaCollator(tokenizer.pad_token_id)([square, square])
    assert same["images"].shape == (2, 2, 3, 32, 32)
    with pytest.raises(UserError, match="--model_max_length 16 leaves no room for text: one image alone takes at "
                                        "least 16 tokens"):
        LlavaDataset(read_llava_samples(path, None, "plain"), tokenizer, processor, layout, max_length=16)
