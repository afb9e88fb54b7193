"""Turning mask files into label maps 0..K-1 for ``automedseg import``: binary, palette and colour-coded masks.

A mask page is reduced to *codes*: its grey value or palette index, or for colour masks the colour packed as
``R << 16 | G << 8 | B`` (an RGB file whose pixels are all grey counts as grey). The codes of all masks,
with pixel counts, give the dataset's :class:`LabelTable`: given by the user (``--colors``), or inferred:

* two values ``{0, v}`` (0/255, 0/1, any palette or grey pair): binary, ``v`` is the foreground;
* a few values (at most :data:`MAX_INFERRED_LABELS`), one of them 0 / black: one label per value, sorted by
  value (colours by R, then G, then B) with 0 / black as background;
* anything else (many grey levels, antialiased or JPEG edges with hundreds of colours, no black) is refused
  with a message naming ``--colors`` and ``--snap-colors``.

Label ``k`` of a table is its ``k``-th entry, so ``--colors "255=background;0=membrane"`` makes white the
background. Palette masks are coded by palette index when the table is inferred (index ``k`` -> label
``k``'s place in sorted order) and by their displayed colours when ``--colors`` is given.
:func:`fill_outlines` fills closed contours drawn as outlines (HC18 ellipses).

Example:
    >>> table = parse_colors("0,0,0=background;255,0,0=lesion")
    >>> [(e.name, e.value) for e in table.entries], table.kind
    ([('background', (0, 0, 0)), ('lesion', (255, 0, 0))], 'rgb')
    >>> page = np.array([[[0, 0, 0], [255, 0, 0]]], np.uint8)
    >>> labels, unknown = to_labels(page, "rgb", table)
    >>> labels.tolist(), unknown
    ([[0, 1]], {})
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from automedseg.errors import InputError

MAX_INFERRED_LABELS = 16  # more distinct values than this without --colors: refused as ambiguous
RARE_SHARE = 1e-4  # an inferred label covering less than this share of all mask pixels looks like an edge blend


@dataclass(frozen=True)
class LabelEntry:
    """One label: its name, the mask value it comes from (``(v,)`` grey/index or ``(r, g, b)``) and pixels."""

    name: str
    value: tuple[int, ...]
    pixels: int = 0

    @property
    def code(self) -> int:
        return pack(self.value)


@dataclass(frozen=True)
class LabelTable:
    """Mask value -> label. Label ``k`` is ``entries[k]``; ``kind`` is ``grey``, ``palette`` or ``rgb``."""

    kind: str
    entries: tuple[LabelEntry, ...]
    source: str = "inferred"  # or "--colors"
    snap: bool = False

    def labels(self) -> dict[str, int]:
        """``dataset.json`` labels: name -> label."""
        return {e.name: k for k, e in enumerate(self.entries)}

    def describe(self) -> list[str]:
        """One line per label, e.g. ``1 vessel <- 255 (8.6% of mask pixels)``."""
        total = sum(e.pixels for e in self.entries) or 1
        return [f"{k} {e.name} <- {','.join(str(v) for v in e.value)}"
                + (f" ({100 * e.pixels / total:.3g}% of mask pixels)" if e.pixels else "")
                for k, e in enumerate(self.entries)]

    def to_json(self) -> list[dict]:
        return [{"label": k, "name": e.name, "value": list(e.value), "pixels": e.pixels}
                for k, e in enumerate(self.entries)]


def pack(value: tuple[int, ...]) -> int:
    """A colour ``(r, g, b)`` packed as one int; a grey value or index unchanged.

    Example:
        >>> pack((255, 0, 0)), pack((7,))
        (16711680, 7)
    """
    return (value[0] << 16 | value[1] << 8 | value[2]) if len(value) == 3 else value[0]


def unpack(code: int, kind: str) -> tuple[int, ...]:
    return ((code >> 16) & 255, (code >> 8) & 255, code & 255) if kind == "rgb" else (code,)


def parse_colors(text: str) -> LabelTable:
    """Parse ``--colors``: ``VALUE=name`` entries separated by ``;``, label ``k`` being the ``k``-th entry.

    ``VALUE`` is a grey value or palette index (``255``) or a colour ``R,G,B``; a table with any colour is
    an ``rgb`` table (grey values ``v`` then mean ``v,v,v``).

    Raises:
        InputError: An entry is malformed, or a value or name is repeated.

    Example:
        >>> t = parse_colors("255=background; 0=membrane")
        >>> t.kind, [(e.name, e.value) for e in t.entries]
        ('grey', [('background', (255,)), ('membrane', (0,))])
    """
    entries: list[tuple[tuple[int, ...], str]] = []
    for raw in (p.strip() for p in text.split(";")):
        if not raw:
            continue
        m = re.fullmatch(r"(\d+)(?:\s*,\s*(\d+)\s*,\s*(\d+))?\s*=\s*(\S(?:.*\S)?)", raw)
        if m is None:
            raise InputError(f"--colors: cannot read {raw!r}; write entries like \"0,0,0=background;255,0,0=lesion\" "
                             "or \"0=background;255=vessel\"")
        value = tuple(int(v) for v in m.groups()[:3] if v is not None)
        if len(value) == 3 and max(value) > 255:
            raise InputError(f"--colors: colour {raw!r} has a component above 255")
        entries.append((value, m.group(4)))
    if len(entries) < 2:
        raise InputError("--colors: give at least two entries, the background first (\"0=background;255=vessel\")")
    kind = "rgb" if any(len(v) == 3 for v, _ in entries) else "grey"
    if kind == "rgb":
        entries = [((v * 3) if len(v) == 1 else v, n) for v, n in entries]
        if any(v[0] > 255 for v, _ in entries):
            raise InputError("--colors: grey values in a colour table must be at most 255")
    for what, items in (("value", [",".join(map(str, v)) for v, _ in entries]), ("name", [n for _, n in entries])):
        repeated = sorted({str(i) for i in items if items.count(i) > 1})
        if repeated:
            raise InputError(f"--colors: {what} {', '.join(repeated)} given twice")
    return LabelTable(kind, tuple(LabelEntry(n, v) for v, n in entries), source="--colors")


def mask_kind(raster_kind: str, *, by_index: bool) -> str:
    """How pages of a mask file of ``raster_kind`` are coded: palette files by index, or (``by_index`` False,
    read as colours) as grey values or colours like any other file."""
    return "grey" if raster_kind == "palette" and not by_index else raster_kind


def page_codes(page: np.ndarray, kind: str) -> tuple[np.ndarray, str]:
    """Codes of a mask page and the page's own kind (an RGB page whose pixels are all grey is ``grey``).

    Raises:
        ValueError: A grey page holds non-integral or negative values.
    """
    if page.ndim == 3:
        r, g, b = page[..., 0], page[..., 1], page[..., 2]
        if np.array_equal(r, g) and np.array_equal(g, b):
            return np.ascontiguousarray(r), "grey"
        if page.dtype != np.uint8:
            raise ValueError("16-bit colour masks are not supported; save them as 8-bit or as grey label maps")
        return r.astype(np.uint32) << 16 | g.astype(np.uint32) << 8 | b, "rgb"
    if np.issubdtype(page.dtype, np.floating):
        if not np.all(np.isfinite(page)) or not np.array_equal(page, np.round(page)):
            raise ValueError("the mask holds non-integral values")
        page = page.astype(np.int64)
    if page.min(initial=0) < 0:
        raise ValueError("the mask holds negative values")
    return page, "palette" if kind == "palette" else "grey"


def unique_counts(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct codes and their pixel counts (a histogram for small codes: no sort of the pixels)."""
    top = int(codes.max(initial=0))
    if top < 1 << 16:
        counts = np.bincount(codes.ravel(), minlength=1)
        values = np.flatnonzero(counts)
        return values, counts[values]
    return np.unique(codes, return_counts=True)


