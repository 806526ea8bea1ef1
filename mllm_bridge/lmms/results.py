"""Read what lmms-eval (and `llava_clipmoe`) wrote for each checkpoint, and compare the runs in a markdown table.

Besides the table (results.md) and the summary (summary.json), per_question.json keeps every checkpoint's 0/1
correctness per question, keyed by lmms-eval's doc_id, so two checkpoints can be compared question by question
(a paired interval) rather than by their means alone.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from encoder.routing_stats import usage_balance
from encoder.utils.files import write_atomic

logger = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
PER_QUESTION_FILE = "per_question.json"


@dataclass
class RunResult:
    """One checkpoint's run: metrics per task ({task: {metric: value}}), sample counts, expert usage, or an error."""

    name: str
    pretrained: str
    run_dir: Path
    results_file: Path | None = None
    metrics: dict[str, dict[str, float | str]] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    usage_file: Path | None = None
    usage: dict | None = None
    error: str | None = None
    per_question: dict[str, dict[str, dict[int, int]]] = field(default_factory=dict)  # {task: {metric: {doc_id: 0/1}}}

    @property
    def ok(self) -> bool:
        return self.error is None

    def brief(self) -> str:
        parts = [f"{task} {metric} {_fmt(value)}" for task, values in self.metrics.items()
                 for metric, value in values.items()]
        return "; ".join(parts) or "no metrics"

    def as_dict(self) -> dict:
        return {"pretrained": self.pretrained, "run_dir": str(self.run_dir), "error": self.error,
                "results_file": str(self.results_file) if self.results_file else None,
                "usage_file": str(self.usage_file) if self.usage_file else None,
                "metrics": self.metrics, "samples": self.samples}


def read_run(name: str, pretrained: str, run_dir: Path, log: Path) -> RunResult:
    """The newest `*_results.json` (and `*_expert_usage.json`) under `run_dir`; the error line of `log` when lmms-eval
    wrote no results (it exits with status 0 even when evaluation fails)."""
    result = RunResult(name, pretrained, run_dir)
    results_files = sorted(run_dir.rglob("*_results.json"))
    if not results_files:
        result.error = f"{_error_line(log)} (log: {log})"
        return result
    result.results_file = results_files[-1]
    data = json.loads(result.results_file.read_text())
    for task, values in data.get("results", {}).items():
        result.metrics[task] = {key.split(",")[0]: value for key, value in values.items()
                                if key != "alias" and "_stderr" not in key}
        samples = data.get("n-samples", {}).get(task, {})
        if "effective" in samples:
            result.samples[task] = samples["effective"]
    result.per_question = read_per_question(result.results_file, result.metrics)
    usage_files = sorted(run_dir.rglob("*_expert_usage.json"))
    if usage_files:
        result.usage_file = usage_files[-1]
        result.usage = json.loads(result.usage_file.read_text())
    return result


def read_per_question(results_file: Path, metrics: dict[str, dict]) -> dict[str, dict[str, dict[int, int]]]:
    """{task: {metric: {doc_id: 0 or 1}}} from the sample logs lmms-eval wrote next to `results_file` with
    --log_samples (DATE_samples_TASK.jsonl, one line per question: its doc_id and its value of each metric).

    Only the logs of the same run (the same DATE prefix) are read, and only metrics whose every value is 0 or 1
    (correctness; scores in between are not hits). A task without a log, or whose log repeats a doc_id, is left
    out with a warning: pairing questions by doc_id needs each question once.
    """
    prefix = results_file.name.removesuffix("_results.json")
    per_question = {}
    for task, names in metrics.items():
        log = results_file.with_name(f"{prefix}_samples_{task}.jsonl")
        if not log.is_file():
            logger.warning("%s: no sample log %s (was --log_samples given?); no per-question results", task, log)
            continue
        samples = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        doc_ids = [s.get("doc_id") for s in samples]
        if not samples or None in doc_ids or len(set(doc_ids)) != len(doc_ids):
            logger.warning("%s: %s has %d samples but %d distinct doc_ids; no per-question results", task, log,
                           len(samples), len(set(doc_ids) - {None}))
            continue
        hits = {}
        for metric in names:
            values = [s.get(metric) for s in samples]
            if all(isinstance(v, (int, float)) and v in (0, 1) for v in values):
                hits[metric] = dict(sorted((int(s["doc_id"]), int(v)) for s, v in zip(samples, values)))
        if hits:
            per_question[task] = hits
    return per_question


