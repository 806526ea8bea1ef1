"""Per-question correctness from lmms-eval's sample logs (--log_samples), written next to the summary."""

import json
import logging

from mllm_bridge.lmms.results import PER_QUESTION_FILE, read_run, write_report


def fake_lmms_run(run_dir, date, hits, task="digit_grids_qa"):
    """The files `python -m lmms_eval --output_path RUN --log_samples` leaves: RUN/MODEL/DATE_results.json and
    RUN/MODEL/DATE_samples_TASK.jsonl (one line per question; the metric under its own name, a score beside it)."""
    model = run_dir / "llava_clipmoe"
    model.mkdir(parents=True, exist_ok=True)
    results = {"results": {task: {"alias": task, "exact_match,none": sum(hits.values()) / len(hits),
                                  "exact_match_stderr,none": 0.1, "bleu,none": 0.5}},
               "n-samples": {task: {"original": 50, "effective": len(hits)}}}
    (model / f"{date}_results.json").write_text(json.dumps(results))
    lines = [json.dumps({"doc_id": doc, "target": "3", "filtered_resps": ["3"], "doc_hash": "h", "input": "q",
                         "exact_match": float(hit), "bleu": 0.5}) for doc, hit in reversed(hits.items())]
    (model / f"{date}_samples_{task}.jsonl").write_text("\n".join(lines) + "\n")


def test_per_question_hits_are_read_from_the_sample_log_and_written_beside_the_summary(tmp_path):
    log = tmp_path / "lmms_eval.log"
    log.write_text("$ python -m lmms_eval ...\n")
    fake_lmms_run(tmp_path / "runs" / "dense", "20240101_000000", {0: 1, 1: 1, 2: 1, 3: 1})  # an older run
    fake_lmms_run(tmp_path / "runs" / "dense", "20250101_000000", {0: 1, 1: 0, 2: 1, 3: 0})
    fake_lmms_run(tmp_path / "runs" / "moe", "20250101_000100", {0: 0, 1: 0, 2: 1, 3: 1})
    runs = [read_run(name, f"ckpt-{name}", tmp_path / "runs" / name, log) for name in ("dense", "moe")]
    # the newest run's log only, ordered by doc_id; `bleu` (0.5, not a hit) is not a correctness
    assert runs[0].per_question == {"digit_grids_qa": {"exact_match": {0: 1, 1: 0, 2: 1, 3: 0}}}

    out = tmp_path / "out"
    write_report(out, runs, ["digit_grids_qa"], {}, limit=4)
    per_question = json.loads((out / PER_QUESTION_FILE).read_text())
    assert per_question["limit"] == 4
    assert per_question["checkpoints"] == {
        "dense": {"digit_grids_qa": {"exact_match": {"0": 1, "1": 0, "2": 1, "3": 0}}},
        "moe": {"digit_grids_qa": {"exact_match": {"0": 0, "1": 0, "2": 1, "3": 1}}},
    }
    assert json.loads((out / "summary.json").read_text())["per_question_file"] == PER_QUESTION_FILE
    assert sorted(p.name for p in out.iterdir()) == [PER_QUESTION_FILE, "results.md", "summary.json"]  # no temp files


def test_a_log_that_repeats_a_question_or_is_missing_gives_no_hits(tmp_path, caplog):
    log = tmp_path / "lmms_eval.log"
    log.write_text("$ python -m lmms_eval ...\n")
    run = tmp_path / "runs" / "x"
    fake_lmms_run(run, "20250101_000000", {0: 1, 1: 0})
    samples = run / "llava_clipmoe" / "20250101_000000_samples_digit_grids_qa.jsonl"
    samples.write_text(samples.read_text() * 2)  # appended twice: pairing by doc_id would be ambiguous
    with caplog.at_level(logging.WARNING):
        result = read_run("x", "ckpt", run, log)
    assert result.per_question == {} and result.metrics["digit_grids_qa"]["exact_match"] == 0.5
    assert "4 samples but 2 distinct doc_ids" in caplog.text

    samples.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert read_run("x", "ckpt", run, log).per_question == {}
    assert "--log_samples" in caplog.text
