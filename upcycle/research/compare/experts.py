"""MoE vs best single expert vs the FFN average: what the routers of a DMU CLIP-MoE add over its experts alone.

From the DMU work directory and the base, without training, this builds E dense models, expert i alone (the base
with stage i's FFNs; expert 0 is the base), and the dense model whose FFNs are the mean of the E experts' FFNs. It
scores them and the CLIP-MoE on one split by R@1 both ways. The best single expert is chosen on a validation split
when one is given. The paired intervals of "MoE - best expert" and "MoE - FFN average" are computed on the same
queries.

    from upcycle.research.compare.experts import expert_breakdown
    result = expert_breakdown(Path("moe.dmu-work"), Path("base"), Path("moe"), Path("grids/test.json"),
                              val_json=Path("grids/val.json"))
"""

from __future__ import annotations

from pathlib import Path

import torch

from encoder.loading import load_clip
from encoder.utils.errors import UserError

from ...data import read_pairs
from ...eval.embedding import encode_pairs
from ...eval.retrieval import recalls, retrieval_hits
from ...recipes.dmu.pipeline import dense_with_ffn, stage_ffn
from ..intervals import RESAMPLES, pack_hits, paired_difference_ci, verdict

KEYS = ("i2t_r1", "t2i_r1")
AVERAGE = "ffn-average"
MOE = "moe"


def expert_name(index: int) -> str:
    return f"expert-{index}"


def expert_breakdown(dmu_work_dir: Path, base_dir: Path, moe_dir: Path, data_json: Path,
                     val_json: Path | None = None, resamples: int = RESAMPLES) -> dict:
    """R@1 of the CLIP-MoE in `moe_dir`, of each of its E experts alone and of their FFN average, on `data_json`.

    dmu_work_dir: the work directory of the DMU run that made `moe_dir` (stage-<i>/ffn.safetensors);
    base_dir: the base that run started from; val_json: where the best single expert is chosen (by mean R@1,
    the lower index on a tie); without it the choice is made on `data_json` itself, which favours the best
    expert, and "chosen_on" says so.

    Returns a JSON-ready dict (percent throughout):
      "models": {"moe", "expert-0".."expert-<E-1>", "ffn-average"} -> {"i2t_r1", "t2i_r1", "r1_mean",
          "hits": {"i2t_r1", "t2i_r1"}}, the hits being `pack_hits` strings (one character per unique image or
          caption of `data_json`, in order of first appearance, the same queries for every model);
      "best_expert": {"name", "index", "chosen_on" ("val" or "reported split"), "split", "r1_mean" (per expert,
          on the split it was chosen on)};
      "moe_minus_best", "moe_minus_average": {"i2t_r1", "t2i_r1", "r1_mean"}, differences of the reported values;
      "intervals": {"moe_minus_best", "moe_minus_average"} -> {"i2t_r1", "t2i_r1"} -> {"estimate", "low", "high"}
          (percentage points), "level", "items", "excludes_zero", "informative" (queries on which the two differ),
          "verdict" (`intervals.verdict`'s wording): the paired bootstrap interval over the queries;
      plus "num_experts", "data", "val".
    Raises UserError when the work directory lacks a stage or does not fit the base or the CLIP-MoE.
    """
    moe = load_clip(moe_dir)
    num_experts = _num_experts(moe.model, moe_dir)
    base = load_clip(base_dir)
    ffns = [stage_ffn(base.model, dmu_work_dir, i) for i in range(num_experts)]
    average = {k: torch.stack([f[k].float() for f in ffns]).mean(dim=0).to(ffns[0][k].dtype) for k in ffns[0]}
    dense = {**{expert_name(i): ffn for i, ffn in enumerate(ffns)}, AVERAGE: average}

    test_pairs = read_pairs(data_json)
    hits = {MOE: _hits(MOE, data_json, moe, moe.model, test_pairs)}
    for name, ffn in dense.items():
        hits[name] = _hits(name, data_json, base, dense_with_ffn(base.model, ffn), test_pairs)
    models = {name: _summary(h) for name, h in hits.items()}

    experts = [expert_name(i) for i in range(num_experts)]
    if val_json is not None:
        val_pairs = read_pairs(val_json)
        chosen_on, split = "val", str(val_json)
        selection = {name: _r1_mean(_hits(name, val_json, base, dense_with_ffn(base.model, dense[name]), val_pairs))
                     for name in experts}
    else:
        chosen_on, split = "reported split", str(data_json)
        selection = {name: models[name]["r1_mean"] for name in experts}
    best = max(experts, key=lambda name: (selection[name], -experts.index(name)))

    return {
        "num_experts": num_experts, "data": str(data_json), "val": None if val_json is None else str(val_json),
        "models": models,
        "best_expert": {"name": best, "index": experts.index(best), "chosen_on": chosen_on, "split": split,
                        "r1_mean": selection},
        "moe_minus_best": _difference(models[MOE], models[best]),
        "moe_minus_average": _difference(models[MOE], models[AVERAGE]),
        "intervals": {"moe_minus_best": _intervals(hits[MOE], hits[best], resamples),
                      "moe_minus_average": _intervals(hits[MOE], hits[AVERAGE], resamples)},
    }


def _num_experts(model, moe_dir: Path) -> int:
    counts = {tower.num_experts for tower in (model.config.vision_config, model.config.text_config)
              if tower.moe_layers}
    if len(counts) != 1:
        raise UserError(f"{moe_dir} is not a CLIP-MoE with one number of experts in its MoE layers (found "
                        f"{sorted(counts) or 'no MoE layers'}); pass the CLIP-MoE that `upcycle dmu` wrote")
    return counts.pop()


def _hits(name: str, split: Path, loaded, model, pairs) -> dict[str, torch.Tensor]:
    """Per-query R@1 hits of `model` (called `name`) on `pairs`, read from `split`, encoded with `loaded`'s
    image processor and tokenizer."""
    images, texts = encode_pairs(model, pairs, loaded.image_processor, loaded.tokenizer,
                                 desc=f"{name} on {Path(split).name}")
    hits = retrieval_hits(images, texts, [p.caption for p in pairs], [p.image for p in pairs])
    return {key: hits[key] for key in KEYS}


def _summary(hits: dict[str, torch.Tensor]) -> dict:
    result = recalls(hits)
    return {**{key: result[key] for key in KEYS}, "r1_mean": _r1_mean(hits),
            "hits": {key: pack_hits(hits[key]) for key in KEYS}}


def _r1_mean(hits: dict[str, torch.Tensor]) -> float:
    result = recalls(hits)
    return (result["i2t_r1"] + result["t2i_r1"]) / 2


def _difference(a: dict, b: dict) -> dict:
    return {key: a[key] - b[key] for key in (*KEYS, "r1_mean")}


def _intervals(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], resamples: int) -> dict:
    out = {}
    for key in KEYS:
        ci = paired_difference_ci(a[key].numpy(), b[key].numpy(), resamples=resamples)
        out[key] = {"estimate": 100 * ci.estimate, "low": 100 * ci.low, "high": 100 * ci.high, "level": ci.level,
                    "items": ci.items, "excludes_zero": ci.excludes_zero(), "informative": ci.informative,
                    "verdict": verdict(ci)}
    return out
