"""Command-line interface: parses arguments and calls library functions.

The ``main`` group and the commands that make models (check, import, plan, train, search, adapt, demo) are here;
those that use trained models (predict, find-best, export, import-model, evaluate, report) are in
:mod:`automedseg.cli_model`.

Heavy imports (torch, SimpleITK, scipy) happen inside the commands so ``automedseg --help`` is instant.
With :mod:`automedseg.cli_support` (option parsing, work folder, errors -> exit codes), the only module that reads
environment variables (``AUTOMEDSEG_WORK_DIR``, ``AUTOMEDSEG_CALIBRATION``, ``XDG_CACHE_HOME``, ``AUTOMEDSEG_DEBUG``,
and torchrun's ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from automedseg.cli_model import MODEL_COMMANDS
from automedseg.cli_support import (
    CommandGroup,
    calibration_cache_path,
    cuda_available,
    fail,
    parse_duration,
    parse_fold,
    parse_numbers,
    planned_workspace,
    require_folder,
    workspace_for,
)
from automedseg.progress_events import open_progress, progress_option

DEFAULT_CONFIGS = ("2d", "3d_fullres", "3d_lowres")
#: ``automedseg.plans.ARCHITECTURES``, spelled out: the CLI imports nothing heavy (numpy) before a command runs.
ARCHITECTURE_CHOICES = ("plain_unet", "residual_unet", "attention_unet", "aspp_unet", "segnet_unet")


@click.group(cls=CommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="automedseg")
def main() -> None:
    """Self-configuring medical image segmentation: plan, train, predict, evaluate."""
    # Idle OpenMP threads sleep instead of spinning: on a small CPU shared with augmentation workers or any
    # other busy process, spinning threads that wait for a descheduled peer made training steps 2.5x slower
    # (0.75 vs 1.86 s measured on 2 cores); on an idle machine the cost is within noise in training.
    # Must be set before torch (libgomp) is loaded; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


for _command in MODEL_COMMANDS:  # predict, find-best, export, import-model, evaluate, report
    main.add_command(_command)


@main.command()
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=2, show_default=True, help="Parallel processes.")
def check(dataset: Path, jobs: int) -> None:
    """Check a raw dataset folder and list every problem (exit 2 if any)."""
    require_folder(dataset, "dataset folder")
    from automedseg.checks import check_dataset

    problems = check_dataset(dataset, jobs=jobs, progress=sys.stderr.isatty())
    if problems:
        fail(problems)
    click.echo(f"{dataset}: no problems found.")


@main.command("import")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Dataset folder to create.")
@click.option("--test-source", type=click.Path(path_type=Path), default=None,
              help="Folder of the test split (default: a test/ or testing/ folder beside the training one).")
@click.option("--no-test", is_flag=True, help="Import no test split.")
@click.option("--image-dir", default=None, help="Subfolder of each split holding the images (default: auto).")
@click.option("--mask-suffix", default=None,
              help="Mask name = image name + SUFFIX, e.g. _mask or _manual1 (default: auto-detected).")
@click.option("--fov-suffix", default=None, help="Field-of-view masks are named image name + SUFFIX (-> fovTr/).")
@click.option("--image-glob", default=None, help="Only images whose name or path matches, e.g. '*_HC.png'.")
@click.option("--mask-glob", default=None, help="Only masks whose name or path matches, e.g. '1st_manual/*'.")
@click.option("--skip-unmatched", is_flag=True, help="Import the complete pairs; list images without masks.")
@click.option("--colors", default=None,
              help="Label table, label k = k-th entry: '0,0,0=background;255,0,0=lesion' or '0=background;255=vessel' "
                   "(palette masks: by displayed colour; default: inferred).")
@click.option("--snap-colors", is_flag=True, help="Map mask values not in --colors to the nearest listed one.")
@click.option("--fill-outlines", is_flag=True, help="Masks are closed outlines: fill each one.")
@click.option("--spacing-csv", type=click.Path(path_type=Path), default=None,
              help="CSV with the pixel spacing (mm) of each image (2D NIfTI output when it differs between images).")
@click.option("--spacing-column", "spacing_columns", multiple=True,
              help="Its spacing column (repeatable: y then x; default: the column named like spacing/pixel size).")
@click.option("--name-column", default=None, help="Its file name column (default: the one naming the images).")
@click.option("--spacing-mm", default=None, help="Pixel spacing of every image in mm: Y[,X].")
@click.option("--channel-names", default=None, help="Comma-separated channel names (default: image, or R,G,B).")
@click.option("--name", default=None, help="Dataset name (default: the output folder's name).")
@click.option("--format", "output_format", type=click.Choice(["auto", "png", "nifti"]), default="auto",
              show_default=True, help="Image format (auto: PNG unless spacing or pixel type needs NIfTI).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
def import_command(source: Path, output: Path, test_source: Path | None, no_test: bool, image_dir: str | None,
                   mask_suffix: str | None, fov_suffix: str | None, image_glob: str | None, mask_glob: str | None,
                   skip_unmatched: bool, colors: str | None, snap_colors: bool, fill_outlines: bool,
                   spacing_csv: Path | None, spacing_columns: tuple[str, ...], name_column: str | None,
                   spacing_mm: str | None, channel_names: str | None, name: str | None, output_format: str,
                   overwrite: bool) -> None:
    """Import 2D images and masks (PNG, TIFF, GIF, JPEG, BMP) as an nnU-Net v2 raw dataset; SOURCE is only read."""
    from automedseg.importer import import_dataset

    spacing = parse_numbers(spacing_mm, "--spacing-mm", 2)
    import_dataset(source, output, test_source=test_source, no_test=no_test, image_dir=image_dir,
                   mask_suffix=mask_suffix, fov_suffix=fov_suffix, image_glob=image_glob, mask_glob=mask_glob,
                   skip_unmatched=skip_unmatched, colors=colors, snap_colors=snap_colors, fill_outlines=fill_outlines,
                   spacing_csv=spacing_csv, spacing_columns=spacing_columns, name_column=name_column,
                   spacing_mm=(spacing[0], spacing[-1]) if spacing else None,
                   channel_names=tuple(n.strip() for n in channel_names.split(",")) if channel_names else (),
                   name=name, output_format=output_format, overwrite=overwrite, log=click.echo)


@main.command()
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Work folder (default: DATASET/automedseg, or $AUTOMEDSEG_WORK_DIR/<name>).")
@click.option("-c", "--configurations", multiple=True, type=click.Choice(DEFAULT_CONFIGS),
              help="Configurations to plan and preprocess (repeatable; default: all that apply).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=2, show_default=True, help="Parallel processes.")
@click.option("--device", default="auto", show_default=True,
              help="Plan for: auto, cpu, cuda, mps, or a nominal profile (reference-cpu-2core, reference-gpu-24g).")
@click.option("--time-budget", default=None,
              help="Training wall-clock budget per fold, e.g. 30m or 2h (default: 30m on a CPU; on a GPU, none: "
                   "nnU-Net's 1000 epochs x 250 iterations).")
@click.option("--architecture", type=click.Choice(ARCHITECTURE_CHOICES), default="plain_unet", show_default=True,
              help="Network. plain_unet (nnU-Net's default) or residual_unet (residual encoder): every configuration "
                   "gets it. attention_unet (attention-gated skips), aspp_unet (DeepLab ASPP bottleneck) or "
                   "segnet_unet (max-unpooling decoder): the plain configurations, plus a variant of each named "
                   "CONFIGURATION_ARCHITECTURE (e.g. 3d_fullres_attention_unet; train it with -c).")
@click.option("--seed", default=12345, show_default=True,
              help="Training seed written into the plan (weights, sampling, augmentation); not the folds' split.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for training (default: all cores).")
@click.option("--overwrite", is_flag=True, help="Recompute the fingerprint and every cached case.")
@click.option("--no-preprocess", is_flag=True, help="Stop after writing plans.json.")
@click.option("--search", "search_trials", type=int, default=0, show_default=True, metavar="N",
              help="Then refine each planned configuration with N Optuna trials (as `automedseg search`; "
                   "each trial gets 1/4 of the fold budget; the best 2 are confirmed against the rule plan).")
@click.option("--recalibrate", is_flag=True,
              help="Time this machine again instead of reusing its cached calibration "
                   "($AUTOMEDSEG_CALIBRATION, default ~/.cache/automedseg/calibration.json).")
@click.option("--replan", multiple=True, type=click.Choice(DEFAULT_CONFIGS), metavar="CONFIG",
              help="Plan this configuration afresh although folds of it are trained: its folder is moved aside "
                   "to CONFIG.replaced-<time> first (repeatable).")
@progress_option
def plan(dataset: Path, work_dir: Path | None, configurations: tuple[str, ...], jobs: int, device: str,
         time_budget: str | None, architecture: str, seed: int, threads: int | None, overwrite: bool,
         no_preprocess: bool, search_trials: int, recalibrate: bool, replan: tuple[str, ...],
         progress_format: str) -> None:
    """Check, fingerprint, plan and preprocess a raw dataset.

    Trained configurations are kept as trained (`--replan CONFIG` plans one afresh); the machine's speed is
    timed once and cached (`--recalibrate` times it again), so the same inputs give the same plans.json.
    """
    open_progress(progress_format)
    require_folder(dataset, "dataset folder")  # before the heavy imports: a wrong path is answered at once
    budget = parse_duration(time_budget)
    ws = workspace_for(dataset, work_dir)
    t0 = time.perf_counter()
    from automedseg import api
    from automedseg.io import DatasetError

    try:
        plans = api.plan(dataset, work_dir=ws.root, configurations=configurations, jobs=jobs, device=device,
                         time_budget=budget, architecture=architecture, seed=seed, threads=threads,
                         overwrite=overwrite, preprocess=not no_preprocess, progress=sys.stderr.isatty(),
                         calibration_cache=calibration_cache_path(), recalibrate=recalibrate, replan=replan,
                         log=click.echo)
    except DatasetError as e:
        fail(e.problems)
        return
    except (ValueError, RuntimeError) as e:  # a bad --device, a plan that cannot be made
        fail([str(e)])
        return
    click.echo(f"plans: {ws.plans_path}")
    for name, cfg in plans.configurations.items():
        click.echo(f"  {name}: {cfg.notes[-1] if cfg.notes else ''}")
    click.echo(f"done in {time.perf_counter() - t0:.1f} s; work folder {ws.root}")
    if search_trials:
        if no_preprocess:
            fail(["--search needs the preprocessed cache; drop --no-preprocess"])
        for name in [n for n in plans.configurations if not n.endswith("_searched")]:
            _run_search(ws, dataset, name, n_trials=search_trials, seed=seed, threads=threads)


@main.command()
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--work-dir", type=click.Path(path_type=Path), default=None, help="Work folder (as for plan).")
@click.option("-c", "--configuration", default="3d_fullres", show_default=True,
              help="A configuration of plans.json: 2d, 3d_fullres, 3d_lowres, or one `automedseg search` added "
                   "(2d_searched, 3d_fullres_searched, 3d_lowres_searched).")
@click.option("-f", "--fold", "fold", default="0", show_default=True,
              help="Fold 0-4, several comma-separated (0,1,2), or 'all'.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "mps"]), default=None,
              help="Default: CUDA if present, else MPS, else CPU (under torchrun: cuda:LOCAL_RANK).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the plan's number of epochs.")
@click.option("--iterations-per-epoch", type=click.IntRange(min=1), default=None,
              help="Override the plan's iterations per epoch.")
@click.option("--time-budget", default=None, help="Fit training into this wall time, e.g. 20m.")
@click.option("--early-stopping", type=click.IntRange(min=1), default=None, metavar="EPOCHS",
              help="Stop after this many epochs without a better EMA pseudo-Dice.")
@click.option("--pretrained", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Initialise from another automedseg checkpoint (matching layers).")
@click.option("--restart", is_flag=True, help="Discard existing checkpoints of this fold and start again.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch CPU threads (default: the plan's). With the plan's worker_placement own_core, N - 1 "
                   "training threads beside the augmentation worker's own core.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Augmentation worker processes (0: in-process).")
@click.option("--no-amp", is_flag=True, help="Train in float32.")
@click.option("--no-validate", is_flag=True, help="Skip the final sliding-window validation.")
@click.option("--augment-on", type=click.Choice(["auto", "device", "workers"]), default="auto", show_default=True,
              help="Where augmentation runs: batched on the training device (the workers only read windows), "
                   "in the CPU workers, or auto (the device when it is CUDA).")
@click.option("--mlflow", metavar="URI", default=None, help="Log to MLflow: a server URL, sqlite:///mlflow.db or a "
              "folder (file:///abs/mlruns); needs automedseg[mlflow].")
@progress_option
def train(dataset: Path, work_dir: Path | None, configuration: str, fold: str, device: str | None,
          epochs: int | None, iterations_per_epoch: int | None, time_budget: str | None,
          early_stopping: int | None, pretrained: Path | None, restart: bool, threads: int | None,
          workers: int | None, no_amp: bool, no_validate: bool, augment_on: str, mlflow: str | None,
          progress_format: str) -> None:
    """Train one fold (0-4) of 5-fold cross-validation, or 'all'. Re-running resumes."""
    events = open_progress(progress_format)
    if work_dir is None:
        require_folder(dataset, "dataset folder")
    ws = planned_workspace(dataset, work_dir)
    folds: list[int | str] = [parse_fold(f) for f in fold.split(",")]
    from automedseg import api

    # Launched by torchrun: join its process group (DistributedDataParallel), one GPU per local rank.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and (device == "cuda" or (device is None and cuda_available())):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    is_main = int(os.environ.get("RANK", "0")) == 0
    from automedseg.tracking import training_trackers

    for f in folds:
        result = api.train(dataset, work_dir=ws.root, configuration=configuration, fold=f, distributed=distributed,
                           device=device, epochs=epochs, iterations_per_epoch=iterations_per_epoch,
                           time_budget=parse_duration(time_budget), restart=restart, pretrained=pretrained,
                           early_stopping_patience=early_stopping, threads=threads, workers=workers, amp=not no_amp,
                           validate=not no_validate, progress=sys.stderr.isatty() and is_main,
                           augment_on=augment_on, trackers=training_trackers(mlflow_uri=mlflow, progress=events),
                           log=click.echo)
        msg = f"fold {f}: {result.epochs_run} epochs, {result.train_seconds / 60:.1f} min"
        if result.validation and result.validation.get("mean_dice") is not None:
            msg += f", validation mean Dice {result.validation['mean_dice']:.4f}"
        click.echo(msg)


@main.command()
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--work-dir", type=click.Path(path_type=Path), default=None, help="Work folder (as for plan).")
@click.option("-c", "--configuration", default="3d_fullres", show_default=True,
              help="Rule-based configuration to refine; the result is added as CONFIGURATION_searched.")
@click.option("--trials", "n_trials", type=int, required=True,
              help="Finished (complete + pruned) trials the study should hold; re-running continues.")
@click.option("--time-budget", default=None,
              help="Wall time of this worker's search, e.g. 2h; each trial gets time-budget / trials.")
@click.option("--trial-budget", default=None,
              help="Wall time of one trial, e.g. 10m (default: --time-budget / --trials, else 1/4 of the plan's "
                   "fold budget).")
@click.option("--storage", default=None,
              help="Optuna RDB URL shared by all workers, e.g. postgresql://user:pw@host/db "
                   "(default: sqlite:///WORK/search/search.db).")
@click.option("--study-name", default=None, help="Optuna study name (default: <dataset>_<configuration>).")
@click.option("--pruner", type=click.Choice(["hyperband", "sha", "none"]), default="hyperband", show_default=True,
              help="Stops lagging trials: Hyperband, successive halving, or none.")
@click.option("--seed", default=12345, show_default=True, help="Sampler seed.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "mps"]), default=None,
              help="Default: CUDA if present, else MPS, else CPU.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch CPU threads per trial.")
@click.option("--keep-trial-files", is_flag=True, help="Keep every trial's checkpoints and validation outputs.")
@click.option("--confirm", "confirm", type=click.IntRange(min=0), default=2, show_default=True, metavar="N",
              help="Train the N best candidates and the rule plan on fold 0 at the full fold budget and adopt "
                   "CONFIGURATION_searched only if a candidate beats the rule plan. 0: no confirmation; the best "
                   "trial is written UNCONFIRMED (it may train worse than the rule plan).")
@click.option("--fidelity", type=click.Choice(["auto", "full", "short", "continuation"]), default="auto",
              show_default=True,
              help="full: every trial trains a full fold, no pruning; short: short pruned trials; continuation: "
                   "successive halving whose promoted trials resume (constant LR, cool-down per rung); auto: full "
                   "when --trials full folds fit --time-budget, else short.")
def search(dataset: Path, work_dir: Path | None, configuration: str, n_trials: int, time_budget: str | None,
           trial_budget: str | None, storage: str | None, study_name: str | None, pruner: str, seed: int,
           device: str | None, threads: int | None, keep_trial_files: bool, confirm: int, fidelity: str) -> None:
    """Refine a planned configuration with Optuna (fold-0 trials, pruned when they lag), then confirm.

    The best candidates are trained against the rule plan at the full fold budget on fold 0 (--confirm); the
    searched configuration is written only if it wins. Workers on other machines join with the same --storage
    and --study-name (and a copy of the work folder).
    """
    ws = planned_workspace(dataset, work_dir)
    _run_search(ws, dataset, configuration, n_trials=n_trials, time_budget_s=parse_duration(time_budget),
                storage=storage, study_name=study_name, seed=seed, trial_budget_s=parse_duration(trial_budget),
                pruner=pruner, device=device, threads=threads, keep_trial_files=keep_trial_files, confirm=confirm,
                fidelity=fidelity)


def _run_search(ws, dataset: Path, configuration: str, **kwargs) -> None:  # noqa: ANN001, ANN003
    from automedseg.search import run_search

    try:
        result = run_search(ws, configuration, log=click.echo, dataset=dataset, **kwargs)
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command again to continue (the interrupted trial is retried)",
                   err=True)
        sys.exit(130)
    except ValueError as e:  # PlanError, unknown configuration, no budget, study of another configuration
        fail([str(e)])
        return
    c = result.counts
    click.echo(f"study {result.study_name}: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed")
    if result.confirmation:
        click.echo(f"confirmation: {result.confirmation}")
    if result.searched_configuration:
        click.echo(f"best trial {result.best_trial} (fold-0 Dice {result.best_value:.4f}) -> "
                   f"{result.searched_configuration}{'' if result.adopted else ' (UNCONFIRMED)'}; train it with "
                   f"`automedseg train {dataset} -c {result.searched_configuration} -f 0` ... `-f 4`")
    elif result.adopted is False:
        click.echo(f"the rule plan {configuration} is kept (plans.json notes say by how much); train it")
    click.echo(f"report: {result.report_path}")


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("target_dataset", type=click.Path(path_type=Path), required=False)
@click.option("--work-dir", required=True, type=click.Path(path_type=Path),
              help="The adapted model's new work folder (re-running with the same source resumes it).")
@click.option("-c", "--configuration", default=None,
              help="Configuration to adapt (default: the only trained one, else find_best.json's).")
@click.option("-f", "--folds", multiple=True,
              help="Folds to adapt, repeatable or comma-separated (default: every trained fold of the source); "
                   "each starts from the source fold of the same name, or from --source-fold.")
@click.option("--source-fold", default=None, help="Start every adapted fold from this source fold (e.g. -f all "
              "--source-fold 0: fine-tune fold 0 on every target case).")
@click.option("--time-budget", default="10m", show_default=True, help="Fine-tuning wall time per fold.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the number of epochs.")
@click.option("--iterations-per-epoch", type=click.IntRange(min=1), default=None,
              help="Override the iterations per epoch.")
@click.option("--freeze-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.3, show_default=True,
              help="Share of the epochs with the encoder frozen (the decoder trains at the plan's learning rate).")
@click.option("--lr-factor", type=click.FloatRange(0, 1, min_open=True), default=0.1, show_default=True,
              help="Then all layers train at this multiple of the plan's learning rate, decaying to 0.")
@click.option("--match-intensities", is_flag=True,
              help="The adapted model maps every image's foreground (nonzero) intensities onto the source training "
                   "images' percentiles before normalising (histogram matching); without TARGET_DATASET (no "
                   "labelled cases) this is all it does.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "mps"]), default=None,
              help="Default: CUDA if present, else MPS, else CPU.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch CPU threads.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Augmentation worker processes (0: in-process).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=2, show_default=True,
              help="Processes for checking and preprocessing the target cases.")
@click.option("--no-validate", is_flag=True, help="Skip the validation on the held-out target cases.")
def adapt(source: Path, target_dataset: Path | None, work_dir: Path, configuration: str | None,
          folds: tuple[str, ...], source_fold: str | None, time_budget: str, epochs: int | None,
          iterations_per_epoch: int | None, freeze_fraction: float, lr_factor: float, match_intensities: bool,
          device: str | None, threads: int | None, workers: int | None, jobs: int, no_validate: bool) -> None:
    """Adapt a trained model (SOURCE: its work folder or dataset) to another scanner or site.

    With TARGET_DATASET (a few labelled cases, the source's labels and channels): preprocess them with the
    source plan and fine-tune each fold from the source weights, the encoder frozen for the first part of the
    schedule, then all layers at a lower learning rate. The result is a normal model folder for `predict`.
    """
    from automedseg.cli_support import resolve_workspace

    require_folder(source, "source work or dataset folder")
    if target_dataset is not None:
        require_folder(target_dataset, "target dataset folder")
    budget = parse_duration(time_budget)
    from automedseg.adapt import adapt as run_adapt

    result = run_adapt(resolve_workspace(source, None), target_dataset, work_dir, configuration=configuration,
                       folds=[parse_fold(v) for f in folds for v in f.split(",")] or None,
                       source_fold=parse_fold(source_fold) if source_fold is not None else None,
                       time_budget_s=budget, epochs=epochs, iterations_per_epoch=iterations_per_epoch,
                       freeze_fraction=freeze_fraction, lr_factor=lr_factor, match_intensities=match_intensities,
                       device=device, threads=threads, workers=workers, jobs=jobs, validate=not no_validate,
                       progress=sys.stderr.isatty(), log=click.echo)
    for fold, r in result.folds.items():
        if r is None:
            continue
        dice = (r.validation or {}).get("mean_dice")
        click.echo(f"fold {fold}: {r.epochs_run} epochs, {r.train_seconds / 60:.1f} min"
                   + (f", validation mean Dice on held-out target cases {dice:.4f}" if dice is not None else ""))
    click.echo(f"adapted model: {result.work_dir}; predict with:\n  {result.predict_command}")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo_data"), show_default=True,
              help="Where to write the demo dataset and its work folder.")
@click.option("--cases", default=24, show_default=True, help="Number of training cases.")
@click.option("--time-budget", default="2m", show_default=True, help="Training budget of the demo fold.")
def demo(out: Path, cases: int, time_budget: str) -> None:
    """Generate the synthetic demo dataset and run the whole pipeline on it."""
    from automedseg.pipeline import run_demo

    run_demo(out, n_cases=cases, time_budget_s=parse_duration(time_budget), progress=sys.stderr.isatty(),
             calibration_cache=calibration_cache_path(), log=click.echo)


if __name__ == "__main__":  # pragma: no cover
    main()
