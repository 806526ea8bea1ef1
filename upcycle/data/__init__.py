"""Image-text data for training a CLIP-MoE: readers (LLaVA JSON, JSONL, CSV, TSV, tar shards), torch datasets,
and a generated, checkable task of handwritten-digit grids."""

from .datasets import ImageTextDataset, collate, processor_transform, tokenizer_fn
from .formats import SUPPORTED_EXTENSIONS, Pair, read_pairs
from .tar_index import expand_shards, index_tar_pairs
from .tar_shards import TarShardDataset, write_tar_shard

__all__ = [
    "SUPPORTED_EXTENSIONS", "ImageTextDataset", "Pair", "TarShardDataset", "collate", "expand_shards", "index_tar_pairs",
    "processor_transform", "read_pairs", "tokenizer_fn", "write_tar_shard",
]
