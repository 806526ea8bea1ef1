"""LLaVA stage 2 under each sharded engine over 2 CPU processes, launched once per test session (the conftest fixture
`stage2_engine_runs`) for every test that needs such a run: tests/mllm_bridge/train/test_sharded_engines.py (the
engines train the one-process weights, resume exactly, shard what they say) and tests/faults/test_sharded_checkpoints.py
(a damaged engine part, the process group at exit). Launches are the suite's dearest steps.

Per engine, one uninterrupted launch of STEPS steps (a checkpoint every 2) also leaves a copy of its output directory
as it stood after step KILLED_AT (tests/helpers/copy_at_step.py): the state a kill then leaves, which the tests copy
again and resume from. ZeRO-3's runs train LLaVA-1.6's anyres on images of three shapes, the others square ones."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

from helpers.launchers import ENGINES, HELPERS, copied_at, launch

STEPS, KILLED_AT = 4, 3  # a checkpoint every 2 steps: the killed state resumes from checkpoint-2
SHARDED = ["deepspeed-zero2", "deepspeed-zero3", "fsdp2"]  # helpers.launchers.ENGINES: how each is launched
ANYRES_ENGINE = "deepspeed-zero3"
ANYRES = ["--image_aspect_ratio", "anyres", "--mm_patch_merge_type", "spatial_unpad", "--image_grid_pinpoints",
          "(1x1),...,(2x2)"]


def stage2_flags(llm, tower, data, out, per_device: int) -> list[str]:
    """LLaVA's stage 2 flags as its scripts set them (gradient checkpointing on, as finetune.sh has it), small."""
    values = dict(model_name_or_path=llm, vision_tower=tower, data_path=data / "train.json", image_folder=data,
                  output_dir=out, per_device_train_batch_size=per_device, max_steps=STEPS, learning_rate=1e-3,
                  gradient_checkpointing=True, save_steps=2, save_total_limit=2, report_to="none", seed=0)
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


class Stage2EngineRuns:
    """`runs(engine)`: that engine's run, launched on first use; `whole` (its output), `whole_stdout`, and `killed`
    (the copy after step KILLED_AT, left as it is: `copy_killed` gives a test its own copy to resume or damage)."""

    def __init__(self, tmp_path_factory, llm: Path, tower: Path, grids_dir: Path, shaped_grids: Path):
        self.tmp_path_factory, self.llm, self.tower = tmp_path_factory, llm, tower
        self.grids_dir, self.shaped_grids = grids_dir, shaped_grids
        self.runs: dict[str, SimpleNamespace] = {}

    def layout(self, engine: str) -> tuple[Path, list[str]]:
        """The data and layout flags of `engine`'s runs: anyres on shaped images for ANYRES_ENGINE."""
        return (self.shaped_grids, ANYRES) if engine == ANYRES_ENGINE else (self.grids_dir, [])

    def flags(self, engine: str, out: Path, per_device: int = 4) -> list[str]:
        data, layout = self.layout(engine)
        return [*stage2_flags(self.llm, self.tower, data, out, per_device), *layout]

    def launch(self, engine: str, script: list[str], out: Path) -> subprocess.CompletedProcess:
        """`finetune` into `out` with this engine's flags under its launcher; `script` as helpers.launchers.launch
        takes it."""
        launcher, own = ENGINES[engine]
        return launch(launcher, script, ["finetune", *self.flags(engine, out), *own])

    def __call__(self, engine: str) -> SimpleNamespace:
        if engine not in self.runs:
            root = self.tmp_path_factory.mktemp(engine)
            whole, killed = root / "llava-whole", root / "llava-killed"
            script = copied_at(KILLED_AT, killed, "mllm_bridge.train")
            if engine == "fsdp2":  # the ranks also report whether they still hold a process group at exit
                script = [str(HELPERS / "process_group_at_exit.py"), "copy_at_step", *script[1:]]
            run = self.launch(engine, script, whole)
            assert run.returncode == 0, run.stderr[-3000:]
            # What a kill after step KILLED_AT leaves: checkpoint-2 and no later one, no output.
            assert (killed / "checkpoint-2" / "trainer_state.json").is_file() and not (killed / "checkpoint-4").exists()
            assert not (killed / "config.json").exists()
            self.runs[engine] = SimpleNamespace(engine=engine, whole=whole, whole_stdout=run.stdout, killed=killed)
        return self.runs[engine]

    def copy_killed(self, engine: str, out: Path) -> Path:
        """`out`: a copy of `engine`'s killed state, for a test to resume (or damage)."""
        shutil.copytree(self(engine).killed, out, symlinks=True)
        return out
