"""Shared tiny models: everything is built in-process (no network, no hub)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CLIPConfig, CLIPModel

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout; tests at any depth use this, not parents[N]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# A parallel run (pytest-xdist, `-n 2`: PYTEST_XDIST_WORKER names the worker) gives each worker one thread, and the
# commands its tests start one too, so two workers do not oversubscribe two cores; a serial run keeps two.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 100
EOS = VOCAB - 1
BOS = VOCAB - 2


def tiny_clip_config(hidden_act: str = "quick_gelu", layers: int = 4, width: int = 32) -> CLIPConfig:
    """A 4-layer, width-32 CLIP over 32x32 images (16 patches) and a 100-token vocabulary."""
    return CLIPConfig(
        text_config=dict(
            hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2,
            vocab_size=VOCAB, max_position_embeddings=16, eos_token_id=EOS, bos_token_id=BOS, pad_token_id=0,
            hidden_act=hidden_act,
        ),
        vision_config=dict(
            hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2,
            image_size=32, patch_size=8, hidden_act=hidden_act,
        ),
        projection_dim=16,
    )


def tiny_dense_clip(seed: int = 0, **kwargs) -> CLIPModel:
    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config(**kwargs)).eval()


def tiny_batch(batch: int = 3, seq: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """Pixels plus right-padded token ids (BOS ... EOS, then zeros) with a matching attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        n = 4 + (b * 3) % (seq - 4)
        ids[b, 0] = BOS
        ids[b, 1 : n - 1] = torch.randint(1, BOS, (n - 2,), generator=g)
        ids[b, n - 1] = EOS
        mask[b, :n] = 1
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask}


@pytest.fixture
def dense_clip() -> CLIPModel:
    return tiny_dense_clip()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return tiny_batch()


# Saved towers and LLaVA checkpoints (tests/encoder/test_tower.py, tests/mllm_bridge/): built once per session.

CAPTIONS = ["USER: <image>\nWhat is in the image? ASSISTANT: a handwritten digit on a grid",
            "a photo of a cat", "the quick brown fox jumps over the lazy dog"]


def save_tiny_clip_moe(out, seed: int = 0, vision_only: bool = False):
    """A CLIP-MoE of `tiny_dense_clip(seed)` (vision MoE in all layers, top-2 of 4) with its image processor.

    The experts are perturbed apart, so the CLIP-MoE no longer computes its dense base's function.
    """
    from encoder import save_clip_moe
    from encoder.convert.dense import default_image_processor
    from upcycle import sparse_upcycle

    moe = sparse_upcycle(tiny_dense_clip(seed), num_experts=4, top_k=2, moe_layers="all", towers=("vision",))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in moe.vision_model.encoder.layers:
            up = layer.mlp.experts.up_proj
            up.add_(0.5 * up.std() * torch.randn(up.shape, generator=g))
    model = moe.vision_model if vision_only else moe
    return save_clip_moe(model, out, image_processor=default_image_processor(32))


def save_tiny_dense_clip(out, seed: int = 0):
    """`tiny_dense_clip(seed)` saved as a transformers CLIP directory with its image processor."""
    from encoder.convert.dense import default_image_processor

    tiny_dense_clip(seed).save_pretrained(out)
    default_image_processor(32).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def clip_moe_dir(tmp_path_factory):
    return save_tiny_clip_moe(tmp_path_factory.mktemp("towers") / "clip-moe")


@pytest.fixture(scope="session")
def dense_clip_dir(tmp_path_factory):
    """The dense base of `clip_moe_dir`."""
    return save_tiny_dense_clip(tmp_path_factory.mktemp("towers") / "clip")


@pytest.fixture(scope="session")
def llama_tokenizer():
    from mllm_bridge.embedded.tiny_lm import train_tokenizer

    return train_tokenizer(CAPTIONS * 4, merges_vocab_size=160)


