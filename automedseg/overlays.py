"""PNG overlays of a segmentation on its image: predicted (red) and reference (green) contours on a few slices.

Used by ``predict --overlays`` (:mod:`automedseg.inference`) and the report's validation overlays.

Example:
    >>> import numpy as np
    >>> image = np.arange(64, dtype=np.float32).reshape(1, 8, 8)
    >>> seg = np.zeros((1, 8, 8), dtype=np.uint8); seg[0, 2:6, 2:6] = 1
    >>> overlay_slices(image, seg).shape
    (8, 8, 3)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

PRED_COLOUR = (1.0, 0.15, 0.1)
REF_COLOUR = (0.1, 0.9, 0.2)


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def overlay_slices(image: np.ndarray, seg: np.ndarray, *, reference: np.ndarray | None = None,
                   n_slices: int = 3, gap: int = 0) -> np.ndarray:
    """RGB image (H, W * n, 3) of ``n_slices`` axial slices with predicted (red) and reference (green) contours.

    Slices are spread over the z-range that holds foreground (prediction or reference); 2D inputs
    ``(1, Y, X)`` give one panel. ``gap`` white pixel columns separate the panels (then the width is
    ``W * n + gap * (n - 1)``).
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img, seg = img[None], np.asarray(seg)[None]
        reference = None if reference is None else np.asarray(reference)[None]
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
            rgb[_boundary(seg[z] == k)] = PRED_COLOUR
        if reference is not None:
            for k in np.unique(reference[z]):
                if k == 0:
                    continue
                rgb[_boundary(reference[z] == k)] = REF_COLOUR
        if gap and panels:
            panels.append(np.ones((rgb.shape[0], gap, 3), dtype=rgb.dtype))
        panels.append(rgb)
    return np.concatenate(panels, axis=1)


def save_overlay(image: np.ndarray, seg: np.ndarray, path: Path, *, reference: np.ndarray | None = None,
                 n_slices: int = 3, scale: int = 4) -> None:
    """Write :func:`overlay_slices` as a PNG (nearest-neighbour upscaled by ``scale``), atomically."""
    import matplotlib.image as mpimg

    rgb = overlay_slices(image, seg, reference=reference, n_slices=n_slices)
    rgb = np.kron(rgb, np.ones((scale, scale, 1)))
    from automedseg.atomic import atomic_write

    atomic_write(Path(path), lambda tmp: mpimg.imsave(tmp, rgb, format="png"))
