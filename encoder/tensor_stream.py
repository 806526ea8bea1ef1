"""Tensor-at-a-time checkpoint I/O: read safetensors without loading a model, write them without holding one.

Why: a real-size CLIP-MoE (ViT-L/14-336, 4 experts in every layer) is ~4.5 GiB. Building it through
`CLIPModel.from_pretrained` + a full `CLIPMoEModel` + `save_pretrained` holds the base, the MoE model and
serialisation copies at once (2.7x the output). Here:

- `SafetensorsCheckpoint` reads one tensor at a time with plain file reads (no mmap, so the file's pages
  never count towards this process's resident memory), from one file or an HF shard index;
- `write_safetensors` writes a file whose header is known up front, pulling each tensor's bytes from a
  producer in file order, so only the tensor being written is in memory;
- `lazy_model` builds a model whose parameters live on the meta device and are read from a checkpoint
  module by module while it runs, so a forward pass (the dense-vs-MoE check) costs one module's weights.

The files written are the format safetensors itself writes (same tensor order, header layout and
padding), so a directory written here loads with `from_pretrained` like one written by `save_pretrained`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .weight_files import (
    SAFETENSORS_FILE,
    is_index,
    is_safetensors,
    weights_entry,
)

# safetensors dtype names <-> torch dtypes (the ones a CLIP checkpoint can hold).
DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
WEIGHTS_FILE = SAFETENSORS_FILE


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as safetensors (truncated, corrupt, or not safetensors at all)."""


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor will be in a file: dtype and shape (its bytes come later)."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class TensorSource:
    """Named tensors handed out one at a time: what streaming readers and in-memory state dicts share."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def spec(self, name: str) -> TensorSpec:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in set(self.keys())

    def close(self) -> None:
        pass


class StateDictSource(TensorSource):
    """An in-memory state dict (e.g. a base converted from open_clip) seen as a `TensorSource`."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]):
        self.state_dict = state_dict

    def keys(self) -> list[str]:
        return list(self.state_dict)

    def __contains__(self, name: str) -> bool:
        return name in self.state_dict

    def spec(self, name: str) -> TensorSpec:
        t = self.state_dict[name]
        return TensorSpec(t.dtype, tuple(t.shape))

    def get(self, name: str) -> torch.Tensor:
        return self.state_dict[name]


class SafetensorsFile(TensorSource):
    """One .safetensors file: the header is parsed and checked once; `get` reads a single tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            self._entries, self._data_start = _read_header(self._file, self.path)
        except BaseException:
            self._file.close()
            raise

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def spec(self, name: str) -> TensorSpec:
        return self._entries[name][0]

    def get(self, name: str) -> torch.Tensor:
        spec, start, end = self._entries[name]
        if end == start:
            return torch.empty(spec.shape, dtype=spec.dtype)
        buf = bytearray(end - start)
        self._file.seek(self._data_start + start)
        if self._file.readinto(buf) != len(buf):
            raise CheckpointError(f"{self.path}: file ends inside tensor {name!r} (truncated download?)")
        return torch.frombuffer(buf, dtype=spec.dtype).reshape(spec.shape)

    def close(self) -> None:
        self._file.close()


class SafetensorsCheckpoint(TensorSource):
    """A model directory's safetensors weights: the file or shard index `from_pretrained` reads
    (`encoder.weight_files.weights_entry`), so a directory holding both is read as transformers reads it."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        entry = weights_entry(directory)
        index = entry if is_safetensors(entry) and is_index(entry) else None
        self.files: list[SafetensorsFile] = []
        self._where: dict[str, SafetensorsFile] = {}
        try:
            if index is not None:
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (ValueError, KeyError, TypeError) as err:
                    raise CheckpointError(f"{index} is not a shard index ({type(err).__name__})") from None
                shards = {}
                for name, shard in weight_map.items():
                    if shard not in shards:
                        shards[shard] = SafetensorsFile(directory / shard)
                        self.files.append(shards[shard])
                    if name not in shards[shard]:
                        raise CheckpointError(f"{index} puts {name!r} in {shard}, which does not hold it")
                    self._where[name] = shards[shard]
            else:  # no safetensors at all: model.safetensors, for the FileNotFoundError that names it
                f = SafetensorsFile(entry if is_safetensors(entry) else directory / WEIGHTS_FILE)
                self.files.append(f)
                self._where = {name: f for name in f.keys()}
        except BaseException:
            self.close()
            raise

    @staticmethod
    def exists(directory: str | os.PathLike) -> bool:
        """Whether the weights `from_pretrained` reads from `directory` are safetensors (not pytorch_model.bin)."""
        return is_safetensors(weights_entry(directory))

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def spec(self, name: str) -> TensorSpec:
        return self._where[name].spec(name)

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get(name)

    def close(self) -> None:
        for f in self.files:
            f.close()


def _read_header(f, path: Path) -> tuple[dict[str, tuple[TensorSpec, int, int]], int]:
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    if len(raw) != 8:
        raise CheckpointError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(f"{path} is not a safetensors file (header length {n} does not fit the file)")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    entries = {}
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has an unreadable or unsupported header entry") from None
        spec = TensorSpec(dtype, shape)
        if not 0 <= start <= end <= data_size or end - start != spec.nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} does not fit the file (truncated or corrupt)")
        entries[name] = (spec, start, end)
    return entries, 8 + n


