"""Report sections of outputs outside the work folder: evaluations with precision-recall curves
(``automedseg evaluate --probabilities``) and predictions with uncertainty (``automedseg predict --uncertainty``).

``automedseg report --evaluation FOLDER --predictions FOLDER`` names them; each is read through its owner's typed
reader (:func:`automedseg.metrics.read_metrics_summary`, :func:`automedseg.uncertainty.read_uncertainty_summary`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from automedseg.errors import InputError
from automedseg.metrics import METRICS_SUMMARY_FILE, MetricsSummary, read_metrics_summary
from automedseg.report_render import (
    _Block,
    _f,
    _Figure,
    _label_title,
    _new_figure,
    _png,
    _Section,
    _slug,
    _Table,
    _Text,
)
from automedseg.report_state import FIGURE_PREFIX, WorkFolderState
from automedseg.uncertainty import SUMMARY_FILE, UncertaintySummary, read_uncertainty_summary

MAX_UNCERTAIN_ROWS = 20
"""Cases shown in the uncertainty table (the least certain)."""


@dataclass(frozen=True)
class ExtraOutputs:
    """The evaluations and predictions a report shows besides the work folder (each with the folder it came from)."""

    evaluations: tuple[tuple[Path, MetricsSummary], ...] = ()
    predictions: tuple[tuple[Path, UncertaintySummary], ...] = ()


def read_extra_outputs(*, evaluations: Sequence[Path] = (), predictions: Sequence[Path] = ()) -> ExtraOutputs:
    """Read the evaluation summaries and uncertainty summaries of the named folders (or files).

    Args:
        evaluations: Folders holding ``metrics_summary.json`` (``automedseg evaluate``'s output), or the files.
        predictions: Folders holding ``uncertainty_summary.json`` (``automedseg predict --uncertainty``), or the
            files.

    Raises:
        InputError: A folder or file is missing or a summary is damaged (the message names the file).
    """
    evals = []
    for path in map(Path, evaluations):
        file = path / METRICS_SUMMARY_FILE if path.is_dir() else path
        if not file.is_file():
            raise InputError(f"{file}: missing (automedseg evaluate writes it; --probabilities adds the "
                             "precision-recall curves)")
        evals.append((path, read_metrics_summary(file)))
    preds = []
    for path in map(Path, predictions):
        file = path / SUMMARY_FILE if path.is_dir() else path
        preds.append((path, read_uncertainty_summary(file)))
    return ExtraOutputs(tuple(evals), tuple(preds))


def _label(key: str, state: WorkFolderState) -> str:
    return _label_title(int(key), state) if key.lstrip("-").isdigit() else key


def section_precision_recall(outputs: ExtraOutputs, state: WorkFolderState) -> _Section:
    """One table of average precision per label and one figure of the curves per evaluation."""
    blocks: list[_Block] = []
    for i, (path, summary) in enumerate(outputs.evaluations):
        curves = summary.pr_curves or {}
        if not curves:
            blocks.append(_Text(f"{path}: evaluated without probabilities, so no precision-recall curves "
                                "(evaluate again with --probabilities FOLDER)."))
            continue
        rows = [[_label(k, state), _f(c.average_precision), str(c.positives), str(c.negatives),
                 _f(summary.per_label.get(k, {}).get("dice"))] for k, c in curves.items()]
        blocks.append(_Table(["Label", "Average precision", "Positive voxels", "Negative voxels", "Mean Dice"], rows))
        fig = _new_figure(figsize=(5.5, 4.4))
        ax = fig.subplots()
        for k, c in curves.items():
            if not c.points:
                continue
            ap = "-" if c.average_precision is None else f"{c.average_precision:.3f}"
            ax.step([0.0, *c.recall], [c.precision[0], *c.precision], where="pre",
                    label=f"{_label(k, state)}: AP {ap}")
        ax.set_xlim(0, 1.01)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        blocks.append(_Figure(f"{FIGURE_PREFIX}pr_{i}_{_slug(path.name)}.png", _png(fig),
                              f"{path}: voxel-level precision-recall curve of each label against the rest, over "
                              f"the {summary.n_cases} evaluated case(s); average precision as scikit-learn "
                              "computes it (steps, no interpolation)."))
    return _Section("Precision-recall", blocks)


def section_uncertainty(outputs: ExtraOutputs) -> _Section:
    """The least certain cases of each prediction folder, as ``uncertainty_summary.json`` lists them."""
    blocks: list[_Block] = []
    for path, summary in outputs.predictions:
        shown = summary.cases[:MAX_UNCERTAIN_ROWS]
        rows = [[str(n), c.case, _f(c.mean_entropy_foreground, 3), _f(c.mean_disagreement_foreground, 3),
                 str(c.foreground_voxels), _f(c.mean_entropy, 3), str(c.members)] for n, c in enumerate(shown, 1)]
        blocks.append(_Text(f"{path}: {len(summary.cases)} case(s), the least certain first (by mean normalised "
                            "entropy of the ensemble's probabilities within the predicted foreground, then the "
                            "fraction of folds disagreeing with the ensemble there); maps in "
                            f"{path / 'uncertainty'}."))
        if rows:
            blocks.append(_Table(["Rank", "Case", "Entropy (foreground)", "Disagreement (foreground)",
                                  "Foreground voxels", "Entropy (image)", "Members"], rows))
        if len(summary.cases) > len(shown):
            blocks.append(_Text(f"{len(summary.cases) - len(shown)} more in {path / SUMMARY_FILE}."))
        if summary.without_maps:
            blocks.append(_Text(f"Kept from an earlier run without maps: {', '.join(summary.without_maps)}."))
    return _Section("Uncertainty", blocks)


def extra_sections(outputs: ExtraOutputs, state: WorkFolderState) -> list[_Section]:
    """The sections of ``outputs`` (none for what was not given)."""
    sections = []
    if outputs.evaluations:
        sections.append(section_precision_recall(outputs, state))
    if outputs.predictions:
        sections.append(section_uncertainty(outputs))
    return sections
