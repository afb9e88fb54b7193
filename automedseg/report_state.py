"""What a work folder holds, for the report: plans (and the folds' plan copies), splits, folds (logs,
validation summaries), post-processing choices and ``find_best.json``, each read through its owner's typed
reader, tolerating partial or broken folders.

:func:`collect_state` gives a :class:`WorkFolderState`; unreadable files are listed in its ``problems``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from automedseg.best_choice import FindBest, find_best_path, read_find_best
from automedseg.errors import InputError
from automedseg.plans import ConfigurationPlan, Plans
from automedseg.postprocessing import Postprocessing
from automedseg.serialize import to_jsonable
from automedseg.splits import read_splits
from automedseg.training_log import EpochRecord, read_training_log
from automedseg.validation_summary import ValidationSummary, read_validation_summary, summary_path
from automedseg.workspace import Workspace

REPORT_DIR = "report"
DEFAULT_N_FOLDS = 5
FIGURE_PREFIX = "fig_"
KEY_PLAN_FIELDS: tuple[str, ...] = (
    "dims", "patch_size", "batch_size", "spacing_mm", "data_identifier", "network.architecture",
    "network.features_per_stage", "network.strides", "network.kernel_sizes", "training.epochs",
    "training.iterations_per_epoch", "training.optimizer", "training.initial_lr", "training.time_budget_s",
    "training.estimated_seconds_per_iteration", "training.estimated_fold_seconds",
)
"""Plan fields shown first in the plan comparison (dotted paths into a configuration)."""
_PLAN_SKIP = ("name", "notes")


# --- what is in the work folder -----------------------------------------------------------------------


@dataclass
class FoldRecord:
    """What one fold folder holds.

    Attributes:
        configuration: Configuration name.
        fold: ``"0"`` .. ``"4"`` or ``"all"``.
        path: The fold folder.
        history: ``log.jsonl`` entries (one per finished epoch), possibly empty.
        validation: ``validation/summary.json`` or ``None``.
        plan: The configuration as trained (the fold's ``plans.json`` copy), or ``None``.
        finished: ``checkpoint_final.pt`` exists (training ended; validation may still be running).
    """

    configuration: str
    fold: str
    path: Path
    history: list[EpochRecord] = field(default_factory=list)
    validation: ValidationSummary | None = None
    plan: ConfigurationPlan | None = None
    finished: bool = False

    @property
    def started(self) -> bool:
        return bool(self.history) or self.finished

    @property
    def train_seconds(self) -> float:
        return float(sum(h.epoch_seconds or 0.0 for h in self.history))

    @property
    def planned_epochs(self) -> int | None:
        """Epochs of the schedule: as saved at the end (finished), else as last logged."""
        copy = self.plan.training.epochs if self.plan is not None else None
        if self.finished and copy is not None:
            return copy
        if self.history and self.history[-1].planned_epochs is not None:
            return int(self.history[-1].planned_epochs)
        return copy

    def per_case(self) -> list[dict[str, Any]]:
        """Validation per-case entries ``{"case", "metrics": {label: {metric: value}}}``."""
        if not self.validation:
            return []
        return [c for c in self.validation.per_case if isinstance(c, dict) and "metrics" in c]

    @property
    def validated(self) -> bool:
        return bool(self.per_case())


@dataclass
class ConfigurationRecord:
    """A configuration of the plan (or one found on disk) and its folds."""

    name: str
    plan: ConfigurationPlan | None
    folds: dict[str, FoldRecord] = field(default_factory=dict)
    postprocessing: Postprocessing | None = None

    @property
    def data_identifier(self) -> str | None:
        for source in [self.plan] + [f.plan for f in self.folds.values()]:
            if source is not None and source.data_identifier:
                return source.data_identifier
        return None


@dataclass
class WorkFolderState:
    """Everything :func:`write_report` reads, collected once by :func:`collect_state`.

    Attributes:
        root: The work folder.
        plans: ``plans.json``, or ``None`` (missing or unreadable).
        labels: Foreground label value -> name.
        expected_folds: The cross-validation folds (``splits.json``, else 0..4), as strings.
        configurations: Name -> record, the plan's order first.
        find_best: ``find_best.json``, or ``None`` (missing or unreadable).
        problems: Files that exist but could not be read.
    """

    root: Path
    plans: Plans | None
    labels: dict[int, str]
    expected_folds: list[str]
    configurations: dict[str, ConfigurationRecord]
    find_best: FindBest | None
    problems: list[str] = field(default_factory=list)

    @property
    def dataset_name(self) -> str:
        return (self.plans.dataset_name if self.plans else "") or self.root.parent.name or self.root.name


def plan_fields(plan: ConfigurationPlan) -> dict[str, Any]:
    """A configuration's fields (but its name and notes) as JSON values under dotted paths (``"training.epochs"``),
    as ``plans.json`` writes them."""
    def flatten(value: Any, prefix: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            return {prefix[:-1]: value}
        out: dict[str, Any] = {}
        for k, v in value.items():
            if prefix or k not in _PLAN_SKIP:
                out.update(flatten(v, f"{prefix}{k}."))
        return out

    return flatten(to_jsonable(plan), "")


def _read_plans(path: Path, problems: list[str]) -> Plans | None:
    """``Plans.load(path)``; ``None`` when the file is missing or unreadable (noted in ``problems``)."""
    if not path.is_file():
        return None
    try:
        return Plans.load(path)
    except InputError as e:
        problems.append(f"{e} (ignored)")
        return None


def _fold_sort_key(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (10**6, name)


def _collect_fold(configuration: str, path: Path, problems: list[str]) -> FoldRecord:
    fold = path.name.removeprefix("fold_")
    plan_copy = _read_plans(path / "plans.json", problems)
    plan = None
    if plan_copy is not None:
        configs = plan_copy.configurations
        plan = configs.get(configuration)
        if plan is None and len(configs) == 1:  # a renamed configuration folder
            plan = next(iter(configs.values()))
    validation = None
    try:
        validation = read_validation_summary(summary_path(path))
    except FileNotFoundError:
        pass
    except InputError as e:
        problems.append(f"{e} (ignored)")
    return FoldRecord(
        configuration=configuration, fold=fold, path=path,
        history=read_training_log(path / "log.jsonl", problems=problems),
        validation=validation, plan=plan,
        finished=(path / "checkpoint_final.pt").is_file(),
    )


def collect_state(ws: Workspace) -> WorkFolderState:
    """Read plans, splits, fold folders, post-processing choices and ``find_best.json`` of a work folder.

    Nothing needs to exist except the folder itself; whatever is absent is simply not in the result.
    """
    problems: list[str] = []
    plans = _read_plans(ws.plans_path, problems)
    n_folds = DEFAULT_N_FOLDS
    if ws.splits_path.is_file():
        try:
            n_folds = len(read_splits(ws.splits_path))
        except InputError as e:
            problems.append(f"{e} (ignored)")
    names = list(plans.configurations) if plans else []
    if ws.root.is_dir():
        on_disk = sorted(p.parent.name for p in ws.root.glob("*/fold_*") if p.is_dir())
        names += [n for n in dict.fromkeys(on_disk) if n not in names and n != REPORT_DIR]
    configurations = {}
    for name in names:
        record = ConfigurationRecord(name, plans.configurations.get(name) if plans else None)
        fold_dirs = sorted((p for p in ws.configuration_dir(name).glob("fold_*") if p.is_dir()),
                           key=lambda p: _fold_sort_key(p.name.removeprefix("fold_")))
        for path in fold_dirs:
            fold = _collect_fold(name, path, problems)
            record.folds[fold.fold] = fold
        pp_path = ws.postprocessing_path(name)
        if pp_path.is_file():
            try:
                record.postprocessing = Postprocessing.load(pp_path)
            except InputError as e:
                problems.append(f"{e} (ignored)")
        configurations[name] = record
    labels: dict[int, str] = {}
    for label_name, value in (plans.labels if plans else {}).items():
        if value > 0:
            labels[value] = label_name
    if not labels:  # no plan: take the labels the validation summaries scored
        for record in configurations.values():
            for fold in record.folds.values():
                for case in fold.per_case():
                    for k in case["metrics"]:
                        if str(k).isdigit() and int(k) > 0:
                            labels.setdefault(int(k), str(k))
    find_best = None
    try:
        find_best = read_find_best(find_best_path(ws))
    except FileNotFoundError:
        pass
    except InputError as e:
        problems.append(f"{e} (ignored)")
    return WorkFolderState(
        root=ws.root, plans=plans, labels=dict(sorted(labels.items())),
        expected_folds=[str(i) for i in range(n_folds)], configurations=configurations,
        find_best=find_best, problems=problems,
    )


# --- figures of merit ---------------------------------------------------------------------------------


def _cv_cases(record: ConfigurationRecord, expected_folds: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """``(fold, per-case entry)`` of every validated case of the cross-validation folds."""
    return [(f, case) for f in expected_folds if f in record.folds for case in record.folds[f].per_case()]


def _number(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _finite_mean(values: Any) -> float:
    finite = [v for v in map(_number, values) if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _case_dice(case: dict[str, Any], labels: Sequence[int]) -> float:
    """Mean Dice over the foreground classes of one per-case entry (NaN when none is known)."""
    return _finite_mean((case["metrics"].get(str(k)) or {}).get("dice") for k in labels)


def _cv_summary(record: ConfigurationRecord, state: WorkFolderState) -> dict[str, Any] | None:
    """:func:`automedseg.metrics.summarize` of the pooled per-case metrics of the cross-validation folds."""
    from automedseg.metrics import summarize

    cases = _cv_cases(record, state.expected_folds)
    if not cases:
        return None
    return summarize([c["metrics"] for _, c in cases])
