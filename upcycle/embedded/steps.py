"""The one step runner of the long jobs (`upcycle demo` and `upcycle replicate`): each step is a user command run as
a subprocess, printed first.

A step that succeeds leaves a record of its command line in OUT/.steps/; a re-run skips exactly the steps recorded
with the same command line, so an interrupted job continues where it stopped, a failed step is never taken for
done, and a step's leftovers are cleared (or resumed, for the training commands that resume themselves) before it
runs again. Each job keeps the seconds every step took in a timings file for its report; a step skipped on a re-run
keeps the time it took when it ran.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from encoder.utils.errors import UserError
from encoder.utils.files import check_output_parent, write_atomic
from encoder.utils.step_record import SETTINGS_FILE, claim

STEP_RECORDS = ".steps"


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    output: Path  # what the step leaves when it succeeds (a re-run skips it only with its success record too)
    clean: Path | None = None  # removed before the step runs again without a success record: the leftovers of a
    # failed or interrupted run of a command that refuses an existing output. None: the command resumes itself.


def step_record(out: Path, step: Step) -> Path:
    return out / STEP_RECORDS / (re.sub(r"[^a-z0-9]+", "-", step.name.lower()).strip("-") + ".json")


def run_step(step: Step, index: int, total: int, out: Path) -> float:
    """Run one step unless its success record holds the same command line; returns the seconds it ran."""
    record = step_record(out, step)
    command = step.argv[1:]  # the interpreter's path is not a setting
    if record.is_file() and step.output.exists():
        try:
            done_before = json.loads(record.read_text()).get("argv") == command
        except (OSError, ValueError):
            done_before = False
        if done_before:
            print(f"[{index}/{total}] {step.name}: done earlier ({step.output}), skipped", flush=True)
            return 0.0
    record.unlink(missing_ok=True)
    if step.clean is not None and step.clean.exists():
        print(f"[{index}/{total}] {step.name}: clearing what an unfinished earlier run left in {step.clean}",
              flush=True)
        shutil.rmtree(step.clean) if step.clean.is_dir() else step.clean.unlink()
    print(f"\n[{index}/{total}] {step.name}\n  $ {shlex.join(step.argv)}", flush=True)
    start = time.time()
    done = subprocess.run(step.argv)
    if done.returncode != 0:
        raise UserError(f"step '{step.name}' failed (exit {done.returncode}); fix the cause shown above and run "
                        "the same command again: finished steps are skipped")
    seconds = time.time() - start
    write_atomic(record, lambda tmp: tmp.write_text(json.dumps({"argv": command, "seconds": round(seconds, 1)})))
    return seconds


def run_steps(out: Path, steps: list[Step], timings_file: Path) -> dict[str, float]:
    """Run `steps` in order (finished ones skipped), keeping each step's seconds in `timings_file` (written
    atomically after every step that ran, so an interrupted job keeps what it measured); returns the timings."""
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    for i, step in enumerate(steps, start=1):
        seconds = run_step(step, i, len(steps), out)
        if seconds or step.name not in timings:  # a skipped step keeps the time it took when it ran
            timings[step.name] = round(seconds, 1)
            write_atomic(timings_file, lambda tmp: tmp.write_text(json.dumps(timings, indent=1) + "\n"))
    return timings


def claim_job(out: Path, job: str, settings: dict) -> None:
    """OUT holds this job with these settings, or is new: anything else stops with one line."""
    check_output_parent(out / SETTINGS_FILE)
    claim(out, {"job": job, **settings}, f"use another --out, or delete {out} to start over")