def save_tiny_llava(out: Path, tower_dir, llama_tokenizer) -> Path:
    """`out` holding a LLaVA-1.5-style checkpoint (tiny Llama, mlp2x_gelu projector, seed 0) over `tower_dir`."""
    from mllm_bridge.embedded.tiny_lm import tiny_llama_config
    from mllm_bridge.llava.model import build_llava_model

    torch.manual_seed(0)
    model = build_llava_model(tiny_llama_config(llama_tokenizer, hidden_size=32), tower_dir)
    model.save_pretrained(out)
    llama_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llava_moe_dir(tmp_path_factory, clip_moe_dir, llama_tokenizer):
    """A saved LLaVA-1.5-style checkpoint (tiny Llama, mlp2x_gelu projector) whose tower is `clip_moe_dir`."""
    return save_tiny_llava(tmp_path_factory.mktemp("checkpoints") / "llava-tiny-clip-moe", clip_moe_dir,
                           llama_tokenizer)


@pytest.fixture
def llava_config_dir(llava_moe_dir, tmp_path):
    """A copy of `llava_moe_dir`'s config.json alone (all that `mllm_bridge check | swap-tower` read or write), for
    a test to edit."""
    out = tmp_path / "llava-copy"
    out.mkdir()
    shutil.copy(llava_moe_dir / "config.json", out)
    return out


def update_config_json(directory, **values):
    """Set `values` in `directory`/config.json, keeping the rest."""
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}, indent=2))


# Tiny digit-grid data and a small-base CLIP for training and evaluation tests (tests/upcycle).

@pytest.fixture(scope="session")
def grids_dir(tmp_path_factory):
    from upcycle.embedded.digit_grids import make_digit_grids

    out = tmp_path_factory.mktemp("data") / "grids"
    make_digit_grids(out, num_train=96, num_val=8, num_test=32, image_size=32, grid=2, seed=0)
    return out


@pytest.fixture(scope="session")
def base_clip_dir(tmp_path_factory, grids_dir):
    """A width-32, 2-layer dense CLIP with a word tokenizer fitted to the digit captions."""
    import json

    from upcycle.embedded.small_base import init_small_clip

    out = tmp_path_factory.mktemp("models") / "base"
    captions = [r["conversations"][1]["value"] for r in json.loads((grids_dir / "train.json").read_text())]
    init_small_clip(out, captions, width=32, layers=2, heads=2, image_size=32, patch_size=8, max_length=24, seed=0)
    return out


def dataset_for(loaded, data_file):
    """The training dataset of a loaded CLIP over a data file (what the commands build)."""
    from upcycle.data import ImageTextDataset, processor_transform, read_pairs, tokenizer_fn

    pairs = read_pairs(data_file)
    max_len = loaded.model.config.text_config.max_position_embeddings
    tokenize = tokenizer_fn(loaded.tokenizer, max_len)
    return ImageTextDataset(pairs, processor_transform(loaded.image_processor), tokenize)


# A tiny language model for LLaVA training tests (tests/mllm_bridge/test_train_*.py).

@pytest.fixture(scope="session")
def digit_llm_dir(tmp_path_factory, grids_dir):
    """A 2-layer, width-32 Llama with a tokenizer trained on the digit grids' captions, questions and answers."""
    from mllm_bridge.embedded.tiny_lm import save_tiny_llm
    from mllm_bridge.embedded.training import training_texts

    out = tmp_path_factory.mktemp("llm") / "llm"
    save_tiny_llm(out, training_texts(grids_dir), hidden_size=32)
    return out


# Images of several shapes (LLaVA-1.6's anyres) and LLaVA stage 2 under the sharded engines.

SHAPES = [(32, 32), (64, 32), (32, 64)]  # (width, height): square, wide, tall


def write_shaped_grids(grids_dir, out, *data_files: str, limit: int | None = None):
    """`out` holding the first `limit` records of each of `grids_dir`'s `data_files`, their images resized to SHAPES
    in turn (for LLaVA-1.6's anyres)."""
    from PIL import Image

    (out / "images").mkdir(parents=True)
    for name in data_files:
        records = json.loads((grids_dir / name).read_text())[:limit]
        for i, record in enumerate(records):
            target = f"images/{Path(name).stem}_{i}.png"
            Image.open(grids_dir / record["image"]).convert("RGB").resize(SHAPES[i % 3]).save(out / target)
            record["image"] = target
        (out / name).write_text(json.dumps(records))
    return out


