"""scripts/bench_llava_stage2.py at its smallest: every run is built and stepped, and its JSON carries the tokens and
timings it promises (positive, finite; anyres gives non-square grids more image tokens than pad). No timing is
compared: the machine is shared."""

import importlib.util
import json
import math

import pytest
from conftest import REPO_ROOT

from upcycle.embedded.digit_grids import make_digit_grids


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_llava_stage2", REPO_ROOT / "scripts" / "bench_llava_stage2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive_numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from positive_numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from positive_numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_the_smallest_benchmark_reports_every_run_and_ratio(bench, tmp_path, digit_llm_dir, clip_moe_dir):
    data = tmp_path / "data"
    make_digit_grids(data, num_train=6, num_val=0, num_test=0, image_size=64, grid=2, seed=0,
                     shapes=bench.SHAPES)
    result = bench.bench_stage2(digit_llm_dir, clip_moe_dir, data, tmp_path / "runs", batch=3, repeats=1,
                                warmup=0)
    json.dumps(result)  # what main prints
    trained = bench.can_train_tower()
    names = ["pad", "anyres"] + (["pad_trained", "anyres_trained"] if trained else [])
    assert list(result["runs"]) == names
    expected_ratios = {"anyres / pad (frozen tower)"}
    if trained:
        expected_ratios |= {"trained / frozen tower (pad)", "trained / frozen tower (anyres)",
                            "anyres / pad (trained tower)"}
        assert result["trained_tower"].startswith("compared")
    else:
        assert result["trained_tower"].startswith("not compared")
    assert set(result["ratios"]) == expected_ratios
    for name in names:
        run = result["runs"][name]
        assert {"step_ms", "samples_per_s", "image_tokens_per_sample", "llm_positions_per_sample",
                "trainable_parameters", "flags"} <= set(run)
        assert len(run["step_ms"]["samples_ms"]) == 1
    for ratio in result["ratios"].values():
        assert set(ratio) == {"step_time", "step_time_paired", "step_time_min", "image_tokens_per_sample",
                              "llm_positions_per_sample"}
    numbers = list(positive_numbers({"runs": result["runs"], "ratios": result["ratios"]}))
    assert numbers and all(math.isfinite(x) and x > 0 for x in numbers)
    pad, anyres = result["runs"]["pad"], result["runs"]["anyres"]
    shapes = pad["image_tokens_per_image_shape (width x height)"]
    assert set(shapes) == {"64x64", "64x32", "32x64"} and len(set(shapes.values())) == 1  # pad: one crop each
    wide = anyres["image_tokens_per_image_shape (width x height)"]
    # 4 crops > 2 crops > pad's 1; spatial_unpad ends each row of patches with image_newline: a tall grid has more rows
    assert wide["64x64"] > wide["32x64"] > wide["64x32"] > shapes["64x64"]
    assert result["ratios"]["anyres / pad (frozen tower)"]["image_tokens_per_sample"] > 1
    if trained:
        assert result["runs"]["pad_trained"]["trainable_parameters"] > pad["trainable_parameters"]
