"""Fault tier, completion markers of the main job and replicate: written only on success, tied to the command
line and the job's sizes, and a failed step's leftovers never block the re-run."""

import json
import sys

import pytest

from encoder.utils.errors import UserError
from encoder.utils.step_record import SettingsChanged
from upcycle.embedded.steps import STEP_RECORDS, Step, claim_job, run_step, step_record

PY = sys.executable


def test_a_failed_step_leaves_no_record_even_when_it_wrote_its_output(tmp_path):
    out = tmp_path / "job"
    summary = out / "lmms-eval" / "summary.json"
    # like eval-lmms when one checkpoint failed: the summary is written, the exit status is 1
    write_then_fail = f"import pathlib; p = pathlib.Path({str(summary)!r}); p.parent.mkdir(parents=True); " \
                      "p.write_text('{}'); raise SystemExit(1)"
    step = Step("lmms-eval", [PY, "-c", write_then_fail], summary, clean=out / "lmms-eval")
    with pytest.raises(UserError, match="step 'lmms-eval' failed"):
        run_step(step, 1, 1, out)
    assert summary.exists() and not step_record(out, step).exists()


def test_the_rerun_clears_a_refusing_command_s_leftovers_and_records_success(tmp_path, capsys):
    out = tmp_path / "job"
    target = out / "lmms-eval"
    (target / "runs" / "dense").mkdir(parents=True)  # an interrupted run's partial folder
    refuse_existing = f"import pathlib, sys; p = pathlib.Path({str(target)!r}); " \
                      "sys.exit('already exists') if p.exists() else (p.mkdir(), (p / 'summary.json').write_text('{}'))"
    step = Step("lmms-eval", [PY, "-c", refuse_existing], target / "summary.json", clean=target)
    assert run_step(step, 1, 1, out) > 0
    assert "clearing what an unfinished earlier run left" in capsys.readouterr().out
    assert json.loads(step_record(out, step).read_text())["argv"] == step.argv[1:]
    assert run_step(step, 1, 1, out) == 0.0  # now it is done


def test_a_resuming_step_keeps_its_leftovers(tmp_path):
    out = tmp_path / "job"
    checkpoint = out / "base" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    step = Step("train", [PY, "-c", f"import os; assert os.path.isdir({str(checkpoint)!r})"], out / "base" / "x")
    run_step(step, 1, 1, out)  # no clean folder: the command finds its checkpoint and resumes


def test_a_job_with_other_sizes_stops_with_one_line_naming_them(tmp_path):
    out = tmp_path / "demo"
    claim_job(out, "demo", {"num_train": 2000, "stage1_steps": 400})
    claim_job(out, "demo", {"num_train": 2000, "stage1_steps": 400})
    with pytest.raises(SettingsChanged, match=r"num_train: 2000 -> 96; stage1_steps: 400 -> 2\); use another --out"):
        claim_job(out, "demo", {"num_train": 96, "stage1_steps": 2})


def test_a_directory_of_unrecorded_work_is_not_taken_for_a_job(tmp_path):
    out = tmp_path / "demo"
    (out / "base").mkdir(parents=True)
    with pytest.raises(SettingsChanged, match="settings are not recorded"):
        claim_job(out, "demo", {"num_train": 96})
    assert not (out / STEP_RECORDS).exists()
