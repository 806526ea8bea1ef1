"""Installs mllm_bridge's start-up file `mllm_bridge_llava_hook.pth` into site-packages.

Project metadata lives in pyproject.toml; this file only adds the .pth (why it exists: see
mllm_bridge/llava/hook.py), for wheels and for editable installs (`pip install -e .`).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_SOURCE = Path("mllm_bridge", "mllm_bridge_llava_hook.pth")


class BuildPyWithStartupHook(build_py):
    """build_py that also places the .pth at the root of what gets installed into site-packages.

    A wheel installs the contents of `build_lib`. An editable wheel (setuptools >= 64) installs only
    what is written to its unpacked wheel directory, which editable_wheel hands over as `install_lib`.
    """

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            root = self.get_finalized_command("install").install_lib
        else:
            root = self.build_lib
        self.copy_file(str(PTH_SOURCE), str(Path(root, PTH_SOURCE.name)), preserve_mode=False)


setup(cmdclass={"build_py": BuildPyWithStartupHook})
