"""Calibration check (issue #19 item 3): does the planned CPU training step match the one training measures?

The planner charges a CPU network at the throughput of the calibration's timed training steps
(``automedseg/calibration_step.py``); this script checks that estimate against real training, per dataset and
configuration:

1. ``automedseg plan DATASET --work-dir W -c 3d_fullres -c 2d --time-budget 20m -j 2 --threads 2`` (the checked
   configurations' folders in ``W`` are removed first, so they are planned afresh with this machine's cached
   calibration; a cache entry without the training-step timing is completed by this plan, once);
2. per configuration, ``automedseg train DATASET --work-dir W -c CONFIG -f 0 --epochs E --iterations-per-epoch N
   --threads 2 --no-validate --restart``, with ``N`` sized from the plan's estimate so that an epoch trains for
   about ``--epoch-seconds`` (one to two minutes per configuration with the defaults);
3. predicted: the plan's ``training.estimated_seconds_per_iteration``; measured: the median
   ``seconds_per_iteration`` of ``log.jsonl`` without the first epoch; ratio measured / predicted; PASS when
   within :data:`TOLERANCE` (15 %).

Each run records the CPU other processes used meanwhile (``predict_speed.run_timestamped``): on 2 cores any
other busy process slows the training and the check says nothing then. Run it on an idle machine.

Usage::

    python benchmarks/calibration_check.py --dry-run          # the runs and the estimated time
    python benchmarks/calibration_check.py                    # hippocampus and openkbp_hn_ct, 3d_fullres and 2d
    python benchmarks/calibration_check.py --datasets msd_hippocampus --configurations 3d_fullres --epochs 3

Results: ``benchmarks/results/calibration_check.{json,md}``; scratch: ``benchmarks/work/calibration_check/``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BENCH_THREADS,
    REPO_ROOT,
    WORK_DIR,
    automedseg_env,
    machine_info,
    md_table,
    run_automedseg,
    write_results,
)

BENCHMARK = "calibration_check"
DATASETS = ("msd_hippocampus", "openkbp_hn_ct")
CONFIGURATIONS = ("3d_fullres", "2d")
TOLERANCE = 0.15  # |measured / predicted - 1| at most this: PASS (the issue's target)
PLAN_BUDGET = "20m"
FOLD = "0"
MIN_ITERATIONS, MAX_ITERATIONS = 10, 1000  # per epoch
# Rough time model of --dry-run (2 cores), seconds.
EST_PLAN_S = {"msd_hippocampus": 150.0, "openkbp_hn_ct": 90.0}  # first plan: fingerprint + preprocessing
EST_CALIBRATION_S = 25.0  # once: the training steps' timing added to a cached calibration (or a full one)
EST_TRAIN_OVERHEAD_S = 20.0  # start-up, per-epoch pseudo-Dice and checkpoints of a short run
EST_EPOCH_OVERHEAD_S = 4.0


def default_data_root() -> Path:
    """``../shared/data`` from the repository root (from the main checkout in a git worktree)."""
    from shared_datasets import default_data_root as shared_root

    return shared_root()


def iterations_for(predicted_s: float | None, epoch_seconds: float) -> int:
    """Iterations per epoch so that an epoch trains for about ``epoch_seconds`` at the planned step.

    Example:
        >>> iterations_for(0.16, 20.0), iterations_for(None, 20.0), iterations_for(5.0, 20.0)
        (125, 100, 10)
    """
    if not predicted_s or predicted_s <= 0:
        return 100
    return max(MIN_ITERATIONS, min(MAX_ITERATIONS, int(round(epoch_seconds / predicted_s))))


def measured_step(seconds_per_iteration: Sequence[float], *, skip: int = 1) -> float | None:
    """The median step of the epochs after the first ``skip`` (``None``: no such epoch).

    Example:
        >>> measured_step([0.30, 0.16, 0.15, 0.17]), measured_step([0.3])
        (0.16, None)
    """
    later = [float(s) for s in seconds_per_iteration[skip:] if s is not None and math.isfinite(s)]
    return statistics.median(later) if later else None


def verdict(predicted_s: float | None, measured_s: float | None, *, tolerance: float = TOLERANCE) -> dict:
    """Ratio measured / predicted and PASS / FAIL (``-`` when either is missing).

    Example:
        >>> verdict(0.16, 0.17)["status"], verdict(0.287, 0.15)["status"], verdict(None, 0.15)["status"]
        ('PASS', 'FAIL', '-')
    """
    if not predicted_s or measured_s is None:
        return {"ratio": None, "status": "-"}
    ratio = measured_s / predicted_s
    return {"ratio": round(ratio, 3), "status": "PASS" if abs(ratio - 1) <= tolerance else "FAIL"}


def _cli_env(calibration_cache: Path | None) -> dict[str, str]:
    env = automedseg_env(BENCH_THREADS)
    if calibration_cache is not None:
        env["AUTOMEDSEG_CALIBRATION"] = str(calibration_cache)
    return env


def _run_cli(args: list, *, logs: Path, label: str, env: dict[str, str]) -> dict:
    res = run_automedseg(args, logs=logs, label=label, env=env)
    foreign = res["foreign_cpu"]
    return {"wall_s": res["wall_s"], "foreign_cores": foreign.get("foreign_cpu_fraction_of_one_core"),
            "foreign_cpu_s": foreign.get("foreign_cpu_s"), "log": res["log"],
            "calibration_lines": [t for t in res["lines"] if t.startswith(("calibration:", "warning: calibration"))]}


def plan_afresh(dataset: Path, work: Path, configurations: Sequence[str], *, logs: Path, env: dict[str, str],
                 recalibrate: bool) -> dict:
    """Plan the configurations afresh (their folders removed first) with the machine's calibration."""
    for name in configurations:
        if (work / name).is_dir():
            shutil.rmtree(work / name)  # this benchmark's own scratch: planned afresh, not kept as trained
    args = ["plan", dataset, "--work-dir", work, "--time-budget", PLAN_BUDGET, "-j", BENCH_THREADS,
            "--threads", BENCH_THREADS]
    for name in configurations:
        args += ["-c", name]
    if recalibrate:
        args.append("--recalibrate")
    return _run_cli(args, logs=logs, label=f"plan {dataset.name}", env=env)


