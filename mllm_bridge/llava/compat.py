"""Shims for releases that moved under llava-torch and lmms-eval, applied when the affected module is imported.

Each shim is the smallest change that keeps the old caller working, and is harmless on the releases it
was not needed for (the lock pins those; `scripts/check_latest.sh` runs the suite on the newest ones):

- transformers >= 5.24 renamed the key-value cache argument `past_key_values` to `cache` and its
  `generate` now passes `cache=`. llava-torch's `Llava*ForCausalLM.forward` and
  `prepare_inputs_for_generation` have explicit signatures without it ("unexpected keyword argument
  'cache'"). `rename_cache_kwarg` hands a `cache=` argument to them as `past_key_values`, which they
  pass on to transformers' Llama, which still accepts that name (deprecated, until 5.40; pyproject
  caps transformers below that).
- filelock >= 4.3 has no `filelock._api`; lmms-eval 0.7.3's evaluator imports `FileLockMeta` from it
  to make file locks re-entrant. `fill_filelock_api` provides a module of that name with the same
  two classes (taken from filelock's public `BaseFileLock`), so lmms-eval patches the real metaclass.

Nothing here imports torch or transformers at import time: `llava_hook` (loaded by a .pth at start-up)
imports this module.
"""

from __future__ import annotations

import functools
import importlib.abc
import types
from collections.abc import Callable

LLAVA_LANGUAGE_MODULES = (
    "llava.model.language_model.llava_llama",
    "llava.model.language_model.llava_mistral",
    "llava.model.language_model.llava_mpt",
)
FILELOCK_API = "filelock._api"
CACHE_METHODS = ("forward", "prepare_inputs_for_generation")
_MARK = "_clip_moe_cache_shim"


def rename_cache_kwarg(method):
    """Wrap a method that knows `past_key_values` but not `cache` so that `cache=` reaches it as the former."""
    if getattr(method, _MARK, False):
        return method

    @functools.wraps(method)
    def accepts_cache(*args, **kwargs):
        if "cache" in kwargs:
            cache = kwargs.pop("cache")
            if kwargs.get("past_key_values") is None:
                kwargs["past_key_values"] = cache
        return method(*args, **kwargs)

    setattr(accepts_cache, _MARK, True)
    return accepts_cache


def needs_cache_shim(method) -> bool:
    """Whether `method` names `past_key_values` as a parameter but not `cache`.

    Without **kwargs such a method rejects `cache=`; with **kwargs (llava's prepare_inputs_for_generation)
    `cache` would arrive beside the explicit past_key_values=None it passes on, and transformers would warn
    "both set" at every generated token.
    """
    import inspect  # not at module level: this module is imported at interpreter start-up

    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return "past_key_values" in params and "cache" not in params


def patch_llava_language_module(module: types.ModuleType) -> list[str]:
    """Give the LLaVA model classes defined in `module` the `cache` argument; returns 'Class.method' patched."""
    patched = []
    for name, cls in vars(module).items():
        if not isinstance(cls, type) or cls.__module__ != module.__name__:
            continue
        for method_name in CACHE_METHODS:
            method = cls.__dict__.get(method_name)
            if method is None or getattr(method, _MARK, False):
                continue
            if needs_cache_shim(method):
                setattr(cls, method_name, rename_cache_kwarg(method))
                patched.append(f"{name}.{method_name}")
    return patched


def is_cache_shimmed(method) -> bool:
    return getattr(method, _MARK, False)


def fill_filelock_api(module: types.ModuleType) -> None:
    """Make `module` a stand-in `filelock._api` for filelock releases without it: the two names lmms-eval reads."""
    import filelock

    module.__doc__ = "filelock >= 4.3 has no _api; the names lmms-eval 0.7.3 uses"
    module.BaseFileLock = filelock.BaseFileLock
    module.FileLockMeta = type(filelock.BaseFileLock)


class StandInLoader(importlib.abc.Loader):
    """Loader of a module that no file provides: the import system's default empty module, filled by `fill`."""

    def __init__(self, fill: Callable[[types.ModuleType], None]):
        self._fill = fill

    def exec_module(self, module: types.ModuleType) -> None:
        self._fill(module)
