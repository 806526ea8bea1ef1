"""`python -m upcycle compare`: every arm x seed from one base, equal budgets, results resumable.

Each arm/seed folder records the settings that shape it (`settings.json`, written before training starts) and
leaves `result.json` when it finishes; a re-run with the same settings skips finished arms and resumes unfinished
training from its checkpoints, so an interrupted comparison never recomputes finished work (an arm finished
before per-query hits were recorded is evaluated again, not retrained). A re-run with other settings (another
learning rate, base or data) stops with one line naming what differs.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from encoder.utils.errors import UserError
from encoder.utils.files import check_output_parent, file_sha256, write_atomic
from encoder.utils.step_record import SettingsChanged, claim
from encoder.weight_files import weights_entry, weights_sha256

from ...recipes.dmu.clustering import SMALL_CLUSTER_RULES
from ..seeds import parse_seeds
from .arms import (ARMS, DMU_VARIED, SWEPT_LR, ArmSettings, CompareConfig, Setting, arm_settings, check_dmu_stage_epochs,
                   loss_curve, scaled, train_arm)
from .experts import expert_breakdown
from .measure import forward_ms_per_image, metrics_on_split
from .report import arms_legend, intervals_section, loss_plot, positions_table, results_table


def arm_folder(out: Path, arm: str, seed: int, choice: "float | Setting", sweeping: bool) -> Path:
    """arms/ARM/seed-S, or arms/ARM/lr-xF[-NAME-VALUE...]/seed-S when settings are swept."""
    choice = choice if isinstance(choice, Setting) else Setting(float(choice))
    return out / "arms" / arm / (choice.tag() if sweeping and arm != "base" else "") / f"seed-{seed}"


def run_arm(arm: str, seed: int, base_dir: Path, data_dir: Path, folder: Path, settings: ArmSettings,
            inputs: dict[str, str], split: str = "test") -> dict:
    """Train arm x seed into `folder` (or reuse it) and evaluate it on `split` ("test", or "val" for a sweep);
    the result keeps every split it was evaluated on (test metrics at the top level, val's under "val")."""
    done = folder / "result.json"
    claim(folder, arm_settings(arm, seed, settings, inputs),
          f"use another --out, or delete {folder} to retrain this arm with the new settings")
    if done.exists():
        result = json.loads(done.read_text())
        if (split == "val" and "val" in result) or (split == "test" and "hits" in result):
            return result
        # evaluated on the other split so far, or before per-query hits were recorded: evaluate, never retrain
    else:
        start = time.time()
        trained = train_arm(arm, seed, base_dir, data_dir / "train.json", folder, settings)
        result = {"arm": arm, "seed": seed, **trained, "base_sha256": weights_sha256(base_dir),
                  "train_seconds": round(time.time() - start, 1)}
        folder.mkdir(parents=True, exist_ok=True)
    if split == "val":
        result["val"] = metrics_on_split(result["model"], data_dir / "val.json")
    else:
        result.update(metrics_on_split(result["model"], data_dir / "test.json"))
    write_atomic(done, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    return result


def validation_score(metrics: dict) -> float:
    """What a sweep maximises: R@1 averaged over both directions, on the validation split."""
    return (metrics["i2t_r1"] + metrics["t2i_r1"]) / 2


def sweep_arm(arm: str, seed: int, factors: list[float], base_dir: Path, data_dir: Path, out: Path,
              settings: ArmSettings, inputs: dict[str, str]) -> tuple[float, dict[float, float | str]]:
    """Train `arm` with `seed` at every factor, score each on val.json only; return the best factor (the smaller
    one on a tie) and every factor's score, or why it failed (`validation_run`). The test split is never read
    here. Raises UserError when every factor failed."""
    scores = {}
    for factor in factors:
        scores[factor] = validation_run(arm, seed, Setting(factor), base_dir, data_dir, out, settings, inputs)
    scored = [f for f in sorted(scores) if not isinstance(scores[f], str)]
    if not scored:
        raise UserError(f"arm {arm}: every learning-rate factor failed on the first seed ("
                        + "; ".join(f"x{f:g}: {why}" for f, why in scores.items())
                        + f"); leave {arm} out of --arms or change its settings")
    return max(scored, key=lambda f: scores[f]), scores


def validation_run(arm: str, seed: int, choice: Setting, base_dir: Path, data_dir: Path, out: Path,
                   settings: ArmSettings, inputs: dict[str, str]) -> float | str:
    """Train (or reuse) one sweep point and return its validation score, or, when its recipe refuses the setting
    (DMU's `drop` leaving a stage nothing to train, ...), why: one failing candidate is reported and skipped, and
    the others are still compared. Settings changed under an existing folder still stop the comparison."""
    folder = arm_folder(out, arm, seed, choice, sweeping=True)
    try:
        result = run_arm(arm, seed, base_dir, data_dir, folder, scaled(arm, settings, choice), inputs, split="val")
    except SettingsChanged:
        raise
    except UserError as err:
        print(f"{arm} ({choice.tag()}) failed and is skipped: {err}")
        return f"the recipe stopped: {err}"
    return validation_score(result["val"])


def sweep_dmu(seed: int, start: Setting, tried: dict[str, list], base_dir: Path, data_dir: Path, out: Path,
              settings: ArmSettings, inputs: dict[str, str]) -> tuple[Setting, list[dict]]:
    """DMU's own settings after its learning rate, one at a time in DMU_VARIED order (stage epochs, then
    small-cluster handling), each value trained with `seed` and scored on val.json, the best kept for the next
    (the one already chosen on a tie). A value whose run failed is reported (its row says why) and skipped; when
    every value of a setting failed, the setting chosen so far stays. Returns the chosen setting and one row per
    setting tried."""
    chosen, rows = start, []
    for name in DMU_VARIED:
        values = tried.get(name) or []
        if not values:
            continue
        scores = {}
        for value in values:
            choice = chosen.with_override(name, value, settings)
            scores[value] = (choice, validation_run("dmu", seed, choice, base_dir, data_dir, out, settings, inputs))
        current = dict(chosen.overrides).get(name, getattr(settings, name))
        scored = [v for v in values if not isinstance(scores[v][1], str)]
        best = max(scored, key=lambda v: (scores[v][1], v == current)) if scored else current
        rows.append({"setting": name, "scores": {str(v): score if isinstance(score, str) else round(score, 3)
                                                 for v, (_, score) in scores.items()},
                     "chosen": best, "all_failed": not scored})
        if scored:
            chosen = scores[best][0]
    return chosen, rows


def seed_run(arm: str, seed: int, choice: Setting, base_dir: Path, data_dir: Path, out: Path, settings: ArmSettings,
             inputs: dict[str, str], sweeping: bool) -> dict:
    """One seed of an arm at its chosen setting, evaluated on test. A recipe's refusal here (a seed whose data
    leaves DMU's `drop` nothing to train, ...) stops the comparison, whose seeds must all be there to be paired,
    with one line naming the arm, seed and setting and what `compare` can do about it."""
    try:
        return run_arm(arm, seed, base_dir, data_dir, arm_folder(out, arm, seed, choice, sweeping),
                       scaled(arm, settings, choice), inputs)
    except SettingsChanged:
        raise
    except UserError as err:
        raise UserError(f"arm {arm}, seed {seed} ({choice.tag()}): the recipe stopped: {err}; the comparison "
                        f"needs every seed of an arm, so leave {arm} out of --arms, drop seed {seed} from --seeds "
                        "or sweep other settings") from None


def check_fairness(results: dict[str, list[dict]], settings: ArmSettings, num_train: int,
                   dropping: frozenset[str] = frozenset()) -> int:
    """Every trained arm saw the same number of pairs and every arm started from the same base weights. The arms
    in `dropping` (DMU with --small-clusters drop, which skips the pairs of small clusters) may have seen fewer,
    never more."""
    budget = settings.budget_epochs * num_train
    for arm, runs in results.items():
        for r in runs:
            want = 0 if arm == "base" else budget
            if r["pairs_seen"] != want and not (arm in dropping and r["pairs_seen"] < want):
                raise AssertionError(f"unequal budget: {arm} seed {r['seed']} saw {r['pairs_seen']} pairs, "
                                     f"expected {want}")
    bases = {r["base_sha256"] for runs in results.values() for r in runs}
    if len(bases) != 1:
        raise AssertionError(f"arms started from different base weights: {sorted(bases)}")
    return budget


def run_compare(args: CompareConfig) -> int:
    base_dir, data_dir, out = Path(args.base), Path(args.data), Path(args.out)
    check_output_parent(out / "compare.json")  # before hours of training the arms, not after
    for needed in (weights_entry(base_dir) or base_dir / "model.safetensors", data_dir / "train.json",
                   data_dir / "test.json"):
        if not needed.is_file():
            raise UserError(f"{needed} not found; --base must be a CLIP directory and --data a digit-grid "
                            "directory (python -m upcycle make-digit-grids)")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise UserError(f"--arms {args.arms!r}: unknown {unknown}; choose from {', '.join(ARMS)}")
    seeds = parse_seeds(args.seeds, "--seeds")
    factors = lr_factors(args.lr_factors)
    settings = args.settings
    dmu_tried = dmu_choices(args, settings) if "dmu" in arms else {}
    sweeping = len(factors) > 1 or bool(dmu_tried)
    if sweeping and not _has_records(data_dir / "val.json"):
        what = f"--lr-factors {args.lr_factors}" if len(factors) > 1 else "--dmu-stage-epochs / --dmu-small-clusters"
        raise UserError(f"{what}: a sweep is scored on {data_dir / 'val.json'}, which is missing or empty; make the "
                        "data with --num-val N, or pass one value")
    start = time.time()
    inputs = {"base_sha256": weights_sha256(base_dir),
              "train_sha256": file_sha256(data_dir / "train.json"), "test_sha256": file_sha256(data_dir / "test.json")}
    if sweeping:
        inputs["val_sha256"] = file_sha256(data_dir / "val.json")
    chosen, sweeps, dmu_rows = {}, {}, []
    for arm in arms:
        chosen[arm] = Setting(factors[0])
        if arm != "base" and sweeping:
            factor, sweeps[arm] = sweep_arm(arm, seeds[0], factors, base_dir, data_dir, out, settings, inputs)
            chosen[arm] = Setting(factor)
        if arm == "dmu" and dmu_tried:
            chosen[arm], dmu_rows = sweep_dmu(seeds[0], chosen[arm], dmu_tried, base_dir, data_dir, out, settings,
                                              inputs)
    results = {arm: [seed_run(arm, s, chosen[arm], base_dir, data_dir, out, settings, inputs, sweeping)
                     for s in (seeds if arm != "base" else [0])] for arm in arms}
    reference, why = reference_arm(results, sweeping)
    experts = {}
    if "dmu" in results:
        val = data_dir / "val.json" if _has_records(data_dir / "val.json") else None
        experts = {r["seed"]: dmu_experts(arm_folder(out, "dmu", r["seed"], chosen["dmu"], sweeping), base_dir,
                                          data_dir / "test.json", val) for r in results["dmu"]}
    for arm, runs in results.items():
        for r in runs:
            point_at(out / "towers" / arm / f"seed-{r['seed']}", Path(r["model"]))
    num_train = len(json.loads((data_dir / "train.json").read_text()))
    dmu_settings = scaled("dmu", settings, chosen["dmu"]) if "dmu" in chosen else settings
    dropping = frozenset({"dmu"} if "dmu" in results and dmu_settings.small_clusters == "drop" else ())
    budget = check_fairness(results, settings, num_train, dropping)
    ms = forward_ms_per_image({arm: runs[0]["model"] for arm, runs in results.items()},
                              json.loads((base_dir / "config.json").read_text())["vision_config"]["image_size"])
    plot = loss_plot({arm: loss_curve(arm_folder(out, arm, seeds[0], chosen[arm], sweeping), arm)
                      for arm in arms if arm != "base"}, out / "training_loss.png", f"training loss, seed {seeds[0]}")
    summary = {"arms": arms, "seeds": seeds, "dmu_experts": {s: _without_hits(e) for s, e in experts.items()},
               "budget_pairs": budget, "settings": vars(settings), "lr_factors": factors,
               "chosen_lr_factor": {arm: c.factor for arm, c in chosen.items()},
               "chosen_dmu_settings": dict(chosen["dmu"].overrides) if "dmu" in chosen else {},
               "dmu_validation_scores": dmu_rows, "validation_scores": sweeps,
               "reference_arm": reference, "ms_per_image": ms, "results": results}
    write_atomic(out / "compare.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))
    report = render(results, ms, settings, budget, seeds, num_train, plot.name, time.time() - start,
                    "\n\n".join(filter(None, [sweep_section(sweeps, chosen, settings) if sweeps else "",
                                               dmu_sweep_section(dmu_rows, chosen.get("dmu"), settings)])),
                    reference, why,
                    experts_section(experts) + "\n\n" + diagnostics_section(
                        {r["seed"]: arm_folder(out, "dmu", r["seed"], chosen["dmu"], sweeping) / "dmu"
                         for r in results["dmu"]}) if experts else "", dmu_settings)
    write_atomic(out / "compare.md", lambda tmp: tmp.write_text(report))
    print(report)
    print(f"\ncomparison written to {out / 'compare.md'}")
    return 0


def dmu_experts(folder: Path, base_dir: Path, test: Path, val: Path | None) -> dict:
    """MoE vs each expert alone vs the FFN average for one DMU run (`experts.expert_breakdown`), the best expert
    chosen on validation when there is one; cached in the run's folder (evaluation only, no training)."""
    cached = folder / "experts.json"
    if cached.exists():
        result = json.loads(cached.read_text())
        if "verdict" in result["intervals"]["moe_minus_best"]["i2t_r1"]:
            return result
        # written before differences carried their verdict (higher only with enough differing queries): redone
    result = expert_breakdown(folder / "dmu", base_dir, folder / "model", test, val_json=val)
    write_atomic(cached, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    return result


def _without_hits(breakdown: dict) -> dict:
    return {**breakdown, "models": {name: {k: v for k, v in m.items() if k != "hits"}
                                    for name, m in breakdown["models"].items()}}


def experts_section(experts: dict[int, dict]) -> str:
    """Per DMU seed: the MoE, its best single expert (chosen on validation when there was one) and the FFN
    average, R@1 on test, with the paired intervals of the MoE's differences."""
    def cell(ci: dict) -> str:
        return f"{ci['estimate']:+.1f} [{ci['low']:+.1f}, {ci['high']:+.1f}] {ci['verdict']}"

    head = ["seed", "MoE R@1 (I→T / T→I)", "best expert (chosen on)", "its R@1", "FFN average R@1",
            "MoE − best, I→T [95% CI]", "MoE − best, T→I [95% CI]", "MoE − average, I→T [95% CI]", "MoE − average, T→I [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for seed, e in sorted(experts.items()):
        models, best = e["models"], e["best_expert"]

        def r1(name: str) -> str:
            return f"{models[name]['i2t_r1']:.1f} / {models[name]['t2i_r1']:.1f}"

        ci_best, ci_avg = e["intervals"]["moe_minus_best"], e["intervals"]["moe_minus_average"]
        lines.append("| " + " | ".join([str(seed), r1("moe"), f"{best['name']} ({best['chosen_on']})", r1(best["name"]),
                                        r1("ffn-average"), cell(ci_best["i2t_r1"]), cell(ci_best["t2i_r1"]),
                                        cell(ci_avg["i2t_r1"]), cell(ci_avg["t2i_r1"])]) + " |")
    singles = ", ".join(f"{name} {m['r1_mean']:.1f}" for name, m in experts[min(experts)]["models"].items()
                        if name.startswith("expert-"))
    return ("DMU's claim inside the MoE: does routing among the experts beat each expert alone (the base with one "
            "stage's FFNs; expert-0 is the base) and the dense model with the experts' FFNs averaged? R@1 on test, "
            f"percent; paired intervals on the same test queries. Mean R@1 of the single experts, seed "
            f"{min(experts)}: {singles}.\n\n" + "\n".join(lines))


def diagnostics_section(work_dirs: dict[int, Path]) -> str:
    """Whether DMU's stages came out different, per seed, from each run's manifest: clusters per stage (found ->
    used after small-cluster handling), NMI of successive stages' batch labels, cosine of the stage updates."""
    lines = ["| seed | clusters per stage (found → used) | NMI of successive stages' batches | "
             "cosine of stage updates |", "|---|---|---|---|"]
    for seed, work in sorted(work_dirs.items()):
        try:
            manifest = json.loads((work / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        stages = manifest.get("stages", {})
        clusters = ", ".join(f"{v['clusters'].get('clusters_found')} → {v['clusters'].get('clusters_used')}"
                             for _, v in sorted(stages.items(), key=lambda kv: int(kv[0])))
        diag = manifest.get("diagnostics") or {}
        nmi = ", ".join(f"{k}: {v:.2f}" for k, v in (diag.get("batch_label_nmi") or {}).items())
        cos = ", ".join(f"{k}: {v:.2f}" for k, v in (diag.get("update_cosine") or {}).items())
        lines.append(f"| {seed} | {clusters} | {nmi or '-'} | {cos or '-'} |")
    return ("DMU's stages (diagnostics of `upcycle dmu`): distinct experts need stages whose batches and updates "
            "differ (NMI and cosine well below 1).\n\n" + "\n".join(lines))


def point_at(link: Path, target: Path) -> None:
    """`link` -> `target` (relative), replaced atomically: OUT/towers/ARM names each arm's first-seed model at its
    chosen learning rate, a path later steps (the LLaVA towers) can name before the sweep has chosen."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()))
    os.replace(tmp, link)


def dmu_choices(args: CompareConfig, settings: ArmSettings) -> dict[str, list]:
    """The DMU settings to try on val (--dmu-stage-epochs, --dmu-small-clusters), checked; {} when none."""
    tried = {}
    if args.dmu_stage_epochs.strip():
        try:
            values = [int(v) for v in args.dmu_stage_epochs.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--dmu-stage-epochs {args.dmu_stage_epochs!r}: give whole numbers, e.g. 2,3,4") from None
        check_dmu_stage_epochs(values, settings)
        tried["stage_epochs"] = list(dict.fromkeys(values))
    if args.dmu_small_clusters.strip():
        values = [v.strip() for v in args.dmu_small_clusters.split(",") if v.strip()]
        bad = [v for v in values if v not in SMALL_CLUSTER_RULES]
        if bad:
            raise UserError(f"--dmu-small-clusters {args.dmu_small_clusters!r}: unknown {bad}; choose from "
                            f"{', '.join(SMALL_CLUSTER_RULES)}")
        tried["small_clusters"] = list(dict.fromkeys(values))
    return tried


def lr_factors(text: str) -> list[float]:
    try:
        factors = [float(f) for f in text.split(",") if f.strip()]
    except ValueError:
        factors = []
    if not factors or any(not f > 0 or f != f or f == float("inf") for f in factors) or len(set(factors)) < len(factors):
        raise UserError(f"--lr-factors {text!r}: give distinct positive numbers, e.g. 1,3,10")
    return factors


def _has_records(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()))
    except (OSError, ValueError):
        return False


DENSE_ARMS = ("dense", "dense-ffn")


def reference_arm(results: dict[str, list[dict]], sweeping: bool) -> tuple[str | None, str]:
    """The dense arm the others are paired against, and why it: the best on validation when the sweep scored the
    arms there (never on test), else `dense`, fixed in advance."""
    dense = [arm for arm in DENSE_ARMS if arm in results]
    if not dense:
        return None, ""
    if sweeping and len(dense) > 1:
        best = max(dense, key=lambda arm: validation_score(results[arm][0]["val"]))
        return best, f"the dense arm with the higher validation R@1 ({', '.join(dense)}; chosen on val, not test)"
    return dense[0], "fixed in advance"


def sweep_section(sweeps: dict[str, dict[float, float]], chosen: dict[str, float], settings: ArmSettings) -> str:
    """The learning-rate sweep: each factor's validation R@1 per arm (first seed), the chosen one in bold."""
    factors = sorted({f for scores in sweeps.values() for f in scores})
    chosen = {arm: c.factor if isinstance(c, Setting) else c for arm, c in chosen.items()}
    head = ["arm", "swept rate", *(f"x{f:g}" for f in factors), "chosen"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    failures = []
    for arm, scores in sweeps.items():
        name = SWEPT_LR[arm]
        cells = [arm, f"{name} = {getattr(settings, name):g} x factor"]
        for f in factors:
            if f not in scores:
                cells.append("-")
            elif isinstance(scores[f], str):
                cells.append("failed")
                failures.append(f"- `{arm}` at x{f:g} failed and was skipped: {scores[f]}")
            else:
                cells.append(f"**{scores[f]:.1f}**" if f == chosen[arm] else f"{scores[f]:.1f}")
        cells.append(f"x{chosen[arm]:g} ({getattr(settings, name) * chosen[arm]:g})")
        lines.append("| " + " | ".join(cells) + " |")
    return ("Learning rates chosen on the validation split (val.json; its digits are disjoint from train and test): "
            "each arm trained with the first seed at every factor, scored by validation R@1 averaged over both "
            "directions; every seed then trained at the chosen factor, and only those runs were evaluated on test."
            + edge_note(sweeps, chosen) + "\n\n" + "\n".join(lines + (["", *failures] if failures else [])))


def edge_note(sweeps: dict[str, dict[float, float]], chosen: dict[str, float]) -> str:
    """A warning when an arm's best factor is the largest or smallest tried: its optimum may lie outside the grid."""
    edges = [(arm, "largest" if chosen[arm] == max(scores) else "smallest") for arm, scores in sweeps.items()
             if len(scores) > 1 and chosen[arm] in (max(scores), min(scores))]
    if not edges:
        return " Every chosen factor lies inside the grid."
    return (" At the edge of the grid (the optimum may lie beyond it): "
            + ", ".join(f"{arm} ({edge} factor)" for arm, edge in edges) + ".")


def dmu_sweep_section(rows: list[dict], chosen: "Setting | None", settings: ArmSettings) -> str:
    """DMU's own settings tried on val after its learning rate (`sweep_dmu`), one table row per setting."""
    if not rows or chosen is None:
        return ""
    lines, failures = ["| DMU setting | tried (validation R@1) | chosen |", "|---|---|---|"], []
    for row in rows:
        setting = row["setting"].replace("_", " ")
        tried = []
        for v, score in row["scores"].items():
            if isinstance(score, str):
                tried.append(f"{v}: failed")
                failures.append(f"- {setting} {v} failed and was skipped: {score}")
            else:
                tried.append(f"**{v}: {score:.1f}**" if v == str(row["chosen"]) else f"{v}: {score:.1f}")
        kept = f"{row['chosen']} (all tried failed; kept)" if row.get("all_failed") else row["chosen"]
        lines.append(f"| {setting} | {', '.join(tried)} | {kept} |")
    lines += ["", *failures] if failures else []
    final = scaled("dmu", settings, chosen)
    return ("DMU's own settings, chosen on the same validation split after its learning rate, one at a time (first "
            f"seed; equal budget: fewer epochs per stage give the rest of the {settings.budget_epochs} epochs to "
            f"router training). Chosen: x{chosen.factor:g} stage rate, {final.stage_epochs} epochs per stage, "
            f"{final.router_epochs} of router training, small clusters: {final.small_clusters}.\n\n"
            + "\n".join(lines))


def render(results, ms, settings: ArmSettings, budget: int, seeds, num_train: int, plot: str, seconds: float,
           sweep: str = "", reference: str | None = "dense", why: str = "fixed in advance", experts: str = "",
           dmu: ArmSettings | None = None) -> str:
    dmu = dmu or settings
    dropped = (" (at most: with small clusters dropped DMU skips their pairs, so it saw fewer; see the pairs column)"
               if dmu.small_clusters == "drop" and "dmu" in results else "")
    return "\n".join([
        "## CLIP arms on the digit-grid test split",
        "",
        arms_legend(results),
        "",
        f"Every trained arm saw {budget:,} image-text pairs{dropped} ({settings.budget_epochs} epochs of "
        f"{num_train:,}: DMU = {dmu.num_experts - 1} MCL stages x {dmu.stage_epochs} + {dmu.router_epochs} of router "
        f"training), all from the same base weights (checked); optimizer steps follow each recipe's batch plan "
        f"(column), so the table holds pairs seen equal, not steps. Metrics in percent, mean ± std over seeds "
        f"{', '.join(map(str, seeds))}; MoE arms use top-{settings.top_k} of {settings.num_experts} experts. "
        "Forward time: vision tower, batch 32, median of 7 interleaved rounds in one process.",
        "",
        results_table(results, ms),
        "",
        *([sweep, ""] if sweep else []),
        intervals_section(results, reference, why),
        *(["", experts] if experts else []),
        "",
        "Zero-shot digit accuracy per grid position (chance 10%):",
        "",
        positions_table(results),
        "",
        f"![training loss]({plot})",
        "",
        "DMU's MCL-stage losses come from within-cluster batches (harder negatives) with label smoothing 0.1, so "
        "their level is not comparable with the other curves; compare the test metrics.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; this step took {seconds / 60:.1f} min (finished arms are reused on re-runs).",
        "",
    ])
