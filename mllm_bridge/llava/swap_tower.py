"""Point a LLaVA checkpoint at another vision tower (config.json only), after checking that it fits.

The projector maps tower features of width `mm_hidden_size` into the LLM, so a tower of another width
is refused rather than written: LLaVA would load it and fail (or produce noise) at the first image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from encoder.utils.errors import UserError
from encoder.utils.files import check_output_file, write_failure

from .checks import describe_tokens, image_tokens, llava_tower_class, tower_problems
from .config import LlavaCheckpointConfig, read_llava_config, write_llava_config
from .tower_info import TowerInfo, read_tower, tower_kinds


@dataclass
class SwapResult:
    config: LlavaCheckpointConfig  # as written
    backup: Path  # the previous config.json
    tokens: tuple[int, int]  # (fewest, most) image tokens per image with the new tower (equal unless anyres)
    notes: list[str] = field(default_factory=list)  # things that work but deserve attention


def swap_tower(
    llava_dir: str | Path,
    tower_dir: str | Path,
    select_layer: int | None = None,
    select_feature: str | None = None,
) -> SwapResult:
    """Set `mm_vision_tower` (absolute path) and optionally the select layer/feature; keep a backup.

    select_layer / select_feature: None keeps the checkpoint's values.
    Raises UserError, leaving config.json untouched, when the tower is not a directory of a known family (`tower_kinds`)
    or does not fit the checkpoint (projector width, select layer, image processor, anyres pinpoints, context),
    or when the checkpoint asks for LLaVA's S2 multi-scale tower.
    """
    old = read_llava_config(llava_dir)
    if not Path(tower_dir).is_dir():
        raise UserError(f"--tower {tower_dir} is not a directory; pass a {tower_kinds()} directory")
    tower = read_tower(tower_dir)
    new = old.with_values(
        mm_vision_tower=str(Path(tower_dir).resolve()),
        mm_vision_select_layer=old.select_layer if select_layer is None else select_layer,
        mm_vision_select_feature=old.select_feature if select_feature is None else select_feature,
    )
    problems = tower_problems(new, tower)
    if new.values.get("unfreeze_mm_vision_tower"):
        problems.append("unfreeze_mm_vision_tower is true: LLaVA would load the tower weights stored in this "
                        "checkpoint over the new tower; set it to false first")
    if problems:
        raise UserError("; ".join(problems) + f" ({old.config_path} left unchanged)")
    backup = _write(old, new)
    return SwapResult(new, backup, image_tokens(new, tower), _notes(old, new, tower))


def _write(old: LlavaCheckpointConfig, new: LlavaCheckpointConfig) -> Path:
    """`write_llava_config`, refused up front when the checkpoint's folder cannot be written; a write that fails
    on the way (disk full, ...) leaves config.json as it was, no new backup, and one line naming the reason."""
    directory = old.config_path.parent
    check_output_file(old.config_path, "LLAVA_DIR")
    backups = set(directory.glob(f"{old.config_path.name}.bak*"))
    try:
        return write_llava_config(old, new)
    except BaseException as exc:
        for path in set(directory.glob(f"{old.config_path.name}.bak*")) - backups:
            path.unlink(missing_ok=True)  # a backup copied (maybe in part) by this failed run
        failure = write_failure(exc, directory, None, "LLAVA_DIR")
        if failure is not None:
            raise UserError(f"{failure} ({old.config_path} left unchanged)") from exc
        raise


def _notes(old: LlavaCheckpointConfig, new: LlavaCheckpointConfig, tower: TowerInfo) -> list[str]:
    notes = []
    _, problem = llava_tower_class(new.vision_tower)
    if problem:
        notes.append(problem)
    try:
        old_tower = read_tower(old.vision_tower)
        before = image_tokens(old, old_tower)
    except UserError:
        return notes  # the old tower is gone, remote or did not fit: nothing to compare against
    after = image_tokens(new, tower)
    if before != after:
        notes.append(f"image tokens per image change from {describe_tokens(before)} to {describe_tokens(after)}; "
                     f"the language model was trained with {describe_tokens(before)}, so fine-tune (stage 2) before "
                     "relying on the results")
    return notes


def run_swap_tower(args) -> int:
    """`python -m mllm_bridge swap-tower`: swap, then say what changed and where the old config is."""
    result = swap_tower(args.llava_dir, args.tower, args.select_layer, args.select_feature)
    print(f"{result.config.config_path}: mm_vision_tower = {result.config.vision_tower}, "
          f"select layer {result.config.select_layer}, feature {result.config.select_feature!r} -> "
          f"{describe_tokens(result.tokens)} image tokens per image")
    print(f"previous config kept as {result.backup}")
    for note in result.notes:
        print(f"note: {note}")
    return 0
