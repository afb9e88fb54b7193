"""Site shift: Dice of a hippocampus model on images from a simulated other site, before and after adaptation.

Data: MSD Task04 hippocampus (``labelsTr``: 210 labelled cases, labels 1 anterior and 2 posterior). A seeded
permutation holds back ``--test-cases`` cases (default 40) as the test set and ``--target-pool`` more (default 20)
as the new site's labelled cases; the source model is trained on the rest only (an nnU-Net-layout copy made of
symbolic links).

Site shift: one fixed, seeded :class:`SiteShift` applied to every held-back image: an intensity non-linearity
(a power ``gamma`` of the intensities scaled by the image's 99.5th nonzero percentile, so each image keeps its
range) and then a smooth multiplicative bias field (a few low-frequency cosines in normalised image coordinates,
the same field stretched over every image, ``exp(+-bias_amplitude)`` at its extremes). Zero stays zero.

Runs (each an ``automedseg`` command, 2 threads; ``--dry-run`` lists them with the estimated CPU time):

1. source: ``plan`` + ``train -f 0 --time-budget B --no-validate`` on the source cases (or ``--source-work-dir``
   to reuse a fold 0 trained by an earlier run of this script: another model may have seen the test cases);
2. ``predict -f 0`` on the test cases as they are (the reference), on their shifted copies (before adaptation),
   and on the shifted copies with ``--match-intensities`` (histogram matching to the source training images);
3. for each N of ``--target-sizes`` (default 5 and 20): ``adapt SOURCE TARGET_N -f all --source-fold 0
   --time-budget A`` on the first N shifted target cases, then ``predict -f all`` on the shifted test cases.

Every prediction is scored here against ``labelsTr`` with the Dice of ``quality_budget.py`` (per case and class,
mean over cases, then over classes). Results: ``benchmarks/results/site_shift.{json,md}``.

Usage::

    python benchmarks/site_shift.py --dry-run                       # the runs and their estimated CPU time
    python benchmarks/site_shift.py                                 # 20 min source fold, 5 min per adaptation
    python benchmarks/site_shift.py --budget 1m --adapt-budget 30s --test-cases 4 --target-sizes 5 \\
        --results-dir /tmp/site_shift_smoke                         # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BENCH_THREADS,
    DEFAULT_MSD_DIR,
    WORK_DIR,
    machine_info,
    md_table,
    run_automedseg,
    thread_env,
    write_results,
)

CONFIGURATION = "3d_fullres"
SPLIT_SEED = 2026
# Rough CPU-time model of --dry-run (2 cores, hippocampus): seconds.
EST_PLAN_S = 150.0  # fingerprint + preprocessing of ~150 source cases
EST_PREDICT_STARTUP_S = 15.0
EST_PREDICT_CASE_S = 0.6  # one small hippocampus volume, mirrored
EST_ADAPT_STARTUP_S = 30.0  # check + preprocess the target cases, load the source
EST_DATA_CASE_S = 0.1  # read, shift and write one held-back case


# --------------------------------------------------------------------------------------------------------
# the simulated site
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteShift:
    """A fixed scanner/site change: an intensity non-linearity, then a smooth multiplicative bias field.

    Attributes:
        gamma: Intensities ``x`` become ``s * (x / s) ** gamma`` with ``s`` the image's 99.5th nonzero percentile.
        bias_amplitude: The bias field is ``exp(f)`` with ``|f| <= bias_amplitude``.
        bias_frequencies: Highest cosine frequency per axis of ``f`` (over the image, in half periods).
        seed: Seed of the field's coefficients and phases.
    """

    gamma: float = 1.8
    bias_amplitude: float = 0.4
    bias_frequencies: int = 2
    seed: int = 7


def bias_field(shape: tuple[int, ...], *, amplitude: float, frequencies: int = 2, seed: int = 7) -> np.ndarray:
    """A smooth positive field over ``shape``, fixed in normalised coordinates: the same field for every shape.

    Example:
        >>> f = bias_field((4, 6, 5), amplitude=0.4, seed=1)
        >>> f.shape, bool(np.all(f > 0)), bool(np.isclose(np.abs(np.log(f)).max(), 0.4))
        ((4, 6, 5), True, True)
    """
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[(np.arange(n) + 0.5) / n for n in shape], indexing="ij")
    log_field = np.zeros(shape, dtype=np.float64)
    for freq in np.ndindex(*(frequencies + 1,) * len(shape)):
        if not any(freq):
            continue
        phase = sum(np.pi * k * g for k, g in zip(freq, grids))
        log_field += rng.normal(0, 1.0 / (1 + sum(freq))) * np.cos(phase + rng.uniform(0, 2 * np.pi))
    peak = float(np.abs(log_field).max())
    if peak > 0:
        log_field *= amplitude / peak
    return np.exp(log_field)


def apply_site_shift(image: np.ndarray, shift: SiteShift) -> np.ndarray:
    """``image`` (Z, Y, X) as the simulated site would have acquired it (float32; zero stays zero).

    Example:
        >>> img = np.zeros((4, 8, 8), np.float32); img[1:3, 2:6, 2:6] = np.arange(32).reshape(2, 4, 4) + 10
        >>> out = apply_site_shift(img, SiteShift())
        >>> bool(np.all(out[img == 0] == 0)), bool(np.array_equal(out, apply_site_shift(img, SiteShift())))
        (True, True)
    """
    x = np.asarray(image, dtype=np.float64)
    nonzero = x != 0
    out = np.zeros_like(x)
    if nonzero.any():
        scale = float(np.percentile(np.abs(x[nonzero]), 99.5)) or 1.0
        out[nonzero] = np.sign(x[nonzero]) * scale * (np.abs(x[nonzero]) / scale) ** shift.gamma
        out *= bias_field(x.shape, amplitude=shift.bias_amplitude, frequencies=shift.bias_frequencies,
                          seed=shift.seed)
    return out.astype(np.float32)


def hold_back(case_ids: list[str], *, n_test: int, n_target: int, seed: int = SPLIT_SEED
              ) -> tuple[list[str], list[str], list[str]]:
    """(source, target pool, test) case lists: a seeded permutation, the test and target cases held back.

    Example:
        >>> src, pool, test = hold_back([f"c{i}" for i in range(10)], n_test=3, n_target=2)
        >>> len(src), len(pool), len(test), sorted(src + pool + test) == sorted(f"c{i}" for i in range(10))
        (5, 2, 3, True)
    """
    ids = sorted(case_ids)
    if n_test + n_target >= len(ids):
        raise ValueError(f"{len(ids)} cases: too few to hold back {n_test} test and {n_target} target cases")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    test, pool = sorted(order[:n_test]), order[n_test:n_test + n_target]
    return sorted(order[n_test + n_target:]), pool, test


# --------------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------------


def msd_cases(msd_dir: Path) -> list[str]:
    """The labelled case ids of an MSD-layout dataset (its ``labelsTr`` files)."""
    return sorted(p.name.removesuffix(".nii.gz") for p in (msd_dir / "labelsTr").glob("*.nii.gz")
                  if not p.name.startswith("."))


def _dataset_json(msd_dir: Path, n: int) -> dict:
    meta = json.loads((msd_dir / "dataset.json").read_text())
    labels = {str(name): int(value) for value, name in meta["labels"].items()}
    return {"name": meta.get("name", "Hippocampus"), "channel_names": dict(meta["modality"]), "labels": labels,
            "numTraining": n, "file_ending": ".nii.gz"}


def write_source_dataset(msd_dir: Path, out: Path, cases: list[str]) -> Path:
    """nnU-Net layout of ``cases`` made of symbolic links to the MSD files."""
    if out.exists():
        shutil.rmtree(out)
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True)
    for c in cases:
        (out / "imagesTr" / f"{c}_0000.nii.gz").symlink_to((msd_dir / "imagesTr" / f"{c}.nii.gz").resolve())
        (out / "labelsTr" / f"{c}.nii.gz").symlink_to((msd_dir / "labelsTr" / f"{c}.nii.gz").resolve())
    (out / "dataset.json").write_text(json.dumps(_dataset_json(msd_dir, len(cases)), indent=2) + "\n")
    return out


def write_shifted(msd_dir: Path, out: Path, cases: list[str], shift: SiteShift | None, *, labelled: bool) -> Path:
    """``cases`` through ``shift`` (``None``: as they are), same geometry: a labelled nnU-Net dataset or a folder
    of ``CASE_0000.nii.gz`` images."""
    import SimpleITK as sitk

    if out.exists():
        shutil.rmtree(out)
    images = out / "imagesTr" if labelled else out
    images.mkdir(parents=True)
    for c in cases:
        src = sitk.ReadImage(str(msd_dir / "imagesTr" / f"{c}.nii.gz"))
        array = sitk.GetArrayFromImage(src).astype(np.float32)
        img = sitk.GetImageFromArray(apply_site_shift(array, shift) if shift is not None else array)
        img.CopyInformation(src)
        sitk.WriteImage(img, str(images / f"{c}_0000.nii.gz"))
        if labelled:
            (out / "labelsTr").mkdir(exist_ok=True)
            (out / "labelsTr" / f"{c}.nii.gz").symlink_to((msd_dir / "labelsTr" / f"{c}.nii.gz").resolve())
    if labelled:
        (out / "dataset.json").write_text(json.dumps(_dataset_json(msd_dir, len(cases)), indent=2) + "\n")
    return out


# --------------------------------------------------------------------------------------------------------
# the runs
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One command of the benchmark and its estimated CPU time."""

    name: str
    args: tuple[str, ...]
    estimated_s: float


