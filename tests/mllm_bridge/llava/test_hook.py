"""The LLaVA hook: unmodified llava-torch builds our tower for CLIP-MoE directories, and only for them."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import mllm_bridge
from mllm_bridge.llava import hook as llava_hook

PTH_SOURCE = Path(mllm_bridge.__file__).with_name(llava_hook.PTH_NAME)


def tower_cfg(name) -> SimpleNamespace:
    return SimpleNamespace(mm_vision_tower=str(name), mm_vision_select_layer=-2, mm_vision_select_feature="patch")


def run_python(code: str, **env) -> str:
    """Run `code` in a fresh interpreter of this environment (site-packages and its .pth files active)."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env}, cwd="/")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_llava_builds_our_tower_for_clip_moe_and_its_own_otherwise(clip_moe_dir, dense_clip_dir, tmp_path):
    from llava.model import llava_arch
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    from encoder import CLIPMoEVisionTower

    build = llava_arch.build_vision_tower
    assert llava_hook.is_hooked(build)
    ours = build(tower_cfg(clip_moe_dir), delay_load=True)
    assert type(ours) is CLIPMoEVisionTower and not ours.is_loaded and ours.config.moe_layers == [0, 1, 2, 3]
    assert type(build(tower_cfg(dense_clip_dir), delay_load=True)) is CLIPVisionTower
    training_args = SimpleNamespace(vision_tower=str(clip_moe_dir), mm_vision_select_layer=-2)
    assert type(build(training_args, delay_load=True)) is CLIPMoEVisionTower
    with pytest.raises(ValueError, match="Unknown vision tower"):
        build(tower_cfg(tmp_path / "missing"))


def test_install_patches_an_already_imported_llava(monkeypatch, clip_moe_dir):
    from llava.model import llava_arch
    from llava.model.multimodal_encoder import builder

    original = builder.build_vision_tower.__wrapped__
    monkeypatch.setattr(builder, "build_vision_tower", original)
    monkeypatch.setattr(llava_arch, "build_vision_tower", original)
    llava_hook.install_llava_hook()
    assert llava_hook.is_hooked(builder.build_vision_tower) and llava_hook.is_hooked(llava_arch.build_vision_tower)
    wrapped = llava_arch.build_vision_tower
    llava_hook.install_llava_hook()  # idempotent: no wrapper around the wrapper
    assert llava_arch.build_vision_tower is wrapped and wrapped.__wrapped__ is original
    assert sum(isinstance(f, llava_hook._LlavaBuilderFinder) for f in sys.meta_path) == 1


def test_the_pth_file_is_installed_in_site_packages():
    installed = llava_hook.installed_pth_files()
    assert installed, f"{llava_hook.PTH_NAME} missing from site-packages; reinstall with `pip install -e .`"
    assert installed[0].read_bytes() == PTH_SOURCE.read_bytes()


def test_start_up_installs_only_a_light_finder():
    out = run_python("import sys; print(any(type(f).__name__ == '_LlavaBuilderFinder' for f in sys.meta_path), "
                     "sorted(m for m in ('torch', 'transformers', 'encoder', 'llava') if m in sys.modules))")
    assert out == "True []"


def test_the_environment_variable_switches_the_pth_off():
    out = run_python("import sys; print(any(type(f).__name__ == '_LlavaBuilderFinder' for f in sys.meta_path))",
                     CLIP_MOE_LLAVA_HOOK="0")
    assert out == "False"


def test_the_pth_never_breaks_start_up(monkeypatch):
    monkeypatch.setitem(sys.modules, "mllm_bridge.llava.hook", None)  # any import failure
    exec(PTH_SOURCE.read_text())
    monkeypatch.delitem(sys.modules, "mllm_bridge.llava.hook")
    monkeypatch.setattr(llava_hook, "install_llava_hook", lambda: 1 / 0)
    llava_hook.install_at_startup()


def test_fresh_interpreter_gets_our_tower_without_importing_the_toolkit(clip_moe_dir):
    code = (
        "import sys; from types import SimpleNamespace as NS\n"
        "import llava.model.builder\n"
        "from llava.model import llava_arch\n"
        f"cfg = NS(mm_vision_tower={str(clip_moe_dir)!r}, mm_vision_select_layer=-2)\n"
        "print(type(llava_arch.build_vision_tower(cfg, delay_load=True)).__name__)\n"
    )
    assert run_python(code) == "CLIPMoEVisionTower"


def test_a_checkpoint_asking_for_llavas_s2_tower_is_refused_by_llavas_own_loading(llava_moe_dir, tmp_path):
    """llava-torch would build a single-scale tower for `s2: true` (its builder has no S2 branch); ours refuses."""
    from llava.model import LlavaLlamaForCausalLM

    from encoder.utils.errors import UserError

    checkpoint = shutil.copytree(llava_moe_dir, tmp_path / "llava-s2")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "s2": True, "s2_scales": "32,64,96"}))
    with pytest.raises(UserError, match=r"^s2 is set .*'32,64,96'"):
        LlavaLlamaForCausalLM.from_pretrained(checkpoint)
    (checkpoint / "config.json").write_text(json.dumps({**config, "s2": False, "s2_scales": "32,64,96"}))
    assert LlavaLlamaForCausalLM.from_pretrained(checkpoint).get_vision_tower().hidden_size == 32
