"""Image-text data for training a CLIP-MoE: readers (LLaVA JSON, JSONL, CSV, TSV, tar shards) and torch datasets.
(The generated digit-grid data of the demo is upcycle.embedded.digit_grids.)"""

from .datasets import ImageTextDataset, collate, processor_transform, tokenizer_fn
from .family_inputs import family_label, model_tokenizer_fn, uses_sigmoid_loss
from .formats import SUPPORTED_EXTENSIONS, Pair, read_pairs
from .tar_index import expand_shards, index_tar_pairs
from .tar_shards import TarShardDataset, write_tar_shard

__all__ = [
    "SUPPORTED_EXTENSIONS", "ImageTextDataset", "Pair", "TarShardDataset", "collate",
    "expand_shards", "family_label", "index_tar_pairs", "model_tokenizer_fn", "processor_transform", "read_pairs", "tokenizer_fn", "uses_sigmoid_loss",
    "write_tar_shard",
]
