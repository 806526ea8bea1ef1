"""LLaVA-1.5's own training command lines (`scripts/v1_5/pretrain.sh`, `finetune.sh`), flag for flag, on the CPU:
they parse to LLaVA's typed values and both stages run with every flag honoured or noted in one line.

The flag lists below are copied verbatim from LLaVA (only the `deepspeed llava/train/train_mem.py` launcher is
dropped). Instead of editing their paths, the tests run in a folder where those very relative paths hold tiny
local stand-ins (`lmsys/vicuna-13b-v1.5` = the tiny Llama, `openai/clip-vit-large-patch14-336` = a tiny CLIP-MoE,
`playground/data/...` = digit grids, `scripts/zero*.json` = DeepSpeed configs); `--max_steps` keeps them short.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO_ROOT

from encoder.utils.errors import UserError
from mllm_bridge.train import loop
from mllm_bridge.train import run as run_module
from mllm_bridge.train.arguments import accepted_only_notes, split_arguments
from mllm_bridge.train.cli import build_parser, main
from mllm_bridge.train.model_setup import is_gradient_checkpointing
from mllm_bridge.train.run import cpu_runs_bf16, prepare_run
from mllm_bridge.train.sampler import ModalityLengthBatchSampler

ROOT = REPO_ROOT

PRETRAIN_SH = """
--deepspeed ./scripts/zero2.json --model_name_or_path lmsys/vicuna-13b-v1.5 --version plain
--data_path ./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json --image_folder
./playground/data/LLaVA-Pretrain/images --vision_tower openai/clip-vit-large-patch14-336
--mm_projector_type mlp2x_gelu --tune_mm_mlp_adapter True --mm_vision_select_layer -2
--mm_use_im_start_end False --mm_use_im_patch_token False --bf16 True --output_dir
./checkpoints/llava-v1.5-13b-pretrain --num_train_epochs 1 --per_device_train_batch_size 32
--per_device_eval_batch_size 4 --gradient_accumulation_steps 1 --evaluation_strategy "no"
--save_strategy "steps" --save_steps 24000 --save_total_limit 1 --learning_rate 1e-3 --weight_decay 0.
--warmup_ratio 0.03 --lr_scheduler_type "cosine" --logging_steps 1 --tf32 True --model_max_length 2048
--gradient_checkpointing True --dataloader_num_workers 4 --lazy_preprocess True --report_to wandb
"""

FINETUNE_SH = """
--deepspeed ./scripts/zero3.json --model_name_or_path lmsys/vicuna-13b-v1.5 --version v1
--data_path ./playground/data/llava_v1_5_mix665k.json --image_folder ./playground/data --vision_tower
openai/clip-vit-large-patch14-336 --pretrain_mm_mlp_adapter
./checkpoints/llava-v1.5-13b-pretrain/mm_projector.bin --mm_projector_type mlp2x_gelu
--mm_vision_select_layer -2 --mm_use_im_start_end False --mm_use_im_patch_token False
--image_aspect_ratio pad --group_by_modality_length True --bf16 True --output_dir
./checkpoints/llava-v1.5-13b --num_train_epochs 1 --per_device_train_batch_size 16
--per_device_eval_batch_size 4 --gradient_accumulation_steps 1 --evaluation_strategy "no"
--save_strategy "steps" --save_steps 50000 --save_total_limit 1 --learning_rate 2e-5 --weight_decay 0.
--warmup_ratio 0.03 --lr_scheduler_type "cosine" --logging_steps 1 --tf32 True --model_max_length 2048
--gradient_checkpointing True --dataloader_num_workers 4 --lazy_preprocess True --report_to wandb
"""

# LLaVA's scripts/zero3.json, as far as this loop reads it (its ZeRO stage).
ZERO3 = {"bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
         "gradient_accumulation_steps": "auto",
         "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                               "stage3_gather_16bit_weights_on_model_save": True}}


def parse(stage: str, text: str, *extra: str):
    return split_arguments(build_parser().parse_args([stage, *shlex.split(text), *extra]))


def run(argv) -> int:
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def bad_run(capsys, argv) -> str:
    """The one error line of a run that must stop with exit status 2."""
    assert run(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1
    return lines[-1]


def test_llavas_flags_parse_to_llavas_typed_values():
    p = parse("pretrain", PRETRAIN_SH)
    m, d, t = p.model, p.data, p.training
    typed = [(m.mm_vision_select_layer, -2), (t.learning_rate, 1e-3), (t.weight_decay, 0.0), (t.warmup_ratio, 0.03),
             (t.num_train_epochs, 1.0), (t.per_device_train_batch_size, 32), (t.save_steps, 24000),
             (t.save_total_limit, 1), (t.model_max_length, 2048), (t.dataloader_num_workers, 4), (t.logging_steps, 1)]
    for value, expected in typed:
        assert value == expected and type(value) is type(expected), (value, expected)
    assert [m.tune_mm_mlp_adapter, m.mm_use_im_start_end, m.mm_use_im_patch_token] == [True, False, False]
    assert [t.bf16, t.tf32, t.gradient_checkpointing, d.lazy_preprocess] == [True, True, True, True]
    assert (m.version, m.mm_projector_type, t.lr_scheduler_type, t.save_strategy, t.evaluation_strategy) == (
        "plain", "mlp2x_gelu", "cosine", "steps", "no")
    assert t.report_to == ["wandb"] and t.deepspeed == "./scripts/zero2.json"
    assert m.vision_tower == "openai/clip-vit-large-patch14-336" and t.max_steps == -1

    f = parse("finetune", FINETUNE_SH)
    assert f.model.mm_vision_select_layer == -2 and type(f.model.mm_vision_select_layer) is int
    assert f.training.learning_rate == 2e-5 and f.training.per_device_train_batch_size == 16
    assert f.training.group_by_modality_length is True and f.data.image_aspect_ratio == "pad"
    assert f.model.version == "v1" and f.model.tune_mm_mlp_adapter is False  # finetune's stage default
    assert f.model.pretrain_mm_mlp_adapter == "./checkpoints/llava-v1.5-13b-pretrain/mm_projector.bin"
    # Every flag is honoured except the eval batch size (LLaVA itself never evaluates with these scripts).
    assert accepted_only_notes(f) == ["--per_device_eval_batch_size 4: accepted, but there is no evaluation "
                                      "(LLaVA-1.5 trains with --evaluation_strategy no)"]


def test_ignored_values_get_a_note_and_honoured_ones_none():
    base = "--model_name_or_path m --vision_tower v --data_path d --output_dir o"
    assert accepted_only_notes(parse("pretrain", base)) == []
    assert accepted_only_notes(parse("pretrain", base + " --lazy_preprocess True --remove_unused_columns False")) == []
    notes = accepted_only_notes(parse("pretrain", base + " --lazy_preprocess False --is_multimodal False"))
    assert notes == ["--lazy_preprocess False: accepted, but data is always processed lazily, per sample in the "
                     "DataLoader", "--is_multimodal False: accepted, but training is always multimodal"]


def test_deepspeed_configs_are_noted_as_ignored_in_one_process_without_a_launcher(tmp_path, monkeypatch):
    from accelerate.utils import DistributedType

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one_cpu = SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1, device=torch.device("cpu"))
    (tmp_path / "zero3.json").write_text(json.dumps(ZERO3))
    base = "--model_name_or_path m --vision_tower v --data_path d --output_dir o --deepspeed "
    args = {name: parse("finetune", base + str(tmp_path / name)) for name in ("zero3.json", "missing.json")}
    notes = {name: run_module._deepspeed_notes(a, one_cpu) for name, a in args.items()}
    assert notes["zero3.json"][0].endswith("is ignored: one process started without a launcher trains alone; start "
                                           "it with `deepspeed`, `torchrun` or `accelerate launch` to train under "
                                           "DeepSpeed")
    assert notes["missing.json"][0].endswith("under DeepSpeed (the file does not exist either)")
    assert all(run_module.deepspeed_config(a) is None for a in args.values())  # plain python: DDP as noted


def test_deepspeed_in_a_launched_run_is_honoured_or_refused_in_one_line(tmp_path, monkeypatch):
    """Under a launcher (deepspeed, torchrun, accelerate launch: WORLD_SIZE set), --deepspeed CONFIG trains under
    DeepSpeed, as LLaVA's HF Trainer does; a missing file or a missing DeepSpeed stops before anything loads."""
    import importlib.util

    monkeypatch.setenv("WORLD_SIZE", "2")
    (tmp_path / "zero3.json").write_text(json.dumps(ZERO3))
    base = "--model_name_or_path m --vision_tower v --data_path d --output_dir o --deepspeed "
    assert run_module.deepspeed_config(parse("finetune", base + str(tmp_path / "zero3.json"))) == str(
        tmp_path / "zero3.json")
    with pytest.raises(UserError, match=r"--deepspeed .*missing.json: no such file; LLaVA's configs are "
                                        r"scripts/zero2.json and scripts/zero3.json"):
        run_module.deepspeed_config(parse("finetune", base + str(tmp_path / "missing.json")))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(UserError, match=r"DeepSpeed is not installed here; pip install 'clip-moe-toolkit\[deepspeed\]'"):
        run_module.deepspeed_config(parse("finetune", base + str(tmp_path / "zero3.json")))


