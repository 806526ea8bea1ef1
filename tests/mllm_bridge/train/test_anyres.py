"""LLaVA-1.6 training flags: stage 1 and stage 2 train with --image_aspect_ratio anyres --mm_patch_merge_type
spatial_unpad on images of two shapes, the outputs carry LLaVA's config keys and image_newline, a training batch
embeds exactly as llava-torch's own process_images + prepare_inputs_labels_for_multimodal do, and the output loads
and generates with llava-torch's load_pretrained_model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import SHAPES, write_shaped_grids
from encoder.utils.errors import UserError
from mllm_bridge.llava.image_tokens import ImageLayout
from mllm_bridge.train.arguments import split_arguments
from mllm_bridge.train.cli import build_parser, main
from mllm_bridge.train.data import modality_lengths, read_llava_samples
from mllm_bridge.train.run import prepare_run

PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
ANYRES = dict(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad", image_grid_pinpoints="(1x1),...,(2x2)")


@pytest.fixture(scope="module")
def shaped_data(tmp_path_factory, grids_dir) -> Path:
    """The digit grids' first 12 caption and QA records, their images resized to three shapes in turn."""
    return write_shaped_grids(grids_dir, tmp_path_factory.mktemp("anyres-data"), "train.json", "train_qa.json",
                              limit=12)


def flags(llm, tower, data, out, data_file, **extra) -> list[str]:
    values = dict(model_name_or_path=llm, vision_tower=tower, data_path=data / data_file, image_folder=data,
                  output_dir=out, per_device_train_batch_size=3, max_steps=2, learning_rate=1e-3,
                  save_strategy="no", report_to="none", seed=0, model_max_length=256, **ANYRES)
    values.update(extra)
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def test_stage_1_and_2_train_anyres_and_load_in_llava(tmp_path, digit_llm_dir, clip_moe_dir, shaped_data):
    stage1, stage2 = tmp_path / "llava-anyres-pretrain", tmp_path / "llava-anyres"
    assert main(["pretrain", *flags(digit_llm_dir, clip_moe_dir, shaped_data, stage1, "train.json")]) == 0
    config = json.loads((stage1 / "config.json").read_text())
    assert (config["image_aspect_ratio"], config["mm_patch_merge_type"]) == ("anyres", "spatial_unpad")
    assert config["image_grid_pinpoints"] == PINPOINTS  # the range form expanded: llava-torch parses only lists

    finetune = flags(digit_llm_dir, clip_moe_dir, shaped_data, stage2, "train_qa.json",
                     pretrain_mm_mlp_adapter=stage1 / "mm_projector.bin", group_by_modality_length=True)
    assert main(["finetune", *finetune]) == 0
    config = json.loads((stage2 / "config.json").read_text())
    assert config["image_grid_pinpoints"] == PINPOINTS and config["mm_patch_merge_type"] == "spatial_unpad"
    weights = {k: v for f in stage2.glob("*.safetensors") for k, v in load_file(f).items()}
    assert weights["model.image_newline"].shape == (32,)
    losses = [json.loads(line)["loss"] for line in (stage2 / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))

    from llava.mm_utils import process_images
    from llava.model.builder import load_pretrained_model

    _, model, processor, _ = load_pretrained_model(str(stage2), None, stage2.name, device_map="cpu",
                                                           device="cpu")
    images = [Image.new("RGB", size, (90, 20, 200)) for size in SHAPES]
    pixels = process_images(images, processor, model.config)
    assert isinstance(pixels, list)  # three shapes, three crop counts
    ids = torch.tensor([[1, -200, 5, 6]] * 3)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), images=[p.half() for p in pixels],
                         image_sizes=[im.size for im in images], max_new_tokens=2, do_sample=False)
    assert out.shape[0] == 3


def test_a_training_batch_embeds_as_llavas_own_path(tmp_path, digit_llm_dir, clip_moe_dir, shaped_data):
    from llava.mm_utils import process_images

    out = tmp_path / "llava-anyres-batch"
    args = split_arguments(build_parser().parse_args(["finetune", *flags(digit_llm_dir, clip_moe_dir, shaped_data, out,
                                                                         "train_qa.json")]))
    trainer, _ = prepare_run(args)
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    dataset = trainer.loader.dataset
    indices = [0, 1, 2, 4]  # shapes 32x32, 64x32, 32x64, 64x32
    batch = trainer.loader.collate_fn([dataset[i] for i in indices])
    images = [Image.open(dataset.samples[i].image).convert("RGB") for i in indices]
    assert isinstance(batch["images"], list) and batch["image_sizes"] == [im.size for im in images]
    expected = process_images(images, dataset.image_processor, model.config)

    def embed(pixels, sizes):
        with torch.no_grad():
            return model.prepare_inputs_labels_for_multimodal(batch["input_ids"], None, batch["attention_mask"], None,
                                                              batch["labels"], pixels, sizes)

    ours, llavas = embed(batch["images"], batch["image_sizes"]), embed(expected, [im.size for im in images])
    assert torch.equal(ours[4], llavas[4]) and torch.equal(ours[5], llavas[5]) and torch.equal(ours[2], llavas[2])
    lengths = ours[2].sum(1).tolist()
    assert lengths == [len(dataset[i]["input_ids"]) - 1 + dataset.layout.count(im.size)
                       for i, im in zip(indices, images)]


@pytest.mark.parametrize("extra, message", [
    (dict(image_grid_pinpoints=""), "--image_aspect_ratio anyres needs --image_grid_pinpoints"),
    (dict(image_aspect_ratio="pad"), "--mm_patch_merge_type spatial_unpad lays out anyres crops; with "
                                     "--image_aspect_ratio pad every image is one crop"),
    (dict(image_grid_pinpoints="[[32, 48]]"),
     r"--image_grid_pinpoints \[\[32, 48\]\] are not multiples of the tower's image size 32"),
])
def test_bad_anyres_flags_are_one_line_and_write_nothing(tmp_path, digit_llm_dir, clip_moe_dir, shaped_data,
                                                         extra, message):
    out = tmp_path / "llava-bad"
    with pytest.raises(UserError, match=message) as err:
        prepare_run(split_arguments(build_parser().parse_args(
            ["finetune", *flags(digit_llm_dir, clip_moe_dir, shaped_data, out, "train_qa.json", **extra)])))
    assert "\n" not in str(err.value) and not out.exists()


def test_grouping_lengths_count_each_images_tokens_under_anyres(shaped_data):
    samples = read_llava_samples(shaped_data / "train_qa.json", shaped_data, "v1")
    layout = ImageLayout.from_config({"image_aspect_ratio": "anyres", "image_grid_pinpoints": PINPOINTS,
                                      "mm_patch_merge_type": "spatial_unpad"}, 32, 8)
    words = modality_lengths(samples)
    lengths = modality_lengths(samples, layout)
    assert lengths == [w + layout.count(SHAPES[i % 3]) for i, w in enumerate(words)]
    assert len({b - a for a, b in zip(words, lengths)}) == 3  # three shapes, three image token counts
    assert modality_lengths(samples, ImageLayout.from_config({"image_aspect_ratio": "pad"}, 32, 8)) == words
