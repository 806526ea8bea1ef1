"""Fault tier, the research harness's numbers (`upcycle compare`, `upcycle replicate`, `upcycle.eval.intervals`):
nothing reported surer than the data allows, no input silently repeated or dropped, one failing candidate or a
kill costing only itself (they used to: a bootstrap interval of [100, 100] from 50 hits, a paired difference on 3
items called "higher", `--seeds 0,0` reported as a replication with std 0, a tower missing from the MLLM table
without a word, one failing sweep candidate stopping the whole comparison, an arm killed near its end restarting
from step 0)."""

from __future__ import annotations

import pytest

from upcycle.cli import main


# --- seeds: repeats and junk are refused in one line before anything is written ------------------------------

@pytest.mark.parametrize("seeds, says", [("0,0", "seed 0 is given more than once"),
                                         ("0,1,1", "seed 1 is given more than once"),
                                         ("0,-1", "'-1' is not a seed"), ("0,1.5", "'1.5' is not a seed"),
                                         ("0,,1", "'' is not a seed"), ("a", "'a' is not a seed")])
def test_compare_refuses_repeated_or_junk_seeds(seeds, says, base_clip_dir, grids_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--base", str(base_clip_dir), "--data", str(grids_dir), "--out", str(out),
                 "--arms", "base,dense", "--seeds", seeds])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--seeds" in err[0] and says in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("flag, seeds, says", [("--seeds", "0,0", "seed 0 is given more than once"),
                                               ("--mllm-seeds", "0,-2", "'-2' is not a seed"),
                                               ("--seeds", "1e3", "'1e3' is not a seed")])
def test_replicate_refuses_repeated_or_junk_seeds(flag, seeds, says, tmp_path, capsys):
    out = tmp_path / "rep"
    args = ["replicate", "--out", str(out), flag, seeds]
    if flag == "--seeds":
        args += ["--mllm-seeds", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and says in err[0], err
    assert not out.exists()
