"""Import an open_clip CLIP as a transformers `CLIPModel`, so every recipe starts from one dense format.

Only open_clip ViT CLIPs whose computation a `CLIPModel` reproduces exactly are accepted (fp32 features
within float rounding); anything else raises `UserError` instead of converting approximately.
open_clip is imported lazily: `encoder` itself depends on torch + transformers only.
"""

from __future__ import annotations

import difflib
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
from transformers.image_utils import PILImageResampling
from transformers.initialization import no_init_weights

from ..utils.errors import UserError

logger = logging.getLogger(__name__)

SPEC_PREFIX = "open_clip:"
LOCAL_DIR = "local-dir:"
ARGMAX_POOLING_EOS_ID = 2  # transformers' CLIPTextModel pools at input_ids.argmax() for exactly this value
OPENCLIP_VOCAB_SIZE = 49408
SUPPORTED = "a ViT CLIP with a CLS token and a causal text transformer (e.g. ViT-B-32, ViT-B-16-quickgelu)"


@dataclass
class OpenCLIPDense:
    """A dense CLIP imported from open_clip, ready for upcycling or export."""

    model: CLIPModel  # eval mode, fp32
    image_processor: CLIPImageProcessor  # open_clip's eval preprocessing, as a transformers processor
    tokenizer: CLIPTokenizer | None  # None when open_clip's tokenizer has no exact transformers twin
    source: str  # the spec it came from, for the model card


def _unsupported(name: str, what: str) -> UserError:
    return UserError(f"open_clip model {name!r} is not supported: {what}; use {SUPPORTED}")


def parse_open_clip_spec(spec: str) -> tuple[str, str | None]:
    """`open_clip:NAME[:CHECKPOINT]` or `open_clip:local-dir:DIR` -> (open_clip model name, checkpoint or None)."""
    if not spec.startswith(SPEC_PREFIX) or len(spec) == len(SPEC_PREFIX):
        raise UserError(f"expected 'open_clip:MODEL_NAME[:CHECKPOINT_FILE]', got {spec!r}")
    rest = spec[len(SPEC_PREFIX):]
    if rest.startswith("hf-hub:"):
        raise UserError(f"{spec!r}: hub downloads are not done here; download the repository and pass "
                        "'open_clip:local-dir:DIR' (or 'open_clip:MODEL_NAME:WEIGHTS_FILE')")
    if rest.startswith(LOCAL_DIR):
        return rest, None
    name, _, checkpoint = rest.partition(":")
    return name.replace("/", "-"), checkpoint or None


def _config_problem(cfg: Mapping[str, Any]) -> str | None:
    """What in an open_clip model config a CLIPModel cannot hold, found before building (and downloading) it."""
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if "multimodal_cfg" in cfg:
        return "CoCa (captioning decoder)"
    if vision.get("timm_model_name"):
        return f"timm vision tower {vision['timm_model_name']!r}"
    if isinstance(vision.get("layers"), (list, tuple)):
        return "ResNet vision tower"
    if text.get("hf_model_name"):
        return f"Hugging Face text tower {text['hf_model_name']!r}"
    return None


def _tower_config(transformer: nn.Module, norms: list[nn.Module], name: str, where: str) -> dict[str, Any]:
    """Per-tower CLIPConfig fields read from the built blocks: they, not the JSON, decide what runs."""
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock

    blocks, acts = list(transformer.resblocks), set()
    for block in blocks:
        if type(block) is not ResidualAttentionBlock:
            raise _unsupported(name, f"{where} custom attention blocks ({type(block).__name__}: qk_norm/scale_*)")
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            raise _unsupported(name, f"{where} layer scale (ls_init_value)")
        attn = block.attn
        if not attn._qkv_same_embed_dim or attn.in_proj_bias is None or attn.bias_k is not None or attn.add_zero_attn:
            raise _unsupported(name, f"{where} attention layout (separate q/k/v, no bias, or bias_kv)")
        act = block.mlp.gelu
        if isinstance(act, QuickGELU):
            acts.add("quick_gelu")
        elif type(act) is nn.GELU:
            acts.add({"none": "gelu", "tanh": "gelu_pytorch_tanh"}[act.approximate])
        else:
            raise _unsupported(name, f"{where} activation {type(act).__name__}")
    norms = norms + [m for b in blocks for m in (b.ln_1, b.ln_2)]
    if not all(isinstance(n, nn.LayerNorm) and n.elementwise_affine and n.bias is not None for n in norms):
        raise _unsupported(name, f"{where} tower without affine LayerNorms (no_ln_pre or custom norm_kwargs)")
    eps = {n.eps for n in norms}
    if len(acts) != 1 or len(eps) != 1:  # CLIPConfig holds one activation and one eps per tower
        raise _unsupported(name, f"{where} tower mixes activations {sorted(acts)} or LayerNorm eps {sorted(eps)}")
    first = blocks[0]
    return {
        "hidden_size": first.attn.embed_dim, "intermediate_size": first.mlp.c_fc.out_features,
        "num_hidden_layers": len(blocks), "num_attention_heads": first.attn.num_heads, "hidden_act": acts.pop(),
        "layer_norm_eps": eps.pop(),
    }


