"""The one validated way into a MoE directory (a CLIP-MoE, or a MoE of any family registered in `encoder.family`):
every defect is a one-line UserError naming the file and the fix.

What `from_pretrained` alone lets through, and this module refuses before any weight is loaded:

- a `config.json` that is not JSON, or whose MoE fields are impossible or of the wrong type
  (`"num_experts": "4"`, `top_k` 0 or above `num_experts`, `moe_layers` out of range or repeated);
- a config that disagrees with the weights: transformers re-initialises a tensor the checkpoint lacks at random
  (a config listing fewer `moe_layers` loads with random dense MLPs and only a warning), so the safetensors
  headers (no tensor data) are compared with the shapes the config describes;
- weights that are missing, empty or truncated, and shard indexes naming missing shards;
- a `preprocessor_config.json` or tokenizer file that is present but unreadable (see `encoder.convert.dense`).

`load_clip_moe(path, model_class)` is the loader; `check_clip_moe_dir` runs its checks without loading (for
`python -m mllm_bridge check`, which reads a tower without loading it). Which config and model classes a directory
takes, and where each tower's weights sit, come from its family (`encoder.family`), found by its `model_type`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import PretrainedConfig, PreTrainedModel

from .family import Family, families, find_family
from .tensor_stream import WEIGHTS_FILE, CheckpointError, SafetensorsCheckpoint
from .utils.errors import UserError, first_line
from .weight_files import weights_entry

CONFIG_FILE = "config.json"
TOWERS = ("vision", "text")  # a full model's tower configs are its `<tower>_config`s
# What a config that transformers cannot build raises, depending on the field and the release.
CONFIG_ERRORS = (StrictDataclassError, ValueError, TypeError, KeyError, AttributeError)
LOAD_ERRORS = (OSError, RuntimeError, ValueError, SafetensorError, CheckpointError)


def read_config_json(path: str | Path, kind: str = "CLIP-MoE directory", fix: str = "re-save the model") -> dict:
    """DIR/config.json as a dict, for any model directory (a CLIP-MoE, a LLaVA checkpoint: `kind`); UserError
    naming `kind` when `path` is no model directory, or `fix` when the file is unreadable or not a JSON object."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; pass a {kind}")
    if not config_file.is_file():
        raise UserError(f"{path} has no {CONFIG_FILE}, so it is not a model directory; pass a {kind}")
    try:
        raw = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{config_file} is not valid JSON ({err}); {fix}") from None
    except OSError as err:
        raise UserError(f"cannot read {config_file} ({err.strerror or err}); {fix}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config_file} holds a JSON {type(raw).__name__}, not an object; {fix}")
    return raw


def moe_family(path: str | Path, raw: dict | None = None) -> tuple[Family, str]:
    """(family, kind) of the MoE directory `path` (kind "model", "vision" or "text": `encoder.family.KINDS`);
    UserError naming the `model_type` and the MoE model types known when it holds no MoE model of a family."""
    raw = read_config_json(path) if raw is None else raw
    match = find_family(raw)
    if match is None or not match.is_moe or match.kind not in match.family.moe_configs:
        loadable = [f for f in families() if f.moe_configs]  # a family whose MoE classes are registered
        held = [t for f in loadable for t in f.moe_model_types]
        known = "/".join(f.label(True) for f in loadable) or "MoE model"
        raise UserError(f"{Path(path) / CONFIG_FILE} says model_type {raw.get('model_type')!r}, not a {known} "
                        f"(one of {', '.join(held)}); pass a {known} directory")
    return match.family, match.kind


