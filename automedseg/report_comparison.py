"""The report's configuration comparison: one row per configuration with a trained fold, its network's size and
cost beside its accuracy and its training and inference time (issue #17 item 2).

:func:`comparison_rows` gathers the figures from a :class:`~automedseg.report_state.WorkFolderState` (the plan
the folds were trained with, their ``log.jsonl`` and ``validation/summary.json``, read by their owners' typed
readers in :func:`~automedseg.report_state.collect_state`); parameters and FLOPs come from the analytic model of
:mod:`automedseg.network_cost` (no network is built). :func:`_section_comparison` renders them as a table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from automedseg.network_cost import estimate_forward_flops, estimate_parameters
from automedseg.plans import ConfigurationPlan
from automedseg.report_render import _f, _seconds, _Section, _Table, _Text
from automedseg.report_sections import _chosen_name
from automedseg.report_state import ConfigurationRecord, FoldRecord, WorkFolderState, _cv_summary, _number

SECTION_TITLE = "Configuration comparison"


@dataclass(frozen=True)
class ComparisonRow:
    """What the comparison shows of one configuration (``None``: not known).

    Attributes:
        configuration: Configuration name.
        architecture: ``network.architecture`` of the plan the folds were trained with.
        norm: ``network.norm`` of that plan.
        patch_size: Its patch size (voxels, in the configuration's axis order).
        parameters: Trainable parameters (:func:`~automedseg.network_cost.estimate_parameters`).
        forward_gflops: GFLOPs of one forward pass of one patch, convolutions only (2 per multiply-add;
            :func:`~automedseg.network_cost.estimate_forward_flops` without the element-wise charge).
        trained_folds: The folds that finished training (``checkpoint_final.pt``).
        train_seconds_per_fold: Mean over the trained folds with a log of the sum of their epochs' seconds.
        epochs: Epochs logged by each trained fold with a log.
        mean_dice: Cross-validation mean foreground Dice (as in the results section).
        mean_hd95: Cross-validation mean foreground HD95 in mm.
        inference_seconds_per_case: The validation seconds of the folds over their cases.
        mirror_axes: The distinct test-time mirroring axes of the validated folds (``()``: none).
        chosen: ``find_best.json`` chose it, alone or in an ensemble (``chosen_in``).
        chosen_in: The chosen candidate's name when this configuration is part of it.
    """

    configuration: str
    architecture: str | None = None
    norm: str | None = None
    patch_size: tuple[int, ...] | None = None
    parameters: int | None = None
    forward_gflops: float | None = None
    trained_folds: tuple[str, ...] = ()
    train_seconds_per_fold: float | None = None
    epochs: tuple[int, ...] = ()
    mean_dice: float | None = None
    mean_hd95: float | None = None
    inference_seconds_per_case: float | None = None
    mirror_axes: tuple[tuple[int, ...], ...] = ()
    chosen: bool = False
    chosen_in: str | None = None


def _finite_or_none(value: object) -> float | None:
    v = _number(value)
    return v if math.isfinite(v) else None


def _trained_plan(record: ConfigurationRecord, trained: Sequence[FoldRecord]) -> ConfigurationPlan | None:
    """The plan the first trained fold was trained with (its ``plans.json`` copy), else ``plans.json``'s."""
    return next((f.plan for f in trained if f.plan is not None), record.plan)


def _network_cost(plan: ConfigurationPlan, state: WorkFolderState) -> tuple[int | None, float | None]:
    """(parameters, forward GFLOPs per patch) of ``plan``'s network; ``None`` where the channels, classes or the
    topology are not known."""
    in_channels = len(state.plans.channel_names) if state.plans is not None else len(plan.normalization)
    num_classes = state.plans.num_classes if state.plans is not None else 0
    if in_channels < 1 or num_classes < 2:
        return None, None
    try:
        parameters = estimate_parameters(plan.network, in_channels=in_channels, num_classes=num_classes,
                                         dims=plan.dims)
        flops = estimate_forward_flops(plan.network, in_channels=in_channels, num_classes=num_classes,
                                       patch_size=plan.patch_size, dims=plan.dims, elementwise_flops=0.0)
    except ValueError:  # an architecture or a topology this version does not know
        return None, None
    return parameters, flops / 1e9


def _inference(folds: Sequence[FoldRecord]) -> tuple[float | None, tuple[tuple[int, ...], ...]]:
    """(validation seconds per case over the folds that timed their validation, the distinct mirror axes)."""
    seconds, cases, axes = 0.0, 0, []
    for f in folds:
        val = f.validation
        if val is None:
            continue
        if tuple(val.mirror_axes) not in axes:
            axes.append(tuple(val.mirror_axes))
        n = len(val.cases) or len(f.per_case())
        s = _number(val.seconds)
        if n and math.isfinite(s):
            seconds, cases = seconds + s, cases + n
    return (seconds / cases if cases else None), tuple(axes)


def comparison_rows(state: WorkFolderState) -> list[ComparisonRow]:
    """One :class:`ComparisonRow` per configuration with at least one trained fold, in the report's order.

    Args:
        state: The work folder (:func:`~automedseg.report_state.collect_state`).

    Returns:
        The rows; empty when no fold finished training.
    """
    chosen = _chosen_name(state)
    members = chosen.split("+") if chosen else []
    rows = []
    for name, record in state.configurations.items():
        trained = [f for f in record.folds.values() if f.finished]
        if not trained:
            continue
        plan = _trained_plan(record, trained)
        parameters, gflops = _network_cost(plan, state) if plan is not None else (None, None)
        logged = [f for f in trained if f.history]
        summary = _cv_summary(record, state)
        fg = summary["foreground_mean"] if summary else {}
        seconds_per_case, mirror_axes = _inference(list(record.folds.values()))
        rows.append(ComparisonRow(
            configuration=name,
            architecture=plan.network.architecture if plan is not None else None,
            norm=plan.network.norm if plan is not None else None,
            patch_size=tuple(plan.patch_size) if plan is not None else None,
            parameters=parameters, forward_gflops=gflops,
            trained_folds=tuple(f.fold for f in trained),
            train_seconds_per_fold=sum(f.train_seconds for f in logged) / len(logged) if logged else None,
            epochs=tuple(len(f.history) for f in logged),
            mean_dice=_finite_or_none(fg.get("dice")), mean_hd95=_finite_or_none(fg.get("hd95")),
            inference_seconds_per_case=seconds_per_case, mirror_axes=mirror_axes,
            chosen=name in members, chosen_in=chosen if name in members else None,
        ))
    return rows


def _gflops_text(value: float | None) -> str:
    """GFLOPs with about three significant digits, never in exponent form.

    Example:
        >>> [_gflops_text(v) for v in (1234.5, 12.345, 0.5, 0.001234, None)]
        ['1234', '12.3', '0.500', '0.00123', '-']
    """
    if value is None or not math.isfinite(value):
        return "-"
    digits = max(0, 2 - math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:.{digits}f}"


def _epochs_text(epochs: Sequence[int]) -> str:
    """The epochs of the trained folds: one number, or the range when they differ.

    Example:
        >>> _epochs_text([12, 12]), _epochs_text([10, 12, 11]), _epochs_text([])
        ('12', '10-12', '-')
    """
    if not epochs:
        return "-"
    lo, hi = min(epochs), max(epochs)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _mirror_text(axes: Sequence[Sequence[int]]) -> str:
    """The test-time mirroring of the validated folds: its axes, ``none``, or each variant when folds differ.

    Example:
        >>> _mirror_text([(0, 1, 2)]), _mirror_text([()]), _mirror_text([(1, 2), ()]), _mirror_text([])
        ('0, 1, 2', 'none', '1, 2 / none', '-')
    """
    if not axes:
        return "-"
    return " / ".join(", ".join(str(a) for a in ax) if ax else "none" for ax in axes)


def _row_cells(row: ComparisonRow) -> list[str]:
    name = row.configuration
    if row.chosen:
        name += " (chosen)" if row.chosen_in == row.configuration else f" (in chosen {row.chosen_in})"
    return [
        name, row.architecture or "-", row.norm or "-",
        "x".join(str(p) for p in row.patch_size) if row.patch_size else "-",
        f"{row.parameters:,}" if row.parameters is not None else "-", _gflops_text(row.forward_gflops),
        ", ".join(row.trained_folds) or "-", _epochs_text(row.epochs), _seconds(row.train_seconds_per_fold),
        _f(row.mean_dice), _f(row.mean_hd95, 2), _seconds(row.inference_seconds_per_case),
        _mirror_text(row.mirror_axes),
    ]


COLUMNS = ["Configuration", "Architecture", "Norm", "Patch", "Parameters", "GFLOPs/patch", "Trained folds",
           "Epochs", "Training time/fold", "CV mean Dice", "CV mean HD95 (mm)", "Inference/case", "TTA mirror axes"]
"""The comparison table's header."""


def _section_comparison(state: WorkFolderState) -> _Section:
    """The configurations with a trained fold side by side: network size and cost, accuracy, time."""
    rows = comparison_rows(state)
    if not rows:
        return _Section(SECTION_TITLE, [_Text("No configuration has a trained fold yet.")])
    text = _Text(
        "One row per configuration with a trained fold (checkpoint_final.pt); architecture, norm and patch from the "
        "plan its first trained fold was trained with. Parameters: trainable parameters of that network; "
        "GFLOPs/patch: one forward pass of one patch (batch 1) at the plan's patch size, convolutions only (2 FLOPs "
        "per multiply-add; norms and activations not counted); both from the analytic model of network_cost.py. "
        "Training time/fold: wall-clock time summed over the logged epochs (log.jsonl), mean over the trained "
        "folds; Epochs: epochs logged (a range when the folds differ). CV mean Dice and HD95 (mm): foreground "
        "means of the pooled cross-validation cases, as under 'Cross-validation results'. Inference/case: "
        "wall-clock time of the folds' final validation (sliding window, resampling, writing, scoring) per case; "
        "TTA mirror axes: the axes whose mirrored predictions were averaged (each one up to doubles the inference "
        "time; none: no mirroring, or a summary older than this record). '-': not known.")
    marked = {i for i, row in enumerate(rows) if row.chosen}
    return _Section(SECTION_TITLE, [text, _Table(list(COLUMNS), [_row_cells(r) for r in rows], marked)])
