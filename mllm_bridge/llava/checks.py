"""Does a LLaVA checkpoint fit its vision tower? The checks behind `python -m mllm_bridge check` and `swap-tower`.

Each problem is one line saying what disagrees and what to do, so the CLI can print it as is.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field
from pathlib import Path

from encoder.family import family_of, is_moe_dir
from encoder.tower import SELECT_FEATURES, needs_our_tower, s2_problem
from encoder.utils.errors import UserError

from .config import LlavaCheckpointConfig, read_llava_config
from .hook import ENV_SWITCH, hook_status
from .image_tokens import ImageLayout
from .tower_info import TowerInfo, read_tower

OURS = "CLIPMoEVisionTower (clip-moe-toolkit)"
LLAVAS = "CLIPVisionTower (LLaVA's own)"


@dataclass
class CheckReport:
    """What `check` found: description lines and problems (empty when the checkpoint and tower fit)."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def image_layout(config: LlavaCheckpointConfig, tower: TowerInfo) -> ImageLayout:
    """How the checkpoint turns images into tokens with `tower` (its aspect ratio, pinpoints, merge type).

    Raises ImageLayout's one-line UserError for settings the tower cannot serve (pinpoints that are not multiples
    of its image size, anyres without pinpoints, an unknown aspect ratio or merge type).
    """
    return ImageLayout.from_config(config.values, tower.image_size, tower.patch_size, tower.has_cls_token)


def image_tokens(config: LlavaCheckpointConfig, tower: TowerInfo) -> tuple[int, int]:
    """(fewest, most) image tokens the LLM receives per image. Square and pad: one per patch, plus the CLS token
    with 'cls_patch', for every image. Anyres: the count depends on the image's shape; the most is that of an image
    exactly the size of a pinpoint (the pinpoint picked for it, nothing to unpad), counted by llava-torch's own
    functions. Raises UserError as `image_layout` does."""
    layout = image_layout(config, tower)
    if not layout.variable:
        return layout.patches_per_crop, layout.patches_per_crop
    return layout.fewest_tokens(), max(layout.count((w, h)) for w, h in layout.grid_pinpoints)


def describe_tokens(tokens: tuple[int, int]) -> str:
    """'16' for a fixed count, '16..88' for a range."""
    fewest, most = tokens
    return str(fewest) if fewest == most else f"{fewest}..{most}"


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
    s2 = s2_problem(config.values)
    if s2:
        problems.append(s2)
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
    try:
        (fewest, most), context = image_tokens(config, tower), config.context_length
    except UserError as err:  # pinpoints or merge settings this tower cannot serve
        return problems + [str(err)]
    if context is not None and fewest >= context:
        if fewest == most:
            problems.append(f"{fewest} image tokens per image do not fit the language model's {context}-token "
                            "context; use a tower with fewer patches")
        else:
            problems.append(f"every image takes at least {fewest} tokens, which do not fit the language model's "
                            f"{context}-token context; use a tower with fewer patches")
    return problems


def _literal(text: str) -> bool:
    """Whether llava-torch's `ast.literal_eval` reads `text`."""
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return False
    return True


def llava_tower_class(name: str | None) -> tuple[str, str | None]:
    """The tower class LLaVA builds for `name` in this environment, and the problem with that, if any."""
    if needs_our_tower(name):
        active, why = hook_status()
        if active:
            return OURS, None
        match = family_of(name)
        if not is_moe_dir(name):
            return LLAVAS, (f"{name} is a {match.label} but the LLaVA hook is off ({why}): LLaVA would load it as a "
                            f"CLIP, which it is not; unset {ENV_SWITCH} or call mllm_bridge.install_llava_hook()")
        return LLAVAS, (f"{name} is a {match.label} but the LLaVA hook is off ({why}): LLaVA would load it as a "
                        f"dense {match.family.label(False)} without its experts; unset {ENV_SWITCH} or call mllm_bridge.install_llava_hook()")
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
    layout, tokens = _layout_and_tokens(config, tower)
    counted = "unknown image tokens" if tokens is None else f"{describe_tokens(tokens)} image tokens"
    if tokens is not None and tokens[0] != tokens[1]:
        counted += " per image, by its shape"
    report.lines += [
        f"  tower:           {tower.kind}, {tower.moe_layout()}",
        f"  hidden size:     tower {tower.hidden_size}, mm_hidden_size {config.mm_hidden_size}",
        f"  select:          layer {config.select_layer} of {tower.num_layers + 1} hidden states, "
        f"feature {config.select_feature!r} -> {counted}",
        f"  image:           {tower.image_size}x{tower.image_size}, patch {tower.patch_size} "
        f"({tower.num_patches_per_side}x{tower.num_patches_per_side} patches)",
        f"  image layout:    {_describe_layout(layout, config)}",
        f"  image processor: {processor}",
        f"  projector:       {config.projector_type}",
    ]
    context = config.context_length
    if tokens and context is not None and tokens[0] < context <= tokens[1]:
        report.lines.append(f"  note:            the largest images take up to {tokens[1]} tokens, not fewer than "
                            f"the {context}-token context: LLaVA cuts such samples at the context's end")
    raw = config.values.get("image_grid_pinpoints")
    if layout is not None and isinstance(raw, str) and not _literal(raw):
        report.lines.append(f"  note:            image_grid_pinpoints {raw!r} is LLaVA-NeXT's range form: this "
                            "toolkit's lmms-eval model expands it, llava-torch's own load_pretrained_model + generate "
                            "cannot read it (ast.literal_eval); for those write the list it stands for with this "
                            f"tower: {layout.grid_pinpoints}")
    report.problems += tower_problems(config, tower)
    return report


def _layout_and_tokens(config: LlavaCheckpointConfig, tower: TowerInfo):
    """The layout and token range, or (None, None) when the settings do not fit (tower_problems says why)."""
    try:
        return image_layout(config, tower), image_tokens(config, tower)
    except UserError:
        return None, None


def _describe_layout(layout: ImageLayout | None, config: LlavaCheckpointConfig) -> str:
    if layout is None:
        return (f"image_aspect_ratio {config.values.get('image_aspect_ratio')!r}, image_grid_pinpoints "
                f"{config.values.get('image_grid_pinpoints')!r}, mm_patch_merge_type "
                f"{config.values.get('mm_patch_merge_type')!r} (does not fit the tower)")
    if not layout.variable:
        return f"{layout.aspect_ratio}, merge {layout.merge_type}"
    return (f"anyres on {len(layout.grid_pinpoints)} pinpoints (width x height) "
            f"{', '.join(f'{w}x{h}' for w, h in layout.grid_pinpoints)}, merge {layout.merge_type}")


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