def clip_moe_config(path: str | Path, config_class: type[PretrainedConfig] | None = None) -> PretrainedConfig:
    """The validated config of the MoE directory `path` (a CLIP-MoE, or a MoE of another registered family).

    config_class: the family's full config (`CLIPMoEConfig`) or one tower's (`CLIPMoEVisionConfig`,
        `CLIPMoETextConfig`: from a full model or a tower export); None = what the directory holds.
    """
    path = Path(path)
    config_file = path / CONFIG_FILE
    raw = read_config_json(path)
    family, kind = moe_family(path, raw)
    model_type = raw["model_type"]
    held = family.moe_configs[kind]
    config_class = config_class or held
    if kind == "model":
        towers = {f"{tower}_config": (raw.get(f"{tower}_config"), family.moe_configs[tower]) for tower in TOWERS}
    elif held is config_class:
        towers = {config_class.base_config_key: (raw, held)}
    else:
        raise UserError(f"{path} holds a {model_type!r} export, not a {config_class.model_type!r} model; pass a "
                        f"full {family.label(True)} directory or that tower's export")
    for key, (tower, tower_class) in towers.items():  # each tower on its own, so the message can say which is wrong
        if not isinstance(tower, dict):
            raise UserError(f"{config_file}: {key} is {tower!r}, not an object; re-save the model")
        build_config(config_file, key if kind == "model" else None, lambda t=tower, c=tower_class: c.from_dict(t))
    return build_config(config_file, None, lambda: config_class.from_pretrained(path))


def build_config(config_file: Path, where: str | None, build):
    """`build()` (a config constructor), with what it raises for a bad `config_file` as one UserError line."""
    try:
        return build()
    except CONFIG_ERRORS as err:
        cause = err.__cause__ if isinstance(err, StrictDataclassError) and err.__cause__ is not None else err
        reason = first_line(cause)
        raise UserError(f"{config_file}: {where + ': ' if where else ''}{reason}; fix it in {config_file.name} "
                        "or re-save the model") from None


def weights_file(path: str | Path) -> Path:
    """The file a message about the directory's weights should name: the one `from_pretrained` reads
    (`encoder.weight_files`), else model.safetensors."""
    return weights_entry(path) or Path(path) / WEIGHTS_FILE


def read_weight_shapes(path: str | Path) -> dict[str, tuple[int, ...]] | None:
    """{tensor name: shape} from the safetensors headers (no tensor data is read), every tensor checked to fit
    its file; None for a directory with only PyTorch .bin weights. UserError when the weights are missing or
    unreadable."""
    path = Path(path)
    cannot = f"{path}: the weights cannot be loaded"
    if not SafetensorsCheckpoint.exists(path):
        if weights_entry(path) is not None:  # .bin weights, which from_pretrained reads only without safetensors
            return None
        raise UserError(f"{cannot} ({path / WEIGHTS_FILE} is missing); re-download or re-save the model")
    try:
        checkpoint = SafetensorsCheckpoint(path)
    except FileNotFoundError as err:
        raise UserError(f"{cannot} ({weights_file(path)} names the shard {Path(err.filename).name}, which is "
                        "missing); re-download or re-save the model") from None
    except (OSError, CheckpointError) as err:
        raise UserError(f"{cannot} ({first_line(err)}); re-download or re-save the model") from None
    try:
        names = checkpoint.keys()
        return {name: tuple(checkpoint.spec(name).shape) for name in names}
    finally:
        checkpoint.close()


def check_weights(path: str | Path, config: PretrainedConfig, model_class: type[PreTrainedModel]) -> None:
    """UserError unless the directory's weights are exactly the tensors, of exactly the shapes, that `model_class`
    built from `config` loads (tensors it does not load, such as the text tower's for the vision tower, may exist)."""
    path = Path(path)
    shapes = read_weight_shapes(path)
    if shapes is None:
        return  # .bin weights: `load_clip_moe` checks transformers' loading report instead
    match = find_family(config)
    if match is not None and match.is_moe and match.family.weight_map is not None:
        prefix = _checkpoint_prefix(path, match.family, model_class)
        _check_moe_layout(path, match.family, config, shapes, prefix)
    else:
        prefix = ""
    expected = expected_shapes(config, model_class)
    missing = [name for name in expected if prefix + name not in shapes]
    wrong = [f"{prefix + name} has shape {shapes[prefix + name]} in the weights but {shape} in the config"
             for name, shape in expected.items() if prefix + name in shapes and shapes[prefix + name] != shape]
    source = weights_file(path)
    if missing:
        raise UserError(f"{path / CONFIG_FILE} does not match {source.name}: {len(missing)} tensors it describes are "
                        f"not in the weights ({_names([prefix + m for m in missing])}); restore the model's own "
                        f"{CONFIG_FILE} or re-save the model")
    if wrong:
        raise UserError(f"{path / CONFIG_FILE} does not match {source.name}: {_names(wrong, 1)}; restore the model's "
                        f"own {CONFIG_FILE} or re-save the model")


