"""lmms-eval requests as LLaVA inputs: prompts in a LLaVA conversation template, batches, generation settings.

Kept apart from the model plugin so the rules (how an image token is added, which requests may share a batch,
what a task's gen_kwargs mean) read in one place and are tested without a model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from encoder.utils.constants import IMAGE_TOKEN
from encoder.utils.errors import UserError

logger = logging.getLogger(__name__)

_KNOWN_GEN_KWARGS = {"until", "max_new_tokens", "temperature", "top_p", "num_beams", "do_sample"}


def conversation_template(name: str):
    """LLaVA's conversation template `name` (e.g. vicuna_v1 for LLaVA-1.5, plain for stage-1 checkpoints)."""
    from llava.conversation import conv_templates

    if name not in conv_templates:
        raise UserError(f"conv_template={name} is not one of LLaVA's templates: {', '.join(sorted(conv_templates))}")
    return conv_templates[name]


def build_prompt(template, context: str, num_images: int) -> str:
    """The user turn `context` (with one `<image>` line per image unless the task placed them) and an open
    assistant turn, as LLaVA's own evaluation scripts build it."""
    if num_images and IMAGE_TOKEN not in context:
        context = " ".join([IMAGE_TOKEN] * num_images) + "\n" + context
    conv = template.copy()  # LLaVA's copy: fresh message lists
    conv.append_message(conv.roles[0], context)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@dataclass(frozen=True)
class GenerationSettings:
    """A task's gen_kwargs, resolved: temperature 0 (or do_sample false) means greedy decoding."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1
    do_sample: bool = False
    until: tuple[str, ...] = ()

    @classmethod
    def from_gen_kwargs(cls, gen_kwargs: dict | None, default_max_new_tokens: int) -> GenerationSettings:
        kwargs = dict(gen_kwargs or {})  # lmms-eval shares one dict between a task's requests: never mutate it
        ignored = sorted(set(kwargs) - _KNOWN_GEN_KWARGS)
        if ignored:
            logger.warning("gen_kwargs %s are not used by llava_clipmoe", ", ".join(ignored))
        until = kwargs.get("until") or ()
        if isinstance(until, str):
            until = (until,)
        elif not isinstance(until, (list, tuple)):
            raise UserError(f"gen_kwargs until={until!r}: expected a string or a list of strings")
        temperature = float(kwargs.get("temperature") or 0.0)
        do_sample = bool(kwargs.get("do_sample", temperature > 0)) and temperature > 0
        return cls(
            max_new_tokens=int(kwargs.get("max_new_tokens") or default_max_new_tokens),
            temperature=temperature,
            top_p=kwargs.get("top_p"),
            num_beams=int(kwargs.get("num_beams") or 1),
            do_sample=do_sample,
            until=tuple(s for s in until if s),
        )

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `generate`; sampling parameters only when sampling (transformers warns otherwise)."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": self.do_sample}
        if self.do_sample:
            kwargs["temperature"] = self.temperature
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
        return kwargs


def truncate_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:cut]


def batches(keys: Sequence, batch_size: int) -> Iterator[list[int]]:
    """Indices of requests grouped by key (e.g. requests of one batch must share task, split and gen_kwargs), in
    order of first appearance, cut into batches of at most `batch_size`."""
    groups: dict = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            yield indices[start : start + batch_size]


def gen_kwargs_key(gen_kwargs: dict | None) -> str:
    """A hashable stand-in for a request's gen_kwargs dict."""
    return json.dumps(gen_kwargs or {}, sort_keys=True, default=str)



def loglikelihood_response(value: float, is_greedy: bool):
    """A loglikelihood answer (value, is_greedy) packed so that lmms-eval 0.7.3 hands it to the task unchanged.

    Its evaluator passes every response through `unwrap_generation_output`, which turns a bare (float, bool)
    tuple into the text "(-1.2, False)" (its reasoning-tag stripping may then rewrite that text), and
    multiple-choice scoring, which unpacks the pair, fails on it. The `text` of lmms-eval's own
    `GenerationResult` wrapper is passed on as it is, so the pair travels there.
    """
    from lmms_eval.api.instance import GenerationResult

    return GenerationResult(text=(float(value), bool(is_greedy)))