def _text_parts(oc_model: nn.Module) -> tuple[nn.Module, str, str, int | None]:
    """(text module, its state-dict prefix, pool type, eos id) for both CLIP and CustomTextCLIP layouts."""
    text = getattr(oc_model, "text", None)
    if text is None:  # CLIP copies the text tower's parts onto itself
        return oc_model, "", oc_model.text_pool_type, getattr(oc_model, "text_eos_id", None)
    return text, "text.", getattr(text, "pool_type", None), getattr(text, "eos_id", None)


def _clip_config(oc_model: nn.Module, name: str) -> tuple[CLIPConfig, str]:
    """Check every unsupported variant on the built model and derive the CLIPConfig; returns (config, text prefix)."""
    from open_clip.transformer import TextTransformer, VisionTransformer

    kind = type(oc_model).__name__
    if kind not in ("CLIP", "CustomTextCLIP"):
        raise _unsupported(name, f"model class {kind}" + (" (captioning decoder)" if kind == "CoCa" else ""))
    visual = oc_model.visual
    if not isinstance(visual, VisionTransformer):
        raise _unsupported(name, f"{type(visual).__name__} vision tower (timm or ResNet)")
    if visual.attn_pool is not None:
        raise _unsupported(name, "attentional pooler in the vision tower")
    if visual.pool_type != "tok":
        raise _unsupported(name, f"vision pooling {visual.pool_type!r} (no CLS token / global average pool)")
    (ih, iw), (ph, pw) = visual.image_size, visual.patch_size
    if ih != iw or ph != pw:
        raise _unsupported(name, f"non-square image {visual.image_size} or patch {visual.patch_size}")
    text, prefix, pool, eos_id = _text_parts(oc_model)
    if kind == "CustomTextCLIP" and not isinstance(text, TextTransformer):
        raise _unsupported(name, f"{type(text).__name__} text tower (Hugging Face text encoder)")
    if getattr(text, "cls_emb", None) is not None:
        raise _unsupported(name, "text CLS embedding (embed_cls)")
    if text.attn_mask is None:
        raise _unsupported(name, "text transformer without causal mask (no_causal_mask)")
    if pool == "argmax":  # id 2 selects transformers' argmax rule: exact for any ids, not just tokenizer output
        text_eos = ARGMAX_POOLING_EOS_ID
    elif pool == "eos" and eos_id is not None and eos_id != ARGMAX_POOLING_EOS_ID:
        text_eos = eos_id  # transformers pools at the first eos_token_id, exactly open_clip's 'eos' pooling
    elif pool == "eos":
        raise _unsupported(name, f"text 'eos' pooling with eos_id={eos_id} (transformers pools at argmax for id 2)")
    else:
        raise _unsupported(name, f"text pooling {pool!r}")
    proj = text.text_projection
    if proj is None:
        raise _unsupported(name, "no text projection (proj_type='none')")
    if isinstance(proj, nn.Linear) and proj.bias is not None and bool(proj.bias.detach().any()):
        raise _unsupported(name, "text projection with a non-zero bias (proj_bias=true)")
    if getattr(oc_model, "logit_bias", None) is not None:
        raise _unsupported(name, "logit_bias (SigLIP-style sigmoid loss)")

    embed_dim = visual.proj.shape[1]
    vision = _tower_config(visual.transformer, [visual.ln_pre, visual.ln_post], name, "vision")
    vision.update(image_size=ih, patch_size=ph, num_channels=visual.conv1.in_channels, projection_dim=embed_dim)
    text_cfg = _tower_config(text.transformer, [text.ln_final], name, "text")
    vocab_size = text.token_embedding.num_embeddings
    text_cfg.update(
        vocab_size=vocab_size, max_position_embeddings=text.positional_embedding.shape[0], projection_dim=embed_dim,
        eos_token_id=text_eos, pad_token_id=getattr(text, "pad_id", 0),
        bos_token_id=OPENCLIP_VOCAB_SIZE - 2 if vocab_size >= OPENCLIP_VOCAB_SIZE else None,
    )
    config = CLIPConfig(text_config=text_cfg, vision_config=vision, projection_dim=embed_dim,
                        logit_scale_init_value=float(oc_model.logit_scale.detach().reshape(())))
    return config, prefix


