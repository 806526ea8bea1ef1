"""make-lmms-task: a digit-grid data set -> an lmms-eval task folder, and its one-line errors."""

from mllm_bridge.cli import main


def test_make_lmms_task_writes_a_movable_task_folder(grids_dir, tmp_path, capsys):
    out = tmp_path / "tasks"
    assert main(["make-lmms-task", "--data", str(grids_dir), "--out", str(out)]) == 0
    assert "128 questions written" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "digit_grids.parquet", "digit_grids_mc.yaml",
                                                     "digit_grids_qa.yaml"]
    from datasets import Dataset

    moved = tmp_path / "moved"
    out.rename(moved)  # images are embedded and the YAML names its data relative to itself
    docs = Dataset.from_parquet(str(moved / "digit_grids.parquet"), cache_dir=str(tmp_path / "cache"))
    assert len(docs) == 128 and set(docs[0]["answer"]) <= set("0123456789")
    assert docs[0]["image"].size == (32, 32) and "<image>" not in docs[0]["question"]

    capsys.readouterr()
    assert main(["make-lmms-task", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "t2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no test_qa.json" in err and "make-digit-grids" in err