def markdown_report(results: list[RunResult], tasks: list[str], skipped: dict[str, str], limit: int | None) -> str:
    """Metrics (rows: task and metric; columns: checkpoints) and per-layer expert usage of CLIP-MoE towers."""
    names = [r.name for r in results]
    checkpoints = ", ".join(f"`{r.name}` = {r.pretrained}" for r in results)
    limits = limit if limit is not None else "none (full tasks)"
    lines = ["# lmms-eval comparison", "", f"Checkpoints: {checkpoints}. Limit: {limits}.", "",
             "| task | metric | n | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for task, metric in _rows(results, tasks):
        n = next((r.samples[task] for r in results if task in r.samples), "")
        cells = [_fmt(r.metrics.get(task, {}).get(metric, "")) if r.ok else "failed" for r in results]
        lines.append(f"| {task} | {metric} | {n} | " + " | ".join(cells) + " |")
    for r in results:
        if not r.ok:
            lines += ["", f"`{r.name}` failed: {r.error}"]
    if skipped:
        lines += ["", "Skipped (data not loadable here): " + "; ".join(f"{t} ({why})" for t, why in skipped.items())]
    lines += _usage_lines(results)
    return "\n".join(lines) + "\n"


def write_report(out: Path, results: list[RunResult], tasks: list[str], skipped: dict[str, str],
                 limit: int | None) -> Path:
    """out/per_question.json (0/1 per question and checkpoint), out/summary.json (everything else, machine-readable)
    and out/results.md (the table), each written atomically; per_question.json first, so that a summary.json
    (what marks the run done) never comes without it."""
    per_question = {
        "about": ("1 = correct, 0 = wrong, per checkpoint, task and metric; keys are lmms-eval doc_ids (the "
                  "question's index in the task's split), the same question for every checkpoint of this run"),
        "limit": limit,
        "checkpoints": {r.name: r.per_question for r in results},  # JSON writes the int doc_ids as strings
    }
    write_atomic(out / PER_QUESTION_FILE, lambda tmp: tmp.write_text(json.dumps(per_question) + "\n"))
    summary = {"tasks": tasks, "skipped_tasks": skipped, "limit": limit, "per_question_file": PER_QUESTION_FILE,
               "checkpoints": {r.name: r.as_dict() for r in results}}
    write_atomic(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    text = markdown_report(results, tasks, skipped, limit)
    return write_atomic(out / "results.md", lambda tmp: tmp.write_text(text))


def _rows(results: list[RunResult], tasks: list[str]) -> list[tuple[str, str]]:
    """(task, metric) pairs: requested tasks first, then subtasks lmms-eval reported, each metric once."""
    order = list(tasks) + [t for r in results for t in r.metrics if t not in tasks]
    rows = []
    for task in dict.fromkeys(order):
        for metric in dict.fromkeys(m for r in results for m in r.metrics.get(task, {})):
            rows.append((task, metric))
    return rows


def _usage_lines(results: list[RunResult]) -> list[str]:
    with_usage = [r for r in results if r.usage]
    if not with_usage:
        return []
    experts = max(r.usage["num_experts"] for r in with_usage)
    lines = ["", "## Expert usage of the CLIP-MoE towers", "",
             ("Share of all top-k choices per expert, over every image token encoded (balance: entropy of the "
              "shares / log E; 1 = uniform)."), "",
             "| checkpoint | layer | images | " + " | ".join(f"E{e}" for e in range(experts)) + " | balance |",
             "|---|---|---|" + "---|" * (experts + 1)]
    for r in with_usage:
        part = r.usage["all"]
        for layer in part["layers"]:
            shares = layer["expert_fraction"] + [None] * (experts - len(layer["expert_fraction"]))
            cells = " | ".join("" if s is None else f"{s:.3f}" for s in shares)
            lines.append(f"| {r.name} | {layer['layer']} | {part['images']} | {cells} | "
                         f"{usage_balance(layer['expert_fraction']):.3f} |")
    return lines


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _error_line(log: Path) -> str:
    """lmms-eval's 'Error during evaluation: ...' line (or the last line) of a failed run's log."""
    lines = [_ANSI.sub("", line).strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error during evaluation:" in line:
            message = line.split("Error during evaluation:", 1)[1].strip()
            return message.removesuffix("Please set `--verbosity=DEBUG` to get more information.").strip(" .") or line
    return lines[-1] if lines else "lmms-eval wrote no results and no output"