def _map_block(take, out: dict[str, torch.Tensor], src: str, dst: str) -> None:
    """One open_clip ResidualAttentionBlock -> one transformers CLIPEncoderLayer (packed qkv split in q, k, v)."""
    for part in ("weight", "bias"):
        for proj, tensor in zip("qkv", take(f"{src}attn.in_proj_{part}").chunk(3, dim=0)):
            out[f"{dst}self_attn.{proj}_proj.{part}"] = tensor
    for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        for part in ("weight", "bias"):
            out[f"{dst}{b}.{part}"] = take(f"{src}{a}.{part}")


def _map_state_dict(take, config: CLIPConfig, text: str) -> dict:
    """Rename/reshape every open_clip weight (`take(key)`, see `convert_checked`) into CLIPModel's layout."""
    out = {"logit_scale": take("logit_scale").reshape(())}
    out["vision_model.embeddings.patch_embedding.weight"] = take("visual.conv1.weight")
    out["vision_model.embeddings.class_embedding"] = take("visual.class_embedding")
    out["vision_model.embeddings.position_embedding.weight"] = take("visual.positional_embedding")
    out["text_model.embeddings.token_embedding.weight"] = take(f"{text}token_embedding.weight")
    out["text_model.embeddings.position_embedding.weight"] = take(f"{text}positional_embedding")
    for a, b in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                 (f"{text}ln_final", "text_model.final_layer_norm")):
        for part in ("weight", "bias"):
            out[f"{b}.{part}"] = take(f"{a}.{part}")
    for tower, src_prefix, n in (("vision_model", "visual.", config.vision_config.num_hidden_layers),
                                 ("text_model", text, config.text_config.num_hidden_layers)):
        for i in range(n):
            _map_block(take, out, f"{src_prefix}transformer.resblocks.{i}.", f"{tower}.encoder.layers.{i}.")
    out["visual_projection.weight"] = take("visual.proj").t()  # open_clip: x @ proj, [width, embed]
    projection = take(f"{text}text_projection", optional=True)
    if projection is not None:
        out["text_projection.weight"] = projection.t()
    else:  # nn.Linear (proj_bias): weight is already [embed, width]; its bias was checked to be zero
        out["text_projection.weight"] = take(f"{text}text_projection.weight")
        take(f"{text}text_projection.bias", optional=True)
    return out


def convert_open_clip_model(oc_model: nn.Module, model_name_or_cfg: str | Mapping[str, Any]) -> CLIPModel:
    """Convert a built open_clip CLIP into an equivalent transformers CLIPModel (eval, fp32), strictly.

    `model_name_or_cfg` names the model in messages, or is its open_clip config (checked before the modules).
    """
    model, name = convert_checked(oc_model, model_name_or_cfg, _config_problem, _unsupported, _clip_config,
                                  _map_state_dict, CLIPModel)
    config = model.config
    logger.info("converted open_clip %s: vision %s/%s, text %s/%s", name, config.vision_config.hidden_act,
                config.vision_config.num_hidden_layers, config.text_config.hidden_act,
                config.text_config.num_hidden_layers)
    return model


