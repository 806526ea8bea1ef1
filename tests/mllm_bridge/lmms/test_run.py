"""lmms-eval itself running our checkpoints: `eval-lmms` (through `python -m lmms_eval --model llava_clipmoe`),
lmms-eval's built-in `llava` model, the digit-grid task folder, and the one-line errors of the commands."""

import json
import os
import subprocess
import sys

import pytest

from mllm_bridge.cli import main
from mllm_bridge.lmms.results import RunResult, markdown_report

# Offline, and one thread: tiny models gain nothing from a second one, whose spin-waits on shared cores cost a lot.
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}


def run_python(args, tmp_path, timeout=600):
    """A fresh interpreter outside the repository, as a user runs it (lmms-eval's global state stays out of ours)."""
    env = {**os.environ, **ENV, "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=timeout, check=False)


def only(paths):
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


def test_eval_lmms_bad_input_is_one_line(lmms_checkpoints, digit_task_dir, tmp_path, capsys):
    full = lmms_checkpoints.full
    cases = [
        (["--checkpoint", f"x={tmp_path / 'nope'}"], "checkpoint x: checkpoint .*nope does not exist"),
        (["--checkpoint", f"x={full},vision_tower={tmp_path / 'gone'}"], "checkpoint x: vision_tower=.*gone is not a"),
        (["--checkpoint", f"x={full},device=cpu"], "'device=cpu' is not key=value with key one of"),
        (["--checkpoint", f"x={full}", "--tasks", "digit_grids_qa,digit_grid_qa", "--include-path",
          str(digit_task_dir)], r"unknown lmms-eval task\(s\): digit_grid_qa \(did you mean digit_grids_qa"),
    ]
    import re

    for args, message in cases:
        assert main(["eval-lmms", *args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_init_llava_writes_a_checkpoint_without_tower_weights(lmms_checkpoints, clip_moe_dir, tmp_path, capsys):
    from safetensors import safe_open

    from mllm_bridge.llava.loading import plan_checkpoint

    out = tmp_path / "llava-new"
    assert main(["init-llava", "--tower", str(clip_moe_dir), "--llm", str(lmms_checkpoints.llm), "--out", str(out)]) == 0
    plan = plan_checkpoint(out)
    assert plan.kind == "full" and plan.tower.is_moe and (out / "tokenizer_config.json").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert not [k for k in weights.keys() if ".vision_tower." in k]
    capsys.readouterr()
    assert main(["init-llava", "--tower", str(clip_moe_dir), "--llm", str(tmp_path / "none"), "--out",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--llm" in err and "has no config.json" in err


@pytest.mark.slow
@pytest.mark.end_to_end
def test_eval_lmms_runs_lmms_eval_with_the_plugin(lmms_checkpoints, digit_task_dir, tmp_path):
    out = tmp_path / "eval"
    result = run_python(["-m", "mllm_bridge", "eval-lmms", "--checkpoint", f"moe={lmms_checkpoints.full}",
                         "--tasks", "mme,digit_grids_qa,digit_grids_mc", "--include-path", str(digit_task_dir),
                         "--limit", "6", "--batch-size", "2", "--device", "cpu", "--out", str(out)], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    unavailable = [line for line in result.stdout.splitlines() if line.startswith("task mme:")]
    assert len(unavailable) == 1 and "cannot be loaded here" in unavailable[0] and "skipped" in unavailable[0]

    run = out / "runs" / "moe"
    results = json.loads(only(run.rglob("*_results.json")).read_text())
    qa, mc = results["results"]["digit_grids_qa"], results["results"]["digit_grids_mc"]
    assert 0.0 <= qa["exact_match,none"] <= 1.0 and 0.0 <= mc["acc,none"] <= 1.0
    assert results["n-samples"]["digit_grids_qa"]["effective"] == 6
    assert results["n-samples"]["digit_grids_mc"]["effective"] == 6
    assert "mme" not in results["results"]

    usage = json.loads(only(run.rglob("*_expert_usage.json")).read_text())
    assert usage["moe_layers"] == [0, 1, 2, 3] and len(usage["all"]["layers"]) == 4
    for layer in usage["all"]["layers"]:
        assert sum(layer["expert_fraction"]) == pytest.approx(1.0)
    assert usage["all"]["images"] == 6 + 6 * 10  # QA: one encoding per question; MC: one per choice
    assert set(usage["tasks"]) == {"digit_grids_qa", "digit_grids_mc"}

    table = (out / "results.md").read_text()
    assert f"| digit_grids_qa | exact_match | 6 | {qa['exact_match,none']:.4f} |" in table
    assert "| moe | 3 | 66 |" in table and "mme (" in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoints"]["moe"]["error"] is None and "mme" in summary["skipped_tasks"]


@pytest.mark.slow
@pytest.mark.end_to_end
def test_lmms_evals_builtin_llava_evaluates_a_clip_moe_checkpoint(lmms_checkpoints, digit_task_dir, tmp_path):
    # The built-in model builds LLaVA through load_pretrained_model; the start-up hook gives it our tower.
    code = (
        "import json\n"
        "from lmms_eval.evaluator import simple_evaluate\n"
        "from lmms_eval.models.simple.llava import Llava\n"
        "from lmms_eval.tasks import TaskManager\n"
        f"lm = Llava(pretrained={str(lmms_checkpoints.full)!r}, device='cpu', device_map='auto')\n"
        "tower = type(lm.model.get_vision_tower()).__name__\n"
        f"tasks = TaskManager('ERROR', include_path={str(digit_task_dir)!r})\n"
        "out = simple_evaluate(model=lm, tasks=['digit_grids_qa'], limit=4, task_manager=tasks, device='cpu')\n"
        "print(json.dumps({'tower': tower, 'qa': out['results']['digit_grids_qa'],"
        " 'n': out['n-samples']['digit_grids_qa']['effective']}))\n"
    )
    result = run_python(["-c", code], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tower"] == "CLIPMoEVisionTower" and report["n"] == 4
    assert 0.0 <= report["qa"]["exact_match,none"] <= 1.0


def test_markdown_report_compares_runs_side_by_side(tmp_path):
    usage = {"num_experts": 2, "all": {"images": 5, "layers": [{"layer": 1, "expert_fraction": [0.75, 0.25]}]}}
    runs = [RunResult("dense", "a", tmp_path, metrics={"pope": {"pope_accuracy": 0.5}}, samples={"pope": 8}),
            RunResult("moe", "b", tmp_path, metrics={"pope": {"pope_accuracy": 0.625}}, samples={"pope": 8},
                      usage=usage),
            RunResult("broken", "c", tmp_path, error="Tasks not found: x")]
    table = markdown_report(runs, ["pope"], {"mme": "offline"}, limit=8)
    assert "| task | metric | n | dense | moe | broken |" in table
    assert "| pope | pope_accuracy | 8 | 0.5000 | 0.6250 | failed |" in table
    assert "`broken` failed: Tasks not found: x" in table and "mme (offline)" in table
    assert "| moe | 1 | 5 | 0.750 | 0.250 | 0.811 |" in table  # balance = entropy(0.75, 0.25) / log 2