def plan_runs(*, scratch: Path, budget_s: float, adapt_budget_s: float, target_sizes: list[int], n_test: int,
              n_source: int, source_work: Path | None, budget: str, adapt_budget: str) -> list[Run]:
    """The commands in order: source model (unless reused), predictions, adaptations and their predictions.

    Example:
        >>> runs = plan_runs(scratch=Path("/w"), budget_s=1200, adapt_budget_s=300, target_sizes=[5, 20], n_test=40,
        ...                  n_source=150, source_work=None, budget="20m", adapt_budget="5m")
        >>> [r.name for r in runs]  # doctest: +NORMALIZE_WHITESPACE
        ['plan source', 'train source fold 0', 'predict test (unshifted)', 'predict shifted (before)',
         'predict shifted (--match-intensities)', 'adapt 5', 'predict shifted (adapt 5)', 'adapt 20',
         'predict shifted (adapt 20)']
        >>> round(sum(r.estimated_s for r in runs) / 60)
        37
    """
    work = source_work or scratch / "source_work"
    predict_s = EST_PREDICT_STARTUP_S + n_test * EST_PREDICT_CASE_S
    runs = []
    if source_work is None:
        runs += [Run("plan source", ("plan", scratch / "source", "--work-dir", work, "-c", CONFIGURATION,
                                     "--time-budget", budget, "-j", BENCH_THREADS),
                     EST_PLAN_S * n_source / 150),
                 Run("train source fold 0", ("train", scratch / "source", "--work-dir", work, "-c", CONFIGURATION,
                                             "-f", 0, "--time-budget", budget, "--threads", BENCH_THREADS,
                                             "--no-validate"), budget_s)]
    pred = ("predict", "-d", work, "-c", CONFIGURATION, "-f", 0, "--threads", BENCH_THREADS, "--overwrite")
    runs += [Run("predict test (unshifted)", (*pred, "-i", scratch / "test", "-o", scratch / "pred_unshifted"),
                 predict_s),
             Run("predict shifted (before)", (*pred, "-i", scratch / "test_shifted", "-o", scratch / "pred_before"),
                 predict_s),
             Run("predict shifted (--match-intensities)", (*pred, "-i", scratch / "test_shifted", "-o",
                                                           scratch / "pred_matched", "--match-intensities"),
                 predict_s)]
    for n in target_sizes:
        adapted = scratch / f"adapted_{n}"
        runs += [Run(f"adapt {n}", ("adapt", work, scratch / f"target_{n}", "--work-dir", adapted, "-c",
                                    CONFIGURATION, "-f", "all", "--source-fold", 0, "--time-budget", adapt_budget,
                                    "--threads", BENCH_THREADS, "-j", BENCH_THREADS),
                     EST_ADAPT_STARTUP_S + adapt_budget_s),
                 Run(f"predict shifted (adapt {n})", ("predict", "-d", adapted, "-c", CONFIGURATION, "-f", "all",
                                                      "--threads", BENCH_THREADS, "--overwrite", "-i",
                                                      scratch / "test_shifted", "-o", scratch / f"pred_adapt_{n}"),
                     predict_s)]
    return runs


