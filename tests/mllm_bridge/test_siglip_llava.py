"""A SigLIP-MoE tower through the whole LLaVA bridge, as a CLIP-MoE goes today: llava-torch builds and loads it
(through the hook), `python -m mllm_bridge check | swap-tower`, LLaVA stage 1 and stage 2, and the lmms-eval model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import SiglipImageProcessor, SiglipVisionModel

from conftest import save_tiny_llava
from encoder import CLIPMoEVisionTower
from encoder.siglip import SiglipMoEVisionModel
from mllm_bridge.cli import main as bridge_main
from mllm_bridge.train.cli import main as train_main


@pytest.fixture(scope="module")
def llava_siglip_dir(tmp_path_factory, siglip_moe_dir, llama_tokenizer):
    """A saved LLaVA-1.5-style checkpoint (tiny Llama, mlp2x_gelu projector) whose tower is `siglip_moe_dir`."""
    return save_tiny_llava(tmp_path_factory.mktemp("checkpoints") / "llava-tiny-siglip-moe", siglip_moe_dir,
                           llama_tokenizer)


def square_image(seed: int = 0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy())


def test_llavas_loader_builds_the_siglip_moe_tower_and_generates(llava_siglip_dir, siglip_moe_dir):
    from llava.mm_utils import process_images
    from llava.model.builder import load_pretrained_model

    _, model, processor, _ = load_pretrained_model(str(llava_siglip_dir), None, llava_siglip_dir.name,
                                                   device_map="cpu", device="cpu")
    tower = model.get_vision_tower()
    assert type(tower) is CLIPMoEVisionTower and tower.is_loaded and tower.family.name == "siglip"
    assert type(tower.vision_tower) is SiglipMoEVisionModel and type(processor) is SiglipImageProcessor
    assert processor is tower.image_processor and model.config.mm_hidden_size == 32
    model = model.float().eval()
    px = process_images([square_image()], processor, model.config)
    with torch.no_grad():
        features = model.encode_images(px)
        # LLaVA's loader keeps the tower in fp16: the same weights, rounded like them
        reference = SiglipMoEVisionModel.from_pretrained(siglip_moe_dir).half().float().eval()
        states = reference(px, output_hidden_states=True)
    assert features.shape == (1, 16, 32)  # every patch token: no CLS token dropped
    torch.testing.assert_close(features, model.get_model().mm_projector(states.hidden_states[-2]), atol=1e-6, rtol=1e-6)
    out = model.generate(torch.tensor([[1, -200, 5, 6]]), images=px, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 3)


def test_a_dense_siglip_directory_gets_our_tower_not_a_clip(dense_siglip_dir, llama_tokenizer):
    from mllm_bridge.embedded.tiny_lm import tiny_llama_config
    from mllm_bridge.llava.model import build_llava_model

    model = build_llava_model(tiny_llama_config(llama_tokenizer, hidden_size=32), dense_siglip_dir)
    tower = model.get_vision_tower()
    assert type(tower) is CLIPMoEVisionTower and type(tower.vision_tower) is SiglipVisionModel
    assert tower.image_processor.crop_size["height"] == 32  # given what LLaVA reads, though the file has no crop_size


@pytest.mark.parametrize("feature", ["patch", "cls_patch"])
def test_check_accepts_the_siglip_moe_checkpoint(llava_siglip_dir, tmp_path, capsys, feature):
    copy = tmp_path / "llava-copy"
    copy.mkdir()
    config = json.loads((llava_siglip_dir / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "mm_vision_select_feature": feature}))
    assert bridge_main(["check", str(copy)]) == 0
    out = capsys.readouterr().out
    for line in ["CLIPMoEVisionTower (clip-moe-toolkit)", "SigLIP-MoE, top-2 of 4 experts in layers [0, 1, 2] of 3",
                 f"feature '{feature}' -> 16 image tokens", "resize to 32x32, crop 32x32", "mismatches: none"]:
        assert line in out, out


def test_swap_tower_points_a_clip_moe_checkpoint_at_a_siglip_moe(llava_config_dir, siglip_moe_dir, capsys):
    assert bridge_main(["swap-tower", str(llava_config_dir), "--tower", str(siglip_moe_dir)]) == 0
    config = json.loads((llava_config_dir / "config.json").read_text())
    assert config["mm_vision_tower"] == str(siglip_moe_dir.resolve())
    capsys.readouterr()
    assert bridge_main(["check", str(llava_config_dir)]) == 0
    assert "SigLIP-MoE" in capsys.readouterr().out


def test_swap_tower_refuses_a_siglip2_tower_in_one_line(llava_config_dir, siglip_towers, tmp_path, capsys):
    siglip2 = siglip_towers.save_siglip2_moe(tmp_path / "siglip2-moe")
    before = (llava_config_dir / "config.json").read_bytes()
    assert bridge_main(["swap-tower", str(llava_config_dir), "--tower", str(siglip2)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SigLIP2" in err, err
    assert (llava_config_dir / "config.json").read_bytes() == before


def flags(llm, tower, data, out, data_file="train.json", **extra) -> list[str]:
    values = dict(model_name_or_path=llm, vision_tower=tower, data_path=data / data_file, image_folder=data,
                  output_dir=out, per_device_train_batch_size=8, max_steps=4, learning_rate=1e-2,
                  gradient_checkpointing=False, save_strategy="no", report_to="none", seed=0)
    values.update(extra)
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def stages(tmp_path_factory, digit_llm_dir, siglip_moe_dir, grids_dir):
    """Stage 1 (4 steps) then stage 2 (2 steps) over the SigLIP-MoE tower."""
    root = tmp_path_factory.mktemp("siglip-runs")
    stage1, stage2 = root / "llava-siglip-pretrain", root / "llava-siglip-finetune"
    assert train_main(["pretrain", *flags(digit_llm_dir, siglip_moe_dir, grids_dir, stage1)]) == 0
    assert train_main(["finetune", *flags(digit_llm_dir, siglip_moe_dir, grids_dir, stage2, data_file="train_qa.json",
                                          pretrain_mm_mlp_adapter=stage1 / "mm_projector.bin", learning_rate=1e-3,
                                          max_steps=2)]) == 0
    return stage1, stage2


def test_stage1_and_stage2_train_over_the_siglip_moe_and_load_in_llava(stages, siglip_moe_dir):
    from llava.mm_utils import process_images
    from llava.model.builder import load_pretrained_model

    stage1, stage2 = stages
    config = json.loads((stage1 / "config.json").read_text())
    assert config["mm_vision_tower"] == str(siglip_moe_dir) and config["mm_hidden_size"] == 32
    losses = [json.loads(line)["loss"] for line in (stage1 / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert sorted(torch.load(stage1 / "mm_projector.bin", weights_only=True)) == [
        "model.mm_projector.0.bias", "model.mm_projector.0.weight",
        "model.mm_projector.2.bias", "model.mm_projector.2.weight"]

    _, model, processor, _ = load_pretrained_model(str(stage2), None, stage2.name, device_map="cpu", device="cpu")
    tower = model.get_vision_tower()
    assert type(tower) is CLIPMoEVisionTower and type(tower.vision_tower) is SiglipMoEVisionModel
    assert type(processor) is SiglipImageProcessor
    px = process_images([square_image()], processor, model.config).half()
    out = model.generate(torch.tensor([[1, -200, 5, 6]]), images=px, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 2)
    assert bridge_main(["check", str(stage2)]) == 0


def test_the_lmms_eval_model_answers_and_counts_every_patch_token(llava_siglip_dir, digit_task_dir, tmp_path):
    from datasets import load_dataset
    from lmms_eval.api.instance import Instance

    from mllm_bridge.lmms.model import LlavaCLIPMoE
    from mllm_bridge.lmms.tasks.digit_grids import utils

    task, split = "digit_grids_qa", "test"
    files = {split: str(digit_task_dir / "digit_grids.parquet")}
    data = load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "hf-datasets"))[split]
    docs = [data[i] for i in range(3)]
    usage_file = tmp_path / "usage.json"
    lm = LlavaCLIPMoE(pretrained=str(llava_siglip_dir), device="cpu", batch_size=3, expert_usage=str(usage_file))
    lm.task_dict = {task: {split: docs}}
    greedy = {"max_new_tokens": 4, "temperature": 0, "do_sample": False}
    requests = [Instance("generate_until", (utils.doc_to_text(d), greedy, utils.doc_to_visual, i, task, split), idx=0,
                         metadata={"task": task, "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]
    answers = lm.generate_until(requests)
    lm.clean()
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    usage = json.loads(usage_file.read_text())
    assert usage["moe_layers"] == [0, 1, 2] and usage["all"]["images"] == 3
    assert [layer["tokens"] for layer in usage["all"]["layers"]] == [3 * 16] * 3  # 16 patches, no CLS token


def test_a_copy_of_the_checkpoint_with_the_tower_moved_is_one_line(llava_siglip_dir, tmp_path, capsys):
    copy = tmp_path / "llava-moved"
    copy.mkdir()
    shutil.copy(llava_siglip_dir / "config.json", copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "mm_vision_tower": str(tmp_path / "gone")}))
    assert bridge_main(["check", str(copy)]) == 1
    assert "Unknown vision tower" in capsys.readouterr().out


@pytest.mark.parametrize("which", ["moe", "dense"])
def test_stage2_trains_the_siglip_tower_and_llava_loads_the_trained_one(which, tmp_path, digit_llm_dir, siglip_moe_dir,
                                                                       dense_siglip_dir, grids_dir, capsys):
    """The tower trains up to the selected hidden state (its later block, post-layernorm and SigLIP's pooling head
    reach no feature and stay frozen; DDP would fail on them), with the router losses for a SigLIP-MoE, and is saved
    as a tower directory that LLaVA, the hook and `check` load."""
    from llava.model.builder import load_pretrained_model

    from mllm_bridge.train.arguments import split_arguments
    from mllm_bridge.train.cli import build_parser
    from mllm_bridge.train.run import prepare_run

    tower_dir = siglip_moe_dir if which == "moe" else dense_siglip_dir
    out = tmp_path / "llava-siglip-tower"
    extra = dict(balance_loss_coef=0.5) if which == "moe" else {}
    argv = ["finetune", *flags(digit_llm_dir, tower_dir, grids_dir, out, data_file="train_qa.json", max_steps=2,
                               unfreeze_mm_vision_tower=True, mm_vision_tower_lr=5e-3, **extra)]
    trainer, _ = prepare_run(split_arguments(build_parser().parse_args(argv)))
    inner = trainer.accelerator.unwrap_model(trainer.model).get_vision_tower().vision_tower
    vision = getattr(inner, "vision_model", inner)
    assert all(p.requires_grad for layer in vision.encoder.layers[:2] for p in layer.parameters())
    frozen = [*vision.encoder.layers[2].parameters(), *vision.post_layernorm.parameters(), *vision.head.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    trainer.train()

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if which == "moe":
        assert all(line["vision_load_balance_loss"] > 0 for line in lines)
        assert all(line["loss"] == pytest.approx(line["lm_loss"] + 0.5 * line["vision_load_balance_loss"]
                                                 + 0.001 * line["vision_router_z_loss"], rel=1e-5) for line in lines)
    saved = type(inner).from_pretrained(out / "vision_tower").state_dict()
    trained, original = inner.state_dict(), type(inner).from_pretrained(tower_dir).state_dict()
    assert set(saved) == set(trained) and all(torch.equal(saved[k], trained[k]) for k in trained)
    assert any(not torch.equal(saved[k], original[k]) for k in saved)  # it trained
    _, loaded, processor, _ = load_pretrained_model(str(out), None, out.name, device_map="cpu", device="cpu")
    tower = loaded.get_vision_tower()
    assert type(tower) is CLIPMoEVisionTower and tower.family.name == "siglip" and tower.is_moe == (which == "moe")
    assert type(processor) is SiglipImageProcessor
    state = tower.vision_tower.state_dict()
    assert all(torch.equal(state[k].float(), trained[k].half().float()) for k in trained)  # the builder loads fp16
    capsys.readouterr()
    assert bridge_main(["check", str(out)]) == 0, capsys.readouterr().out


def test_init_llava_around_a_siglip_moe_writes_a_checkpoint_check_accepts(siglip_moe_dir, digit_llm_dir, tmp_path,
                                                                          capsys):
    out = tmp_path / "llava-init-siglip"
    assert bridge_main(["init-llava", "--tower", str(siglip_moe_dir), "--llm", str(digit_llm_dir), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["mm_vision_tower"] == str(siglip_moe_dir.resolve()) and config["mm_hidden_size"] == 32
    capsys.readouterr()
    assert bridge_main(["check", str(out)]) == 0
    assert "SigLIP-MoE" in capsys.readouterr().out


def test_anyres_spatial_unpad_over_a_siglip_moe_embeds_as_llava_counts(tmp_path, digit_llm_dir, siglip_moe_dir,
                                                                       grids_dir):
    """LLaVA-1.6's anyres with the crops' patches laid out as a grid: a SigLIP gives exactly side x side tokens per
    crop, with 'cls_patch' too (it has no CLS token to keep), so the grid layout is allowed and every sample's
    length is the layout's count; two steps train and the output generates in LLaVA."""
    from conftest import write_shaped_grids
    from llava.model.builder import load_pretrained_model
    from PIL import Image

    from mllm_bridge.train.arguments import split_arguments
    from mllm_bridge.train.cli import build_parser
    from mllm_bridge.train.run import prepare_run

    data = write_shaped_grids(grids_dir, tmp_path / "shaped", "train_qa.json", limit=6)
    out = tmp_path / "llava-siglip-anyres"
    argv = ["finetune", *flags(digit_llm_dir, siglip_moe_dir, data, out, data_file="train_qa.json", max_steps=2,
                               per_device_train_batch_size=3, model_max_length=256, image_aspect_ratio="anyres",
                               mm_patch_merge_type="spatial_unpad", image_grid_pinpoints="(1x1),...,(2x2)",
                               mm_vision_select_feature="cls_patch")]
    trainer, _ = prepare_run(split_arguments(build_parser().parse_args(argv)))
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    dataset = trainer.loader.dataset
    assert dataset.layout.patches_per_crop == 16  # no CLS token counted
    batch = trainer.loader.collate_fn([dataset[i] for i in range(3)])
    with torch.no_grad():
        embedded = model.prepare_inputs_labels_for_multimodal(batch["input_ids"], None, batch["attention_mask"], None,
                                                              batch["labels"], batch["images"], batch["image_sizes"])
    sizes = [Image.open(dataset.samples[i].image).size for i in range(3)]
    assert embedded[2].sum(1).tolist() == [len(dataset[i]["input_ids"]) - 1 + dataset.layout.count(size)
                                           for i, size in enumerate(sizes)]
    trainer.train()

    _, loaded, processor, _ = load_pretrained_model(str(out), None, out.name, device_map="cpu", device="cpu")
    pixels, image_sizes = dataset.layout.pixels([Image.open(dataset.samples[i].image).convert("RGB")
                                                 for i in range(3)], processor)
    ids = torch.tensor([[1, -200, 5, 6]] * 3)
    generated = loaded.generate(ids, attention_mask=torch.ones_like(ids), images=[p.half() for p in pixels],
                                image_sizes=image_sizes, max_new_tokens=2, do_sample=False)
    assert generated.shape[0] == 3