def read_plan(work: Path, configuration: str) -> dict:
    """What the plan says about a configuration: its step estimate, network, patch, batch and last note."""
    from automedseg.plans import Plans

    plans = Plans.load(work / "plans.json")
    cfg = plans.configuration(configuration)
    device = plans.device
    return {
        "predicted_s": cfg.training.estimated_seconds_per_iteration,
        "features_per_stage": list(cfg.network.features_per_stage),
        "patch_size": list(cfg.patch_size),
        "batch_size": cfg.batch_size,
        "note": cfg.notes[-1] if cfg.notes else "",
        "device": device.name,
        "calibration": None if device.calibration is None else device.calibration.describe(),
        "step_gflops_by_width": None if device.step_gflops_by_width is None else [
            list(p) for p in device.step_gflops_by_width],
        "step_gflops_by_width_2d": None if device.step_gflops_by_width_2d is None else [
            list(p) for p in device.step_gflops_by_width_2d],
    }


def check_configuration(dataset: Path, work: Path, configuration: str, *, epochs: int, epoch_seconds: float,
                        logs: Path, env: dict[str, str]) -> dict:
    """Train the configuration's fold 0 shortly and compare its measured step with the plan's."""
    from automedseg.training_log import read_training_log

    plan = read_plan(work, configuration)
    iterations = iterations_for(plan["predicted_s"], epoch_seconds)
    run = _run_cli(["train", dataset, "--work-dir", work, "-c", configuration, "-f", FOLD, "--epochs", epochs,
                    "--iterations-per-epoch", iterations, "--threads", BENCH_THREADS, "--no-validate", "--restart"],
                   logs=logs, label=f"train {dataset.name} {configuration}", env=env)
    history = read_training_log(work / configuration / f"fold_{FOLD}" / "log.jsonl")
    per_epoch = [h.seconds_per_iteration for h in history]
    measured = measured_step(per_epoch)
    logged = next((h.planned_seconds_per_iteration for h in history if h.planned_seconds_per_iteration), None)
    return {"dataset": dataset.name, "configuration": configuration, **plan, "measured_s": measured,
            **verdict(plan["predicted_s"], measured), "epochs": len(history), "iterations_per_epoch": iterations,
            "seconds_per_iteration_per_epoch": per_epoch, "planned_in_log_s": logged,
            "data_wait_fraction": [h.data_wait_fraction for h in history],
            "train_wall_s": run["wall_s"], "foreign_cores": run["foreign_cores"], "log": run["log"]}


