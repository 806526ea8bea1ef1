"""Import an open_clip SigLIP (timm vision tower, sigmoid loss with `logit_bias`) as a transformers `SiglipModel`.

open_clip's SigLIPs (`ViT-B-16-SigLIP`, `ViT-SO400M-14-SigLIP-384`, ...) are a timm `VisionTransformer` without a
class token, pooled by its attention head ('map'), with no projection after it, and open_clip's own text
transformer without a causal mask, pooled at the last token and projected by a biased Linear. Only models whose
computation a `SiglipModel` reproduces exactly are accepted (the same embeddings and logits, `logit_bias` included,
within float rounding); anything else raises `UserError`. The tokenizer must come along: an open_clip SigLIP
whose tokenizer has no transformers twin is refused, not returned without one.
open_clip and timm are imported lazily: `encoder` itself depends on torch + transformers only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipTokenizer,
)
from transformers.image_utils import PILImageResampling

from ..utils.errors import UserError
from .open_clip import (
    LOCAL_DIR,
    _create_open_clip,
    _map_block,
    _text_parts,
    convert_checked,
    parse_open_clip_spec,
)

logger = logging.getLogger(__name__)

SUPPORTED = ("a SigLIP: a timm ViT without class token pooled by 'map' with timm_proj 'none', and a text "
             "transformer without causal mask pooled at the last token "
             "(e.g. ViT-B-16-SigLIP, ViT-SO400M-14-SigLIP-384)")
# Texts the converted tokenizer must turn into open_clip's ids exactly: case, punctuation, runs of whitespace,
# truncation, the empty text. Not '_': open_clip turns it into a space before removing punctuation, transformers'
# SiglipTokenizer removes it ('a_b' -> 'a b' vs 'ab'), the one known difference.
TOKENIZER_PROBES = (
    "a photo of a cat", "A Photo, of THE dog!", "  two   red\tcars  ", "it's a dog's life.", "",
    "Zebra? (maybe) #42 & 'quoted' -- text; more: text.", " ".join(["word"] * 200),
)


@dataclass
class OpenCLIPSiglipDense:
    """A dense SigLIP imported from open_clip, ready for upcycling or export."""

    model: SiglipModel  # eval mode, fp32
    image_processor: SiglipImageProcessor  # open_clip's eval preprocessing, as a transformers processor
    tokenizer: SiglipTokenizer  # gives open_clip's ids when called with padding="max_length", truncation=True
    source: str  # the spec it came from, for the model card


def _unsupported(name: str, what: str) -> UserError:
    return UserError(f"open_clip model {name!r} is not supported as a SigLIP: {what}; use {SUPPORTED}")


def is_open_clip_siglip(cfg: Mapping[str, Any]) -> bool:
    """Whether an open_clip model config is a SigLIP (sigmoid loss with a logit bias, timm vision tower): the
    configs this module converts, and the ones `encoder.convert.open_clip` refuses for their `logit_bias`."""
    return cfg.get("init_logit_bias") is not None and bool(cfg.get("vision_cfg", {}).get("timm_model_name"))


def siglip_config_problem(cfg: Mapping[str, Any]) -> str | None:
    """What in an open_clip model config a SiglipModel cannot hold, found before building (and loading) it."""
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if "multimodal_cfg" in cfg:
        return "CoCa (captioning decoder)"
    if cfg.get("init_logit_bias") is None:
        return "no logit_bias (a softmax-loss CLIP: import it with the CLIP converter)"
    if not cfg.get("custom_text") and not text.get("hf_model_name"):
        return "custom_text false (open_clip's SigLIPs keep the text tower as its own module)"
    if not vision.get("timm_model_name"):
        return "open_clip's own vision transformer (SigLIPs use a timm tower)"
    if vision.get("timm_pool", "avg") != "map":
        return f"timm pooling {vision.get('timm_pool', 'avg')!r} (SiglipModel pools with an attention head, 'map')"
    if vision.get("timm_proj", "linear") not in ("none", ""):
        return f"a projection after the vision tower (timm_proj {vision.get('timm_proj', 'linear')!r})"
    if text.get("hf_model_name"):
        return f"Hugging Face text tower {text['hf_model_name']!r}"
    return None


def _activation(act: nn.Module, name: str, where: str) -> str:
    """The transformers activation name computing exactly what `act` computes."""
    from timm.layers.activations import GELUTanh

    if isinstance(act, GELUTanh) or (type(act) is nn.GELU and act.approximate == "tanh"):
        return "gelu_pytorch_tanh"
    if type(act) is nn.GELU and act.approximate == "none":
        return "gelu"
    raise _unsupported(name, f"{where} activation {act!r}")


def _one(values: set, name: str, what: str) -> Any:
    """A config holds one value per tower: several different ones cannot be converted."""
    if len(values) != 1:
        raise _unsupported(name, f"{what} differs inside one tower ({sorted(values)})")
    return values.pop()


def _layer_norm_eps(norms: list[nn.Module], name: str, where: str) -> float:
    if not all(isinstance(n, nn.LayerNorm) and n.elementwise_affine and n.bias is not None for n in norms):
        raise _unsupported(name, f"{where} normalisation that is not an affine LayerNorm with bias")
    return _one({n.eps for n in norms}, name, f"{where} LayerNorm eps")


def _identity(*modules: nn.Module) -> bool:
    """Whether every module is a no-op (timm and open_clip put nn.Identity where an option is off)."""
    return all(isinstance(m, nn.Identity) for m in modules)


def _vision_config(visual: nn.Module, name: str) -> dict[str, Any]:
    """SiglipVisionConfig fields read from the built timm tower, after checking each part SiglipModel has."""
    from open_clip.timm_model import TimmModel
    from timm.layers import AttentionPoolLatent, Mlp, PatchEmbed
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not isinstance(visual, TimmModel) or type(visual.trunk) is not VisionTransformer:
        raise _unsupported(name, f"vision tower {type(getattr(visual, 'trunk', visual)).__name__} (not a timm ViT)")
    if len(visual.head) != 0:
        raise _unsupported(name, "a projection after the vision tower (timm_proj)")
    trunk = visual.trunk
    if trunk.cls_token is not None or trunk.reg_token is not None or trunk.num_prefix_tokens:
        raise _unsupported(name, "class or register tokens in the vision tower")
    if trunk.pos_embed is None or trunk.dynamic_img_size:
        raise _unsupported(name, "vision position embedding that is absent or resized per image (dynamic_img_size)")
    embed = trunk.patch_embed
    if type(embed) is not PatchEmbed or embed.proj.bias is None or not _identity(embed.norm) or not embed.flatten:
        raise _unsupported(name, "patch embedding other than a biased convolution (norm or pre-norm variant)")
    (ih, iw), (ph, pw) = embed.img_size, embed.patch_size
    if ih != iw or ph != pw or embed.dynamic_img_pad:
        raise _unsupported(name, f"non-square image {embed.img_size} or patch {embed.patch_size}, or padded input")
    if not _identity(trunk.norm_pre, trunk.fc_norm, trunk.head) or isinstance(trunk.norm, nn.Identity):
        raise _unsupported(name, "vision pre-norm, fc_norm, classifier or missing final norm")

    blocks, acts, mlps, heads = list(trunk.blocks), set(), set(), set()
    for block in blocks:
        attn, mlp = block.attn, block.mlp
        if type(block) is not Block or type(attn) is not Attention or type(mlp) is not Mlp:
            raise _unsupported(name, f"vision block {type(block).__name__}/{type(attn).__name__}/{type(mlp).__name__}")
        if not _identity(block.ls1, block.ls2, attn.q_norm, attn.k_norm, attn.norm, mlp.norm):
            raise _unsupported(name, "vision layer scale, qk-norm or inner norms")
        acts.add(_activation(mlp.act, name, "vision"))
        mlps.add(mlp.fc1.out_features)
        heads.add(attn.num_heads)
    pool = trunk.attn_pool
    if type(pool) is not AttentionPoolLatent or pool.latent_len != 1 or pool.pos_embed is not None:
        raise _unsupported(name, f"vision pooling head {type(pool).__name__} (one latent query, no position embedding)")
    if pool.pool != "token" or pool.mlp is None or not _identity(pool.q_norm, pool.k_norm):
        raise _unsupported(name, "attention pooling head without its MLP, or with qk-norm")
    acts.add(_activation(pool.mlp.act, name, "vision head"))
    mlps.add(pool.mlp.fc1.out_features)
    heads.add(pool.num_heads)
    norms = [trunk.norm, pool.norm] + [n for b in blocks for n in (b.norm1, b.norm2)]
    return {
        "hidden_size": trunk.embed_dim, "intermediate_size": _one(mlps, name, "vision MLP width"),
        "num_hidden_layers": len(blocks), "num_attention_heads": _one(heads, name, "vision head count"),
        "num_channels": embed.proj.in_channels, "image_size": ih, "patch_size": ph,
        "hidden_act": _one(acts, name, "vision activation"), "layer_norm_eps": _layer_norm_eps(norms, name, "vision"),
    }


def _text_config(text: nn.Module, pool: str | None, name: str) -> dict[str, Any]:
    """SiglipTextConfig fields read from open_clip's built text transformer, after checking what SiglipModel has."""
    from open_clip.transformer import ResidualAttentionBlock, TextTransformer

    if not isinstance(text, TextTransformer):
        raise _unsupported(name, f"text tower {type(text).__name__}")
    if text.cls_emb is not None:
        raise _unsupported(name, "text CLS embedding (embed_cls)")
    if text.attn_mask is not None or text.use_pad_mask:
        raise _unsupported(name, "a causal or padding mask in the text transformer (SiglipModel attends everywhere)")
    if pool != "last":
        raise _unsupported(name, f"text pooling {pool!r} (SiglipModel pools at the last token)")
    if not isinstance(text.text_projection, nn.Linear):
        raise _unsupported(name, "a text projection that is not a Linear with bias (proj_bias)")
    blocks, acts, mlps = list(text.transformer.resblocks), set(), set()
    for block in blocks:
        attn = block.attn
        if type(block) is not ResidualAttentionBlock:
            raise _unsupported(name, f"text custom attention blocks ({type(block).__name__}: qk_norm/scale_*)")
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            raise _unsupported(name, "text layer scale (ls_init_value)")
        if not attn._qkv_same_embed_dim or attn.in_proj_bias is None or attn.bias_k is not None or attn.add_zero_attn:
            raise _unsupported(name, "text attention layout (separate q/k/v, no bias, or bias_kv)")
        acts.add(_activation(block.mlp.gelu, name, "text"))
        mlps.add(block.mlp.c_fc.out_features)
    norms = [text.ln_final] + [n for b in blocks for n in (b.ln_1, b.ln_2)]
    return {
        "vocab_size": text.token_embedding.num_embeddings, "hidden_size": text.width,
        "intermediate_size": _one(mlps, name, "text MLP width"), "num_hidden_layers": len(blocks),
        "num_attention_heads": text.heads, "max_position_embeddings": text.positional_embedding.shape[0],
        "hidden_act": _one(acts, name, "text activation"), "layer_norm_eps": _layer_norm_eps(norms, name, "text"),
        "projection_size": text.text_projection.out_features,
        # Token ids SiglipTextModel never reads (it pools the last position); the tokenizer's are set with it.
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    }


