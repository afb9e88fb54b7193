"""The report of a whole work folder (overlays of single cases: :mod:`automedseg.overlays`).

:func:`write_report` collects everything trained in a work folder (plans, fold logs, validation summaries,
post-processing choices, ``find_best.json``) and writes two files to ``<work>/report/``:

* ``report.html``: self-contained (inline CSS, figures embedded as base64 PNG data URIs, nothing
  fetched from elsewhere), to open in a browser or attach to an e-mail;
* ``report.md``: the same content in Markdown, with the figures as ``fig_*.png`` files next to it.

It works on any partial state (some folds trained, a fold still training, no validation, no
``find_best.json``) and lists what is missing in a "Missing" section. Figures use matplotlib's Agg
backend only (no display needed). Each section of the report is built by one ``_section_*`` function
(:mod:`automedseg.report_sections`; the configuration comparison: :mod:`automedseg.report_comparison`) from a
:class:`WorkFolderState` (:mod:`automedseg.report_state`, :func:`collect_state`); :mod:`automedseg.report_render`
renders them.

Example:
    >>> write_report(Workspace(Path("Dataset001/automedseg")))  # doctest: +SKIP
    PosixPath('Dataset001/automedseg/report/report.html')
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from automedseg.report_comparison import _section_comparison
from automedseg.report_outputs import ExtraOutputs, extra_sections, read_extra_outputs
from automedseg.report_render import (
    _Figure,
    _render_html,
    _render_markdown,
    _Section,
)
from automedseg.report_sections import (
    _section_boxplots,
    _section_curves,
    _section_ensembles,
    _section_machine,
    _section_missing,
    _section_overlays,
    _section_overview,
    _section_plans,
    _section_results,
    _section_timing,
)
from automedseg.report_state import (
    FIGURE_PREFIX,
    REPORT_DIR,
    WorkFolderState,
    collect_state,
)
from automedseg.workspace import Workspace


def _build_sections(state: WorkFolderState, extras: ExtraOutputs | None = None) -> list[_Section]:
    """Every section of the report, in order (the Missing section second, filled last)."""
    notes: list[str] = []
    body = [
        _section_results(state),
        _section_comparison(state),
        _section_ensembles(state),
        _section_boxplots(state),
        _section_curves(state),
        *extra_sections(extras or ExtraOutputs(), state),
        _section_timing(state),
        _section_plans(state),
        _section_overlays(state, notes),
        _section_machine(state),
    ]
    return [_section_overview(state), _section_missing(state, notes), *body]


def write_report(ws: Workspace, output_dir: Path | None = None, *, evaluations: Sequence[Path] = (),
                 predictions: Sequence[Path] = ()) -> Path:
    """Write ``report.html`` and ``report.md`` (+ its ``fig_*.png`` files) for a work folder.

    Args:
        ws: The work folder; any partial state is fine (what is absent is listed under "Missing").
        output_dir: Where to write (default ``<work>/report/``). Stale ``fig_*.png`` files of an
            earlier report there are removed.
        evaluations: Evaluation folders (``automedseg evaluate``'s ``metrics_summary.json``) whose precision-recall
            curves and average precision to show (:mod:`automedseg.report_outputs`).
        predictions: Prediction folders (``automedseg predict --uncertainty``'s ``uncertainty_summary.json``)
            whose least certain cases to list.

    Returns:
        The path of ``report.html``.

    Raises:
        FileNotFoundError: The work folder does not exist.
        InputError: A named evaluation or prediction summary is missing or damaged (names the file).
    """
    from automedseg.io import atomic_write_bytes, atomic_write_text

    if not ws.root.is_dir():
        raise FileNotFoundError(f"{ws.root}: no work folder (run `automedseg plan` first)")
    out = Path(output_dir) if output_dir is not None else ws.root / REPORT_DIR
    extras = read_extra_outputs(evaluations=evaluations, predictions=predictions)
    state = collect_state(ws)
    sections = _build_sections(state, extras)
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
