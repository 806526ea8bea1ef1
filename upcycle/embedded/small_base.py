"""A small dense CLIP sized for CPU work on a captioned data set, with a word-level tokenizer fitted to its captions.

This is the "pretrained base" of the embedded demo and the tests: it is randomly initialised here and
trained with `python -m upcycle train --trainable all` like any other CLIP. Real runs start from a real
CLIP instead (a transformers directory, a hub id or open_clip:NAME).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

from encoder.convert.dense import default_image_processor
from encoder.utils.errors import UserError
from encoder.utils.files import atomic_output_dir, check_output_dir
from encoder.utils.options import option, switch

SPECIALS = ("<pad>", "<unk>")  # ids 0, 1; <bos>, <eos> take the last two ids (CLIP's convention)
_WORDS = re.compile(r"\w+|[^\w\s]")


def build_word_tokenizer(texts: Iterable[str], max_length: int = 32, min_count: int = 1) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer over `texts` that adds <bos> ... <eos>, pads with <pad> (id 0) and
    puts <eos> last in the vocabulary, as CLIP's BPE tokenizer does."""
    counts = Counter(w for text in texts for w in _WORDS.findall(text.lower()))
    words = sorted(w for w, c in counts.items() if c >= min_count)
    if not words:
        raise UserError("no words found in the captions; a tokenizer needs non-empty captions")
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words, "<bos>", "<eos>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length)


def small_clip_config(vocab_size: int, width: int = 64, layers: int = 4, heads: int = 4, image_size: int = 32,
                      patch_size: int = 8, max_length: int = 32, projection_dim: int | None = None) -> CLIPConfig:
    """A CLIP config whose towers share width and depth; bos/eos are the vocabulary's last two ids."""
    if width % heads:
        raise UserError(f"width {width} must be a multiple of heads {heads}")
    if image_size % patch_size:
        raise UserError(f"image size {image_size} must be a multiple of the patch size {patch_size}")
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads)
    return CLIPConfig(
        text_config=dict(tower, vocab_size=vocab_size, max_position_embeddings=max_length, pad_token_id=0,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1),
        vision_config=dict(tower, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim or width,
    )


def init_small_clip(out: str | Path, captions: Iterable[str], width: int = 64, layers: int = 4, heads: int = 4,
                    image_size: int = 32, patch_size: int = 8, max_length: int = 32, seed: int = 0,
                    overwrite: bool = False) -> CLIPModel:
    """Write a randomly initialised small CLIP with its image processor and a tokenizer fitted to `captions`."""
    tokenizer = build_word_tokenizer(captions, max_length)
    config = small_clip_config(len(tokenizer), width, layers, heads, image_size, patch_size, max_length)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with atomic_output_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        default_image_processor(image_size).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return model


@dataclass(frozen=True)
class InitBaseConfig:
    """write a small randomly initialised CLIP with a tokenizer fitted to captions

    Writes a small dense CLIP (transformers layout, image processor, word-level tokenizer built from the data's
    captions) to train from scratch with `upcycle train --trainable all`: the base of the embedded demo. Real
    runs start from a real CLIP instead.
    """

    captions: str = option("--captions", "image-caption data file whose captions define the vocabulary")
    out: str = option("--out", "output CLIP directory")
    width: int = option("--width", "hidden size of both towers", 64)
    layers: int = option("--layers", "layers per tower", 4)
    heads: int = option("--heads", "attention heads", 4)
    image_size: int = option("--image-size", "model input size in pixels", 32)
    patch_size: int = option("--patch-size", "ViT patch size", 8)
    max_length: int = option("--max-length", "text context in tokens", 32)
    seed: int = option("--seed", "initialisation seed", 0)
    overwrite: bool = switch("--overwrite", "replace --out if it exists")


def run_init_base(cfg: InitBaseConfig) -> int:
    from ..data import read_pairs

    check_output_dir(cfg.out, cfg.overwrite)
    captions = [p.caption for p in read_pairs(cfg.captions, skip_missing=True)]
    model = init_small_clip(cfg.out, captions, cfg.width, cfg.layers, cfg.heads, cfg.image_size,
                            cfg.patch_size, cfg.max_length, cfg.seed, cfg.overwrite)
    print(f"small CLIP ({sum(p.numel() for p in model.parameters()):,} parameters, vocabulary "
          f"{model.config.text_config.vocab_size}) written to {cfg.out}")
    return 0
