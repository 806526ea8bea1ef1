"""The compatibility shims: llava-torch's models take transformers >= 5.24's `cache=`, lmms-eval finds
`filelock._api` on filelock >= 4.3. The newest releases themselves are exercised by scripts/check_latest.sh."""

import os
import subprocess
import sys
import types

import pytest
import torch

from mllm_bridge.embedded.tiny_lm import tiny_llama_config
from mllm_bridge.llava import compat
from mllm_bridge.llava.model import build_llava_model


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=os.environ.copy(), cwd="/")


def test_a_cache_argument_reaches_an_old_signature_as_past_key_values():
    seen = {}

    class OldModel:
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            seen.update(past_key_values=past_key_values, input_ids=input_ids)
            return "out"

        def prepare_inputs_for_generation(self, input_ids, past_key_values=None, **kwargs):
            seen.update(prep=past_key_values, rest=sorted(kwargs))
            return {}

        def already_new(self, input_ids=None, cache=None):
            return cache

    module = types.ModuleType("old_llava")
    OldModel.__module__ = module.__name__
    module.OldModel = OldModel
    assert sorted(compat.patch_llava_language_module(module)) == [
        "OldModel.forward", "OldModel.prepare_inputs_for_generation"]
    assert compat.patch_llava_language_module(module) == []  # idempotent
    model = OldModel()
    assert model.forward(input_ids=1, cache="kv") == "out" and seen["past_key_values"] == "kv"
    model.prepare_inputs_for_generation(1, cache="kv", attention_mask=None)
    assert seen["prep"] == "kv" and seen["rest"] == ["attention_mask"]  # no `cache` left beside it
    model.forward(input_ids=2, past_key_values="old")  # the old name still works
    assert seen["past_key_values"] == "old"
    assert not compat.needs_cache_shim(OldModel.already_new)


def test_llava_model_classes_are_shimmed_on_import_and_a_cache_argument_gives_the_same_logits(
        clip_moe_dir, llama_tokenizer):
    from llava.model import LlavaLlamaForCausalLM
    from llava.model.language_model.llava_mistral import LlavaMistralForCausalLM
    from transformers import DynamicCache

    for cls in (LlavaLlamaForCausalLM, LlavaMistralForCausalLM):
        assert compat.is_cache_shimmed(cls.forward) and compat.is_cache_shimmed(cls.prepare_inputs_for_generation)
    torch.manual_seed(0)
    model = build_llava_model(tiny_llama_config(llama_tokenizer, hidden_size=32), clip_moe_dir).eval()
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        first = model(input_ids=ids[:, :3], use_cache=True)
        step_old = model(input_ids=ids[:, 3:], past_key_values=first.past_key_values, use_cache=True).logits
        again = model(input_ids=ids[:, :3], cache=DynamicCache(config=model.config), use_cache=True)
        step_new = model(input_ids=ids[:, 3:], cache=again.past_key_values, use_cache=True).logits
        full = model(input_ids=ids).logits
    assert torch.allclose(step_new, step_old, atol=1e-6) and torch.allclose(step_new[:, -1], full[:, -1], atol=1e-5)


def test_filelock_api_stand_in_when_filelock_has_none_and_lmms_eval_locks_through_it():
    # filelock >= 4.3 has no _api submodule: simulate that by hiding its file from the path finder.
    code = """
import importlib, importlib.machinery, pkgutil, sys
import filelock
for sub in pkgutil.walk_packages(filelock.__path__, "filelock."):  # filelock < 4.3 needs its _api for these
    importlib.import_module(sub.name)
find = importlib.machinery.PathFinder.find_spec
importlib.machinery.PathFinder.find_spec = classmethod(
    lambda cls, name, path=None, target=None: None if name == "filelock._api" else find(name, path, target))
sys.modules.pop("filelock._api", None)
import filelock._api as api
assert api.FileLockMeta is type(filelock.FileLock) and api.BaseFileLock is filelock.BaseFileLock, api
from lmms_eval.evaluator import _enable_reentrant_filelocks
_enable_reentrant_filelocks()
import tempfile, os
path = os.path.join(tempfile.mkdtemp(), "x.lock")
a, b = filelock.FileLock(path), filelock.FileLock(path)
assert a is b  # lmms-eval's cross-class singleton patch took effect on the real metaclass
with a:
    with b:
        pass
print("ok", api.__doc__)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok filelock >= 4.3 has no _api")


def test_a_real_filelock_api_is_left_alone():
    from pathlib import Path

    import filelock

    if not (Path(filelock.__file__).parent / "_api.py").is_file():
        pytest.skip(f"filelock {filelock.__version__} has no _api module of its own")
    result = run_python("import filelock._api as a, filelock; print(type(a.__loader__).__name__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() != "StandInLoader"
