"""Architecture families at equal budget: fold 0 of hippocampus for each network family, side by side.

Families (``automedseg plan --architecture X``): ``plain_unet`` (nnU-Net's network, the rule plan), ``residual_unet``
(residual encoder), ``attention_unet`` (attention-gated skips), ``aspp_unet`` (DeepLab-style atrous pyramid
bottleneck) and ``segnet_unet`` (max-unpooling decoder with the encoder's pooling indices).

Runs (each an ``automedseg`` command, 2 threads, one at a time; ``--dry-run`` lists them with the estimated time):

1. one work folder ``W`` for the plain network and the three variants: for each family ``plan DATASET --work-dir W
   -c 3d_fullres --time-budget B --architecture X`` (adds ``3d_fullres_X``; the fingerprint, the cache and the
   trained configurations are kept), then ``train -c CONFIG -f 0 --time-budget B --threads 2`` with its final
   validation (sliding window, mirroring as the plan's rule decides for every family alike);
2. ``residual_unet`` replaces the network of every configuration (it is a rule architecture, not a variant), so it
   gets its own work folder ``W_residual`` with ``W``'s fingerprint, split and preprocessed cache (hard links);
3. inference time: ``predict -c CONFIG -f 0`` of the first ``--predict-cases`` images of ``imagesTs`` and of the
   first one alone; seconds per case = the difference / (N - 1), so start-up (imports, loading) is left out;
4. ``report W`` (its configuration comparison holds the four families of ``W``).

Every family trains with the same seed (the plan's), split and budget. Figures per family: validation Dice (mean over
the foreground classes, per class) and HD95 of the fold-0 validation cases (``validation/summary.json``),
parameters (``network_cost.estimate_parameters``, equal to the torch count), forward GFLOPs of one patch
(``network_cost.estimate_forward_flops``), epochs, iterations, training seconds (sum of ``epoch_seconds``), seconds
per iteration, validation seconds per case, inference seconds per case, and the CPU other processes used meanwhile.

Usage::

    python benchmarks/architectures.py --dry-run            # the runs and the estimated CPU time
    python benchmarks/architectures.py --budget 10m         # 5 folds of 10 minutes (about an hour on 2 cores)
    python benchmarks/architectures.py --budget 1m --families plain_unet segnet_unet --predict-cases 3 \\
        --results-dir /tmp/arch_smoke                         # smoke test

Results: ``benchmarks/results/architectures.{json,md}`` (``--keep`` reuses folds already trained and validated).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BENCH_THREADS,
    DEFAULT_MSD_DIR,
    REPO_ROOT,
    WORK_DIR,
    machine_info,
    md_table,
    run_automedseg,
    thread_env,
    write_results,
)

FAMILIES = ("plain_unet", "residual_unet", "attention_unet", "aspp_unet", "segnet_unet")
RULE_FAMILIES = ("plain_unet", "residual_unet")  # they replace every configuration's network
BASE = "3d_fullres"
FOLD = "0"
# Rough time model of --dry-run (2 cores, hippocampus): seconds.
EST_PLAN_S = 150.0  # first plan: fingerprint + preprocessing of 260 cases; later plans reuse both (~5 s)
EST_VALIDATE_S = 60.0  # final validation of ~52 cases
EST_PREDICT_S = 40.0  # two predict runs


@dataclass(frozen=True)
class Family:
    """One family's run: its work folder and configuration name."""

    architecture: str
    work: Path

    @property
    def configuration(self) -> str:
        return BASE if self.architecture in RULE_FAMILIES else f"{BASE}_{self.architecture}"


def families_for(names: list[str], scratch: Path) -> list[Family]:
    """Plain and the variants share ``scratch/work``; residual gets ``scratch/work_residual``."""
    return [Family(a, scratch / ("work_residual" if a == "residual_unet" else "work")) for a in names]


def _run_cli(args: list, logs: Path, label: str) -> dict:
    res = run_automedseg(args, logs=logs, label=label)
    return {"wall_s": res["wall_s"], "foreign_cpu": res["foreign_cpu"], "log": res["log"]}


