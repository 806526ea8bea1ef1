"""Streaming sparse upcycling (`upcycle sparse`): the same files as the in-memory path, one tensor in memory.

The in-memory path (`sparse_upcycle` + `save_pretrained`) is the reference: the streamed directory must be
byte for byte the same weights and config. The memory mechanism is checked by counting what is alive, not
by timing: the writer must never see an [E, ...] expert stack and never hold two base tensors at once, and a
subprocess's peak RSS must not grow with the output (while the in-memory path's does, same measurement).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny_dense_clip, tiny_open_clip
from safetensors.torch import load_file, save_file

from encoder import CLIPMoEModel
from encoder.convert.dense import default_image_processor, open_dense_clip
from encoder.tensor_stream import (
    SafetensorsCheckpoint,
    SafetensorsFile,
    TensorSpec,
    lazy_model,
    write_safetensors,
)
from upcycle import moe_config_for, sparse_upcycle
from upcycle.cli import main
from upcycle.eval.function_check import max_output_diff, random_inputs
from upcycle.recipes.sparse import layerwise_output_diff, write_sparse_upcycled

ROOT = REPO_ROOT


def save_base(path: Path, dtype=torch.float32, **save_kwargs) -> Path:
    tiny_dense_clip().to(dtype).save_pretrained(path, **save_kwargs)
    default_image_processor(32).save_pretrained(path)
    return path


def in_memory_reference(base_dir: Path, out: Path, num_experts, top_k, layers, towers, seed) -> CLIPMoEModel:
    """What `upcycle sparse` wrote before streaming: from_pretrained, sparse_upcycle, save_pretrained."""
    from transformers import CLIPModel

    dense = CLIPModel.from_pretrained(base_dir).eval()
    model = sparse_upcycle(dense, num_experts, top_k, layers, towers, seed)
    model.save_pretrained(out)
    return model


def cli_sparse(base: str, out: Path, num_experts=4, top_k=2, layers="all", towers=("vision", "text"), seed=0):
    return main(["sparse", "--base", base, "--out", str(out), "--num-experts", str(num_experts), "--top-k",
                 str(top_k), "--moe-layers", layers, "--towers", ",".join(towers), "--seed", str(seed)])


@pytest.mark.parametrize("num_experts, top_k, layers, towers, seed", [
    (4, 2, "all", ("vision", "text"), 0),
    (3, 1, "odd", ("vision",), 5),
    (2, 2, "last:1", ("text",), 1),
])
def test_streamed_directory_equals_the_in_memory_path_byte_for_byte(tmp_path, capsys, num_experts, top_k, layers,
                                                                     towers, seed):
    base = save_base(tmp_path / "dense")
    assert cli_sparse(str(base), tmp_path / "moe", num_experts, top_k, layers, towers, seed) == 0
    assert "identical to the dense model" in capsys.readouterr().out
    reference = in_memory_reference(base, tmp_path / "ref", num_experts, top_k, layers, towers, seed)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "moe" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name

    loaded = CLIPMoEModel.from_pretrained(tmp_path / "moe")
    expected = reference.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    dense = tiny_dense_clip().state_dict()
    tower = {"vision": "vision_model", "text": "text_model"}[towers[0]]
    layer = loaded.config.vision_config.moe_layers[-1] if towers[0] == "vision" else \
        loaded.config.text_config.moe_layers[-1]
    experts = getattr(loaded, tower).encoder.layers[layer].mlp.experts
    for e in range(num_experts):
        assert torch.equal(experts.up_proj[e], dense[f"{tower}.encoder.layers.{layer}.mlp.fc1.weight"])
        assert torch.equal(experts.down_proj_bias[e], dense[f"{tower}.encoder.layers.{layer}.mlp.fc2.bias"])


def test_half_precision_base_stays_half_and_matches(tmp_path):
    base = save_base(tmp_path / "dense", dtype=torch.float16)
    assert cli_sparse(str(base), tmp_path / "moe") == 0
    in_memory_reference(base, tmp_path / "ref", 4, 2, "all", ("vision", "text"), 0)
    assert (tmp_path / "moe" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    assert CLIPMoEModel.from_pretrained(tmp_path / "moe").dtype == torch.float16


def test_sharded_base_is_streamed_from_its_shards(tmp_path):
    base = save_base(tmp_path / "dense", max_shard_size="100KB")
    assert (base / "model.safetensors.index.json").is_file()
    assert len(SafetensorsCheckpoint(base).files) > 1
    assert cli_sparse(str(base), tmp_path / "moe") == 0
    in_memory_reference(base, tmp_path / "ref", 4, 2, "all", ("vision", "text"), 0)
    assert (tmp_path / "moe" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()


def test_open_clip_base_is_converted_in_memory_then_streamed(tmp_path, capsys, batch):

    name = "test-streaming-occ"
    torch.save(tiny_open_clip(tmp_path, name).state_dict(), tmp_path / "weights.pt")
    spec = f"open_clip:{name}:{tmp_path / 'weights.pt'}"

    base = open_dense_clip(spec)
    assert not base.streamed  # open_clip has no transformers checkpoint to stream from
    assert cli_sparse(spec, tmp_path / "moe") == 0
    assert "identical to the dense model" in capsys.readouterr().out
    reference = sparse_upcycle(base.model, 4, 2, "all", ("vision", "text"), 0)
    loaded = CLIPMoEModel.from_pretrained(tmp_path / "moe")
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


class LiveTensors:
    """Wraps a TensorSource's `get`: how many tensors it handed out are alive at once, and their bytes."""

    def __init__(self, source):
        self.source, self.alive, self.max_alive, self.bytes, self.max_bytes = source, 0, 0, 0, 0
        self.get = source.get
        source.get = self

    def __call__(self, name):
        tensor = self.get(name)
        self.alive += 1
        self.bytes += tensor.nbytes
        self.max_alive, self.max_bytes = max(self.max_alive, self.alive), max(self.max_bytes, self.bytes)
        weakref.finalize(tensor, self._free, tensor.nbytes)
        return tensor

    def _free(self, nbytes):
        self.alive -= 1
        self.bytes -= nbytes