@pytest.fixture(scope="session")
def shaped_grids(tmp_path_factory, grids_dir):
    """The digit grids' caption records, their images in three shapes in turn."""
    return write_shaped_grids(grids_dir, tmp_path_factory.mktemp("shaped-grids"), "train.json")


@pytest.fixture(scope="session")
def stage2_engine_runs(tmp_path_factory, digit_llm_dir, clip_moe_dir, grids_dir, shaped_grids):
    """LLaVA stage 2 under each sharded engine, launched once per session for every test that needs it
    (tests/helpers/stage2_engines.py)."""
    from helpers.stage2_engines import Stage2EngineRuns

    return Stage2EngineRuns(tmp_path_factory, digit_llm_dir, clip_moe_dir, grids_dir, shaped_grids)


# LLaVA checkpoints and the digit-grid task for the lmms-eval tests (tests/mllm_bridge/test_lmms_*.py).

@pytest.fixture(scope="session")
def lmms_checkpoints(tmp_path_factory, clip_moe_dir, llama_tokenizer):
    """One tiny CLIP-MoE LLaVA saved three ways: `full`, `stage1` (config.json + mm_projector.bin) and the `llm`
    under it. Its LLM is initialised with std 0.3, so answers differ between inputs (at 0.02 they never do)."""
    from types import SimpleNamespace

    from transformers import LlamaForCausalLM

    from mllm_bridge.embedded.tiny_lm import tiny_llama_config
    from mllm_bridge.llava.model import build_llava_model

    root = tmp_path_factory.mktemp("lmms-checkpoints")
    parts = SimpleNamespace(full=root / "llava-full", stage1=root / "llava-stage1", llm=root / "llm")
    config = tiny_llama_config(llama_tokenizer, hidden_size=32)
    config.initializer_range = 0.3
    torch.manual_seed(0)
    llava = build_llava_model(config, clip_moe_dir)
    state = {k: v for k, v in llava.state_dict().items() if ".vision_tower." not in k}
    projector = {k: v for k, v in state.items() if ".mm_projector." in k}
    llm = LlamaForCausalLM(config)
    llm.load_state_dict({k: v for k, v in state.items() if k not in projector})
    llava.save_pretrained(parts.full, state_dict=state)  # (save_pretrained may consume the dict)
    llm.save_pretrained(parts.llm)
    for directory in (parts.full, parts.llm):
        llama_tokenizer.save_pretrained(directory)
    llava.config.save_pretrained(parts.stage1)
    torch.save(projector, parts.stage1 / "mm_projector.bin")
    return parts


@pytest.fixture(scope="session")
def digit_task_dir(tmp_path_factory, grids_dir):
    """The lmms-eval digit-grid task folder over `grids_dir`'s test split (32 images, 128 questions)."""
    from mllm_bridge.embedded.task_data import make_lmms_task

    out = tmp_path_factory.mktemp("lmms-tasks") / "digit_grids"
    make_lmms_task(grids_dir, out)
    return out


# Tests that must not run beside one another under pytest-xdist: the launches (several on accelerate's default port
# 29500, each starting two ranks) and the peak-RSS measurement, which another worker's memory pressure could skew.
ONE_AT_A_TIME = "one-at-a-time"
ONE_AT_A_TIME_TESTS = {"tests/upcycle/recipes/test_sparse_streaming.py::test_peak_memory_does_not_grow_with_the_output"}


# The README's command lines run in one shared folder, each on what the earlier ones wrote: in order, on one worker.
IN_ORDER = "readme-in-order"
IN_ORDER_PREFIX = "tests/docs/test_documented_commands.py::test_readme_command_runs_with_stand_ins"


def one_at_a_time(item) -> bool:
    return item.get_closest_marker("engines") is not None or item.nodeid in ONE_AT_A_TIME_TESTS


def xdist_group_of(item) -> str | None:
    if one_at_a_time(item):
        return ONE_AT_A_TIME
    return IN_ORDER if item.nodeid.startswith(IN_ORDER_PREFIX) else None


