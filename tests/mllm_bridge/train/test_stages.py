"""LLaVA stage 1 and stage 2 on tiny models: what trains, what is saved, and that LLaVA's own code loads it."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from encoder import CLIPMoEVisionTower
from mllm_bridge.train import loop
from mllm_bridge.train.arguments import split_arguments
from mllm_bridge.train.cli import build_parser, main
from mllm_bridge.train.run import prepare_run


def flags(llm, tower, data, out, data_file="train.json", **extra) -> list[str]:
    values = dict(model_name_or_path=llm, vision_tower=tower, data_path=data / data_file, image_folder=data,
                  output_dir=out, per_device_train_batch_size=8, max_steps=6, learning_rate=1e-2,
                  gradient_checkpointing=False, save_steps=2, report_to="none", seed=0)
    values.update(extra)
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def run(argv) -> int:
    """Exit status of `python -m mllm_bridge.train ARGV` (argparse errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def batch_of(trainer, n=2):
    items = [trainer.loader.dataset[i] for i in range(n)]
    return trainer.loader.collate_fn(items)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     images=batch["images"].to(model.dtype)).logits


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, digit_llm_dir, clip_moe_dir, grids_dir):
    """A 6-step stage-1 run, kept in memory with the weights it started from."""
    out = tmp_path_factory.mktemp("runs") / "llava-tiny-pretrain"
    args = split_arguments(build_parser().parse_args(["pretrain", *flags(digit_llm_dir, clip_moe_dir, grids_dir, out)]))
    trainer, resume_from = prepare_run(args)
    assert resume_from is None
    before = {k: v.clone() for k, v in trainer.trained.model.state_dict().items()}
    result = trainer.train()
    return SimpleNamespace(out=out, trainer=trainer, before=before, result=result,
                           model=trainer.accelerator.unwrap_model(trainer.model).eval())


