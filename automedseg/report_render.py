"""The report's building blocks (text, headings, bullets, tables, figures, sections), their formatting
helpers and the HTML / Markdown renderers.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from automedseg.report_state import WorkFolderState, _number

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


def _dice_limits(values: Iterable[float], *, margin_fraction: float = 0.1, min_span: float = 0.05,
                 pad: float = 0.01) -> tuple[float, float]:
    """Axis limits of a Dice plot scaled to its finite ``values``, so results near 1 are not squashed flat.

    The data range widened by ``margin_fraction`` of itself (at least ``min_span`` wide), clamped to [0, 1], then
    ``pad`` beyond that on each side so points at 0 or 1 are not cut by the frame. No finite value: the whole
    [0, 1] range.
    """
    finite = [float(v) for v in values if math.isfinite(float(v))]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    margin = max(margin_fraction * (hi - lo), (min_span - (hi - lo)) / 2, 0.0)
    lo, hi = max(0.0, lo - margin), min(1.0, hi + margin)
    if hi - lo < min_span:  # against a clamp: widen on the free side
        lo, hi = (max(0.0, hi - min_span), hi) if hi >= 1.0 else (lo, min(1.0, lo + min_span))
    return lo - pad, hi + pad


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

_NUMERIC = re.compile(r"^[-+]?\d+(,\d{3})*(\.\d+)?( ?(s|min|h|%|GiB))?$")  # 1,234,567 too


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
