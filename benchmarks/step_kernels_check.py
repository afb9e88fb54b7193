"""Step kernels check (issue #19 item 1): the fused norm kernel and the retained allocator in real training.

The CPU training step has two process-level speed-ups that keep the function: the fused channels-last instance
norm + LeakyReLU kernel (:mod:`automedseg.fused_norm`) and glibc keeping freed memory for reuse
(:mod:`automedseg.allocator`). Both can be switched off (``AUTOMEDSEG_FUSED_NORM=0``,
``AUTOMEDSEG_RETAIN_MEMORY=0``), which is PyTorch's own step. Per dataset and configuration this script trains
fold 0 for a few short epochs with the same plan and seed in each variant, interleaved:

* ``pytorch``: both off (the step as it was);
* ``fused``: both on (the default);
* ``pytorch, seed + 1``: both off, planned with the next seed (``plan --seed``, its own work folder): the
  yardstick. Training is deterministic (a run repeated with the same code and seed gives the same losses), so
  the noise a loss curve is judged against is that of another seed: other initial weights, samples and
  augmentations.

and reports the median step (``seconds_per_iteration`` of ``log.jsonl`` without the first epoch), the speed-up,
and the per-epoch training loss of each variant: the kernels must give the same loss curve within the noise of
another seed.

Usage::

    python benchmarks/step_kernels_check.py --dry-run
    python benchmarks/step_kernels_check.py                             # hippocampus 3d_fullres, openkbp_hn_ct 2d
    python benchmarks/step_kernels_check.py --work-root /scratch --cases msd_hippocampus:2d

Results: ``benchmarks/results/step_kernels_check.{json,md}``; scratch: ``benchmarks/work/step_kernels_check/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH_THREADS, WORK_DIR, machine_info, md_table, write_results  # noqa: E402
from calibration_check import (  # noqa: E402
    FOLD,
    PLAN_BUDGET,
    _cli_env,
    _run_cli,
    default_data_root,
    iterations_for,
    measured_step,
    read_plan,
)

BENCHMARK = "step_kernels_check"
CASES = ("msd_hippocampus:3d_fullres", "openkbp_hn_ct:2d")
PYTORCH_ENV = {"AUTOMEDSEG_FUSED_NORM": "0", "AUTOMEDSEG_RETAIN_MEMORY": "0"}
#: (name, environment, seed offset): the variants in the order each configuration trains them.
VARIANTS = (
    ("pytorch", PYTORCH_ENV, 0),
    ("fused", {}, 0),
    ("pytorch, seed + 1", PYTORCH_ENV, 1),
)
SEED = 12345  # plan's default
EST_RUN_OVERHEAD_S = 25.0  # start-up, pseudo-Dice, checkpoints per short run
EST_PLAN_S = 150.0


def parse_case(text: str) -> tuple[str, str]:
    """``dataset:configuration``.

    Example:
        >>> parse_case("msd_hippocampus:3d_fullres")
        ('msd_hippocampus', '3d_fullres')
    """
    dataset, sep, configuration = text.partition(":")
    if not sep or not dataset or not configuration:
        raise argparse.ArgumentTypeError(f"{text!r}: expected DATASET:CONFIGURATION")
    return dataset, configuration


def loss_gap(a: Sequence[float], b: Sequence[float]) -> float | None:
    """The largest relative difference of two per-epoch loss curves (``None`` when either is empty).

    Example:
        >>> loss_gap([1.02, 0.5], [1.0, 0.5])
        0.02
    """
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return None
    return round(max(abs(x - y) / max(abs(y), 1e-12) for x, y in pairs), 4)


def train_variant(dataset: Path, work: Path, configuration: str, *, name: str, env_changes: dict[str, str],
                  epochs: int, iterations: int, logs: Path, env: dict[str, str]) -> dict:
    """Fold 0 of the configuration, trained afresh with the variant's environment."""
    from automedseg.training_log import read_training_log

    run = _run_cli(["train", dataset, "--work-dir", work, "-c", configuration, "-f", FOLD, "--epochs", epochs,
                    "--iterations-per-epoch", iterations, "--threads", BENCH_THREADS, "--no-validate", "--restart"],
                   logs=logs, label=f"train {dataset.name} {configuration} {name}", env={**env, **env_changes})
    history = read_training_log(work / configuration / f"fold_{FOLD}" / "log.jsonl")
    per_epoch = [h.seconds_per_iteration for h in history]
    return {"variant": name, "environment": env_changes, "measured_s": measured_step(per_epoch),
            "seconds_per_iteration_per_epoch": per_epoch, "train_loss_per_epoch": [h.train_loss for h in history],
            "train_wall_s": run["wall_s"], "foreign_cores": run["foreign_cores"], "log": run["log"]}


