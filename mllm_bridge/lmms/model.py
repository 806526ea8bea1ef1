"""lmms-eval model `llava_clipmoe`: LLaVA checkpoints with CLIP(-MoE) or SigLIP(-MoE) towers, registered as a plugin.

    python -m lmms_eval --model llava_clipmoe --model_args pretrained=runs/llava-clip-moe --device cpu \
        --tasks digit_grids_qa --include_path runs/lmms-tasks/digit_grids --output_path runs/lmms

Model args (`--model_args k=v,...`; lmms-eval passes `--device` and `--batch_size` itself):
  pretrained      LLaVA checkpoint directory or hub id (full, or stage-1 config.json + mm_projector.bin)
  model_base      the LLM (directory or hub id) a projector-only checkpoint was trained on
  vision_tower    a CLIP(-MoE) or SigLIP(-MoE) directory replacing the checkpoint's tower for this run (no file is edited)
  conv_template   LLaVA conversation template (default vicuna_v1, LLaVA-1.5's; plain for stage-1 checkpoints)
  dtype           auto (fp32 on CPU, fp16 on GPU), float32, float16 or bfloat16
  max_new_tokens  when a task's gen_kwargs give none (default 128, as LLaVA's evaluation scripts)
  expert_usage    JSON file for the CLIP-MoE expert-usage counts (default, from lmms-eval's command line with
                  --output_path: <output_path>/<model>/<date>_expert_usage.json; see `expert_usage.py`)

Unlike lmms-eval's built-in `llava` model this one loads projector-only checkpoints, runs in fp32 on a CPU,
batches generation with left padding (same answers as batch size 1), applies `until` stop strings, and records
which experts the tower uses.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from lmms_eval.api.model import lmms

from encoder.utils.cli import parse_device
from encoder.utils.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from encoder.utils.errors import UserError
from encoder.utils.user_files import image_rgb

from ..llava.image_tokens import ImageLayout
from ..llava.loading import load_llava, plan_checkpoint, resolve_dtype
from .expert_usage import ExpertUsageRecorder
from .requests import (
    GenerationSettings,
    batches,
    build_prompt,
    conversation_template,
    gen_kwargs_key,
    loglikelihood_response,
    truncate_at_stop,
)

logger = logging.getLogger(__name__)

MODEL_ARGS = ("pretrained", "model_base", "vision_tower", "conv_template", "dtype", "max_new_tokens", "expert_usage")


class LlavaCLIPMoE(lmms):
    """The `llava_clipmoe` model of lmms-eval (see the module docstring for its arguments)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        model_base: str | None = None,
        vision_tower: str | None = None,
        conv_template: str = "vicuna_v1",
        dtype: str = "auto",
        max_new_tokens: int = 128,
        expert_usage: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # lmms-eval passes it; only fixed batch sizes are supported
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise UserError(f"unknown model argument(s) {', '.join(sorted(unknown))}; the arguments are "
                            f"{', '.join(MODEL_ARGS)}")
        if not pretrained:
            raise UserError("no pretrained=...; pass --model_args pretrained=CHECKPOINT_DIR")
        max_new_tokens = _positive_int(max_new_tokens, f"max_new_tokens={max_new_tokens}: expected a whole number of "
                                       "tokens", f"max_new_tokens={max_new_tokens}: expected at least 1")
        self._rank, self._world_size, self.accelerator = _distributed()
        self._device = _resolve_device(device, self.accelerator)
        self.batch_size_per_gpu = _batch_size(batch_size)
        self.template = conversation_template(conv_template)
        self.max_new_tokens = max_new_tokens
        plan = plan_checkpoint(pretrained, model_base, vision_tower)
        loaded = load_llava(plan, self._device, resolve_dtype(dtype, self._device))
        self.model, self.tokenizer, self.image_processor = loaded.model, loaded.tokenizer, loaded.image_processor
        # LLaVA re-pads after splicing image features in; generation needs the padding on the left.
        self.model.config.tokenizer_padding_side = "left"
        self.layout = ImageLayout.for_tower(self.model.config, self.model.get_vision_tower())
        # In memory only: llava-torch's grid code parses the pinpoints as a list, not LLaVA-NeXT's range form.
        self.model.config.image_grid_pinpoints = self.layout.grid_pinpoints
        self._stop_criteria: dict[tuple[str, ...], object] = {}
        self.pad_token_id = next(t for t in (self.tokenizer.pad_token_id, self.tokenizer.unk_token_id,
                                             self.tokenizer.eos_token_id) if t is not None)
        self.usage = ExpertUsageRecorder.for_tower(self.model.get_vision_tower())
        self.usage_summary: dict | None = None  # set when lmms-eval calls clean() after the last request
        self.usage_path = expert_usage or _usage_path_next_to_results(pretrained)
        self.usage_header = {"pretrained": str(pretrained), "model_base": model_base,
                             "vision_tower": plan.tower.path, "checkpoint": plan.kind}
        logger.info("llava_clipmoe: %s checkpoint %s, tower %s (%s), %s on %s", plan.kind, pretrained,
                    plan.tower.path, plan.tower.moe_layout(), self.model.dtype, self._device)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """How lmms-eval builds the model from --model_args. lmms-eval catches every Exception a model raises,
        prints its traceback and exits 0, so a bad model argument would look like a finished run; SystemExit is
        not an Exception: a UserError ends the run here with one line and exit status 2."""
        try:
            return super().create_from_arg_string(arg_string, additional_config)
        except UserError as err:
            print(f"error: llava_clipmoe: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    # lmms-eval reads these.
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def generate_until(self, requests) -> list[str]:
        """Answers to (context, gen_kwargs, doc_to_visual, doc_id, task, split) requests, in request order."""
        args = [request.args for request in requests]
        answers: list[str | None] = [None] * len(requests)
        keys = [(a[4], a[5], gen_kwargs_key(a[1])) for a in args]  # a batch shares task, split and gen_kwargs
        for batch, images in self._batches(args, keys, "llava_clipmoe generate"):
            settings = GenerationSettings.from_gen_kwargs(args[batch[0]][1], self.max_new_tokens)
            prompts = [build_prompt(self.template, args[i][0], len(im)) for i, im in zip(batch, images)]
            texts = self._generate(prompts, images, settings)
            for i, text in zip(batch, texts):
                answers[i] = truncate_at_stop(text, settings.until).strip()
        return answers

    def loglikelihood(self, requests) -> list:
        """(negative log-likelihood of the continuation, whether greedy decoding would produce it) per request.

        lmms-eval 0.7.3 ranks multiple-choice answers with argmin over the first value (api/task.py: "we return
        the actual loss"), so this is -log P(continuation | context) summed over the continuation's tokens: the
        argmin is the most likely choice, and `acc_norm` divides by length as lm-eval does. Each pair is wrapped by
        `loglikelihood_response`, so that 0.7.3's evaluator passes it on unchanged.
        """
        args = [request.args for request in requests]
        results: list = [None] * len(requests)
        for batch, images in self._batches(args, [(a[4], a[5]) for a in args], "llava_clipmoe loglikelihood"):
            prompts = [build_prompt(self.template, args[i][0], len(im)) for i, im in zip(batch, images)]
            continuations = [self._continuation(args[i]) for i in batch]
            for i, (nll, greedy) in zip(batch, self._score(prompts, continuations, images)):
                results[i] = loglikelihood_response(nll, greedy)
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("llava_clipmoe answers single-round tasks only")

    def clean(self) -> None:
        """lmms-eval calls this once all requests are answered: write the expert usage, then free the model."""
        if self.usage is not None:
            self.usage_summary = self._finish_usage()
        super().clean()

    # Internals.

    def _batches(self, args: list[tuple], keys: list, desc: str):
        """(request indices, their images) per batch of requests sharing a key. Images are read batch by batch (a
        benchmark's would not fit in memory at once); text-only requests run apart from requests with images,
        because LLaVA gives every text-only row of a batch an image slot of its own."""
        for batch in self._progress(batches(keys, self.batch_size), desc):
            task = args[batch[0]][4]
            if self.usage is not None:
                self.usage.task = task
            images = [_images(args[i][2], self._doc(args[i]), task) for i in batch]
            for with_images in (True, False):
                group = [(i, im) for i, im in zip(batch, images) if bool(im) == with_images]
                if group:
                    yield [i for i, _ in group], [im for _, im in group]

    def _doc(self, request_args: tuple):
        doc_id, task, split = request_args[3:6]
        return self.task_dict[task][split][doc_id]

    def _continuation(self, request_args: tuple) -> str:
        target = request_args[1]  # the continuation, or (for loglikelihood tasks) the task's doc_to_target
        return target if isinstance(target, str) else str(target(self._doc(request_args)))

    def _encode(self, prompt: str) -> torch.Tensor:
        from llava.mm_utils import tokenizer_image_token

        return tokenizer_image_token(prompt, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")

    def _pixels(self, images: Sequence[list]) -> tuple[torch.Tensor | list[torch.Tensor] | None, list]:
        """All images of a batch, in order, as LLaVA's `images=` takes them (one tensor, or under anyres a list of
        per-image crop stacks when their crop counts differ) in the model's dtype, and their `image_sizes`."""
        flat = [image for doc_images in images for image in doc_images]
        if not flat:
            return None, []
        pixels, sizes = self.layout.pixels(flat, self.image_processor)
        if isinstance(pixels, list):
            return [p.to(device=self._device, dtype=self.model.dtype) for p in pixels], sizes
        return pixels.to(device=self._device, dtype=self.model.dtype), sizes

    def _generate(self, prompts: list[str], images: list[list], settings: GenerationSettings) -> list[str]:
        ids = [self._encode(p) for p in prompts]
        input_ids, mask = _pad(ids, self.pad_token_id, left=True)
        pixels, sizes = self._pixels(images)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids.to(self._device), attention_mask=mask.to(self._device), images=pixels, image_sizes=sizes,
                pad_token_id=self.pad_token_id, use_cache=True, stopping_criteria=self._stop_at(settings.until),
                **settings.generate_kwargs())
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def _stop_at(self, until: tuple[str, ...]):
        """Stop a row once it has produced a stop string (the answer is still cut at it afterwards). transformers'
        `stop_strings=` cannot be used: LLaVA's generate hands the tokenizer it needs on to forward()."""
        from transformers import StoppingCriteriaList, StopStringCriteria

        if not until:
            return None
        if until not in self._stop_criteria:  # building one scans the vocabulary: once per set of stop strings
            self._stop_criteria[until] = StoppingCriteriaList([StopStringCriteria(self.tokenizer, list(until))])
        return self._stop_criteria[until]

    def _score(self, prompts: list[str], continuations: list[str], images: list[list]) -> list[tuple[float, bool]]:
        rows, labels = [], []
        for prompt, continuation in zip(prompts, continuations):
            context, whole = self._encode(prompt), self._encode(prompt + continuation)
            if not torch.equal(whole[: len(context)], context):  # the continuation merged into the context's tokens
                whole = torch.cat([context, self._encode_plain(continuation)])
            label = whole.clone()
            label[: len(context)] = IGNORE_INDEX
            rows.append(whole)
            labels.append(label)
        input_ids, mask = _pad(rows, self.pad_token_id, left=True)
        label_ids, _ = _pad(labels, IGNORE_INDEX, left=True)
        pixels, sizes = self._pixels(images)
        positions = torch.zeros_like(input_ids)  # any tensor: LLaVA then returns positions that skip the padding
        with torch.inference_mode():
            _, positions, mask, _, embeds, label_ids = self.model.prepare_inputs_labels_for_multimodal(
                input_ids.to(self._device), positions.to(self._device), mask.to(self._device), None,
                label_ids.to(self._device), pixels, sizes)
            logits = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        return [_continuation_score(logits[b, :-1], label_ids[b, 1:]) for b in range(len(rows))]

    def _encode_plain(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)

    def _progress(self, iterable, desc: str):
        from tqdm.auto import tqdm

        return tqdm(list(iterable), desc=desc, disable=self._rank != 0, unit="batch")

    def _finish_usage(self) -> dict:
        if self._world_size > 1:
            from accelerate.utils import gather_object

            tasks = set(gather_object(self.usage.tasks))
            self.usage.reduce(tasks, lambda t: self.accelerator.reduce(t, reduction="sum"))
        summary = self.usage.summary()
        if self._rank == 0 and self.usage_path is not None:
            path = self.usage.write(self.usage_path, self.usage_header)
            logger.warning("llava_clipmoe: expert usage written to %s", path)
        self.usage.remove()
        return summary


def _continuation_score(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, bool]:
    """logits [T, V] predicting labels [T] (IGNORE_INDEX where not scored) -> (summed NLL, all greedy)."""
    scored = labels != IGNORE_INDEX
    picked = logits[scored].float()
    targets = labels[scored]
    nll = -picked.log_softmax(dim=-1).gather(-1, targets[:, None]).sum()
    return float(nll), bool((picked.argmax(dim=-1) == targets).all())


def _pad(rows: list[torch.Tensor], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D tensors into [B, T] padded with `value` (on the left for generation) and a bool mask."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        out[b, span] = row
        mask[b, span] = True
    return out, mask


def _images(doc_to_visual, doc, task: str) -> list:
    """The PIL images of a document (an empty list for text-only documents)."""
    from PIL import Image

    visuals = doc_to_visual(doc) if doc_to_visual is not None else None
    visuals = [v for v in (visuals or []) if v is not None]
    for visual in visuals:
        if not isinstance(visual, Image.Image):
            raise UserError(f"task {task} gives a {type(visual).__name__} visual; llava_clipmoe takes images only")
    # Training's decoder (not PIL's convert("RGB"), which clips 16-bit greyscale to black and white).
    return [image_rgb(v, f"of task {task}") for v in visuals]


def _batch_size(value) -> int:
    return _positive_int(value, f"--batch_size {value}: llava_clipmoe takes a fixed batch size (a number >= 1)",
                         f"--batch_size {value}: expected a number >= 1")


def _positive_int(value, not_a_number: str, below_one: str) -> int:
    """A model argument as a whole number >= 1 (lmms-eval hands them over as parsed from text)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UserError(not_a_number) from None
    if number < 1:
        raise UserError(below_one)
    return number


def _distributed():
    """(rank, world size, Accelerator or None): one process needs no Accelerator (and touches no global state)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    from accelerate import Accelerator

    accelerator = Accelerator()
    return accelerator.process_index, accelerator.num_processes, accelerator


def _resolve_device(device: str | None, accelerator) -> torch.device:
    if accelerator is not None:
        return accelerator.device
    return parse_device(device)


def _run_by_lmms_eval_cli() -> bool:
    """Whether this process is `python -m lmms_eval` (also under accelerate) or the `lmms-eval` script."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return (spec is not None and spec.name == "lmms_eval.__main__") or Path(sys.argv[0]).name in (
        "lmms-eval", "lmms_eval")


def _usage_path_next_to_results(pretrained: str) -> Path | None:
    """Where lmms-eval's command line writes this run's results, <output_path>/<model name>/, with a file name
    stamped like its `<date>_results.json`; None when not run from that command line with --output_path (then
    pass expert_usage=FILE, or read `usage_summary` after the run)."""
    main = sys.modules.get("lmms_eval.__main__")
    if main is None or not _run_by_lmms_eval_cli():
        return None  # imported by another program (a test, a notebook): its argv is not lmms-eval's
    try:
        _, cli = main.parse_eval_args()  # the command line this process runs (lmms-eval's own parser)
    except SystemExit:
        return None
    if not cli.output_path:
        return None
    from lmms_eval.utils import get_datetime_str, sanitize_model_name

    name = f"{get_datetime_str(timezone=cli.timezone)}_expert_usage.json"
    return Path(cli.output_path) / sanitize_model_name(str(pretrained)) / name