def file_order(specs: Mapping[str, TensorSpec]) -> list[str]:
    """The order safetensors writes tensors in: larger dtypes first (keeps every tensor aligned), then by name.

    For files of one dtype (every CLIP-MoE we write) this is exactly safetensors' own order.
    """
    return sorted(specs, key=lambda name: (-_element_size(specs[name].dtype), name))


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def encode_header(specs: Mapping[str, TensorSpec], order: list[str], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length + JSON header safetensors writes (compact JSON, padded with spaces to 8 bytes)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        spec = specs[name]
        header[name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                        "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text


# What a producer returns for one tensor: the tensor itself, or consecutive pieces whose bytes, concatenated,
# are that tensor (an expert stack = the same dense FFN weight E times, never materialised as [E, ...]).
Produced = torch.Tensor | Iterable[torch.Tensor]


def write_safetensors(
    path: str | os.PathLike,
    specs: Mapping[str, TensorSpec],
    produce: Callable[[str], Produced],
    metadata: Mapping[str, str] | None = None,
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
) -> Path:
    """Write `specs` to `path` in safetensors format, calling `produce(name)` for each tensor in file order.

    Each piece is checked against its spec (dtype, total size) before the next is asked for, so nothing
    but the piece being written is held here. A failure leaves a partial file: write inside a temporary
    directory (`encoder.utils.files.atomic_output_dir`) so it is never seen.
    """
    path = Path(path)
    order = file_order(specs)
    with open(path, "wb") as f:
        f.write(encode_header(specs, order, metadata))
        for name in progress(order) if progress is not None else order:
            spec = specs[name]
            pieces = produce(name)
            if isinstance(pieces, torch.Tensor):
                pieces = (pieces,)
            written = 0
            for piece in pieces:
                if piece.dtype != spec.dtype:
                    raise ValueError(f"tensor {name!r}: produced {piece.dtype}, the header says {spec.dtype}")
                written += _write_tensor(f, piece)
                if written > spec.nbytes:
                    break
            if written != spec.nbytes:
                raise ValueError(f"tensor {name!r}: produced {written} bytes, its shape {spec.shape} needs "
                                 f"{spec.nbytes}")
            pieces = piece = None  # drop this tensor before the next one is produced: one tensor alive at a time
    return path


def _write_tensor(f, tensor: torch.Tensor) -> int:
    """Write a tensor's raw little-endian bytes without an intermediate `bytes` copy."""
    t = tensor.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return 0
    data = t.reshape(-1).view(torch.uint8).numpy()
    f.write(memoryview(data))
    return data.nbytes


def return_large_frees_to_os(threshold: int = 1 << 20) -> bool:
    """Make glibc serve allocations >= `threshold` bytes with mmap, so a freed tensor goes back to the OS at once.

    Why: glibc raises its mmap threshold after every large free (up to 32 MB), after which the 4-64 MB tensors
    a streaming pass reads one after another, interleaved with activations, are carved out of the heap and
    fragment it. Measured on the ViT-L/14-336 dense-vs-MoE check: 2.7 GiB peak RSS without this, 1.2 GiB with
    it. Process-wide, so only commands call it. Returns False where the C library has no `mallopt`.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # glibc's M_MMAP_THRESHOLD; setting it also turns the dynamic threshold off
    return bool(mallopt(m_mmap_threshold, threshold))


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Models built inside get meta-device parameters but real buffers (e.g. CLIP's position_ids).

    `torch.device("meta")` would make the non-persistent buffers meta too, and those are not in any
    checkpoint, so a lazily loaded model could not run. Parameters are moved at registration, before any
    weight init touches their memory.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param):
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def lazy_model(build: Callable[[], nn.Module], source: TensorSource, prefix: str = "",
               dtype: torch.dtype | None = None) -> nn.Module:
    """`build()` with meta parameters, each module's own parameters read from `source` just before its forward
    and dropped right after: a forward pass holds one module's weights (plus activations) at a time.

    Modules whose forward reads their children's parameters directly (`whole_module`: `nn.MultiheadAttention`'s
    out_proj, a vision embedding's position table) load their whole subtree at their own forward instead.
    For inference only (no autograd state is kept across modules). A parameter that is used outside its
    module's forward would stay on meta and fail loudly there, not compute something wrong.
    """
    with parameters_on_meta():
        model = build()
    model.eval().requires_grad_(False)
    inside_whole = set()
    for module_name, module in model.named_modules():
        if module_name in inside_whole:
            continue
        whole = whole_module(module)
        if whole:
            inside_whole.update(f"{module_name}.{n}" if module_name else n for n, _ in module.named_modules()
                                if n)
        names = [n for n, _ in module.named_parameters(recurse=whole)]
        if not names:
            continue
        keys = {n: prefix + (f"{module_name}.{n}" if module_name else n) for n in names}
        missing = [k for k in keys.values() if k not in source]
        if missing:
            raise KeyError(f"checkpoint lacks {missing[0]}")
        module.register_forward_pre_hook(_loader(keys, source, dtype))
        module.register_forward_hook(_releaser(names))
    return model


def whole_module(module: nn.Module) -> bool:
    """Whether `module`'s forward uses its children's parameters without calling them (so `lazy_model` loads its
    subtree as one): `nn.MultiheadAttention` (out_proj), a tower's vision embeddings (SigLIP2 resizes the position
    table it reads as `.weight`)."""
    return isinstance(module, nn.MultiheadAttention) or type(module).__name__.endswith("VisionEmbeddings")


def _loader(keys: dict[str, str], source: TensorSource, dtype: torch.dtype | None):
    def hook(module, args):
        for n, key in keys.items():
            t = source.get(key)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            owner, _, leaf = n.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            target._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    return hook


def _releaser(names: list[str]):
    def hook(module, args, output):
        for n in names:
            owner, _, leaf = n.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            p = target._parameters[leaf]
            target._parameters[leaf] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                    requires_grad=False)
    return hook