def convert_checked(oc_model: nn.Module, model_name_or_cfg: str | Mapping[str, Any], config_problem, unsupported,
                    config_from, map_state_dict, model_class: type[nn.Module]) -> tuple[nn.Module, str]:
    """The one conversion path of the open_clip converters: (`model_class` holding exactly the mapped weights, fp32
    and eval; the name messages use), or `unsupported(name, what)` (a `UserError`) for anything it cannot hold.

    `model_name_or_cfg` is the model's name, or its open_clip config, checked first with `config_problem`;
    `config_from(oc_model, name)` -> (transformers config, text state-dict prefix) checks the built modules;
    `map_state_dict(take, config, text_prefix)` fills the transformers state dict from `take(open_clip key)` (None
    for a key absent and `optional=True`). A key
    missing or left over, or a shape that differs, is refused before anything is loaded; the load itself is strict.
    """
    if isinstance(model_name_or_cfg, str):
        name, cfg = model_name_or_cfg, None
    else:
        name, cfg = "custom open_clip config", model_name_or_cfg
    problem = config_problem(cfg) if cfg is not None else None
    if problem:
        raise unsupported(name, problem)
    config, text_prefix = config_from(oc_model, name)
    src = dict(oc_model.state_dict())

    def take(key: str, optional: bool = False) -> torch.Tensor | None:
        if key not in src and not optional:
            raise unsupported(name, f"state dict has no {key!r} (a layout this converter does not know)")
        return src.pop(key, None)

    weights = map_state_dict(take, config, text_prefix)
    if src:
        raise unsupported(name, f"weights with no {model_class.__name__} counterpart: {sorted(src)[:6]}")
    with no_init_weights():  # every parameter is overwritten below
        model = model_class(config)
    expected = model.state_dict()
    bad = sorted(set(expected) ^ set(weights)) + [
        f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in weights.items() if k in expected and v.shape != expected[k].shape
    ]
    if bad:
        raise unsupported(name, f"converted weights do not fit {model_class.__name__}: {bad[:6]}")
    model.load_state_dict({k: v.detach().float() for k, v in weights.items()}, strict=True)
    return model.float().eval(), name


def image_processor_from_open_clip(preprocess_cfg: Mapping[str, Any]) -> CLIPImageProcessor:
    """open_clip's eval transform (resize, center crop, mean/std) as a CLIPImageProcessor, as LLaVA loads it.

    Not bit-exact: transformers floors the center-crop offset where torchvision rounds it (1 pixel, some sizes).
    """
    size = preprocess_cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else size
    mode = preprocess_cfg.get("resize_mode", "shortest")
    bilinear = preprocess_cfg.get("interpolation") == "bilinear"  # open_clip: anything else is bicubic
    common = {"resample": PILImageResampling.BILINEAR if bilinear else PILImageResampling.BICUBIC,
              "image_mean": list(preprocess_cfg["mean"]), "image_std": list(preprocess_cfg["std"])}
    if mode == "squash":
        # crop_size too, though nothing is cropped: LLaVA makes a text-only sample's blank image at crop_size.
        return CLIPImageProcessor(size={"height": h, "width": w}, crop_size={"height": h, "width": w},
                                  do_center_crop=False, **common)
    if mode != "shortest" or h != w:
        logger.warning("open_clip resize_mode %r at size %s has no CLIPImageProcessor twin; "
                       "using shortest-edge resize + center crop", mode, size)
    return CLIPImageProcessor(size={"shortest_edge": min(h, w)}, crop_size={"height": h, "width": w},
                              do_center_crop=True, **common)