def count_codes(codes: np.ndarray) -> dict[int, int]:
    values, counts = unique_counts(codes)
    return {int(v): int(c) for v, c in zip(values, counts)}


def combine_kinds(kinds: Mapping[str, int]) -> str:
    """The dataset's mask kind from the page kinds seen (kind -> pages).

    Raises:
        InputError: Palette masks are mixed with colour masks.
    """
    if "rgb" in kinds and "palette" in kinds:
        raise InputError(f"masks mix palette files ({kinds['palette']} pages) with colour files "
                         f"({kinds['rgb']} pages); convert them to one kind first")
    return "rgb" if "rgb" in kinds else "palette" if "palette" in kinds else "grey"


def as_kind(codes: dict[int, int], page_kind: str, kind: str) -> dict[int, int]:
    """Codes of a page of ``page_kind`` as codes of a ``kind`` table (grey ``v`` in a colour table: ``v,v,v``)."""
    if kind == "rgb" and page_kind != "rgb":
        return {v * 0x010101: c for v, c in codes.items()}
    return codes


def infer_table(counts: Mapping[int, int], kind: str, *, where: str) -> LabelTable:
    """Infer the label table from all masks' code counts (see the module docstring for the rules).

    Raises:
        InputError: The values are ambiguous; the message shows them and suggests ``--colors``.
    """
    codes = sorted(counts)
    shown = ", ".join(_show(c, kind) for c in codes[:8]) + (", ..." if len(codes) > 8 else "")
    what = {"rgb": "colours", "palette": "palette indices", "grey": "grey values"}[kind]
    if len(codes) > MAX_INFERRED_LABELS:
        raise InputError(
            f"{where}: masks hold {len(codes)} distinct {what} ({shown}): not binary, not a palette of a few "
            f"classes (antialiased or JPEG edges?); give the table with --colors \"0=background;255=object\" "
            "and add --snap-colors to map the other values to the nearest listed one")
    if len(codes) < 2:
        raise InputError(f"{where}: every mask pixel is {shown}: there is nothing to segment")
    if 0 not in counts:
        raise InputError(f"{where}: no mask pixel is 0 / black, so the background is unclear ({what}: {shown}); "
                         "give the table with --colors, the background first")
    total = sum(counts.values())
    rare = [c for c in codes[1:] if counts[c] < RARE_SHARE * total]
    if len(codes) > 2 and rare:
        raise InputError(
            f"{where}: {what} {', '.join(_show(c, kind) for c in rare[:5])} cover only "
            f"{sum(counts[c] for c in rare)} of {total} mask pixels (edge blends?); give the table with --colors "
            "(and --snap-colors to map blends to the nearest listed value)")
    if len(codes) == 2:
        names = ["background", "foreground"]
    else:
        prefix = {"rgb": "color", "palette": "index", "grey": "value"}[kind]
        names = ["background"] + [f"{prefix}_{'_'.join(str(v) for v in unpack(c, kind))}" for c in codes[1:]]
    return LabelTable(kind, tuple(LabelEntry(n, unpack(c, kind), counts[c]) for n, c in zip(names, codes)))