@pytest.fixture
def llava_tree(tmp_path, monkeypatch, digit_llm_dir, clip_moe_dir, grids_dir):
    """A working directory in which LLaVA's relative paths exist, holding tiny stand-ins; W&B without an account."""
    (tmp_path / "lmsys").mkdir()
    (tmp_path / "lmsys" / "vicuna-13b-v1.5").symlink_to(digit_llm_dir)
    (tmp_path / "openai").mkdir()
    (tmp_path / "openai" / "clip-vit-large-patch14-336").symlink_to(clip_moe_dir)
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "zero2.json", tmp_path / "scripts" / "zero2.json")
    (tmp_path / "scripts" / "zero3.json").write_text(json.dumps(ZERO3, indent=4))
    pretrain = tmp_path / "playground" / "data" / "LLaVA-Pretrain"
    pretrain.mkdir(parents=True)
    (pretrain / "images").symlink_to(grids_dir / "images")
    captions = json.loads((grids_dir / "train.json").read_text())
    for record in captions:  # LCS-558K's image paths are relative to its images/ folder
        record["image"] = Path(record["image"]).name
    (pretrain / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(captions))
    (tmp_path / "playground" / "data" / "images").symlink_to(grids_dir / "images")
    (tmp_path / "playground" / "data" / "llava_v1_5_mix665k.json").write_text(json.dumps(mixed_records(grids_dir)))
    monkeypatch.chdir(tmp_path)
    for name in ("WANDB_MODE", "WANDB_API_KEY"):  # set then deleted: restored to the caller's state afterwards
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def mixed_records(grids_dir: Path) -> list[dict]:
    """Like llava_v1_5_mix665k.json: image conversations and text-only ones (here 96 + 32)."""
    records = json.loads((grids_dir / "train_qa.json").read_text())
    text_only = []
    for record in records[:32]:
        turns = [dict(t) for t in record["conversations"]]
        turns[0]["value"] = turns[0]["value"].replace("<image>", "").strip()
        text_only.append({"id": f"text-{record['id']}", "conversations": turns})
    return records + text_only


