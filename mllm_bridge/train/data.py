"""LLaVA training data: JSON records -> prompts (checked up front) -> token ids, labels and pixels (lazily).

Everything that can be checked without tokenizing is checked when the data set is read — UTF-8, record shape,
field types (a `null` or numeric turn value is refused, never trained on as the text "None"), turn order,
`<image>` placement, image files on disk and not empty — so a bad record stops the run in its first seconds
with its index, not hours later in a DataLoader worker. Images are decoded in `__getitem__`, as LLaVA's
lazy data set does; one that cannot be decoded stops the run with its path (one line even from a worker
process, see `encoder.utils.errors.UserError`). Text and images are decoded as upcycle.data decodes them
(`encoder.utils.user_files`). Pixels and the image's token count come from `mllm_bridge.llava.image_tokens`, the
path evaluation uses too (LLaVA's own `process_images`): under anyres both vary with the image's shape. A sample
longer than `model_max_length` (counting its image's tokens) is cut at the end and counted; one whose answers were
cut away entirely stays in the batch and adds nothing to the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from encoder.utils.constants import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from encoder.utils.errors import UserError
from encoder.utils.user_files import (
    decode_rgb,
    json_kind,
    llava_records,
    missing_or_empty,
    read_utf8,
)

from ..llava.image_tokens import ImageLayout
from .conversation import Prompt, template, tokenize_prompt, turn_text


@dataclass(frozen=True)
class Sample:
    """One training record: an absolute image path (None for a text-only record) and its prompt."""

    image: str | None
    prompt: Prompt


def read_llava_samples(data_path: str | Path, image_folder: str | Path | None, version: str) -> list[Sample]:
    """Read a LLaVA JSON list (`{"id", "image", "conversations": [{"from", "value"}, ...]}`) into samples.

    Image paths resolve against `image_folder` (default: the JSON file's folder). Raises UserError for an
    unreadable file, an empty list, a malformed record (named by index and id) or missing images.
    """
    path = Path(data_path)
    records = _load_records(path)
    build = template(version)
    root = Path(image_folder) if image_folder is not None else path.parent
    samples = []
    for index, record in enumerate(records):
        where = f"{path}: record {index}" + (f" (id {record['id']})" if isinstance(record, dict) and "id" in record
                                            else "")
        samples.append(_sample(record, build, root, where))
    _check_images(samples, path, root)
    return samples


def _load_records(path: Path) -> list:
    if not path.is_file():
        raise UserError(f"--data_path {path} does not exist; pass a LLaVA JSON file (a list of records)")
    records = llava_records(read_utf8(path, f"--data_path {path}"), path)
    if not records:
        raise UserError(f"{path} holds no records; the training set is empty")
    return records


def _sample(record: Any, build, root: Path, where: str) -> Sample:
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise UserError(f"{where} has no 'conversations' list; expected LLaVA records")
    turns = record["conversations"]
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"{where}: conversations[{j}] is a JSON {json_kind(turn)}; every turn must be an "
                            "object with 'from' and 'value'")
        try:
            value = turn_text(turn, f"conversations[{j}]")
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        if turn.get("from") == "gpt" and not value.strip():
            raise UserError(f"{where}: conversations[{j}] is an empty gpt answer, which teaches nothing but the "
                            "end of a turn; write the answer or remove the record")
    mentions = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise UserError(f"{where}: 'image' must be one path, got a JSON {json_kind(image)}; "
                        "one image per record is supported")
    if image == "":
        raise UserError(f"{where}: 'image' is an empty string; give the image's path, or drop the field for a "
                        "text-only record")
    if mentions > 1:
        raise UserError(f"{where} mentions <image> {mentions} times; LLaVA-1.5 takes one image per record")
    if mentions and not image:
        raise UserError(f"{where} mentions <image> but has no 'image' field; add the image or remove <image>")
    try:
        prompt = build(turns)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    if image and not prompt.has_image:
        raise UserError(f"{where} has an image but no <image> in its turns, so the model would never see it; "
                        "add <image> to the first human turn")
    return Sample(str((root / image).absolute()) if image else None, prompt)


def modality_lengths(samples: Sequence[Sample], layout: ImageLayout | None = None) -> list[int]:
    """LLaVA's `modality_lengths` for `--group_by_modality_length`: a sample's words (whitespace-separated, as LLaVA
    counts them, no tokenizing up front), positive with an image and negative without, never 0.

    Under anyres (`layout.variable`) an image's token count depends on its shape, from a few hundred to thousands
    of positions, so it is added to its sample's words: batches then group samples of like total length. The size
    is read from the file's header (no decoding); other layouts give every image the same count, left out as LLaVA
    leaves it out.
    """
    count_images = layout is not None and layout.variable
    return [(max(1, len(s.prompt.text.split())) + (layout.count(_image_size(s.image)) if count_images else 0))
            if s.image is not None else -max(1, len(s.prompt.text.split())) for s in samples]


def _image_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except OSError:  # not an image PIL knows: decoding says so with the file's path, in one line
        return load_rgb(path).size


def _check_images(samples: list[Sample], path: Path, root: Path) -> None:
    """One stat per image, up front (see `encoder.utils.user_files.missing_or_empty`): missing, not a file, or empty
    (0 bytes, e.g. a failed download); an undecodable image is found where it is decoded (`load_rgb`)."""
    missing, empty = missing_or_empty(s.image for s in samples if s.image is not None)
    if missing:
        raise UserError(f"{path}: {len(missing)} of {len(samples)} images not found under {root}, e.g. "
                        f"{', '.join(missing[:3])}; fix --image_folder or remove those records")
    if empty:
        raise UserError(f"{path}: {len(empty)} of {len(samples)} images are empty files (0 bytes), e.g. "
                        f"{', '.join(empty[:3])}; fetch them again or remove those records")


def load_rgb(path: str) -> Image.Image:
    """Decode an image file to 8-bit RGB (`encoder.utils.user_files.decode_rgb`); a UserError names the file when it
    cannot be decoded."""
    return decode_rgb(path, path, record="record")


class LlavaDataset(Dataset):
    """Samples -> {"input_ids", "labels", "image", "image_size", "truncated"}; text-only samples get a black image,
    as in LLaVA, so every batch element carries exactly one image.

    layout: how the model turns an image into pixels and LLM positions (`ImageLayout`); the `<image>` placeholder
    expands to `layout.count(image size)` positions when the model embeds the prompt.
    """

    def __init__(self, samples: Sequence[Sample], tokenizer, image_processor, layout: ImageLayout, max_length: int):
        fewest = layout.fewest_tokens()
        if max_length <= fewest:
            raise UserError(f"--model_max_length {max_length} leaves no room for text: one image alone takes "
                            f"{'at least ' if layout.variable else ''}{fewest} tokens; raise --model_max_length")
        if not getattr(tokenizer, "is_fast", False):
            raise UserError("the language model's tokenizer is not a fast (tokenizers) tokenizer, which labelling "
                            "needs for character offsets; save it with tokenizer.json")
        layout.check_processor(image_processor)
        self.samples = list(samples)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.layout = layout
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        ids, labels = tokenize_prompt(sample.prompt, self.tokenizer)
        pixels, size = self._pixels(sample.image)
        # The placeholder stands for the image's positions once the features are spliced in.
        extra = (self.layout.count(size) - 1) * ids.count(IMAGE_TOKEN_INDEX)
        budget = max(1, self.max_length - extra)  # an image longer than the context leaves the first token only
        truncated = len(ids) > budget
        if truncated:
            ids, labels = ids[:budget], labels[:budget]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "image": pixels, "image_size": size,
                "truncated": truncated}

    def _pixels(self, path: str | None) -> tuple[torch.Tensor, tuple[int, int]]:
        """The sample's pixels and its image's (width, height) (the crop size for a text-only sample)."""
        if path is None:
            crop = self.image_processor.crop_size
            return self.layout.blank(self.image_processor), (crop["width"], crop["height"])
        image = load_rgb(path)
        return self.layout.one_image(image, self.image_processor), image.size


class LlavaCollator:
    """Right-pads a list of samples into a batch for `LlavaLlamaForCausalLM.forward`, with counters.

    `images` is one tensor when every sample's pixels have one shape, else (anyres, different crop counts) the
    list LLaVA's `prepare_inputs_labels_for_multimodal` also takes; `image_sizes` are the images' (width, height),
    which anyres needs to lay out and unpad each image's crops. `num_truncated`: samples cut to model_max_length;
    `num_targets`: label positions the loss sees (0 means the batch teaches nothing, e.g. every answer was
    truncated away).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: Sequence[dict]) -> dict[str, Any]:
        lengths = torch.tensor([len(s["input_ids"]) for s in samples])
        input_ids = torch.nn.utils.rnn.pad_sequence([s["input_ids"] for s in samples], batch_first=True,
                                                    padding_value=self.pad_token_id)
        labels = torch.nn.utils.rnn.pad_sequence([s["labels"] for s in samples], batch_first=True,
                                                 padding_value=IGNORE_INDEX)
        # From the lengths, not `input_ids != pad`: the pad id (<unk>) may also occur inside a text.
        attention_mask = torch.arange(input_ids.shape[1])[None] < lengths[:, None]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "images": ImageLayout.collate([s["image"] for s in samples]),
                "image_sizes": [tuple(s["image_size"]) for s in samples],
                "num_truncated": sum(bool(s["truncated"]) for s in samples),
                "num_targets": int((labels != IGNORE_INDEX).sum())}
