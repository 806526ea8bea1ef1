"""Import the official CLIP-MoE release (an OpenAI-CLIP-style pickled state dict) as a `CLIPMoEModel`.

The release ships no config, so the architecture is read off the tensor shapes. Format facts this
converter relies on (each verified against the reference outputs in shared/fixtures/official_clipmoe_tiny):

- OpenAI-CLIP key names; a block with `experts.{e}.c_fc` is MoE (router `gate.weight` [E, width]), a
  block with `mlp.c_fc` is dense; activation QuickGELU; `attn.in_proj_weight` packs q, k, v.
- Attention heads are width // 64 in both towers (the fixture's arch.json says 2 text heads for width
  64; only 1 head reproduces its reference outputs, as OpenAI's builder computes heads = width // 64).
- Long-CLIP text positions: `positional_embedding` is used for positions < 20 and
  `positional_embedding_res` for positions >= 20 (each position uses exactly one of them), so the two
  merge into one position table.
- Text pooling is the token at argmax(input_ids); transformers' CLIP expresses that with the legacy
  `eos_token_id = 2`, which we set (OpenAI's end-of-text is the highest id, vocab_size - 1).
- `logit_scale` is stored un-exponentiated, as our model keeps it.
"""

from __future__ import annotations

import logging
import pickle
import re
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import CLIPImageProcessor
from transformers.initialization import no_init_weights

from ..clip import CLIPMoEConfig, CLIPMoEModel
from ..utils.constants import LEGACY_ARGMAX_EOS_ID, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ..utils.errors import UserError, first_line
from ..utils.files import file_sha256

logger = logging.getLogger(__name__)

HEAD_WIDTH = 64  # OpenAI's rule: heads = width // 64
LONG_CLIP_KEPT_POSITIONS = 20  # Long-CLIP keeps the first 20 original positions, stretches the rest
TOWER_PREFIXES = {"vision": "visual.transformer.resblocks.", "text": "transformer.resblocks."}

# A non-checkpoint file surfaces as any of these, depending on where torch's reader gives up.
READ_ERRORS = (RuntimeError, EOFError, KeyError, IndexError, ValueError, OSError, struct.error, zipfile.BadZipFile)

# A conversion step: target key <- function of the source tensors at these keys.
Step = tuple[str, tuple[str, ...], Callable[..., torch.Tensor]]


def load_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an untrusted `.pt` safely (weights_only) and unwrap `state_dict` / `model` / `module.` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist or is not a file; pass the path of the released .pt")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch says "Weights only load failed" for any pickle stream it cannot follow: random bytes and a
        # truncated file too, not only pickles that name other globals. Only well-formed pickles are "unsafe".
        if not _is_pickled_checkpoint(path):
            raise UserError(_not_a_checkpoint(path, "no well-formed pickle data in it")) from None
        raise UserError(
            f"{path} holds pickled Python objects other than tensors, which weights_only=True refuses to load "
            "for safety; pass the released CLIP-MoE state dict (a dict of tensors)"
        ) from err
    except READ_ERRORS as err:
        raise UserError(_not_a_checkpoint(path, first_line(err, with_type=True)[:200])) from err
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj:
        raise UserError(
            f"{path} holds a {type(obj).__name__}, not a state dict; pass the released CLIP-MoE state dict "
            "(a dict of tensors, optionally under 'state_dict' or 'model')"
        )
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(f"{path}: entries {_names(not_tensors)} are not tensors; pass a plain state dict of tensors")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _not_a_checkpoint(path: Path, reason: str) -> str:
    return (f"{path} is not a PyTorch checkpoint (corrupt, truncated or another kind of file; {reason}); "
            "pass the released CLIP-MoE state dict (.pt)")


PICKLES_BEFORE_DATA = 4  # torch's legacy format: magic number, protocol, system info, then the object itself
MAX_PICKLE_SCAN = 64 << 20


def _is_pickled_checkpoint(path: Path) -> bool:
    """Whether `path` holds well-formed pickles, parsed opcode by opcode without running any (`pickletools.genops`):
    the data.pkl of torch's zip format, or the pickles a legacy-format file starts with. Random bytes fail within a
    few opcodes; a file cut short fails in the pickle it was cut in."""
    import io
    import pickletools

    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                for _op in pickletools.genops(io.BytesIO(archive.read(name))):
                    pass
        except Exception:  # noqa: BLE001 - no data.pkl, a damaged member, or garbage in it
            return False
        return True
    with open(path, "rb") as f:
        head = f.read(MAX_PICKLE_SCAN)
        complete = not f.read(1)
    stream = io.BytesIO(head)
    for _ in range(PICKLES_BEFORE_DATA):
        if stream.tell() == len(head):
            return True  # one or more whole pickles and nothing else: a plain pickle file
        try:
            for _op in pickletools.genops(stream):
                pass
        except Exception:  # noqa: BLE001 - genops raises ValueError, EOFError, struct.error, ... on garbage
            # Garbage, unless the parse only ran out of the scanned head of a larger file.
            return not complete and stream.tell() >= len(head)
    return True


