"""MoE vs best single expert vs the FFN average, from a tiny DMU run: the dense models it builds, the numbers it
reports and where the best expert is chosen."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from encoder.loading import load_clip
from encoder.utils.errors import UserError
from upcycle.cli import main
from upcycle.data import read_pairs
from upcycle.eval.embedding import encode_pairs
from upcycle.eval.retrieval import retrieval_hits, retrieval_metrics
from upcycle.research.compare import experts
from upcycle.research.compare.experts import expert_breakdown
from upcycle.research.intervals import pack_hits

NUM_EXPERTS = 3


@pytest.fixture(scope="module")
def dmu(base_clip_dir, grids_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dmu-experts") / "moe"
    assert main(["dmu", "--base", str(base_clip_dir), "--train-data", str(grids_dir / "train.json"), "--out", str(out),
                 "--num-experts", str(NUM_EXPERTS), "--top-k", "2", "--clusters-per-modality", "2",
                 "--batch-size", "16", "--stage-max-steps", "3", "--router-max-steps", "2", "--lr", "1e-3",
                 "--router-lr", "1e-2"]) == 0
    return out, out.with_name("moe.dmu-work")


@pytest.fixture(scope="module")
def breakdown(dmu, base_clip_dir, grids_dir):
    """The result on the test split (no val) and the FFN weights of every dense model it encoded, by name."""
    out, work = dmu
    encoded = {}
    real = experts.encode_pairs

    def spy(model, pairs, *args, desc="", **kwargs):
        encoded[desc.split(" on ")[0]] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return real(model, pairs, *args, desc=desc, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experts, "encode_pairs", spy)
        result = expert_breakdown(work, base_clip_dir, out, grids_dir / "test.json", resamples=500)
    return result, encoded


def test_expert_zero_alone_reproduces_the_base_exactly(breakdown, base_clip_dir, grids_dir):
    result, _ = breakdown
    base = load_clip(base_clip_dir)
    pairs = read_pairs(grids_dir / "test.json")
    images, texts = encode_pairs(base.model, pairs, base.image_processor, base.tokenizer)
    captions, ids = [p.caption for p in pairs], [p.image for p in pairs]
    metrics = retrieval_metrics(images, texts, captions, ids)
    hits = retrieval_hits(images, texts, captions, ids)
    expert0 = result["models"]["expert-0"]
    assert (expert0["i2t_r1"], expert0["t2i_r1"]) == (metrics["i2t_r1"], metrics["t2i_r1"])
    assert expert0["hits"] == {k: pack_hits(hits[k]) for k in ("i2t_r1", "t2i_r1")}
    assert result["num_experts"] == NUM_EXPERTS
    assert set(result["models"]) == {"moe", "ffn-average"} | {f"expert-{i}" for i in range(NUM_EXPERTS)}


def test_each_expert_alone_is_the_base_with_that_stages_ffns(breakdown, dmu, base_clip_dir):
    _, encoded = breakdown
    _, work = dmu
    base = load_file(str(base_clip_dir / "model.safetensors"))
    for stage in range(1, NUM_EXPERTS):
        ffn = load_file(str(work / f"stage-{stage}" / "ffn.safetensors"))
        weights = encoded[f"expert-{stage}"]
        assert ffn and all(torch.equal(weights[k], v) for k, v in ffn.items())
        assert all(torch.equal(weights[k], base[k]) for k in base if k not in ffn)


def test_the_ffn_average_model_holds_the_mean_of_the_experts_ffns(breakdown, dmu, base_clip_dir):
    _, encoded = breakdown
    _, work = dmu
    base = load_file(str(base_clip_dir / "model.safetensors"))
    stages = [load_file(str(work / f"stage-{s}" / "ffn.safetensors")) for s in range(1, NUM_EXPERTS)]
    average = encoded["ffn-average"]
    ffn_keys = set(stages[0])
    assert ffn_keys == {k for k in base if ".mlp.fc" in k}
    for key in ffn_keys:
        mean = torch.stack([base[key]] + [s[key] for s in stages]).mean(dim=0)
        assert torch.allclose(average[key], mean, rtol=0, atol=1e-7), key
    assert not all(torch.equal(average[k], stages[0][k]) for k in ffn_keys)  # not just one expert's FFNs
    assert all(torch.equal(average[k], base[k]) for k in base if k not in ffn_keys)


def test_reported_differences_and_intervals_are_those_of_the_reported_values(breakdown, grids_dir):
    result, _ = breakdown
    models, best = result["models"], result["best_expert"]
    assert best["chosen_on"] == "reported split" and best["split"] == str(grids_dir / "test.json")
    assert result["val"] is None
    means = {f"expert-{i}": models[f"expert-{i}"]["r1_mean"] for i in range(NUM_EXPERTS)}
    assert best["r1_mean"] == means and best["name"] == f"expert-{best['index']}"
    assert means[best["name"]] == max(means.values())
    lengths = {key: {len(m["hits"][key]) for m in models.values()} for key in ("i2t_r1", "t2i_r1")}
    assert all(len(n) == 1 for n in lengths.values())  # every model on the same queries
    for name, m in models.items():
        for key in ("i2t_r1", "t2i_r1"):
            assert m[key] == pytest.approx(100 * m["hits"][key].count("1") / len(m["hits"][key])), name
        assert m["r1_mean"] == pytest.approx((m["i2t_r1"] + m["t2i_r1"]) / 2)
    for diff, other in (("moe_minus_best", best["name"]), ("moe_minus_average", "ffn-average")):
        for key in ("i2t_r1", "t2i_r1", "r1_mean"):
            assert result[diff][key] == pytest.approx(models["moe"][key] - models[other][key])
        for key in ("i2t_r1", "t2i_r1"):
            ci = result["intervals"][diff][key]
            assert ci["estimate"] == pytest.approx(result[diff][key])
            assert ci["low"] <= ci["estimate"] <= ci["high"] and ci["items"] == len(models["moe"]["hits"][key])
            assert ci["excludes_zero"] == (ci["low"] > 0 or ci["high"] < 0)


def fake_hits(perfect_on_val: str, perfect_on_test: str):
    """Hits in place of the real evaluation: on val only `perfect_on_val` hits, on test only `perfect_on_test`
    (and the MoE half of the queries)."""
    def hits(name, split, loaded, model, pairs):
        on_val = split.name == "val.json"
        n = 4 if on_val else 8
        good = perfect_on_val if on_val else perfect_on_test
        value = torch.ones(n, dtype=torch.bool) if name == good else torch.zeros(n, dtype=torch.bool)
        if name == "moe":
            value = torch.arange(n) % 2 == 0
        return {"i2t_r1": value, "t2i_r1": value.clone()}

    return hits


def test_the_best_expert_is_chosen_on_val_and_reported_on_the_test_split(dmu, base_clip_dir, grids_dir,
                                                                        monkeypatch):
    out, work = dmu
    monkeypatch.setattr(experts, "_hits", fake_hits(perfect_on_val="expert-2", perfect_on_test="expert-1"))
    result = expert_breakdown(work, base_clip_dir, out, grids_dir / "test.json", val_json=grids_dir / "val.json",
                              resamples=200)
    best, models = result["best_expert"], result["models"]
    assert (best["name"], best["index"], best["chosen_on"]) == ("expert-2", 2, "val")
    assert best["split"] == str(grids_dir / "val.json") and result["val"] == best["split"]
    assert best["r1_mean"] == {"expert-0": 0.0, "expert-1": 0.0, "expert-2": 100.0}
    assert models["expert-1"]["r1_mean"] == 100.0 and models["expert-2"]["r1_mean"] == 0.0  # reported on test
    assert result["moe_minus_best"]["r1_mean"] == pytest.approx(50.0)  # MoE 50 minus expert-2's test 0
    assert result["intervals"]["moe_minus_best"]["i2t_r1"]["estimate"] == pytest.approx(50.0)

    without_val = expert_breakdown(work, base_clip_dir, out, grids_dir / "test.json", resamples=200)
    assert (without_val["best_expert"]["name"], without_val["best_expert"]["chosen_on"]) == ("expert-1",
                                                                                              "reported split")
    assert without_val["moe_minus_best"]["r1_mean"] == pytest.approx(-50.0)


def test_a_work_directory_without_the_stages_is_refused(dmu, base_clip_dir, grids_dir, tmp_path):
    out, _ = dmu
    with pytest.raises(UserError, match="stage 1"):
        expert_breakdown(tmp_path, base_clip_dir, out, grids_dir / "test.json")