def _share_work_folder(source: Path, target: Path) -> None:
    """Give ``target`` ``source``'s fingerprint, split and preprocessed cache (hard links: nothing is copied)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("fingerprint.json", "splits.json"):
        if (source / name).is_file() and not (target / name).exists():
            shutil.copy2(source / name, target / name)
    if (source / "preprocessed").is_dir() and not (target / "preprocessed").exists():
        subprocess.run(["cp", "-al", str(source / "preprocessed"), str(target / "preprocessed")], check=True)


def _validated(family: Family) -> bool:
    from automedseg.validation_summary import summary_path

    return summary_path(family.work / family.configuration / f"fold_{FOLD}").is_file()


def train_family(family: Family, *, dataset: Path, budget: str, logs: Path, keep: bool) -> dict:
    """Plan (adding the family's configuration) and train + validate its fold 0, unless ``keep`` finds it done."""
    if keep and _validated(family):
        print(f"[{family.architecture}] fold {FOLD} already validated: kept", flush=True)
        return {"kept": True}
    plan = _run_cli(["plan", dataset, "--work-dir", family.work, "-c", BASE, "--time-budget", budget,
                     "--architecture", family.architecture, "-j", BENCH_THREADS],
                    logs, f"plan {family.architecture}")
    train = _run_cli(["train", dataset, "--work-dir", family.work, "-c", family.configuration, "-f", FOLD,
                      "--time-budget", budget, "--threads", BENCH_THREADS, "--restart"],
                     logs, f"train {family.architecture}")
    return {"kept": False, "plan_wall_s": plan["wall_s"], "train_wall_s": train["wall_s"],
            "foreign_cpu": train["foreign_cpu"]}


def time_inference(family: Family, *, dataset: Path, n_cases: int, scratch: Path, logs: Path) -> dict:
    """Seconds per case of ``predict -f 0`` on ``n_cases`` test images, start-up subtracted."""
    from predict_speed import prepare_inputs

    if n_cases < 2:
        raise SystemExit("--predict-cases must be at least 2")
    walls = {}
    for n in (1, n_cases):
        folder = scratch / f"images_{n}"
        if not folder.is_dir():
            prepare_inputs(dataset, folder, n)
        out = scratch / f"pred_{family.architecture}_{n}"
        res = _run_cli(["predict", "-d", family.work, "-c", family.configuration, "-f", FOLD, "--threads",
                        BENCH_THREADS, "--overwrite", "-i", folder, "-o", out],
                       logs, f"predict {family.architecture} {n}")
        walls[n] = res["wall_s"]
    return {"predict_wall_s": walls, "seconds_per_case": (walls[n_cases] - walls[1]) / (n_cases - 1),
            "cases": n_cases}


def read_family(family: Family) -> dict:
    """The fold's figures, read with the owners' typed readers."""
    from automedseg.network_cost import estimate_forward_flops, estimate_parameters
    from automedseg.plans import Plans
    from automedseg.training_log import read_training_log
    from automedseg.validation_summary import read_validation_summary, summary_path

    fold_dir = family.work / family.configuration / f"fold_{FOLD}"
    plans = Plans.load(fold_dir / "plans.json")
    cfg = plans.configuration(family.configuration)
    history = read_training_log(fold_dir / "log.jsonl")
    summary = read_validation_summary(summary_path(fold_dir))
    fg = summary.summary.get("foreground_mean", {}) if summary.summary else {}
    shape = {"in_channels": len(plans.channel_names), "num_classes": plans.num_classes, "dims": cfg.dims}
    iterations = int(sum(h.iterations or 0 for h in history))
    train_s = float(sum(h.epoch_seconds for h in history))
    n_val = len(summary.cases)
    per_case = {}
    for entry in summary.per_case:
        dice = [m.get("dice") for m in entry["metrics"].values() if m.get("dice") is not None]
        if dice:
            per_case[entry["case"]] = float(sum(dice) / len(dice))
    return {
        "architecture": family.architecture,
        "configuration": family.configuration,
        "work_dir": str(family.work),
        "norm": cfg.network.norm,
        "features_per_stage": list(cfg.network.features_per_stage),
        "patch_size": list(cfg.patch_size),
        "batch_size": cfg.batch_size,
        "parameters": estimate_parameters(cfg.network, **shape),
        "forward_gflops_per_patch": estimate_forward_flops(cfg.network, patch_size=cfg.patch_size, elementwise_flops=0,
                                                           **shape) / 1e9,
        "estimated_seconds_per_iteration": cfg.training.estimated_seconds_per_iteration,
        "epochs": len(history),
        "iterations": iterations,
        "train_seconds": train_s,
        "seconds_per_iteration": train_s / iterations if iterations else None,
        "mean_dice": summary.mean_dice,
        "dice_per_class": dict(summary.dice_per_class),
        "hd95_mm": fg.get("hd95"),
        "validation_cases": n_val,
        "validation_seconds_per_case": summary.seconds / n_val if summary.seconds and n_val else None,
        "validation_mirror_axes": list(summary.mirror_axes),
        "per_case_dice": per_case,
    }


def paired_difference(a: dict[str, float], b: dict[str, float], *, n_boot: int = 10000, seed: int = 0) -> dict:
    """Mean per-case Dice difference ``a - b`` over the shared cases, with a 95 % bootstrap interval over cases."""
    import numpy as np

    cases = sorted(set(a) & set(b))
    if not cases:
        return {"cases": 0, "mean": None, "ci95": None}
    d = np.array([a[c] - b[c] for c in cases])
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    return {"cases": len(cases), "mean": float(d.mean()),
            "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum())}


def _f(value: object, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def build_summary(f: dict) -> str:
    rows = []
    best = max((r for r in f["families"] if r.get("mean_dice") is not None), key=lambda r: r["mean_dice"],
               default=None)
    for r in f["families"]:
        infer = r.get("inference") or {}
        dice = ", ".join(f"{k}: {v:.4f}" for k, v in r["dice_per_class"].items() if v is not None)
        vs = r.get("vs_plain") or {}
        vs_text = "-" if vs.get("mean") is None or r["architecture"] == "plain_unet" else (
            f"{vs['mean']:+.4f} [{vs['ci95'][0]:+.4f}, {vs['ci95'][1]:+.4f}]")
        rows.append([r["architecture"] + (" (best)" if r is best else ""), _f(r["mean_dice"], ".4f"), vs_text, dice,
                     _f(r["hd95_mm"], ".2f"), f"{r['parameters'] / 1e6:.2f}", _f(r["forward_gflops_per_patch"], ".1f"),
                     r["epochs"], r["iterations"], _f(r["train_seconds"] / 60, ".1f"),
                     _f(r["seconds_per_iteration"], ".3f"), _f(r["estimated_seconds_per_iteration"], ".3f"),
                     _f(r["validation_seconds_per_case"], ".2f"), _f(infer.get("seconds_per_case"), ".2f"),
                     _f((r.get("run") or {}).get("foreign_cores"), ".2f")])
    m = f["machine"]
    plain = next((r for r in f["families"] if r["architecture"] == "plain_unet"), None)
    lines = [
        "# architectures: network families on hippocampus fold 0 at equal budget",
        "",
        f"Dataset `{f['dataset']}`, configuration {BASE}, fold {FOLD} of the same 5-fold split, the plan's seed, "
        f"`--time-budget {f['budget']}` per family, 2 torch threads, one run at a time. Machine: {m.get('cpu_model')}, "
        f"{m.get('cpu_count_usable')} cores, torch {m.get('torch')}.",
        f"Command: `{f['command']}`.",
        "",
        md_table(["Family", "Val Dice", "vs plain [95% CI]", "Per class", "HD95 (mm)", "Params (M)",
                  "Fwd GFLOPs/patch", "Epochs", "Iterations", "Train (min)", "s/iter", "s/iter planned",
                  "Val s/case", "Predict s/case",
                  "Other CPU (cores)"], rows),
        "",
        "Val Dice: mean over the foreground classes of the fold-0 validation cases (per case, then over cases), from "
        "`validation/summary.json`; vs plain: mean per-case difference to plain_unet over the same cases with a 95 % "
        "bootstrap interval over cases (an interval that contains 0: no detectable difference); HD95 the same "
        "cases' mean (mm). Params: `estimate_parameters` (equal to the torch "
        "count). Fwd GFLOPs: one forward pass of one training patch, convolutions only "
        "(`estimate_forward_flops`, as the report's comparison; equal to torch's FLOP counter). Train: sum of the "
        "epochs' wall time (what the budget counts). Val s/case: the final validation (sliding window, mirroring as "
        "planned: axes in the JSON). Predict s/case: `predict -f 0` of N test images minus that of one, over N-1 "
        "(start-up left out). Other CPU: cores other processes used during the training run.",
    ]
    if plain is not None and best is not None:
        delta = best["mean_dice"] - plain["mean_dice"]
        lines += ["", f"Best family: **{best['architecture']}** ({best['mean_dice']:.4f}); the rule plan's plain U-Net "
                      f"{plain['mean_dice']:.4f} ({delta:+.4f}). One fold and one seed: the intervals above cover "
                      "the spread over cases only, not over seeds or folds."]
    if f.get("report"):
        lines += ["", f"`automedseg report` of the shared work folder: {f['report']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_MSD_DIR, help="MSD-layout hippocampus folder")
    parser.add_argument("--work-root", type=Path, default=WORK_DIR, help="scratch folder (git-ignored)")
    parser.add_argument("--budget", default="20m", help="training budget per family (default 20m)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--predict-cases", type=int, default=20, help="test images timed per family (default 20)")
    parser.add_argument("--keep", action="store_true", help="reuse folds already trained and validated")
    parser.add_argument("--results-dir", type=Path, default=None, help="instead of benchmarks/results (smoke runs)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and the estimated time only")
    args = parser.parse_args(argv)
    os.environ.update(thread_env(BENCH_THREADS))
    sys.path.insert(0, str(REPO_ROOT))
    from automedseg.cli import parse_duration

    budget_s = parse_duration(args.budget) or 0.0
    scratch = args.work_root / "architectures"
    families = families_for(list(args.families), scratch)
    if args.dry_run:
        total = EST_PLAN_S
        for fam in families:
            each = 5.0 + budget_s + EST_VALIDATE_S + EST_PREDICT_S
            total += each
            print(f"  {fam.architecture:16s} {fam.configuration:28s} ~{each / 60:5.1f} min  work {fam.work}")
        print(f"estimated time: ~{total / 60:.0f} min on 2 cores")
        return 0
    logs = scratch / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    shared = next((fam.work for fam in families if fam.architecture not in RULE_FAMILIES or
                   fam.architecture == "plain_unet"), None)
    results = []
    for fam in families:
        if fam.architecture == "residual_unet" and shared is not None and shared.is_dir():
            _share_work_folder(shared, fam.work)
        run = train_family(fam, dataset=args.dataset, budget=args.budget, logs=logs, keep=args.keep)
        row = read_family(fam)
        if not run.get("kept"):
            foreign = run["foreign_cpu"]
            run["foreign_cores"] = foreign.get("foreign_cpu_fraction_of_one_core")
        row["run"] = run
        row["inference"] = time_inference(fam, dataset=args.dataset, n_cases=args.predict_cases,
                                          scratch=scratch, logs=logs)
        results.append(row)
        print(f"[{fam.architecture}] Dice {row['mean_dice']}, {row['epochs']} epochs, "
              f"{row['inference']['seconds_per_case']:.2f} s/case", flush=True)
    plain = next((r for r in results if r["architecture"] == "plain_unet"), None)
    for row in results:
        if plain is not None:
            row["vs_plain"] = paired_difference(row["per_case_dice"], plain["per_case_dice"])
    report = None
    if shared is not None and shared.is_dir():
        _run_cli(["report", args.dataset, "--work-dir", shared], logs, "report")
        report = str(shared / "report" / "report.md")
    figures = {"dataset": str(args.dataset), "budget": args.budget, "budget_s": budget_s,
               "command": "python benchmarks/architectures.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": machine_info(), "families": results, "report": report}
    write_results("architectures", figures, build_summary(figures), results_dir=args.results_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
