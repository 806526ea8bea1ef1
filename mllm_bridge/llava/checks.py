"""Does a LLaVA checkpoint fit its vision tower? The checks behind `python -m mllm_bridge check` and `swap-tower`.

Each problem is one line saying what disagrees and what to do, so the CLI can print it as is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from encoder.tower import SELECT_FEATURES, is_clip_moe_dir
from encoder.utils.errors import UserError

from .config import LlavaCheckpointConfig, read_llava_config
from .hook import ENV_SWITCH, hook_status
from .tower_info import TowerInfo, read_tower

OURS = "CLIPMoEVisionTower (clip-moe-toolkit)"
LLAVAS = "CLIPVisionTower (LLaVA's own)"


@dataclass
class CheckReport:
    """What `check` found: description lines and problems (empty when the checkpoint and tower fit)."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def image_tokens(config: LlavaCheckpointConfig, tower: TowerInfo) -> int:
    """Image tokens the LLM receives per image: one per patch, plus the CLS token with 'cls_patch'."""
    return tower.num_patches + (1 if config.select_feature == "cls_patch" else 0)


def tower_problems(config: LlavaCheckpointConfig, tower: TowerInfo) -> list[str]:
    """Every way the checkpoint's projector, select layer/feature and context disagree with `tower`."""
    problems = []
    if config.mm_hidden_size is None:
        problems.append("config.json has no mm_hidden_size, so LLaVA cannot build its projector; this is not a "
                        "trained LLaVA checkpoint (run stage 1 first)")
    elif config.mm_hidden_size != tower.hidden_size:
        problems.append(
            f"mm_hidden_size is {config.mm_hidden_size} but the tower's hidden size is {tower.hidden_size}: "
            f"the projector takes {config.mm_hidden_size}-wide features, so it must be retrained for this tower "
            f"(stage 1 with --vision_tower {tower.path})"
        )
    return problems + _select_problems(config, tower) + _image_problems(config, tower)


def _select_problems(config: LlavaCheckpointConfig, tower: TowerInfo) -> list[str]:
    problems = []
    layer, states = config.select_layer, tower.num_layers + 1
    if layer is None:
        problems.append("config.json has no mm_vision_select_layer, which LLaVA requires; set it "
                        "(--select-layer; LLaVA-1.5 uses -2, the penultimate block)")
    elif isinstance(layer, bool) or not isinstance(layer, int) or not -states <= layer < states:
        problems.append(f"mm_vision_select_layer {layer!r} does not index the tower's {states} hidden states "
                        f"(valid: {-states}..{states - 1}; -2 = the penultimate block)")
    if config.select_feature not in SELECT_FEATURES:
        problems.append(f"mm_vision_select_feature {config.select_feature!r} is unknown to LLaVA; "
                        "use 'patch' (drops the CLS token) or 'cls_patch'")
    return problems


def _image_problems(config: LlavaCheckpointConfig, tower: TowerInfo) -> list[str]:
    problems = []
    if tower.image_size % tower.patch_size:
        problems.append(f"the tower's image size {tower.image_size} is not a multiple of its patch size "
                        f"{tower.patch_size}; re-export the tower")
    processor = tower.processor
    if processor is None:
        problems.append(f"{tower.path} has no image processor (preprocessor_config.json), which LLaVA loads "
                        "from the tower directory; save one with the tower")
    elif (processor.crop_height, processor.crop_width) != (tower.image_size, tower.image_size):
        problems.append(f"the image processor crops to {processor.crop_height}x{processor.crop_width} but the "
                        f"tower takes {tower.image_size}x{tower.image_size} images; fix crop_size in "
                        f"{tower.path}/preprocessor_config.json")
    tokens, context = image_tokens(config, tower), config.context_length
    if context is not None and tokens >= context:
        problems.append(f"{tokens} image tokens per image do not fit the language model's {context}-token "
                        "context; use a tower with fewer patches")
    return problems


def llava_tower_class(name: str | None) -> tuple[str, str | None]:
    """The tower class LLaVA builds for `name` in this environment, and the problem with that, if any."""
    if is_clip_moe_dir(name):
        active, why = hook_status()
        if active:
            return OURS, None
        return LLAVAS, (f"{name} is a CLIP-MoE but the LLaVA hook is off ({why}): LLaVA would load it as a "
                        f"dense CLIP without its experts; unset {ENV_SWITCH} or call mllm_bridge.install_llava_hook()")
    if name is not None and (os.path.exists(name) or name.startswith(("openai", "laion")) or "ShareGPT4V" in name):
        return LLAVAS, None
    return "none", (f"LLaVA raises 'Unknown vision tower: {name}': no such path; point mm_vision_tower at the "
                    "tower directory (python -m mllm_bridge swap-tower)")


def check_llava_dir(directory: str | Path) -> CheckReport:
    """Describe a LLaVA checkpoint's tower as LLaVA will load it, and list every mismatch."""
    config = read_llava_config(directory)
    report = CheckReport()
    report.lines.append(f"LLaVA checkpoint: {config.directory} (model name {config.model_name!r})")
    if "llava" not in config.model_name.lower():
        report.problems.append(f"the model name {config.model_name!r} lacks 'llava': LLaVA's load_pretrained_model "
                               "(and lmms-eval's llava model) would load a plain language model; rename the directory")
    tower_class, problem = llava_tower_class(config.vision_tower)
    active, why = hook_status()
    report.lines += [f"  vision tower:    {config.vision_tower}",
                     f"  LLaVA builds:    {tower_class}",
                     f"  LLaVA hook:      {'on' if active else 'off'} ({why})"]
    if problem:
        report.problems.append(problem)
    try:
        tower = read_tower(config.vision_tower)
    except UserError as err:
        report.problems.append(str(err))
        return report
    processor = tower.processor.describe() if tower.processor else "none"
    report.lines += [
        f"  tower:           {tower.kind}, {tower.moe_layout()}",
        f"  hidden size:     tower {tower.hidden_size}, mm_hidden_size {config.mm_hidden_size}",
        f"  select:          layer {config.select_layer} of {tower.num_layers + 1} hidden states, "
        f"feature {config.select_feature!r} -> {image_tokens(config, tower)} image tokens",
        f"  image:           {tower.image_size}x{tower.image_size}, patch {tower.patch_size} "
        f"({tower.num_patches_per_side}x{tower.num_patches_per_side} patches)",
        f"  image processor: {processor}",
        f"  projector:       {config.projector_type}",
    ]
    report.problems += tower_problems(config, tower)
    return report


def run_check(args) -> int:
    """`python -m mllm_bridge check`: print the report; exit status 1 when a mismatch was found."""
    report = check_llava_dir(args.llava_dir)
    print("\n".join(report.lines))
    if not report.problems:
        print("mismatches: none")
        return 0
    print(f"mismatches ({len(report.problems)}):")
    print("\n".join(f"  - {problem}" for problem in report.problems))
    return 1