def _run_cli(run: Run, logs: Path) -> dict:
    res = run_automedseg(list(run.args), logs=logs, label=run.name)
    return {"name": run.name, "args": [str(a) for a in run.args], "wall_s": res["wall_s"],
            "estimated_s": run.estimated_s, "log": res["log"], "output_tail": "\n".join(res["lines"][-20:])}


def build_summary(f: dict) -> str:
    rows = [[r["arm"], r["labelled_target_cases"], "n/a" if r["mean_dice"] is None else f"{r['mean_dice']:.4f}",
             ", ".join(f"{k}: {v:.4f}" for k, v in r["dice_per_class"].items() if v is not None)]
            for r in f["arms"]]
    s = f["shift"]
    m = f["machine"]
    return "\n".join([
        "# site_shift: hippocampus Dice under a simulated site shift, before and after adaptation",
        "",
        f"Dataset `{f['dataset']}`: source model {CONFIGURATION} fold 0 trained on {f['n_source_cases']} cases "
        f"({f['source']}); {f['n_test_cases']} held-back test cases; target pool {f['n_target_pool']} held-back "
        f"cases (split seed {SPLIT_SEED}).",
        f"Shift (fixed, seeded): gamma {s['gamma']} on intensities scaled by each image's 99.5th nonzero percentile, "
        f"then a bias field exp(f), |f| <= {s['bias_amplitude']} (cosines up to frequency {s['bias_frequencies']}, "
        f"seed {s['seed']}).",
        f"Adaptation: `automedseg adapt -f all --source-fold 0 --time-budget {f['adapt_budget']}` (encoder frozen "
        "for the first 30 % of the epochs, then all layers at 0.1 x the learning rate).",
        f"Machine: {m['cpu_model']}, {m['cpu_count_usable']} cores; {BENCH_THREADS} threads; torch {m['torch']}.",
        "",
        md_table(["arm", "labelled target cases", "mean Dice", "per class"], rows),
        "",
        "Dice per case and class against labelsTr (a class absent in both masks is skipped), mean over cases, then "
        "over classes (`quality_budget.dice_same_metric`).",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_MSD_DIR, help="MSD-layout hippocampus folder")
    parser.add_argument("--work-root", type=Path, default=WORK_DIR, help="scratch folder (git-ignored)")
    parser.add_argument("--budget", default="20m", help="training budget of the source fold 0 (default 20m)")
    parser.add_argument("--adapt-budget", default="5m", help="fine-tuning budget per adaptation (default 5m)")
    parser.add_argument("--target-sizes", type=int, nargs="+", default=[5, 20],
                        help="labelled target cases per adaptation (default 5 20; at least 5 each)")
    parser.add_argument("--test-cases", type=int, default=40, help="held-back test cases (default 40)")
    parser.add_argument("--source-work-dir", type=Path, default=None,
                        help="reuse fold 0 of this work folder (trained by an earlier run of this script)")
    parser.add_argument("--gamma", type=float, default=SiteShift.gamma)
    parser.add_argument("--bias-amplitude", type=float, default=SiteShift.bias_amplitude)
    parser.add_argument("--results-dir", type=Path, default=None, help="instead of benchmarks/results (smoke runs)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and the estimated CPU time only")
    args = parser.parse_args(argv)

    from automedseg.cli_support import parse_duration

    budget_s, adapt_budget_s = parse_duration(args.budget) or 0.0, parse_duration(args.adapt_budget) or 0.0
    if min(args.target_sizes) < 5:
        raise SystemExit("--target-sizes: adapt needs at least 5 labelled cases (the dataset check's minimum)")
    msd_dir = args.dataset.resolve()
    shift = SiteShift(gamma=args.gamma, bias_amplitude=args.bias_amplitude)
    pool_size = max(args.target_sizes)
    source_ids, pool, test_ids = hold_back(msd_cases(msd_dir), n_test=args.test_cases, n_target=pool_size)
    scratch = args.work_root.resolve() / "site_shift"
    source_work = args.source_work_dir.resolve() if args.source_work_dir else None
    runs = plan_runs(scratch=scratch, budget_s=budget_s, adapt_budget_s=adapt_budget_s,
                     target_sizes=sorted(args.target_sizes), n_test=len(test_ids), n_source=len(source_ids),
                     source_work=source_work, budget=args.budget, adapt_budget=args.adapt_budget)
    data_s = EST_DATA_CASE_S * (2 * len(test_ids) + sum(args.target_sizes))
    total = data_s + sum(r.estimated_s for r in runs)
    print(f"site_shift: {len(source_ids)} source, {len(pool)} target pool, {len(test_ids)} test cases; {shift}")
    print(f"  {'prepare data (held-back copies, shifted)':45s} ~{data_s / 60:5.1f} min")
    for r in runs:
        print(f"  {r.name:45s} ~{r.estimated_s / 60:5.1f} min   automedseg {' '.join(str(a) for a in r.args)}")
    print(f"estimated CPU time: ~{total / 60:.0f} min on {BENCH_THREADS} cores")
    if args.dry_run:
        return 0

    os.environ.update(thread_env(BENCH_THREADS))
    logs = scratch / "logs"
    scratch.mkdir(parents=True, exist_ok=True)
    if source_work is None:
        write_source_dataset(msd_dir, scratch / "source", source_ids)
    write_shifted(msd_dir, scratch / "test", test_ids, None, labelled=False)
    write_shifted(msd_dir, scratch / "test_shifted", test_ids, shift, labelled=False)
    for n in args.target_sizes:
        write_shifted(msd_dir, scratch / f"target_{n}", pool[:n], shift, labelled=True)
        if (scratch / f"adapted_{n}").exists():
            shutil.rmtree(scratch / f"adapted_{n}")  # a fresh adaptation every run
    done = [_run_cli(r, logs) for r in runs]

    from quality_budget import _labels, dice_same_metric

    labels = _labels(msd_dir)
    arms = [("source, unshifted test images", 0, "pred_unshifted"), ("source, shifted (before)", 0, "pred_before"),
            ("source + --match-intensities, shifted", 0, "pred_matched")]
    arms += [(f"adapt with {n} labelled target cases, shifted", n, f"pred_adapt_{n}") for n in args.target_sizes]
    results = [{"arm": arm, "labelled_target_cases": n, "predictions": str(scratch / folder),
                **dice_same_metric(scratch / folder, msd_dir / "labelsTr", test_ids, labels)}
               for arm, n, folder in arms]
    figures = {
        "benchmark": "site_shift", "dataset": str(msd_dir), "configuration": CONFIGURATION,
        "source": f"reused {source_work}" if source_work else f"trained here, budget {args.budget}",
        "budget": args.budget, "adapt_budget": args.adapt_budget, "shift": asdict(shift),
        "n_source_cases": len(source_ids), "n_target_pool": len(pool), "n_test_cases": len(test_ids),
        "test_cases": test_ids, "target_pool": pool, "estimated_cpu_s": round(total), "runs": done,
        "arms": results, "machine": machine_info(),
    }
    summary = build_summary(figures)
    json_path, md_path = write_results("site_shift", figures, summary, results_dir=args.results_dir)
    print(summary)
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
