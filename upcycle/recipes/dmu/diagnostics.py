"""How different the DMU stages came out: are their batches different groupings of the data (NMI of successive
stages' batch labels), and did their FFNs move in different directions from the base (cosine of the updates)?

Experts are only worth routing between if the stages differ; these numbers say whether they did, cheaply,
from what the stages leave in their folders (batch labels and FFN weights).
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import pairwise

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score

from .clustering import describe


def successive_nmi(batch_labels: Mapping[int, np.ndarray]) -> dict[str, float]:
    """NMI between the batch labels of stage s and stage s+1 over all pairs, keyed "s-(s+1)".

    1 = the later stage grouped the data exactly as the earlier one did (same batches, so the same expert);
    nested stages give values below 1 as the later stage splits the earlier clusters further. The pairs a stage
    left out (`drop`: label `DROPPED`) count as one group of their own, so leaving other pairs out is a
    different grouping too."""
    stages = sorted(batch_labels)
    return {f"{s}-{t}": float(normalized_mutual_info_score(batch_labels[s], batch_labels[t]))
            for s, t in pairwise(stages)}


def update_similarity(base: Mapping[str, torch.Tensor], stages: Mapping[int, Mapping[str, torch.Tensor]]) -> dict:
    """Pairwise cosine similarity of the stages' updates (a stage's FFN tensors minus the base's, all of them
    flattened into one vector; weights and biases) and each update's L2 norm.

    Accumulated tensor by tensor in float64, so no flattened copy of a large model is ever held. Returns
    {"cosine": {"s-t": value}, "norm": {"s": value}}; a cosine with an all-zero update is None (undefined)."""
    ids = sorted(stages)
    keys = sorted(stages[ids[0]]) if ids else []
    gram = np.zeros((len(ids), len(ids)))
    for key in keys:
        deltas = torch.stack([(stages[s][key].double() - base[key].double()).flatten() for s in ids])
        gram += (deltas @ deltas.T).numpy()
    norms = np.sqrt(np.diag(gram))
    cosine = {}
    for i, s in enumerate(ids):
        for j in range(i + 1, len(ids)):
            denom = norms[i] * norms[j]
            # clipped: rounding can put identical updates a hair above 1
            cosine[f"{s}-{ids[j]}"] = float(np.clip(gram[i, j] / denom, -1.0, 1.0)) if denom > 0 else None
    return {"cosine": cosine, "norm": {str(s): float(n) for s, n in zip(ids, norms)}}


def repeated_stages(nmi: Mapping[str, float]) -> list[str]:
    """The stage pairs ("s-t") whose batches group the data identically (NMI 1): stage t saw the same batches as
    stage s, so its expert learns what stage s's did. Happens under `bin` when every earlier cluster holds less
    than two batches (all its subclusters are binned back together)."""
    return [pair for pair, value in nmi.items() if value > 1 - 1e-9]


def summary_lines(clusters: Mapping[str, dict], diagnostics: dict) -> list[str]:
    """Log lines: per stage what the small-cluster rule did (`clusters`: stage -> its clusters report), then the
    NMI of successive stages' batch labels and the cosines of the stages' FFN updates."""
    lines = [f"stage {s}: {describe(report)}" for s, report in sorted(clusters.items(), key=lambda kv: int(kv[0]))]
    lines += [f"stages {k}: batch-label NMI {shown(v)}" for k, v in diagnostics["batch_label_nmi"].items()]
    lines += [f"stages {k}: FFN update cosine {shown(v)}" for k, v in diagnostics["update_cosine"].items()]
    return lines


def shown(value: float | None) -> str:
    """A diagnostic as the log and the model card show it (None: undefined, e.g. the cosine of a zero update)."""
    return "undefined" if value is None else f"{value:.4f}"