def tokenizer_from_open_clip(oc_tokenizer: Any, context_length: int, vocab_size: int) -> CLIPTokenizer | None:
    """open_clip's standard SimpleTokenizer as a CLIPTokenizer (same BPE, ids and truncation); else None, logged.

    Padding uses <|endoftext|> (open_clip pads with 0 = '!'; a '!' pad token would also swallow real '!'s),
    which leaves the EOT-pooled features unchanged.
    """
    from open_clip.tokenizer import SimpleTokenizer, get_clean_fn

    reason = None
    if type(oc_tokenizer) is not SimpleTokenizer:
        reason = f"it uses {type(oc_tokenizer).__name__}, not open_clip's SimpleTokenizer"
    elif oc_tokenizer.clean_fn is not get_clean_fn("lower") or oc_tokenizer.reduction_fn is not None:
        reason = "its SimpleTokenizer has non-default cleaning or reduction (tokenizer_kwargs)"
    elif oc_tokenizer.vocab_size != OPENCLIP_VOCAB_SIZE or vocab_size < OPENCLIP_VOCAB_SIZE:
        reason = f"vocabularies differ (tokenizer {oc_tokenizer.vocab_size}, model {vocab_size})"
    elif oc_tokenizer.context_length != context_length:
        reason = f"tokenizer context {oc_tokenizer.context_length} != model context {context_length}"
    if reason:
        logger.warning("no transformers tokenizer for this open_clip model: %s; tokenize with open_clip", reason)
        return None
    specials = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {specials.get(token, token): i for token, i in oc_tokenizer.encoder.items()}
    merges = [pair for pair, _ in sorted(oc_tokenizer.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def _create_open_clip(name: str, checkpoint: str | None, spec: str) -> nn.Module:
    """Build with open_clip's own factory, which reads any checkpoint (or local-dir weights) weights_only."""
    import open_clip

    try:
        return open_clip.create_model(name, pretrained=checkpoint, precision="fp32", device="cpu", weights_only=True)
    except Exception as e:  # with weights to read, any failure is about the file: say which and how to fix it
        if checkpoint is None and not name.startswith(LOCAL_DIR):
            raise
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        if "TorchScript" in detail:
            why = "it is a TorchScript archive (OpenAI's original format), which cannot be read safely"
        elif "state_dict" in detail:
            why = f"its weights do not fit this architecture ({detail}); name the model it was trained as"
        elif isinstance(e, pickle.UnpicklingError):  # not torch's advice to retry unsafely: only what it found
            found = re.search(r"Unsupported global: GLOBAL [\w.]+", str(e))
            why = "torch.load(weights_only=True) refused it" + (f" ({found.group(0)})" if found else "")
        else:
            why = f"not a readable weights file ({type(e).__name__}: {detail})"
        raise UserError(f"{spec}: cannot load {checkpoint or name} into open_clip {name!r}: {why}; "
                        "weights must be a .safetensors or a .pt of tensors (a state_dict)") from e


def load_open_clip(spec: str) -> OpenCLIPDense:
    """Load `open_clip:MODEL_NAME[:CHECKPOINT_FILE]` (or `open_clip:local-dir:DIR`) as a transformers CLIP. A SigLIP
    config goes to `encoder.convert.open_clip_siglip` instead (`encoder.convert.dense` routes `open_clip:` specs).

    Without a checkpoint the weights are open_clip's random init (offline tests). The model name alone decides
    the activation: OpenAI-trained weights need the `-quickgelu` name, as in open_clip itself.
    """
    import open_clip

    name, checkpoint = parse_open_clip_spec(spec)
    folder = name[len(LOCAL_DIR):]
    if name.startswith(LOCAL_DIR) and not os.path.isfile(os.path.join(folder, "open_clip_config.json")):
        raise UserError(f"{spec}: no open_clip_config.json in {folder!r}; point local-dir at an open_clip export")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        raise UserError(f"{spec}: unknown open_clip model {name!r}"
                        + (f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"))
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise UserError(f"{spec}: checkpoint file {checkpoint!r} not found (pretrained tags are not downloaded "
                        "here: pass a local weights file)")
    problem = _config_problem(cfg)
    if problem:
        raise _unsupported(name, problem)
    oc_model = _create_open_clip(name, checkpoint, spec).eval()
    model = convert_open_clip_model(oc_model, name)
    image_processor = image_processor_from_open_clip(open_clip.get_model_preprocess_cfg(oc_model))
    text = model.config.text_config
    if cfg["text_cfg"].get("hf_tokenizer_name") or "siglip" in name.lower():
        logger.warning("no transformers tokenizer built for %s: it uses a Hugging Face/SigLIP tokenizer", name)
        tokenizer = None
    else:
        tokenizer = tokenizer_from_open_clip(
            open_clip.get_tokenizer(name), text.max_position_embeddings, text.vocab_size)
    return OpenCLIPDense(model=model, image_processor=image_processor, tokenizer=tokenizer, source=spec)
