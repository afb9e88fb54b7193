"""Search fidelity (issue #15, item 1): does a short run rank configurations the way the full fold budget does?

On fold 0 of one dataset, for N configurations around the rule plan (the rule plan, then N - 1 feasible variants
drawn with the search's own seeded sampler from its space: ``automedseg.search.make_sampler``, ``search_space``,
``apply_params``, so they are the first trials a search with that seed would try), each trained in turn:

* **full**: the variant at the full fold budget, exactly as the search's confirmation trains it
  (``automedseg.search_trial.full_fold_variant``, the trainer's budget refit). Its fold-0 validation mean Dice is
  the ranking the short scores are judged against.
* per short budget R (``--rung``), the search's trial schedules (``automedseg.search_trial.trial_variant``:
  ``TRIAL_EPOCHS`` fixed epochs in ``TRAIN_SHARE x R``), two runs:

  - (b) **miniature** (``--fidelity short``): the poly schedule over the whole short run. Scores: the pruner's
    score at the end (mean whole-image pseudo-Dice of the last ``SMOOTHING_EPOCHS`` epochs) and the run's
    validation Dice (the trial's objective); and **short @ epoch e**: the same score at the pruner's earlier
    rungs, mid-schedule (what Hyperband compares in today's default search);
  - (a) **continuation** (``--fidelity continuation``, ``automedseg.search_rungs``): a constant learning rate,
    a cool-down before each rung, promoted runs resumed from before it. Scores: the pseudo-Dice after each
    rung's cool-down, and the validation Dice;

* (c) **extrapolated**: at each rung, that run's per-epoch pseudo-Dice so far (for continuation only its
  constant-rate epochs) fitted with a saturating curve over training iterations and read at the full run's
  planned iterations (``automedseg.learning_curves.extrapolate_final_score``); no extra training.

Per design: Spearman and Kendall rank correlation with the full-budget Dice (``scipy.stats``); the best design has
the highest Spearman (then Kendall). The raw per-epoch pseudo-Dice is used, not the EMA (it lags ~10 epochs).

Each run is a subprocess of this script (``--worker RUN.json``), one at a time, in ``WORK/runs/c<k>/<run>/`` (the
fold folder: ``log.jsonl``, ``validation/summary.json``; ``run.json`` its spec, ``result.json`` once finished).
``--keep`` reuses a finished run of the same plan and budget (and the plan, and a 2D import) and resumes an
interrupted full or miniature run from its checkpoint (continuation starts again); without it all is redone.
Results are rewritten after every run (``partial`` until the last), in ``--results-dir``
(default ``benchmarks/results``): ``search_fidelity.{json,md}``.

Usage::

    python benchmarks/search_fidelity.py --dry-run --keep                   # Hippocampus, 8 configurations
    python benchmarks/search_fidelity.py --full 20m --rung 5m --keep        # ~4 h on 2 cores
    python benchmarks/search_fidelity.py --shared drive --full 20m --rung 5m --keep
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH_THREADS, REPO_ROOT, RESULTS_DIR, WORK_DIR, machine_info, md_table, write_results  # noqa: E402
from predict_speed import run_timestamped  # noqa: E402
from quality_budget import parse_budget  # noqa: E402
from shared_datasets import (  # noqa: E402
    DATASETS,
    StepFailed,
    _choose_configuration,
    _env,
    _plan_reusable,
    default_data_root,
    run_cli,
)

BENCHMARK = "search_fidelity"
DEFAULT_N = 8
DEFAULT_SEED = 12345
RUN_FILE, RESULT_FILE, VARIANT_PLANS = "run.json", "result.json", "variant_plans.json"
KINDS = ("short", "continuation")  # the short designs trained: (b) miniature, (a) continuation


# --- configurations --------------------------------------------------------------------------------------


def sample_configs(plans: Any, base: Any, n: int, *, seed: int = DEFAULT_SEED, normalization: bool = False
                   ) -> list[dict[str, Any]]:
    """The rule plan's parameters, then ``n - 1`` distinct feasible variants drawn with the search's sampler.

    Deterministic for a seed: trial 0 is the rule plan (enqueued, as the search does) and every later draw is
    seeded from ``(seed, trial number)`` (:func:`automedseg.search.make_sampler`); variants that do not fit the
    device (:class:`automedseg.search.InfeasibleParams`) or repeat one are skipped.
    """
    import optuna
    from optuna.trial import TrialState

    from automedseg.search import InfeasibleParams, apply_params, default_params, make_sampler, search_space
    from automedseg.search_study import quiet_optuna

    space = search_space(base, normalization=normalization)
    with quiet_optuna():
        study = optuna.create_study(direction="maximize", sampler=make_sampler(seed, n_trials=n))
        study.enqueue_trial(default_params(base))
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for _ in range(50 * n):
            if len(out) == n:
                break
            trial = study.ask()
            params = {p.name: p.suggest(trial) for p in space}
            study.tell(trial, state=TrialState.FAIL)  # never a result: every draw stays a seeded random one
            key = json.dumps(params, sort_keys=True, default=str)
            try:
                apply_params(plans, base, params)
            except InfeasibleParams:
                continue
            if key not in seen:
                seen.add(key)
                out.append(params)
    return out


def describe(params: dict[str, Any], defaults: dict[str, Any]) -> str:
    """The parameters that differ from the rule plan's, as text (``rule plan`` when none)."""
    diff = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items() if v != defaults.get(k)]
    return ", ".join(diff) or "rule plan"