def planned(dataset: Path, work: Path, configuration: str, *, seed: int, logs: Path, env: dict[str, str]) -> dict:
    """The configuration's plan in ``work`` (planned with ``seed`` when there is none yet)."""
    try:
        return read_plan(work, configuration)
    except (OSError, KeyError, ValueError):
        _run_cli(["plan", dataset, "--work-dir", work, "--time-budget", PLAN_BUDGET, "-j", BENCH_THREADS,
                  "--threads", BENCH_THREADS, "-c", configuration, "--seed", seed], logs=logs,
                 label=f"plan {dataset.name} seed {seed}", env=env)
        return read_plan(work, configuration)


def compare(runs: Sequence[dict]) -> dict:
    """Speed-up of ``fused`` over ``pytorch`` and the loss-curve gaps (``fused`` vs ``pytorch``, and the
    yardstick ``pytorch, seed + 1`` vs ``pytorch``)."""
    by = {r["variant"]: r for r in runs}
    before, after, other = by.get("pytorch"), by.get("fused"), by.get("pytorch, seed + 1")
    speedup = None
    if before and after and before["measured_s"] and after["measured_s"]:
        speedup = round(before["measured_s"] / after["measured_s"], 3)
    gap = loss_gap(after["train_loss_per_epoch"], before["train_loss_per_epoch"]) if before and after else None
    noise = loss_gap(other["train_loss_per_epoch"], before["train_loss_per_epoch"]) if before and other else None
    return {"speedup": speedup, "loss_gap": gap, "loss_gap_other_seed": noise,
            "within_noise": None if gap is None or noise is None else gap < noise}