def test_llava_15_scripts_run_verbatim_on_the_cpu(llava_tree, monkeypatch, capsys):
    if not cpu_runs_bf16():
        pytest.skip("this CPU cannot run bf16 autocast (test_bf16_refused_where_the_cpu_cannot covers the refusal)")
    seen: list[SimpleNamespace] = []
    real_loss = loop.LlavaTrainer._loss

    def observed(self, batch):
        loss = real_loss(self, batch)
        seen.append(SimpleNamespace(
            autocast=torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"), loss=loss.item(),
            checkpointing=is_gradient_checkpointing(self.accelerator.unwrap_model(self.model)),
            sampler=type(self.sampler), workers=self.loader.num_workers, images=batch["images"].abs().sum((1, 2, 3))))
        return loss

    monkeypatch.setattr(loop.LlavaTrainer, "_loss", observed)
    for stage, text, out in (("pretrain", PRETRAIN_SH, "llava-v1.5-13b-pretrain"),
                             ("finetune", FINETUNE_SH, "llava-v1.5-13b")):
        seen.clear()
        monkeypatch.delenv("WANDB_MODE", raising=False)  # as in a new process: the note is printed again
        assert run([stage, *shlex.split(text), "--max_steps", "2"]) == 0
        printed = capsys.readouterr().out
        out = llava_tree / "checkpoints" / out
        notes = [line for line in printed.splitlines() if line.startswith("note: ")]
        deepspeed = "zero2" if stage == "pretrain" else "zero3"
        assert notes[0] == ("note: --per_device_eval_batch_size 4: accepted, but there is no evaluation (LLaVA-1.5 "
                            "trains with --evaluation_strategy no)")
        assert notes[1].startswith("note: --tf32 True only affects matmuls on NVIDIA GPUs")
        assert notes[2].startswith(f"note: --deepspeed ./scripts/{deepspeed}.json is ignored: one process started "
                                   "without a launcher")
        assert notes[3].startswith("note: --report_to wandb: no W&B API key") and len(notes) == 4
        assert os.environ["WANDB_MODE"] == "offline" and list((out / "wandb").glob("offline-run-*"))

        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
        assert len(seen) == 2 and all(s.autocast == torch.bfloat16 and s.checkpointing and s.workers == 4
                                      for s in seen)
        args = json.loads((out / "training_args.json").read_text())
        assert args["model"]["mm_vision_select_layer"] == -2 and args["training"]["model_max_length"] == 2048
        assert json.loads((out / "config.json").read_text())["image_aspect_ratio"] == (
            "square" if stage == "pretrain" else "pad")
    assert all(s.sampler is ModalityLengthBatchSampler for s in seen)
    # A micro-batch is all image samples or all text-only ones (black stand-in images).
    assert all(bool((s.images > 0).all()) or bool((s.images == 0).all()) for s in seen)
    assert torch.load(llava_tree / "checkpoints" / "llava-v1.5-13b-pretrain" / "mm_projector.bin",
                      weights_only=True)["model.mm_projector.0.weight"].dtype == torch.float32