def _f(value: object, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def build_summary(f: dict) -> str:
    """The Markdown summary of the figures."""
    m = f["machine"]
    rows = [[r["dataset"], r["configuration"], "-".join(str(v) for v in r["features_per_stage"]),
             f"{r['batch_size']} x {'x'.join(str(v) for v in r['patch_size'])}", _f(r["predicted_s"], ".3f"),
             _f(r["measured_s"], ".3f"), _f(r["ratio"], ".2f"), r["status"],
             f"{r['epochs']} x {r['iterations_per_epoch']}", _f(r["foreign_cores"], ".2f")] for r in f["checks"]]
    passed = sum(r["status"] == "PASS" for r in f["checks"])
    calibrations = sorted({r["calibration"] for r in f["checks"] if r.get("calibration")})
    lines = [
        "# calibration_check: the planned CPU training step against the measured one",
        "",
        f"Command: `{f['command']}`. Machine: {m.get('cpu_model')}, {m.get('cpu_count_usable')} usable cores, "
        f"{m.get('memory_total_gib')} GiB, torch {m.get('torch')}; {BENCH_THREADS} threads.",
        f"Plans: `plan -c {' -c '.join(f['configurations'])} --time-budget {PLAN_BUDGET}`; training: fold {FOLD}, "
        f"`--epochs {f['epochs']}`, iterations per epoch sized for ~{f['epoch_seconds']:.0f} s at the planned step, "
        "`--no-validate`.",
        f"Calibration: {'; '.join(calibrations) or '-'}.",
        "",
        md_table(["dataset", "configuration", "features", "batch x patch", "planned s/it", "measured s/it",
                  "measured / planned", f"within {TOLERANCE:.0%}", "epochs x it.", "other CPU (cores)"], rows),
        "",
        f"{passed} of {len(f['checks'])} within {TOLERANCE:.0%}. Planned: the plan's "
        "`training.estimated_seconds_per_iteration`; measured: the median `seconds_per_iteration` of `log.jsonl` "
        "without the first epoch (kernel choice, the first batches). Other CPU: cores other processes used during "
        "the training run (above ~0.1 the measured step is slowed by them, not by the plan).",
    ]
    notes = [f"- {r['dataset']} {r['configuration']}: {r['note']}" for r in f["checks"] if r.get("note")]
    if notes:
        lines += ["", "The plans' step notes:", "", *notes]
    return "\n".join(lines) + "\n"


def estimated_seconds(datasets: Sequence[str], configurations: Sequence[str], *, epochs: int,
                      epoch_seconds: float) -> float:
    """The --dry-run's time model: plans, one calibration, short training runs."""
    train = EST_TRAIN_OVERHEAD_S + epochs * (epoch_seconds + EST_EPOCH_OVERHEAD_S)
    return EST_CALIBRATION_S + sum(EST_PLAN_S.get(d, 120.0) + len(configurations) * train for d in datasets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=None,
                        help="folder of the shared datasets (default ../shared/data, from the main checkout in a "
                             "worktree)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--configurations", default=",".join(CONFIGURATIONS), help="default: %(default)s")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per training run (the first is not counted)")
    parser.add_argument("--epoch-seconds", type=float, default=20.0, help="training seconds per epoch (about)")
    parser.add_argument("--work-root", type=Path, default=WORK_DIR / BENCHMARK, help="scratch folder")
    parser.add_argument("--calibration-cache", type=Path, default=None,
                        help="calibration cache file (default: the CLI's, ~/.cache/automedseg/calibration.json)")
    parser.add_argument("--recalibrate", action="store_true", help="time the machine again in the first plan")
    parser.add_argument("--results-dir", type=Path, default=None, help="instead of benchmarks/results (smoke runs)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and the estimated time only")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is not counted)")
    datasets = [d for d in args.datasets.split(",") if d]
    configurations = [c for c in args.configurations.split(",") if c]
    unknown = sorted(set(configurations) - set(CONFIGURATIONS))
    if unknown:
        parser.error(f"--configurations: unknown {unknown}; choose from {list(CONFIGURATIONS)}")
    root = args.data_root or default_data_root()
    if args.dry_run:
        for d in datasets:
            where = root / d
            print(f"{d}: {where}{'' if where.is_dir() else ' (MISSING)'}; work {args.work_root / d}")
            print(f"  plan -c {' -c '.join(configurations)} --time-budget {PLAN_BUDGET} -j {BENCH_THREADS} "
                  f"--threads {BENCH_THREADS}")
            for c in configurations:
                print(f"  train -c {c} -f {FOLD} --epochs {args.epochs} --iterations-per-epoch "
                      f"<~{args.epoch_seconds:.0f} s / planned step> --threads {BENCH_THREADS} --no-validate "
                      "--restart")
        total = estimated_seconds(datasets, configurations, epochs=args.epochs, epoch_seconds=args.epoch_seconds)
        print(f"estimated time: ~{total / 60:.0f} min on {BENCH_THREADS} cores (an idle machine)")
        return 0
    sys.path.insert(0, str(REPO_ROOT))
    missing = [d for d in datasets if not (root / d).is_dir()]
    if missing:
        raise SystemExit(f"datasets not found under {root}: {missing}")
    env = _cli_env(args.calibration_cache)
    logs = args.work_root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    checks, plans = [], {}
    for i, d in enumerate(datasets):
        work = args.work_root / d
        plans[d] = plan_afresh(root / d, work, configurations, logs=logs, env=env,
                                recalibrate=args.recalibrate and i == 0)
        for c in configurations:
            row = check_configuration(root / d, work, c, epochs=args.epochs, epoch_seconds=args.epoch_seconds,
                                      logs=logs, env=env)
            checks.append(row)
            print(f"[{d} {c}] planned {_f(row['predicted_s'], '.3f')} s/it, measured {_f(row['measured_s'], '.3f')} "
                  f"s/it: {row['status']} (other processes {_f(row['foreign_cores'], '.2f')} cores)", flush=True)
    figures = {"command": "python benchmarks/calibration_check.py " + " ".join(
                   argv if argv is not None else sys.argv[1:]),
               "data_root": str(root), "datasets": datasets, "configurations": configurations,
               "epochs": args.epochs, "epoch_seconds": args.epoch_seconds, "tolerance": TOLERANCE,
               "machine": machine_info(), "plans": plans, "checks": checks}
    json_path, md_path = write_results(BENCHMARK, figures, build_summary(figures), results_dir=args.results_dir)
    print(f"results: {json_path} and {md_path}")
    print(json.dumps([(r["dataset"], r["configuration"], r["status"]) for r in checks]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
