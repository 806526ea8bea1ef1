"""Fault tier, sharded checkpoints and the processes that write them: a damaged engine part of a checkpoint stops
every rank with one line naming it and the way out; what a killed save left (of any step) is removed by the next
run; workers end with a killed launcher, and a run refuses to start beside a live one; LLaVA's final write killed
midway is finished by the next run without training again, and leaves nothing behind."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file

from encoder.utils.errors import UserError

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
HELPERS = REPO_ROOT / "tests" / "helpers"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]


def _toy_loop():
    """The loop core's toy regression (tests/encoder/training/test_loop.py)."""
    spec = importlib.util.spec_from_file_location("toy_loop", REPO_ROOT / "tests" / "encoder" / "training" / "test_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Toy


Toy = _toy_loop()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- leftovers of killed saves ------------------------------------------------------------------------------------

def test_partial_checkpoints_of_any_step_are_removed_by_the_next_run(tmp_path):
    """A kill during a sharded save at step 6 (every 3 steps) leaves step-6.partial/; a kill during a DDP save,
    the atomic writer's temporary. A resume every 2 steps never writes step 6 again: the run removes them anyway."""
    work = tmp_path / "w"
    Toy(work, steps=4, save_every=2, limit=None).run()
    host = socket.gethostname().replace("-", "_")
    sharded = work / "step-6.partial"
    ddp = work / f".step-9.tmp-{host}-{dead_pid()}-abc"
    live = work / f".step-9.tmp-{host}-{os.getpid()}-xyz"  # a live writer's: not ours to remove
    for folder in (sharded, ddp, live):
        (folder / "engine").mkdir(parents=True)
        (folder / "engine" / "__0_0.distcp").write_bytes(b"0" * 1024)
    unrelated = work / "step-notes.partial"
    unrelated.mkdir()
    toy = Toy(work, steps=5, save_every=2, limit=None)
    toy.run(toy.checkpoints.latest())
    assert not sharded.exists() and not ddp.exists()
    assert live.exists() and unrelated.exists()
    assert [p.name for p in toy.checkpoints.all()] == ["step-2", "step-4"]


# -- one writer per run directory -----------------------------------------------------------------------------------

def test_a_run_refuses_to_start_beside_a_live_writer_of_its_directory(tmp_path):
    work = tmp_path / "w"
    Toy(work, steps=2, save_every=1).run()
    lock = work / ".run.lock"
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        started = int(Path(f"/proc/{other.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "started": started}))
        (work / "step-2.partial").mkdir()  # the live run's save in progress
        toy = Toy(work, steps=4, save_every=1)
        with pytest.raises(UserError, match=rf"^{work} is being trained by another run that is still alive \(pid "
                                            rf"{other.pid}, .*kill {other.pid}"):
            toy.run(toy.checkpoints.latest())
        assert (work / "step-2.partial").is_dir()  # left to its live writer
    finally:
        other.kill()
        other.wait()
    # Once it has ended (or its pid belongs to another process), the directory is free again.
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "started": 1}))
    toy = Toy(work, steps=4, save_every=1)
    toy.run(toy.checkpoints.latest())
    assert toy.step == 4 and not (work / "step-2.partial").exists()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
