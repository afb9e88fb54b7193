"""End-to-end entry points that chain the stages: what the CLI commands call.

Each function takes explicit paths (a :class:`~automedseg.workspace.Workspace`) and returns what it
made; none reads environment variables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from automedseg.atomic import remove_stale_temp_files
from automedseg.constants import N_SPLITS
from automedseg.fingerprint import compute_fingerprint, load_fingerprint, save_fingerprint
from automedseg.io import DatasetSpec, load_dataset_spec
from automedseg.locks import folder_lock
from automedseg.plans import DeviceProfile, Plans
from automedseg.workspace import Workspace

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def files_signature(spec: DatasetSpec) -> str:
    """Hash of every training file's path, size and modification time (cheap: stat calls only)."""
    import hashlib

    h = hashlib.sha256()
    for case in spec.cases:
        for p in (*case.images, case.label):
            if p is None:
                continue
            try:
                st = p.stat()
                h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}|missing\n".encode())
    return h.hexdigest()[:20]


def _keep_searched(plans: Plans, ws: Workspace, log: Log) -> Plans:
    """Carry ``*_searched`` configurations (from ``automedseg search``) over from the previous plans.json."""
    from automedseg.plans import PlanError

    if not ws.plans_path.is_file():
        return plans
    try:
        previous = Plans.load(ws.plans_path)
    except PlanError:
        return plans
    for name, cfg in previous.configurations.items():
        if name.endswith("_searched") and name[: -len("_searched")] in plans.configurations:
            plans = plans.with_configuration(cfg)
            log(f"plans: keeping {name} (from automedseg search; its notes say how it was found)")
    return plans


def run_plan(dataset: Path, ws: Workspace, *, configurations: Sequence[str] | None = None, jobs: int = 2,
             device: str = "auto", time_budget_s: float | None = None, architecture: str = "plain_unet",
             seed: int = 12345, threads: int | None = None, overwrite: bool = False, preprocess: bool = True,
             progress: bool = False, calibration_cache: Path | None = None, recalibrate: bool = False,
             replan: Sequence[str] = (), log: Log = _quiet) -> Plans:
    """Check + fingerprint, plan and preprocess a dataset into ``ws``.

    The fingerprint is reused when ``fingerprint.json`` exists (unless ``overwrite``); the plan is
    re-derived, except that a configuration with a trained fold is kept as trained
    (:func:`automedseg.trained.keep_trained`) unless it is named in ``replan``.

    Args:
        calibration_cache: The machine's calibration cache file (:mod:`automedseg.calibration`); ``None``
            times the device on every call and caches nothing.
        recalibrate: Time the device again even when a calibration is cached.
        replan: Configurations to plan afresh although trained: their folder is moved aside first.

    Raises:
        DatasetError: Integrity problems, all listed (the same rules as ``automedseg check``, including
            at least ``N_SPLITS`` training cases and some foreground).
    """
    from automedseg.calibration import device_profile
    from automedseg.errors import InputError

    for name in replan:  # before anything is read or written (keep_trained checks against what is planned)
        if configurations and name not in configurations:
            raise InputError(f"--replan {name}: {name} is not among the configurations to plan "
                             f"({', '.join(configurations)}); add `-c {name}`")
    spec = load_dataset_spec(dataset)
    profile = device_profile(device, threads=threads, cache_path=calibration_cache, recalibrate=recalibrate,
                             log=log)  # a bad --device fails here, before anything is written
    with folder_lock(ws.root, purpose="plan", name=PLAN_LOCK):
        remove_stale_temp_files(ws.root)
        return _plan_locked(spec, ws, profile, configurations=configurations, jobs=jobs,
                            time_budget_s=time_budget_s, architecture=architecture, seed=seed, overwrite=overwrite,
                            preprocess=preprocess, progress=progress, replan=replan, log=log)


#: One ``plan`` at a time per work folder (another name than the fold and output-folder locks).
PLAN_LOCK = ".automedseg-plan.lock"