# --- rank correlation ------------------------------------------------------------------------------------


def average_ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties given their mean rank (``[10, 20, 20]`` -> ``[1.0, 2.5, 2.5]``)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman_by_ranks(x: list[float], y: list[float]) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks (what ``scipy.stats.spearmanr`` computes)."""
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def kendall_tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b (ties in either ranking corrected, as ``scipy.stats.kendalltau``)."""
    conc = disc = tx = ty = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif dx * dy > 0:
                conc += 1
            else:
                disc += 1
    return (conc - disc) / math.sqrt((conc + disc + tx) * (conc + disc + ty))


def rank_correlations(truth: list[float | None], scores: list[float | None]) -> dict[str, Any]:
    """Spearman and Kendall (with p-values from scipy, else by ranks without) over the pairs both have.

    ``None`` when fewer than 3 pairs or either side is constant (no ranking to compare).
    """
    pairs = [(a, b) for a, b in zip(truth, scores)
             if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    out: dict[str, Any] = {"n": len(pairs), "spearman": None, "spearman_p": None, "kendall": None, "kendall_p": None}
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return out
    x, y = [a for a, _ in pairs], [b for _, b in pairs]
    try:
        from scipy import stats
    except ImportError:  # pragma: no cover - scipy is a dependency of automedseg
        return {**out, "spearman": spearman_by_ranks(x, y), "kendall": kendall_tau_b(x, y)}
    rho, rho_p = stats.spearmanr(x, y)
    tau, tau_p = stats.kendalltau(x, y)
    return {**out, "spearman": float(rho), "spearman_p": float(rho_p), "kendall": float(tau), "kendall_p": float(tau_p)}


# --- runs ------------------------------------------------------------------------------------------------


def run_key(kind: str, budget: str) -> str:
    """A run's folder name: ``full``, ``short_5m``, ``continuation_5m``."""
    return "full" if kind == "full" else f"{kind}_{budget}"


def make_runs(plans: Any, base: Any, configs: list[dict[str, Any]], *, full: str, rungs: list[str], root: Path
              ) -> list[dict[str, Any]]:
    """Every run of the study, configuration by configuration (short runs first), each with its variant plan."""
    from automedseg.search import TRIAL_EPOCHS
    from automedseg.search_study import plan_sha1
    from automedseg.search_trial import trial_variant

    runs = []
    for k, params in enumerate(configs):
        for kind, budget in [*((kind, r) for r in rungs for kind in KINDS), ("full", full)]:
            name = f"{base.name}_c{k}"
            variant = trial_variant(plans, base, params, name=name, fidelity=kind, budget_s=parse_budget(budget),
                                    epochs=TRIAL_EPOCHS)
            runs.append({"config": k, "kind": kind, "budget": budget, "budget_s": parse_budget(budget), "name": name,
                         "epochs": TRIAL_EPOCHS, "plan_sha1": plan_sha1(variant), "variant": variant,
                         "dir": root / f"c{k}" / run_key(kind, budget)})
    return runs


def _reusable(run: dict[str, Any]) -> dict[str, Any] | None:
    path = Path(run["dir"]) / RESULT_FILE
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("plan_sha1") == run["plan_sha1"] else None


def execute(run: dict[str, Any], *, plans: Any, work: Path, dataset: Path, threads: int, keep: bool) -> dict:
    """Train one run in a worker subprocess (or reuse it with ``keep``); its ``result.json``."""
    out = Path(run["dir"])
    if keep and (done := _reusable(run)) is not None:
        return {**done, "reused": True}
    old = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).is_file() else {}
    resume = keep and run["kind"] != "continuation" and old.get("plan_sha1") == run["plan_sha1"] and \
        (out / "checkpoint_latest.pt").is_file()
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT_FILE).unlink(missing_ok=True)
    dataclasses.replace(plans, configurations={run["name"]: run["variant"]}).save(out / VARIANT_PLANS)
    spec = {k: run[k] for k in ("config", "kind", "budget", "budget_s", "name", "epochs", "plan_sha1")}
    spec.update(work=str(work), dataset=str(dataset), threads=threads, restart=not resume)
    (out / RUN_FILE).write_text(json.dumps(spec, indent=1))
    label = f"c{run['config']} {run_key(run['kind'], run['budget'])}"
    print(f"[{label}] training ({'resumed' if resume else 'from scratch'}), log {out / 'worker.log'}", flush=True)
    res = run_timestamped([sys.executable, str(Path(__file__).resolve()), "--worker", str(out / RUN_FILE)],
                          env=_env(threads), cwd=REPO_ROOT, log_path=out / "worker.log")
    if res["returncode"] != 0 or not (out / RESULT_FILE).is_file():
        print("\n".join(text for _, text in res["lines"][-30:]), flush=True)
        raise StepFailed(f"{label} failed (rc={res['returncode']}); log: {out / 'worker.log'}")
    print(f"  -> {res['wall_s']:.0f} s", flush=True)
    result = {**json.loads((out / RESULT_FILE).read_text()), "process_wall_s": res["wall_s"]}
    (out / RESULT_FILE).write_text(json.dumps(result, indent=1))
    return {**result, "reused": False}