def test_writer_holds_one_base_tensor_and_never_an_expert_stack(tmp_path, monkeypatch):
    import encoder.tensor_stream as ts

    base_dir = save_base(tmp_path / "dense")
    base = open_dense_clip(str(base_dir))
    live = LiveTensors(base.tensors)
    pieces = []
    real_write = ts._write_tensor

    def spy(f, tensor):
        pieces.append((tuple(tensor.shape), tensor.nbytes, live.alive))
        return real_write(f, tensor)

    monkeypatch.setattr(ts, "_write_tensor", spy)
    config = moe_config_for(base.config, 8, 2, "all", ("vision", "text"))
    (tmp_path / "moe").mkdir()
    write_sparse_upcycled(base, config, tmp_path / "moe")

    largest_dense = max(base.tensors.spec(k).nbytes for k in base.tensors.keys())
    expert_stack = 8 * base.tensors.spec("vision_model.encoder.layers.0.mlp.fc1.weight").nbytes
    assert max(n for _, n, _ in pieces) <= largest_dense < expert_stack
    assert not any(len(shape) == 3 and shape[0] == 8 for shape, _, _ in pieces)  # no [E, h, d] tensor written
    assert live.max_alive == 1  # each base tensor is released before the next one is read
    assert max(alive for _, _, alive in pieces) <= 1
    assert sum(n for _, n, _ in pieces) == sum(t.nbytes for t in load_file(tmp_path / "moe" / "model.safetensors").values())


RSS_SCRIPT = """
import json, re, sys
import torch
from encoder.convert.dense import open_dense_clip
from upcycle import moe_config_for
from upcycle.recipes.sparse import moe_skeleton, write_sparse_upcycled

def kib(field):
    return int(re.search(field + r":\\s*(\\d+)", open("/proc/self/status").read()).group(1))

base = open_dense_clip(sys.argv[1])
config = moe_config_for(base.config, 8, 2, "all", ("vision", "text"))
moe_skeleton(config, torch.float32)  # warm-up: the modeling imports are not what is measured
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
except OSError:
    print(json.dumps({"growth_bytes": None}))
    sys.exit(0)
start = kib("VmRSS")
if sys.argv[3] == "streaming":
    write_sparse_upcycled(base, config, sys.argv[2])
else:  # the in-memory path, as a control that the measurement sees a model being built
    from transformers import CLIPModel
    from upcycle.recipes.assemble import assemble_clip_moe
    dense = CLIPModel.from_pretrained(sys.argv[1])
    assemble_clip_moe(dense, config).save_pretrained(sys.argv[2])
print(json.dumps({"growth_bytes": (kib("VmHWM") - start) * 1024}))
"""


def test_peak_memory_does_not_grow_with_the_output(tmp_path):
    """A width-256 CLIP with 8 experts everywhere (~145 MB output): streaming raises the process's peak RSS
    (VmHWM, reset just before) by far less than the output, the in-memory path by more (the control)."""
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(tower, vocab_size=1000, max_position_embeddings=32, eos_token_id=999,
                                         bos_token_id=998, pad_token_id=0),
                        vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=64)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "dense")
    growth = {}
    for mode in ("streaming", "in_memory"):
        out = tmp_path / mode
        out.mkdir()
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(RSS_SCRIPT), str(tmp_path / "dense"),
                                 str(out), mode], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-2000:]
        growth[mode] = json.loads(result.stdout.strip().splitlines()[-1])["growth_bytes"]
        if growth[mode] is None:
            pytest.skip("/proc/self/clear_refs is not writable here: the peak RSS cannot be reset")
    output = (tmp_path / "streaming" / "model.safetensors").stat().st_size
    assert output > 100e6
    assert (tmp_path / "streaming" / "model.safetensors").read_bytes() == \
        (tmp_path / "in_memory" / "model.safetensors").read_bytes()
    assert growth["in_memory"] > output, growth
    assert growth["streaming"] < 0.25 * output, growth