def _show(code: int, kind: str) -> str:
    return "(" + ",".join(str(v) for v in unpack(code, kind)) + ")" if kind == "rgb" else str(code)


def given_table(table: LabelTable, kind: str, counts: Mapping[int, int]) -> LabelTable:
    """Fit a ``--colors`` table to the masks' kind and record each entry's pixel count.

    Raises:
        InputError: A colour table for grey or palette masks with a non-grey colour.
    """
    entries = table.entries
    if kind == "rgb" and table.kind != "rgb":
        entries = tuple(replace(e, value=e.value * 3) for e in entries)
    elif kind != "rgb" and table.kind == "rgb":
        if any(len(set(e.value)) > 1 for e in entries):
            raise InputError(f"--colors: the masks are {kind} (one value per pixel) but the table lists colours")
        entries = tuple(replace(e, value=e.value[:1]) for e in entries)
    entries = tuple(replace(e, pixels=int(counts.get(e.code, 0))) for e in entries)
    return LabelTable(kind, entries, source="--colors", snap=table.snap)


def to_labels(page: np.ndarray, page_kind: str, table: LabelTable) -> tuple[np.ndarray, dict[int, int]]:
    """Map a mask page to labels 0..K-1 (uint8).

    Returns:
        The label map and the codes not in the table with their pixel counts (those pixels are 0, unless
        the table snaps them to the nearest value).
    """
    codes, own = page_codes(page, page_kind)
    if table.kind == "rgb" and own != "rgb":
        codes = codes.astype(np.uint32) * 0x010101
    values, counts = unique_counts(codes)
    index = {e.code: k for k, e in enumerate(table.entries)}
    lut = np.zeros(len(values), np.uint8)
    unknown: dict[int, int] = {}
    for i, v in enumerate(values.tolist()):
        if v in index:
            lut[i] = index[v]
        elif table.snap:
            lut[i] = _nearest(v, table)
        else:
            unknown[v] = int(counts[i])
    return lut[np.searchsorted(values, codes)], unknown


