"""Which experts a MoE vision tower (CLIP-MoE, SigLIP-MoE) uses while an MLLM is benchmarked: top-k choices per expert and MoE layer.

A benchmark score alone cannot tell a CLIP-MoE whose routing collapsed onto one expert from one that uses them
all; these counts can. They are collected by forward hooks on the routers, so the model and LLaVA's code stay
untouched; the counting itself is `encoder.routing_stats.RoutingTally`, the one `upcycle routing` uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from encoder.moe import CLIPMoESparseMLP
from encoder.routing_stats import RoutingTally
from encoder.utils.files import write_atomic

ALL_TASKS = "all"


class ExpertUsageRecorder:
    """Counts the routing of every MoE layer of a vision model (a `RoutingTally`), per task and over everything.

    Every token the tower encodes counts (patches and CLS, as in `upcycle routing`), at every MoE layer, including
    layers after LLaVA's select layer whose outputs LLaVA discards (they still run).
    """

    def __init__(self, vision_model: nn.Module):
        self.device = next(vision_model.parameters()).device
        self._handles = []
        moe_mlps = [(i, layer.mlp) for i, layer in enumerate(vision_model.encoder.layers)
                    if isinstance(layer.mlp, CLIPMoESparseMLP)]
        self.layers: list[int] = [index for index, _ in moe_mlps]
        self.num_experts = moe_mlps[0][1].num_experts if moe_mlps else 0
        self.top_k = moe_mlps[0][1].top_k if moe_mlps else 0
        for slot, (_, mlp) in enumerate(moe_mlps):
            self._handles.append(mlp.router.register_forward_hook(self._router_hook(slot)))
        self._handles.append(vision_model.register_forward_pre_hook(self._count_images, with_kwargs=True))
        self.task = ALL_TASKS
        self._tallies: dict[str, RoutingTally] = {}  # task -> counts (on the model's device)
        self._images: dict[str, int] = {}

    @classmethod
    def for_tower(cls, tower) -> ExpertUsageRecorder | None:
        """A recorder on a loaded LLaVA tower (`CLIPMoEVisionTower`), or None when the tower has no MoE layers."""
        vision_model = getattr(tower, "vision_tower", None)
        encoder = getattr(vision_model, "encoder", None)
        if encoder is None or not any(isinstance(layer.mlp, CLIPMoESparseMLP) for layer in encoder.layers):
            return None
        return cls(vision_model)

    def _router_hook(self, slot: int):
        def hook(module, inputs, logits):
            # Counts are normal tensors even when the forward runs under inference_mode, so any later forward
            # (inference mode or not) can keep adding to them.
            with torch.inference_mode(False), torch.no_grad():
                self._tally_of(self.task).add_layer(slot, logits)
        return hook

    def _count_images(self, module, args, kwargs) -> None:
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        self._images[self.task] = self._images.get(self.task, 0) + (pixels.shape[0] if pixels is not None else 0)

    def _tally_of(self, task: str) -> RoutingTally:
        if task not in self._tallies:
            self._tallies[task] = RoutingTally(self.layers, self.num_experts, self.top_k, self.device)
        return self._tallies[task]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reduce(self, all_tasks, reduce_sum) -> None:
        """Sum the counts over processes (data-parallel evaluation): `all_tasks` = the tasks any process saw (every
        process must reduce the same tensors in the same order), `reduce_sum(tensor) -> tensor`."""
        for task in sorted(all_tasks):
            self._tally_of(task).reduce(reduce_sum)
            self._images[task] = int(reduce_sum(torch.tensor([self._images.get(task, 0)], device=self.device)))

    @property
    def tasks(self) -> list[str]:
        return sorted(self._tallies)

    def summary(self) -> dict:
        """{"num_experts", "top_k", "moe_layers", "all": {...}, "tasks": {task: {...}}}; each part holds "images"
        (images encoded; a multiple-choice task encodes its image once per choice) and "layers" (those of
        `RoutingTally.summary()`: "layer", "tokens", "choices", "expert_fraction" (sums to 1), router entropy)."""
        tasks = {task: self._part(self._tallies[task], self._images.get(task, 0)) for task in self.tasks}
        total = RoutingTally(self.layers, self.num_experts, self.top_k)
        for tally in self._tallies.values():
            total.add_counts(tally)
        return {"num_experts": self.num_experts, "top_k": self.top_k, "moe_layers": self.layers,
                ALL_TASKS: self._part(total, sum(self._images.values())), "tasks": tasks}

    @staticmethod
    def _part(tally: RoutingTally, images: int) -> dict:
        return {"images": images, "layers": tally.summary()["layers"]}

    def write(self, path: str | Path, header: dict | None = None) -> Path:
        """Write `summary()` (after `header`, e.g. the checkpoint) as JSON, atomically."""
        text = json.dumps({**(header or {}), **self.summary()}, indent=2) + "\n"
        return write_atomic(path, lambda tmp: tmp.write_text(text))