@pytest.hookimpl(wrapper=True)  # marks before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a CUDA GPU: skipped here with the reason, run by scripts/gpu_check.sh. On an xdist
    worker (`-n 2 --dist loadgroup`), the tests that must not run beside one another join one group, which xdist
    runs on one worker in sequence; a serial run is left as it is."""
    grouped = []
    if hasattr(config, "workerinput"):
        grouped = [(item, xdist_group_of(item)) for item in items if xdist_group_of(item)]
        for item, name in grouped:
            item.add_marker(pytest.mark.xdist_group(name))
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on one)")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
    yield
    # `--dist loadgroup` sends a group to one worker by the suffix `@GROUP` xdist's worker appends to each test id.
    # xdist 3.8 appends it to `item._nodeid`, which pytest 9.2 no longer reads (its ids are `item._id`): the group
    # would silently spread over the workers. Appended here where xdist's own did not take.
    if not (grouped and config.getvalue("loadgroup")):
        return
    for item, name in grouped:
        suffix = f"@{name}"
        if not item.nodeid.endswith(suffix):
            if hasattr(item, "_id"):
                from _pytest.nodeid import NodeId

                item._id = NodeId.parse(item.nodeid + suffix)
            else:
                item._nodeid = item.nodeid + suffix


# Test tiers (pyproject.toml's markers; `bash scripts/test.sh --fast` leaves them out, the plain command runs them
# all). Held by what a test does while it runs, so no test can sit in the fast tier by mistake: starting a launcher
# needs `engines`, running a command or script `end_to_end` (or `engines`), torch.compile / torch.export `compile`.
# (Processes started through subprocess; none of the tests uses torch.multiprocessing.spawn.)

LAUNCHER_MODULES = {"accelerate.commands.launch", "torch.distributed.run", "torch.distributed.launch",
                    "deepspeed.launcher.runner"}
LAUNCHER_PROGRAMS = {"torchrun", "deepspeed"}  # and `accelerate launch`
TORCH_DIR = Path(torch.__file__).parent


def command_words(args) -> list[str]:
    """Popen's first argument as words (a string, a path or a sequence of them)."""
    if isinstance(args, (str, bytes, os.PathLike)):
        return shlex.split(os.fsdecode(args))
    return [os.fsdecode(word) for word in args]


def process_tier(args) -> str | None:
    """The tier of a test that starts the process `args` (Popen's first argument): "engines" for a launcher
    (accelerate launch, torchrun, the deepspeed launcher), "end_to_end" for a Python interpreter running a module or
    a file, a shell running a script, or a script itself; "compile" for torch's own code in a fresh interpreter
    (inductor's compile workers); None for anything else (a `python -c` snippet, `true`)."""
    words = command_words(args)
    if not words:
        return None
    program = Path(words[0]).name
    if (LAUNCHER_MODULES & set(words) or program in LAUNCHER_PROGRAMS
            or (program == "accelerate" and words[1:2] == ["launch"])):
        return "engines"
    if program.startswith("python") and len(words) > 1 and words[1] != "-c":
        runs = words[2] if words[1] == "-m" and len(words) > 2 else words[1]
        torch_own = runs.split(".")[0] == "torch" if words[1] == "-m" else Path(runs).is_relative_to(TORCH_DIR)
        return "compile" if torch_own else "end_to_end"
    if program in ("bash", "sh") and len(words) > 1 and not words[1].startswith("-"):
        return "end_to_end"
    return "end_to_end" if program.endswith((".sh", ".py")) else None


