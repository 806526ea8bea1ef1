"""Make unmodified LLaVA (llava-torch) build `CLIPMoEVisionTower` whenever its tower names a MoE directory (CLIP-MoE,
SigLIP-MoE, ...) or a dense directory of another family than CLIP (a SigLIP).

LLaVA picks its vision tower in `llava.model.multimodal_encoder.builder.build_vision_tower`, which loads
any existing path as a dense `CLIPVisionModel` — a CLIP-MoE would silently lose its experts, a SigLIP would not
load as what it is. And
`llava.model.llava_arch` binds that function by name when it is imported, so patching the builder
afterwards reaches nothing. Hence a meta-path finder: when the builder module is imported, its loader
is wrapped and `build_vision_tower` is replaced the moment the module has run, before anything can bind
it. Those directories (`encoder.tower.needs_our_tower`) get our tower; every other name goes to LLaVA's own function unchanged (a dense
CLIP keeps `CLIPVisionTower`, unknown names still raise 'Unknown vision tower').

`mllm_bridge_llava_hook.pth`, which setup.py installs into site-packages (wheel and editable installs),
calls `install_at_startup()` in every interpreter, so `load_pretrained_model`, `from_pretrained`,
`initialize_vision_modules` and lmms-eval's `llava` model need no change. This module imports nothing
heavy (no torch, no transformers): start-up stays cheap.
Set CLIP_MOE_LLAVA_HOOK=0 to switch the .pth off; `install_llava_hook()` installs the hook explicitly.

The same finder applies the compatibility shims of `compat` (llava-torch on transformers >= 5.24,
lmms-eval on filelock >= 4.3) when the modules they concern are imported, so LLaVA's own
`load_pretrained_model` + `generate` and lmms-eval's built-in `llava` model get them too.
"""

from __future__ import annotations

import functools
import importlib.machinery
import os
import sys

from . import compat

BUILDER_MODULE = "llava.model.multimodal_encoder.builder"
ARCH_MODULE = "llava.model.llava_arch"
ENV_SWITCH = "CLIP_MOE_LLAVA_HOOK"
PTH_NAME = "mllm_bridge_llava_hook.pth"
_OFF_VALUES = ("0", "false", "no", "off")
_MARK = "_clip_moe_hook"


def install_llava_hook() -> None:
    """Make LLaVA build `CLIPMoEVisionTower` for MoE and non-CLIP directories (idempotent).

    Patches LLaVA's builder (and `llava_arch`'s copy of the name) if they are already imported, and
    installs the import hook for later imports.
    """
    for name in (BUILDER_MODULE, ARCH_MODULE, *compat.LLAVA_LANGUAGE_MODULES):
        module = sys.modules.get(name)
        if module is not None:
            _after_import(module)
    if not is_hook_installed():
        sys.meta_path.insert(0, _LlavaBuilderFinder())


def install_at_startup() -> None:
    """Entry point of the .pth file: install the hook unless switched off; never raises."""
    if not hook_enabled_by_env():
        return
    try:
        install_llava_hook()
    except Exception:  # noqa: BLE001 - a failure here must never stop the interpreter from starting
        pass


def hook_enabled_by_env() -> bool:
    """False when CLIP_MOE_LLAVA_HOOK is 0 / false / no / off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in _OFF_VALUES


def is_hook_installed() -> bool:
    """Whether this interpreter has the hook (from the .pth file or `install_llava_hook()`)."""
    return any(isinstance(finder, _LlavaBuilderFinder) for finder in sys.meta_path)


def hook_status() -> tuple[bool, str]:
    """Whether LLaVA, run in this environment, gets the hook, and why (for `python -m mllm_bridge check`)."""
    pth_files = installed_pth_files()
    if is_hook_installed():
        if pth_files and hook_enabled_by_env():
            return True, f"installed at start-up by {pth_files[0]}"
        return True, "installed in this process by install_llava_hook()"
    if not hook_enabled_by_env():
        return False, f"switched off by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    if not pth_files:
        return False, (f"{PTH_NAME} is not installed; reinstall clip-moe-toolkit or call "
                       "mllm_bridge.install_llava_hook()")
    return False, f"{pth_files[0]} did not run (python -S?); call mllm_bridge.install_llava_hook()"


def installed_pth_files() -> list:
    """The start-up .pth files present in this interpreter's site-packages directories."""
    import site
    import sysconfig
    from pathlib import Path

    dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    if site.ENABLE_USER_SITE:
        dirs.add(site.getusersitepackages())
    return sorted(p for p in (Path(d) / PTH_NAME for d in dirs) if p.is_file())


def is_hooked(build_vision_tower) -> bool:
    """Whether a `build_vision_tower` function is our wrapper."""
    return getattr(build_vision_tower, _MARK, False)


def _patch(module) -> None:
    original = getattr(module, "build_vision_tower", None)
    if original is not None and not is_hooked(original):
        module.build_vision_tower = _wrap(original)


def _wrap(original):
    @functools.wraps(original)
    def build_vision_tower(vision_tower_cfg, **kwargs):
        name = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
        # Imported here, not at module level: the .pth imports this module in every interpreter.
        from encoder.tower import CLIPMoEVisionTower, needs_our_tower

        if needs_our_tower(name):
            return CLIPMoEVisionTower(name, args=vision_tower_cfg, **kwargs)
        return original(vision_tower_cfg, **kwargs)

    setattr(build_vision_tower, _MARK, True)
    return build_vision_tower


def _after_import(module) -> None:
    """What the hook does to a module it watches, once the module has run (idempotent)."""
    if module.__name__ in compat.LLAVA_LANGUAGE_MODULES:
        compat.patch_llava_language_module(module)
    else:
        _patch(module)


_WATCHED = frozenset((BUILDER_MODULE, *compat.LLAVA_LANGUAGE_MODULES))
_STAND_INS = {compat.FILELOCK_API: compat.fill_filelock_api}  # module name -> what fills it, used only if absent


class _LlavaBuilderFinder:
    """Finds the watched modules through the other finders and wraps their loaders; provides stand-ins.

    Every import asks this finder first, so anything but a set lookup for other names would cost start-up.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _WATCHED and fullname not in _STAND_INS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            if fullname in _STAND_INS:
                return importlib.machinery.ModuleSpec(fullname, compat.StandInLoader(_STAND_INS[fullname]))
            return None
        if fullname not in _WATCHED:
            return spec
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader)
        return spec


class _PatchingLoader:
    """Runs the real loader, then patches the fresh module (`build_vision_tower`, or the cache shim)."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _after_import(module)

    def __getattr__(self, name):
        if name == "_loader":  # not set yet (copy, pickle): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self._loader, name)
