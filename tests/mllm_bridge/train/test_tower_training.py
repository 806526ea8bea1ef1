"""The vision tower trained in stage 2: --unfreeze_mm_vision_tower / --mm_tunable_parts, --mm_vision_tower_lr, the
CLIP-MoE routers' losses in the training loss and their routing logged per layer, the trained tower saved in the
output where llava-torch's load_pretrained_model loads it (never the original), an exact resume, and bad flags; over 2
processes under DDP, ZeRO-2, and ZeRO-3 / FSDP2 (the tower sharded by the engine, on anyres images of three shapes)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import write_shaped_grids
from helpers.launchers import ENGINES, copied_at, launch, stopped_after
from safetensors.torch import load_file

from encoder.utils.errors import UserError
from mllm_bridge.train import loop
from mllm_bridge.train.arguments import split_arguments, trainable_parts
from mllm_bridge.train.cli import build_parser, main
from mllm_bridge.train.loop import run_settings
from mllm_bridge.train.run import prepare_run

TOWER_LR = 5e-3


def flags(llm, tower, data, out, **extra) -> list[str]:
    values = dict(model_name_or_path=llm, vision_tower=tower, data_path=data / "train_qa.json", image_folder=data,
                  output_dir=out, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, warmup_ratio=0.0,
                  save_strategy="no", report_to="none", seed=0, model_max_length=256, lr_scheduler_type="constant")
    values.update(extra)
    return ["finetune", *[item for key, value in values.items() for item in (f"--{key}", str(value))]]


def parse(argv):
    return split_arguments(build_parser().parse_args(argv))


def tower_weights(directory) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_stage_2_trains_the_moe_tower_and_llava_loads_the_trained_one(tmp_path, digit_llm_dir, clip_moe_dir,
                                                                      grids_dir, capsys):
    out = tmp_path / "llava-tower"
    argv = flags(digit_llm_dir, clip_moe_dir, grids_dir, out, unfreeze_mm_vision_tower=True,
                 mm_vision_tower_lr=TOWER_LR, gradient_checkpointing=True, balance_loss_coef=0.5)
    trainer, _ = prepare_run(parse(argv))
    model = trainer.accelerator.unwrap_model(trainer.model)
    inner = model.get_vision_tower().vision_tower
    assert all(p.dtype == torch.float32 for p in inner.parameters())
    # Trained up to the selected hidden state (-2: blocks 0-2); block 3 and the post-layernorm reach no feature.
    assert all(p.requires_grad for layer in inner.encoder.layers[:3] for p in layer.parameters())
    assert not any(p.requires_grad for p in [*inner.encoder.layers[3].parameters(), *inner.post_layernorm.parameters()])
    assert inner.encoder.layers[0].gradient_checkpointing  # the tower's layers are recomputed too
    lrs = sorted({group["lr"] for group in trainer.optimizer.param_groups})
    assert lrs == [1e-3, TOWER_LR]
    trainer.train()

    config = json.loads((out / "config.json").read_text())
    assert config["mm_vision_tower"] == str((out / "vision_tower").resolve())
    assert config["mm_vision_tower_trained_from"] == str(clip_moe_dir.resolve())
    assert config["mm_tunable_parts"] == "mm_vision_tower,mm_mlp_adapter,mm_language_model"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert line["loss"] == pytest.approx(line["lm_loss"] + 0.5 * line["vision_load_balance_loss"]
                                             + 0.001 * line["vision_router_z_loss"], rel=1e-5)  # z: the config's
        assert line["vision_load_balance_loss"] > 0 and line["vision_tower_learning_rate"] == TOWER_LR
        assert 0 < line["vision_routing/layer_0/usage_balance"] <= 1
        assert 0.25 <= line["vision_routing/layer_3/top_expert_fraction"] <= 1  # top-2 of 4 experts, 4 layers

    key = "encoder.layers.0.mlp.experts.up_proj"  # a vision-only export's key; the full model's is vision_model.
    original = tower_weights(clip_moe_dir)[f"vision_model.{key}"]
    assert not torch.equal(tower_weights(out / "vision_tower")[key], original)  # it trained

    from llava.model.builder import load_pretrained_model

    _, loaded, _, _ = load_pretrained_model(str(out), None, out.name, device_map="cpu", device="cpu")
    state, trained = loaded.get_vision_tower().vision_tower.state_dict(), inner.state_dict()
    assert set(state) == set(trained)
    assert all(torch.equal(state[k].float(), trained[k].half().float()) for k in trained)  # the builder loads fp16
    assert not torch.equal(state[key].float(), original.half().float())  # never the original

    from mllm_bridge.cli import main as bridge_main

    capsys.readouterr()
    assert bridge_main(["check", str(out)]) == 0  # the trained tower fits the checkpoint it is in
    report = capsys.readouterr().out
    assert str((out / "vision_tower").resolve()) in report and "mismatches: none" in report, report


def test_a_dense_tower_trains_too(tmp_path, digit_llm_dir, dense_clip_dir, grids_dir):
    # llava-torch's own CLIPVisionTower runs under no_grad: a dense tower is given ours, which trains.
    out = tmp_path / "llava-dense-tower"
    assert main(flags(digit_llm_dir, dense_clip_dir, grids_dir, out, max_steps=1,
                      mm_tunable_parts="mm_vision_tower,mm_mlp_adapter,mm_language_model")) == 0
    from transformers import CLIPVisionModel

    saved = CLIPVisionModel.from_pretrained(out / "vision_tower").state_dict()
    original = CLIPVisionModel.from_pretrained(dense_clip_dir).state_dict()
    assert set(saved) == set(original)
    assert any(not torch.equal(saved[k], original[k]) for k in saved)  # it trained
    assert "lm_loss" not in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])  # no routers
    assert json.loads((out / "config.json").read_text())["mm_vision_tower"] == str((out / "vision_tower").resolve())


def test_both_spellings_resolve_to_one_set_of_trainable_parts(tmp_path, digit_llm_dir, clip_moe_dir, grids_dir):
    base = (digit_llm_dir, clip_moe_dir, grids_dir, tmp_path / "llava")
    legacy = parse(flags(*base, unfreeze_mm_vision_tower=True))
    nexts = parse(flags(*base, mm_tunable_parts="mm_language_model, mm_mlp_adapter,mm_vision_tower"))
    assert trainable_parts(legacy) == trainable_parts(nexts) == ("mm_vision_tower", "mm_mlp_adapter",
                                                                  "mm_language_model")
    # Each spelling is recorded as given (a resume must repeat it), and the LLaVA flags follow the parts.
    assert (nexts.model.unfreeze_mm_vision_tower, nexts.model.tune_mm_mlp_adapter) == (True, False)
    assert run_settings(nexts, 1)["--mm_tunable_parts"] == "mm_vision_tower,mm_mlp_adapter,mm_language_model"
    projector_only = parse(flags(*base, mm_tunable_parts="mm_mlp_adapter"))
    assert projector_only.model.tune_mm_mlp_adapter  # saved as LLaVA-NeXT saves it: mm_projector.bin
    assert trainable_parts(parse(flags(*base))) == ("mm_mlp_adapter", "mm_language_model")


@pytest.mark.parametrize("extra, message", [
    (dict(mm_tunable_parts="mm_vision_tower,mm_vision_resampler"),
     "--mm_tunable_parts mm_vision_tower,mm_vision_resampler: 'mm_vision_resampler' is not a part"),
    (dict(mm_vision_tower_lr=2e-6), "--mm_vision_tower_lr 2e-06 applies to a vision tower that trains"),
    (dict(balance_loss_coef=0.1), "--balance_loss_coef 0.1 applies to a vision tower that trains"),
    (dict(unfreeze_mm_vision_tower=True, tune_mm_mlp_adapter=True),
     "--unfreeze_mm_vision_tower True with --tune_mm_mlp_adapter True: the output would be mm_projector.bin alone"),
    (dict(mm_tunable_parts="mm_mlp_adapter", unfreeze_mm_vision_tower=True),
     "--mm_tunable_parts mm_mlp_adapter decides what trains, and --unfreeze_mm_vision_tower True says otherwise"),
    (dict(unfreeze_mm_vision_tower=True, mm_vision_tower_lr=-1), "--mm_vision_tower_lr -1.0: expected a positive"),
    (dict(unfreeze_mm_vision_tower=True, router_z_loss_coef=0.1, vision_tower="DENSE"),
     "--router_z_loss_coef 0.1 weighs a router loss, and --vision_tower .* is a dense CLIP without routers"),
])
def test_bad_tower_flags_are_one_line_exit_2_and_write_nothing(tmp_path, digit_llm_dir, clip_moe_dir, dense_clip_dir,
                                                               grids_dir, capsys, extra, message):
    out = tmp_path / "llava-bad"
    if extra.get("vision_tower") == "DENSE":
        extra = {**extra, "vision_tower": dense_clip_dir}
    values = dict(llm=digit_llm_dir, tower=extra.pop("vision_tower", clip_moe_dir), data=grids_dir, out=out)
    with pytest.raises(UserError, match=message) as err:
        prepare_run(parse(flags(**values, **extra)))
    assert "\n" not in str(err.value) and not out.exists()
    try:
        status = main(flags(**values, **extra))
    except SystemExit as stop:
        status = stop.code
    assert status == 2 and not out.exists()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1


def test_a_trained_tower_resumes_exactly(tmp_path, digit_llm_dir, clip_moe_dir, grids_dir, monkeypatch):
    common = dict(unfreeze_mm_vision_tower=True, mm_vision_tower_lr=TOWER_LR, max_steps=4, save_steps=2,
                  save_strategy="steps", per_device_train_batch_size=2)
    whole, resumed = tmp_path / "llava-whole", tmp_path / "llava-resumed"
    assert main(flags(digit_llm_dir, clip_moe_dir, grids_dir, whole, **common)) == 0

    real = loop.LlavaTrainer._optimizer_step

    def killed(self, batches):
        if self.step == 3:
            raise KeyboardInterrupt
        return real(self, batches)

    monkeypatch.setattr(loop.LlavaTrainer, "_optimizer_step", killed)
    with pytest.raises(KeyboardInterrupt):
        main(flags(digit_llm_dir, clip_moe_dir, grids_dir, resumed, **common))
    checkpoint = resumed / "checkpoint-2"
    assert (checkpoint / "vision_tower" / "config.json").is_file()
    assert (json.loads((checkpoint / "config.json").read_text())["mm_vision_tower"]
            == str((checkpoint / "vision_tower").resolve()))
    monkeypatch.setattr(loop.LlavaTrainer, "_optimizer_step", real)

    # The frozen-tower spelling of the same run is another run: named, refused, nothing written.
    frozen = {**common, "unfreeze_mm_vision_tower": False}
    del frozen["mm_vision_tower_lr"]
    before = sorted(p.name for p in resumed.rglob("*"))
    with pytest.raises(UserError) as refused:
        prepare_run(parse(flags(digit_llm_dir, clip_moe_dir, grids_dir, resumed, **frozen)))
    assert "--unfreeze_mm_vision_tower: True -> False" in str(refused.value)
    assert sorted(p.name for p in resumed.rglob("*")) == before

    assert main(flags(digit_llm_dir, clip_moe_dir, grids_dir, resumed, **common)) == 0
    a, b = tower_weights(whole / "vision_tower"), tower_weights(resumed / "vision_tower")
    assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = tower_weights(whole), tower_weights(resumed)
    assert all(torch.equal(la[k], lb[k]) for k in la)
    metrics = [(resumed if i else whole) / "metrics.jsonl" for i in range(2)]
    last = [json.loads(m.read_text().splitlines()[-1]) for m in metrics]
    assert last[0]["vision_load_balance_loss"] == last[1]["vision_load_balance_loss"]


# -- two processes ----------------------------------------------------------------------------------------------

# -- a trained tower under every engine, on images of several shapes (LLaVA-1.6's anyres) -------------------------

ANYRES = dict(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad", image_grid_pinpoints="(1x1),...,(2x2)")
KEY = "encoder.layers.0.mlp.experts.up_proj"


@pytest.fixture(scope="module")
def shaped_qa(tmp_path_factory, grids_dir):
    """The digit grids' first 12 QA records, their images in three shapes in turn."""
    return write_shaped_grids(grids_dir, tmp_path_factory.mktemp("anyres-tower-data"), "train_qa.json", limit=12)