def infer_config(
    sd: dict[str, torch.Tensor],
    num_experts: int | None = None,
    top_k: int = 2,
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> CLIPMoEConfig:
    """The `CLIPMoEConfig` described by the tensor shapes of an official-format state dict."""
    for key in ("visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight",
                "positional_embedding", "visual.proj", "text_projection"):
        if key not in sd:
            raise UserError(f"key {key!r} missing: not an OpenAI-CLIP / CLIP-MoE state dict; pass the released .pt")
    conv = sd["visual.conv1.weight"]  # [width, channels, patch, patch]
    vision_width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vocab, text_width = sd["token_embedding.weight"].shape
    context = sd["positional_embedding"].shape[0]
    embed_dim = sd["visual.proj"].shape[1]

    if top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}")
    towers = {tower: _tower_layout(sd, tower) for tower in TOWER_PREFIXES}
    found = {e for _, e_by_layer in towers.values() for e in e_by_layer.values()}
    if num_experts is not None and found and found != {num_experts}:
        raise UserError(
            f"--num-experts {num_experts} disagrees with the checkpoint, whose MoE blocks have {sorted(found)} "
            "experts; drop --num-experts or pass the checkpoint's count"
        )
    default_experts = num_experts or max(found, default=top_k)  # for a tower without MoE blocks

    tower_cfgs = {}
    widths = {"vision": vision_width, "text": text_width}
    heads = {"vision": vision_heads, "text": text_heads}
    for tower, (num_layers, experts_by_layer) in towers.items():
        counts = set(experts_by_layer.values())
        if len(counts) > 1:
            raise UserError(f"the {tower} tower's MoE blocks have different expert counts {sorted(counts)}; "
                            "this importer needs one count per tower")
        experts = counts.pop() if counts else default_experts
        if top_k > experts:
            raise UserError(f"--top-k {top_k} exceeds the {experts} experts of the {tower} tower; pass --top-k <= {experts}")
        width = widths[tower]
        n_heads = heads[tower] or max(1, width // HEAD_WIDTH)
        if width % n_heads:
            raise UserError(f"{tower} width {width} is not divisible by {n_heads} heads; pass --{tower}-heads dividing it")
        fc_key = _first_fc_key(sd, tower)
        tower_cfgs[tower] = {
            "hidden_size": width,
            "intermediate_size": sd[fc_key].shape[0],
            "num_hidden_layers": num_layers,
            "num_attention_heads": n_heads,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": embed_dim,
            "num_experts": experts,
            "top_k": top_k,
            "moe_layers": sorted(experts_by_layer),
        }
    tower_cfgs["vision"].update(image_size=grid * patch, patch_size=patch, num_channels=channels)
    tower_cfgs["text"].update(
        vocab_size=vocab,
        max_position_embeddings=context,
        eos_token_id=LEGACY_ARGMAX_EOS_ID,
        bos_token_id=vocab - 2,
        pad_token_id=0,
    )
    # A missing or misshapen logit_scale is reported with the other keys by convert_state_dict.
    scale = sd.get("logit_scale")
    scale_init = {"logit_scale_init_value": float(scale)} if scale is not None and scale.numel() == 1 else {}
    return CLIPMoEConfig(
        text_config=tower_cfgs["text"], vision_config=tower_cfgs["vision"], projection_dim=embed_dim, **scale_init
    )


def conversion_plan(config: CLIPMoEConfig, has_res_positions: bool) -> list[Step]:
    """Every (target key, source keys, combine) of the conversion; its sources are exactly the expected keys."""
    plan: list[Step] = [
        ("logit_scale", ("logit_scale",), _same),
        ("visual_projection.weight", ("visual.proj",), _transpose),
        ("text_projection.weight", ("text_projection",), _transpose),
        ("vision_model.embeddings.class_embedding", ("visual.class_embedding",), _same),
        ("vision_model.embeddings.patch_embedding.weight", ("visual.conv1.weight",), _same),
        ("vision_model.embeddings.position_embedding.weight", ("visual.positional_embedding",), _same),
        ("text_model.embeddings.token_embedding.weight", ("token_embedding.weight",), _same),
    ]
    if has_res_positions:
        plan.append(("text_model.embeddings.position_embedding.weight",
                     ("positional_embedding", "positional_embedding_res"), _merge_long_clip_positions))
    else:
        plan.append(("text_model.embeddings.position_embedding.weight", ("positional_embedding",), _same))
    for ours, theirs in (("vision_model.pre_layrnorm", "visual.ln_pre"), ("vision_model.post_layernorm", "visual.ln_post"),
                         ("text_model.final_layer_norm", "ln_final")):
        plan += _linear(ours, theirs)
    for tower, cfg in (("vision", config.vision_config), ("text", config.text_config)):
        for layer in range(cfg.num_hidden_layers):
            plan += _block_plan(f"{tower}_model.encoder.layers.{layer}.", f"{TOWER_PREFIXES[tower]}{layer}.",
                                cfg.num_experts if layer in cfg.moe_layers else None)
    return plan


def convert_state_dict(
    sd: dict[str, torch.Tensor], config: CLIPMoEConfig, target_shapes: dict[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """Our state dict (fp32) from an official one; every source key must be used, every shape must fit."""
    plan = conversion_plan(config, "positional_embedding_res" in sd)
    expected = {src for _, sources, _ in plan for src in sources}
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unexpected:
        raise UserError(
            f"the checkpoint does not fit the architecture read from its shapes: missing keys {_names(missing)}, "
            f"unexpected keys {_names(unexpected)}; pass an unmodified official CLIP-MoE release state dict"
        )
    converted, wrong = {}, []
    for target, sources, combine in plan:
        # fp32 always: the reference's fp16 rounding is a known defect, and fp16 -> fp32 is lossless.
        tensor = combine(*(sd[s].float() for s in sources))
        if tensor.shape != target_shapes[target]:
            wrong.append(f"{sources[0]} {tuple(sd[sources[0]].shape)} (-> {target} {tuple(tensor.shape)}, "
                         f"expected {tuple(target_shapes[target])})")
        converted[target] = tensor
    if wrong:
        raise UserError(f"tensor shapes do not fit the architecture read from the checkpoint: {_names(wrong, 3)}; "
                        "pass an unmodified official CLIP-MoE release state dict")
    return converted


def build_image_processor(resolution: int) -> CLIPImageProcessor:
    """OpenAI CLIP preprocessing at the checkpoint's resolution: bicubic shortest-edge resize, centre crop."""
    return CLIPImageProcessor(
        size={"shortest_edge": resolution},
        crop_size={"height": resolution, "width": resolution},
        resample=3,  # PIL bicubic
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_center_crop=True,
        do_convert_rgb=True,
    )


def import_official(
    path: str | Path,
    num_experts: int | None = None,
    top_k: int = 2,
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> tuple[CLIPMoEModel, CLIPImageProcessor]:
    """Load an official CLIP-MoE release checkpoint as an fp32 `CLIPMoEModel` (eval mode) and its image processor.

    Raises `UserError` when the file is unreadable, not a state dict, or its keys or shapes do not fit.
    """
    sd = load_official_state_dict(path)
    config = infer_config(sd, num_experts=num_experts, top_k=top_k, vision_heads=vision_heads, text_heads=text_heads)
    with no_init_weights():  # every parameter is loaded below (strict); random init would cost ~20 s at ViT-L size
        model = CLIPMoEModel(config)
    converted = convert_state_dict(sd, config, {k: v.shape for k, v in model.state_dict().items()})
    model.load_state_dict(converted, strict=True, assign=True)  # assign: no second copy of the weights
    model.eval()
    v, t = config.vision_config, config.text_config
    logger.info(
        "imported %s: vision %d layers x %d (MoE %s), text %d layers x %d (MoE %s), top-%d of %d experts",
        path, v.num_hidden_layers, v.hidden_size, v.moe_layers, t.num_hidden_layers, t.hidden_size, t.moe_layers,
        v.top_k, v.num_experts,
    )
    return model, build_image_processor(v.image_size)


def model_card_fields(path: str | Path, model: CLIPMoEModel) -> dict:
    """The `card` for `save_clip_moe`: source file and hash, recipe, and what a user must know to use it."""
    path = Path(path)
    t = model.config.text_config
    return {
        "name": f"CLIP-MoE imported from {path.name}",
        "base": str(path),
        "recipe": "official CLIP-MoE release import",
        "data": "none (weights imported as released, fp32)",
        "details": {
            "source_checkpoint": str(path.resolve()),
            "source_sha256": file_sha256(path),
            "tokenizer": (
                "not shipped with the release: use OpenAI CLIP's BPE tokenizer (start/end-of-text = the two "
                f"highest ids) with Long-CLIP's context of {t.max_position_embeddings} tokens, zero padding"
            ),
            "text_pooling": "token at argmax(input_ids), expressed by transformers' legacy eos_token_id = 2",
            "text_positions": (
                f"Long-CLIP positional_embedding (positions < {LONG_CLIP_KEPT_POSITIONS}) and "
                "positional_embedding_res (the rest) merged into one table"
            ),
            "attention_heads": {"vision": model.config.vision_config.num_attention_heads,
                                "text": t.num_attention_heads},
        },
    }


def _tower_layout(sd: dict[str, torch.Tensor], tower: str) -> tuple[int, dict[int, int]]:
    """(number of blocks, {MoE block index: expert count}) of one tower, from its key names."""
    block = re.compile(re.escape(TOWER_PREFIXES[tower]) + r"(\d+)\.(?:experts\.(\d+)\.)?")
    layers: set[int] = set()
    experts: dict[int, int] = {}
    for key in sd:
        match = block.match(key)
        if match:
            layer = int(match.group(1))
            layers.add(layer)
            if match.group(2) is not None:
                experts[layer] = max(experts.get(layer, 0), int(match.group(2)) + 1)
    if not layers:
        raise UserError(f"no {TOWER_PREFIXES[tower]}{{i}} blocks found: not a CLIP-MoE / OpenAI-CLIP state dict")
    return max(layers) + 1, experts


def _first_fc_key(sd: dict[str, torch.Tensor], tower: str) -> str:
    prefix = f"{TOWER_PREFIXES[tower]}0."
    for key in (f"{prefix}experts.0.c_fc.weight", f"{prefix}mlp.c_fc.weight"):
        if key in sd:
            return key
    raise UserError(f"key {prefix}mlp.c_fc.weight (or {prefix}experts.0.c_fc.weight) missing; "
                    "pass an unmodified official CLIP-MoE release state dict")


def _block_plan(ours: str, theirs: str, num_experts: int | None) -> list[Step]:
    qkv = (f"{theirs}attn.in_proj_weight",), (f"{theirs}attn.in_proj_bias",)
    plan: list[Step] = []
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        plan.append((f"{ours}self_attn.{name}.weight", qkv[0], _chunk(i)))
        plan.append((f"{ours}self_attn.{name}.bias", qkv[1], _chunk(i)))
    plan += _linear(f"{ours}self_attn.out_proj", f"{theirs}attn.out_proj")
    plan += _linear(f"{ours}layer_norm1", f"{theirs}ln_1")
    plan += _linear(f"{ours}layer_norm2", f"{theirs}ln_2")
    if num_experts is None:
        plan += _linear(f"{ours}mlp.fc1", f"{theirs}mlp.c_fc")
        plan += _linear(f"{ours}mlp.fc2", f"{theirs}mlp.c_proj")
        return plan
    plan.append((f"{ours}mlp.router.weight", (f"{theirs}gate.weight",), _same))
    experts = range(num_experts)
    for target, source in (("up_proj", "c_fc.weight"), ("up_proj_bias", "c_fc.bias"),
                           ("down_proj", "c_proj.weight"), ("down_proj_bias", "c_proj.bias")):
        plan.append((f"{ours}mlp.experts.{target}", tuple(f"{theirs}experts.{e}.{source}" for e in experts), _stack))
    return plan


def _linear(ours: str, theirs: str) -> list[Step]:
    return [(f"{ours}.{p}", (f"{theirs}.{p}",), _same) for p in ("weight", "bias")]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()


def _stack(*tensors: torch.Tensor) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise UserError(f"experts of one block differ in shape {sorted(shapes)}; pass an unmodified official "
                        "CLIP-MoE release state dict")
    return torch.stack(tensors)


def _chunk(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def take(packed: torch.Tensor) -> torch.Tensor:
        if packed.shape[0] % 3:
            raise UserError(f"packed attention in_proj of {packed.shape[0]} rows is not q, k, v stacked (not divisible by 3)")
        return packed.chunk(3, dim=0)[i].clone()
    return take


def _merge_long_clip_positions(short: torch.Tensor, stretched: torch.Tensor) -> torch.Tensor:
    """Long-CLIP adds `short * mask(pos < 20) + stretched * mask(pos >= 20)`: one table row per position."""
    if short.shape != stretched.shape:
        raise UserError(f"positional_embedding {tuple(short.shape)} and positional_embedding_res "
                        f"{tuple(stretched.shape)} differ in shape; pass an unmodified Long-CLIP/CLIP-MoE state dict")
    merged = stretched.clone()
    merged[:LONG_CLIP_KEPT_POSITIONS] = short[:LONG_CLIP_KEPT_POSITIONS]
    return merged


def _names(keys: list[str], limit: int = 6) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown
