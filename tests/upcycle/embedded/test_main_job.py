"""The main job end to end in its shortened form: every stage's output exists and the report holds numbers."""

from __future__ import annotations

import json
import re

import pytest

from upcycle.cli import main
from upcycle.embedded.main_job import QUICK, plan


@pytest.mark.slow
@pytest.mark.end_to_end
def test_quick_main_job_runs_every_stage_and_fills_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    for step in plan(out, QUICK):
        assert step.output.exists(), f"step '{step.name}' left no {step.output}"
    report = (out / "report" / "report.md").read_text()
    retrieval = report.split("## Zero-shot retrieval")[1].split("##")[0]
    rows = [line for line in retrieval.splitlines() if line.startswith("| dense") or line.startswith("| CLIP-MoE")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert len(cells) == 5 and all(re.fullmatch(r"\d+\.\d", c) for c in cells), row
    mllm = report.split("## MLLM")[1].split("## Training losses")[0]
    qa = next(line for line in mllm.splitlines() if line.startswith("| digit_grids_qa"))
    assert all(re.fullmatch(r"\d\.\d{4}", c.strip()) for c in qa.strip("|").split("|")[3:]), qa
    for png in ("training_losses.png", "expert_usage.png"):
        assert (out / "report" / png).stat().st_size > 1000
    timings = json.loads((out / "report" / "timings.json").read_text())
    assert set(timings) == {step.name for step in plan(out, QUICK)} and all(t > 0 for t in timings.values())
    assert f"report: {out / 'report' / 'report.md'}" in capsys.readouterr().out

    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--quick"]) == 0  # everything is reused
    assert capsys.readouterr().out.count("skipped") == len(plan(out, QUICK))
    assert main(["demo", "--out", str(out)]) == 2  # the full sizes over a quick run: refused, nothing mixed
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_train: 96 -> 2000" in err[0], err
