"""Searched vs rule-based at the same training budget: fold-0 validation Dice of CONFIG and CONFIG_searched.

Run after a search in the same work folder::

    automedseg plan DATASET --work-dir W -c 3d_fullres --time-budget 20m
    automedseg search DATASET --work-dir W -c 3d_fullres --trials 12 --time-budget 60m --threads 2
    python benchmarks/search_quality.py --work-dir W --budget 20m

Both configurations train fold 0 of the same split, one after the other on this machine, with the same
command apart from ``-c``: ``automedseg train DATASET --work-dir W -c C -f 0 --time-budget B --threads 2
--restart``; each is scored by its own final validation (``fold_0/validation/summary.json``: sliding window on
the held-out cases at the original resolution, no post-processing). The study (default SQLite storage in
``W/search/search.db``) is summarised next to it: trials per state, best trial, the search's wall time
(first trial start to last trial end) and every trial's value.

``--reuse`` reads a configuration's fold 0 instead of training it when it is already validated and was
trained with the same budget (``time_budget_s`` of its fold plan).

Results go to ``benchmarks/results/search_quality.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH_THREADS, DEFAULT_MSD_DIR, machine_info, md_table, write_results  # noqa: E402
from quality_budget import FOLD, _fmt, _run_cli, parse_budget, read_automedseg_fold  # noqa: E402


def study_summary(work: Path, configuration: str, study_name: str | None) -> dict:
    """Trials of the search study around ``configuration`` (default storage of ``work``)."""
    import optuna

    from automedseg.plans import Plans
    from automedseg.search import best_trial, default_storage_url, default_study_name, trial_counts
    from automedseg.workspace import Workspace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ws = Workspace(work)
    url = default_storage_url(ws)
    name = study_name or default_study_name(Plans.load(ws.plans_path), configuration)
    study = optuna.load_study(study_name=name, storage=url)
    trials = study.get_trials(deepcopy=False)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    states = {k: v for k, v in trial_counts(study).items() if v and k != "finished"}
    best = best_trial(study)
    return {
        "study": name,
        "storage": url,
        "trial_budget_s": study.user_attrs.get("trial_budget_s"),
        "total_budget_s": study.user_attrs.get("total_budget_s"),
        "states": states,
        "wall_s": (max(ends) - min(starts)).total_seconds() if starts and ends else None,
        "trial_seconds": sum((t.datetime_complete - t.datetime_start).total_seconds()
                             for t in trials if t.datetime_start and t.datetime_complete),
        "best_trial": None if best is None else best.number,
        "best_value": None if best is None else best.value,
        "best_params": {} if best is None else best.params,
        "rule_defaults": study.user_attrs.get("rule_defaults", {}),
        "trials": [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "epochs": t.last_step,
                    "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                    if t.datetime_start and t.datetime_complete else None,
                    "retry_of": t.system_attrs.get("failed_trial"), "params": t.params} for t in trials],
    }


def train_or_reuse(dataset: Path, work: Path, configuration: str, *, budget: str, reuse: bool, logs: Path) -> dict:
    """Fold 0 of ``configuration`` trained with ``budget`` (or reused), with its validation figures."""
    budget_s = parse_budget(budget)
    summary = work / configuration / f"fold_{FOLD}" / "validation" / "summary.json"
    if reuse and summary.is_file():
        fold = read_automedseg_fold(work, configuration)
        if fold["plan_time_budget_s"] and abs(float(fold["plan_time_budget_s"]) - budget_s) < 1:
            fold["source"] = "already trained with this budget (reused)"
            return fold
    args = ["train", dataset, "--work-dir", work, "-c", configuration, "-f", FOLD, "--time-budget", budget,
            "--threads", BENCH_THREADS, "--restart"]
    res = _run_cli(args, logs / f"train_{configuration}.log", f"train {configuration}")
    fold = read_automedseg_fold(work, configuration)
    fold["source"] = f"trained in this run ({res['wall_s']} s wall)"
    return fold


def build_summary(f: dict) -> str:
    rule, searched, study = f["rule"], f["searched"], f["study"]
    delta = None if rule["mean_dice"] is None or searched["mean_dice"] is None else (
        searched["mean_dice"] - rule["mean_dice"])
    rows = []
    for label, r in ((f["configuration"], rule), (f["configuration"] + "_searched", searched)):
        per_class = ", ".join(f"{k}: {_fmt(v)}" for k, v in (r.get("dice_per_class") or {}).items())
        rows.append([label, _fmt(r["mean_dice"]), per_class, r["epochs"], r["iterations"],
                     _fmt(r["train_seconds"], 0, " s"), r["batch_size"], r["patch_size"], r["features_per_stage"],
                     r["source"]])
    trial_rows = [[t["number"], t["state"], _fmt(t["value"]), t["epochs"] if t["epochs"] is not None else "-",
                   _fmt(t["seconds"], 0, " s"), t["retry_of"] if t["retry_of"] is not None else "-",
                   ", ".join(f"{k}={_fmt(v, 3)}" for k, v in t["params"].items())] for t in study["trials"]]
    m = f["machine"]
    cases = rule["val_cases"]
    n_cases = len(cases) if isinstance(cases, list) else cases
    lines = [
        "# Searched vs rule-based plan at the same training budget",
        "",
        f"Fold-0 validation mean Dice ({n_cases} held-out cases), both trained with "
        f"`--time-budget {f['budget']}` on the same split and machine; searched - rule-based = **{_fmt(delta)}** "
        f"(goal: >= +0.01).",
        "",
        md_table(["configuration", "mean Dice", "per class", "epochs", "iterations", "training", "batch", "patch",
                  "features", "source"], rows),
        "",
        f"Search: study `{study['study']}`, {study['states']}, ~{_fmt((study['trial_budget_s'] or 0) / 60, 1)} min "
        f"per trial, search budget {_fmt((study['total_budget_s'] or 0) / 60, 0)} min, wall time (first trial start "
        f"to last trial end, including any interruption) {_fmt((study['wall_s'] or 0) / 60, 1)} min; best trial "
        f"{study['best_trial']} (fold-0 Dice {_fmt(study['best_value'])} after its short training).",
        "",
        md_table(["trial", "state", "value", "epochs", "time", "retry of", "parameters"], trial_rows),
        "",
        f"Machine: {m['cpu_model']}, {m['cpu_count_logical']} logical CPUs, {m['memory_total_gib']} GiB; "
        f"{BENCH_THREADS} torch threads, training precision {f['precision']}; python {m['python']}, "
        f"torch {m['torch']}, automedseg {m['automedseg']}.",
        "",
        f"Command: `python benchmarks/search_quality.py --work-dir W --budget {f['budget']}` after `automedseg "
        "search` in W.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True, help="work folder holding plans.json and the study")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_MSD_DIR)
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--budget", default="20m", help="training budget of each fold 0 (default 20m)")
    parser.add_argument("--study-name", default=None)
    parser.add_argument("--reuse", action="store_true", help="reuse folds already validated with this budget")
    parser.add_argument("--searched-first", action="store_true", help="train the searched configuration first")
    args = parser.parse_args(argv)
    work = args.work_dir.resolve()
    logs = work / "benchmark_logs"
    logs.mkdir(parents=True, exist_ok=True)
    study = study_summary(work, args.configuration, args.study_name)
    order = [args.configuration, args.configuration + "_searched"]
    folds = {c: train_or_reuse(args.dataset, work, c, budget=args.budget, reuse=args.reuse, logs=logs)
             for c in (order[::-1] if args.searched_first else order)}
    from automedseg.device import cpu_supports_bf16

    figures = {"precision": "bf16 autocast" if cpu_supports_bf16() else "fp32", "configuration": args.configuration,
               "budget": args.budget, "work_dir": str(work), "rule": folds[order[0]],
               "searched": folds[order[1]], "study": study, "machine": machine_info()}
    json_path, md_path = write_results("search_quality", figures, build_summary(figures))
    print(md_path.read_text())
    print(f"written: {json_path}, {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
