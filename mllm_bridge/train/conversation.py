"""LLaVA's conversation templates for training — 'plain' (stage 1) and 'v1' (stage 2) — and their labels.

A record becomes a `Prompt`: the text LLaVA would build, plus the character spans the model learns to
produce (the caption for 'plain'; every assistant answer with its `</s>` for 'v1'). Token labels follow
from the tokenizer's character offsets: a token is a target when it overlaps a span, everything else is
IGNORE_INDEX. LLaVA's own `preprocess_v1` re-tokenizes pieces and subtracts lengths instead, which depends
on how a tokenizer treats spaces and special tokens (its "tokenization mismatch ... (ignored)" warning,
after which a sample trains on nothing). Offsets give the same labels without those assumptions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from encoder.utils.constants import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from encoder.utils.errors import UserError
from encoder.utils.user_files import json_kind

V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")
V1_ROLES = {"human": "USER", "gpt": "ASSISTANT"}
V1_SEP, V1_END = " ", "</s>"  # after a user turn / after an assistant turn (the literal LLaVA writes)
PLAIN_END = "\n"


def turn_text(turn: dict, name: str) -> str:
    """A turn's text (its "value"); a UserError naming the turn (`name`, e.g. 'turn 2') when the value is null,
    missing or not a string, which `str()` would have turned into the text "None" or "7" to train on."""
    value = turn.get("value")
    if isinstance(value, str):
        return value
    where = f"{name} (from {turn.get('from')!r})"
    if value is None:
        state = "null" if "value" in turn else "missing"
        raise UserError(f"{where} has a {state} 'value'; write the turn's text or remove the record")
    raise UserError(f"{where} 'value' is a JSON {json_kind(value)}, not a string; write the turn's text as one "
                    "string")


@dataclass(frozen=True)
class Prompt:
    """A training text and the [start, end) character spans whose tokens are targets."""

    text: str
    targets: tuple[tuple[int, int], ...]

    @property
    def has_image(self) -> bool:
        return IMAGE_TOKEN in self.text


def plain_prompt(turns: Sequence[dict]) -> Prompt:
    """Stage 1: `<image>` + caption + '\\n'; the caption and the newline are the targets.

    Expects LLaVA's caption records: a human turn holding `<image>`, then the caption (the human text
    itself is dropped, as LLaVA does).
    """
    if len(turns) != 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
        raise UserError(f"the 'plain' template needs exactly one human turn and one gpt turn, got "
                        f"{[t.get('from') for t in turns]}; use --version v1 for conversations")
    if IMAGE_TOKEN not in turn_text(turns[0], "turn 1"):
        raise UserError("the 'plain' template needs '<image>' in the human turn (image-caption records)")
    caption = turn_text(turns[1], "turn 2")
    text = IMAGE_TOKEN + caption + PLAIN_END
    return Prompt(text, ((len(IMAGE_TOKEN), len(text)),))


def v1_prompt(turns: Sequence[dict]) -> Prompt:
    """Stage 2 (Vicuna v1): 'SYSTEM USER: q ASSISTANT: a</s>USER: ...'; each answer and its `</s>` are targets.

    As in LLaVA, a leading gpt turn is dropped and `<image>` moves to the start of its turn; the space
    before an answer belongs to the answer's span because tokenizers merge it into the answer's first token.
    """
    turns = list(turns)
    if turns and turns[0].get("from") != "human":
        turns = turns[1:]
    text, targets = V1_SYSTEM + V1_SEP, []
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            raise UserError(f"turn {i + 1} is from {turn.get('from')!r} where {expected!r} was expected; "
                            "turns must alternate human, gpt, human, ...")
        role = V1_ROLES[expected]
        value = _image_first(turn_text(turn, f"turn {i + 1}"))
        if expected == "human":
            text += f"{role}: {value}{V1_SEP}"
        else:
            text += f"{role}:"
            start = len(text)
            text += f" {value}{V1_END}"
            targets.append((start, len(text)))
    if not targets:
        raise UserError("the conversation has no gpt turn, so there is nothing to learn; remove the record")
    return Prompt(text, tuple(targets))


def _image_first(value: str) -> str:
    """LLaVA's `preprocess_multimodal`: a turn mentioning `<image>` starts with '<image>\\n'."""
    if IMAGE_TOKEN not in value:
        return value
    return (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip()


TEMPLATES = {"plain": plain_prompt, "v1": v1_prompt}


def template(version: str):
    """The prompt builder of a LLaVA `--version`."""
    try:
        return TEMPLATES[version]
    except KeyError:
        raise UserError(f"--version {version!r} is not supported; use one of {', '.join(TEMPLATES)} "
                        "(LLaVA-1.5: plain for stage 1, v1 for stage 2)") from None


def tokenize_prompt(prompt: Prompt, tokenizer) -> tuple[list[int], list[int]]:
    """Token ids as LLaVA's `tokenizer_image_token` makes them (IMAGE_TOKEN_INDEX for `<image>`), and labels.

    Each text chunk between images is tokenized on its own; later chunks lose the BOS the tokenizer adds.
    """
    ids: list[int] = []
    labels: list[int] = []
    chunk_start = 0
    for n, chunk in enumerate(prompt.text.split(IMAGE_TOKEN)):
        if n > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
            chunk_start += len(IMAGE_TOKEN)
        encoded = tokenizer(chunk, return_offsets_mapping=True)
        pieces = list(zip(encoded["input_ids"], encoded["offset_mapping"]))
        if n > 0 and pieces and pieces[0][0] == tokenizer.bos_token_id:
            pieces = pieces[1:]
        for token, (start, end) in pieces:
            ids.append(token)
            span = (chunk_start + start, chunk_start + end)
            labels.append(token if end > start and _overlaps(span, prompt.targets) else IGNORE_INDEX)
        chunk_start += len(chunk)
    return ids, labels


def _overlaps(span: tuple[int, int], targets: tuple[tuple[int, int], ...]) -> bool:
    return any(max(span[0], start) < min(span[1], end) for start, end in targets)