@pytest.fixture(scope="module")
def engine_tower_runs(tmp_path_factory, digit_llm_dir, clip_moe_dir, shaped_qa):
    """Per engine, launched on first use: 4 steps of LLaVA-1.6 anyres stage 2 with the tower trained, over 2 processes,
    killed after step 3 (a checkpoint every 2 steps) and resumed. DDP runs uninterrupted instead, leaving a copy of its
    output as it stood after step 3 to resume from: its resume must give exactly its weights, and its weights are the
    reference the other engines' resumed runs must reach (the same batches on the same ranks). Launches are the
    suite's dearest tests, so each engine gets only the two its checks need (exact resume of a frozen tower under
    every engine: test_sharded_engines.py)."""
    runs = {}

    def run(engine: str) -> SimpleNamespace:
        if engine in runs:
            return runs[engine]
        launcher, own = ENGINES[engine]
        root = tmp_path_factory.mktemp(engine)
        common = dict(unfreeze_mm_vision_tower=True, mm_vision_tower_lr=TOWER_LR, per_device_train_batch_size=2,
                      max_steps=4, save_steps=2, save_strategy="steps", gradient_checkpointing=True, **ANYRES)

        def go(out, script):
            return launch(launcher, script, [*flags(digit_llm_dir, clip_moe_dir, shaped_qa, out, **common), *own])

        whole = None
        if engine == "ddp":  # uninterrupted, leaving a copy of what a kill after step 3 would have left
            whole = go(root / "llava-whole", copied_at(3, root / "llava-resumed", "mllm_bridge.train"))
            assert whole.returncode == 0, whole.stderr[-3000:]
        else:
            killed = go(root / "llava-resumed", stopped_after(3, "mllm_bridge.train"))
            assert killed.returncode != 0
        assert (root / "llava-resumed" / "checkpoint-2" / "vision_tower").is_dir()
        assert not (root / "llava-resumed" / "checkpoint-4").exists()
        resumed = go(root / "llava-resumed", ["-m", "mllm_bridge.train"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        runs[engine] = SimpleNamespace(whole=whole and root / "llava-whole", resumed=root / "llava-resumed",
                                       stdout=whole and whole.stdout, resumed_stdout=resumed.stdout)
        return runs[engine]

    return run


@pytest.mark.slow
@pytest.mark.engines
@pytest.mark.parametrize("engine", ["deepspeed-zero2", "deepspeed-zero3", "fsdp2"])
def test_every_engine_trains_the_tower_on_anyres_and_resumes_to_the_ddp_weights(engine_tower_runs, clip_moe_dir, engine):
    ddp, runs = engine_tower_runs("ddp"), engine_tower_runs(engine)
    assert f"engine {engine}" in runs.resumed_stdout
    assert f"resumed from {runs.resumed / 'checkpoint-2'} (step 2 of 4)" in runs.resumed_stdout
    # ZeRO-3 and FSDP2 put the tower in the engine: each rank holds about half of every weight, the tower's
    # included; ZeRO-2 shards only the optimizer state, so every rank holds the whole model.
    state = json.loads((loop.latest_checkpoint(runs.resumed) / "trainer_state.json").read_text())
    held, total = state["parameters_held_per_rank"], state["parameters_total"]
    ddp_state = json.loads((loop.latest_checkpoint(ddp.whole) / "trainer_state.json").read_text())
    assert total == ddp_state["parameters_total"] and state["vision_tower_parameters"] > 0
    if engine == "deepspeed-zero2":
        assert held == [total, total], (held, total)
    else:
        assert all(0.45 < h / total < 0.55 for h in held), (held, total)
    # vision_tower/ holds the gathered full weights: those DDP's uninterrupted run reaches. Adam's step normalises
    # each gradient: weights whose gradient is near zero differ by rounding more than the rest (up to ~2e-5 here),
    # still far below what 4 steps at TOWER_LR move them.
    reference, resumed = (tower_weights(r / "vision_tower") for r in (ddp.whole, runs.resumed))
    assert set(resumed) == set(reference) and all(resumed[k].shape == reference[k].shape for k in reference)
    assert all(torch.allclose(resumed[k], reference[k], atol=1e-4, rtol=0) for k in reference), engine
    assert (resumed[KEY] - tower_weights(clip_moe_dir)[f"vision_model.{KEY}"]).abs().max() > 1e-3  # it trained
    llm = {r: tower_weights(r) for r in (ddp.whole, runs.resumed)}
    assert "model.image_newline" in llm[runs.resumed]
    assert all(torch.allclose(llm[runs.resumed][k], llm[ddp.whole][k], atol=1e-5) for k in llm[ddp.whole]), engine
    for out in (runs.resumed, loop.latest_checkpoint(runs.resumed)):
        config = json.loads((out / "config.json").read_text())
        assert config["mm_vision_tower"] == str((out / "vision_tower").resolve())
        assert config["image_aspect_ratio"] == "anyres" and config["mm_patch_merge_type"] == "spatial_unpad"


@pytest.mark.slow
@pytest.mark.engines
def test_ddp_trains_anyres_with_the_tower_and_resumes_exactly(engine_tower_runs, clip_moe_dir):
    runs = engine_tower_runs("ddp")
    assert "engine ddp" in runs.stdout and "2 process(es)" in runs.stdout
    # The routers' balance loss joins the loss on every step, summed over both ranks' tokens.
    lines = [json.loads(line) for line in (runs.whole / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(line["vision_load_balance_loss"] > 0 for line in lines)
    assert f"resumed from {runs.resumed / 'checkpoint-2'} (step 2 of 4)" in runs.resumed_stdout
    for part in ("vision_tower", "."):
        whole, resumed = tower_weights(runs.whole / part), tower_weights(runs.resumed / part)
        assert set(whole) == set(resumed) and all(torch.equal(whole[k], resumed[k]) for k in whole), part
    assert not torch.equal(tower_weights(runs.whole / "vision_tower")[KEY],
                           tower_weights(clip_moe_dir)[f"vision_model.{KEY}"])
    config = json.loads((runs.whole / "config.json").read_text())
    assert (config["image_aspect_ratio"], config["mm_patch_merge_type"]) == ("anyres", "spatial_unpad")