def expected_shapes(config: PretrainedConfig, model_class: type[PreTrainedModel]) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor `model_class(config)` loads, from a model built on the meta device (no memory)."""
    from transformers.initialization import no_init_weights

    with no_init_weights(), torch.device("meta"):
        model = model_class(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _checkpoint_prefix(path: Path, family: Family, model_class: type[PreTrainedModel]) -> str:
    """A tower loaded from a full MoE directory reads its tensors under that tower's prefix ('vision_model.')."""
    if moe_family(path)[1] != "model":
        return ""
    for tower in TOWERS:
        if model_class.config_class is family.moe_configs.get(tower):
            return family.weight_map.tower_prefix[tower] + "."
    return ""


def _check_moe_layout(path: Path, family: Family, config: PretrainedConfig, shapes: dict, prefix: str) -> None:
    """The MoE fields against the weights, in the config's own terms: which layers hold experts, and how many."""
    weight_map = family.weight_map
    if find_family(config).kind == "model":
        towers = [(f"{tower}_config", getattr(config, f"{tower}_config"), weight_map.tower_prefix[tower] + ".")
                  for tower in TOWERS]
    else:  # one tower: from a full directory (under its prefix) or from its own export
        towers = [(config.base_config_key if prefix else None, config, prefix)]
    config_file = path / CONFIG_FILE
    source = weights_file(path).name
    for key, tower, tower_prefix in towers:
        router = weight_map.router_pattern(tower_prefix)
        experts = {int(m[1]): shape[0] for name, shape in shapes.items() if (m := router.fullmatch(name)) and shape}
        field = f"{key}.moe_layers" if key else "moe_layers"
        if sorted(experts) != list(tower.moe_layers):
            raise UserError(f"{config_file}: {field} is {list(tower.moe_layers)} but {source} has MoE layers "
                            f"{sorted(experts)}; set {field} to {sorted(experts)} or re-save the model")
        counts = sorted(set(experts.values()))
        if counts and counts != [tower.num_experts]:
            field = f"{key}.num_experts" if key else "num_experts"
            held = counts[0] if len(counts) == 1 else counts
            raise UserError(f"{config_file}: {field} is {tower.num_experts} but {source} has {held} experts per MoE "
                            f"layer; set {field} to match the weights or re-save the model")


def check_clip_moe_dir(path: str | Path, model_class: type[PreTrainedModel] | None = None) -> PretrainedConfig:
    """What `load_clip_moe` checks before it loads, without loading: the config, then the weights' headers against
    it. Returns the validated config of `model_class` (default the family's full model, `CLIPMoEModel` for a CLIP)."""
    model_class = model_class or full_model_class(path)
    config = clip_moe_config(path, model_class.config_class)
    check_weights(path, config, model_class)
    return config


def full_model_class(path: str | Path) -> type[PreTrainedModel]:
    """The full MoE model class (`CLIPMoEModel` for a CLIP-MoE) of the family of the MoE directory `path`."""
    return moe_family(path)[0].moe_models["model"]


def load_clip_moe(path: str | Path, model_class: type[PreTrainedModel] | None = None, **from_pretrained_kwargs):
    """`model_class.from_pretrained(path, ...)` (default the family's full model) after `clip_moe_config` and
    `check_weights`; also refuses what transformers' loading report lists as missing or misshapen (for .bin weights)."""
    path = Path(path)
    model_class = model_class or full_model_class(path)
    check_clip_moe_dir(path, model_class)
    try:
        model, info = model_class.from_pretrained(path, output_loading_info=True, **from_pretrained_kwargs)
    except LOAD_ERRORS as err:
        raise UserError(f"{path}: the {moe_family(path)[0].label(True)} weights cannot be loaded ("
                        f"{first_line(err, with_type=True)[:200]}); re-download or re-save the model") from None
    bad = list(info.get("missing_keys") or []) + [str(k[0] if isinstance(k, tuple) else k)
                                                   for k in info.get("mismatched_keys") or []]
    if bad:
        raise UserError(f"{path / CONFIG_FILE} does not match the weights in {path}: {_names(sorted(bad))} missing or "
                        f"misshapen; restore the model's own {CONFIG_FILE} or re-save the model")
    return model


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown} and {len(names) - limit} more" if len(names) > limit else shown
