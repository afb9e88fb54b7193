"""Predicting with a work folder: which configuration (``find_best.json``), which folds, which post-processing.

:func:`run_predict` is what ``automedseg predict`` calls: it resolves the configuration (or ensemble, like
``2d+3d_fullres``) from ``find_best.json`` unless one is given, finds the trained folds of each member and checks
them against the work folder's plan, loads the post-processing chosen on cross-validation, and then predicts a
folder with :func:`automedseg.inference.predict_folder`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from automedseg.best_choice import find_best_path, read_find_best
from automedseg.errors import InputError
from automedseg.inference import (
    FolderReport,
    Postprocess,
    check_output_folder,
    check_step,
    find_folds,
    predict_folder,
)
from automedseg.postprocessing import Postprocessing, apply_postprocessing, postprocessing_path
from automedseg.workspace import Workspace

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def best_configuration(ws: Workspace) -> str:
    """The configuration (or ``+``-joined ensemble) ``find_best.json`` chose.

    Raises:
        InputError: ``find_best.json`` is missing or has no best configuration.
    """
    best = find_best_path(ws)
    if not best.is_file():
        raise InputError(f"{best}: missing; pass -c CONFIGURATION or run `automedseg find-best` first")
    try:
        return read_find_best(best).best.candidate.name
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{best}: damaged (no best configuration); run `automedseg find-best` again or pass -c") \
            from None


def _postprocessing(path: Path, log: Log) -> tuple[Postprocess, list[str]]:
    choice = Postprocessing.load(path)
    ops = choice.operations()
    log(f"post-processing from {path}: {'; '.join(ops) if ops else 'none'}")

    def post(seg: np.ndarray, spacing_mm: tuple[float, ...]) -> np.ndarray:
        return apply_postprocessing(seg, choice, spacing_mm=spacing_mm)

    return post, list(ops)


@dataclass(frozen=True)
class ModelChoice:
    """What a work folder predicts with: the configuration (or ensemble), its trained folds, the post-processing.

    Attributes:
        configuration: A configuration or ``+``-joined ensemble.
        fold_groups: The fold folders of each member configuration, in the order of ``configuration``.
        postprocessing: The post-processing chosen on cross-validation, ``None`` when there is none (or it is off).
        postprocessing_operations: What it does, one line per operation (empty when none).
    """

    configuration: str
    fold_groups: list[list[Path]]
    postprocessing: Postprocess | None
    postprocessing_operations: tuple[str, ...] = ()


def choose_model(ws: Workspace, *, configuration: str | None = None, folds: Sequence[int | str] | None = None,
                 postprocess: bool = True, check_bundle: bool = True, threads: int | None = None,
                 log: Log = _quiet) -> ModelChoice:
    """Resolve what :func:`run_predict` predicts with, checking every fold against the work folder's plan.

    Args:
        ws: The work folder (or an imported model folder).
        configuration: A configuration or ``+``-joined ensemble; ``None``: the imported model's, else
            ``find_best.json``'s choice.
        folds: Folds to ensemble (``None``: all trained).
        postprocess: Use the post-processing chosen on cross-validation when there is one.
        check_bundle: When ``ws`` is an imported model, check its files against its manifest first.
        threads: Torch CPU threads (``None``: leave as is).
        log: Where the post-processing used is noted.

    Raises:
        InputError: No usable ``find_best.json``, folds trained on another plan, an imported model whose files
            differ from its manifest.
        FileNotFoundError: A configuration or fold without a trained checkpoint.
    """
    if check_bundle:
        from automedseg.bundle import verify_folder

        manifest = verify_folder(ws.root)  # an imported model: every file against its manifest
        if manifest is not None and configuration is None:
            configuration = manifest.configuration
    if configuration is None:
        configuration = best_configuration(ws)
    import torch

    if threads:
        torch.set_num_threads(threads)
    members = configuration.split("+")
    groups = [find_folds(ws.configuration_dir(m), list(folds) if folds else None) for m in members]
    from automedseg.trained import check_folds_match

    for member, group in zip(members, groups):  # each fold against the plan the work folder has for it
        check_folds_match(ws, member, group)
    pp_path = postprocessing_path(ws, configuration)
    if not (postprocess and pp_path.is_file()):
        return ModelChoice(configuration, groups, None)
    post, ops = _postprocessing(pp_path, log)
    return ModelChoice(configuration, groups, post, tuple(ops))


def run_predict(ws: Workspace, input_dir: Path, output_dir: Path, *, configuration: str | None = None,
                folds: Sequence[int | str] | None = None, step: float = 0.5, mirror: bool = True,
                postprocess: bool = True, save_probabilities: bool = False, overlays: bool = False,
                overwrite: bool = False, device: str | None = None, threads: int | None = None,
                progress: bool = False, num_parts: int = 1, part_id: int = 0, log: Log = _quiet,
                case_log: Log = print, engine: str = "torch", check_bundle: bool = True,
                amp: bool = True, output_format: str = "image", uncertainty: bool = False,
                match_intensities: bool = False) -> FolderReport:
    """Segment a folder of images with the trained folds of a work folder (ensembled), post-processed as CV chose.

    Args:
        ws: The work folder.
        input_dir: Images in nnU-Net layout or one (4D) file per case.
        output_dir: Where masks go (refused when it overlaps ``input_dir``; checked before anything is loaded).
        configuration: A configuration or ``+``-joined ensemble; ``None``: ``find_best.json``'s choice.
        folds: Folds to ensemble (``None``: all trained).
        postprocess: Apply the post-processing chosen on cross-validation when there is one.
        threads: Torch CPU threads (``None``: leave as is).
        log: Where notes go (the post-processing used).
        case_log: Where per-case problems go.
        engine: ``torch`` or ``onnxruntime`` (the folds' ONNX graphs, from ``automedseg export --onnx``).
        check_bundle: When ``ws`` is an imported model (``automedseg import-model``), check its files against
            its manifest first; its manifest's configuration is the default.
        uncertainty: Also write per-voxel entropy and fold-disagreement maps of each case, and
            ``uncertainty_summary.json`` listing the least certain cases first (:mod:`automedseg.uncertainty`;
            written while the output folder is locked, merging the cases of every part predicted into it); its
            one-line summary goes to ``log``.
        match_intensities: Map each image's foreground intensities onto the training images' landmarks before
            the plan's preprocessing (histogram matching, :mod:`automedseg.intensity_reference`).
        Others: as :func:`automedseg.inference.predict_folder`.

    Raises:
        InputError: A bad step, overlapping folders, no usable ``find_best.json``, folds trained on another plan,
            an imported model whose files differ from its manifest.
        FileNotFoundError: A configuration or fold without a trained checkpoint.
    """
    check_step(step)
    check_output_folder(input_dir, output_dir)  # before anything is loaded or written
    choice = choose_model(ws, configuration=configuration, folds=folds, postprocess=postprocess,
                          check_bundle=check_bundle, threads=threads, log=log)
    groups, post = choice.fold_groups, choice.postprocessing
    segmenter = None
    summarize: Callable[[FolderReport], None] | None = None
    if uncertainty:
        from automedseg.uncertainty import SUMMARY_FILE, uncertainty_segmenter, write_uncertainty_summary

        segmenter = uncertainty_segmenter

        def write_summary(report: FolderReport) -> None:  # under the output folder's lock (predict_folder)
            summary = write_uncertainty_summary(output_dir, cases=[*report.written, *report.skipped_existing])
            log(f"{summary.describe()}: {Path(output_dir) / SUMMARY_FILE}")

        summarize = write_summary
    if match_intensities:
        from automedseg.intensity_reference import matching_segmenter

        segmenter = matching_segmenter(ws, choice.configuration.split("+"), segmenter, log=log)
    return predict_folder(input_dir, output_dir, groups, device=device, step=step, mirror=mirror,
                          overwrite=overwrite, save_probabilities=save_probabilities, postprocessing=post,
                          overlays=overlays, progress=progress, num_parts=num_parts, part_id=part_id, log=case_log,
                          engine=engine, amp=amp, output_format=output_format, case_segmenter=segmenter,
                          after_cases=summarize)


def run_predict_model(model: Path, input_dir: Path, output_dir: Path, *, configuration: str | None = None,
                      **kwargs: Any) -> FolderReport:
    """:func:`run_predict` with a model bundle (``automedseg export``'s zip) or a folder it was imported into.

    A zip is verified in full (:func:`automedseg.bundle.verify_bundle`) and extracted into a temporary folder
    that is removed afterwards; a folder is checked against its manifest. The default configuration is the
    bundle's choice.

    Raises:
        InputError: The bundle is refused, or ``model`` is a folder without a bundle manifest.
    """
    from automedseg.bundle import extracted_bundle, verify_folder

    model = Path(model)
    check_step(kwargs.get("step", 0.5))
    check_output_folder(input_dir, output_dir)
    if model.is_dir():
        manifest = verify_folder(model)
        if manifest is None:
            raise InputError(f"{model}: not a model bundle folder (no automedseg manifest.json); pass a work "
                             "folder with -d")
        return run_predict(Workspace(model), input_dir, output_dir, configuration=configuration or
                           manifest.configuration, check_bundle=False, **kwargs)
    with extracted_bundle(model) as (folder, manifest):
        return run_predict(Workspace(folder), input_dir, output_dir, configuration=configuration or
                           manifest.configuration, check_bundle=False, **kwargs)