@contextlib.contextmanager
def tiers_held(item):
    """While `item` sets up (its fixtures included) and runs: a process or a compilation its markers do not allow
    fails the test with the marker it needs."""
    marked = {mark.name for mark in item.iter_markers()}

    def require(tier: str, what: str) -> None:
        if tier not in marked and not (tier == "end_to_end" and "engines" in marked):
            pytest.fail(f"{item.nodeid} {what}: mark it @pytest.mark.{tier} (the test tiers: pyproject.toml's "
                        "markers, tests/conftest.py)", pytrace=False)

    start, compile_, export = subprocess.Popen.__init__, torch.compile, torch.export.export

    def checked_start(self, *args, **kwargs):
        argv = kwargs["args"] if "args" in kwargs else args[0]
        tier = process_tier(argv)
        if tier is not None:
            require(tier, f"starts `{shlex.join(command_words(argv))}`")
        start(self, *args, **kwargs)

    def checked_compile(*args, **kwargs):
        require("compile", "calls torch.compile")
        return compile_(*args, **kwargs)

    def checked_export(*args, **kwargs):
        require("compile", "calls torch.export.export")
        return export(*args, **kwargs)

    subprocess.Popen.__init__, torch.compile, torch.export.export = checked_start, checked_compile, checked_export
    try:
        yield
    finally:
        subprocess.Popen.__init__, torch.compile, torch.export.export = start, compile_, export


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with tiers_held(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with tiers_held(item):
        yield


# Which dtype each matmul ran in (mixed-precision tests of the experts, the trainers and LLaVA's stages).

aten = torch.ops.aten
MATMULS = (aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten._grouped_mm)


class MatmulLog(TorchDispatchMode):
    """Records each matmul-family op: the dtypes of its tensor inputs and outputs, and whether it ran
    inside a `CLIPMoEExperts.forward` (set by module hooks) or elsewhere (incl. backward)."""

    def __init__(self):
        super().__init__()
        self.in_experts = False
        self.calls: list[tuple[object, bool, set[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in MATMULS:
            tensors = [t for t in (*args, *kwargs.values(), *(out if isinstance(out, tuple) else (out,)))
                       if isinstance(t, torch.Tensor) and t.is_floating_point()]
            self.calls.append((func.overloadpacket, self.in_experts, {t.dtype for t in tensors}))
        return out

    def watch(self, model: torch.nn.Module) -> list:
        def enter(*_):
            self.in_experts = True

        def leave(*_):
            self.in_experts = False

        from encoder.experts import CLIPMoEExperts

        handles = []
        for m in model.modules():
            if isinstance(m, CLIPMoEExperts):
                handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
        return handles


def kill_after_steps(monkeypatch, trainer_class, steps: int):
    """Make `trainer_class` stop as a kill (Ctrl-C) would once `steps` optimizer steps are done; returns the real
    `_optimizer_step`, to put back with monkeypatch.setattr when the test continues in the same process."""
    real = trainer_class._optimizer_step

    def killed(self, batches):
        if self.step == steps:
            raise KeyboardInterrupt
        return real(self, batches)

    monkeypatch.setattr(trainer_class, "_optimizer_step", killed)
    return real


def tiny_open_clip(folder, name: str, quick_gelu: bool = True, seed: int = 0):
    """A 2-layer, width-32 open_clip model registered under `name` (its config written into `folder`)."""
    import json

    import open_clip

    cfg = {"embed_dim": 16, "quick_gelu": quick_gelu,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None).eval()


def perturbed_open_clip(name: str, seed: int = 0) -> torch.nn.Module:
    """open_clip's random init of the registered config `name`, every tensor moved off its init (open_clip and timm
    zero-init some: biases, the MAP latent's neighbours), so each weight shows in a conversion's numbers."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def assert_max_abs_diff(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    """a and b differ by at most `tol` anywhere; the message names `what` and the largest difference."""
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"{what}: max abs diff {diff:.2e} > {tol}"


def siglip_sentencepiece_dir(folder, max_length: int = 16) -> str:
    """A SiglipTokenizer folder over a 40-piece unigram vocabulary (<pad> 0, </s> 1, <unk> 2), trained in-process on a
    few sentences (SigLIP's own vocabulary cannot be had offline)."""
    import io
    import random

    import sentencepiece

    words = ["a", "photo", "of", "the", "cat", "dog", "on", "red", "blue", "green", "small", "big", "two", "house",
             "car", "tree", "sky", "water"]
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(300)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=40, model_type="unigram", minloglevel=2,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "SiglipTokenizer",
                                                              "model_max_length": max_length}))
    return str(folder)


# Tiny SigLIPs and SigLIP2s (transformers' own classes, the judges of every SigLIP-MoE test).

SIGLIP_VOCAB = 100
SIGLIP_PAD = 1  # SigLIP pads with its pad token to a fixed length and is usually run without an attention mask


def tiny_siglip_config(layers: int = 4, width: int = 32, siglip2: bool = False, vision_use_head: bool = True,
                       **text):
    """A width-32 SigLIP over 32x32 images (16 patches of 8x8, no class token) or, with `siglip2`, a SigLIP2 (8x8
    patches, a 4x4 grid of position embeddings resized per image); a 100-token text tower of 16 positions padded
    with SIGLIP_PAD. `text`: other text-tower fields (vocab_size, max_position_embeddings, pad/eos token ids)."""
    from transformers import Siglip2Config, SiglipConfig

    tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2)
    text_config = dict(tower, vocab_size=SIGLIP_VOCAB, max_position_embeddings=16, pad_token_id=SIGLIP_PAD,
                       bos_token_id=None, eos_token_id=SIGLIP_VOCAB - 1)
    text_config.update(text)
    if siglip2:
        vision_config = dict(tower, patch_size=8, num_patches=16, vision_use_head=vision_use_head)
        return Siglip2Config(text_config=text_config, vision_config=vision_config)
    vision_config = dict(tower, image_size=32, patch_size=8, vision_use_head=vision_use_head)
    return SiglipConfig(text_config=text_config, vision_config=vision_config)


def tiny_dense_siglip(seed: int = 0, siglip2: bool = False, **kwargs):
    """A tiny SiglipModel (Siglip2Model with `siglip2`) of `tiny_siglip_config(**kwargs)`, with a non-trivial logit
    scale and bias (transformers inits both to zero, where one left out of a computation would go unnoticed)."""
    from transformers import Siglip2Model, SiglipModel

    torch.manual_seed(seed)
    model = (Siglip2Model if siglip2 else SiglipModel)(tiny_siglip_config(siglip2=siglip2, **kwargs)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.3)  # log 10, SigLIP's init
        model.logit_bias.fill_(-1.5)
    return model


def siglip_text_ids(batch: int, seq: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [batch, seq], attention mask): texts of different lengths, each padded with SIGLIP_PAD to `seq`."""
    ids = torch.full((batch, seq), SIGLIP_PAD, dtype=torch.long)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        n = 3 + (b * 4) % (seq - 3)
        ids[b, :n] = torch.randint(2, SIGLIP_VOCAB, (n,), generator=generator)
        mask[b, :n] = 1
    return ids, mask


def upcycled_siglip(dense, upcycle_fn, vision_layers=(0, 1, 2, 3), text_layers=(0, 1, 2, 3), num_experts: int = 4,
                    top_k: int = 2, moe_head: bool = False, seed: int = 0):
    """`upcycle_fn` (the family's in-memory sparse upcycling) of `dense`: MoE in the given layers of each tower,
    `num_experts` experts, top-`top_k`, the vision head's MLP too with `moe_head`."""
    moe = dict(num_experts=num_experts, top_k=top_k)
    return upcycle_fn(dense, vision_moe=dict(moe, moe_layers=list(vision_layers), moe_head=moe_head),
                      text_moe=dict(moe, moe_layers=list(text_layers)), seed=seed)


def eager_and_grouped_mm_outputs(model, batch: dict, output: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`output` of `model(**batch)` with the experts' own forward, then after `set_experts_implementation("grouped_mm")`
    (transformers' experts function), which the towers' configs must record."""
    with torch.no_grad():
        ours = getattr(model(**batch), output)
        model.set_experts_implementation("grouped_mm")
        theirs = getattr(model(**batch), output)
    assert model.vision_model.config._experts_implementation == "grouped_mm"
    return ours, theirs


def one_line_user_error(fn, *args) -> str:
    """The message of the UserError that `fn(*args)` raises, checked to be one line (what a command prints)."""
    from encoder.utils.errors import UserError

    with pytest.raises(UserError) as error:
        fn(*args)
    message = str(error.value)
    assert "\n" not in message, message
    return message
