"""PNG overlays of a segmentation on its image: one colour per label, the reference contour, a legend.

Used by ``predict --overlays`` (:mod:`automedseg.inference`) and the report's validation overlays
(:mod:`automedseg.report_sections`). Each label gets its own colour of the colour-blind-safe Okabe-Ito palette
(:data:`PALETTE`, cycled when there are more labels than colours), in the order of the label values the caller
declares (so a label keeps its colour from case to case). A predicted label is drawn as a translucent fill with its
boundary in the full colour; the reference, when known, as a white contour just outside each reference region. A
legend strip under the slices names the labels (``"1: liver"``, or ``"label 1"`` without a name).

Plain functions, arrays in and out: :func:`overlay_slices` (the slices, pixel-exact), :func:`legend_entries`,
:func:`add_legend` (the strip below), and :func:`render_overlay` / :func:`save_overlay` (all three, upscaled).

Example:
    >>> import numpy as np
    >>> image = np.arange(64, dtype=np.float32).reshape(1, 8, 8)
    >>> seg = np.zeros((1, 8, 8), dtype=np.uint8); seg[0, 2:6, 2:6] = 1
    >>> overlay_slices(image, seg).shape
    (8, 8, 3)
    >>> [e.text for e in legend_entries([1, 2], label_names={1: "liver"}, reference=True)]
    ['1: liver', 'label 2', 'reference contour']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

Colour = tuple[float, float, float]

# Okabe & Ito (2008), "Color Universal Design", without black (invisible on dark images): orange, sky blue,
# bluish green, yellow, blue, vermillion, reddish purple.
PALETTE: tuple[Colour, ...] = tuple(
    (r / 255, g / 255, b / 255)
    for r, g, b in ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
                    (204, 121, 167))
)
REFERENCE_COLOUR: Colour = (1.0, 1.0, 1.0)
LEGEND_BACKGROUND: Colour = (1.0, 1.0, 1.0)
_SWATCH_EDGE: Colour = (0.25, 0.25, 0.25)
_TEXT_COLOUR = (34, 34, 34)


@dataclass(frozen=True)
class LegendEntry:
    """One line of the legend: a colour swatch and its text."""

    text: str
    colour: Colour


def label_order(seg: np.ndarray, *, reference: np.ndarray | None = None,
                labels: Sequence[int] | None = None) -> list[int]:
    """The foreground label values in palette order: ``labels`` first, then values found only in the arrays.

    Args:
        seg: Predicted label map.
        reference: Reference label map, if known.
        labels: Declared foreground label values (their order gives the colours); ``None``: none declared.
    """
    order = [int(k) for k in (labels or ()) if int(k) != 0]
    found = set(np.unique(seg).tolist())
    if reference is not None:
        found |= set(np.unique(reference).tolist())
    return order + sorted(int(k) for k in found if k != 0 and int(k) not in order)


def label_colours(labels: Sequence[int]) -> dict[int, Colour]:
    """Label value -> RGB colour in [0, 1]: the ``i``-th label gets ``PALETTE[i % len(PALETTE)]``."""
    return {int(k): PALETTE[i % len(PALETTE)] for i, k in enumerate(labels)}


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` on its edge (inside it)."""
    return mask & ~ndimage.binary_erosion(mask)


def _outer_contour(mask: np.ndarray) -> np.ndarray:
    """Pixels just outside ``mask`` (8-connected ring), so that a matching prediction's edge stays visible."""
    return ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool)) & ~mask


def overlay_slices(image: np.ndarray, seg: np.ndarray, *, reference: np.ndarray | None = None,
                   labels: Sequence[int] | None = None, n_slices: int = 3, gap: int = 0,
                   fill_alpha: float = 0.4) -> np.ndarray:
    """RGB image (H, W * n, 3) in [0, 1] of ``n_slices`` axial slices with the labels and the reference contour.

    Each predicted label is blended over the grey image with ``fill_alpha`` and its edge drawn in its full colour
    (:func:`label_colours` of :func:`label_order`); the reference, when given, as a white ring just outside each
    of its regions (drawn last). Slices are spread over the z-range that holds foreground (prediction or
    reference); 2D inputs ``(Y, X)`` or ``(1, Y, X)`` give one panel.

    Args:
        image: Intensities, (Z, Y, X) or (Y, X).
        seg: Predicted label values, same shape.
        reference: Reference label values, same shape; ``None``: not known.
        labels: Declared foreground label values in colour order (see :func:`label_order`).
        n_slices: Slices to show at most.
        gap: White pixel columns between the panels (the width is then ``W * n + gap * (n - 1)``).
        fill_alpha: Opacity of the label fill (0: edges only).
    """
    img = np.asarray(image, dtype=np.float32)
    seg = np.asarray(seg)
    if img.ndim == 2:
        img, seg = img[None], seg[None]
        reference = None if reference is None else np.asarray(reference)[None]
    colours = label_colours(label_order(seg, reference=reference, labels=labels))
    fg = seg > 0 if reference is None else (seg > 0) | (reference > 0)
    zs = np.flatnonzero(fg.reshape(fg.shape[0], -1).any(1))
    if zs.size == 0:
        zs = np.arange(img.shape[0])
    picks = np.unique(np.linspace(zs[0], zs[-1], min(n_slices, zs.size)).round().astype(int))
    lo, hi = np.percentile(img, [0.5, 99.5])
    panels = []
    for z in picks:
        grey = np.clip((img[z] - lo) / max(hi - lo, 1e-6), 0, 1)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        for k in np.unique(seg[z]):
            if k == 0:
                continue
            mask = seg[z] == k
            colour = np.asarray(colours[int(k)])
            rgb[mask] = (1 - fill_alpha) * rgb[mask] + fill_alpha * colour
            rgb[_boundary(mask)] = colour
        if reference is not None:
            for k in np.unique(reference[z]):
                if k != 0:
                    rgb[_outer_contour(reference[z] == k)] = REFERENCE_COLOUR
        if gap and panels:
            panels.append(np.ones((rgb.shape[0], gap, 3), dtype=rgb.dtype))
        panels.append(rgb)
    return np.concatenate(panels, axis=1)