def worker(spec_path: Path) -> int:
    """Train the run ``spec_path`` describes (``--worker``) and write its ``result.json``."""
    from automedseg.plans import Plans
    from automedseg.search_rungs import train_with_continuation
    from automedseg.search_trial import ensure_cache
    from automedseg.training import TrainOptions, train_fold
    from automedseg.workspace import Workspace

    spec = json.loads(spec_path.read_text())
    out = spec_path.parent
    ws = Workspace(Path(spec["work"]))
    plans = Plans.load(out / VARIANT_PLANS)
    ensure_cache(ws, plans, plans.configuration(spec["name"]), Path(spec["dataset"]), print)
    options = TrainOptions(threads=spec["threads"], output_dir=out, progress=False, validate=True,
                           restart=spec["restart"])
    t0 = time.monotonic()
    rungs: list[dict[str, float]] = []
    if spec["kind"] == "continuation":
        def report(score: float, end: int) -> None:
            rungs.append({"epoch": end, "score": float(score), "seconds": time.monotonic() - t0})

        result = train_with_continuation(ws, spec["name"], plans=plans, options=options, epochs=spec["epochs"],
                                         report=report, log=print)
    else:
        result = train_fold(ws, spec["name"], 0, plans=plans, options=options, log=print)
    val = (result.validation or {}).get("mean_dice")
    (out / RESULT_FILE).write_text(json.dumps({
        "plan_sha1": spec["plan_sha1"], "validation_mean_dice": None if val is None else float(val),
        "epochs_run": int(result.epochs_run), "train_seconds": float(result.train_seconds),
        "wall_s": time.monotonic() - t0, "rungs": rungs}, indent=1))
    return 0


