"""Which experts a CLIP-MoE vision tower uses while an MLLM is benchmarked: top-k choices per expert and MoE layer.

A benchmark score alone cannot tell a CLIP-MoE whose routing collapsed onto one expert from one that uses them
all; these counts can. They are collected by forward hooks on the routers, so the model and LLaVA's code stay
untouched and the counts are exactly what the layers pick (top-k of the fp32 softmax of the router logits).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from encoder.moe import CLIPMoESparseMLP
from encoder.utils.files import write_atomic

ALL_TASKS = "all"


class ExpertUsageRecorder:
    """Counts the top-k choices of every MoE layer of a vision model, per task and over everything.

    Every token the tower encodes counts (patches and CLS, as in `upcycle routing`), at every MoE layer, including
    layers after LLaVA's select layer whose outputs LLaVA discards (they still run).
    """

    def __init__(self, vision_model: nn.Module):
        self.device = next(vision_model.parameters()).device
        self.layers: list[int] = []
        self._handles = []
        moe_mlps = [(i, layer.mlp) for i, layer in enumerate(vision_model.encoder.layers)
                    if isinstance(layer.mlp, CLIPMoESparseMLP)]
        self.num_experts = moe_mlps[0][1].num_experts if moe_mlps else 0
        self.top_k = moe_mlps[0][1].top_k if moe_mlps else 0
        for slot, (index, mlp) in enumerate(moe_mlps):
            self.layers.append(index)
            self._handles.append(mlp.router.register_forward_hook(self._router_hook(slot, mlp.top_k)))
        self._handles.append(vision_model.register_forward_pre_hook(self._count_images, with_kwargs=True))
        self.task = ALL_TASKS
        self._choices: dict[str, torch.Tensor] = {}  # task -> [layers, experts] counts (on the model's device)
        self._tokens: dict[str, torch.Tensor] = {}  # task -> [layers]
        self._images: dict[str, int] = {}

    @classmethod
    def for_tower(cls, tower) -> ExpertUsageRecorder | None:
        """A recorder on a loaded LLaVA tower (`CLIPMoEVisionTower`), or None when the tower has no MoE layers."""
        vision_model = getattr(tower, "vision_tower", None)
        encoder = getattr(vision_model, "encoder", None)
        if encoder is None or not any(isinstance(layer.mlp, CLIPMoESparseMLP) for layer in encoder.layers):
            return None
        return cls(vision_model)

    def _router_hook(self, slot: int, top_k: int):
        def hook(module, inputs, logits):
            # Counts are normal tensors even when the forward runs under inference_mode, so any later forward
            # (inference mode or not) can keep adding to them.
            with torch.inference_mode(False), torch.no_grad():
                chosen = logits.float().softmax(dim=-1).topk(top_k, dim=-1).indices.reshape(-1)
                counts = torch.bincount(chosen, minlength=self.num_experts)
                self._choices_of(self.task)[slot] += counts.to(self.device)
                self._tokens_of(self.task)[slot] += logits.shape[0]
        return hook

    def _count_images(self, module, args, kwargs) -> None:
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        self._images[self.task] = self._images.get(self.task, 0) + (pixels.shape[0] if pixels is not None else 0)

    def _choices_of(self, task: str) -> torch.Tensor:
        if task not in self._choices:
            self._choices[task] = torch.zeros(len(self.layers), self.num_experts, dtype=torch.long, device=self.device)
        return self._choices[task]

    def _tokens_of(self, task: str) -> torch.Tensor:
        if task not in self._tokens:
            self._tokens[task] = torch.zeros(len(self.layers), dtype=torch.long, device=self.device)
        return self._tokens[task]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reduce(self, all_tasks, reduce_sum) -> None:
        """Sum the counts over processes (data-parallel evaluation): `all_tasks` = the tasks any process saw (every
        process must reduce the same tensors in the same order), `reduce_sum(tensor) -> tensor`."""
        for task in sorted(all_tasks):
            self._choices[task] = reduce_sum(self._choices_of(task))
            self._tokens[task] = reduce_sum(self._tokens_of(task))
            self._images[task] = int(reduce_sum(torch.tensor([self._images.get(task, 0)], device=self.device)))

    @property
    def tasks(self) -> list[str]:
        return sorted(self._choices)

    def summary(self) -> dict:
        """{"num_experts", "top_k", "moe_layers", "all": {...}, "tasks": {task: {...}}}; each part holds "images"
        (images encoded; a multiple-choice task encodes its image once per choice) and "layers": [{"layer",
        "tokens", "choices" (top-k choices per expert), "expert_fraction" (choices / all choices; sums to 1)}]."""
        tasks = {task: self._part(self._choices[task], self._tokens[task], self._images.get(task, 0))
                 for task in sorted(self._choices)}
        if self._choices:
            total = self._part(sum(c.cpu() for c in self._choices.values()),
                               sum(t.cpu() for t in self._tokens.values()), sum(self._images.values()))
        else:
            total = self._part(torch.zeros(len(self.layers), self.num_experts, dtype=torch.long),
                               torch.zeros(len(self.layers), dtype=torch.long), 0)
        return {"num_experts": self.num_experts, "top_k": self.top_k, "moe_layers": self.layers,
                ALL_TASKS: total, "tasks": tasks}

    def _part(self, choices: torch.Tensor, tokens: torch.Tensor, images: int) -> dict:
        choices, tokens = choices.cpu(), tokens.cpu()
        layers = []
        for slot, layer in enumerate(self.layers):
            row = choices[slot].double()
            fraction = row / row.sum() if row.sum() > 0 else row
            layers.append({"layer": layer, "tokens": int(tokens[slot]), "choices": choices[slot].tolist(),
                           "expert_fraction": fraction.tolist()})
        return {"images": images, "layers": layers}

    def write(self, path: str | Path, header: dict | None = None) -> Path:
        """Write `summary()` (after `header`, e.g. the checkpoint) as JSON, atomically."""
        text = json.dumps({**(header or {}), **self.summary()}, indent=2) + "\n"
        return write_atomic(path, lambda tmp: tmp.write_text(text))

