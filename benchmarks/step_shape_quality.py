"""Step shape check (issue #19 item 3): does charging a CPU step's extra parameters change a plan's Dice?

The calibration prices the parameters a network has beyond the timed reference network's at its FLOPs
(``automedseg/calibration_step.py``: ``fit_step_shape_cost``), so a deep network on a small patch is charged what
it costs. That changes some plans: on openkbp_hn_ct the 2d plan's 6-stage network (up to 512 features on
128x128) is charged more, and the planner picks a narrower one. This script trains fold 0 of both plans at the
same budget and compares their validation Dice:

1. ``automedseg plan DATASET --work-dir W/split -c CONFIG --time-budget B -j 2 --threads 2`` with this machine's
   cached calibration (its step shape cost on: arm ``split``);
2. ``W/throughput``: the same fingerprint and splits, the configuration planned with the same device profile
   without its ``step_shape_costs`` (the cost model's previous rule), the preprocessed cache shared (a link);
3. ``automedseg train ... -c CONFIG -f 0 --threads 2`` in both, one after the other;
4. planned vs measured step, epochs trained, fold-0 mean Dice of each, and a paired bootstrap over the validation
   cases (``search_confirm.paired_bootstrap``: P(split plan better)).

Usage::

    python benchmarks/step_shape_quality.py --dry-run
    python benchmarks/step_shape_quality.py                          # openkbp_hn_ct 2d, 5 minutes per fold
    python benchmarks/step_shape_quality.py --dataset msd_hippocampus --budget 5m

Results: ``benchmarks/results/step_shape_quality.{json,md}``; scratch: ``benchmarks/work/step_shape_quality/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BENCH_THREADS,
    WORK_DIR,
    automedseg_env,
    machine_info,
    md_table,
    run_automedseg,
    write_results,
)

BENCHMARK = "step_shape_quality"
ARMS = ("split", "throughput")  # the plan with the step shape cost (step_shape_costs), the plan without it


def throughput_plan(split_work: Path, out_work: Path, configuration: str, budget_s: float) -> None:
    """``out_work``: ``split_work``'s fingerprint, splits and preprocessed cache, ``configuration`` planned without
    the step shape cost (the same device profile otherwise)."""
    from automedseg.fingerprint import load_fingerprint
    from automedseg.planning import plan_dataset
    from automedseg.plans import Plans

    out_work.mkdir(parents=True, exist_ok=True)
    for name in ("fingerprint.json", "splits.json"):
        if (split_work / name).exists():
            shutil.copy2(split_work / name, out_work / name)
    link = out_work / "preprocessed"
    if not link.exists():
        link.symlink_to((split_work / "preprocessed").resolve(), target_is_directory=True)
    split = Plans.load(split_work / "plans.json")
    device = dataclasses.replace(split.device, step_shape_costs=None)
    plans = plan_dataset(load_fingerprint(out_work / "fingerprint.json"), device=device, time_budget_s=budget_s,
                         seed=split.configuration(configuration).training.seed, configurations=[configuration])
    plans.save(out_work / "plans.json")


def read_arm(work: Path, configuration: str) -> dict:
    """The plan's network and step, the fold's measured step, epochs and validation Dice (mean and per case)."""
    from automedseg.plans import Plans
    from automedseg.validation_summary import read_validation_summary, summary_path

    config = Plans.load(work / "plans.json").configuration(configuration)
    fold = work / configuration / "fold_0"
    log = [json.loads(line) for line in (fold / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [e["seconds_per_iteration"] for e in log[1:] if e.get("seconds_per_iteration")]
    summary = read_validation_summary(summary_path(fold))
    return {"features": list(config.network.features_per_stage), "batch": config.batch_size,
            "patch": list(config.patch_size), "planned_s": config.training.estimated_seconds_per_iteration,
            "measured_s": statistics.median(steps) if steps else None, "epochs_trained": len(log),
            "epochs_planned": config.training.epochs, "mean_dice": summary.mean_dice,
            "case_dice": summary.dice_by_case()}


def build_summary(f: dict) -> str:
    rows = []
    for arm in ARMS:
        a = f["arms"][arm]
        rows.append([arm, "-".join(map(str, a["features"])), f"{a['batch']} x {'x'.join(map(str, a['patch']))}",
                     f"{a['planned_s']:.3f}", "-" if a["measured_s"] is None else f"{a['measured_s']:.3f}",
                     f"{a['epochs_trained']} of {a['epochs_planned']}",
                     "-" if a["mean_dice"] is None else f"{a['mean_dice']:.4f}",
                     f"{a['other_cpu']:.2f}"])
    b = f["bootstrap"]
    return "\n".join([
        f"# {BENCHMARK}: {f['dataset']} {f['configuration']}, fold 0 at {f['budget']}, with and without the step "
        "shape split", "",
        f"Command: `{f['command']}`. Machine: {f['machine']['cpu_model']}, {BENCH_THREADS} threads, "
        f"torch {f['machine'].get('torch')}. One training at a time.",
        "`split`: planned with the calibration's step shape cost (parameters beyond the reference's charged); "
        "`throughput`: the same device profile without it (the FLOPs at the width's timed throughput only).", "",
        md_table(["plan", "features", "batch x patch", "planned s/it", "measured s/it", "epochs", "mean Dice",
                  "other CPU (cores)"], rows), "",
        f"Dice difference (split - throughput): "
        f"{'-' if f['dice_difference'] is None else format(f['dice_difference'], '+.4f')}; paired bootstrap over "
        f"{b['n_cases']} validation cases: P(split better) = "
        f"{'-' if b['probability'] is None else format(b['probability'], '.2f')}.",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=None, help="shared datasets (default ../shared/data)")
    parser.add_argument("--dataset", default="openkbp_hn_ct")
    parser.add_argument("--configuration", default="2d")
    parser.add_argument("--budget", default="5m", help="training budget per fold (plan --time-budget)")
    parser.add_argument("--work-root", type=Path, default=WORK_DIR / BENCHMARK)
    parser.add_argument("--calibration-cache", type=Path, default=None)
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    from shared_datasets import default_data_root

    dataset = (args.data_root or default_data_root()) / args.dataset
    from automedseg.durations import duration_seconds

    budget_s = duration_seconds(args.budget)
    work = {arm: args.work_root / args.dataset / arm for arm in ARMS}
    print(f"{args.dataset} {args.configuration}: plan, then two folds of {budget_s:.0f} s (+ validation) in "
          f"{work['split'].parent}")
    if args.dry_run:
        return 0
    env = automedseg_env()
    if args.calibration_cache:
        env["AUTOMEDSEG_CALIBRATION"] = str(args.calibration_cache)
    logs = args.work_root / "logs"
    for arm in ARMS:
        shutil.rmtree(work[arm], ignore_errors=True)
    run_automedseg(["plan", dataset, "--work-dir", work["split"], "-c", args.configuration, "--time-budget",
                    args.budget, "-j", "2", "--threads", str(BENCH_THREADS)], logs=logs, label="plan", env=env)
    throughput_plan(work["split"], work["throughput"], args.configuration, budget_s)
    arms = {}
    for arm in ARMS:
        res = run_automedseg(["train", dataset, "--work-dir", work[arm], "-c", args.configuration, "-f", "0",
                              "--threads", str(BENCH_THREADS)], logs=logs, label=f"train {arm}", env=env)
        foreign = (res.get("foreign_cpu") or {}).get("foreign_cpu_fraction_of_one_core") or 0.0
        arms[arm] = {**read_arm(work[arm], args.configuration), "other_cpu": foreign}
    from automedseg.search_confirm import paired_bootstrap

    split, base = arms["split"]["case_dice"], arms["throughput"]["case_dice"]
    probability, n_cases = paired_bootstrap(base, split)  # (rule, candidate): P(split better)
    figures = {"dataset": args.dataset, "configuration": args.configuration, "budget": args.budget,
               "command": "python benchmarks/" + " ".join([Path(__file__).name, *(argv or sys.argv[1:])]),
               "machine": machine_info(), "arms": arms,
               "dice_difference": None if None in (arms["split"]["mean_dice"], arms["throughput"]["mean_dice"])
               else arms["split"]["mean_dice"] - arms["throughput"]["mean_dice"],
               "bootstrap": {"probability": probability, "n_cases": n_cases}}
    write_results(BENCHMARK, figures, build_summary(figures), results_dir=args.results_dir)
    print(build_summary(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