def _f(value: object, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def build_summary(f: dict) -> str:
    m = f["machine"]
    lines = [
        "# Step kernels check: the fused norm kernel and retained memory in real training (CPU)",
        "",
        f"Machine: {m['cpu_model']}, {m['cpu_count_logical']} logical CPUs, {m['memory_total_gib']} GiB; "
        f"{f['threads']} threads; python {m['python']}, torch {m['torch']}. Fold {FOLD}, {f['epochs']} epochs per run, "
        "the same plan and seed per variant; step = median seconds per iteration without the first epoch.",
        "Variants: `pytorch` = `AUTOMEDSEG_FUSED_NORM=0 AUTOMEDSEG_RETAIN_MEMORY=0` (PyTorch's instance norm, glibc's "
        "default allocator); `fused` = the defaults; `pytorch, seed + 1` = as `pytorch`, planned with the next seed "
        "(the yardstick: training is deterministic, a repeated run gives the same losses).",
        "",
    ]
    rows = []
    for c in f["cases"]:
        by = {r["variant"]: r for r in c["runs"]}
        p, a = by.get("pytorch", {}), by.get("fused", {})
        cmp_ = c["comparison"]
        rows.append([c["dataset"], c["configuration"], f"{c['batch_size']} x {c['patch_size']}",
                     str(c["features_per_stage"][0]), _f(p.get("measured_s"), ".3f"), _f(a.get("measured_s"), ".3f"),
                     _f(cmp_["speedup"], ".2f") + "x", _f(cmp_["loss_gap"], ".4f"),
                     _f(cmp_["loss_gap_other_seed"], ".4f"), {True: "yes", False: "NO"}.get(cmp_["within_noise"], "-"),
                     " / ".join(_f(r.get("foreign_cores"), ".2f") for r in c["runs"])])
    lines.append(md_table(["dataset", "configuration", "batch x patch", "width", "pytorch s/step", "fused s/step",
                       "speed-up", "loss gap fused vs pytorch", "loss gap other seed", "within noise",
                       "other processes (cores)"], rows))
    lines += ["", "Loss gap: the largest relative difference of the per-epoch mean training losses. Per epoch:", ""]
    for c in f["cases"]:
        for r in c["runs"]:
            losses = ", ".join(_f(v, ".4f") for v in r["train_loss_per_epoch"])
            steps = ", ".join(_f(v, ".3f") for v in r["seconds_per_iteration_per_epoch"])
            lines.append(f"- {c['dataset']} {c['configuration']} {r['variant']}: loss [{losses}]; s/step [{steps}]")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=parse_case, nargs="+", default=[parse_case(c) for c in CASES],
                        help="DATASET:CONFIGURATION pairs (datasets under --data-root)")
    parser.add_argument("--data-root", type=Path, default=None, help="default: ../shared/data")
    parser.add_argument("--work-root", type=Path, default=WORK_DIR / BENCHMARK,
                        help="one work folder per dataset; an existing plan there is reused")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epoch-seconds", type=float, default=25.0, help="about this long per epoch")
    parser.add_argument("--calibration-cache", type=Path, default=None)
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    data_root = args.data_root or default_data_root()
    per_run = args.epochs * args.epoch_seconds + EST_RUN_OVERHEAD_S
    estimate = len(args.cases) * len(VARIANTS) * per_run
    print(f"{len(args.cases)} configurations x {len(VARIANTS)} variants, ~{estimate / 60:.0f} min "
          f"(+ ~{EST_PLAN_S / 60:.0f} min per dataset and seed not yet planned)", flush=True)
    if args.dry_run:
        return 0
    env = _cli_env(args.calibration_cache)
    logs = args.work_root / "logs"
    cases = []
    for dataset_name, configuration in args.cases:
        dataset = data_root / dataset_name
        if not dataset.is_dir():
            print(f"skip {dataset_name}: {dataset} not found", flush=True)
            continue
        work = args.work_root / dataset_name
        plan = planned(dataset, work, configuration, seed=SEED, logs=logs, env=env)
        iterations = iterations_for(plan["predicted_s"], args.epoch_seconds)
        runs = []
        for name, changes, offset in VARIANTS:
            where = work if not offset else args.work_root / f"{dataset_name}-seed{SEED + offset}"
            if offset:
                planned(dataset, where, configuration, seed=SEED + offset, logs=logs, env=env)
            runs.append(train_variant(dataset, where, configuration, name=name, env_changes=changes,
                                      epochs=args.epochs, iterations=iterations, logs=logs, env=env))
        cases.append({"dataset": dataset_name, "configuration": configuration, "iterations_per_epoch": iterations,
                      "batch_size": plan["batch_size"], "patch_size": plan["patch_size"],
                      "features_per_stage": plan["features_per_stage"], "predicted_s": plan["predicted_s"],
                      "runs": runs, "comparison": compare(runs)})
        print(json.dumps(cases[-1]["comparison"]), flush=True)
    figures = {"benchmark": BENCHMARK, "machine": machine_info(), "threads": BENCH_THREADS, "epochs": args.epochs,
               "cases": cases}
    summary = build_summary(figures)
    kw = {"results_dir": args.results_dir} if args.results_dir else {}
    json_path, md_path = write_results(BENCHMARK, figures, summary, **kw)
    print(summary)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
