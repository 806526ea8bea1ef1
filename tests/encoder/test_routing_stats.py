"""The one routing tally: counts checked against a hand count of top-k picks, padding left out, entropy of known
distributions, totals and sums over processes, and the balance of expert shares."""

import math

import pytest
import torch

from encoder.routing_stats import RoutingTally, usage_balance
from encoder.utils.errors import NonFiniteValues


def logits(tokens, experts=4, seed=0):
    return torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed))


def hand_count(layer_logits, top_k, keep=None):
    counts = [0] * layer_logits.shape[1]
    for t, row in enumerate(layer_logits):
        if keep is None or keep[t]:
            for e in torch.softmax(row, dim=-1).topk(top_k).indices.tolist():
                counts[e] += 1
    return counts


def test_counts_match_a_hand_count_and_leave_out_tokens_not_kept():
    tally = RoutingTally([1, 3], num_experts=4, top_k=2)
    first, second = logits(7), logits(7, seed=1)
    keep = torch.tensor([True, True, False, True, False, True, True])
    tally.add([first, second], keep)
    tally.add([second, first])
    summary = tally.summary()
    assert (summary["num_experts"], summary["top_k"]) == (4, 2)
    (a, b) = summary["layers"]
    assert (a["layer"], b["layer"]) == (1, 3) and a["tokens"] == b["tokens"] == 5 + 7
    expected_a = [x + y for x, y in zip(hand_count(first, 2, keep), hand_count(second, 2), strict=True)]
    assert a["choices"] == expected_a and sum(a["choices"]) == 2 * a["tokens"]
    assert a["expert_fraction"] == pytest.approx([c / sum(expected_a) for c in expected_a])
    assert b["choices"] == [x + y for x, y in zip(hand_count(second, 2, keep), hand_count(first, 2), strict=True)]


def test_router_entropy_of_uniform_and_of_certain_routing():
    tally = RoutingTally([0, 1], num_experts=4, top_k=1)
    certain = torch.full((3, 4), -1e4)
    certain[:, 2] = 1e4
    tally.add([torch.zeros(5, 4), certain])
    uniform, peaked = tally.summary()["layers"]
    assert uniform["router_entropy"] == pytest.approx(math.log(4))
    assert uniform["router_entropy_norm"] == pytest.approx(1.0)
    assert peaked["router_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert peaked["expert_fraction"] == [0.0, 0.0, 1.0, 0.0] and peaked["usage_entropy_norm"] == 0.0


def test_an_empty_tally_reports_zeros_not_nan():
    (layer,) = RoutingTally([5], num_experts=3, top_k=2).summary()["layers"]
    assert layer == {"layer": 5, "tokens": 0, "choices": [0, 0, 0], "expert_fraction": [0.0, 0.0, 0.0],
                     "router_entropy": 0.0, "router_entropy_norm": 0.0, "usage_entropy_norm": 0.0}


def test_totals_and_process_sums_add_every_count():
    one, two = RoutingTally([0], 4, 2), RoutingTally([0], 4, 2)
    one.add([logits(6)])
    two.add([logits(9, seed=2)])
    total = RoutingTally([0], 4, 2)
    total.add_counts(one)
    total.add_counts(two)
    both = RoutingTally([0], 4, 2)
    both.add([torch.cat([logits(6), logits(9, seed=2)])])
    (summed,), (joined,) = total.summary()["layers"], both.summary()["layers"]
    assert summed["choices"] == joined["choices"] and summed["tokens"] == joined["tokens"] == 15
    assert summed["router_entropy"] == pytest.approx(joined["router_entropy"])
    one.reduce(lambda t: t * 2)  # what a sum over two identical processes gives
    (doubled,) = one.summary()["layers"]
    assert doubled["tokens"] == 12 and sum(doubled["choices"]) == 24


def test_usage_balance():
    assert usage_balance([0.25] * 4) == pytest.approx(1.0)
    assert usage_balance([1.0, 0.0, 0.0]) == 0.0
    assert usage_balance([0.75, 0.25]) == pytest.approx(0.8113, abs=1e-4)
    assert usage_balance([1.0]) == 1.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_refused_naming_the_layer(bad):
    tally = RoutingTally([0, 2], num_experts=4, top_k=2)
    poisoned = logits(5)
    poisoned[1, 0] = bad
    with pytest.raises(NonFiniteValues, match="router logits of MoE layer 2: 1 of 5 rows"):
        tally.add([logits(5), poisoned])
    keep = torch.tensor([True, False, True, True, True])  # the bad token is not counted, so nothing to refuse
    tally.add([logits(5), poisoned], keep)
    assert tally.summary()["layers"][1]["tokens"] == 4