# --- scores ----------------------------------------------------------------------------------------------


def epoch_curve(fold_dir: Path) -> list[tuple[int, int, float, float | None]]:
    """``(epoch, iterations so far, seconds so far, mean whole-image pseudo-Dice or None)`` per logged epoch."""
    from automedseg.training_log import read_training_log

    out, iterations, seconds = [], 0, 0.0
    for h in read_training_log(Path(fold_dir) / "log.jsonl", problems=[]):
        iterations += h.iterations or 0
        seconds += h.epoch_seconds
        d = h.mean_pseudo_dice
        out.append((h.epoch, iterations, seconds, float(d) if d is not None and math.isfinite(d) else None))
    return out


def short_scores(kind: str, curve: list[tuple[int, int, float, float | None]], result: dict[str, Any], *,
                 ends: list[int], final_iterations: float) -> dict[str, tuple[float | None, float | None]]:
    """A short run's scores by design suffix (``@e``, ``extrapolated@e``, ``validation``): (score, seconds).

    The extrapolation's axis is training iterations, its target ``final_iterations`` (the full run's planned
    iterations: the cost model plans both schedules, so their ratio does not depend on timing noise)."""
    from automedseg.learning_curves import extrapolate_final_score
    from automedseg.search import SMOOTHING_EPOCHS
    from automedseg.search_rungs import cooldown_epochs

    out: dict[str, tuple[float | None, float | None]] = {}
    rungs = {int(r["epoch"]): r for r in result.get("rungs", [])}
    for e in ends:
        if kind == "continuation":
            if e not in rungs:
                continue
            score, seconds = rungs[e]["score"], rungs[e]["seconds"]
            fitted = [c for c in curve if c[0] < e - cooldown_epochs(e)]  # the constant-rate epochs
        else:
            fitted = [c for c in curve if c[0] < e]
            if not fitted:
                continue
            seen = [c[3] for c in fitted if c[3] is not None]
            score = sum(seen[-SMOOTHING_EPOCHS:]) / len(seen[-SMOOTHING_EPOCHS:]) if seen else 0.0
            seconds = fitted[-1][2]
        out[f"@{e}"] = (score, seconds)
        out[f"extrapolated@{e}"] = (extrapolate_final_score([c[1] for c in fitted], [c[3] for c in fitted],
                                                            final_epoch=final_iterations), seconds)
    out["validation"] = (result.get("validation_mean_dice"), result.get("wall_s"))
    return out


def design_table(results: dict[tuple[int, str], dict], curves: dict, *, n: int, rungs: list[str],
                 final_iterations: list[float]) -> tuple[list[float | None], list[dict[str, Any]]]:
    """The full-budget Dice per configuration and every design's scores, cost and rank correlations."""
    from automedseg.search import TRIAL_EPOCHS
    from automedseg.search_rungs import rung_ends

    ends = rung_ends(TRIAL_EPOCHS)
    full = [(results.get((k, "full")) or {}).get("validation_mean_dice") for k in range(n)]
    names: list[tuple[str, str, str, str]] = []  # (design, family, run key, score key)
    for r in rungs:
        names += [(f"miniature {r}", "b", f"short_{r}", f"@{ends[-1]}"),
                  (f"miniature {r}, validation", "b", f"short_{r}", "validation")]
        names += [(f"short {r} @ epoch {e}", "short", f"short_{r}", f"@{e}") for e in ends[:-1]]
        names += [(f"continuation {r} @ epoch {e}", "a", f"continuation_{r}", f"@{e}") for e in ends]
        names += [(f"continuation {r}, validation", "a", f"continuation_{r}", "validation")]
        names += [(f"extrapolated {label} {r} @ epoch {e}", "c", f"{kind}_{r}", f"extrapolated@{e}")
                  for label, kind in (("miniature", "short"), ("continuation", "continuation")) for e in ends]
    per_run: dict[tuple[int, str], dict] = {}
    for (k, key), result in results.items():
        if key != "full" and "failed" not in result:
            kind = key.split("_")[0]
            per_run[k, key] = short_scores(kind, curves[k, key], result, ends=ends,
                                           final_iterations=final_iterations[k])
    designs = []
    for design, family, key, score_key in names:
        cells = [per_run.get((k, key), {}).get(score_key, (None, None)) for k in range(n)]
        scores = [c[0] for c in cells]
        seconds = [c[1] for c in cells if c[1] is not None]
        designs.append({"design": design, "family": family, "scores": scores,
                        "minutes": sum(seconds) / len(seconds) / 60 if seconds else None,
                        **rank_correlations(full, scores)})
    return full, designs


