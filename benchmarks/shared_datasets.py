"""automedseg on every shared dataset: plan, fold 0 with a time budget, scores next to published figures.

For each dataset of ``--data-root`` (default ``../shared/data``; ``--datasets`` picks a subset), one after
the other (never two trainings at once), with the automedseg CLI of this checkout:

1. ``automedseg import`` for the 2D datasets (DRIVE, HC18, ISBI 2012), with the commands of README section
   "Importing 2D datasets", into ``WORK/<name>/raw``; the 3D datasets (``msd_hippocampus``,
   ``openkbp_hn_ct``) are read in place.
2. ``automedseg plan RAW --work-dir WORK/<name>/work --time-budget BUDGET --threads T`` (otherwise the
   default options: every configuration that applies, the device measured here).
3. ``automedseg train RAW --work-dir ... -c CFG -f 0 --time-budget BUDGET --threads T`` with CFG =
   ``3d_fullres`` when the plan has it, else ``2d`` (the default options otherwise: final validation on).
   Then ``automedseg find-best RAW --work-dir ... -c CFG -f 0``: the post-processing find-best chooses on the
   fold-0 validation and the Dice after it, an (info) row: chosen and scored on the same cases, as nnU-Net's
   cross-validation figures are.
4. DRIVE (the only labelled test set): ``automedseg predict -i RAW/imagesTs -o WORK/drive/predictions_fold0
   -c 2d -f 0`` (default test-time mirroring; no find-best, so no post-processing), ``automedseg evaluate
   RAW/labelsTs PREDICTIONS`` (whole image), and the same scores inside the field of view computed here:
   reference and prediction are set to background outside ``RAW/fovTs/<case>.png`` and scored with
   ``automedseg.metrics.compute_case_metrics`` (Dice/TP/FP/FN do not depend on pixels that are background in
   both, so this is Dice inside the FOV); pixel accuracy is counted over FOV pixels only.
5. Everywhere: the fold-0 validation Dice per class and its mean from ``fold_0/validation/summary.json``
   (read with ``automedseg.validation_summary.read_validation_summary``); for ISBI 2012 also the pixel error
   (1 - pixel accuracy, pooled over the validation slices) of ``fold_0/validation/<case>.nii.gz`` against the
   imported ``labelsTr``.
6. Budget use: the ``train`` command's wall time / budget (the trainer aims to end in the budget's last 5 %,
   start-up and final validation included; target >= 95 %), epochs and iterations from ``fold_0/log.jsonl``
   (read with ``automedseg.training_log.read_training_log``),
   and what the plan chose and why (configuration, patch, batch, feature widths, spacing, mirror axes and the
   plan's ``notes``), read with ``automedseg.plans.Plans.load`` from the fold's copy of ``plans.json`` (the
   plan as trained).

Each figure is marked PASS / short against its target; for a short one the "why short" column lists what the
script can measure: budget use under 95 %, classes whose pseudo-Dice stayed 0 in every epoch of
``log.jsonl``, the EMA pseudo-Dice still rising at the end, other processes' CPU use during training, organs
under their target, the number of validation cases. Published figures are for other splits (test sets,
5-fold CV) and far longer training: they are references, not like-for-like comparisons.

``--keep`` reuses finished steps: an existing import, a plan with the same budget and a complete cache, a
fold 0 that finished (``checkpoint_final.pt`` + ``validation/summary.json``) with the same budget (not
retrained; its train wall time comes from ``WORK/<name>/bench_state.json``), existing predictions; an
interrupted fold with the same budget is resumed. Without ``--keep`` every step runs again (``import
--overwrite``, ``train --restart``, ``predict --overwrite``; ``plan`` reuses its fingerprint and cache when
the files are unchanged, as it always does). A dataset whose folder is missing is skipped with the reason; a
failing step is recorded and the next dataset runs.

Usage::

    python benchmarks/shared_datasets.py                                  # all five, 20 min each
    python benchmarks/shared_datasets.py --datasets drive,isbi2012_em --budget 10m --keep
    python benchmarks/shared_datasets.py --datasets drive,openkbp_hn_ct --budget 40s \\
        --work-dir /tmp/sdbench --results-dir /tmp/sdbench/results        # smoke test, nothing committed

Results go to ``--results-dir`` (default ``benchmarks/results``): ``shared_datasets.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from automedseg.training_log import EpochRecord

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BENCH_THREADS,
    REPO_ROOT,
    RESULTS_DIR,
    WORK_DIR,
    heartbeat,
    machine_info,
    md_table,
    thread_env,
    write_results,
)
from predict_speed import run_timestamped  # noqa: E402

BENCHMARK = "shared_datasets"
DEFAULT_WORK_DIR = WORK_DIR / "shared"
FOLD = 0
N_FOLDS = 5  # automedseg's cross-validation (--cv datasets train all of them)
BUDGET_USE_TARGET = 0.95
BUDGET_USE_OVER = 1.05  # the trainer aims to end inside the budget; more than this is an overrun
AUTOMEDSEG_CLI = "import sys; from automedseg.cli import main; sys.exit(main(prog_name='automedseg'))"
STATE_FILE = "bench_state.json"
LOG_DIR = "logs"
MASK_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------------------
# the datasets
# --------------------------------------------------------------------------------------------------------


def default_data_root() -> Path:
    """``../shared/data`` from the repository root; in a git worktree, from the main checkout if not there."""
    here = (REPO_ROOT / ".." / "shared" / "data").resolve()
    if here.is_dir():
        return here
    import subprocess

    proc = subprocess.run(["git", "rev-parse", "--path-format=absolute", "--git-common-dir"], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=False)
    if proc.returncode == 0 and proc.stdout.strip():
        main_root = Path(proc.stdout.strip()).parent  # <main checkout>/.git -> <main checkout>
        candidate = (main_root / ".." / "shared" / "data").resolve()
        if candidate.is_dir():
            return candidate
    return here


@dataclass(frozen=True)
class Target:
    """A figure with a target: ``value >= threshold`` (or ``<=`` when ``lower_is_better``)."""

    figure: str
    published: str
    target: str
    threshold: float | None
    lower_is_better: bool = False
    strict: bool = False  # ``>`` (or ``<``) rather than ``>=`` (``<=``)


@dataclass(frozen=True)
class DatasetSpec:
    """How one shared dataset is imported, trained and scored."""

    name: str
    folder: str
    kind: str  # "2d" (imported) or "3d" (read in place)
    import_args: tuple[str, ...] | None = None  # after SOURCE -o RAW; "{data}" is replaced by the data root
    test_set: bool = False  # labelled imagesTs/labelsTs (+ fovTs) to predict and score
    pixel_error: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)


DATASETS: dict[str, DatasetSpec] = {
    "drive": DatasetSpec(
        "drive", "drive", "2d",
        import_args=("--mask-suffix", "_manual1", "--fov-suffix", "_mask", "--colors", "0=background;255=vessel"),
        test_set=True,
        notes=("20 training / 20 test images; test scored inside the field of view (fovTs)",),
    ),
    "hc18": DatasetSpec(
        "hc18", "hc18", "2d",
        import_args=("--colors", "0=background;255=head", "--channel-names", "US",
                     "--spacing-csv", "{data}/hc18/training_set_pixel_size_and_HC.csv",
                     "--spacing-column", "pixel size(mm)", "--name-column", "filename"),
        notes=("250 of the 999 training cases; no test labels: fold-0 validation only",),
    ),
    "isbi2012_em": DatasetSpec(
        "isbi2012_em", "isbi2012_em", "2d",
        import_args=("--colors", "255=background;0=membrane", "--channel-names", "EM"),
        pixel_error=True,
        notes=("30 training slices; the challenge's test labels are not public: fold-0 validation only",),
    ),
    "msd_hippocampus": DatasetSpec(
        "msd_hippocampus", "msd_hippocampus", "3d",
        notes=("210 labelled cases (imagesTs has no labels): fold-0 validation only",),
    ),
    "openkbp_hn_ct": DatasetSpec(
        "openkbp_hn_ct", "openkbp_hn_ct", "3d",
        notes=("25 cases, 7 organs at risk, no test set: fold-0 validation only",),
    ),
}

TARGETS: dict[str, dict[str, Target]] = {
    "drive": {
        "test_fov": Target("vessel Dice, test set (20), inside FOV", "U-Net Dice/F1 0.79-0.82 (test, inside FOV)",
                           ">= 0.79", 0.79),
    },
    "hc18": {
        "val": Target("head Dice, fold-0 validation", "head Dice ~0.97-0.98", ">= 0.96", 0.96),
    },
    "isbi2012_em": {
        "pixel_error": Target("pixel error, fold-0 validation", "U-Net pixel error 0.0611 (challenge test set)",
                              "<= 0.0611", 0.0611, lower_is_better=True),
    },
    "msd_hippocampus": {
        "val": Target("mean Dice, fold-0 validation", "nnU-Net 5-fold CV 0.8975 / 0.8807 (anterior / posterior)",
                      ">= 0.87", 0.87),
    },
    "openkbp_hn_ct": {
        "val": Target("mean Dice of 7 organs, fold-0 validation", "(project target)", ">= 0.70", 0.70),
        "worst": Target("worst organ Dice, fold-0 validation", "(project target)", "> 0.5 every organ", 0.5,
                        strict=True),
    },
}


# --------------------------------------------------------------------------------------------------------
# scores computed here (no training needed; the test imports these)
# --------------------------------------------------------------------------------------------------------


def restrict_to_fov(reference, prediction, fov):
    """Reference and prediction with every pixel outside the field of view set to background (0)."""
    import numpy as np

    reference, prediction, fov = np.asarray(reference), np.asarray(prediction), np.asarray(fov)
    if not (reference.shape == prediction.shape == fov.shape):
        raise ValueError(f"shapes differ: reference {reference.shape}, prediction {prediction.shape}, "
                         f"fov {fov.shape}")
    inside = fov > 0
    return np.where(inside, reference, 0), np.where(inside, prediction, 0)


def fov_case_scores(reference, prediction, fov, *, labels: list[int], spacing_mm) -> dict[str, Any]:
    """Scores of one case inside its field of view.

    Dice, IoU, HD95, ... of each label via ``automedseg.metrics.compute_case_metrics`` on the FOV-restricted
    masks; the pixel counts tp/fp/fn per label (for a pooled Dice) and the pixel accuracy over FOV pixels only.
    """
    import numpy as np

    from automedseg.metrics import compute_case_metrics

    ref, pred = restrict_to_fov(reference, prediction, fov)
    inside = np.asarray(fov) > 0
    metrics = compute_case_metrics(ref, pred, labels=labels, spacing_mm=spacing_mm)
    counts = {}
    for k in labels:
        r, p = ref == k, pred == k
        counts[str(k)] = {"tp": int((r & p).sum()), "fp": int((~r & p).sum()), "fn": int((r & ~p).sum())}
    n_inside = int(inside.sum())
    correct = int((np.asarray(reference) == np.asarray(prediction))[inside].sum())
    return {
        "metrics": {str(k): {m: (None if isinstance(v, float) and math.isnan(v) else v) for m, v in d.items()}
                    for k, d in metrics.items()},
        "counts": counts,
        "fov_pixels": n_inside,
        "accuracy_in_fov": correct / n_inside if n_inside else None,
    }


def pooled_dice(counts: list[dict[str, int]]) -> float | None:
    """Dice of the summed tp/fp/fn of several cases (one label)."""
    tp = sum(c["tp"] for c in counts)
    fp = sum(c["fp"] for c in counts)
    fn = sum(c["fn"] for c in counts)
    return 2.0 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else None


def pixel_error(references, predictions) -> dict[str, Any]:
    """ISBI 2012 pixel error: 1 - pixel accuracy, pooled over all pixels of all pairs (label maps)."""
    import numpy as np

    wrong = total = 0
    for ref, pred in zip(references, predictions, strict=True):
        ref, pred = np.asarray(ref), np.asarray(pred)
        if ref.shape != pred.shape:
            raise ValueError(f"shapes differ: reference {ref.shape}, prediction {pred.shape}")
        wrong += int((ref != pred).sum())
        total += int(ref.size)
    return {"pixel_error": wrong / total if total else None, "pixels": total, "wrong_pixels": wrong}


def verdict(value: float | None, target: Target) -> str:
    """PASS or short against the target (n/a without a value)."""
    if value is None or target.threshold is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    diff = target.threshold - value if target.lower_is_better else value - target.threshold
    return "PASS" if (diff > 0 if target.strict else diff >= 0) else "short"


def budget_verdict(use: float | None) -> str:
    """PASS for 95-105 % of the budget, short below, over above (the trainer aims to end inside it)."""
    if use is None:
        return "n/a"
    return "short" if use < BUDGET_USE_TARGET else "over" if use > BUDGET_USE_OVER else "PASS"


def zero_pseudo_dice_classes(history: Sequence[EpochRecord], names: list[str]) -> list[str]:
    """Foreground classes whose pseudo-Dice was 0 (or undefined) in every logged epoch."""
    def zero(h: EpochRecord, i: int) -> bool:
        v = h.pseudo_dice[i] if i < len(h.pseudo_dice) else None
        return v is None or math.isnan(v) or v == 0

    return [name for i, name in enumerate(names) if history and all(zero(h, i) for h in history)]


def ema_gain_at_end(history: Sequence[EpochRecord], fraction: float = 0.2) -> float | None:
    """Rise of the EMA pseudo-Dice over the last ``fraction`` of the epochs (None with under 5 epochs)."""
    ema = [float(h.ema_pseudo_dice) for h in history
           if h.ema_pseudo_dice is not None and not math.isnan(h.ema_pseudo_dice)]
    if len(ema) < 5:
        return None
    k = max(1, int(round(len(ema) * fraction)))
    return ema[-1] - ema[-1 - k]


# --------------------------------------------------------------------------------------------------------
# running the CLI
# --------------------------------------------------------------------------------------------------------


class StepFailed(RuntimeError):
    """A CLI step exited with a non-zero status."""


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(thread_env(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("AUTOMEDSEG_WORK_DIR", None)
    return env


def run_cli(args: list[Any], *, log_path: Path, label: str, threads: int) -> dict:
    """Run ``automedseg ARGS`` (this checkout), time it, record other processes' CPU use; raise on failure."""
    cmd = [sys.executable, "-c", AUTOMEDSEG_CLI, *[str(a) for a in args]]
    print(f"[{label}] automedseg {' '.join(str(a) for a in args)}", flush=True)
    with heartbeat(label):
        res = run_timestamped(cmd, env=_env(threads), cwd=REPO_ROOT, log_path=log_path)
    lines = res.pop("lines")
    res["output_tail"] = "\n".join(text for _, text in lines[-15:])
    res["cmd"] = ["automedseg", *[str(a) for a in args]]
    print(f"  -> rc={res['returncode']} wall={res['wall_s']:.1f} s, other processes "
          f"{res['foreign_cpu']['foreign_cpu_fraction_of_one_core']:.2f} cores", flush=True)
    if res["returncode"] != 0:
        print("\n".join(text for _, text in lines[-30:]), flush=True)
        raise StepFailed(f"{label} failed (rc={res['returncode']}); log: {log_path}")
    return res