def _plan_locked(spec: DatasetSpec, ws: Workspace, profile: DeviceProfile, *, configurations: Sequence[str] | None,
                 jobs: int, time_budget_s: float | None, architecture: str, seed: int, overwrite: bool,
                 preprocess: bool, progress: bool, replan: Sequence[str], log: Log) -> Plans:
    from automedseg.planning import plan_dataset
    from automedseg.preprocessing import preprocess_dataset
    from automedseg.trained import keep_trained

    signature = files_signature(spec)
    malformed: list[str] = []
    fingerprint = None if overwrite else load_fingerprint(ws.fingerprint_path, signature=signature,
                                                          problems=malformed)
    if fingerprint is not None:  # else missing, unreadable, malformed or files changed: check and fingerprint again
        log(f"fingerprint: reusing {ws.fingerprint_path} (files unchanged)")
    for problem in malformed:
        log(f"fingerprint: not reused ({problem})")
    if fingerprint is None:
        fingerprint = compute_fingerprint(spec, jobs=jobs, progress=progress, min_cases=N_SPLITS)
        fingerprint = dataclasses.replace(fingerprint, files_signature=signature)
        save_fingerprint(fingerprint, ws.fingerprint_path)
        log(f"fingerprint: {fingerprint.num_cases} cases -> {ws.fingerprint_path}")
    plans = plan_dataset(fingerprint, device=profile, time_budget_s=time_budget_s, seed=seed,
                         configurations=configurations, architecture=architecture)
    plans = _keep_searched(plans, ws, log)
    plans = keep_trained(plans, ws, replan=replan, log=log)  # after the searched ones: they may be trained too
    plans.save(ws.plans_path)
    if preprocess:
        counts = preprocess_dataset(spec, plans, ws.preprocessed_root, jobs=jobs, overwrite=overwrite,
                                    progress=progress)
        for ident, n in counts.items():
            log(f"preprocessed/{ident}: {n} case(s) computed, {len(spec.cases) - n} already cached")
    return plans


def run_demo(out: Path, *, n_cases: int = 24, n_test: int = 4, time_budget_s: float | None = 120.0,
             jobs: int = 2, threads: int | None = None, calibration_cache: Path | None = None,
             progress: bool = True, log: Log = print) -> dict:
    """Generate the demo dataset under ``out``, run plan -> train -> predict -> evaluate on it, write the report.

    Running it again re-plans nothing (the calibration is cached, the trained configuration kept), retrains
    nothing (the fold is trained) and keeps the predictions, so the figures are the same.

    Args:
        out: Folder of the demo dataset and its work folder.
        n_cases: Training cases (at least 5, one per fold).
        n_test: Test cases (predicted and evaluated).
        time_budget_s: Training budget of fold 0.
        jobs: Parallel processes for fingerprinting and preprocessing.
        threads: CPU threads for the calibration and training (default: all cores).
        calibration_cache: The machine's calibration cache (``None``: time the device each run).
        progress: Show progress bars (the CLI turns them off when stderr is not a terminal, so logs stay
            one line per epoch).
        log: Where messages go.

    Returns:
        The evaluation summary of the test cases.
    """
    from automedseg.demo import make_demo_dataset
    from automedseg.inference import find_folds, predict_folder
    from automedseg.metrics import evaluate_folders
    from automedseg.report import write_report
    from automedseg.trained import check_folds_match
    from automedseg.training import TrainOptions, train_fold

    dataset = Path(out) / "Dataset_Demo"
    if not (dataset / "dataset.json").is_file():
        make_demo_dataset(dataset, n_cases=n_cases, n_test=n_test)
        log(f"demo dataset written to {dataset}")
    ws = Workspace.for_dataset(dataset)
    log("== plan")
    plans = run_plan(dataset, ws, configurations=["3d_fullres"], jobs=jobs, time_budget_s=time_budget_s,
                     threads=threads, progress=progress, calibration_cache=calibration_cache, log=log)
    for name, cfg in plans.configurations.items():
        log(f"  {name}: {cfg.notes[-1] if cfg.notes else ''}")
    log("== train 3d_fullres fold 0")
    result = train_fold(ws, "3d_fullres", 0, options=TrainOptions(time_budget_s=time_budget_s, progress=progress,
                                                                  threads=threads), log=log)
    log("== predict imagesTs")
    pred_dir = ws.root / "predictions_imagesTs"
    folds = find_folds(ws.configuration_dir("3d_fullres"), [0])
    check_folds_match(ws, "3d_fullres", folds)
    report = predict_folder(dataset / "imagesTs", pred_dir, [folds], overlays=True, log=log)
    log(f"   {report.summary()} -> {pred_dir}")
    log("== evaluate against labelsTs")
    summary = evaluate_folders(dataset / "labelsTs", pred_dir, output_dir=ws.root / "evaluation_imagesTs")
    for label, m in summary["per_label"].items():
        log(f"   label {label}: Dice {m['dice']:.3f}, HD95 {m['hd95']:.2f} mm")
    val = result.validation or {}
    log(f"done: fold-0 validation Dice {val.get('mean_dice') or float('nan'):.3f}; test Dice "
        f"{summary['foreground_mean']['dice']:.3f}; everything is in {ws.root}")
    log("== report")
    html_path = write_report(ws)
    log(f"report: {html_path} and {html_path.with_name('report.md')}")
    return summary
