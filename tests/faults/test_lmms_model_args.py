"""Fault tier, the lmms-eval plugin: a bad --model_args ends the run with one line and exit status 2 (lmms-eval
itself would print the traceback of any Exception and exit 0, as if the run had finished)."""

import os
import subprocess
import sys

import pytest

from mllm_bridge.lmms.model import LlavaCLIPMoE


@pytest.mark.parametrize("arg_string, message", [
    ("pretrained={full},typo=1", "unknown model argument(s) typo; the arguments are pretrained, model_base"),
    ("pretrained={missing}", "does not exist"),
    ("pretrained={full},conv_template=nope", "conv_template=nope is not one of"),
    ("pretrained={full},dtype=float64", "dtype=float64 not understood"),
    ("pretrained={full},max_new_tokens=abc", "max_new_tokens=abc: expected a whole number"),
    ("conv_template=plain", "no pretrained=...; pass --model_args pretrained=CHECKPOINT_DIR"),
])
def test_a_bad_model_argument_is_one_line_and_exit_2(arg_string, message, lmms_checkpoints, tmp_path, capsys):
    args = arg_string.format(full=lmms_checkpoints.full, missing=tmp_path / "llava-missing")
    with pytest.raises(SystemExit) as stop:
        LlavaCLIPMoE.create_from_arg_string(args, {"device": "cpu", "batch_size": 1})
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: llava_clipmoe: ") and message in err[0], err


@pytest.mark.end_to_end
def test_python_m_lmms_eval_exits_non_zero_on_a_typo(lmms_checkpoints, digit_task_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "llava_clipmoe", "--model_args",
         f"pretrained={lmms_checkpoints.full},max_new_token=8", "--tasks", "digit_grids_qa", "--include_path",
         str(digit_task_dir), "--limit", "1", "--device", "cpu", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: llava_clipmoe: unknown model argument(s) max_new_token" in result.stderr
    assert "Traceback" not in result.stderr
