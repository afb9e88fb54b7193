"""Quality at equal budget: fold-0 validation Dice of automedseg vs nnU-Net v2 after the same training time.

Both tools train fold 0 of the same 5-fold split for the same wall-clock budget (default 20 minutes) on
this CPU, each with its own 3d_fullres plan, and are then scored by their own final validation:

* automedseg: ``automedseg plan DATASET --work-dir W -c 3d_fullres --time-budget B`` (plan + preprocess,
  not timed), then ``automedseg train DATASET --work-dir W -c 3d_fullres -f 0 --time-budget B --threads 2``.
  Its dice comes from ``fold_0/validation/summary.json`` (``mean_dice``, ``dice_per_class``), its training
  seconds are the sum of ``epoch_seconds`` in ``fold_0/log.jsonl`` (what its budget counts). With
  ``--automedseg-work-dir W`` an already trained fold 0 in ``W/3d_fullres`` is read instead of training again.
* nnU-Net: a script run with the nnU-Net venv's python builds ``nnUNetTrainer(plans, '3d_fullres', 0,
  dataset_json, device=cpu)`` from its ``nnUNetPlans.json``, sets ``num_iterations_per_epoch`` /
  ``num_val_iterations_per_epoch`` (default 25 / 5, nnU-Net's 5:1 ratio; one epoch of its default 250 would
  take longer than the whole budget on 2 cores) and runs nnU-Net's own epoch hooks (``on_train_start``,
  ``on_epoch_start``, ``on_train_epoch_start``, ``train_step``, ``on_train_epoch_end``, the validation-step
  hooks, ``on_epoch_end``, ``on_train_end``), i.e. ``run_training`` with a budget. After every epoch the number
  of epochs is refitted to the budget with automedseg's rule: mean of the last 3 epoch times, 5% of the budget
  kept in reserve; ``num_epochs`` and the poly learning-rate schedule's ``max_steps`` are updated so the
  learning rate still decays to ~0 at the last epoch. Epoch time counts training and the per-epoch
  validation batches, not checkpoint writing / plotting (as in automedseg). Then
  ``perform_actual_validation()`` (sliding window, mirroring as nnU-Net does by default) and its
  ``validation/summary.json`` (``foreground_mean`` Dice, per-class ``mean`` Dice).
* Split: automedseg's ``splits.json`` (made by ``automedseg.splits.load_or_create_splits`` before training)
  is written to nnU-Net's preprocessed folder as ``splits_final.json``, so both train and validate on the
  same cases; whether it equals nnU-Net's own default split is reported.
* Same metric: both validation folders' segmentations are also scored here with one Dice function against
  ``<dataset>/labelsTr`` (per case and class, a class absent in both masks is skipped; mean over cases, then
  over classes), on the cases both have.

Both sides use 2 torch threads; nnU-Net's augmentation uses ``nnUNet_n_proc_DA=2`` worker processes,
automedseg its plan's worker count.

Usage::

    python benchmarks/quality_budget.py                              # train both, 20 minutes each
    python benchmarks/quality_budget.py --automedseg-work-dir /work/runs/hippo   # reuse automedseg's fold 0
    python benchmarks/quality_budget.py --budget 1m --nnunet-iterations 2 --nnunet-val-iterations 1 \\
        --val-cases 2                                                # smoke test

Results go to ``benchmarks/results/quality_budget.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BENCH_THREADS,
    DEFAULT_MSD_DIR,
    DEFAULT_VENV_DIR,
    REPO_ROOT,
    WORK_DIR,
    ensure_nnunet_venv,
    heartbeat,
    machine_info,
    md_table,
    nnunet_dataset_name,
    nnunet_env,
    nnunet_paths,
    thread_env,
    write_results,
)
from predict_speed import run_timestamped  # noqa: E402

if TYPE_CHECKING:
    from automedseg.splits import Splits

CONFIGURATION = "3d_fullres"
PLANS_IDENTIFIER = "nnUNetPlans"
FOLD = 0
SEED = 12345
AUTOMEDSEG_CLI = "import sys; from automedseg.cli import main; sys.exit(main(prog_name='automedseg'))"

# Run with the nnU-Net venv's python: argv[1] is a JSON object of settings; the result is written as JSON
# to settings["out"]. nnU-Net's run_training loop, with the number of epochs refitted to a time budget.
NNUNET_TRAIN_SCRIPT = r'''
import importlib.metadata, json, os, sys, time

cfg = json.loads(sys.argv[1])
import numpy as np
import torch

torch.set_num_threads(cfg["threads"])
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.crossval_split import generate_crossval_split

t_process = time.perf_counter()
plans = load_json(cfg["plans_file"])
plans["continue_training"] = False  # what nnunetv2.run.run_training.get_trainer_from_args sets
dataset_json = load_json(cfg["dataset_json"])
torch.manual_seed(cfg["seed"])
trainer = nnUNetTrainer(plans=plans, configuration=cfg["configuration"], fold=cfg["fold"],
                        dataset_json=dataset_json, device=torch.device("cpu"))
trainer.num_iterations_per_epoch = cfg["iterations"]
trainer.num_val_iterations_per_epoch = cfg["val_iterations"]
trainer.num_epochs = cfg["max_epochs"]
trainer.initialize()
torch.set_num_threads(cfg["threads"])

# nnU-Net's own default split of the same identifiers, to report whether the split we gave it differs
ids = sorted(trainer.dataset_class.get_identifiers(trainer.preprocessed_dataset_folder))
default_split = generate_crossval_split(ids, seed=12345, n_splits=5)[cfg["fold"]]
tr_keys, val_keys = trainer.do_split()

t0 = time.perf_counter()
trainer.on_train_start()
startup_s = time.perf_counter() - t0
budget = cfg["budget_s"]
reserve = 0.05 * budget
planned = trainer.num_epochs
epoch_seconds, epoch_wall, train_losses, pseudo_dice = [], [], [], []
train_seconds = 0.0
t_loop = time.perf_counter()
while trainer.current_epoch < planned:
    te = time.perf_counter()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    outs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(trainer.num_iterations_per_epoch)]
    trainer.on_train_epoch_end(outs)
    with torch.no_grad():
        trainer.on_validation_epoch_start()
        vals = [trainer.validation_step(next(trainer.dataloader_val))
                for _ in range(trainer.num_val_iterations_per_epoch)]
        trainer.on_validation_epoch_end(vals)
    dt = time.perf_counter() - te  # training + per-epoch validation, as automedseg's epoch_seconds
    trainer.on_epoch_end()  # checkpoints, progress plot, current_epoch += 1
    epoch_wall.append(time.perf_counter() - te)
    epoch_seconds.append(dt)
    train_seconds += dt
    train_losses.append(float(trainer.logger.get_value("train_losses", step=-1)))
    pseudo_dice.append([float(v) for v in trainer.logger.get_value("dice_per_class_or_region", step=-1)])
    done = trainer.current_epoch
    mean_epoch = float(np.mean(epoch_seconds[-3:]))
    affordable = done + int(max(0.0, budget - reserve - train_seconds) // mean_epoch)
    planned = max(done, min(planned, affordable))
    trainer.num_epochs = planned
    trainer.lr_scheduler.max_steps = planned  # the poly schedule decays over the refitted number of epochs
    print(f"[budget] epoch {done}/{planned}: {dt:.1f} s, used {train_seconds:.0f}/{budget:.0f} s", flush=True)
loop_wall_s = time.perf_counter() - t_loop
trainer.on_train_end()

if not cfg["val_mirror"]:
    trainer.inference_allowed_mirroring_axes = None  # the predictor then runs without mirroring
mirror_axes = trainer.inference_allowed_mirroring_axes
t0 = time.perf_counter()
trainer.perform_actual_validation(False)
validation_s = time.perf_counter() - t0
val_dir = os.path.join(trainer.output_folder, "validation")
summary = load_json(os.path.join(val_dir, "summary.json"))
result = {
    "nnunetv2": importlib.metadata.version("nnunetv2"),
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "n_proc_DA": os.environ.get("nnUNet_n_proc_DA"),
    "batch_size": int(trainer.batch_size),
    "patch_size": [int(p) for p in trainer.configuration_manager.patch_size],
    "features_per_stage": trainer.configuration_manager.network_arch_init_kwargs.get("features_per_stage"),
    "parameters": int(sum(p.numel() for p in trainer.network.parameters())),
    "iterations_per_epoch": trainer.num_iterations_per_epoch,
    "val_iterations_per_epoch": trainer.num_val_iterations_per_epoch,
    "epochs": len(epoch_seconds),
    "iterations": len(epoch_seconds) * trainer.num_iterations_per_epoch,
    "train_seconds": train_seconds,
    "epoch_seconds": epoch_seconds,
    "epoch_wall_seconds": epoch_wall,
    "loop_wall_s": loop_wall_s,
    "startup_s": startup_s,
    "validation_s": validation_s,
    "process_s": time.perf_counter() - t_process,
    "train_losses": train_losses,
    "pseudo_dice": pseudo_dice,
    "final_lr": float(trainer.optimizer.param_groups[0]["lr"]),
    "val_mirror_axes": list(mirror_axes) if mirror_axes is not None else None,
    "n_train": len(tr_keys),
    "val_cases": list(val_keys),
    "split_equals_nnunet_default": sorted(tr_keys) == sorted(default_split["train"])
    and sorted(val_keys) == sorted(default_split["val"]),
    "validation_dir": val_dir,
    "mean_dice": float(summary["foreground_mean"]["Dice"]),
    "dice_per_class": {str(k): float(v["Dice"]) for k, v in summary["mean"].items()},
}
with open(cfg["out"], "w") as fh:
    json.dump(result, fh, indent=1)
'''


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------


def parse_budget(text: str) -> float:
    """``20m``, ``90s``, ``1h30m`` or plain seconds, as the automedseg CLI reads them."""
    from automedseg.cli import parse_duration

    seconds = parse_duration(text)
    if seconds is None or seconds <= 0:
        raise ValueError(f"bad budget {text!r}")
    return seconds


def _automedseg_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(thread_env(BENCH_THREADS))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_cli(args: list[str], log_path: Path, label: str) -> dict:
    cmd = [sys.executable, "-c", AUTOMEDSEG_CLI, *[str(a) for a in args]]
    print(f"[{label}] automedseg {' '.join(str(a) for a in args)}", flush=True)
    with heartbeat(label):
        res = run_timestamped(cmd, env=_automedseg_env(), cwd=REPO_ROOT, log_path=log_path)
    tail = "\n".join(text for _, text in res.pop("lines")[-30:])
    res["output_tail"] = tail
    print(f"  -> rc={res['returncode']} wall={res['wall_s']} s", flush=True)
    if res["returncode"] != 0:
        print(tail, flush=True)
        raise RuntimeError(f"{label} failed (rc={res['returncode']}); log: {log_path}")
    return res


def dice_same_metric(pred_dir: Path, labels_dir: Path, cases: list[str], labels: list[int]) -> dict:
    """Per-class Dice (mean over cases) and its mean over classes of ``pred_dir/<case>.nii.gz`` vs the labels."""
    import numpy as np
    import SimpleITK as sitk

    per_class: dict[int, list[float]] = {k: [] for k in labels}
    for case in cases:
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / f"{case}.nii.gz")))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_dir / f"{case}.nii.gz")))
        if pred.shape != ref.shape:
            raise ValueError(f"{case}: prediction shape {pred.shape} != reference {ref.shape}")
        for k in labels:
            p, r = pred == k, ref == k
            denom = int(p.sum()) + int(r.sum())
            if denom:  # a class absent from both masks is not counted
                per_class[k].append(2.0 * int((p & r).sum()) / denom)
    means = {str(k): float(np.mean(v)) if v else None for k, v in per_class.items()}
    valid = [v for v in means.values() if v is not None]
    return {"cases": len(cases), "dice_per_class": means, "mean_dice": float(np.mean(valid)) if valid else None}


def _labels(msd_dir: Path) -> list[int]:
    meta = json.loads((msd_dir / "dataset.json").read_text())
    labels = meta["labels"]
    values = labels.values() if all(not str(k).isdigit() for k in labels) else [int(k) for k in labels]
    return sorted(int(v) for v in values if int(v) > 0)


# --------------------------------------------------------------------------------------------------------
# automedseg side
# --------------------------------------------------------------------------------------------------------


def read_automedseg_fold(work: Path, configuration: str = CONFIGURATION) -> dict:
    """Training figures and validation Dice of ``work/<configuration>/fold_0``, read with the owners' typed readers
    (``log.jsonl``: training_log, ``validation/summary.json``: validation_summary, the fold's ``plans.json``:
    Plans.load)."""
    return read_fold_dir(work / configuration / f"fold_{FOLD}", configuration)


def read_fold_dir(fold_dir: Path, configuration: str | None = None) -> dict:
    """:func:`read_automedseg_fold` of any trained fold folder (e.g. a search's confirmation run); without
    ``configuration`` the fold's plans.json must hold one configuration, or its first is read."""
    from automedseg.plans import Plans
    from automedseg.training_log import read_training_log
    from automedseg.validation_summary import read_validation_summary, summary_path

    fold_dir = Path(fold_dir)
    path = summary_path(fold_dir)
    if not path.is_file():
        raise SystemExit(f"{path}: missing (fold {FOLD} not trained and validated yet)")
    history = read_training_log(fold_dir / "log.jsonl")
    summary = read_validation_summary(path)
    copy = Plans.load(fold_dir / "plans.json")
    plan = copy.configuration(configuration) if configuration in copy.configurations else \
        next(iter(copy.configurations.values()))
    tr = plan.training
    return {
        "fold_dir": str(fold_dir),
        "validation_dir": str(fold_dir / "validation"),
        "mean_dice": summary.mean_dice,
        "dice_per_class": summary.dice_per_class,
        "val_cases": list(summary.cases),
        "validation_s": summary.seconds,
        "epochs": len(history),
        "iterations": int(sum(h.iterations or 0 for h in history)),
        "train_seconds": float(sum(h.epoch_seconds for h in history)),
        "epoch_seconds": [h.epoch_seconds for h in history],
        "final_ema_pseudo_dice": history[-1].ema_pseudo_dice if history else None,
        "batch_size": plan.batch_size,
        "patch_size": list(plan.patch_size),
        "features_per_stage": list(plan.network.features_per_stage),
        "plan_time_budget_s": tr.time_budget_s,
        "iterations_per_epoch": tr.iterations_per_epoch,
        "validation_mirroring": bool(summary.mirror_axes),
    }


def train_automedseg(msd_dir: Path, work: Path, *, budget: str, device: str, iterations: int | None,
                     val_cases: int | None, fingerprint_from: Path, logs: Path) -> dict:
    """Plan, write the split, train fold 0 with the budget; returns the commands' timings."""
    from automedseg.splits import load_or_create_splits, write_splits
    from automedseg.workspace import Workspace

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if fingerprint_from.is_file():  # same files: automedseg checks the signature and reuses it
        shutil.copy2(fingerprint_from, work / "fingerprint.json")
    plan_res = _run_cli(["plan", msd_dir, "--work-dir", work, "-c", CONFIGURATION, "--time-budget", budget,
                         "--device", device, "-j", BENCH_THREADS], logs / "automedseg_plan.log", "automedseg plan")
    from automedseg.plans import Plans

    ws = Workspace(work)
    from automedseg.preprocessing import complete_cases

    plans = Plans.load(ws.plans_path)
    cfg = plans.configuration(CONFIGURATION)
    cases = complete_cases(ws.preprocessed_dir(cfg.data_identifier), plans, cfg)
    splits = load_or_create_splits(ws, cases)  # exactly what `automedseg train` would make
    if val_cases is not None:
        splits = with_fewer_val_cases(splits, val_cases)
        write_splits(ws.splits_path, splits)
    args = ["train", msd_dir, "--work-dir", work, "-c", CONFIGURATION, "-f", FOLD, "--time-budget", budget,
            "--threads", BENCH_THREADS, "--restart"]
    if iterations is not None:
        args += ["--iterations-per-epoch", iterations]
    train_res = _run_cli(args, logs / "automedseg_train.log", "automedseg train")
    return {"plan_cmd": plan_res, "train_cmd": train_res}


# --------------------------------------------------------------------------------------------------------
# nnU-Net side
# --------------------------------------------------------------------------------------------------------


def with_fewer_val_cases(splits: Splits, val_cases: int) -> Splits:
    """``splits`` with fold :data:`FOLD` validating only on its first ``val_cases`` cases."""
    fold = splits[FOLD]
    return (*splits[:FOLD], dataclasses.replace(fold, val=fold.val[:val_cases]), *splits[FOLD + 1:])


def write_nnunet_split(pre: Path, splits: Splits) -> dict:
    """Write ``splits_final.json`` (automedseg's split) into nnU-Net's preprocessed dataset folder."""
    data_dir = pre / f"{PLANS_IDENTIFIER}_{CONFIGURATION}"
    have = {p.name.split(".")[0] for p in data_dir.iterdir() if not p.name.endswith("_seg.b2nd")} if \
        data_dir.is_dir() else set()
    need = {c for s in splits for c in (*s.train, *s.val)}
    missing = sorted(need - have)
    if missing:
        raise SystemExit(f"{len(missing)} split cases are not in nnU-Net's preprocessed data {data_dir}: "
                         f"{missing[:5]}")
    path = pre / "splits_final.json"
    previous = json.loads(path.read_text()) if path.is_file() else None
    data = [{"train": list(s.train), "val": list(s.val)} for s in splits]  # nnU-Net's format (automedseg's too)
    path.write_text(json.dumps(data, indent=1))
    return {"path": str(path), "replaced_existing": previous is not None,
            "existing_was_identical": previous == data if previous is not None else None}


def train_nnunet(bin_dir: Path, *, work_root: Path, scratch: Path, dataset_name: str, budget_s: float,
                 iterations: int, val_iterations: int, val_mirror: bool, logs: Path) -> dict:
    pre = nnunet_paths(work_root)["nnUNet_preprocessed"] / dataset_name
    results_dir = scratch / "nnUNet_results"
    if results_dir.exists():
        shutil.rmtree(results_dir)
    results_dir.mkdir(parents=True)
    out_path = scratch / "nnunet_result.json"
    out_path.unlink(missing_ok=True)
    settings = {
        "plans_file": str(pre / f"{PLANS_IDENTIFIER}.json"),
        "dataset_json": str(pre / "dataset.json"),
        "configuration": CONFIGURATION,
        "fold": FOLD,
        "threads": BENCH_THREADS,
        "iterations": iterations,
        "val_iterations": val_iterations,
        "max_epochs": 1000,
        "budget_s": budget_s,
        "val_mirror": val_mirror,
        "seed": SEED,
        "out": str(out_path),
    }
    env = nnunet_env(work_root, overrides={"nnUNet_results": str(results_dir), "PYTHONUNBUFFERED": "1"})
    cmd = [str(bin_dir / "python"), "-c", NNUNET_TRAIN_SCRIPT, json.dumps(settings)]
    print(f"[nnU-Net] nnUNetTrainer fold {FOLD}, {iterations} iterations/epoch, budget {budget_s:.0f} s ...",
          flush=True)
    with heartbeat("nnU-Net training"):
        res = run_timestamped(cmd, env=env, cwd=scratch, log_path=logs / "nnunet_train.log")
    tail = "\n".join(text for _, text in res.pop("lines")[-40:])
    if res["returncode"] != 0 or not out_path.exists():
        print(tail, flush=True)
        raise RuntimeError(f"nnU-Net training script failed (rc={res['returncode']}); log: {res['log']}")
    out = json.loads(out_path.read_text())
    out.update({"process_wall_s": res["wall_s"], "foreign_cpu": res["foreign_cpu"], "log": res["log"],
                "validation_mirroring": out["val_mirror_axes"] is not None})
    return out


# --------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------


def _fmt(v: object, nd: int = 4, unit: str = "") -> str:
    if v is None:
        return "n/a"
    return f"{v:.{nd}f}{unit}" if isinstance(v, float) else f"{v}{unit}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def build_summary(f: dict) -> str:
    m = f["machine"]
    a, n = f.get("automedseg"), f.get("nnunet")
    rows = []
    for label, r in (("automedseg", a), ("nnU-Net v2 (nnUNetTrainer)", n)):
        if r is None:
            rows.append([label, "skipped", "", "", "", "", "", "", "", ""])
            continue
        per_class = ", ".join(f"{k}: {v:.4f}" for k, v in (r.get("dice_per_class") or {}).items())
        same = r.get("same_metric") or {}
        rows.append([
            label, _fmt(r.get("mean_dice")), per_class, _fmt(same.get("mean_dice")),
            _fmt(r["train_seconds"], 0, " s"), r["epochs"], r["iterations"],
            f"{r['batch_size']} x {r['patch_size']}", r["features_per_stage"],
            "on" if r.get("validation_mirroring") else "off",
        ])
    lines = [
        "# quality_budget: fold-0 validation Dice after the same training time (CPU)",
        "",
        f"Dataset `{f['dataset']}`, configuration {CONFIGURATION}, fold {FOLD} ({f['n_val_cases']} validation cases, "
        f"same split for both: automedseg's splits.json written as nnU-Net's splits_final.json; equal to "
        f"nnU-Net's own default split: {f.get('split_equals_nnunet_default')}). Budget: {f['budget']} "
        f"({f['budget_s']:.0f} s) of training per tool, each with its own plan.",
        f"Machine: {m['cpu_model']}, {m['cpu_count_usable']} cores, {m['memory_total_gib']} GiB; {BENCH_THREADS} "
        f"torch threads each; python {m['python']}, torch {m['torch']}, automedseg {m['automedseg']}, "
        f"nnunetv2 {m['nnunetv2']} (torch {m['nnunet_venv_torch']} in its venv).",
        f"automedseg: {f['automedseg_source']}." + (f" nnU-Net: {f['nnunet_source']}." if f.get("nnunet_source")
                                                    else ""),
        "",
        md_table(["tool", "val. mean Dice (own)", "per class (own)", "mean Dice (same metric here)",
                  "training s used", "epochs", "iterations", "batch x patch", "features", "val. mirroring"], rows),
        "",
        md_table(["comparison", "automedseg / nnU-Net"], [
            ["mean Dice, each tool's own validation", _fmt(f["ratios"]["dice_own"])],
            ["mean Dice, same metric", _fmt(f["ratios"]["dice_same_metric"])],
            ["training seconds used", _fmt(f["ratios"]["train_seconds"], 3)],
            ["samples seen (iterations x batch)", _fmt(f["ratios"]["samples"], 2)],
        ]),
        "",
    ]
    if n is not None:
        default_epoch_min = n["train_seconds"] / max(1, n["epochs"]) * 250 / n["iterations_per_epoch"] / 60
        lines.append(
            f"nnU-Net: {n['iterations_per_epoch']} training / {n['val_iterations_per_epoch']} validation iterations "
            f"per epoch (with its default 250/50 one epoch would take ~{default_epoch_min:.0f} min here), "
            f"{n['epochs']} epochs refitted to the budget "
            f"after each epoch; start-up (data loaders) {n['startup_s']:.0f} s and final validation "
            f"{n['validation_s']:.0f} s are outside the budget; {n['parameters']:,} parameters; DA processes "
            f"{n['n_proc_DA']}; other processes used {n['foreign_cpu']['foreign_cpu_fraction_of_one_core']:.2f} "
            "cores during its run."
        )
    if a is not None:
        lines.append(
            f"automedseg: training seconds = sum of epoch_seconds in log.jsonl (training + per-epoch pseudo-Dice "
            f"batches, as its budget counts them); plan budget {a.get('plan_time_budget_s')} s; final validation "
            f"{_fmt(a.get('validation_s'), 0, ' s')} "
            f"{'with' if a.get('validation_mirroring') else 'without'} mirroring (as its plan's rule decided)."
        )
    lines += [
        "",
        "'Own' Dice: automedseg `mean_dice` of fold_0/validation/summary.json; nnU-Net `foreground_mean` Dice of "
        "its validation/summary.json (both: mean over cases per class, then over classes). 'Same metric': both "
        "validation folders' masks scored here against labelsTr with one Dice function. Validation TTA differs "
        "by default (nnU-Net mirrors, automedseg does not; `--nnunet-val-mirror off` aligns them).",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_MSD_DIR, help="MSD-layout dataset folder")
    parser.add_argument("--dataset-id", type=int, default=4, help="nnU-Net dataset id (default 4)")
    parser.add_argument("--work-root", type=Path, default=WORK_DIR, help="nnU-Net work folder (git-ignored)")
    parser.add_argument("--budget", default="20m", help="training wall-clock budget per tool (default 20m)")
    parser.add_argument("--automedseg-work-dir", type=Path, default=None,
                        help="reuse fold 0 trained in this automedseg work folder instead of training")
    parser.add_argument("--automedseg-device", default="auto",
                        help="--device of `automedseg plan` (default auto: measure this CPU)")
    parser.add_argument("--automedseg-iterations", type=int, default=None,
                        help="override automedseg's iterations per epoch (smoke tests)")
    parser.add_argument("--nnunet-iterations", type=int, default=25,
                        help="nnU-Net training iterations per epoch (default 25)")
    parser.add_argument("--nnunet-val-iterations", type=int, default=5,
                        help="nnU-Net validation iterations per epoch (default 5)")
    parser.add_argument("--nnunet-val-mirror", choices=("on", "off"), default="on",
                        help="mirroring in nnU-Net's final validation (default on, nnU-Net's own default)")
    parser.add_argument("--val-cases", type=int, default=None,
                        help="validate on the first N fold-0 validation cases only (smoke tests; training mode)")
    parser.add_argument("--skip-nnunet", action="store_true", help="automedseg only")
    parser.add_argument("--nnunet-from", type=Path, default=None,
                        help="instead of training nnU-Net, show the nnU-Net entry of an earlier results JSON beside "
                             "(its machine and budget are named in the summary)")
    parser.add_argument("--results-name", default="quality_budget",
                        help="stem of the results files in benchmarks/results (default quality_budget)")
    args = parser.parse_args(argv)

    os.environ.update(thread_env(BENCH_THREADS))
    budget_s = parse_budget(args.budget)
    msd_dir = args.dataset.resolve()
    work_root = args.work_root.resolve()
    scratch = work_root / "quality_budget"
    scratch.mkdir(parents=True, exist_ok=True)
    logs = scratch / "logs"
    dataset_name = nnunet_dataset_name(msd_dir, args.dataset_id)
    pre = nnunet_paths(work_root)["nnUNet_preprocessed"] / dataset_name
    if args.nnunet_from is not None:
        args.skip_nnunet = True
    if not args.skip_nnunet and not (pre / f"{PLANS_IDENTIFIER}.json").exists():
        raise SystemExit(f"{pre / PLANS_IDENTIFIER}.json not found: run benchmarks/plan_speed.py first")

    # automedseg: train (or reuse) fold 0
    a_cmds = None
    if args.automedseg_work_dir is not None:
        a_work = args.automedseg_work_dir.resolve()
        source = f"reused fold {FOLD} of `{a_work}` (not retrained)"
        if args.val_cases is not None:
            print("note: --val-cases only limits nnU-Net's validation when automedseg's fold is reused", flush=True)
    else:
        a_work = scratch / "automedseg"
        a_cmds = train_automedseg(msd_dir, a_work, budget=args.budget, device=args.automedseg_device,
                                  iterations=args.automedseg_iterations, val_cases=args.val_cases,
                                  fingerprint_from=work_root / "automedseg_plan_speed" / "fingerprint.json",
                                  logs=logs)
        source = f"trained here in `{a_work}` (plan --device {args.automedseg_device})"
    automedseg = read_automedseg_fold(a_work)
    if automedseg["plan_time_budget_s"] is not None and abs(automedseg["plan_time_budget_s"] - budget_s) > 1:
        print(f"warning: automedseg's fold was trained with a {automedseg['plan_time_budget_s']:.0f} s budget, "
              f"not {budget_s:.0f} s", flush=True)
    print(f"automedseg: mean Dice {automedseg['mean_dice']:.4f}, {automedseg['train_seconds']:.0f} s, "
          f"{automedseg['epochs']} epochs, {automedseg['iterations']} iterations", flush=True)

    from automedseg.splits import read_splits

    splits = read_splits(a_work / "splits.json")
    if args.val_cases is not None and args.automedseg_work_dir is not None:
        splits = with_fewer_val_cases(splits, args.val_cases)

    nnunet = None
    split_info = None
    if not args.skip_nnunet:
        bin_dir = ensure_nnunet_venv(DEFAULT_VENV_DIR)
        split_info = write_nnunet_split(pre, splits)
        nnunet = train_nnunet(bin_dir, work_root=work_root, scratch=scratch, dataset_name=dataset_name,
                              budget_s=budget_s, iterations=args.nnunet_iterations,
                              val_iterations=args.nnunet_val_iterations, val_mirror=args.nnunet_val_mirror == "on",
                              logs=logs)
        print(f"nnU-Net: mean Dice {nnunet['mean_dice']:.4f}, {nnunet['train_seconds']:.0f} s, {nnunet['epochs']} "
              f"epochs, {nnunet['iterations']} iterations", flush=True)

    nnunet_source = "trained in this run" if nnunet is not None else None
    if args.nnunet_from is not None:
        earlier = json.loads(args.nnunet_from.read_text())
        nnunet = earlier.get("nnunet")
        if nnunet is None:
            raise SystemExit(f"{args.nnunet_from}: no nnunet entry")
        em = earlier.get("machine") or {}
        nnunet_source = (f"reused from `{args.nnunet_from.name}` ({earlier.get('created_utc', '?')}, budget "
                         f"{earlier.get('budget')}, {em.get('cpu_model')}; not retrained)")

    # the same Dice function on both validation folders, on the cases both predicted
    labels = _labels(msd_dir)
    cases = sorted(set(automedseg["val_cases"] or []) & set(nnunet["val_cases"] if nnunet else
                                                             automedseg["val_cases"] or []))
    for r in (automedseg, nnunet):
        if r is not None and cases and Path(r["validation_dir"]).is_dir():  # a reused entry keeps its own
            r["same_metric"] = dice_same_metric(Path(r["validation_dir"]), msd_dir / "labelsTr", cases, labels)

    a_samples = automedseg["iterations"] * automedseg["batch_size"]
    n_samples = nnunet["iterations"] * nnunet["batch_size"] if nnunet else None
    figures: dict = {
        "benchmark": "quality_budget",
        "dataset": str(msd_dir),
        "configuration": CONFIGURATION,
        "fold": FOLD,
        "budget": args.budget,
        "budget_s": budget_s,
        "threads": BENCH_THREADS,
        "machine": machine_info(DEFAULT_VENV_DIR),
        "n_val_cases": len(cases),
        "val_cases_limited": args.val_cases,
        "split": split_info,
        "split_equals_nnunet_default": nnunet["split_equals_nnunet_default"] if nnunet else None,
        "automedseg_source": source,
        "nnunet_source": nnunet_source,
        "automedseg_commands": a_cmds,
        "automedseg": automedseg,
        "nnunet": nnunet,
        "ratios": {
            "dice_own": _ratio(automedseg["mean_dice"], nnunet["mean_dice"] if nnunet else None),
            "dice_same_metric": _ratio((automedseg.get("same_metric") or {}).get("mean_dice"),
                                       ((nnunet or {}).get("same_metric") or {}).get("mean_dice")),
            "train_seconds": _ratio(automedseg["train_seconds"], nnunet["train_seconds"] if nnunet else None),
            "samples": _ratio(float(a_samples), float(n_samples) if n_samples else None),
        },
    }
    summary = build_summary(figures)
    json_path, md_path = write_results(args.results_name, figures, summary)
    print(summary)
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
