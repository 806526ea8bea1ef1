"""A tiny Llama language model and a tokenizer trained offline, for tests and demos without downloads.

The tokenizer is a Llama-style BPE (sentencepiece conventions: '▁' marks word starts, `<s>` / `</s>`,
byte fallback so any text encodes) trained in seconds on the caller's own texts with `tokenizers`.
It saves and loads like any Llama tokenizer, including `AutoTokenizer.from_pretrained(dir, use_fast=False)`
as LLaVA's `load_pretrained_model` calls it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaTokenizer

from encoder.utils.files import atomic_output_dir

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, as in Llama
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))


def train_tokenizer(texts: Iterable[str], merges_vocab_size: int = 256) -> LlamaTokenizer:
    """A Llama tokenizer whose BPE merges are learnt from `texts`.

    merges_vocab_size: size of the learnt vocabulary (special tokens, characters, merges); the 256
    byte-fallback tokens come on top, so the tokenizer never maps text to `<unk>`.
    """
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=merges_vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    learnt = json.loads(bpe.to_str())["model"]
    vocab = dict(learnt["vocab"])
    for token in BYTE_TOKENS:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(pair) for pair in learnt["merges"]]
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)


def tiny_llama_config(
    tokenizer: LlamaTokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 512,
) -> LlamaConfig:
    """A small `LlamaConfig` sized to `tokenizer`, with its special-token ids."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.unk_token_id,  # LLaVA pads Llama with <unk>
        tie_word_embeddings=False,
    )


def save_tiny_llm(out: Path, texts: list[str], hidden_size: int = 128, initializer_range: float = 0.1,
                  seed: int = 0) -> None:
    """A randomly initialised 2-layer Llama and a tokenizer trained on `texts`, saved like any LLM directory.

    initializer_range: at Llama's 0.02 a random model barely responds to its inputs, so stage 1 (which
    trains only the projector) could hardly move its loss; at 0.1 the image tokens can steer it.
    """
    from transformers import LlamaForCausalLM

    tokenizer = train_tokenizer(texts, merges_vocab_size=512)
    config = tiny_llama_config(tokenizer, hidden_size=hidden_size, max_position_embeddings=2048)
    config.initializer_range = initializer_range
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with atomic_output_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