def legend_entries(labels: Sequence[int], *, label_names: Mapping[int, str] | None = None,
                   reference: bool = False) -> list[LegendEntry]:
    """The legend of an overlay: one entry per label (in colour order), then the reference contour if drawn.

    Args:
        labels: Foreground label values in colour order (:func:`label_order`).
        label_names: Label value -> name (from the plan or dataset.json); a label without one is ``"label N"``.
        reference: Add the entry of the reference contour.
    """
    names = label_names or {}
    colours = label_colours(labels)
    out = []
    for k in labels:
        name = names.get(int(k))
        out.append(LegendEntry(f"{k}: {name}" if name and name != str(k) else f"label {k}", colours[int(k)]))
    if reference:
        out.append(LegendEntry("reference contour", REFERENCE_COLOUR))
    return out


def _font(size_px: int) -> Any:
    """DejaVu Sans (shipped with matplotlib) at ``size_px``; Pillow's built-in font if it cannot be loaded."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size_px)
    except (ImportError, OSError):
        return ImageFont.load_default()


def add_legend(rgb: np.ndarray, entries: Sequence[LegendEntry], *, font_px: int = 13) -> np.ndarray:
    """``rgb`` (H, W, 3) in [0, 1] with a white legend strip below it (entries wrapped into rows of width W).

    Each entry is a square swatch of its colour (dark edge) and its text. The result is as wide as ``rgb``, or
    as the widest entry when that is wider (``rgb`` is then padded with white on the right). No entries: ``rgb``
    unchanged.
    """
    if not entries:
        return rgb
    from PIL import Image, ImageDraw

    font = _font(font_px)
    pad, swatch, spacing = max(4, font_px // 2), font_px, font_px
    widths = [swatch + pad + int(np.ceil(font.getlength(e.text))) for e in entries]
    width = max(rgb.shape[1], max(widths) + 2 * pad)
    rows: list[list[int]] = [[]]
    x = pad
    for i, w in enumerate(widths):
        if rows[-1] and x + w > width - pad:
            rows.append([])
            x = pad
        rows[-1].append(i)
        x += w + spacing
    row_px = font_px + pad
    strip = Image.new("RGB", (width, pad + row_px * len(rows)), tuple(round(255 * c) for c in LEGEND_BACKGROUND))
    draw = ImageDraw.Draw(strip)
    for r, row in enumerate(rows):
        x, y = pad, pad + r * row_px
        for i in row:
            entry = entries[i]
            draw.rectangle((x, y, x + swatch - 1, y + swatch - 1), fill=tuple(round(255 * c) for c in entry.colour),
                           outline=tuple(round(255 * c) for c in _SWATCH_EDGE))
            draw.text((x + swatch + pad, y + swatch / 2), entry.text, fill=_TEXT_COLOUR, font=font, anchor="lm")
            x += widths[i] + spacing
    top = np.ones((rgb.shape[0], width, 3), dtype=np.float64)
    top[:, :rgb.shape[1]] = rgb
    return np.concatenate([top, np.asarray(strip, dtype=np.float64) / 255], axis=0)


def render_overlay(image: np.ndarray, seg: np.ndarray, *, reference: np.ndarray | None = None,
                   label_names: Mapping[int, str] | None = None, n_slices: int = 3, gap: int = 2,
                   scale: int = 4, font_px: int = 13) -> np.ndarray:
    """The overlay as shown: :func:`overlay_slices` upscaled ``scale`` times (nearest neighbour), with its legend.

    Args:
        image: Intensities, (Z, Y, X) or (Y, X).
        seg: Predicted label values, same shape.
        reference: Reference label values; ``None``: not known (no contour, no legend entry).
        label_names: Foreground label value -> name; its keys, in order, also fix the colours.
        n_slices: Slices to show at most.
        gap: White pixel columns between the panels (before upscaling).
        scale: Integer upscaling factor of the slices (the legend text is drawn at full resolution).
        font_px: Legend text height in pixels.
    """
    labels = list(label_names or {})
    rgb = overlay_slices(image, seg, reference=reference, labels=labels, n_slices=n_slices, gap=gap)
    rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    order = label_order(np.asarray(seg), reference=None if reference is None else np.asarray(reference),
                        labels=labels)
    return add_legend(rgb, legend_entries(order, label_names=label_names, reference=reference is not None),
                      font_px=font_px)


def save_overlay(image: np.ndarray, seg: np.ndarray, path: Path, *, reference: np.ndarray | None = None,
                 label_names: Mapping[int, str] | None = None, n_slices: int = 3, scale: int = 4) -> None:
    """Write :func:`render_overlay` as a PNG, atomically."""
    from PIL import Image

    from automedseg.atomic import atomic_write

    rgb = render_overlay(image, seg, reference=reference, label_names=label_names, n_slices=n_slices, scale=scale)
    arr = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    atomic_write(Path(path), lambda tmp: Image.fromarray(arr).save(tmp, format="png"))
