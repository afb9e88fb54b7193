"""Adapting a trained model to another scanner or site (``automedseg adapt``).

With a small labelled dataset from the new site, :func:`adapt` makes a new work folder whose plan is the source
model's, copied and frozen (same spacing, normalisation, network), preprocesses the target cases with it, and
fine-tunes each fold from the source fold's weights with the ordinary fold trainer
(:func:`~automedseg.training.train_fold`, composed, not subclassed): for the first ``freeze_fraction`` of the
epochs the encoder is frozen and the decoder trains at the plan's learning rate, then every layer trains at
``lr_factor`` times it, decaying to zero (:class:`FreezeSchedule`, given to the trainer as
``TrainOptions.epoch_hook`` and ``lr_schedule``). The result is a normal model folder: ``automedseg predict -d
WORK -c CONFIGURATION`` uses it, ``find-best``, ``export`` and ``report`` read it.

Without labelled target cases, ``match_intensities`` alone makes a model folder with the source weights whose
plan standardises every image's intensities to the source training images' landmarks before normalising them
(histogram matching, :mod:`automedseg.intensity_matching`); with labelled cases it is applied to them too, before
fine-tuning.

What was done is kept in ``WORK/adapt.json`` (:class:`AdaptRecord`; this module owns the file) and as a note
in the plan.

Example:
    >>> s = FreezeSchedule(fraction=0.3, lr_factor=0.1)
    >>> [s.frozen_epochs(n) for n in (1, 3, 10)]
    [0, 1, 3]
    >>> s.lr(0, 10, 1e-3), round(s.lr(3, 10, 1e-3), 6)
    (0.001, 0.0001)
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from automedseg.artifacts import read_artifact, write_artifact
from automedseg.atomic import atomic_write
from automedseg.errors import InputError
from automedseg.inference import CHECKPOINT_PREFERENCE, find_folds
from automedseg.intensity_reference import model_reference, with_landmarks
from automedseg.plans import Plans
from automedseg.training_options import FoldResult, TrainOptions
from automedseg.workspace import Workspace

ADAPT_FILE = "adapt.json"
ENCODER_PREFIXES = ("encoder.",)
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# --- the schedule --------------------------------------------------------------------------------------------


class FreezeSchedule:
    """Encoder frozen for the first part of a fine-tune, then every layer at a lower learning rate.

    ``before_epoch`` is the trainer's ``epoch_hook`` and ``lr`` its ``lr_schedule``. The frozen part is
    ``round(fraction * planned_epochs)`` epochs (at least one epoch trains every layer); as the trainer refits the
    planned epochs to its time budget the boundary moves with them, but once unfrozen the encoder stays so.

    Args:
        fraction: Share of the epochs with the encoder frozen (0: none).
        lr_factor: Learning rate of the second part, as a multiple of the plan's; it decays to 0 (poly 0.9).
        prefixes: Parameter names that are frozen (the encoder of :mod:`automedseg.network`).
    """

    def __init__(self, *, fraction: float, lr_factor: float, prefixes: Sequence[str] = ENCODER_PREFIXES) -> None:
        if not 0.0 <= fraction < 1.0:
            raise InputError(f"--freeze-fraction {fraction:g}: use a share of the epochs in [0, 1)")
        if not 0.0 < lr_factor <= 1.0:
            raise InputError(f"--lr-factor {lr_factor:g}: use a factor in (0, 1]")
        self.fraction, self.lr_factor, self.prefixes = float(fraction), float(lr_factor), tuple(prefixes)
        self.unfrozen_at: int | None = None

    def frozen_epochs(self, planned_epochs: int) -> int:
        """Epochs with the encoder frozen out of ``planned_epochs``."""
        return max(0, min(int(round(self.fraction * planned_epochs)), planned_epochs - 1))

    def is_frozen(self, epoch: int, planned_epochs: int) -> bool:
        """Whether the encoder is frozen in ``epoch``."""
        if self.unfrozen_at is not None and epoch >= self.unfrozen_at:
            return False
        return epoch < self.frozen_epochs(planned_epochs)

    def before_epoch(self, epoch: int, planned_epochs: int, network: torch.nn.Module) -> None:
        """Freeze or unfreeze the encoder's parameters for ``epoch`` (the trainer's ``epoch_hook``)."""
        frozen = self.is_frozen(epoch, planned_epochs)
        if not frozen and self.unfrozen_at is None:
            self.unfrozen_at = epoch
        for name, parameter in network.named_parameters():
            if name.startswith(self.prefixes):
                parameter.requires_grad_(not frozen)

    def lr(self, epoch: int, planned_epochs: int, initial_lr: float) -> float:
        """The learning rate of ``epoch`` (the trainer's ``lr_schedule``)."""
        if self.is_frozen(epoch, planned_epochs):
            return initial_lr
        start = min(epoch, self.frozen_epochs(planned_epochs))
        done = (epoch - start) / max(1, planned_epochs - start)
        return initial_lr * self.lr_factor * (1.0 - min(done, 1.0)) ** 0.9

    def describe(self) -> str:
        """One line for logs and plan notes."""
        return (f"encoder frozen for the first {self.fraction:.0%} of the epochs (decoder at the plan's learning "
                f"rate), then all layers at {self.lr_factor:g} x it, decaying to 0")


# --- adapt.json ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaptedFold:
    """One fold of an adapted model.

    Attributes:
        source_checkpoint: The source fold's checkpoint it started from.
        fine_tuned: Trained on the target cases (``False``: the source weights, copied).
    """

    source_checkpoint: str
    fine_tuned: bool


@dataclass(frozen=True)
class AdaptRecord:
    """``adapt.json``: how a work folder's model was adapted from another.

    Attributes:
        source: The source work folder.
        configuration: The configuration adapted.
        target: The labelled target dataset (``None``: none; the source weights with intensity matching).
        target_cases: Its training cases.
        folds: Fold -> what it was made from.
        freeze_fraction: Share of the epochs with the encoder frozen.
        frozen_prefixes: The parameters frozen then.
        lr_factor: Learning rate of all layers afterwards, as a multiple of the plan's.
        time_budget_s: Training budget per fold.
        match_intensities: The plan matches every image's intensities to the source training images' landmarks.
        adapt_version: Version of this file.
    """

    source: str
    configuration: str
    target: str | None
    target_cases: int
    folds: dict[str, AdaptedFold]
    freeze_fraction: float
    frozen_prefixes: tuple[str, ...]
    lr_factor: float
    time_budget_s: float | None
    match_intensities: bool
    adapt_version: int = 1


def read_adapt_record(path: Path) -> AdaptRecord:
    """Read ``adapt.json`` (an ``InputError`` names the file and the field when it is malformed)."""
    return read_artifact(AdaptRecord, path)


def write_adapt_record(path: Path, record: AdaptRecord) -> None:
    """Write ``adapt.json`` atomically."""
    write_artifact(path, record)


@dataclass
class AdaptResult:
    """What :func:`adapt` made: the work folder, the configuration and each fold's training result."""

    work_dir: Path
    configuration: str
    folds: dict[str, FoldResult | None]  # None: copied, not fine-tuned
    record: AdaptRecord

    @property
    def predict_command(self) -> str:
        return f"automedseg predict -i INPUT -o OUTPUT -d {self.work_dir} -c {self.configuration}"


# --- checks --------------------------------------------------------------------------------------------------


def choose_configuration(ws: Workspace, plans: Plans, configuration: str | None) -> str:
    """``configuration``, else the only trained one of ``ws``, else ``find_best.json``'s single configuration.

    Raises:
        InputError: An unknown configuration, or several trained and no single choice.
    """
    if configuration is not None:
        if configuration not in plans.configurations:
            raise InputError(f"{ws.plans_path}: no configuration {configuration!r} (it has "
                             f"{', '.join(plans.configurations)})")
        return configuration
    trained = [c for c in plans.configurations if any((d / n).is_file() for d in ws.configuration_dir(c).glob("fold_*")
                                                      for n in CHECKPOINT_PREFERENCE)]
    if len(trained) == 1:
        return trained[0]
    from automedseg.best_choice import find_best_path, read_find_best

    if find_best_path(ws).is_file():
        best = read_find_best(find_best_path(ws)).best.candidate.name
        if "+" not in best:
            return best
    raise InputError(f"{ws.root}: trained configurations: {', '.join(trained) or 'none'}; pass -c CONFIGURATION")


def check_target(spec: Any, plans: Plans, source: Path) -> None:
    """Refuse a target dataset whose labels or channels differ from the source model's (names the field).

    Raises:
        InputError: ``dataset.json: labels ...`` or ``... channel_names ...`` (``modality`` for MSD).
    """
    where = Path(spec.root) / "dataset.json"
    if dict(spec.labels) != dict(plans.labels):
        raise InputError(f"{where}: labels {dict(spec.labels)} differ from the source model's {dict(plans.labels)} "
                         f"({source}); adapt needs the same label names and values")
    if tuple(spec.channel_names) != tuple(plans.channel_names):
        field = "modality" if spec.layout == "msd" else "channel_names"
        raise InputError(f"{where}: {field} {list(spec.channel_names)} differ from the source model's channels "
                         f"{list(plans.channel_names)} ({source}); adapt needs the same channels in the same order")


def source_checkpoint(fold_dir: Path) -> Path:
    """The checkpoint a fold predicts with: the first of ``checkpoint_final.pt``, ``_best``, ``_latest``."""
    for name in CHECKPOINT_PREFERENCE:
        if (Path(fold_dir) / name).is_file():
            return Path(fold_dir) / name
    raise FileNotFoundError(f"{fold_dir}: no trained checkpoint")


def _fold_pairs(ws: Workspace, configuration: str, folds: Sequence[int | str] | None,
                source_fold: int | str | None) -> list[tuple[str, Path]]:
    """(adapted fold, source fold folder) pairs: each fold from its namesake, or all from ``source_fold``."""
    from automedseg.trained import check_folds_match

    cdir = ws.configuration_dir(configuration)
    if source_fold is not None:
        (src,) = find_folds(cdir, [source_fold])
        pairs = [(str(f), src) for f in (folds or [source_fold])]
    else:
        pairs = [(d.name.removeprefix("fold_"), d) for d in find_folds(cdir, list(folds) if folds else None)]
    check_folds_match(ws, configuration, sorted({d for _, d in pairs}))
    return pairs


# --- adapt ---------------------------------------------------------------------------------------------------


def adapt(source: Workspace, target: Path | None, work_dir: Path, *, configuration: str | None = None,
          folds: Sequence[int | str] | None = None, source_fold: int | str | None = None,
          time_budget_s: float | None = 600.0, epochs: int | None = None, iterations_per_epoch: int | None = None,
          freeze_fraction: float = 0.3, lr_factor: float = 0.1, match_intensities: bool = False,
          device: str | None = None, threads: int | None = None, workers: int | None = None, jobs: int = 2,
          validate: bool = True, progress: bool = False, trackers: tuple[Any, ...] | None = None,
          log: Log = print) -> AdaptResult:
    """Adapt a trained model to a new site: fine-tune on labelled target cases, and/or match intensities.

    Args:
        source: The source model's work folder (or an imported model folder).
        target: The labelled target dataset (nnU-Net or MSD layout, the source's labels and channels); ``None``:
            no fine-tuning (needs ``match_intensities``).
        work_dir: The new work folder (re-running with the same source resumes its folds).
        configuration: The configuration to adapt (default: the only trained one, else find_best.json's).
        folds: Folds to make (default: every trained fold of the source); each starts from its namesake ...
        source_fold: ... or all from this source fold (e.g. ``folds=["all"], source_fold=0``).
        time_budget_s: Training wall time per fold (refits the plan's schedule).
        epochs: Override the number of epochs (drops the budget unless one is given).
        iterations_per_epoch: Override the iterations per epoch.
        freeze_fraction: Share of the epochs with the encoder frozen.
        lr_factor: Learning rate of all layers afterwards, as a multiple of the plan's.
        match_intensities: The adapted plan standardises intensities to the source training images' landmarks.
        device: ``cpu``, ``cuda``, ``mps`` (default: what exists).
        threads: Torch CPU threads.
        workers: Augmentation worker processes.
        jobs: Processes for checking and preprocessing the target cases.
        validate: Validate each fold on its held-out target cases.
        progress: Progress bars.
        trackers: Tracker factories for the folds (``None``: the defaults).
        log: Where messages go.

    Raises:
        InputError: Labels or channels that differ from the source's (naming ``dataset.json`` and the field), a
            target dataset with problems, a work folder holding another model, nothing to adapt.
        FileNotFoundError: The source has no trained fold of the configuration.
    """
    schedule = FreezeSchedule(fraction=freeze_fraction, lr_factor=lr_factor)  # checks the two numbers first
    if target is None and not match_intensities:
        raise InputError("adapt: nothing to do: give a labelled TARGET_DATASET to fine-tune on, and/or "
                         "--match-intensities")
    if not source.plans_path.is_file():
        raise InputError(f"{source.plans_path}: no plan; SOURCE must be a trained work folder or model folder")
    ws = Workspace(Path(work_dir))
    if ws.root.resolve() == source.root.resolve():
        raise InputError(f"{ws.root}: the adapted model needs its own --work-dir, not the source's")
    plans = Plans.load(source.plans_path)
    name = choose_configuration(source, plans, configuration)
    pairs = _fold_pairs(source, name, folds, source_fold)
    spec = None
    if target is not None:
        from automedseg.checks import check_dataset
        from automedseg.io import DatasetError, load_dataset_spec

        spec = load_dataset_spec(Path(target))
        check_target(spec, plans, source.plans_path)
        problems = check_dataset(Path(target), jobs=jobs)
        if problems:
            raise DatasetError(problems)
    config = plans.configuration(name)
    if match_intensities:
        config = with_landmarks(config, model_reference(source, config, log=log))
    onto = f"the labelled cases of {target}" if target is not None else "no labelled cases"
    what = (f"adapted from {source.root} ({name}) to {onto}"
            + (f"; {schedule.describe()}" if target is not None else "")
            + ("; intensities matched to the source training images' landmarks" if match_intensities else ""))
    config = dataclasses.replace(config, notes=(*config.notes, what))
    adapted = dataclasses.replace(plans, configurations={name: config})
    record = AdaptRecord(
        source=str(source.root.resolve()), configuration=name,
        target=str(Path(target).resolve()) if target is not None else None,
        target_cases=len(spec.cases) if spec is not None else 0,
        folds={f: AdaptedFold(str(source_checkpoint(d).resolve()), target is not None) for f, d in pairs},
        freeze_fraction=schedule.fraction, frozen_prefixes=schedule.prefixes, lr_factor=schedule.lr_factor,
        time_budget_s=time_budget_s, match_intensities=match_intensities)
    _prepare_work_folder(ws, adapted, record)
    log(what)
    results: dict[str, FoldResult | None] = {}
    if spec is None:
        for fold, src in pairs:
            _copy_fold(src, ws.fold_dir(name, fold), adapted)
            results[fold] = None
            log(f"fold {fold}: the weights of {source_checkpoint(src)}")
        post = source.postprocessing_path(name)
        if post.is_file():
            _copy_file(post, ws.postprocessing_path(name))
        return AdaptResult(ws.root, name, results, record)
    from automedseg.preprocessing import preprocess_dataset
    from automedseg.training import train_fold

    done = preprocess_dataset(spec, adapted, ws.preprocessed_root, configurations=[name], jobs=jobs,
                              progress=progress)
    log(f"preprocessed {sum(done.values())} target case(s) with the source plan into {ws.preprocessed_root}")
    for fold, src in pairs:
        fold_schedule = FreezeSchedule(fraction=freeze_fraction, lr_factor=lr_factor)
        options = TrainOptions(device=device, epochs=epochs, iterations_per_epoch=iterations_per_epoch,
                               time_budget_s=time_budget_s, pretrained=source_checkpoint(src), threads=threads,
                               num_workers=workers, validate=validate, progress=progress,
                               lr_schedule=fold_schedule.lr, epoch_hook=fold_schedule.before_epoch,
                               trackers=trackers)
        fold_id: int | str = int(fold) if fold.isdigit() else fold
        results[fold] = train_fold(ws, name, fold_id, options=options, log=log)
    return AdaptResult(ws.root, name, results, record)


def _prepare_work_folder(ws: Workspace, plans: Plans, record: AdaptRecord) -> None:
    """Write the adapted plan and ``adapt.json``, or check that a folder made before holds the same adaptation."""
    path = ws.root / ADAPT_FILE
    if ws.plans_path.is_file():
        if not path.is_file():
            raise InputError(f"{ws.plans_path}: this work folder holds another model (no {ADAPT_FILE}); choose a "
                             "new --work-dir")
        old = read_adapt_record(path)
        if (old.source, old.configuration, old.target, old.match_intensities) != \
                (record.source, record.configuration, record.target, record.match_intensities):
            raise InputError(f"{path}: this work folder holds another adaptation ({old.configuration} of "
                             f"{old.source} to {old.target}); choose a new --work-dir")
        record = dataclasses.replace(record, folds={**old.folds, **record.folds})
    else:
        ws.root.mkdir(parents=True, exist_ok=True)
        plans.save(ws.plans_path)
    write_adapt_record(path, record)


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def _copy_fold(src: Path, dst: Path, adapted: Plans) -> None:
    """A source fold with its weights as they are and its plan copy turned into the adapted plan's."""
    (name,) = adapted.configurations
    config = adapted.configurations[name]
    if (src / "plans.json").is_file():  # keep the schedule the source fold was trained with
        trained = Plans.load(src / "plans.json")
        (trained_name,) = trained.configurations
        config = dataclasses.replace(config, training=trained.configurations[trained_name].training)
    dst.mkdir(parents=True, exist_ok=True)
    dataclasses.replace(adapted, configurations={name: config}).save(dst / "plans.json")
    checkpoint = source_checkpoint(src)
    _copy_file(checkpoint, dst / checkpoint.name)