def test_stage1_trains_only_the_projector_and_the_loss_falls(stage1):
    after = stage1.model.state_dict()
    changed = {k for k, v in stage1.before.items() if not torch.equal(v, after[k])}
    projector = {k for k in after if ".mm_projector." in k}
    assert changed == projector and len(projector) == 4  # mlp2x_gelu: two Linear layers
    losses = [json.loads(line)["loss"] for line in (stage1.out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert stage1.result.end_loss < stage1.result.start_loss


def test_stage1_output_is_llavas_layout(stage1):
    # --save_total_limit 1: the last step's checkpoint, saved before the output (so a killed output write resumes)
    assert {p.name for p in stage1.out.iterdir()} >= {"config.json", "mm_projector.bin", "checkpoint-6"}
    saved = torch.load(stage1.out / "mm_projector.bin", weights_only=True)
    assert sorted(saved) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                             "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    config = json.loads((stage1.out / "config.json").read_text())
    assert config["model_type"] == "llava_llama" and config["mm_hidden_size"] == 32
    assert config["mm_use_im_patch_token"] is False and config["tune_mm_mlp_adapter"] is True
    assert config["use_cache"] is True and config["mm_vision_select_layer"] == -2


def test_llavas_stage2_path_loads_the_projector_to_the_same_logits(stage1, digit_llm_dir, clip_moe_dir):
    # LLaVA's own initialize_vision_modules with --pretrain_mm_mlp_adapter, as its stage 2 does.
    from llava.model import LlavaLlamaForCausalLM

    fresh = LlavaLlamaForCausalLM.from_pretrained(digit_llm_dir, dtype=torch.float32)
    fresh.get_model().initialize_vision_modules(SimpleNamespace(
        vision_tower=str(clip_moe_dir), mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        mm_projector_type="mlp2x_gelu", mm_patch_merge_type="flat",
        pretrain_mm_mlp_adapter=str(stage1.out / "mm_projector.bin")))
    batch = batch_of(stage1.trainer)
    assert torch.equal(logits(fresh.eval(), batch), logits(stage1.model, batch))


def test_load_pretrained_model_reads_the_projector_over_its_base(stage1, digit_llm_dir):
    from llava.model.builder import load_pretrained_model

    tokenizer, model, _, _ = load_pretrained_model(
        str(stage1.out), str(digit_llm_dir), stage1.out.name, device_map="cpu", device="cpu")
    assert type(model.get_vision_tower()) is CLIPMoEVisionTower and len(tokenizer) == model.config.vocab_size
    saved = torch.load(stage1.out / "mm_projector.bin", weights_only=True)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v.half()) for k, v in saved.items())
    batch = batch_of(stage1.trainer)
    loaded = logits(model.eval(), batch).float()
    trained, untrained = copy.deepcopy(stage1.model), copy.deepcopy(stage1.model)
    untrained.load_state_dict(stage1.before)
    # LLaVA's loader works in fp16. Not bit-equal: `.half()` also rounds the rotary-embedding buffers that
    # from_pretrained keeps in fp32; the projector's training moved the logits far more than that.
    assert (loaded - logits(trained.half(), batch).float()).abs().max() < 1e-2
    assert (loaded - logits(untrained.half(), batch).float()).abs().max() > 0.1


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(stage1, digit_llm_dir, clip_moe_dir, grids_dir,
                                                           tmp_path, monkeypatch, capsys):
    out = tmp_path / "llava-resumed"
    argv = ["pretrain", *flags(digit_llm_dir, clip_moe_dir, grids_dir, out)]
    step = loop.LlavaTrainer._optimizer_step

    def interrupted(self, batches):
        if self.step == 3:  # after checkpoint-2, with step 3 done but not saved
            raise KeyboardInterrupt
        return step(self, batches)

    monkeypatch.setattr(loop.LlavaTrainer, "_optimizer_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert [p.name for p in loop.checkpoints(out)] == ["checkpoint-2"] and not (out / "config.json").exists()
    monkeypatch.setattr(loop.LlavaTrainer, "_optimizer_step", step)
    assert main(argv) == 0
    assert f"resumed from {out / 'checkpoint-2'} (step 2 of 6)" in capsys.readouterr().out
    resumed = torch.load(out / "mm_projector.bin", weights_only=True)
    uninterrupted = torch.load(stage1.out / "mm_projector.bin", weights_only=True)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_a_finished_run_is_trained_over_only_when_asked(stage1, digit_llm_dir, clip_moe_dir, grids_dir, tmp_path,
                                                       capsys):
    out = tmp_path / "llava-again"
    shutil.copytree(stage1.out, out)
    argv = ["pretrain", *flags(digit_llm_dir, clip_moe_dir, grids_dir, out, max_steps=2, learning_rate=0.1)]
    assert "already holds a finished run; pass --overwrite_output_dir True" in bad_run(capsys, argv)
    assert main([*argv, "--overwrite_output_dir", "True"]) == 0
    assert "resumed" not in capsys.readouterr().out
    # The old run's checkpoints are gone; the one left is the new run's last step.
    assert [p.name for p in loop.checkpoints(out)] == ["checkpoint-2"]
    assert loop.recorded_settings(out / "checkpoint-2")["--learning_rate"] == 0.1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    again = torch.load(out / "mm_projector.bin", weights_only=True)
    assert not torch.equal(again["model.mm_projector.0.weight"], stage1.model.get_model().mm_projector[0].weight)


@pytest.fixture(scope="module")
def stage2(tmp_path_factory, stage1, digit_llm_dir, clip_moe_dir, grids_dir):
    out = tmp_path_factory.mktemp("runs") / "llava-tiny-finetune"
    argv = ["finetune", *flags(digit_llm_dir, clip_moe_dir, grids_dir, out, data_file="train_qa.json",
                               pretrain_mm_mlp_adapter=stage1.out / "mm_projector.bin", learning_rate=1e-3,
                               max_steps=4, save_strategy="no")]
    assert main(argv) == 0
    return out


def test_stage2_checkpoint_loads_with_load_pretrained_model(stage1, stage2, digit_llm_dir):
    from llava.model import LlavaLlamaForCausalLM
    from llava.model.builder import load_pretrained_model

    assert not list(stage2.glob("checkpoint-*"))  # --save_strategy no
    _, info = LlavaLlamaForCausalLM.from_pretrained(stage2, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    base = load_file(str(digit_llm_dir / "model.safetensors"))
    saved = load_file(str(stage2 / "model.safetensors"))
    assert not any(".vision_tower." in k for k in saved)  # LLaVA loads the tower from mm_vision_tower
    assert not torch.equal(saved["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # LLM trained
    stage1_projector = torch.load(stage1.out / "mm_projector.bin", weights_only=True)
    assert not torch.equal(saved["model.mm_projector.0.weight"], stage1_projector["model.mm_projector.0.weight"])

    _, model, processor, _ = load_pretrained_model(str(stage2), None, stage2.name, device_map="cpu", device="cpu")
    tower = model.get_vision_tower()
    assert type(tower) is CLIPMoEVisionTower and tower.is_loaded and processor is tower.image_processor
    assert json.loads((stage2 / "config.json").read_text())["tune_mm_mlp_adapter"] is False
    batch = batch_of(stage1.trainer, 1)
    out = model.generate(batch["input_ids"][:, :-3], images=batch["images"].half(), max_new_tokens=2,
                         do_sample=False)
    assert out.shape == (1, 2)


def bad_run(capsys, argv) -> str:
    """The one error line of a run that must stop with exit status 2 (after any progress bar it drew)."""
    assert run(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1
    return lines[-1]


def test_a_projector_from_another_tower_width_is_refused(tmp_path, digit_llm_dir, clip_moe_dir, grids_dir, capsys):
    other = {"model.mm_projector.0.weight": torch.zeros(32, 48), "model.mm_projector.0.bias": torch.zeros(32),
             "model.mm_projector.2.weight": torch.zeros(32, 32), "model.mm_projector.2.bias": torch.zeros(32)}
    torch.save(other, tmp_path / "mm_projector.bin")
    err = bad_run(capsys, ["finetune", *flags(digit_llm_dir, clip_moe_dir, grids_dir, tmp_path / "llava-x",
                                              data_file="train_qa.json",
                                              pretrain_mm_mlp_adapter=tmp_path / "mm_projector.bin")])
    assert re.search(r"trained on 48-wide tower features but the vision tower .* is 32 wide", err)


@pytest.mark.parametrize("records, message", [
    ([], "holds no records; the training set is empty"),
    ([{"id": "a", "image": "nowhere.png", "conversations": [{"from": "human", "value": "<image>"},
                                                           {"from": "gpt", "value": "x"}]}], "images not found"),
])
def test_bad_data_stops_with_one_line(tmp_path, digit_llm_dir, clip_moe_dir, records, message, capsys):
    (tmp_path / "train.json").write_text(json.dumps(records))
    err = bad_run(capsys, ["pretrain", *flags(digit_llm_dir, clip_moe_dir, tmp_path, tmp_path / "llava-x")])
    assert message in err


def test_unknown_flags_and_unsupported_values_are_one_line(tmp_path, digit_llm_dir, clip_moe_dir, grids_dir, capsys):
    base = flags(digit_llm_dir, clip_moe_dir, grids_dir, tmp_path / "llava-x")
    assert "unrecognized arguments: --no_such_flag" in bad_run(capsys, ["pretrain", *base, "--no_such_flag", "1"])
    assert "--mm_use_im_start_end True is not supported" in bad_run(
        capsys, ["pretrain", *base, "--mm_use_im_start_end", "True"])
    assert "leaves no room for text" in bad_run(capsys, ["pretrain", *base, "--model_max_length", "16"])


def test_samples_longer_than_model_max_length_are_cut_and_counted(tmp_path, digit_llm_dir, clip_moe_dir, grids_dir,
                                                                  capsys):
    argv = ["pretrain", *flags(digit_llm_dir, clip_moe_dir, grids_dir, tmp_path / "llava-short",
                               model_max_length=19, max_steps=2, deepspeed="scripts/zero2.json")]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "note: --deepspeed scripts/zero2.json is ignored: one process started without a launcher" in out
    assert re.search(r"\n16 samples were cut to --model_max_length 19; 0 micro-batches had no answer tokens", out)



def test_a_non_finite_loss_stops_the_run_at_its_step(tmp_path, digit_llm_dir, clip_moe_dir, grids_dir, monkeypatch,
                                                     capsys):
    out = tmp_path / "llava-nan"
    real_loss = loop.LlavaTrainer._loss

    def diverging(self, batch):
        loss = real_loss(self, batch)
        return loss * float("nan") if self.step == 3 else loss

    monkeypatch.setattr(loop.LlavaTrainer, "_loss", diverging)
    err = bad_run(capsys, ["pretrain", *flags(digit_llm_dir, clip_moe_dir, grids_dir, out)])
    assert f"the loss became nan at step 4; the last good checkpoint is {out / 'checkpoint-2'}" in err
    assert not (out / "mm_projector.bin").exists()

@pytest.mark.slow
@pytest.mark.engines
def test_two_processes_train_like_one(stage1, digit_llm_dir, clip_moe_dir, grids_dir, tmp_path):
    """accelerate launch with 2 CPU processes (DDP over gloo), each holding half of every global batch, reaches
    the one-process projector. DDP averages the two halves' mean losses, which equals the one-process mean here
    because every digit caption has the same number of tokens (LLaVA's Trainer averages the same way)."""
    out = tmp_path / "llava-two"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    argv = ["-m", "mllm_bridge.train", "pretrain",
            *flags(digit_llm_dir, clip_moe_dir, grids_dir, out, per_device_train_batch_size=4)]
    result = subprocess.run([*launcher, *argv], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "6 optimizer steps of 8 samples x 1 accumulation, 2 process(es) on cpu" in result.stdout
    two = torch.load(out / "mm_projector.bin", weights_only=True)
    one = torch.load(stage1.out / "mm_projector.bin", weights_only=True)
    assert all(torch.allclose(two[k], one[k], atol=1e-6) for k in one)
