"""LLaVA stage 2 under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 with 2 CPU processes (gloo): the engines a 7B / 13B
fine-tune needs (LLaVA's finetune.sh runs ZeRO-3) train the weights one process trains, resume exactly after a
kill, shard what they say they shard, and write the LLaVA checkpoint load_pretrained_model reads. The launches
(tests/helpers/stage2_engines.py) are shared with tests/faults/test_sharded_checkpoints.py.

Launched the three ways users launch them: ZeRO-2 by `accelerate launch --multi_gpu` with LLaVA's own
`--deepspeed scripts/zero2.json`, ZeRO-3 by the `deepspeed` launcher with `--deepspeed scripts/zero3.json`
(LLaVA's finetune.sh), FSDP2 by `accelerate launch --use_fsdp --fsdp_version 2`. ZeRO-3's runs (and their one-process
reference) train LLaVA-1.6's anyres on images of three shapes (--image_aspect_ratio anyres --mm_patch_merge_type
spatial_unpad: lists of crop stacks, image_newline trained), the others on square ones, so one set of launches covers
both layouts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.stage2_engines import ANYRES_ENGINE, SHARDED, STEPS
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.engines]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, stage2_engine_runs):
    """The reference of an engine's runs, made on first use per layout: the same 4 steps of 8 samples in one
    process, this one (a fresh interpreter would only add its imports), on one thread as each launched rank."""
    from mllm_bridge.train.cli import main

    outs = {}

    def reference(engine: str) -> Path:
        data, _ = stage2_engine_runs.layout(engine)
        if data not in outs:
            out = tmp_path_factory.mktemp("engines") / "llava-one"
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                assert main(["finetune", *stage2_engine_runs.flags(engine, out, per_device=8)]) == 0
            finally:
                torch.set_num_threads(threads)
            outs[data] = out
        return outs[data]

    return reference


@pytest.fixture(scope="module", params=SHARDED)
def engine_runs(request, tmp_path_factory, stage2_engine_runs):
    """Per engine: an uninterrupted 2-process run, and what a kill after step 3 left of it, resumed."""
    engine = request.param
    runs = stage2_engine_runs(engine)
    out = stage2_engine_runs.copy_killed(engine, tmp_path_factory.mktemp(engine) / "llava-resumed")
    resumed = stage2_engine_runs.launch(engine, ["-m", "mllm_bridge.train"], out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return SimpleNamespace(engine=engine, whole=runs.whole, resumed=out, resumed_stdout=resumed.stdout)


def weights(out):
    return load_file(str(out / "model.safetensors"))


def test_two_sharded_processes_train_the_one_process_weights(engine_runs, one_process, digit_llm_dir):
    one, two = weights(one_process(engine_runs.engine)), weights(engine_runs.whole)
    assert set(one) == set(two) and not any(".vision_tower." in k for k in two)
    assert all(torch.allclose(two[k], one[k], atol=1e-6) for k in one), engine_runs.engine
    start = load_file(str(digit_llm_dir / "model.safetensors"))
    assert not torch.allclose(two["model.embed_tokens.weight"], start["model.embed_tokens.weight"], atol=1e-4)


def test_a_killed_run_resumes_to_the_uninterrupted_weights(engine_runs):
    assert f"resumed from {engine_runs.resumed / 'checkpoint-2'} (step 2 of {STEPS})" in engine_runs.resumed_stdout
    whole, resumed = weights(engine_runs.whole), weights(engine_runs.resumed)
    assert all(torch.allclose(resumed[k], whole[k], atol=1e-7, rtol=0) for k in whole), engine_runs.engine
    state = json.loads((engine_runs.resumed / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["engine"] == engine_runs.engine and state["samples_seen"] == 2 * 8
    # Every rank's part of the engine's state is in the checkpoint (the sharded optimizer included).
    engine_dir = engine_runs.resumed / "checkpoint-2" / "engine"
    assert sorted(p.name for p in engine_dir.glob("random_states_*.pkl")) == ["random_states_0.pkl",
                                                                             "random_states_1.pkl"]
    if engine_runs.engine == ANYRES_ENGINE:  # anyres on three shapes: image_newline trained, resumed exactly
        for out in (engine_runs.whole, engine_runs.resumed):
            config = json.loads((out / "config.json").read_text())
            assert (config["image_aspect_ratio"], config["mm_patch_merge_type"]) == ("anyres", "spatial_unpad")
        assert whole["model.image_newline"].shape == (32,)
        assert torch.equal(resumed["model.image_newline"], whole["model.image_newline"])


def test_each_rank_holds_half_of_what_the_engine_shards(engine_runs, one_process):
    """From the engine's own accounting (DeepSpeed's partitions, FSDP2's local shards, the optimizer's state
    tensors), recorded per rank: every engine halves Adam's moments against one process, ZeRO-3 and FSDP2 the
    weights too."""
    state = json.loads((engine_runs.whole / "checkpoint-2" / "trainer_state.json").read_text())
    alone = json.loads((one_process(engine_runs.engine) / "checkpoint-2" / "trainer_state.json").read_text())
    held, total = state["parameters_held_per_rank"], state["parameters_total"]
    assert len(held) == 2 and len(state["peak_memory_mib_per_rank"]) == 2
    moments = alone["optimizer_state_held_per_rank"][0]
    assert moments > 0 and all(0.45 < m / moments < 0.55 for m in state["optimizer_state_held_per_rank"]), (
        state["optimizer_state_held_per_rank"], moments)
    if engine_runs.engine == "deepspeed-zero2":  # ZeRO-2 shards the optimizer state, not the weights
        assert held == [total, total]
    else:
        assert all(0.45 < h / total < 0.55 for h in held), (held, total)
        assert state["vision_tower_parameters"] > 0  # kept whole on every rank, outside the engine


def test_the_output_loads_with_llavas_load_pretrained_model(engine_runs):
    from llava.model.builder import load_pretrained_model

    from encoder import CLIPMoEVisionTower

    out = engine_runs.whole
    _, model, processor, _ = load_pretrained_model(str(out), None, out.name, device_map="cpu", device="cpu")
    assert type(model.get_vision_tower()) is CLIPMoEVisionTower and processor is not None
    saved = weights(out)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], saved[k].to(loaded[k].dtype)) for k in saved if k in loaded)

