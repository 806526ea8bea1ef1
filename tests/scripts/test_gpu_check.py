"""The GPU check's own behaviour where there is no GPU (its parts run in tests elsewhere and on a GPU)."""

import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

ROOT = REPO_ROOT

pytestmark = pytest.mark.end_to_end  # every test runs one of the scripts


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_one_line_exit_2_and_nothing_written(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(out), "--work",
                             str(tmp_path / "work")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and not out.exists() and not (tmp_path / "work").exists()
    assert result.stderr.strip().splitlines() == [
        "error: no CUDA device is visible; run scripts/gpu_check.sh on a machine with an NVIDIA GPU"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bench_moe_refuses_cuda_without_a_device():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_moe.py"), "--device", "cuda", "--quick"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no CUDA device is visible" in result.stderr


@pytest.mark.cuda
def test_bench_moe_on_cuda_in_bf16_reports_the_device_and_images_per_second():
    import json

    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_moe.py"), "--device", "cuda", "--dtype",
                             "bfloat16", "--quick"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["device"] == torch.cuda.get_device_name(0) and report["dtype"] == "bfloat16"
    assert all(v > 0 for v in report["tower"]["forward"]["images_per_s"].values())