def best_design(designs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The design with the highest Spearman, then Kendall, then the cheapest."""
    rated = [d for d in designs if d["spearman"] is not None]
    return max(rated, key=lambda d: (d["spearman"], d["kendall"], -(d["minutes"] or 0.0))) if rated else None


# --- report ----------------------------------------------------------------------------------------------


def _fmt(v: Any, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def build_summary(f: dict[str, Any]) -> str:
    """The Markdown summary of the figures."""
    n, best = len(f["configs"]), best_design(f["designs"])
    m = f["machine"]
    done = sum(v is not None for v in f["full_dice"])
    lines = [f"# Search fidelity: short-run scores against the full fold budget ({f['dataset_name']})", ""]
    if f.get("partial"):
        lines += [f"**Partial**: {done} of {n} configurations have their full-budget run.", ""]
    lines += [f"{n} configurations of `{f['configuration']}` (the rule plan and {n - 1} variants drawn with the "
              f"search's sampler, seed {f['seed']}), fold 0; full budget {f['full']}, short budgets "
              f"{', '.join(f['rungs'])} ({f['trial_epochs']} epochs each); {f['threads']} torch threads, one run at "
              f"a time; total wall time of the runs {_fmt(f['runs_wall_s'] / 3600, 2)} h (of this invocation, "
              f"planning included: {_fmt(f['wall_s'] / 3600, 2)} h).", ""]
    failed = [k for k, v in f.get("runs", {}).items() if "failed" in v]
    if failed:
        lines += [f"Failed runs (their scores are missing): {', '.join(failed)}.", ""]
    if best is not None:
        lines += [f"Best design: **{best['design']}** (family {best['family']}): Spearman {_fmt(best['spearman'])}, "
                  f"Kendall {_fmt(best['kendall'])} over {best['n']} configurations, "
                  f"~{_fmt(best['minutes'], 1)} min per configuration.", ""]
    def p(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2g}"

    rows = [[d["design"], d["family"], _fmt(d["minutes"], 1), _fmt(d["spearman"]), p(d["spearman_p"]),
             _fmt(d["kendall"]), p(d["kendall_p"]), d["n"]]
            for d in sorted(f["designs"], key=lambda d: (-(d["spearman"] if d["spearman"] is not None else -9),
                                                         d["minutes"] or 0.0))]
    lines += ["## Rank correlation with the full-budget fold-0 validation Dice", "",
              md_table(["design", "family", "min / config", "Spearman", "p", "Kendall", "p", "n"], rows), "",
              "Families: (a) continuation, (b) miniature, (c) learning-curve extrapolation, short: the pruner's "
              "mid-schedule rungs of a miniature run (what the default search's Hyperband compares today).", "",
              "- pseudo-Dice: an epoch's mean whole-image pseudo-Dice of the validation cases (raw, not the EMA, "
              "which lags ~10 epochs). Miniature and short: the mean of the last 3 scored epochs up to the rung (the "
              "pruner's score); continuation: the rung's last epoch, after its cool-down; validation: the short "
              "run's final sliding-window validation (a complete trial's objective); extrapolated: "
              "`automedseg.learning_curves.extrapolate_final_score` over training iterations, read at the full "
              "run's planned iterations.",
              "- min / config: the mean training time until the score (continuation: wall time to the rung, the "
              "discarded cool-downs included; validation: the whole run).",
              "- One fold, one seed: with 8 configurations a Spearman under ~0.74 is not significant at p < 0.05, "
              "and configurations whose full-budget Dice differ by less than run-to-run noise cannot be ranked by "
              "any design.", "",
              "## Scores per configuration", ""]
    head = ["design", *[f"c{k}" for k in range(n)]]
    rows = [["**full " + f["full"] + "** (validation Dice)", *[_fmt(v) for v in f["full_dice"]]]]
    rows += [[d["design"], *[_fmt(v) for v in d["scores"]]] for d in f["designs"]]
    lines += [md_table(head, rows), "", "## Configurations", ""]
    rows = [[f"c{c['index']}", c["describe"], c["full_plan"]] for c in f["configs"]]
    lines += [md_table(["config", "parameters (differences from the rule plan)", "full-budget plan"], rows), "",
              f"Machine: {m['cpu_model']}, {m['cpu_count_logical']} logical CPUs, {m['memory_total_gib']} GiB; "
              f"python {m['python']}, torch {m['torch']}, automedseg {m['automedseg']}.", "",
              f"Command: `{f['command']}`"]
    return "\n".join(lines)


def planned_iterations(config: Any) -> int:
    """The training iterations a configuration's schedule plans."""
    return int(config.training.epochs * config.training.iterations_per_epoch)


def plan_line(config: Any) -> str:
    """A variant's shape and schedule, for the report."""
    tr, net = config.training, config.network
    return (f"{net.architecture} {list(net.features_per_stage)}, batch {config.batch_size}, patch "
            f"{list(config.patch_size)}, {tr.optimizer} {tr.initial_lr:g}, {tr.epochs} x {tr.iterations_per_epoch}")


# --- main ------------------------------------------------------------------------------------------------


def prepare_dataset(args: argparse.Namespace, root: Path) -> Path:
    """The raw dataset folder: ``--dataset``, or a shared dataset (2D ones imported as shared_datasets does; a
    dry run imports too: the configurations need the plan)."""
    if not args.shared:
        return Path(args.dataset).resolve()
    spec = DATASETS[args.shared]
    source = Path(args.data_root) / spec.folder
    if spec.import_args is None:
        return source
    raw = root / "raw"
    if (args.keep or args.dry_run) and (raw / "dataset.json").is_file() and (raw / "import_report.json").is_file():
        return raw
    cmd = ["import", source, "-o", raw, *[a.replace("{data}", str(args.data_root)) for a in spec.import_args],
           "--overwrite"]
    run_cli(cmd, log_path=root / "logs" / "import.log", label="import", threads=args.threads)
    return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=default_data_root() / "msd_hippocampus")
    parser.add_argument("--shared", choices=sorted(DATASETS), default=None, help="a shared dataset instead")
    parser.add_argument("--data-root", type=Path, default=default_data_root())
    parser.add_argument("--work-dir", type=Path, default=None, help="default benchmarks/work/search_fidelity/NAME")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("-c", "--configuration", default=None, help="default 3d_fullres, else 2d")
    parser.add_argument("-n", "--configs", type=int, default=DEFAULT_N, help="configurations (at least 6)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--full", default="20m", help="the full fold budget")
    parser.add_argument("--rung", action="append", default=None, help="a short budget (repeatable; default 5m)")
    parser.add_argument("--threads", type=int, default=BENCH_THREADS)
    parser.add_argument("--keep", action="store_true", help="reuse finished runs, resume interrupted ones")
    parser.add_argument("--dry-run", action="store_true", help="print the configurations and runs, train nothing")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)
    if args.configs < 6 and not args.dry_run:
        parser.error("--configs: at least 6 configurations (issue #15)")
    rungs = args.rung or ["5m"]
    full_s = parse_budget(args.full)
    name = args.shared or Path(args.dataset).name
    root = (args.work_dir or WORK_DIR / BENCHMARK / name).resolve()
    t_start = time.monotonic()
    dataset = prepare_dataset(args, root)
    work = root / "work"
    plan_args = ["plan", dataset, "--work-dir", work, "--time-budget", args.full, "--threads", args.threads,
                 *(["-c", args.configuration] if args.configuration else [])]
    if not (args.keep or args.dry_run) or not _plan_reusable(work, full_s):
        if args.dry_run and (work / "plans.json").is_file():
            print(f"would re-plan (budget or cache differ): automedseg {' '.join(map(str, plan_args))}")
        else:
            run_cli([*plan_args, *(["--no-preprocess"] if args.dry_run else [])],
                    log_path=root / "logs" / "plan.log", label="plan", threads=args.threads)
    from automedseg.plans import Plans
    from automedseg.search import TRIAL_EPOCHS, default_params

    plans = Plans.load(work / "plans.json")
    configuration = args.configuration or _choose_configuration(work / "plans.json")
    base = plans.configuration(configuration)
    if base.training.time_budget_s is None or abs(base.training.time_budget_s - full_s) > 0.5:
        print(f"note: {configuration} is planned for {base.training.time_budget_s} s, not {args.full}; re-plan "
              "without --keep")
    configs = sample_configs(plans, base, args.configs, seed=args.seed, normalization=True)
    runs = make_runs(plans, base, configs, full=args.full, rungs=rungs, root=root / "runs")
    defaults = default_params(base)
    todo = [r for r in runs if not (args.keep and _reusable(r))]
    todo_dirs = {r["dir"] for r in todo}
    hours = sum(r["budget_s"] for r in runs) / 3600
    left = sum(r["budget_s"] for r in todo) / 3600
    print(f"estimate: {len(configs)} configurations x ({args.full} full + {len(KINDS)} designs x "
          f"{' + '.join(rungs)}) = {hours:.1f} h of training on {args.threads} threads (~{hours * args.threads:.1f} "
          f"CPU core-hours); still to train: {len(todo)} runs, {left:.1f} h (~{left * args.threads:.1f} core-hours)")
    fulls = {r["config"]: r["variant"] for r in runs if r["kind"] == "full"}
    for k, params in enumerate(configs):
        print(f"c{k}: {describe(params, defaults)}\n    full: {plan_line(fulls[k])}")
    if args.dry_run:
        for r in runs:
            state = "train" if r["dir"] in todo_dirs else "reuse"
            print(f"{state}: c{r['config']} {run_key(r['kind'], r['budget'])} -> {r['dir']}  "
                  f"({plan_line(r['variant'])})  worker: python {Path(__file__).name} --worker {r['dir'] / RUN_FILE}")
        return 0
    results: dict[tuple[int, str], dict] = {}
    curves: dict[tuple[int, str], list] = {}
    command = "python benchmarks/search_fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for i, r in enumerate(runs):
        key = run_key(r["kind"], r["budget"])
        try:
            results[r["config"], key] = execute(r, plans=plans, work=work, dataset=dataset, threads=args.threads,
                                                keep=args.keep)
        except StepFailed as e:  # recorded; the configuration drops out of the correlations where it lacks a score
            results[r["config"], key] = {"failed": str(e)}
        curves[r["config"], key] = epoch_curve(r["dir"])
        full_dice, designs = design_table(results, curves, n=len(configs), rungs=rungs,
                                          final_iterations=[planned_iterations(fulls[k]) for k in range(len(configs))])
        figures = {
            "dataset": str(dataset), "dataset_name": name, "configuration": configuration, "seed": args.seed,
            "full": args.full, "rungs": rungs, "trial_epochs": TRIAL_EPOCHS, "threads": args.threads,
            "partial": i < len(runs) - 1, "wall_s": time.monotonic() - t_start, "command": command,
            "runs_wall_s": sum(v.get("process_wall_s") or v.get("wall_s") or 0.0 for v in results.values()),
            "full_dice": full_dice, "designs": designs, "best": (best_design(designs) or {}).get("design"),
            "configs": [{"index": k, "params": p, "describe": describe(p, defaults), "full_plan": plan_line(fulls[k])}
                        for k, p in enumerate(configs)],
            "runs": {f"c{k}/{key}": v for (k, key), v in results.items()}, "machine": machine_info(),
        }
        json_path, md_path = write_results(BENCHMARK, figures, build_summary(figures), results_dir=args.results_dir)
    print(md_path.read_text())
    print(f"written: {json_path}, {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
