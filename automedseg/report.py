"""The report of a whole work folder (overlays of single cases: :mod:`automedseg.overlays`).

:func:`write_report` collects everything trained in a work folder (plans, fold logs, validation summaries,
post-processing choices, ``find_best.json``) and writes two files to ``<work>/report/``:

* ``report.html``: self-contained (inline CSS, figures embedded as base64 PNG data URIs, nothing
  fetched from elsewhere), to open in a browser or attach to an e-mail;
* ``report.md``: the same content in Markdown, with the figures as ``fig_*.png`` files next to it.

It works on any partial state (some folds trained, a fold still training, no validation, no
``find_best.json``) and lists what is missing in a "Missing" section. Figures use matplotlib's Agg
backend only (no display needed). Each section of the report is built by one ``_section_*`` function
from a :class:`WorkFolderState` (see :func:`collect_state`).

Example:
    >>> write_report(Workspace(Path("Dataset001/automedseg")))  # doctest: +SKIP
    PosixPath('Dataset001/automedseg/report/report.html')
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from automedseg.errors import InputError
from automedseg.machine import machine_info
from automedseg.model_selection import FindBest, find_best_path, read_find_best
from automedseg.overlays import overlay_slices
from automedseg.postprocessing import PostprocessingError, load_postprocessing
from automedseg.validation_summary import ValidationSummary, read_validation_summary, summary_path
from automedseg.workspace import Workspace

# ====================================================================================================
# The report of a work folder
# ====================================================================================================

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
    history: list[dict[str, Any]] = field(default_factory=list)
    validation: ValidationSummary | None = None
    plan: dict[str, Any] | None = None
    finished: bool = False

    @property
    def started(self) -> bool:
        return bool(self.history) or self.finished

    @property
    def train_seconds(self) -> float:
        return float(sum(h.get("epoch_seconds") or 0.0 for h in self.history))

    @property
    def planned_epochs(self) -> int | None:
        """Epochs of the schedule: as saved at the end (finished), else as last logged."""
        copy = (self.plan or {}).get("training", {}).get("epochs")
        if self.finished and copy is not None:
            return int(copy)
        if self.history and self.history[-1].get("planned_epochs") is not None:
            return int(self.history[-1]["planned_epochs"])
        return None if copy is None else int(copy)

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
    plan: dict[str, Any] | None
    folds: dict[str, FoldRecord] = field(default_factory=dict)
    postprocessing: dict[str, Any] | None = None

    @property
    def data_identifier(self) -> str | None:
        for source in [self.plan] + [f.plan for f in self.folds.values()]:
            if source and source.get("data_identifier"):
                return str(source["data_identifier"])
        return None


@dataclass
class WorkFolderState:
    """Everything :func:`write_report` reads, collected once by :func:`collect_state`.

    Attributes:
        root: The work folder.
        plans: ``plans.json`` as JSON, or ``None``.
        labels: Foreground label value -> name.
        expected_folds: The cross-validation folds (``splits.json``, else 0..4), as strings.
        configurations: Name -> record, the plan's order first.
        find_best: ``find_best.json``, or ``None`` (missing or unreadable).
        problems: Files that exist but could not be read.
    """

    root: Path
    plans: dict[str, Any] | None
    labels: dict[int, str]
    expected_folds: list[str]
    configurations: dict[str, ConfigurationRecord]
    find_best: FindBest | None
    problems: list[str] = field(default_factory=list)

    @property
    def dataset_name(self) -> str:
        return str((self.plans or {}).get("dataset_name") or self.root.parent.name or self.root.name)


def _read_json(path: Path, problems: list[str]) -> Any | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path}: unreadable ({e})")
        return None


def _read_log(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{path}: unreadable ({e})")
        return []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"{path}: line {n} is not JSON (skipped)")
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def _fold_sort_key(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (10**6, name)


def _collect_fold(configuration: str, path: Path, problems: list[str]) -> FoldRecord:
    fold = path.name.removeprefix("fold_")
    plan_copy = _read_json(path / "plans.json", problems)
    plan = None
    if isinstance(plan_copy, dict):
        configs = plan_copy.get("configurations") or {}
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
        configuration=configuration, fold=fold, path=path, history=_read_log(path / "log.jsonl", problems),
        validation=validation, plan=plan,
        finished=(path / "checkpoint_final.pt").is_file(),
    )


def collect_state(ws: Workspace) -> WorkFolderState:
    """Read plans, splits, fold folders, post-processing choices and ``find_best.json`` of a work folder.

    Nothing needs to exist except the folder itself; whatever is absent is simply not in the result.
    """
    problems: list[str] = []
    plans = _read_json(ws.plans_path, problems)
    plans = plans if isinstance(plans, dict) else None
    splits = _read_json(ws.splits_path, problems)
    n_folds = len(splits) if isinstance(splits, list) and splits else DEFAULT_N_FOLDS
    names = list((plans or {}).get("configurations") or {})
    if ws.root.is_dir():
        on_disk = sorted(p.parent.name for p in ws.root.glob("*/fold_*") if p.is_dir())
        names += [n for n in dict.fromkeys(on_disk) if n not in names and n != REPORT_DIR]
    configurations = {}
    for name in names:
        record = ConfigurationRecord(name, ((plans or {}).get("configurations") or {}).get(name))
        fold_dirs = sorted((p for p in ws.configuration_dir(name).glob("fold_*") if p.is_dir()),
                           key=lambda p: _fold_sort_key(p.name.removeprefix("fold_")))
        for path in fold_dirs:
            fold = _collect_fold(name, path, problems)
            record.folds[fold.fold] = fold
        pp_path = ws.postprocessing_path(name)
        if pp_path.is_file():
            try:
                record.postprocessing = load_postprocessing(pp_path)
            except PostprocessingError as e:
                problems.append(f"{e} (ignored)")
        configurations[name] = record
    labels: dict[int, str] = {}
    for label_name, value in ((plans or {}).get("labels") or {}).items():
        if int(value) > 0:
            labels[int(value)] = str(label_name)
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


# --- formatting ---------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 4) -> str:
    v = _number(value)
    return f"{v:.{digits}f}" if math.isfinite(v) else "-"


def _seconds(value: Any) -> str:
    v = _number(value)
    if not math.isfinite(v):
        return "-"
    if v < 120:
        return f"{v:.1f} s"
    if v < 7200:
        return f"{v / 60:.1f} min"
    return f"{v / 3600:.2f} h"


def _compact(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(", ", ": "))
    return "-" if value is None else str(value)


def _folds_text(folds: Sequence[str]) -> str:
    return ("fold " if len(folds) == 1 else "folds ") + ", ".join(folds)


def _label_title(label: int, state: WorkFolderState) -> str:
    name = state.labels.get(label)
    return f"{label} ({name})" if name and name != str(label) else str(label)


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.+-]+", "_", text).strip("_") or "x"


# --- report blocks --------------------------------------------------------------------------------------


@dataclass
class _Text:
    text: str


@dataclass
class _Heading:
    text: str


@dataclass
class _Bullets:
    items: list[str]


@dataclass
class _Table:
    header: list[str]
    rows: list[list[str]]
    marked: set[int] = field(default_factory=set)  # row indices shown highlighted (the chosen one)


@dataclass
class _Figure:
    name: str  # file name of the PNG next to report.md
    png: bytes
    caption: str


_Block = _Text | _Heading | _Bullets | _Table | _Figure


@dataclass
class _Section:
    title: str
    blocks: list[_Block]

    @property
    def anchor(self) -> str:
        return _slug(self.title.lower())


def _new_figure(**kwargs: Any) -> Any:
    """A matplotlib Figure drawn by the Agg canvas.

    Figures are rendered by :class:`FigureCanvasAgg` directly, never shown. Some matplotlib calls
    (box plots read every rcParam) import pyplot, which resolves the default backend; unless pyplot is
    already in use (a notebook), it is pinned to Agg first so no GUI toolkit is loaded.
    """
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes (rendered with the Agg canvas; no pyplot state involved)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _rgb_png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    arr = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="png", optimize=True)
    return buf.getvalue()


# --- sections -----------------------------------------------------------------------------------------


def _section_overview(state: WorkFolderState) -> _Section:
    blocks: list[_Block] = []
    plans = state.plans or {}
    rows = [
        ["Dataset", state.dataset_name],
        ["Work folder", str(state.root)],
        ["Generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")],
    ]
    if plans:
        rows.append(["Input channels", ", ".join(plans.get("channel_names") or []) or "-"])
        rows.append(["Labels", ", ".join(_label_title(k, state) for k in state.labels) or "-"])
    rows.append(["Configurations", ", ".join(state.configurations) or "-"])
    for name, record in state.configurations.items():
        validated = [f for f in state.expected_folds if f in record.folds and record.folds[f].validated]
        started = [f for f in state.expected_folds if f in record.folds and record.folds[f].started]
        rows.append([name, f"{len(started)} of {len(state.expected_folds)} folds trained or training, "
                           f"{len(validated)} validated"])
    best = state.find_best.best if state.find_best else None
    if best and best.configuration:
        rows.append(["Best (find_best.json)", f"{best.configuration}: mean Dice {_f(best.mean_dice)}"
                     + (f", {_f(best.mean_dice_postprocessed)} post-processed"
                        if best.mean_dice_postprocessed is not None else "")])
    blocks.append(_Table(["", ""], rows))
    return _Section("Overview", blocks)


def _missing_lines(state: WorkFolderState) -> list[str]:
    """One line per gap: folds not trained, not finished or not validated, post-processing, find-best."""
    lines: list[str] = []
    if state.plans is None:
        lines.append(f"plans.json: missing in {state.root} (run `automedseg plan`)")
    if not state.configurations:
        lines.append("no configuration planned or trained yet")
    newest_validation = 0.0
    for name, record in state.configurations.items():
        folds = [record.folds.get(f) for f in state.expected_folds]
        not_trained = [f for f, r in zip(state.expected_folds, folds) if r is None or not r.started]
        if not_trained:
            lines.append(f"{name}: {_folds_text(not_trained)} not trained")
        for r in folds:
            if r is None or not r.started:
                continue
            if not r.finished:
                done = len(r.history)
                planned = r.planned_epochs
                lines.append(f"{name}: fold {r.fold} not finished ({done} of {planned or '?'} epochs logged; "
                             "still training or interrupted)")
            elif r.validation is None:
                lines.append(f"{name}: fold {r.fold} not validated (no validation/summary.json)")
            elif not r.validated:
                lines.append(f"{name}: fold {r.fold} validation has no per-case metrics "
                             "(reference labels not found?)")
            else:
                summary = r.path / "validation" / "summary.json"
                newest_validation = max(newest_validation, summary.stat().st_mtime if summary.is_file() else 0.0)
    if state.find_best is None:
        lines.append("find_best.json: missing, no best configuration, ensemble or post-processing chosen yet "
                     "(run `automedseg find-best`)")
    else:
        best = state.find_best.best
        if state.find_best.complete is False:
            lines.append("find_best.json: chosen on an incomplete cross-validation (see its notes under 'Best "
                         "configuration and ensembles'); re-run `automedseg find-best` when every fold is validated")
        pp = best.postprocessing
        if best.configuration and (not isinstance(pp, dict) or pp.get("error")):
            why = f": {pp['error']}" if isinstance(pp, dict) and pp.get("error") else ""
            lines.append(f"find_best.json: no post-processing chosen for {best.configuration}{why}")
        fb_path = state.root / "find_best.json"
        if fb_path.is_file() and fb_path.stat().st_mtime < newest_validation:
            lines.append("find_best.json: older than the newest validation results; re-run `automedseg find-best`")
    lines += state.problems
    return lines


def _section_missing(state: WorkFolderState, extra: Sequence[str]) -> _Section:
    lines = _missing_lines(state) + list(extra)
    if not lines:
        return _Section("Missing", [_Text("Nothing: every fold is trained and validated, post-processing and "
                                          "the best configuration are chosen.")])
    return _Section("Missing", [_Text(f"{len(lines)} item(s) not available yet; the figures below cover what "
                                      "exists."), _Bullets(lines)])


def _chosen_name(state: WorkFolderState) -> str | None:
    return state.find_best.best.configuration if state.find_best else None


def _postprocessing_text(pp: dict[str, Any]) -> str:
    ops = []
    if pp.get("keep_largest_foreground"):
        ops.append("keep the largest foreground component")
    if pp.get("keep_largest_labels"):
        ops.append("keep the largest component of class(es) " + ", ".join(str(v) for v in pp["keep_largest_labels"]))
    for label, size in sorted((pp.get("min_voxels") or {}).items()):
        ops.append(f"remove components of class {label} smaller than {size} voxels")
    what = "; ".join(ops) if ops else "none (no operation improved the Dice)"
    n = f" on {pp['n_cases']} cases" if pp.get("n_cases") else ""
    return f"Post-processing chosen{n}: {what}."


def _section_results(state: WorkFolderState) -> _Section:
    blocks: list[_Block] = [_Text(
        "Cross-validation figures pool the per-case metrics of every validated fold (each case counted once), "
        "as in each fold's validation/summary.json. Dice and NSD (tolerance 1 mm) are in [0, 1], HD95 in mm. "
        "Post-processed Dice comes from postprocessing.json where it was chosen.")]
    chosen = _chosen_name(state)
    overview_rows, marked = [], set()
    per_config: list[_Block] = []
    for name, record in state.configurations.items():
        summary = _cv_summary(record, state)
        validated = [f for f in state.expected_folds if f in record.folds and record.folds[f].validated]
        pp = record.postprocessing or {}
        after = pp.get("dice_after") or {}
        before = pp.get("dice_before") or {}
        if summary is None:
            overview_rows.append([name, "0", "0", "-", "-", "-", "-"])
            continue
        fg = summary["foreground_mean"]
        if name == chosen:
            marked.add(len(overview_rows))
        overview_rows.append([name + (" (chosen)" if name == chosen else ""),
                              f"{len(validated)} of {len(state.expected_folds)}", str(summary["n_cases"]),
                              _f(fg.get("dice")), _f(fg.get("hd95"), 2), _f(fg.get("nsd")), _f(after.get("mean"))])
        header = ["Class", "Dice", "HD95 (mm)", "NSD", "Cases"]
        if after:
            header += ["Dice before PP", "Dice after PP"]
        rows = []
        for label in state.labels or sorted(int(k) for k in summary["per_label"] if int(k) > 0):
            m = summary["per_label"].get(label) or summary["per_label"].get(str(label)) or {}
            n = (summary["n_valid"].get(label) or {}).get("dice", 0)
            row = [_label_title(label, state), _f(m.get("dice")), _f(m.get("hd95"), 2), _f(m.get("nsd")), str(n)]
            if after:
                row += [_f(before.get(str(label))), _f(after.get(str(label)))]
            rows.append(row)
        mean_row = ["mean (foreground)", _f(fg.get("dice")), _f(fg.get("hd95"), 2), _f(fg.get("nsd")),
                    str(summary["n_cases"])]
        if after:
            mean_row += [_f(before.get("mean")), _f(after.get("mean"))]
        rows.append(mean_row)
        per_config.append(_Heading(f"{name}: {summary['n_cases']} cases from {_folds_text(validated)}"))
        per_config.append(_Table(header, rows))
        if pp:
            per_config.append(_Text(_postprocessing_text(pp)))
    if not overview_rows:
        blocks.append(_Text("No configuration yet."))
        return _Section("Cross-validation results", blocks)
    blocks.append(_Table(["Configuration", "Folds validated", "Cases", "Mean Dice", "Mean HD95 (mm)", "Mean NSD",
                          "Dice after PP"], overview_rows, marked))
    blocks += per_config
    return _Section("Cross-validation results", blocks)


def _section_ensembles(state: WorkFolderState) -> _Section:
    fb = state.find_best
    if fb is None:
        return _Section("Best configuration and ensembles",
                        [_Text("find_best.json is missing: no configuration or ensemble has been compared yet "
                               "(run `automedseg find-best`).")])
    blocks: list[_Block] = []
    if fb.ranking_basis:
        blocks.append(_Text(f"Ranked by {fb.ranking_basis}."))
    candidates = [c for c in fb.candidates if isinstance(c, dict)]
    chosen = _chosen_name(state)
    labels = [str(k) for k in state.labels]
    common = any("mean_dice_common_cases" in c for c in candidates)
    header = ["Rank", "Candidate", "Cases", "Mean Dice"] + (["Mean Dice (shared cases)"] if common else [])
    header += [f"Dice {_label_title(int(k), state)}" for k in labels] + ["Complete", "Chosen"]
    rows, marked = [], set()
    for c in candidates:
        name = str(c.get("name") or "+".join(c.get("members") or []))
        per_class = c.get("dice_per_class") or {}
        row = [str(c.get("rank", "")), name, str(c.get("n_cases", "-")), _f(c.get("mean_dice"))]
        if common:
            row.append(_f(c.get("mean_dice_common_cases")))
        row += [_f(per_class.get(k)) for k in labels]
        row += ["yes" if c.get("complete") else "no", "chosen" if name == chosen else ""]
        if name == chosen:
            marked.add(len(rows))
        rows.append(row)
    if rows:
        blocks.append(_Table(header, rows, marked))
    best = fb.best
    pp = best.postprocessing or {}
    if pp.get("error"):
        blocks.append(_Text(f"Post-processing of {chosen}: not chosen ({pp['error']})."))
    elif pp:
        before, after = pp.get("dice_before") or {}, pp.get("dice_after") or {}
        blocks.append(_Text(f"{_postprocessing_text(pp)} Mean Dice of {chosen} {_f(before.get('mean'))} before, "
                            f"{_f(after.get('mean'))} after post-processing."))
    if best.predict_command:
        blocks.append(_Text(f"Predict with: {best.predict_command}"))
    notes = [f"{k}: not evaluated ({v})" for k, v in fb.not_evaluated.items()]
    notes += [str(line) for line in fb.missing]
    if notes:
        blocks.append(_Text("find-best noted:"))
        blocks.append(_Bullets(notes))
    return _Section("Best configuration and ensembles", blocks)


def _section_boxplots(state: WorkFolderState) -> _Section:
    data = {name: _cv_cases(r, state.expected_folds) for name, r in state.configurations.items()}
    data = {k: v for k, v in data.items() if v}
    if not data or not state.labels:
        return _Section("Per-case Dice", [_Text("No validated case yet.")])
    labels = list(state.labels)
    fig = _new_figure(figsize=(max(4.0, 1.2 + 1.1 * len(data)) * len(labels), 3.8))
    axes = fig.subplots(1, len(labels), squeeze=False)[0]
    names = list(data)
    for ax, label in zip(axes, labels):
        series = [[_number((c["metrics"].get(str(label)) or {}).get("dice")) for _, c in data[n]] for n in names]
        series = [[v for v in s if math.isfinite(v)] for s in series]
        positions = [i + 1 for i, s in enumerate(series) if s]
        if positions:
            ax.boxplot([s for s in series if s], positions=positions, widths=0.6, showmeans=True)
            for p, s in zip(positions, [s for s in series if s]):
                jitter = np.linspace(-0.12, 0.12, len(s)) if len(s) > 1 else np.zeros(1)
                ax.scatter(p + jitter, s, s=9, alpha=0.5, color="tab:blue", zorder=3)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20)
        ax.set_xlim(0.4, len(names) + 0.6)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"class {_label_title(label, state)}")
        ax.set_ylabel("Dice")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    counts = ", ".join(f"{n}: {len(v)} cases" for n, v in data.items())
    return _Section("Per-case Dice", [_Figure(f"{FIGURE_PREFIX}dice_boxplot.png", _png(fig),
                                              f"Per-case Dice of the cross-validation cases ({counts}); "
                                              "boxes: quartiles, line: median, triangle: mean, dots: cases.")])


def _section_curves(state: WorkFolderState) -> _Section:
    blocks: list[_Block] = []
    for name, record in state.configurations.items():
        folds = [f for f in record.folds.values() if f.history]
        if not folds:
            continue
        fig = _new_figure(figsize=(11, 3.6))
        ax_loss, ax_dice = fig.subplots(1, 2)
        for i, f in enumerate(folds):
            colour = f"C{i % 10}"
            ep = [int(h.get("epoch", n)) + 1 for n, h in enumerate(f.history)]
            ax_loss.plot(ep, [_number(h.get("train_loss")) for h in f.history], color=colour, marker=".",
                         label=f"fold {f.fold} train")
            ax_loss.plot(ep, [_number(h.get("val_loss")) for h in f.history], color=colour, linestyle="--",
                         label=f"fold {f.fold} val CE")
            ax_dice.plot(ep, [_number(h.get("ema_pseudo_dice")) for h in f.history], color=colour, marker=".",
                         label=f"fold {f.fold} EMA")
            ax_dice.plot(ep, [_number(h.get("mean_pseudo_dice")) for h in f.history], color=colour, alpha=0.35)
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("loss")
        ax_loss.legend(fontsize=7)
        ax_dice.set_xlabel("epoch")
        ax_dice.set_ylabel("pseudo-Dice")
        ax_dice.set_ylim(-0.02, 1.02)
        ax_dice.legend(fontsize=7)
        for ax in (ax_loss, ax_dice):
            ax.grid(alpha=0.3)
        fig.suptitle(name)
        fig.tight_layout()
        blocks.append(_Figure(f"{FIGURE_PREFIX}curves_{_slug(name)}.png", _png(fig),
                              f"{name}: training loss (solid) and validation cross-entropy (dashed); EMA "
                              "pseudo-Dice (solid) and per-epoch pseudo-Dice (faint), one colour per fold."))
    if not blocks:
        blocks.append(_Text("No fold has logged an epoch yet."))
    return _Section("Training curves", blocks)


def _fold_status(f: FoldRecord) -> str:
    if not f.started:
        return "not started"
    if not f.finished:
        return "not finished"
    if f.validated:
        return "validated"
    return "trained, not validated"


def _section_timing(state: WorkFolderState) -> _Section:
    header = ["Configuration", "Fold", "Status", "Epochs", "Iterations/epoch", "Training time", "Time/epoch",
              "Time/iteration", "Data wait", "Inference/case", "Best EMA pseudo-Dice", "Validation Dice",
              "Last epoch (UTC)"]
    rows = []
    for name, record in state.configurations.items():
        for f in record.folds.values():
            h = f.history
            epochs = f"{len(h)} of {f.planned_epochs}" if f.planned_epochs else str(len(h))
            ipe = h[-1].get("iterations") if h else (f.plan or {}).get("training", {}).get("iterations_per_epoch")
            per_epoch = f.train_seconds / len(h) if h else math.nan
            spi = _finite_mean(e.get("seconds_per_iteration") for e in h)
            wait = _finite_mean(e.get("data_wait_fraction") for e in h)
            val = f.validation
            n_val = (len(val.cases) if val else 0) or len(f.per_case())
            infer = _number(val.seconds if val else None) / n_val if n_val else math.nan
            ema = max((v for e in h if math.isfinite(v := _number(e.get("ema_pseudo_dice")))), default=math.nan)
            last = h[-1].get("time") if h else None
            last_text = (datetime.fromtimestamp(float(last), timezone.utc).strftime("%Y-%m-%d %H:%M")
                         if isinstance(last, (int, float)) else "-")
            rows.append([name, f.fold, _fold_status(f), epochs, _compact(ipe), _seconds(f.train_seconds if h else None),
                         _seconds(per_epoch), f"{spi:.3f} s" if math.isfinite(spi) else "-",
                         f"{100 * wait:.0f}%" if math.isfinite(wait) else "-", _seconds(infer), _f(ema),
                         _f(val.mean_dice if val else None), last_text])
    if not rows:
        return _Section("Time", [_Text("No fold folder yet.")])
    return _Section("Time", [
        _Text("Training time is the sum of the logged epoch times (training iterations plus the per-epoch "
              "pseudo-Dice batches); inference per case is the fold's final sliding-window validation time "
              "divided by its cases."),
        _Table(header, rows),
    ])


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not prefix and k in _PLAN_SKIP:
                continue
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def _section_plans(state: WorkFolderState) -> _Section:
    columns: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for name, record in state.configurations.items():
        base = _flatten(record.plan) if record.plan else None
        if base is not None:
            columns[name] = base
        copies: dict[str, list[str]] = {}
        flat_copies: dict[str, dict[str, Any]] = {}
        for f in record.folds.values():
            if f.plan is None:
                continue
            flat = _flatten(f.plan)
            if flat == base:
                continue
            key = json.dumps(flat, sort_keys=True, default=str)
            copies.setdefault(key, []).append(f.fold)
            flat_copies[key] = flat
        for key, folds in copies.items():
            columns[f"{name} {_folds_text(folds)} (as trained)"] = flat_copies[key]
        if record.plan and record.plan.get("notes"):
            notes += [f"{name}: {n}" for n in record.plan["notes"]]
    if not columns:
        return _Section("Plans", [_Text("No plan yet (plans.json is missing and no fold holds a plan copy).")])
    keys = list(dict.fromkeys(k for flat in columns.values() for k in flat))
    ordered = [k for k in KEY_PLAN_FIELDS if k in keys] + [k for k in keys if k not in KEY_PLAN_FIELDS]
    names = list(columns)
    differ = [k for k in ordered if len({_compact(columns[c].get(k)) for c in names}) > 1]
    blocks: list[_Block] = []
    if len(names) > 1 and differ:
        blocks.append(_Text(f"Fields that differ between the configurations of plans.json and the plan copies the "
                            f"folds were trained with ({len(differ)} of {len(keys)} fields):"))
        rows = [[k] + [_compact(columns[c].get(k)) for c in names] for k in differ]
    else:
        blocks.append(_Text("Only one plan (or no difference): its key settings." if len(names) == 1 else
                            "The plans do not differ; their key settings:"))
        rows = [[k] + [_compact(columns[c].get(k)) for c in names] for k in KEY_PLAN_FIELDS if k in keys]
    blocks.append(_Table(["Field"] + names, rows))
    if notes:
        blocks.append(_Heading("Planner notes"))
        blocks.append(_Bullets(notes))
    return _Section("Plans", blocks)


def _load_overlay_inputs(state: WorkFolderState, record: ConfigurationRecord, fold: str, case: str
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(image of the first channel, prediction, reference or None) on the original grid, (Z, Y, X) each."""
    from automedseg.io import read_image_file, read_label
    from automedseg.preprocessing import case_meta_path, read_case_meta

    ident = record.data_identifier
    folder = Workspace(state.root).preprocessed_dir(str(ident))
    meta_path = case_meta_path(folder, case)
    if not ident or not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing (the raw image path is recorded there)")
    meta = read_case_meta(folder, case)
    if not meta.image_files:
        raise FileNotFoundError(f"{meta_path}: no image_files")
    image, _ = read_image_file(Path(meta.image_files[0]))
    pred, _ = read_label(record.folds[fold].path / "validation" / f"{case}.nii.gz")
    ref = None
    if meta.label_file and Path(meta.label_file).is_file():
        ref, _ = read_label(Path(meta.label_file))
    img = image[0].astype(np.float32)
    if img.shape != pred.shape or (ref is not None and ref.shape != pred.shape):
        raise ValueError(f"shapes differ: image {img.shape}, prediction {pred.shape}, "
                         f"reference {None if ref is None else ref.shape}")
    return img, pred, ref