@pytest.mark.engines
def test_workers_end_with_their_killed_launcher(launcher):
    """`kill -9` of the launcher: torchrun / accelerate launch start workers in sessions of their own, which then
    trained on as orphans; now each worker sees its launcher gone and exits."""
    command = ([*ACCELERATE, "--multi_gpu"] if launcher == "accelerate"
               else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"])
    parent = subprocess.Popen([*command, str(HELPERS / "hold_accelerator.py")], env=ENV, cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: list[psutil.Process] = []
    try:
        ready = ""
        while ready.count("ready") < 2:  # the two workers share the pipe: their lines may interleave
            line = parent.stdout.readline()
            assert line, ready + parent.stderr.read()[-3000:]
            ready += line
        workers = [p for p in psutil.Process(parent.pid).children(recursive=True) if "hold_accelerator" in " ".join(p.cmdline())]
        assert len(workers) == 2
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        _, alive = psutil.wait_procs(workers, timeout=60)
        assert not alive, [p.pid for p in alive]
        assert "is gone; the worker stops too; run the same command again" in parent.stderr.read()
    finally:
        for worker in workers:
            if worker.is_running():
                worker.kill()
        parent.kill()


# -- damaged engine parts -------------------------------------------------------------------------------------------

DAMAGED = {  # engine -> the part damaged (rank 1's) and how
    "fsdp2": ("pytorch_model_fsdp_0/__1_0.distcp", "truncated"),
    "deepspeed-zero2": ("pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt", "garbage"),
}


def stage2(llm, tower, data, out) -> list[str]:
    values = {"model_name_or_path": llm, "vision_tower": tower, "data_path": data / "train.json", "image_folder": data,
              "output_dir": out, "per_device_train_batch_size": 4, "max_steps": 4, "learning_rate": 1e-3,
              "save_steps": 2, "report_to": "none", "seed": 0}
    return ["finetune", *[item for key, value in values.items() for item in (f"--{key}", str(value))]]


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(DAMAGED))
@pytest.mark.engines
def test_a_damaged_engine_part_stops_every_rank_with_one_line(engine, tmp_path, stage2_engine_runs):
    """Before: tracebacks on every rank (DeepSpeed's rank 1 in torch.load advising weights_only=False, rank 0 on
    the lost peer at its next collective). The killed run is the engine's shared one (tests/helpers/stage2_engines.py:
    a launch per engine for the suite)."""
    part, damage = DAMAGED[engine]
    out = stage2_engine_runs.copy_killed(engine, tmp_path / "llava")
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    target = out / "checkpoint-2" / "engine" / part
    size = target.stat().st_size
    if damage == "truncated":
        os.truncate(target, size // 2)
    else:
        target.write_bytes(os.urandom(size))
    resumed = stage2_engine_runs.launch(engine, ["-m", "mllm_bridge.train"], out)
    assert resumed.returncode != 0
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(line.startswith(f"error: checkpoint {out / 'checkpoint-2'} is damaged: the engine state in "
                                          "its engine/ cannot be read by rank(s) 1") for line in errors), resumed.stderr
    assert all(line.endswith(f"delete {out / 'checkpoint-2'} and run the same command again (no earlier checkpoint "
                             "is kept, so the run starts over)") for line in errors)
    assert "[rank0]:" not in resumed.stderr and "[rank1]:" not in resumed.stderr, resumed.stderr[-3000:]  # tracebacks
    assert "weights_only" not in resumed.stderr
    assert "exitcode  : 2" in resumed.stderr  # the worker that stopped first; the launcher ends the other
    assert not (out / "config.json").exists()


# -- LLaVA's final write ------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.end_to_end
def test_a_final_write_killed_midway_is_finished_without_training_again(tmp_path, digit_llm_dir, clip_moe_dir,
                                                                       grids_dir):
    """Killed with the whole output in its hidden folder: that folder stayed for good, and the next run trained
    again from checkpoint-2. Now the last step is a checkpoint, the next run only writes the output from it, and
    the dead writer's folder is gone."""
    out = tmp_path / "llava"
    flags = stage2(digit_llm_dir, clip_moe_dir, grids_dir, out)
    killed = subprocess.run([sys.executable, str(HELPERS / "kill_in_final_write.py"), "mllm_bridge.train", *flags],
                            env=ENV, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == 9, killed.stderr[-3000:]
    left = [p for p in out.iterdir() if p.name.startswith(".final")]
    assert len(left) == 1 and any(left[0].glob("*.safetensors")) and not (out / "config.json").exists()
    trained = (out / "metrics.jsonl").read_text()
    again = subprocess.run([sys.executable, "-m", "mllm_bridge.train", *flags], env=ENV, cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint-4'} (step 4 of 4)" in again.stdout
    assert (out / "metrics.jsonl").read_text() == trained  # no step trained again
    assert not [p for p in out.iterdir() if p.name.startswith(".final")]
    final, last = load_file(str(out / "model.safetensors")), load_file(str(out / "checkpoint-4" / "model.safetensors"))
    assert set(final) == set(last) and all(torch.equal(final[k], last[k]) for k in last)


# -- the end of a finished run ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.engines
def test_the_ranks_of_a_finished_run_leave_the_process_group_before_the_interpreter_exits(stage2_engine_runs):
    """Left to the interpreter's finalization, gloo's worker threads could still hold FSDP2's last asynchronous
    collectives and abort a finished run by chance ("terminate called without an active exception", SIGABRT, rank
    1, on a loaded machine). Every rank destroys its group after a final barrier, while Python is alive, and the
    group's gloo backend must go then too, its threads joined: torch's DTensor caches (FSDP2's device mesh) and
    DeepSpeed's `barrier(group=WORLD)` default argument held it past destroy_process_group, and its 3 threads ran
    on into finalization. The run is FSDP2's shared one (tests/helpers/stage2_engines.py), which reports through
    process_group_at_exit.py."""
    run = stage2_engine_runs("fsdp2")  # finished: exit status 0
    reports = sorted(line for line in run.whole_stdout.splitlines() if "process group at exit" in line)
    threads = 0 if Path("/proc/self/task").is_dir() else "unknown"  # Linux names its threads there
    assert reports == [f"rank {rank}: process group at exit: False, gloo threads: {threads}" for rank in (0, 1)], \
        run.whole_stdout
