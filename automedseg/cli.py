"""Command-line interface: parses arguments and calls library functions.

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

from automedseg.cli_support import (
    CommandGroup,
    calibration_cache_path,
    cuda_available,
    existing_workspace,
    fail,
    parse_duration,
    parse_fold,
    parse_numbers,
    planned_workspace,
    require_folder,
    workspace_for,
)

DEFAULT_CONFIGS = ("2d", "3d_fullres", "3d_lowres")


@click.group(cls=CommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="automedseg")
def main() -> None:
    """Self-configuring medical image segmentation: plan, train, predict, evaluate."""
    # Idle OpenMP threads sleep instead of spinning: on a small CPU shared with augmentation workers or any
    # other busy process, spinning threads that wait for a descheduled peer made training steps 2.5x slower
    # (0.75 vs 1.86 s measured on 2 cores); on an idle machine the cost is within noise in training.
    # Must be set before torch (libgomp) is loaded; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
@click.option("--architecture", type=click.Choice(["plain_unet", "residual_unet"]), default="plain_unet",
              show_default=True, help="Encoder: plain conv blocks (nnU-Net's default) or residual blocks (ResEnc).")
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
def plan(dataset: Path, work_dir: Path | None, configurations: tuple[str, ...], jobs: int, device: str,
         time_budget: str | None, architecture: str, seed: int, threads: int | None, overwrite: bool,
         no_preprocess: bool, search_trials: int, recalibrate: bool, replan: tuple[str, ...]) -> None:
    """Check, fingerprint, plan and preprocess a raw dataset.

    Trained configurations are kept as trained (`--replan CONFIG` plans one afresh); the machine's speed is
    timed once and cached (`--recalibrate` times it again), so the same inputs give the same plans.json.
    """
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
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch CPU threads.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Augmentation worker processes (0: in-process).")
@click.option("--no-amp", is_flag=True, help="Train in float32.")
@click.option("--no-validate", is_flag=True, help="Skip the final sliding-window validation.")
@click.option("--augment-on", type=click.Choice(["auto", "device", "workers"]), default="auto", show_default=True,
              help="Where augmentation runs: batched on the training device (the workers only read windows), "
                   "in the CPU workers, or auto (the device when it is CUDA).")
def train(dataset: Path, work_dir: Path | None, configuration: str, fold: str, device: str | None,
          epochs: int | None, iterations_per_epoch: int | None, time_budget: str | None,
          early_stopping: int | None, pretrained: Path | None, restart: bool, threads: int | None,
          workers: int | None, no_amp: bool, no_validate: bool, augment_on: str) -> None:
    """Train one fold (0-4) of 5-fold cross-validation, or 'all'. Re-running resumes."""
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
    for f in folds:
        result = api.train(dataset, work_dir=ws.root, configuration=configuration, fold=f, distributed=distributed,
                           device=device, epochs=epochs, iterations_per_epoch=iterations_per_epoch,
                           time_budget=parse_duration(time_budget), restart=restart, pretrained=pretrained,
                           early_stopping_patience=early_stopping, threads=threads, workers=workers, amp=not no_amp,
                           validate=not no_validate, progress=sys.stderr.isatty() and is_main,
                           augment_on=augment_on, log=click.echo)
        msg = f"fold {f}: {result.epochs_run} epochs, {result.train_seconds / 60:.1f} min"
        if result.validation and result.validation.get("mean_dice") is not None:
            msg += f", validation mean Dice {result.validation['mean_dice']:.4f}"
        click.echo(msg)


@main.command()
@click.option("-i", "--input", "input_dir", required=True, type=click.Path(path_type=Path),
              help="Folder of images (nnU-Net _0000 files or one, possibly 4D, file per case) or of DICOM series "
                   "(one per subfolder).")
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for the masks, one per case named as the case (created; existing masks are kept "
                   "unless --overwrite).")
@click.option("-d", "--dataset", "target", default=None, type=click.Path(path_type=Path),
              help="The dataset folder (its work folder is used), a work folder or an imported model folder.")
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="A model bundle (.zip from `automedseg export`), verified before use; instead of -d.")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Work folder of DATASET when not the default (as for plan).")
@click.option("-c", "--configuration", default=None,
              help="Configuration, or an ensemble like 2d+3d_fullres (default: find_best.json's choice).")
@click.option("-f", "--folds", multiple=True, help="Folds to ensemble, repeatable: -f 0 -f 1 (default: all trained).")
@click.option("--step", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Tile step as a fraction of the patch, in (0, 1].")
@click.option("--no-mirror", is_flag=True, help="Disable test-time mirroring.")
@click.option("--no-postprocessing", is_flag=True, help="Do not apply postprocessing.json.")
@click.option("--save-probabilities", is_flag=True, help="Also write class probabilities (.npz).")
@click.option("--overlays", is_flag=True, help="Write PNG overlays of a few slices per case.")
@click.option("--overwrite", is_flag=True, help="Re-predict cases whose output exists.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "mps"]), default=None,
              help="Default: CUDA if present, else MPS, else CPU.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch CPU threads.")
@click.option("--num-parts", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the cases over this many workers ...")
@click.option("--part-id", type=click.IntRange(min=0), default=0, show_default=True,
              help="... and predict this part (0-based).")
@click.option("--engine", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True,
              help="What runs the network: torch, or ONNX Runtime on the ONNX graphs of a bundle (export --onnx).")
@click.option("--no-amp", is_flag=True, help="Predict in float32 (ONNX Runtime always does).")
@click.option("--output-format", type=click.Choice(["image", "dicom-seg"]), default="image", show_default=True,
              help="Masks as images (the input's format; NIfTI for DICOM series) or, for DICOM series, DICOM-SEG.")
def predict(input_dir: Path, output_dir: Path, target: Path | None, model: Path | None, work_dir: Path | None,
            configuration: str | None, folds: tuple[str, ...], step: float, no_mirror: bool,
            no_postprocessing: bool, save_probabilities: bool, overlays: bool, overwrite: bool, device: str | None,
            threads: int | None, num_parts: int, part_id: int, engine: str, no_amp: bool, output_format: str) -> None:
    """Segment a folder of images with trained folds (ensembled), post-processed as CV chose."""
    if (target is None) == (model is None) or (model is not None and work_dir is not None):
        fail(["predict: name the model with -d DATASET [--work-dir WORK] or with --model MODEL.zip, one of them"])
    ws = existing_workspace(target, work_dir, hint="train a model first") if target is not None else None
    require_folder(input_dir, "input folder")
    from automedseg import api

    source = target if target is not None else model
    assert source is not None  # one of them, checked above
    try:
        report = api.predict(input_dir, model=source, work_dir=None if ws is None else ws.root,
                             output_dir=output_dir, configuration=configuration,
                             folds=[parse_fold(f) for f in folds] or None, step=step, mirror=not no_mirror,
                             postprocess=not no_postprocessing, save_probabilities=save_probabilities,
                             overlays=overlays, overwrite=overwrite, device=device, threads=threads,
                             progress=sys.stderr.isatty(), num_parts=num_parts, part_id=part_id, log=click.echo,
                             case_log=lambda m: click.echo(m, err=True), engine=engine, amp=not no_amp,
                             output_format=output_format)
    except FileNotFoundError as e:  # a configuration or fold without a trained checkpoint
        fail([str(e)])
        return
    click.echo(report.summary())
    if report.failed:  # each named above; 2 when nothing could be predicted, 1 when some cases were
        sys.exit(2 if not report.written and not report.skipped_existing else 1)


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


@main.command("find-best")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Work folder of DATASET when not the default (as for plan).")
@click.option("-c", "--configurations", multiple=True,
              help="Candidates, repeatable: -c 2d -c 3d_fullres (default: every trained configuration).")
@click.option("-f", "--folds", multiple=True, help="Restrict to these folds, repeatable: -f 0 -f 1 (default: all).")
@click.option("--no-ensembles", is_flag=True, help="Do not consider pairwise configuration ensembles.")
@click.option("--no-postprocessing", is_flag=True, help="Do not choose post-processing for the winner.")
def find_best_command(dataset: Path, work_dir: Path | None, configurations: tuple[str, ...], folds: tuple[str, ...],
                      no_ensembles: bool, no_postprocessing: bool) -> None:
    """Compare trained configurations and their ensembles on cross-validation; write find_best.json."""
    ws = existing_workspace(dataset, work_dir, hint="train folds first")
    from automedseg.model_selection import find_best

    try:
        result = find_best(ws, configurations=list(configurations) or None,
                           folds=[parse_fold(f) for f in folds] or None, ensembles=not no_ensembles,
                           postprocess=not no_postprocessing, log=click.echo)
    except ValueError as e:
        fail([str(e)])
        return
    for line in result.summary():  # the winner and its post-processing, once each (find_best logs neither)
        click.echo(line)
    click.echo(f"written to {ws.root / 'find_best.json'}; predict with:\n  {result.best.predict_command}")


@main.command("export")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--work-dir", type=click.Path(path_type=Path), default=None, help="Work folder (as for plan).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="The .zip to write.")
@click.option("-c", "--configuration", default=None,
              help="Configuration or ensemble like 2d+3d_fullres (default: find_best.json's choice).")
@click.option("-f", "--folds", multiple=True, help="Folds to export, repeatable: -f 0 -f 1, or -f 0,1 (default: all).")
@click.option("--onnx", is_flag=True, help="Add one ONNX graph and JSON sidecar per fold (needs automedseg[export]).")
@click.option("--onnx-exporter", type=click.Choice(["auto", "dynamo", "legacy"]), default="auto", show_default=True,
              help="torch.onnx exporter (auto: dynamo when onnxscript is installed, else the TorchScript one).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def export_command(dataset: Path, work_dir: Path | None, output: Path, configuration: str | None,
                   folds: tuple[str, ...], onnx: bool, onnx_exporter: str, overwrite: bool) -> None:
    """Write a trained model as one self-contained zip (plans, weights, post-processing, CV figures, manifest)."""
    ws = existing_workspace(dataset, work_dir, hint="train a model first")
    from automedseg.bundle_export import export_model

    fold_ids = [parse_fold(v) for f in folds for v in f.split(",")]
    try:
        manifest = export_model(ws, output, configuration=configuration, folds=fold_ids or None, onnx=onnx,
                                onnx_exporter=onnx_exporter, overwrite=overwrite, log=click.echo)
    except FileNotFoundError as e:  # a configuration or fold without a trained checkpoint
        fail([str(e)])
        return
    click.echo(f"written {output} ({manifest.configuration}); use it with:\n"
               f"  automedseg predict -i INPUT -o OUTPUT --model {output}\n"
               f"  automedseg import-model {output} --into MODEL_DIR")


@main.command("import-model")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--into", required=True, type=click.Path(path_type=Path),
              help="Folder to create (must not exist or be empty).")
def import_model(bundle: Path, into: Path) -> None:
    """Verify a model bundle (paths, file types, sizes, SHA-256) and extract it into a new folder."""
    from automedseg.bundle import import_bundle

    m = import_bundle(bundle, into, log=click.echo)
    folds = "; ".join(f"{c} folds {', '.join(m.folds[c])}" for c in m.members)
    click.echo(f"{into}: {m.dataset_name}, {m.configuration} ({folds}), labels {m.labels}; made with automedseg "
               f"{m.automedseg_version}, torch {m.torch_version}")
    click.echo(f"predict with: automedseg predict -i INPUT -o OUTPUT -d {into}")


@main.command()
@click.argument("reference_dir", type=click.Path(path_type=Path))
@click.argument("prediction_dir", type=click.Path(path_type=Path))
@click.option("--labels", multiple=True, type=int, help="Labels to score, repeatable (default: all in the references).")
@click.option("--tolerance-mm", default=1.0, show_default=True, help="Tolerance of the normalised surface Dice.")
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=None,
              help="Where the CSV/JSON go (default: PREDICTION_DIR).")
def evaluate(reference_dir: Path, prediction_dir: Path, labels: tuple[int, ...], tolerance_mm: float,
             output_dir: Path | None) -> None:
    """Score masks against references: Dice, IoU, precision, recall, HD95, ASSD, NSD, volume difference."""
    require_folder(reference_dir, "reference folder")
    require_folder(prediction_dir, "prediction folder")
    import warnings

    from automedseg import api

    try:
        with warnings.catch_warnings():  # geometry warnings come back in the summary and are printed below
            warnings.simplefilter("ignore", UserWarning)
            summary = api.evaluate(reference_dir, prediction_dir, labels=labels, tolerance_mm=tolerance_mm,
                                   output_dir=output_dir)
    except ValueError as e:
        fail([str(e)])
        return
    for label, m in summary.per_label.items():
        click.echo(f"label {label}: Dice {m['dice']:.4f}  HD95 {m['hd95']:.2f} mm  "
                   f"NSD@{tolerance_mm:g}mm {m['nsd']:.4f}")
    for note in summary.geometry_warnings:
        click.echo(f"warning: {note}", err=True)
    if summary.missing_predictions:
        click.echo(f"missing predictions: {', '.join(summary.missing_predictions)}", err=True)
    click.echo(f"written to {summary.output_dir}")


@main.command("report")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--work-dir", type=click.Path(path_type=Path), default=None, help="Work folder (as for plan).")
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=None,
              help="Where report.html, report.md and the figures go (default: WORK/report).")
def report_command(dataset: Path, work_dir: Path | None, output_dir: Path | None) -> None:
    """Write report.html (self-contained) and report.md of everything trained so far; lists what is missing."""
    ws = existing_workspace(dataset, work_dir, hint="run `automedseg plan` first")
    from automedseg.report import write_report

    html_path = write_report(ws, output_dir)
    click.echo(f"report: {html_path} and {html_path.with_name('report.md')}")


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
