"""The CLI commands that use trained models: predict, find-best, export, import-model, evaluate and report.

Each is a :class:`click.Command` that :mod:`automedseg.cli` adds to its ``main`` group (which turns their errors
into messages and exit codes); the commands that make the models (check, import, plan, train, search, adapt, demo)
are in :mod:`automedseg.cli`. Heavy imports (torch, SimpleITK, scipy) happen inside the commands so
``automedseg --help`` stays instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from automedseg.cli_support import existing_workspace, fail, parse_fold, require_folder
from automedseg.progress_events import open_progress, progress_option


@click.command()
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
@click.option("--uncertainty", is_flag=True,
              help="Also write per-voxel entropy and fold-disagreement maps (OUTPUT/uncertainty/) and "
                   "uncertainty_summary.json, the least certain cases first.")
@click.option("--match-intensities", is_flag=True,
              help="Images from another scanner or site: map each image's foreground (nonzero) intensities onto "
                   "the training images' percentiles before the plan's normalisation (histogram matching).")
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
@progress_option
def predict(input_dir: Path, output_dir: Path, target: Path | None, model: Path | None, work_dir: Path | None,
            configuration: str | None, folds: tuple[str, ...], step: float, no_mirror: bool,
            no_postprocessing: bool, save_probabilities: bool, overlays: bool, uncertainty: bool,
            match_intensities: bool, overwrite: bool,
            device: str | None, threads: int | None, num_parts: int, part_id: int, engine: str, no_amp: bool,
            output_format: str, progress_format: str) -> None:
    """Segment a folder of images with trained folds (ensembled), post-processed as CV chose."""
    events = open_progress(progress_format)
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
                             output_format=output_format, uncertainty=uncertainty,
                             match_intensities=match_intensities)
    except FileNotFoundError as e:  # a configuration or fold without a trained checkpoint
        fail([str(e)])
        return
    click.echo(report.summary())
    if events is not None:
        events.note(written=len(report.written), kept=len(report.skipped_existing), failed=len(report.failed))
    if report.failed:  # each named above; 2 when nothing could be predicted, 1 when some cases were
        sys.exit(2 if not report.written and not report.skipped_existing else 1)


@click.command("find-best")
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


@click.command("export")
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


@click.command("import-model")
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


@click.command()
@click.argument("reference_dir", type=click.Path(path_type=Path))
@click.argument("prediction_dir", type=click.Path(path_type=Path))
@click.option("--labels", multiple=True, type=int, help="Labels to score, repeatable (default: all in the references).")
@click.option("--tolerance-mm", default=1.0, show_default=True, help="Tolerance of the normalised surface Dice.")
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=None,
              help="Where the CSV/JSON go (default: PREDICTION_DIR).")
@click.option("--probabilities", "probabilities_dir", type=click.Path(path_type=Path), default=None,
              help="Folder of the cases' class probabilities (CASE.npz, from predict --save-probabilities): adds "
                   "voxel-level precision-recall curves and average precision per label.")
def evaluate(reference_dir: Path, prediction_dir: Path, labels: tuple[int, ...], tolerance_mm: float,
             output_dir: Path | None, probabilities_dir: Path | None) -> None:
    """Score masks against references: Dice, IoU, precision, recall, HD95, ASSD, NSD, volume difference."""
    require_folder(reference_dir, "reference folder")
    require_folder(prediction_dir, "prediction folder")
    if probabilities_dir is not None:
        require_folder(probabilities_dir, "probabilities folder")
    import warnings

    from automedseg import api

    try:
        with warnings.catch_warnings():  # geometry warnings come back in the summary and are printed below
            warnings.simplefilter("ignore", UserWarning)
            summary = api.evaluate(reference_dir, prediction_dir, labels=labels, tolerance_mm=tolerance_mm,
                                   output_dir=output_dir, probabilities=probabilities_dir)
    except ValueError as e:
        fail([str(e)])
        return
    for label, m in summary.per_label.items():
        curve = summary.pr_curves.get(label)
        ap = "" if curve is None else "  AP -" if curve.average_precision is None else \
            f"  AP {curve.average_precision:.4f}"
        click.echo(f"label {label}: Dice {m['dice']:.4f}  HD95 {m['hd95']:.2f} mm  "
                   f"NSD@{tolerance_mm:g}mm {m['nsd']:.4f}{ap}")
    for note in summary.geometry_warnings:
        click.echo(f"warning: {note}", err=True)
    if summary.missing_predictions:
        click.echo(f"missing predictions: {', '.join(summary.missing_predictions)}", err=True)
    click.echo(f"written to {summary.output_dir}")


@click.command("report")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--work-dir", type=click.Path(path_type=Path), default=None, help="Work folder (as for plan).")
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=None,
              help="Where report.html, report.md and the figures go (default: WORK/report).")
@click.option("--evaluation", "evaluations", multiple=True, type=click.Path(path_type=Path),
              help="An evaluation folder (evaluate's output) whose precision-recall curves to show; repeatable.")
@click.option("--predictions", multiple=True, type=click.Path(path_type=Path),
              help="A predict --uncertainty output folder whose least certain cases to list; repeatable.")
def report_command(dataset: Path, work_dir: Path | None, output_dir: Path | None, evaluations: tuple[Path, ...],
                   predictions: tuple[Path, ...]) -> None:
    """Write report.html (self-contained) and report.md of everything trained so far; lists what is missing."""
    ws = existing_workspace(dataset, work_dir, hint="run `automedseg plan` first")
    for folder in evaluations:
        require_folder(folder, "evaluation folder")
    for folder in predictions:
        require_folder(folder, "predictions folder")
    from automedseg.report import write_report

    html_path = write_report(ws, output_dir, evaluations=evaluations, predictions=predictions)
    click.echo(f"report: {html_path} and {html_path.with_name('report.md')}")


MODEL_COMMANDS = (predict, find_best_command, export_command, import_model, evaluate, report_command)
"""The commands of this module, in the order they are added to ``main``."""