def _nearest(code: int, table: LabelTable) -> int:
    target = np.array(unpack(code, table.kind), float)
    distances = [float(np.sum((np.array(e.value, float) - target) ** 2)) for e in table.entries]
    return int(np.argmin(distances))


def unknown_message(path: str, unknown: Mapping[int, int], kind: str) -> str:
    """One line naming the values of a mask that the table does not list."""
    items = sorted(unknown.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{_show(c, kind)} ({n} px)" for c, n in items[:5]) + (", ..." if len(items) > 5 else "")
    return f"{path}: values not in --colors: {shown}; add them to --colors or pass --snap-colors"


@dataclass(frozen=True)
class OpenOutline:
    """A connected outline that encloses nothing: ``solid`` when it is a filled region rather than a curve."""

    y: int
    x: int
    solid: bool


def fill_outlines(labels: np.ndarray) -> tuple[np.ndarray, list[OpenOutline]]:
    """Fill each closed outline with its label (only background pixels inside it change).

    Every connected outline (8-connected pixels of one label) is filled on its own with
    ``scipy.ndimage.binary_fill_holes``. One that encloses nothing is either an open curve or a region that
    is already filled (``solid``: most of its pixels are interior).

    Returns:
        The filled label map and the outlines that enclose nothing (centre and whether solid).

    Example:
        >>> ring = np.zeros((5, 5), np.uint8); ring[1:4, 1:4] = 1; ring[2, 2] = 0
        >>> filled, open_outlines = fill_outlines(ring)
        >>> int(filled[2, 2]), open_outlines
        (1, [])
        >>> fill_outlines(np.eye(4, dtype=np.uint8))[1]
        [OpenOutline(y=1, x=1, solid=False)]
    """
    from scipy import ndimage

    out = labels.copy()
    open_outlines: list[OpenOutline] = []
    eight = np.ones((3, 3), bool)
    for k in [int(v) for v in np.unique(labels) if v != 0]:
        components, n = ndimage.label(labels == k, structure=eight)
        for i, box in enumerate(ndimage.find_objects(components), start=1):
            y0, y1 = max(box[0].start - 1, 0), min(box[0].stop + 1, labels.shape[0])
            x0, x1 = max(box[1].start - 1, 0), min(box[1].stop + 1, labels.shape[1])
            outline = components[y0:y1, x0:x1] == i
            inside = ndimage.binary_fill_holes(outline) & ~outline
            if not inside.any():
                ys, xs = np.nonzero(outline)
                solid = ndimage.binary_erosion(outline, structure=eight).sum() >= 0.5 * outline.sum()
                open_outlines.append(OpenOutline(int(ys.mean()) + y0, int(xs.mean()) + x0, bool(solid)))
                continue
            region = out[y0:y1, x0:x1]
            region[inside & (region == 0)] = k
    return out, open_outlines