def _brief(res: dict) -> dict:
    return {k: res[k] for k in ("cmd", "wall_s", "returncode", "foreign_cpu", "log") if k in res}


# --------------------------------------------------------------------------------------------------------
# reading the work folder
# --------------------------------------------------------------------------------------------------------


def read_log(path: Path) -> list[EpochRecord]:
    """``log.jsonl`` epochs (``automedseg.training_log.read_training_log``); unreadable lines are skipped."""
    from automedseg.training_log import read_training_log

    return read_training_log(path, problems=[])


def _load_state(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_state(path: Path, state: dict) -> None:
    from automedseg.io import atomic_write_text

    atomic_write_text(path, json.dumps(state, indent=1, default=str) + "\n")


def find_mask(folder: Path, case: str) -> Path | None:
    """``folder/<case><ending>`` for the first supported ending that exists."""
    for ending in MASK_ENDINGS:
        p = folder / f"{case}{ending}"
        if p.is_file():
            return p
    return None


def _read_2d(path: Path):
    from automedseg.io import read_label

    arr, geom = read_label(path)
    return arr, geom


def plan_choice(plans_path: Path, configuration: str) -> dict:
    """What the plan chose for ``configuration`` (read with ``Plans.load``) and its notes."""
    from automedseg.plans import Plans

    plans = Plans.load(plans_path)
    cfg = plans.configuration(configuration)
    tr = cfg.training
    return {
        "plans_file": str(plans_path),
        "configuration": cfg.name,
        "dims": cfg.dims,
        "patch_size": list(cfg.patch_size),
        "batch_size": cfg.batch_size,
        "features_per_stage": list(cfg.network.features_per_stage),
        "architecture": cfg.network.architecture,
        "n_stages": len(cfg.network.features_per_stage),
        "spacing_mm": [round(float(s), 4) for s in cfg.spacing_mm],
        "median_shape": list(cfg.median_shape),
        "mirror_axes": list(cfg.augmentation.mirror_axes),
        "normalization": [n.scheme for n in cfg.normalization],
        "epochs": tr.epochs,
        "iterations_per_epoch": tr.iterations_per_epoch,
        "time_budget_s": tr.time_budget_s,
        "estimated_seconds_per_iteration": tr.estimated_seconds_per_iteration,
        "estimated_fold_seconds": tr.estimated_fold_seconds,
        "precision": tr.precision,
        "num_workers": tr.num_workers,
        "device": f"{plans.device.kind}: {plans.device.name}",
        "notes": list(cfg.notes),
        "label_names": {int(v): k for k, v in plans.labels.items()},
    }


def fold_figures(fold_dir: Path, configuration: str) -> dict:
    """Validation Dice (summary.json), epochs/iterations (log.jsonl) and the plan as trained, each read with its
    owner's typed reader."""
    from automedseg.validation_summary import read_validation_summary, summary_path

    try:
        summary = read_validation_summary(summary_path(fold_dir))
    except FileNotFoundError:
        summary = None
    history = read_log(fold_dir / "log.jsonl")
    plan = plan_choice(fold_dir / "plans.json", configuration)
    names = plan["label_names"]
    fg_values = sorted(v for v in names if v > 0)
    dice = {}
    for k, v in (summary.dice_per_class if summary else {}).items():
        dice[names.get(int(k), str(k))] = v
    iterations = int(sum(h.iterations or 0 for h in history))
    return {
        "fold_dir": str(fold_dir),
        "finished": (fold_dir / "checkpoint_final.pt").is_file(),
        "validated": summary is not None,
        "val_cases": list(summary.cases) if summary else None,
        "val_mean_dice": summary.mean_dice if summary else None,
        "val_dice_per_class": dice,
        "validation_s": summary.seconds if summary else None,
        "epochs": len(history),
        "iterations": iterations,
        "samples": iterations * plan["batch_size"],
        "epoch_train_seconds": round(float(sum(h.epoch_seconds for h in history)), 1),
        "final_ema_pseudo_dice": history[-1].ema_pseudo_dice if history else None,
        "final_lr": history[-1].lr if history else None,
        "ema_gain_last_20pct_epochs": ema_gain_at_end(history),
        "zero_pseudo_dice_classes": zero_pseudo_dice_classes(history, [names[v] for v in fg_values]),
        "data_wait_fraction_mean": (round(sum(h.data_wait_fraction or 0.0 for h in history) / len(history), 3)
                                    if history else None),
        "plan": plan,
    }


def postprocessed_figures(find_best_json: Path, names: dict[int, str]) -> dict | None:
    """Fold-0 validation Dice before and after the post-processing find-best chose on it (typed reader)."""
    from automedseg.best_choice import read_find_best

    try:
        pp = read_find_best(find_best_json).best.postprocessing
    except (OSError, ValueError):
        return None
    if pp is None or not pp.dice_after:
        return None
    after = {names.get(int(k), k): v for k, v in pp.dice_after.items() if k != "mean"}
    ops = [f"keep the largest component of {', '.join(names.get(v, str(v)) for v in pp.keep_largest_labels)}"
           if pp.keep_largest_labels else "",
           "keep the largest foreground component" if pp.keep_largest_foreground else "",
           f"remove components under {pp.min_voxels} voxels" if pp.min_voxels else ""]
    ops += dataclasses.replace(pp, keep_largest_foreground=False, keep_largest_labels=(),
                               min_voxels={}).as_postprocessing().operations()  # mm^3, opening, closing, holes
    return {"mean_dice": pp.dice_after.get("mean"), "dice_per_class": after,
            "operations": "; ".join(o for o in ops if o) or "none"}


# --------------------------------------------------------------------------------------------------------
# one dataset
# --------------------------------------------------------------------------------------------------------


def _budget_of(plans_path: Path, configuration: str | None = None) -> float | None:
    from automedseg.plans import Plans

    try:
        plans = Plans.load(plans_path)
        cfgs = [plans.configuration(configuration)] if configuration else list(plans.configurations.values())
    except Exception:  # noqa: BLE001 - an unreadable plan simply is not reused
        return None
    budgets = {c.training.time_budget_s for c in cfgs}
    return budgets.pop() if len(budgets) == 1 else None


def _plan_reusable(work: Path, budget_s: float) -> bool:
    from automedseg.plans import Plans
    from automedseg.preprocessing import complete_cases
    from automedseg.workspace import Workspace

    ws = Workspace(work)
    if not ws.plans_path.is_file():
        return False
    b = _budget_of(ws.plans_path)
    if b is None or abs(b - budget_s) > 0.5:
        return False
    try:
        plans = Plans.load(ws.plans_path)
        for cfg in plans.configurations.values():
            complete_cases(ws.preprocessed_dir(cfg.data_identifier), plans, cfg)
    except Exception:  # noqa: BLE001
        return False
    return True


def _choose_configuration(plans_path: Path) -> str:
    from automedseg.plans import Plans

    names = list(Plans.load(plans_path).configurations)
    for name in ("3d_fullres", "2d"):
        if name in names:
            return name
    return names[0]


def score_drive_test(raw: Path, predictions: Path, labels: list[int]) -> dict:
    """FOV-restricted scores of the test predictions (per case and summarised)."""
    import numpy as np

    per_case = []
    missing = []
    for ref_path in sorted(p for p in (raw / "labelsTs").iterdir() if not p.name.startswith(".")):
        case = ref_path.name.split(".")[0]
        pred_path = find_mask(predictions, case)
        fov_path = find_mask(raw / "fovTs", case)
        if pred_path is None or fov_path is None:
            missing.append(case)
            continue
        ref, geom = _read_2d(ref_path)
        pred, _ = _read_2d(pred_path)
        fov, _ = _read_2d(fov_path)
        scores = fov_case_scores(ref[0], pred[0], fov[0], labels=labels, spacing_mm=geom.spacing_zyx[1:])
        per_case.append({"case": case, **scores})
    dice = {str(k): [c["metrics"][str(k)]["dice"] for c in per_case] for k in labels}
    return {
        "n_cases": len(per_case),
        "missing": missing,
        "dice_mean_per_label": {k: float(np.mean(v)) if v else None for k, v in dice.items()},
        "dice_pooled_per_label": {str(k): pooled_dice([c["counts"][str(k)] for c in per_case]) for k in labels},
        "accuracy_in_fov_mean": float(np.mean([c["accuracy_in_fov"] for c in per_case])) if per_case else None,
        "per_case": per_case,
    }


def score_pixel_error(raw: Path, fold_dir: Path, cases: list[str]) -> dict:
    """Pixel error of the fold's validation masks against the imported training labels."""
    refs, preds, missing = [], [], []
    for case in cases:
        pred_path = find_mask(fold_dir / "validation", case)
        ref_path = find_mask(raw / "labelsTr", case)
        if pred_path is None or ref_path is None:
            missing.append(case)
            continue
        refs.append(_read_2d(ref_path)[0])
        preds.append(_read_2d(pred_path)[0])
    out = pixel_error(refs, preds)
    out.update({"n_cases": len(refs), "missing": missing})
    return out


def slice_extent_scores(reference, prediction, *, label: int) -> dict[str, Any]:
    """How much of a class's Dice the length of its reference decides: the reference's first and last slice
    (axis 0) holding ``label``, the Dice over the whole volume, and the Dice within the slices the reference
    covers (false positives above and below its extent left out).

    Example:
        >>> import numpy as np
        >>> ref = np.zeros((6, 2, 2), np.uint8); ref[1:3] = 5
        >>> pred = np.zeros_like(ref); pred[1:5] = 5
        >>> s = slice_extent_scores(ref, pred, label=5)
        >>> s["reference_slices"], round(s["dice"], 3), s["dice_within_reference_slices"]
        ([1, 2], 0.667, 1.0)
    """
    import numpy as np

    r, p = np.asarray(reference) == label, np.asarray(prediction) == label
    z = np.flatnonzero(r.reshape(r.shape[0], -1).any(1))
    denom = int(r.sum() + p.sum())
    out: dict[str, Any] = {"reference_slices": [int(z[0]), int(z[-1])] if len(z) else None,
                           "dice": 2 * int((r & p).sum()) / denom if denom else None,
                           "dice_within_reference_slices": None}
    if len(z):
        rs, ps = r[z[0]:z[-1] + 1], p[z[0]:z[-1] + 1]
        out["dice_within_reference_slices"] = 2 * int((rs & ps).sum()) / int(rs.sum() + ps.sum())
    return out


def score_slice_extent(raw: Path, validated: Sequence[tuple[Path, Sequence[str]]], *, label: int) -> dict | None:
    """:func:`slice_extent_scores` of one class over 3D validation cases (``(fold folder, its cases)`` pairs): the
    spread of the reference's length in slices and the mean Dice within the reference's slices beside the plain
    mean."""
    import numpy as np

    from automedseg.io import read_label

    per_case = []
    for fold_dir, case in ((fd, c) for fd, cases in validated for c in cases):
        pred_path = find_mask(fold_dir / "validation", case)
        ref_path = find_mask(raw / "labelsTr", case)
        if pred_path is None or ref_path is None:
            continue
        ref, _ = read_label(ref_path)
        pred, _ = read_label(pred_path)
        if ref.ndim != 3 or ref.shape != pred.shape:
            return None
        per_case.append({"case": case, **slice_extent_scores(ref, pred, label=label)})
    scored = [c for c in per_case if c["reference_slices"] and c["dice"] is not None]
    if not scored:
        return None
    lengths = [c["reference_slices"][1] - c["reference_slices"][0] + 1 for c in scored]
    return {"label": label, "per_case": per_case, "reference_length_slices": [min(lengths), max(lengths)],
            "dice_mean": float(np.mean([c["dice"] for c in scored])),
            "dice_within_reference_slices_mean": float(np.mean([c["dice_within_reference_slices"] for c in scored]))}


@dataclass
class _FoldContext:
    """What training one fold of a dataset needs (run_dataset's state, shared by its folds)."""

    name: str
    raw: Path
    work: Path
    configuration: str
    budget: str
    budget_s: float
    threads: int
    keep: bool
    state: dict
    state_path: Path
    logs: Path
    steps: dict


def _train_fold(ctx: _FoldContext, fold: int) -> tuple[dict, bool]:
    """Train one fold with the budget (or reuse it with --keep); its figures and whether it was trained now.

    Fold 0 keeps the state key and log names of the fold-0-only benchmark (``train``, ``train_N.log``)."""
    key, log_stem = ("train", "train") if fold == 0 else (f"train_fold_{fold}", f"train_f{fold}")
    configuration, budget_s, state = ctx.configuration, ctx.budget_s, ctx.state
    fold_dir = ctx.work / configuration / f"fold_{fold}"
    fold_budget = _budget_of(fold_dir / "plans.json", configuration) if (fold_dir / "plans.json").is_file() \
        else None
    same_budget = fold_budget is not None and abs(fold_budget - budget_s) <= 0.5
    finished = (fold_dir / "checkpoint_final.pt").is_file() and (fold_dir / "validation" / "summary.json").is_file()
    trained_now = False
    train_state = state.get(key) if isinstance(state.get(key), dict) else {}
    if ctx.keep and finished and same_budget:
        ctx.steps[key] = {"reused": str(fold_dir)}
        if train_state.get("configuration") != configuration or \
                abs((train_state.get("budget_s") or -1) - budget_s) > 0.5:
            train_state = {}  # trained outside this script: its wall time is unknown
    else:
        restart = not (ctx.keep and same_budget and (fold_dir / "checkpoint_latest.pt").is_file())
        if restart or train_state.get("configuration") != configuration or \
                abs((train_state.get("budget_s") or -1) - budget_s) > 0.5:
            train_state = {"configuration": configuration, "budget_s": budget_s, "runs": []}
        args = ["train", ctx.raw, "--work-dir", ctx.work, "-c", configuration, "-f", fold, "--time-budget",
                ctx.budget, "--threads", ctx.threads]
        if restart:
            args.append("--restart")
        state[key] = train_state
        res = run_cli(args, log_path=ctx.logs / f"{log_stem}_{len(train_state['runs'])}.log",
                      label=f"{ctx.name} train fold {fold}", threads=ctx.threads)
        train_state["runs"].append({**_brief(res), "restart": restart})
        _save_state(ctx.state_path, state)
        ctx.steps[key] = _brief(res)
        trained_now = True
    runs = train_state.get("runs") or []
    train_wall = sum(r["wall_s"] for r in runs) if runs else None
    foreign_s = sum(r["foreign_cpu"]["foreign_cpu_s"] for r in runs) if runs else None
    fig = fold_figures(fold_dir, configuration)
    fig.update({
        "fold": fold,
        "train_runs": runs,
        "train_wall_s": train_wall,
        "budget_use": train_wall / budget_s if train_wall is not None else None,
        "foreign_cpu_cores_during_train": foreign_s / train_wall if train_wall else None,
    })
    return fig, trained_now


def cv_figures(fold_dirs: list[Path], names: dict[int, str]) -> dict | None:
    """Cross-validation figures from the folds' validation summaries (typed reader): per class the mean Dice over
    every validated case of every fold (nnU-Net's CV figure), and their mean over the classes; None when a fold
    has no summary."""
    import numpy as np

    from automedseg.validation_summary import read_validation_summary, summary_path

    per_class: dict[str, list[float]] = {}
    cases: list[str] = []
    for fd in fold_dirs:
        try:
            summary = read_validation_summary(summary_path(fd))
        except FileNotFoundError:
            return None
        for c in summary.per_case:
            cases.append(c["case"])
            for k, m in c["metrics"].items():
                if m.get("dice") is not None:
                    per_class.setdefault(names.get(int(k), str(k)), []).append(float(m["dice"]))
    dice = {k: float(np.mean(v)) for k, v in per_class.items()}
    return {"folds": len(fold_dirs), "n_cases": len(cases), "dice_per_class": dice,
            "mean_dice": float(np.mean(list(dice.values()))) if dice else None}


def run_dataset(spec: DatasetSpec, *, data_root: Path, work_root: Path, budget: str, budget_s: float, threads: int,
                keep: bool, cv: bool = False, first_folds: tuple[int, ...] = ()) -> dict:
    """Import (2D), plan, train fold 0 (with ``cv`` all five folds, each with the budget; ``first_folds`` before
    the others), predict + score the test set where labelled; the figures of one dataset."""
    source = data_root / spec.folder
    result: dict[str, Any] = {"dataset": spec.name, "source": str(source), "budget": budget, "budget_s": budget_s,
                              "notes": list(spec.notes), "steps": {}, "cross_validated": cv}
    if not source.is_dir():
        result["skipped"] = f"{source} does not exist"
        print(f"[{spec.name}] skipped: {result['skipped']}", flush=True)
        return result
    base = work_root / spec.name
    base.mkdir(parents=True, exist_ok=True)
    logs = base / LOG_DIR
    state_path = base / STATE_FILE
    state = _load_state(state_path)
    steps = result["steps"]
    work = base / "work"
    result["work_dir"] = str(work)
    try:
        # 1. import
        if spec.import_args is not None:
            raw = base / "raw"
            if keep and (raw / "dataset.json").is_file() and (raw / "import_report.json").is_file():
                steps["import"] = {"reused": str(raw)}
            else:
                args = ["import", source, "-o", raw,
                        *[a.replace("{data}", str(data_root)) for a in spec.import_args], "--overwrite"]
                steps["import"] = _brief(run_cli(args, log_path=logs / "import.log", label=f"{spec.name} import",
                                                 threads=threads))
        else:
            raw = source
        result["raw"] = str(raw)

        # 2. plan
        if keep and _plan_reusable(work, budget_s):
            steps["plan"] = {"reused": str(work / "plans.json")}
        else:
            args = ["plan", raw, "--work-dir", work, "--time-budget", budget, "--threads", threads]
            steps["plan"] = _brief(run_cli(args, log_path=logs / "plan.log", label=f"{spec.name} plan",
                                           threads=threads))
        configuration = _choose_configuration(work / "plans.json")
        result["configuration"] = configuration
        from automedseg.plans import Plans

        result["planned_configurations"] = list(Plans.load(work / "plans.json").configurations)

        # 3. train fold 0 (and, for a cross-validated dataset, folds 1-4)
        ctx = _FoldContext(name=spec.name, raw=raw, work=work, configuration=configuration, budget=budget,
                           budget_s=budget_s, threads=threads, keep=keep, state=state, state_path=state_path,
                           logs=logs, steps=steps)
        for k in first_folds if cv else ():  # e.g. a fold that failed before: its answer first (reused below)
            _train_fold(ctx, k)
        fig, trained_now = _train_fold(ctx, FOLD)
        fold_dir = work / configuration / f"fold_{FOLD}"
        result["fold0"] = fig
        labels = sorted(v for v in fig["plan"]["label_names"] if v > 0)

        folds = [FOLD]
        if cv:
            result["cv_folds"] = [fig] + [_train_fold(ctx, k)[0] for k in range(1, N_FOLDS)]
            folds = list(range(N_FOLDS))
            result["cv"] = cv_figures([work / configuration / f"fold_{k}" for k in folds], fig["plan"]["label_names"])

        # 3b. the post-processing find-best chooses on the validation of the folds trained (as nnU-Net's CV)
        if fig["validated"]:
            fold_args = [a for k in folds for a in ("-f", k)]
            steps["find_best"] = _brief(run_cli(["find-best", raw, "--work-dir", work, "-c", configuration,
                                                 *fold_args], log_path=logs / "find_best.log",
                                                label=f"{spec.name} find-best", threads=threads))
            result["postprocessed"] = postprocessed_figures(work / "find_best.json", fig["plan"]["label_names"])

        # 4. the labelled test set
        if spec.test_set:
            pred_dir = base / "predictions_fold0"
            args = ["predict", "-i", raw / "imagesTs", "-o", pred_dir, "-d", raw, "--work-dir", work,
                    "-c", configuration, "-f", FOLD, "--threads", threads]
            # predictions of another model (a run killed between train and predict) are never kept
            model_stamp = (fold_dir / "checkpoint_final.pt").stat().st_mtime_ns
            if not keep or trained_now or state.get("predict_model_stamp") != model_stamp:
                args.append("--overwrite")
            steps["predict"] = _brief(run_cli(args, log_path=logs / "predict.log", label=f"{spec.name} predict",
                                              threads=threads))
            state["predict_model_stamp"] = model_stamp
            _save_state(state_path, state)
            eval_dir = base / "evaluate_full_image"
            steps["evaluate"] = _brief(run_cli(["evaluate", raw / "labelsTs", pred_dir, "-o", eval_dir],
                                               log_path=logs / "evaluate.log", label=f"{spec.name} evaluate",
                                               threads=threads))
            from automedseg.metrics import METRICS_SUMMARY_FILE, read_metrics_summary

            full = read_metrics_summary(eval_dir / METRICS_SUMMARY_FILE)
            test: dict[str, Any] = {
                "n_cases": full.n_cases,
                "full_image_dice_per_label": full.metric_per_label("dice"),
                "full_image_missing_predictions": list(full.missing_predictions),
            }
            if (raw / "fovTs").is_dir():
                test["fov"] = score_drive_test(raw, pred_dir, labels)
            result["test"] = test

        # 4b. the worst class of a 3D dataset: how much its reference's length in slices decides
        scored = (result.get("cv") or {}).get("dice_per_class") or fig["val_dice_per_class"]
        if fig["validated"] and scored and fig["plan"].get("dims") == 3:
            worst_name = min((v, k) for k, v in scored.items() if v is not None)[1]
            value = next((v for v, n in fig["plan"]["label_names"].items() if n == worst_name), None)
            if value is not None:
                validated = [(Path(f["fold_dir"]), list(f["val_cases"] or []))
                             for f in result.get("cv_folds") or [fig]]
                result["worst_class_extent"] = score_slice_extent(raw, validated, label=value)

        # 5. ISBI pixel error on the fold-0 validation
        if spec.pixel_error and fig["val_cases"]:
            result["pixel_error"] = score_pixel_error(raw, fold_dir, list(fig["val_cases"]))
    except StepFailed as e:
        result["failed"] = str(e)
    except Exception as e:  # noqa: BLE001 - one dataset's bug must not lose the others' figures
        result["failed"] = f"{type(e).__name__}: {e}"
        print(f"[{spec.name}] failed: {result['failed']}", flush=True)
    return result


# --------------------------------------------------------------------------------------------------------
# figures against targets, and the report
# --------------------------------------------------------------------------------------------------------


def _why_short(r: dict, extra: list[str] | None = None) -> list[str]:
    """Measured facts that may explain a short figure."""
    f = r.get("fold0") or {}
    budget_s = r.get("budget_s")
    why = list(extra or [])
    use = f.get("budget_use")
    if use is not None and (use < BUDGET_USE_TARGET or use > BUDGET_USE_OVER):
        why.append(f"train used {100 * use:.0f} % of the budget")
    if f.get("zero_pseudo_dice_classes"):
        why.append(f"pseudo-Dice 0 in every epoch: {', '.join(f['zero_pseudo_dice_classes'])}")
    gain = f.get("ema_gain_last_20pct_epochs")
    if gain is not None and gain > 0.005:
        why.append(f"EMA pseudo-Dice still rising (+{gain:.3f} over the last 20 % of epochs)")
    val_s = f.get("validation_s")
    if val_s is not None and budget_s and val_s > 0.2 * budget_s:
        why.append(f"final validation took {val_s:.0f} s ({100 * val_s / budget_s:.0f} % of the budget)")
    if f.get("epochs") is not None:
        why.append(f"epochs: {f['epochs']}, iterations: {f['iterations']} x batch {f['plan']['batch_size']}")
    foreign = f.get("foreign_cpu_cores_during_train")
    if foreign is not None and foreign > 0.2:
        why.append(f"other processes used {foreign:.2f} cores during training")
    return why


def figure_rows(r: dict) -> list[dict]:
    """One row per figure of a dataset: measured value, published figure, target, PASS/short, why short."""
    name = r["dataset"]
    targets = TARGETS.get(name, {})
    if r.get("skipped") or (r.get("failed") and not r.get("fold0")):
        status = f"skipped: {r['skipped']}" if r.get("skipped") else f"failed: {r['failed']}"
        return [{"dataset": name, "figure": t.figure, "value": None, "published": t.published, "target": t.target,
                 "status": status, "why_short": ""} for t in targets.values()]
    f = r["fold0"]
    rows: list[dict] = []

    def add(key: str | None, figure: str, value: float | None, extra_why: list[str] | None = None,
            published: str = "", target_text: str = "") -> None:
        t = targets.get(key) if key else None
        status = verdict(value, t) if t else "(info)"
        rows.append({"dataset": name, "figure": t.figure if t else figure, "value": value,
                     "published": t.published if t else published, "target": t.target if t else target_text,
                     "status": status, "why_short": "; ".join(_why_short(r, extra_why)) if status == "short" else ""})

    val_note = [f"{len(f['val_cases'] or [])} validation cases"]
    dice = f.get("val_dice_per_class") or {}
    if name == "drive":
        fov = (r.get("test") or {}).get("fov") or {}
        value = (fov.get("dice_mean_per_label") or {}).get("1")
        add("test_fov", "", value, [f"{fov.get('n_cases', 0)} test cases"])
        add(None, "vessel Dice, test set, inside FOV, pooled over pixels",
            (fov.get("dice_pooled_per_label") or {}).get("1"))
        add(None, "pixel accuracy, test set, inside FOV", fov.get("accuracy_in_fov_mean"))
        add(None, "vessel Dice, test set, whole image",
            ((r.get("test") or {}).get("full_image_dice_per_label") or {}).get("1"))
        add(None, "vessel Dice, fold-0 validation, whole image", f.get("val_mean_dice"))
    elif name == "hc18":
        add("val", "", dice.get("head", f.get("val_mean_dice")), val_note)
    elif name == "isbi2012_em":
        pe = (r.get("pixel_error") or {}).get("pixel_error")
        add("pixel_error", "", pe, val_note + ["published figure is on the challenge's test slices"])
        add(None, "membrane Dice, fold-0 validation", dice.get("membrane", f.get("val_mean_dice")))
    elif name == "msd_hippocampus":
        add("val", "", f.get("val_mean_dice"), val_note)
        for cls, pub in (("Anterior", "0.8975"), ("Posterior", "0.8807")):
            if cls in dice:
                add(None, f"{cls} Dice, fold-0 validation", dice[cls], published=f"nnU-Net 5-fold CV {pub}")
    elif name == "openkbp_hn_ct":
        cv = r.get("cv")
        if cv:  # the targets on the cross-validation, fold 0 beside it
            for k, v in dice.items():
                add(None, f"{k} Dice, fold-0 validation", v)
            dice = cv["dice_per_class"]
            val_note = [f"{cv['folds']}-fold CV, {cv['n_cases']} cases"]
        low = [f"{k} {v:.3f}" for k, v in dice.items() if v is not None and v <= 0.5]
        mean = cv["mean_dice"] if cv else f.get("val_mean_dice")
        add("val", "", mean, val_note + ([f"organs <= 0.5: {', '.join(low)}"] if low else []))
        if cv:
            rows[-1]["figure"] = rows[-1]["figure"].replace("fold-0 validation", f"{cv['folds']}-fold CV")
            for k, v in dice.items():
                add(None, f"{k} Dice, {cv['folds']}-fold CV ({cv['n_cases']} cases)", v)
        if dice:
            worst = min((v, k) for k, v in dice.items() if v is not None)
            add("worst", "", worst[0], val_note + [f"worst: {worst[1]}"] + ([f"organs <= 0.5: {', '.join(low)}"]
                                                                             if low else []))
            rows[-1]["figure"] += f" ({worst[1]})"
            if cv:
                rows[-1]["figure"] = rows[-1]["figure"].replace("fold-0 validation", f"{cv['folds']}-fold CV")
            ext = r.get("worst_class_extent")
            if ext:
                lo, hi = ext["reference_length_slices"]
                add(None, f"{worst[1]} Dice within the slices its reference covers "
                          f"({'cross-validation' if cv else 'fold-0 validation'})",
                    ext["dice_within_reference_slices_mean"],
                    target_text=f"reference length {lo}-{hi} slices across the cases; whole-volume Dice "
                                f"{ext['dice_mean']:.3f}")
    else:
        add(None, "mean Dice, fold-0 validation", f.get("val_mean_dice"))
    pp = r.get("postprocessed")
    if pp and pp.get("mean_dice") is not None:
        low = [f"{k} {v:.3f}" for k, v in pp["dice_per_class"].items() if v is not None and v <= 0.5]
        where = f"{r['cv']['folds']}-fold CV" if r.get("cv") else "fold-0 validation"
        add(None, f"mean Dice, {where} after find-best's post-processing (chosen on the same cases)",
            pp["mean_dice"], target_text=f"{pp['operations']}" + (f"; <= 0.5: {', '.join(low)}" if low else ""))
    if r.get("failed"):
        for row in rows:
            row["status"] += f" (a later step failed: {r['failed']})"
    return rows


def _fmt(v: object, nd: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _shape(v: list) -> str:
    return "x".join(str(int(x)) if float(x).is_integer() else f"{x:g}" for x in v)


def build_summary(figures: dict) -> str:
    m = figures["machine"]
    lines = [
        "# shared_datasets: automedseg fold 0 on every shared dataset, next to published figures"
        + ("; 5-fold CV of " + ", ".join(r["dataset"] for r in figures["datasets"] if r.get("cv"))
           if any(r.get("cv") for r in figures["datasets"]) else ""),
        "",
        f"Budget per dataset: `--time-budget {figures['budget']}` ({figures['budget_s']:.0f} s) for `plan` and "
        f"`train` fold 0 (default options otherwise), {figures['threads']} threads; datasets run one after the "
        f"other. Data: `{figures['data_root']}`.",
        f"Machine: {m['cpu_model']}, {m['cpu_count_usable']} usable cores, {m['memory_total_gib']} GiB; python "
        f"{m['python']}, torch {m['torch']}, automedseg {m['automedseg']}.",
        "",
        "## Figures against published ones",
        "",
        md_table(["dataset", "figure", "automedseg", "published", "target", "status", "why short"],
                 [[r["dataset"], r["figure"], _fmt(r["value"]), r["published"], r["target"], r["status"],
                   r["why_short"]] for r in figures["rows"]]),
        "",
        "Published figures come from other splits (challenge test sets, 5-fold CV) and far longer training; "
        "they are references, not like-for-like comparisons. 'why short' lists what this run measured.",
        "",
        "## Budget use and what the plan chose",
        "",
    ]
    rows = []
    for r, f in ((d, g) for d in figures["datasets"] for g in (d.get("cv_folds") or [d.get("fold0")])):
        if not f:
            rows.append([r["dataset"], r.get("skipped") and "skipped" or "failed", "", "", "", "", "", "", "", "",
                         ""])
            continue
        p = f["plan"]
        use = f.get("budget_use")
        rows.append([
            r["dataset"] + (f" fold {f.get('fold', 0)}" if r.get("cv_folds") else ""), p["configuration"],
            f"{_fmt(f.get('train_wall_s'), 0)} / {figures['budget_s']:.0f} s",
            f"{100 * use:.1f} % {budget_verdict(use)}" if use is not None else "n/a",
            f"{f['epochs']} x {p['iterations_per_epoch']}", f["iterations"],
            f"{p['batch_size']} x {_shape(p['patch_size'])}", "-".join(str(w) for w in p["features_per_stage"]),
            _shape(p["spacing_mm"]), ",".join(str(a) for a in p["mirror_axes"]) or "none",
            _fmt(f.get("foreign_cpu_cores_during_train"), 2),
        ])
    lines += [
        md_table(["dataset", "configuration", "train wall / budget", "use (target 95-105 %)",
                  "epochs x it./epoch", "iterations", "batch x patch", "features", "spacing (mm)", "mirror axes",
                  "other processes (cores)"], rows),
        "",
        "Train wall time: the `automedseg train` process (start-up, training, final validation) summed over its "
        "runs for this budget; epochs and iterations from `fold_0/log.jsonl` (the last epoch is cut short to land "
        "in the budget); plan from the fold's `plans.json` (the plan as trained).",
        "",
        "## Per dataset",
        "",
    ]
    for r in figures["datasets"]:
        lines.append(f"### {r['dataset']}")
        lines.append("")
        if r.get("skipped"):
            lines += [f"Skipped: {r['skipped']}.", ""]
            continue
        if r.get("failed"):
            lines += [f"Failed: {r['failed']}", ""]
        f = r.get("fold0")
        for n in r.get("notes") or []:
            lines.append(f"- {n}")
        if f:
            p = f["plan"]
            dice = ", ".join(f"{k}: {_fmt(v)}" for k, v in (f.get("val_dice_per_class") or {}).items())
            lines += [
                f"- planned configurations: {', '.join(r.get('planned_configurations') or [])}; trained "
                f"`{p['configuration']}` ({p['architecture']}, {p['n_stages']} stages, normalisation "
                f"{', '.join(p['normalization'])}, {p['precision'] or 'n/a'}); device {p['device']}",
                f"- fold-0 validation ({len(f['val_cases'] or [])} cases): mean Dice {_fmt(f.get('val_mean_dice'))}"
                f" ({dice}); final EMA pseudo-Dice {_fmt(f.get('final_ema_pseudo_dice'))}; validation "
                f"{_fmt(f.get('validation_s'), 0)} s",
                f"- schedule as trained: epochs {p['epochs']} x {p['iterations_per_epoch']} iterations; ran "
                f"{f['epochs']} epoch(s), {f['iterations']} iterations ({f['samples']} samples); sum of epoch times "
                f"{f['epoch_train_seconds']} s; mean data wait {_fmt(f.get('data_wait_fraction_mean'), 3)}",
            ]
            if r.get("cv"):
                cv = r["cv"]
                per_fold = ", ".join(f"fold {g.get('fold')}: {_fmt(g.get('val_mean_dice'))}"
                                     for g in r.get("cv_folds") or [])
                lines.append(f"- {cv['folds']}-fold CV ({cv['n_cases']} cases, each fold with the budget): mean Dice "
                             f"{_fmt(cv['mean_dice'])} ("
                             + ", ".join(f"{k}: {_fmt(v)}" for k, v in cv["dice_per_class"].items())
                             + f"); per fold: {per_fold}")
            ext = r.get("worst_class_extent")
            if ext:
                lines.append(f"- worst class ({f['plan']['label_names'].get(ext['label'], ext['label'])}): reference "
                             f"length {ext['reference_length_slices'][0]}-{ext['reference_length_slices'][1]} slices; "
                             f"Dice {_fmt(ext['dice_mean'])} over the volume, "
                             f"{_fmt(ext['dice_within_reference_slices_mean'])} within the reference's slices")
            if f.get("zero_pseudo_dice_classes"):
                lines.append(f"- pseudo-Dice 0 in every epoch: {', '.join(f['zero_pseudo_dice_classes'])}")
            lines.append("- plan notes:")
            lines += [f"  - {n}" for n in p["notes"]] or ["  - (none)"]
        if r.get("test", {}).get("fov"):
            fov = r["test"]["fov"]
            lines.append(
                f"- test set inside FOV ({fov['n_cases']} cases): Dice mean {_fmt(fov['dice_mean_per_label'].get('1'))}"
                f", pooled {_fmt(fov['dice_pooled_per_label'].get('1'))}, accuracy "
                f"{_fmt(fov['accuracy_in_fov_mean'])}; whole image Dice "
                f"{_fmt(r['test']['full_image_dice_per_label'].get('1'))}")
        if r.get("pixel_error"):
            pe = r["pixel_error"]
            lines.append(f"- pixel error on {pe['n_cases']} validation slices: {_fmt(pe['pixel_error'])} "
                         f"({pe['wrong_pixels']} of {pe['pixels']} pixels)")
        lines.append("")
    lines += [
        "Scores: fold-0 `validation/summary.json` (`dice_per_class`: mean over cases; `mean_dice`: over classes). "
        "DRIVE test: `automedseg predict` with fold 0 (test-time mirroring on, no post-processing), scored here "
        "with `automedseg.metrics.compute_case_metrics` after setting reference and prediction to background "
        "outside the FOV mask (Dice per case, then the mean; 'pooled' sums TP/FP/FN over all images); whole-image "
        "figures from `automedseg evaluate`. ISBI pixel error: 1 - pixel accuracy of the validation masks against "
        "the imported labels, pooled over the slices.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help=f"comma-separated subset of {', '.join(DATASETS)} (default: all)")
    parser.add_argument("--budget", default="20m", help="--time-budget of plan and train fold 0 (default 20m)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="folder holding the shared datasets (default ../shared/data from the repo root, or "
                             "from the main checkout of a git worktree)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help="imports, work folders, predictions and logs (default benchmarks/work/shared)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help="where shared_datasets.{json,md} go (default benchmarks/results)")
    parser.add_argument("--threads", type=int, default=BENCH_THREADS, help="torch threads (default 2)")
    parser.add_argument("--cv", default="",
                        help="comma-separated datasets to cross-validate: all five folds, each with the budget "
                             "(their targets are then scored on the CV)")
    parser.add_argument("--first-folds", default="",
                        help="comma-separated folds of a --cv dataset to train before the others (e.g. one that "
                             "failed before, to see it first); with --keep they are then reused")
    parser.add_argument("--keep", action="store_true",
                        help="reuse finished steps (import, plan and fold 0 with the same budget, predictions)")
    args = parser.parse_args(argv)

    from automedseg.cli import parse_duration

    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown or not names:
        parser.error(f"--datasets: unknown {', '.join(unknown) or '(empty)'}; known: {', '.join(DATASETS)}")
    cv_names = {n.strip() for n in args.cv.split(",") if n.strip()}
    if cv_names - set(names):
        parser.error(f"--cv: {', '.join(sorted(cv_names - set(names)))} not among --datasets")
    try:
        budget_s = parse_duration(args.budget)
    except Exception as e:  # noqa: BLE001 - click's BadParameter
        parser.error(f"--budget: {e}")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    try:
        first_folds = tuple(int(k) for k in args.first_folds.split(",") if k.strip())
    except ValueError:
        parser.error(f"--first-folds: not a list of fold numbers: {args.first_folds!r}")
    if any(not 0 <= k < N_FOLDS for k in first_folds):
        parser.error(f"--first-folds: folds are 0-{N_FOLDS - 1}")
    if first_folds and not args.keep:
        parser.error("--first-folds needs --keep (the folds trained first are reused in their turn)")
    os.environ.update(thread_env(args.threads))
    data_root = (args.data_root or default_data_root()).resolve()
    work_root = args.work_dir.resolve()
    work_root.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    results = []
    for name in names:
        print(f"=== {name} ===", flush=True)
        results.append(run_dataset(DATASETS[name], data_root=data_root, work_root=work_root, budget=args.budget,
                                   budget_s=budget_s, threads=args.threads, keep=args.keep,
                                   cv=name in cv_names, first_folds=first_folds))
    rows = [row for r in results for row in figure_rows(r)]
    figures = {
        "benchmark": BENCHMARK,
        "budget": args.budget,
        "budget_s": budget_s,
        "threads": args.threads,
        "keep": args.keep,
        "data_root": str(data_root),
        "work_dir": str(work_root),
        "wall_s": round(time.perf_counter() - t0, 1),
        "machine": machine_info(),
        "rows": rows,
        "datasets": results,
    }
    summary = build_summary(figures)
    json_path, md_path = write_results(BENCHMARK, figures, summary, results_dir=args.results_dir)
    print(summary)
    print(f"\nwrote {json_path} and {md_path}")
    return 1 if any(r.get("failed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