def test_layerwise_check_equals_the_in_memory_check_and_sees_a_changed_expert(tmp_path):
    base_dir = save_base(tmp_path / "dense")
    base = open_dense_clip(str(base_dir))
    config = moe_config_for(base.config, 4, 2, "all", ("vision", "text"))
    out = tmp_path / "moe"
    out.mkdir()
    write_sparse_upcycled(base, config, out)
    dense = tiny_dense_clip()
    inputs = random_inputs(dense)
    assert layerwise_output_diff(base, out, inputs) == max_output_diff(dense, CLIPMoEModel.from_pretrained(out),
                                                                      inputs)

    tensors = load_file(out / "model.safetensors")
    up = tensors["vision_model.encoder.layers.2.mlp.experts.up_proj"]
    up[1] += torch.randn(up[1].shape, generator=torch.Generator().manual_seed(0))  # expert 1 is no longer a copy
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    diff = layerwise_output_diff(base, out, inputs)
    assert diff["vision_hidden_states"] > 1e-3 and diff["text_hidden_states"] <= 1e-5


def test_lazy_model_loads_one_module_at_a_time_and_releases_it(tmp_path):
    moe = sparse_upcycle(tiny_dense_clip())
    moe.save_pretrained(tmp_path / "moe")
    source = SafetensorsCheckpoint(tmp_path / "moe")
    live = LiveTensors(source)
    lazy = lazy_model(lambda: CLIPMoEModel(moe.config), source)
    assert all(p.is_meta for p in lazy.parameters())
    inputs = random_inputs(tiny_dense_clip())
    with torch.no_grad():
        got, want = lazy(**inputs), moe(**inputs)
    assert torch.equal(got.image_embeds, want.image_embeds) and torch.equal(got.text_embeds, want.text_embeds)
    assert all(p.is_meta for p in lazy.parameters())  # released after use
    own = [sum(p.nbytes for p in m.parameters(recurse=False)) for m in moe.modules()]
    top = sum(p.nbytes for p in moe.parameters(recurse=False))  # logit_scale: loaded for the whole forward
    assert live.max_bytes <= max(own) + top
    assert live.alive == 0


def test_safetensors_writer_round_trips_mixed_dtypes_and_checks_what_it_is_given(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2, 2).half(),
               "d": torch.randn(7).bfloat16(), "e": torch.tensor(1.5), "f": torch.empty(0, 3)}
    specs = {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    write_safetensors(tmp_path / "x.safetensors", specs, tensors.__getitem__, {"format": "pt"})
    back = load_file(tmp_path / "x.safetensors")
    mine = SafetensorsFile(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        assert torch.equal(back[k], v) and torch.equal(mine.get(k), v), k
    single = {k: tensors[k] for k in ("a", "e")}
    save_file(single, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    write_safetensors(tmp_path / "y.safetensors", {k: specs[k] for k in single}, single.__getitem__, {"format": "pt"})
    assert (tmp_path / "y.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()

    with pytest.raises(ValueError, match="needs"):
        write_safetensors(tmp_path / "z.safetensors", {"a": specs["a"]}, lambda _: torch.randn(3, 3))
    with pytest.raises(ValueError, match="header says"):
        write_safetensors(tmp_path / "z.safetensors", {"a": specs["a"]}, lambda _: torch.randn(3, 4).double())


@pytest.mark.parametrize("case", ["truncated", "shape"])
def test_bad_base_weights_are_one_line_and_write_nothing(case, tmp_path, capsys):
    base = save_base(tmp_path / "dense")
    weights = base / "model.safetensors"
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
        expect = "weights cannot be loaded"
    else:
        config = json.loads((base / "config.json").read_text())
        config["vision_config"]["intermediate_size"] = 48
        (base / "config.json").write_text(json.dumps(config))
        expect = "has shape"
    assert cli_sparse(str(base), tmp_path / "moe") == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0] and "re-" in lines[0], lines
    assert not (tmp_path / "moe").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failure_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    base = save_base(tmp_path / "dense")
    calls = []
    real_get = SafetensorsFile.get

    def failing_get(self, name):
        calls.append(name)
        if len(calls) == 10:
            raise OSError("disk went away")
        return real_get(self, name)

    monkeypatch.setattr(SafetensorsFile, "get", failing_get)
    with pytest.raises(OSError, match="disk went away"):
        cli_sparse(str(base), tmp_path / "moe")
    assert not (tmp_path / "moe").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_pytorch_bin_base_is_loaded_in_memory_then_streamed(tmp_path):
    base = tmp_path / "dense"
    model = tiny_dense_clip()
    model.config.save_pretrained(base)
    torch.save(model.state_dict(), base / "pytorch_model.bin")
    assert not SafetensorsCheckpoint.exists(base)
    assert not open_dense_clip(str(base)).streamed
    assert cli_sparse(str(base), tmp_path / "moe") == 0
    in_memory_reference(base, tmp_path / "ref", 4, 2, "all", ("vision", "text"), 0)
    assert (tmp_path / "moe" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