def _pick_cases(cases: list[tuple[str, dict[str, Any]]], labels: Sequence[int]
                ) -> list[tuple[str, str, str, float]]:
    """(rank name, fold, case, Dice) of the best, median and worst case (each case once)."""
    scored = [(d, f, c["case"]) for f, c in cases if math.isfinite(d := _case_dice(c, labels))]
    if not scored:
        return []
    scored.sort(key=lambda t: (-t[0], t[2]))
    picks = [("best", scored[0]), ("worst", scored[-1]), ("median", scored[len(scored) // 2])]
    out, seen = [], set()
    for rank, (d, f, c) in picks:
        if (f, c) not in seen:
            seen.add((f, c))
            out.append((rank, f, c, d))
    order = {"best": 0, "median": 1, "worst": 2}
    return sorted(out, key=lambda t: order[t[0]])


def _section_overlays(state: WorkFolderState, notes: list[str], *, n_slices: int = 3) -> _Section:
    blocks: list[_Block] = [_Text("Best, median and worst cross-validation case of each configuration (mean "
                                  "foreground Dice); red: prediction, green: reference contours, "
                                  f"{n_slices} axial slices through the foreground.")]
    labels = list(state.labels)
    any_figure = False
    for name, record in state.configurations.items():
        for rank, fold, case, dice in _pick_cases(_cv_cases(record, state.expected_folds), labels):
            try:
                img, pred, ref = _load_overlay_inputs(state, record, fold, case)
            except (OSError, ValueError, KeyError) as e:
                notes.append(f"{name}: overlay of {case} (fold {fold}) skipped: {e}")
                continue
            rgb = overlay_slices(img, pred, reference=ref, n_slices=n_slices, gap=2)
            scale = int(max(1, min(4, 256 // max(1, rgb.shape[0]))))
            rgb = np.kron(rgb, np.ones((scale, scale, 1)))
            blocks.append(_Figure(f"{FIGURE_PREFIX}overlay_{_slug(name)}_{rank}.png", _rgb_png(rgb),
                                  f"{name}, {rank} case: {case} (fold {fold}), mean Dice {dice:.4f}"
                                  + ("" if ref is not None else " (reference not found: prediction only)")))
            any_figure = True
    if not any_figure:
        blocks.append(_Text("No validated case to show yet."))
    return _Section("Validation overlays", blocks)


def _section_machine(state: WorkFolderState) -> _Section:
    blocks: list[_Block] = [_Text("The machine that wrote this report:"),
                            _Table(["", ""], [[k, v] for k, v in machine_info().items()])]
    device = (state.plans or {}).get("device")
    if isinstance(device, dict):
        gflops = ", ".join(f"width {w}: {g:g}" for w, g in device.get("gflops_by_width") or [])
        rows = [["Kind", str(device.get("kind"))], ["Name", str(device.get("name"))],
                ["CPU threads", str(device.get("cpu_threads"))],
                ["Memory", f"{_number(device.get('memory_gib')):.1f} GiB"],
                ["Training GFLOP/s by width", gflops or "-"],
                ["Measured", "yes (on the planning machine)" if device.get("measured") else "no (nominal profile)"]]
        blocks += [_Text("The device profile plans.json was fitted to:"), _Table(["", ""], rows)]
    else:
        blocks.append(_Text("No device profile: plans.json is missing."))
    return _Section("Machine", blocks)


# --- rendering ----------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #446; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #ccd; margin-top: 2em; }
h3 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #eef; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.chosen td { background: #fff3c4; font-weight: bold; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
nav ul { columns: 2; }
ul.missing li { color: #a33; }
"""

_NUMERIC = re.compile(r"^[-+]?\d+(\.\d+)?( ?(s|min|h|%|GiB))?$")


def _html_block(block: _Block, section: _Section) -> str:
    esc = html.escape
    if isinstance(block, _Text):
        return f"<p>{esc(block.text)}</p>"
    if isinstance(block, _Heading):
        return f"<h3>{esc(block.text)}</h3>"
    if isinstance(block, _Bullets):
        cls = ' class="missing"' if section.title == "Missing" else ""
        return f"<ul{cls}>" + "".join(f"<li>{esc(i)}</li>" for i in block.items) + "</ul>"
    if isinstance(block, _Table):
        head = "" if not any(block.header) else "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in block.header) + "</tr>"
        body = []
        for i, row in enumerate(block.rows):
            cls = ' class="chosen"' if i in block.marked else ""
            cells = "".join(f'<td class="num">{esc(c)}</td>' if _NUMERIC.match(c) else f"<td>{esc(c)}</td>"
                            for c in row)
            body.append(f"<tr{cls}>{cells}</tr>")
        return f"<table>{head}{''.join(body)}</table>"
    data = base64.b64encode(block.png).decode("ascii")
    return (f'<figure><img alt="{esc(block.caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(block.caption)}</figcaption></figure>")


def _render_html(title: str, sections: Sequence[_Section]) -> str:
    """The self-contained HTML page of the sections (figures inlined as data URIs)."""
    toc = "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in sections)
    parts = [f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>'
             + "\n".join(_html_block(b, s) for b in s.blocks) + "</section>" for s in sections]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n<nav><ul>{toc}</ul></nav>\n" + "\n".join(parts) + "\n</body>\n</html>\n")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_block(block: _Block) -> str:
    if isinstance(block, _Text):
        return block.text
    if isinstance(block, _Heading):
        return f"### {block.text}"
    if isinstance(block, _Bullets):
        return "\n".join(f"- {i}" for i in block.items)
    if isinstance(block, _Table):
        header = [h or " " for h in block.header]
        lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
                 "|" + "|".join("---" for _ in header) + "|"]
        for i, row in enumerate(block.rows):
            cells = [_md_cell(c) for c in row]
            if i in block.marked:
                cells = [f"**{c}**" if c else c for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    return f"![{_md_cell(block.caption)}]({block.name})\n\n*{block.caption}*"


def _render_markdown(title: str, sections: Sequence[_Section]) -> str:
    """The Markdown text of the sections (figures referenced by file name, next to the .md file)."""
    parts = [f"# {title}"]
    for s in sections:
        parts.append(f"## {s.title}")
        parts += [_md_block(b) for b in s.blocks]
    return "\n\n".join(parts) + "\n"


# --- entry point --------------------------------------------------------------------------------------


def _build_sections(state: WorkFolderState) -> list[_Section]:
    """Every section of the report, in order (the Missing section second, filled last)."""
    notes: list[str] = []
    body = [
        _section_results(state),
        _section_ensembles(state),
        _section_boxplots(state),
        _section_curves(state),
        _section_timing(state),
        _section_plans(state),
        _section_overlays(state, notes),
        _section_machine(state),
    ]
    return [_section_overview(state), _section_missing(state, notes), *body]


def write_report(ws: Workspace, output_dir: Path | None = None) -> Path:
    """Write ``report.html`` and ``report.md`` (+ its ``fig_*.png`` files) for a work folder.

    Args:
        ws: The work folder; any partial state is fine (what is absent is listed under "Missing").
        output_dir: Where to write (default ``<work>/report/``). Stale ``fig_*.png`` files of an
            earlier report there are removed.

    Returns:
        The path of ``report.html``.

    Raises:
        FileNotFoundError: The work folder does not exist.
    """
    from automedseg.io import atomic_write_bytes, atomic_write_text

    if not ws.root.is_dir():
        raise FileNotFoundError(f"{ws.root}: no work folder (run `automedseg plan` first)")
    out = Path(output_dir) if output_dir is not None else ws.root / REPORT_DIR
    state = collect_state(ws)
    sections = _build_sections(state)
    title = f"automedseg report: {state.dataset_name}"
    figures = [b for s in sections for b in s.blocks if isinstance(b, _Figure)]
    out.mkdir(parents=True, exist_ok=True)
    names = {f.name for f in figures}
    for stale in out.glob(f"{FIGURE_PREFIX}*.png"):
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    for f in figures:
        atomic_write_bytes(out / f.name, f.png)
    atomic_write_text(out / "report.md", _render_markdown(title, sections))
    html_path = out / "report.html"
    atomic_write_text(html_path, _render_html(title, sections))
    return html_path