def flags(llm, tower, data, out, data_file="train.json", **extra) -> list[str]:
    values = dict(model_name_or_path=llm, vision_tower=tower, data_path=data / data_file, image_folder=data,
                  output_dir=out, per_device_train_batch_size=8, max_steps=3, learning_rate=1e-3,
                  save_strategy="no", report_to="none", seed=0)
    values.update(extra)
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def test_gradient_checkpointing_recomputes_and_changes_no_loss(tmp_path, digit_llm_dir, clip_moe_dir, grids_dir):
    """Stage 2 (the LLM trains): with checkpointing every decoder layer runs twice per micro-batch (forward, then
    again in the backward pass), and the 3 steps' losses equal those of a run that keeps its activations."""
    results = {}
    for checkpointing in (True, False):
        out = tmp_path / f"llava-ckpt-{checkpointing}"
        argv = ["finetune", *flags(digit_llm_dir, clip_moe_dir, grids_dir, out, data_file="train_qa.json",
                                   gradient_checkpointing=checkpointing)]
        trainer, _ = prepare_run(split_arguments(build_parser().parse_args(argv)))
        model = trainer.accelerator.unwrap_model(trainer.model)
        calls = []
        # A pre-hook: the recompute stops early once it has rebuilt the last saved tensor, so the layer's last
        # module may never return a second time, but its attention is always entered again.
        model.get_model().layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
        trainer.train()
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        results[checkpointing] = SimpleNamespace(
            calls=len(calls), losses=losses, flag=is_gradient_checkpointing(model),
            llm=[layer.gradient_checkpointing for layer in model.get_model().layers],
            tower=any(getattr(m, "gradient_checkpointing", False) for m in model.get_vision_tower().modules()))
    assert results[True].flag and not results[False].flag
    assert results[True].llm == [True, True] and not results[True].tower  # the frozen tower has nothing to redo
    assert (results[True].calls, results[False].calls) == (6, 3)
    assert len(results[True].losses) == 3
    assert all(abs(a - b) < 1e-5 for a, b in zip(results[True].losses, results[False].losses))


def test_bf16_refused_where_the_cpu_cannot(tmp_path, digit_llm_dir, clip_moe_dir, grids_dir, monkeypatch, capsys):
    monkeypatch.setattr(run_module, "cpu_runs_bf16", lambda: False)
    out = tmp_path / "llava-bf16"
    err = bad_run(capsys, ["pretrain", *flags(digit_llm_dir, clip_moe_dir, grids_dir, out, bf16=True)])
    assert err == ("error: --bf16 True: this CPU cannot run bf16 autocast (a bf16 matmul failed or was wrong); pass "
                   "--bf16 False to train in fp32")
    assert not out.exists()


def test_an_unknown_tracker_is_one_line_and_writes_nothing(tmp_path, digit_llm_dir, clip_moe_dir, grids_dir, capsys):
    out = tmp_path / "llava-foo"
    err = bad_run(capsys, ["pretrain", *flags(digit_llm_dir, clip_moe_dir, grids_dir, out, report_to="foo")])
    assert err == "error: --report_to foo is not supported; use any of tensorboard, wandb, all, none"
    assert not out.exists()


def test_dataloader_workers_are_processes_and_the_dataset_pickles(tmp_path, digit_llm_dir, clip_moe_dir, grids_dir):
    argv = ["pretrain", *flags(digit_llm_dir, clip_moe_dir, grids_dir, tmp_path / "llava-w", dataloader_num_workers=4)]
    trainer, _ = prepare_run(split_arguments(build_parser().parse_args(argv)))
    dataset = trainer.loader.dataset
    copy = pickle.loads(pickle.dumps(dataset))  # what a spawn/forkserver worker receives
    assert all(torch.equal(copy[0][k], dataset[0][k]) for k in ("input_ids", "labels", "image"))
    trainer.sampler.set_epoch(0)
    batches = iter(trainer.loader)
    first = next(batches)
    workers = {w.pid for w in batches._workers}
    assert len(workers) == 4 and os.getpid() not in workers and all(w.is_alive() for w in batches._workers)
    in_process = trainer.loader.collate_fn([dataset[i] for i in next(iter(trainer.sampler))])
    assert torch.equal(first["input_ids"], in_process["input_ids"]) and torch.equal(first["images"],
                                                                                    in_process["images"])
    del batches
