"""Image-text data for training a CLIP-MoE: readers (LLaVA JSON, JSONL, CSV, TSV, tar shards) and torch datasets.
(The generated digit-grid data of the demo is upcycle.embedded.digit_grids.)"""

from .datasets import ImageTextDataset, collate, processor_transform, tokenizer_fn
from .formats import SUPPORTED_EXTENSIONS, Pair, read_pairs
from .tar_index import expand_shards, index_tar_pairs
from .tar_shards import TarShardDataset, write_tar_shard

__all__ = [
    "SUPPORTED_EXTENSIONS", "ImageTextDataset", "Pair", "TarShardDataset", "collate", "expand_shards", "index_tar_pairs",
    "processor_transform", "read_pairs", "tokenizer_fn", "write_tar_shard",
]
