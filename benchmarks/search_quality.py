"""Searched vs rule-based at the same fold budget: does ``automedseg search`` adopt only what wins?

One invocation plans a dataset for a fold budget, runs the search with its confirmation, and reports::

    automedseg plan DATASET --work-dir W -c C --time-budget BUDGET
    automedseg search DATASET --work-dir W -c C --trials N --time-budget SEARCH --fidelity F --confirm K

The confirmation (:mod:`automedseg.search_confirm`) trains the rule plan and the search's ``K`` best candidates
on fold 0 of the same split at the full fold budget, exactly as ``automedseg train DATASET -c C -f 0`` would, and
writes ``C_searched`` only when a candidate beats the rule plan. This script reads its verdict
(``search/<study>/confirmation.json`` with the owner's reader) and each run's fold (validation summary, training
log, plan copy) and the study's trials, and writes ``benchmarks/results/<name>.{json,md}`` (default
``search_quality``; ``--results-name`` for a second dataset).

The search resumes where it stopped when run again (trials, then the confirmation), so ``--keep`` continues an
interrupted benchmark; without it the work folder is removed first. 2D shared datasets are imported as
``shared_datasets.py`` does.

Usage::

    python benchmarks/search_quality.py --budget 5m --trials 8 --search-budget 10m --fidelity continuation
    python benchmarks/search_quality.py --shared isbi2012_em --budget 5m --trials 8 --search-budget 10m \\
        --fidelity continuation --results-name search_quality_isbi2012_em
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH_THREADS, WORK_DIR, machine_info, md_table, run_automedseg, write_results  # noqa: E402
from quality_budget import _fmt, parse_budget, read_fold_dir  # noqa: E402
from shared_datasets import DATASETS, _choose_configuration, _plan_reusable, default_data_root  # noqa: E402

BENCHMARK = "search_quality"


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
        "fidelity": study.user_attrs.get("fidelity"),
        "fidelity_note": study.user_attrs.get("fidelity_note"),
        "trial_budget_s": study.user_attrs.get("trial_budget_s"),
        "total_budget_s": study.user_attrs.get("total_budget_s"),
        "states": states,
        "wall_s": (max(ends) - min(starts)).total_seconds() if starts and ends else None,
        "best_trial": None if best is None else best.number,
        "best_value": None if best is None else best.value,
        "rule_defaults": study.user_attrs.get("rule_defaults", {}),
        "trials": [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "epochs": t.last_step,
                    "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                    if t.datetime_start and t.datetime_complete else None,
                    "retry_of": t.system_attrs.get("failed_trial"), "params": t.params} for t in trials],
    }


def confirmation_figures(work: Path, study_name: str) -> dict:
    """The confirmation's verdict and every run's fold figures (read with the owners' readers)."""
    from automedseg.search_confirm import confirmation_path, read_confirmation
    from automedseg.workspace import Workspace

    state = read_confirmation(confirmation_path(Workspace(work), study_name))
    runs = []
    for r in state.runs:
        fold = read_fold_dir(Path(r.fold_dir)) if r.state == "done" and r.source != "trial" else {}
        runs.append({"key": r.key, "trial": r.trial, "params": r.params, "source": r.source, "state": r.state,
                     "mean_dice": r.mean_dice, "fold": fold})
    return {"winner": state.winner, "margin": state.margin, "adopted": state.adopted, "summary": state.summary(),
            "probability": state.probability, "n_cases": state.n_cases, "min_probability": state.min_probability,
            "runs": runs}


def differences(params: dict, defaults: dict) -> str:
    """The parameters that differ from the rule plan's (``rule plan`` when none)."""
    diff = [f"{k}={_fmt(v, 3)}" for k, v in params.items() if v != defaults.get(k)]
    return ", ".join(diff) or "rule plan"


def build_summary(f: dict) -> str:
    """The Markdown summary of the figures."""
    study, conf, m = f["study"], f["confirmation"], f["machine"]
    defaults = study["rule_defaults"]
    rule = next(r for r in conf["runs"] if r["key"] == "rule")
    n_cases = len(rule["fold"].get("val_cases") or []) or "the"
    verdict = (f"**adopted**: `{f['configuration']}_searched` ({conf['winner']}) beats the rule plan by "
               f"**{_fmt(conf['margin'])}**" if conf["adopted"] else
               f"**not adopted**: the rule plan is kept (best candidate {_fmt(conf['margin'])})")
    if conf.get("probability") is not None:
        verdict += (f", paired-bootstrap P(better) {conf['probability']:.2f} over {conf['n_cases']} cases (a win "
                    f"needs {conf['min_probability']:.2f})")
    rows = []
    for r in conf["runs"]:
        fold = r["fold"]
        rows.append([r["key"], "-" if r["trial"] is None else r["trial"], _fmt(r["mean_dice"]),
                     _fmt(None if r["mean_dice"] is None or rule["mean_dice"] is None
                          else r["mean_dice"] - rule["mean_dice"]),
                     fold.get("epochs", "-"), fold.get("iterations", "-"), _fmt(fold.get("train_seconds"), 0, " s"),
                     fold.get("batch_size", "-"), fold.get("patch_size", "-"), fold.get("features_per_stage", "-"),
                     r["source"], differences(r["params"], defaults) if r["trial"] is not None else "rule plan"])
    trial_rows = [[t["number"], t["state"], _fmt(t["value"]), t["epochs"] if t["epochs"] is not None else "-",
                   _fmt(t["seconds"], 0, " s"), t["retry_of"] if t["retry_of"] is not None else "-",
                   differences(t["params"], defaults)] for t in study["trials"]]
    lines = [
        f"# Searched vs rule-based plan at the same fold budget ({f['dataset_name']}, `{f['configuration']}`)",
        "",
        f"Fold-0 validation mean Dice ({n_cases} held-out cases) of the rule plan and the search's best "
        f"candidates, each trained by the search's confirmation with the same fold budget (`--time-budget "
        f"{f['budget']}`), split and machine, one after the other; {verdict} (issue goal: a win >= +0.01 on at "
        "least one dataset, never adopted when worse).",
        "",
        f"Verdict of the search: {conf['summary']}.",
        "",
        md_table(["run", "trial", "mean Dice", "vs rule", "epochs", "iterations", "training", "batch", "patch",
                  "features", "source", "parameters (differences from the rule plan)"], rows),
        "",
        f"Search: study `{study['study']}`, fidelity `{study['fidelity']}` ({study['fidelity_note']}); "
        f"{study['states']}, ~{_fmt((study['trial_budget_s'] or 0) / 60, 1)} min per trial, search budget "
        f"{_fmt((study['total_budget_s'] or 0) / 60, 0)} min; trials' wall time (first start to last end) "
        f"{_fmt((study['wall_s'] or 0) / 60, 1)} min; best trial {study['best_trial']} (score "
        f"{_fmt(study['best_value'])} after its short training). Whole benchmark (plan, search, confirmation): "
        f"{_fmt(f['wall_s'] / 60, 1)} min.",
        "",
        md_table(["trial", "state", "score", "epochs", "time", "retry of", "parameters (differences from the rule "
                  "plan)"], trial_rows),
        "",
        f"Machine: {m['cpu_model']}, {m['cpu_count_logical']} logical CPUs, {m['memory_total_gib']} GiB; "
        f"{BENCH_THREADS} torch threads; python {m['python']}, torch {m['torch']}, automedseg {m['automedseg']}.",
        "",
        f"Command: `{f['command']}`",
    ]
    return "\n".join(lines)


def prepare_dataset(args: argparse.Namespace, root: Path) -> Path:
    """The raw dataset folder (a 2D shared dataset imported first, as search_fidelity does)."""
    from search_fidelity import prepare_dataset as prepare

    return prepare(SimpleNamespace(shared=args.shared, dataset=args.dataset, data_root=args.data_root,
                                   keep=args.keep, dry_run=False, threads=BENCH_THREADS), root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=default_data_root() / "msd_hippocampus")
    parser.add_argument("--shared", choices=sorted(DATASETS), default=None, help="a shared dataset instead")
    parser.add_argument("--data-root", type=Path, default=default_data_root())
    parser.add_argument("--work-dir", type=Path, default=None, help="default benchmarks/work/search_quality/NAME")
    parser.add_argument("-c", "--configuration", default=None, help="default 3d_fullres, else 2d")
    parser.add_argument("--budget", default="20m", help="the fold budget of every fold-0 training (default 20m)")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--search-budget", default="20m", help="the trials' total budget (--time-budget of search)")
    parser.add_argument("--fidelity", default="auto", choices=("auto", "full", "short", "continuation"))
    parser.add_argument("--confirm", type=int, default=2, help="candidates confirmed at the full fold budget")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--keep", action="store_true", help="continue the work folder's plan, study and runs")
    parser.add_argument("--results-name", default=BENCHMARK)
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    name = args.shared or Path(args.dataset).name
    root = (args.work_dir or WORK_DIR / BENCHMARK / name).resolve()
    if not args.keep and root.exists():
        shutil.rmtree(root)
    t0 = time.monotonic()
    dataset = prepare_dataset(args, root)
    work, logs = root / "work", root / "logs"
    budget_s = parse_budget(args.budget)
    config_args = ["-c", args.configuration] if args.configuration else []
    if not (args.keep and _plan_reusable(work, budget_s)):
        run_automedseg(["plan", dataset, "--work-dir", work, "--time-budget", args.budget, "--threads",
                        BENCH_THREADS, *config_args], logs=logs, label="plan")
    configuration = args.configuration or _choose_configuration(work / "plans.json")
    run_automedseg(["search", dataset, "--work-dir", work, "-c", configuration, "--trials", args.trials,
                    "--time-budget", args.search_budget, "--fidelity", args.fidelity, "--confirm", args.confirm,
                    "--seed", args.seed, "--threads", BENCH_THREADS], logs=logs, label="search")
    study = study_summary(work, configuration, None)
    command = "python benchmarks/search_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    figures = {"dataset": str(dataset), "dataset_name": name, "configuration": configuration,
               "budget": args.budget, "budget_s": budget_s, "trials": args.trials,
               "search_budget": args.search_budget, "work_dir": str(work), "command": command,
               "wall_s": time.monotonic() - t0, "study": study,
               "confirmation": confirmation_figures(work, study["study"]), "machine": machine_info()}
    json_path, md_path = write_results(args.results_name, figures, build_summary(figures),
                                       results_dir=args.results_dir)
    print(md_path.read_text())
    print(f"written: {json_path}, {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
