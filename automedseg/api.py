"""The Python API: plan, train, predict and evaluate from a script or a notebook.

These are the functions the ``automedseg`` commands call (``plan``, ``train``, ``predict``, ``evaluate``), so a
notebook gets exactly what the command line gets, plus :func:`load_model`, which keeps a trained model in memory
and segments NumPy arrays and SimpleITK images. Each is also importable from the package itself
(``automedseg.plan`` ...). Errors in what is passed (a missing folder, a bad option, a damaged file) raise
:class:`automedseg.errors.InputError`, a ``ValueError`` whose message names the file or option.

Example:
    >>> import automedseg
    >>> plans = automedseg.plan("Dataset_Demo", work_dir="work", time_budget="10m")  # doctest: +SKIP
    >>> fold = automedseg.train("work", configuration="3d_fullres", fold=0)  # doctest: +SKIP
    >>> model = automedseg.load_model("work", configuration="3d_fullres")  # doctest: +SKIP
    >>> mask = model.predict(volume_zyx, spacing_mm=(3.0, 0.8, 0.8))  # doctest: +SKIP

The work folder of a dataset is, as for the commands, ``work_dir`` when given, else
``$AUTOMEDSEG_WORK_DIR/<dataset name>`` when that is set, else ``DATASET/automedseg``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, cast, overload

from automedseg.durations import duration_seconds

if TYPE_CHECKING:
    import numpy as np
    import SimpleITK as sitk

    from automedseg.inference import FolderReport
    from automedseg.metrics import EvaluationSummary
    from automedseg.plans import Plans
    from automedseg.predictor import Predictor
    from automedseg.training_options import FoldResult
    from automedseg.workspace import Workspace

    _InMemory: TypeAlias = "dict[str, np.ndarray] | np.ndarray | sitk.Image | list[np.ndarray | sitk.Image]"

__all__ = ["plan", "train", "predict", "evaluate", "load_model", "duration_seconds"]

Log = Callable[[str], None]
PathLike = str | Path


def _quiet(_: str) -> None:
    pass


def _workspace(target: PathLike, work_dir: PathLike | None) -> Workspace:
    """A work folder given directly (it holds plans.json), else the work folder of a dataset folder."""
    from automedseg.cli_support import resolve_workspace

    return resolve_workspace(Path(target), Path(work_dir) if work_dir is not None else None)


def plan(dataset: PathLike, *, work_dir: PathLike | None = None, time_budget: float | str | None = None,
         configurations: Sequence[str] | None = None, jobs: int = 2, device: str = "auto",
         architecture: str = "plain_unet", seed: int = 12345, threads: int | None = None, overwrite: bool = False,
         preprocess: bool = True, calibration_cache: PathLike | bool = True, recalibrate: bool = False,
         replan: Sequence[str] = (), progress: bool = False, log: Log | None = print) -> Plans:
    """Check, fingerprint, plan and preprocess a raw dataset (``automedseg plan``).

    Args:
        dataset: The raw dataset folder (nnU-Net v2 or Medical Segmentation Decathlon layout), only read.
        work_dir: Where the plan and the cache go (default: see the module's note).
        time_budget: Training wall-clock budget per fold, in seconds or as text like ``30m`` (default: 30 min on
            a CPU; on a GPU none, nnU-Net's 1000 epochs x 250 iterations).
        configurations: Configurations to plan: ``2d``, ``3d_fullres``, ``3d_lowres`` (default: all that apply).
        jobs: Parallel processes for the fingerprint and the preprocessing.
        device: Plan for ``auto``, ``cpu``, ``cuda``, ``mps``, or a nominal profile (``reference-cpu-2core``,
            ``reference-gpu-24g``) that needs no timing.
        architecture: ``plain_unet`` (nnU-Net's default) or ``residual_unet`` for every configuration; or
            ``attention_unet``, ``aspp_unet``, ``segnet_unet``: the plain configurations plus a variant of each,
            ``<configuration>_<architecture>`` (:func:`automedseg.planning.plan_dataset`).
        seed: Training seed written into the plan.
        threads: CPU threads for training (default: all cores).
        overwrite: Recompute the fingerprint and every cached case.
        preprocess: ``False``: stop after writing ``plans.json``.
        calibration_cache: The machine's speed calibration: ``True``, the cache the commands use
            (``$AUTOMEDSEG_CALIBRATION``, else ``~/.cache/automedseg/calibration.json``); a path, that file;
            ``False``, time the device on every call and cache nothing.
        recalibrate: Time the device again although a calibration is cached.
        replan: Configurations to plan afresh although folds of them are trained (their folder is moved aside).
        progress: Show progress bars.
        log: Where messages go (``None``: nowhere).

    Returns:
        The plan, as written to ``plans.json`` in the work folder.

    Raises:
        DatasetError: Every problem of the dataset, one per line (the rules of ``automedseg check``).
        InputError: A bad option (``device``, ``time_budget``, ``replan``); another ``plan`` holds the folder.
    """
    from automedseg.cli_support import calibration_cache_path, workspace_for
    from automedseg.errors import InputError
    from automedseg.pipeline import run_plan

    if not Path(dataset).is_dir():
        raise InputError(f"{dataset}: dataset folder does not exist")
    cache = calibration_cache_path() if calibration_cache is True else \
        None if calibration_cache is False else Path(calibration_cache)
    ws = workspace_for(Path(dataset), Path(work_dir) if work_dir is not None else None)
    return run_plan(Path(dataset), ws, configurations=list(configurations) if configurations else None, jobs=jobs,
                    device=device, time_budget_s=duration_seconds(time_budget), architecture=architecture,
                    seed=seed, threads=threads, overwrite=overwrite, preprocess=preprocess, progress=progress,
                    calibration_cache=cache, recalibrate=recalibrate, replan=tuple(replan), log=log or _quiet)


def train(dataset_or_work_dir: PathLike, *, configuration: str = "3d_fullres", fold: int | str = 0,
          work_dir: PathLike | None = None, time_budget: float | str | None = None, device: str | None = None,
          epochs: int | None = None, iterations_per_epoch: int | None = None,
          early_stopping_patience: int | None = None, pretrained: PathLike | None = None, restart: bool = False,
          threads: int | None = None, workers: int | None = None, amp: bool = True, validate: bool = True,
          augment_on: str = "auto", distributed: bool = False, progress: bool = False,
          mlflow_uri: str | None = None, trackers: Sequence[Any] | None = None,
          log: Log | None = print) -> FoldResult:
    """Train one fold of the 5-fold cross-validation, or ``"all"`` cases (``automedseg train``); re-running resumes.

    Args:
        dataset_or_work_dir: A planned work folder (it holds ``plans.json``) or the dataset folder it belongs to.
        configuration: A configuration of ``plans.json`` (``2d``, ``3d_fullres``, ``3d_lowres``, or one
            ``automedseg search`` added, like ``3d_fullres_searched``).
        fold: 0-4, or ``"all"``.
        work_dir: The work folder when ``dataset_or_work_dir`` is a dataset whose work folder is elsewhere.
        time_budget: Fit training into this wall time, in seconds or as text like ``20m`` (default: the plan's).
        device: ``cpu``, ``cuda`` (or ``cuda:K``), ``mps``; default: CUDA if present, else MPS, else the CPU.
        epochs: Override the plan's number of epochs.
        iterations_per_epoch: Override the plan's iterations per epoch.
        early_stopping_patience: Stop after this many epochs without a better EMA pseudo-Dice.
        pretrained: Initialise from another automedseg checkpoint (the layers that match).
        restart: Discard the fold's checkpoints and start again.
        threads: Torch CPU threads.
        workers: Augmentation worker processes (0: in-process).
        amp: Mixed precision where the device computes in it natively; ``False``: float32.
        validate: Run the final sliding-window validation of the fold's held-out cases.
        augment_on: ``auto`` (the device when it is CUDA), ``device`` or ``workers``.
        distributed: Join the process group ``torchrun`` set up (DistributedDataParallel).
        progress: Show a progress bar.
        mlflow_uri: Also log the run to this MLflow tracking URI (needs ``automedseg[mlflow]``).
        trackers: Tracker factories (:mod:`automedseg.tracking`) instead of the defaults (TensorBoard when
            installed, plus MLflow with ``mlflow_uri``); ``()``: none.
        log: Where messages go, one line per epoch (``None``: nowhere).

    Returns:
        The fold's result: its folder, epochs run, best EMA pseudo-Dice, training time and validation summary
        (``validation["mean_dice"]``; ``None`` without validation).

    Raises:
        InputError: No plan yet, an unknown configuration or fold, a fold trained with another plan, another
            process training the fold.
    """
    from automedseg.errors import InputError
    from automedseg.tracking import training_trackers
    from automedseg.training import TrainOptions, train_fold

    ws = _workspace(dataset_or_work_dir, work_dir)
    if not ws.plans_path.is_file():
        raise InputError(f"{ws.plans_path}: no plan yet; run automedseg.plan({str(dataset_or_work_dir)!r}) first")
    choices = {"auto": None, "device": True, "workers": False}
    if augment_on not in choices:
        raise InputError(f"augment_on {augment_on!r}: use auto, device or workers")
    options = TrainOptions(
        distributed=distributed, device=device, epochs=epochs, iterations_per_epoch=iterations_per_epoch,
        time_budget_s=duration_seconds(time_budget), restart=restart,
        pretrained=Path(pretrained) if pretrained is not None else None,
        early_stopping_patience=early_stopping_patience, threads=threads, num_workers=workers, amp=amp,
        validate=validate, progress=progress, augment_on_device=choices[augment_on],
        trackers=tuple(trackers) if trackers is not None else training_trackers(mlflow_uri=mlflow_uri))
    return train_fold(ws, configuration, fold, options=options, log=log or _quiet)


def _model_workspace(model: PathLike, work_dir: PathLike | None) -> Workspace | None:
    """The work folder a model path names, or ``None`` when it is a bundle (or names nothing usable)."""
    from automedseg.workspace import Workspace

    if work_dir is not None:
        return Workspace(Path(work_dir))
    path = Path(model)
    if path.is_dir():
        ws = _workspace(path, None)  # itself when it holds plans.json, else the dataset's work folder
        if ws.plans_path.is_file():
            return ws
    return None


def load_model(work_dir_or_bundle: PathLike, *, configuration: str | None = None,
               folds: Sequence[int | str] | None = None, device: str | None = None, work_dir: PathLike | None = None,
               postprocess: bool = True, engine: str = "torch", threads: int | None = None,
               log: Log | None = print) -> Predictor:
    """Load a trained model into memory, as ``automedseg predict`` would use it, to segment arrays and images.

    Args:
        work_dir_or_bundle: A work folder, the dataset folder it belongs to, a model bundle (``automedseg export``'s
            zip, verified in full before use) or a folder a bundle was imported into.
        configuration: A configuration or ``+``-joined ensemble like ``2d+3d_fullres``; default: the bundle's, else
            ``find_best.json``'s choice.
        folds: Folds to ensemble (default: every trained fold).
        device: ``cpu``, ``cuda``, ``mps``; default: CUDA if present, else MPS, else the CPU.
        work_dir: The work folder when ``work_dir_or_bundle`` is a dataset whose work folder is elsewhere.
        postprocess: Apply the post-processing chosen on cross-validation (``find-best``) when there is one.
        engine: ``torch``, or ``onnxruntime`` (the bundle's ONNX graphs, from ``automedseg export --onnx``).
        threads: Torch CPU threads (``None``: leave as is).
        log: Where notes go: the post-processing used (``None``: nowhere).

    Returns:
        A `Predictor`: ``model.predict(array, spacing_mm=...)`` or ``model.predict(sitk_image)``.

    Raises:
        InputError: No trained model there, no ``find_best.json`` and no ``configuration``, a fold trained with
            another plan, a bundle that fails verification.
        FileNotFoundError: A configuration or fold without a trained checkpoint.
    """
    from automedseg.errors import InputError
    from automedseg.predictor import load_predictor
    from automedseg.workspace import Workspace

    options: dict[str, Any] = dict(folds=folds, device=device, postprocess=postprocess, engine=engine,
                                   threads=threads, log=log or _quiet)
    ws = _model_workspace(work_dir_or_bundle, work_dir)
    if ws is not None:
        return load_predictor(ws, configuration=configuration, **options)
    path = Path(work_dir_or_bundle)
    if path.is_dir():
        raise InputError(f"{path}: not a model: no plans.json (a work folder or an imported bundle) in it or in its "
                         "work folder; train a model first, or pass work_dir")
    if not path.is_file():
        raise InputError(f"{path}: no such work folder, dataset folder or model bundle")
    from automedseg.bundle import extracted_bundle

    with extracted_bundle(path) as (folder, manifest):  # the weights are in memory when the folder is removed
        return load_predictor(Workspace(folder), configuration=configuration or manifest.configuration,
                              check_bundle=False, **options)


@overload
def predict(images: PathLike, *, model: PathLike, output_dir: PathLike, work_dir: PathLike | None = None,
            configuration: str | None = None, folds: Sequence[int | str] | None = None,
            spacing_mm: Sequence[float] | None = None, step: float = 0.5, mirror: bool = True,
            postprocess: bool = True, save_probabilities: bool = False, overlays: bool = False,
            uncertainty: bool = False, match_intensities: bool = False,
            overwrite: bool = False, device: str | None = None, threads: int | None = None, engine: str = "torch",
            amp: bool = True, output_format: str = "image", num_parts: int = 1, part_id: int = 0,
            progress: bool = False, log: Log | None = print, case_log: Log | None = print,
            ) -> FolderReport: ...


@overload
def predict(images: PathLike | np.ndarray | sitk.Image | Sequence[np.ndarray | sitk.Image], *,
            model: PathLike | Predictor, output_dir: None = None, work_dir: PathLike | None = None,
            configuration: str | None = None, folds: Sequence[int | str] | None = None,
            spacing_mm: Sequence[float] | None = None, step: float = 0.5, mirror: bool = True,
            postprocess: bool = True, save_probabilities: bool = False, overlays: bool = False,
            uncertainty: bool = False, match_intensities: bool = False,
            overwrite: bool = False, device: str | None = None, threads: int | None = None, engine: str = "torch",
            amp: bool = True, output_format: str = "image", num_parts: int = 1, part_id: int = 0,
            progress: bool = False, log: Log | None = print, case_log: Log | None = print,
            ) -> _InMemory: ...


def predict(images: PathLike | np.ndarray | sitk.Image | Sequence[np.ndarray | sitk.Image], *,
            model: PathLike | Predictor, output_dir: PathLike | None = None, work_dir: PathLike | None = None,
            configuration: str | None = None, folds: Sequence[int | str] | None = None,
            spacing_mm: Sequence[float] | None = None, step: float = 0.5, mirror: bool = True,
            postprocess: bool = True, save_probabilities: bool = False, overlays: bool = False,
            uncertainty: bool = False, match_intensities: bool = False,
            overwrite: bool = False, device: str | None = None, threads: int | None = None, engine: str = "torch",
            amp: bool = True, output_format: str = "image", num_parts: int = 1, part_id: int = 0,
            progress: bool = False, log: Log | None = print, case_log: Log | None = print,
            ) -> FolderReport | dict[str, np.ndarray] | np.ndarray | sitk.Image | list[np.ndarray | sitk.Image]:
    """Segment images with a trained model (``automedseg predict``): a folder into files, or images in memory.

    With ``output_dir``, ``images`` is a folder and one mask per case is written there with exactly the input's
    geometry, as the command does (existing masks are kept unless ``overwrite``; a case that cannot be read is
    reported to ``case_log`` and skipped). Without it, nothing is written and the label maps are returned.

    Args:
        images: A folder of images (nnU-Net ``_0000`` files, one (4D) file per case, or DICOM series one per
            subfolder), or in memory one NumPy array or SimpleITK image, or a list of them (see
            `Predictor.predict` for the array conventions).
        model: A work folder, the dataset folder it belongs to, a model bundle zip or imported bundle folder, or
            (in memory only) a model :func:`load_model` returned.
        output_dir: Where the masks go; refused when it is, contains or lies inside ``images``.
        work_dir: The work folder when ``model`` is a dataset whose work folder is elsewhere.
        configuration: A configuration or ``+``-joined ensemble (default: the bundle's, else ``find_best.json``'s).
        folds: Folds to ensemble (default: every trained fold).
        spacing_mm: The voxel spacing of NumPy arrays, in array order (default 1 mm).
        step: Tile step as a fraction of the patch, in (0, 1].
        mirror: Test-time mirroring.
        postprocess: Apply the post-processing chosen on cross-validation.
        save_probabilities: Also write ``<case>.npz`` with the class probabilities (files only).
        overlays: Also write PNG overlays of a few slices per case (files only).
        uncertainty: Also write per-voxel entropy and fold-disagreement maps and ``uncertainty_summary.json``, the
            least certain cases first (files only; :mod:`automedseg.uncertainty`).
        match_intensities: Map each image's foreground intensities onto the training images' landmarks before
            the plan's preprocessing: histogram matching for images from another scanner or site (files only;
            :mod:`automedseg.intensity_reference`).
        overwrite: Predict cases whose mask exists again (files only).
        device: ``cpu``, ``cuda``, ``mps``; default: CUDA if present, else MPS, else the CPU.
        threads: Torch CPU threads.
        engine: ``torch``, or ``onnxruntime`` (a bundle's ONNX graphs).
        amp: bf16 / fp16 inference where the device computes in it natively.
        output_format: ``image`` (the input's format) or ``dicom-seg`` (DICOM series input; files only).
        num_parts: Split the cases over this many workers ... (files only)
        part_id: ... and predict this part, 0-based (files only).
        progress: Show a progress bar (files only).
        log: Where notes go: the post-processing used (``None``: nowhere).
        case_log: Where the cases skipped go, one line each (files only; ``None``: nowhere).

    Returns:
        With ``output_dir``: the `FolderReport` (``written``, ``skipped_existing``, ``failed``; ``summary()`` is the
        line the command prints). Without: for a folder, case name -> label map; for an array, its label map; for a
        SimpleITK image, a mask image with its geometry; for a list, a list.

    Raises:
        InputError: A missing folder, overlapping folders, a bad option, no usable model (as :func:`load_model`);
            in memory, an image the model does not take.
        FileNotFoundError: A configuration or fold without a trained checkpoint.
    """
    from automedseg.errors import InputError
    from automedseg.predictor import Predictor

    if output_dir is not None:
        if not isinstance(images, str | Path):
            raise InputError("output_dir: files are written for a folder of images; for images in memory leave "
                             "output_dir out")
        if isinstance(model, Predictor):
            raise InputError("output_dir: pass the model as a path (work folder or bundle) to write masks; a loaded "
                             "model predicts in memory")
        return _predict_files(Path(images), Path(output_dir), model=model, work_dir=work_dir,
                              configuration=configuration, folds=folds, step=step, mirror=mirror,
                              postprocess=postprocess, save_probabilities=save_probabilities, overlays=overlays,
                              uncertainty=uncertainty, match_intensities=match_intensities,
                              overwrite=overwrite, device=device, threads=threads,
                              engine=engine, amp=amp, output_format=output_format, num_parts=num_parts,
                              part_id=part_id, progress=progress, log=log or _quiet, case_log=case_log or _quiet)
    ignored = {"save_probabilities": save_probabilities, "overlays": overlays, "uncertainty": uncertainty,
               "match_intensities": match_intensities,
               "overwrite": overwrite, "num_parts": num_parts != 1, "part_id": part_id != 0,
               "output_format": output_format != "image"}
    if any(ignored.values()):
        raise InputError(f"{', '.join(k for k, v in ignored.items() if v)}: only with output_dir (files)")
    if isinstance(model, Predictor):
        given = [k for k, v in {"configuration": configuration, "folds": folds, "device": device,
                                "work_dir": work_dir, "threads": threads}.items() if v is not None]
        if given or not postprocess or engine != "torch":
            raise InputError(f"{', '.join(given) or 'postprocess, engine'}: set when the model is loaded "
                             "(automedseg.load_model), not with a loaded model")
        predictor = model
    else:
        predictor = load_model(model, configuration=configuration, folds=folds, device=device, work_dir=work_dir,
                               postprocess=postprocess, engine=engine, threads=threads, log=log)
    options: dict[str, Any] = dict(step=step, mirror=mirror, amp=amp)
    if isinstance(images, str | Path):
        if spacing_mm is not None:
            raise InputError("spacing_mm: image files carry their own spacing; pass it only with arrays")
        return predictor.predict_folder(images, **options)
    if isinstance(images, Sequence):
        return [predictor.predict(cast("np.ndarray | sitk.Image", image), spacing_mm=spacing_mm, **options)
                for image in images]
    return predictor.predict(images, spacing_mm=spacing_mm, **options)


def _predict_files(input_dir: Path, output_dir: Path, *, model: PathLike, work_dir: PathLike | None,
                   configuration: str | None, **options: Any) -> FolderReport:
    from automedseg.prediction import run_predict, run_predict_model

    if not input_dir.is_dir():
        from automedseg.errors import InputError

        raise InputError(f"{input_dir}: input folder does not exist")
    ws = _model_workspace(model, work_dir)
    if ws is None:
        return run_predict_model(Path(model), input_dir, output_dir, configuration=configuration, **options)
    return run_predict(ws, input_dir, output_dir, configuration=configuration, **options)


def evaluate(reference_dir: PathLike, prediction_dir: PathLike, *, labels: Sequence[int] | None = None,
             tolerance_mm: float = 1.0, output_dir: PathLike | None = None,
             probabilities: PathLike | None = None) -> EvaluationSummary:
    """Score masks against references (``automedseg evaluate``): Dice, IoU, precision, recall, HD95, ASSD, NSD.

    Files are paired by name; the spacing is the reference's. The figures are also written, atomically, to
    ``output_dir`` as ``metrics_summary.json``, ``metrics_per_case.json`` and ``metrics_per_case.csv``. A
    prediction whose geometry differs from its reference is scored voxel by voxel with a ``UserWarning``, and
    listed in ``geometry_warnings``.

    Args:
        reference_dir: Folder of reference label maps.
        prediction_dir: Folder of predicted label maps, named as the references.
        labels: Labels to score (default: every non-zero value in the references).
        tolerance_mm: Tolerance of the normalised surface Dice.
        output_dir: Where the figures are written (default: ``prediction_dir``).
        probabilities: Folder of the cases' class probabilities (``<case>.npz``, as ``predict
            --save-probabilities`` writes them; often ``prediction_dir``): adds each label's voxel-level
            precision-recall curve and average precision (``pr_curves``; :mod:`automedseg.pr_curves`).

    Returns:
        The `EvaluationSummary`.

    Raises:
        InputError: A folder does not exist, no prediction matches a reference, a scored case without
            probabilities or with probabilities that do not fit its reference (the message names the file).
        ValueError: No reference images, a pair of different shapes, a label map that is not integral.
    """
    from automedseg.errors import InputError
    from automedseg.metrics import EvaluationSummary, evaluate_folders

    for folder, what in ((reference_dir, "reference folder"), (prediction_dir, "prediction folder"),
                         (probabilities, "probabilities folder")):
        if folder is not None and not Path(folder).is_dir():
            raise InputError(f"{folder}: {what} does not exist")
    out = Path(prediction_dir if output_dir is None else output_dir)
    summary = evaluate_folders(Path(reference_dir), Path(prediction_dir), labels=list(labels) if labels else None,
                               tolerance_mm=tolerance_mm, output_dir=out,
                               probabilities_dir=None if probabilities is None else Path(probabilities))
    return EvaluationSummary.from_dict(summary, output_dir=out)