def siglip_config_from_open_clip(oc_model: nn.Module, name: str) -> tuple[SiglipConfig, str]:
    """Check every unsupported variant on a built open_clip model (the meta device will do: only modules are read)
    and derive the SiglipConfig; returns (config, the text tower's state-dict prefix)."""
    kind = type(oc_model).__name__
    if kind != "CustomTextCLIP":  # every open_clip SigLIP config sets custom_text: the text tower is its own module
        raise _unsupported(name, f"model class {kind}" + (" (captioning decoder)" if kind == "CoCa" else
                                                          " (custom_text false)" if kind == "CLIP" else ""))
    if getattr(oc_model, "logit_bias", None) is None:
        raise _unsupported(name, "no logit_bias (a softmax-loss CLIP: import it with the CLIP converter)")
    vision = _vision_config(oc_model.visual, name)
    text_module, prefix, pool, _ = _text_parts(oc_model)
    text = _text_config(text_module, pool, name)
    if text["projection_size"] != vision["hidden_size"]:  # SiglipModel compares the pooled vision output directly
        raise _unsupported(name, f"text embeddings of width {text['projection_size']} against vision width "
                                 f"{vision['hidden_size']}")
    return SiglipConfig(text_config=text, vision_config=vision), prefix


def _map_state_dict(take, config: SiglipConfig, text: str) -> dict:
    """Rename/reshape every open_clip weight (`take(key)`, see `convert_checked`) into SiglipModel's layout."""

    def pair(a: str, b: str) -> None:
        for part in ("weight", "bias"):
            out[f"{b}.{part}"] = take(f"{a}.{part}")

    out = {"logit_scale": take("logit_scale").reshape(1), "logit_bias": take("logit_bias").reshape(1)}
    v, hv = "visual.trunk.", "vision_model."
    pair(f"{v}patch_embed.proj", f"{hv}embeddings.patch_embedding")
    out[f"{hv}embeddings.position_embedding.weight"] = take(f"{v}pos_embed")[0]  # [1, patches, width]
    for i in range(config.vision_config.num_hidden_layers):
        src_block, dst = f"{v}blocks.{i}.", f"{hv}encoder.layers.{i}."
        for part in ("weight", "bias"):  # timm's fused qkv rows are q, then k, then v
            for proj, tensor in zip("qkv", take(f"{src_block}attn.qkv.{part}").chunk(3, dim=0)):
                out[f"{dst}self_attn.{proj}_proj.{part}"] = tensor
        for a, b in (("attn.proj", "self_attn.out_proj"), ("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            pair(f"{src_block}{a}", f"{dst}{b}")
    pair(f"{v}norm", f"{hv}post_layernorm")
    head, dst = f"{v}attn_pool.", f"{hv}head."
    out[f"{dst}probe"] = take(f"{head}latent")  # [1, 1, width]
    for part in ("weight", "bias"):  # nn.MultiheadAttention packs q, k, v; timm's kv rows are k, then v
        out[f"{dst}attention.in_proj_{part}"] = torch.cat([take(f"{head}q.{part}"), take(f"{head}kv.{part}")])
    for a, b in (("proj", "attention.out_proj"), ("norm", "layernorm"), ("mlp.fc1", "mlp.fc1"),
                 ("mlp.fc2", "mlp.fc2")):
        pair(f"{head}{a}", f"{dst}{b}")

    out["text_model.embeddings.token_embedding.weight"] = take(f"{text}token_embedding.weight")
    out["text_model.embeddings.position_embedding.weight"] = take(f"{text}positional_embedding")
    for i in range(config.text_config.num_hidden_layers):
        _map_block(take, out, f"{text}transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}.")
    pair(f"{text}ln_final", "text_model.final_layer_norm")
    pair(f"{text}text_projection", "text_model.head")
    return out


def convert_open_clip_siglip(oc_model: nn.Module, model_name_or_cfg: str | Mapping[str, Any]) -> SiglipModel:
    """Convert a built open_clip SigLIP into an equivalent transformers SiglipModel (eval, fp32), strictly.

    `model_name_or_cfg` names the model in messages, or is its open_clip config (checked before the modules).
    """
    model, name = convert_checked(oc_model, model_name_or_cfg, siglip_config_problem, _unsupported,
                                  siglip_config_from_open_clip, _map_state_dict, SiglipModel)
    config = model.config
    logger.info("converted open_clip SigLIP %s: vision %s x %s, text %s x %s", name,
                config.vision_config.num_hidden_layers, config.vision_config.hidden_size,
                config.text_config.num_hidden_layers, config.text_config.hidden_size)
    return model


def siglip_preprocess_cfg(oc_model: nn.Module, name: str) -> dict[str, Any]:
    """open_clip's eval preprocessing for this model. A model built from a weights file (not a pretrained tag)
    carries open_clip's CLIP defaults (OpenAI mean/std, shortest-edge crop), which SigLIP weights were not trained
    with: when every pretrained tag open_clip knows for `name` agrees, their mean, std, interpolation and resize
    mode are taken instead."""
    import open_clip

    cfg = dict(open_clip.get_model_preprocess_cfg(oc_model))
    tags = open_clip.list_pretrained_tags_by_model(name) if not name.startswith(LOCAL_DIR) else []
    keys = ("mean", "std", "interpolation", "resize_mode")
    published = {tuple(str(open_clip.get_pretrained_cfg(name, t).get(k)) for k in keys) for t in tags}
    if len(published) == 1:
        tag_cfg = open_clip.get_pretrained_cfg(name, tags[0])
        cfg.update({k: tag_cfg[k] for k in keys if tag_cfg.get(k) is not None})
    return cfg


def siglip_image_processor_from_open_clip(preprocess_cfg: Mapping[str, Any]) -> SiglipImageProcessor:
    """open_clip's eval transform as a SiglipImageProcessor: 'squash' resizes to the size (SigLIP's own), 'shortest'
    resizes the short side and center-crops. `crop_size` is set either way: LLaVA reads it for blank images.

    Not bit-exact: resampling differs slightly between torchvision's PIL path and transformers'.
    """
    size = preprocess_cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else size
    bilinear = preprocess_cfg.get("interpolation") == "bilinear"  # open_clip: anything else is bicubic
    common = {"resample": PILImageResampling.BILINEAR if bilinear else PILImageResampling.BICUBIC,
              "image_mean": list(preprocess_cfg["mean"]), "image_std": list(preprocess_cfg["std"]),
              "crop_size": {"height": h, "width": w}}
    mode = preprocess_cfg.get("resize_mode", "shortest")
    if mode == "squash":
        return SiglipImageProcessor(size={"height": h, "width": w}, do_center_crop=False, **common)
    if mode != "shortest" or h != w:
        logger.warning("open_clip resize_mode %r at size %s has no SiglipImageProcessor twin; "
                       "using shortest-edge resize + center crop", mode, size)
    return SiglipImageProcessor(size={"shortest_edge": min(h, w)}, do_center_crop=True, **common)


def _sentencepiece_file(hf_tokenizer: Any) -> str | None:
    """The SentencePiece model behind a transformers tokenizer, where it can be found on disk."""
    folder = getattr(hf_tokenizer, "name_or_path", "") or ""
    for path in (getattr(hf_tokenizer, "vocab_file", None), hf_tokenizer.init_kwargs.get("vocab_file"),
                 os.path.join(folder, "spiece.model") if folder else None):
        if isinstance(path, str) and path.endswith(".model") and os.path.isfile(path):
            return path
    return None


def siglip_tokenizer_from_open_clip(oc_tokenizer: Any, context_length: int, name: str) -> SiglipTokenizer:
    """open_clip's SigLIP tokenizer (a transformers tokenizer over a SentencePiece vocabulary, text canonicalized:
    lower case, punctuation removed) as transformers' SiglipTokenizer, which canonicalizes the same way.

    Checked, not assumed: it must give open_clip's ids for TOKENIZER_PROBES (with padding="max_length",
    truncation=True, as SiglipModel expects); otherwise, or without a SentencePiece file, `UserError`.
    """
    from open_clip.tokenizer import HFTokenizer, SigLipTokenizer, get_clean_fn

    def refuse(why: str) -> UserError:
        return UserError(f"open_clip model {name!r}: its tokenizer {why}, so it has no transformers twin and an "
                         "open_clip SigLIP is not imported without its tokenizer; use a SigLIP tokenizer over a "
                         "SentencePiece vocabulary (spiece.model), e.g. open_clip:local-dir:DIR with its files")

    if not isinstance(oc_tokenizer, (HFTokenizer, SigLipTokenizer)):
        raise refuse(f"is {type(oc_tokenizer).__name__}, not a Hugging Face SentencePiece tokenizer")
    if isinstance(oc_tokenizer, HFTokenizer):
        if oc_tokenizer.tokenizer_mode or oc_tokenizer.strip_sep_token:
            raise refuse(f"post-processes ids (tokenizer_mode {oc_tokenizer.tokenizer_mode!r}, strip_sep_token)")
        if oc_tokenizer.clean_fn is not get_clean_fn("canonicalize"):
            raise refuse("does not canonicalize text (tokenizer_kwargs clean != 'canonicalize')")
    if oc_tokenizer.context_length != context_length:
        raise refuse(f"pads to {oc_tokenizer.context_length} tokens, the model reads {context_length}")
    inner = oc_tokenizer.tokenizer
    spiece = _sentencepiece_file(inner)
    if spiece is None:
        raise refuse(f"({type(inner).__name__}) has no SentencePiece model file on disk")
    specials = {f"{kind}_token": getattr(inner, f"{kind}_token") for kind in ("eos", "unk", "pad")}
    twin = SiglipTokenizer(vocab_file=spiece, model_max_length=context_length,
                           **{k: v for k, v in specials.items() if v is not None})
    expected = oc_tokenizer(list(TOKENIZER_PROBES))
    got = twin(list(TOKENIZER_PROBES), padding="max_length", truncation=True, max_length=context_length,
               return_tensors="pt").input_ids
    for text, a, b in zip(TOKENIZER_PROBES, expected, got):
        if not torch.equal(a, b):
            raise refuse(f"gives other ids than SiglipTokenizer for {text[:40]!r} ({a.tolist()[:8]}... vs "
                         f"{b.tolist()[:8]}...)")
    return twin


def _open_clip_tokenizer(name: str, context_length: int) -> Any:
    """open_clip's own tokenizer for `name`; one that cannot be loaded here (a hub name offline, a missing folder)
    is the user's to provide."""
    import open_clip

    try:
        return open_clip.get_tokenizer(name, context_length=context_length)
    except OSError as e:
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"open_clip model {name!r}: its tokenizer could not be loaded ({detail}); an open_clip "
                        "SigLIP is not imported without its tokenizer: pass open_clip:local-dir:DIR with the "
                        "tokenizer files, or make the Hugging Face tokenizer it names available offline") from e


def load_open_clip_siglip(spec: str) -> OpenCLIPSiglipDense:
    """Load `open_clip:MODEL_NAME[:CHECKPOINT_FILE]` (or `open_clip:local-dir:DIR`) naming a SigLIP as a transformers
    SiglipModel with its image processor and tokenizer. Without a checkpoint the weights are open_clip's random init.
    Everything is checked before anything is returned; callers write nothing on `UserError`."""
    import open_clip

    name, checkpoint = parse_open_clip_spec(spec)
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise UserError(f"{spec}: unknown open_clip model {name!r}; see open_clip.list_models()")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise UserError(f"{spec}: checkpoint file {checkpoint!r} not found (pretrained tags are not downloaded "
                        "here: pass a local weights file)")
    problem = siglip_config_problem(cfg)
    if problem:
        raise _unsupported(name, problem)
    oc_tokenizer = _open_clip_tokenizer(name, cfg["text_cfg"].get("context_length", 64))
    oc_model = _create_open_clip(name, checkpoint, spec).eval()
    model = convert_open_clip_siglip(oc_model, name)
    text = model.config.text_config
    tokenizer = siglip_tokenizer_from_open_clip(oc_tokenizer, text.max_position_embeddings, name)
    text.pad_token_id, text.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    image_processor = siglip_image_processor_from_open_clip(siglip_preprocess_cfg(oc_model, name))
    return OpenCLIPSiglipDense(model=model, image_processor=image_processor, tokenizer=tokenizer, source=spec)
