"""The physical geometry of an image file (size, spacing, origin, direction), without reading any image.

Kept apart from :mod:`automedseg.images` (which imports SimpleITK) so that the typed work-folder files that
record a geometry (``fingerprint.json``, the preprocessed ``<case>.json``) and the planner stay light.

Example:
    >>> g = Geometry(size=(5, 4, 2), spacing=(0.75, 0.5, 2.0), origin=(0.0, 0.0, 0.0),
    ...              direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    >>> g.shape_zyx, g.spacing_zyx
    ((2, 4, 5), (2.0, 0.5, 0.75))
    >>> Geometry.from_dict(g.to_dict()) == g
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """Physical geometry of an image file, in SimpleITK's (x, y, z) order.

    Attributes:
        size: Voxels per axis (x, y[, z]).
        spacing: Voxel spacing in mm (x, y[, z]).
        origin: Physical position of the first voxel.
        direction: Row-major direction cosine matrix, flattened.
        n_components: Channels stored per voxel (3 for RGB), or in a 4th dimension (MSD 4D NIfTI).
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    n_components: int = 1

    @property
    def ndim(self) -> int:
        return len(self.size)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing in array order, always 3 entries (2D images get a z spacing of 999 like nnU-Net)."""
        s = tuple(float(v) for v in reversed(self.spacing))
        return s if len(s) == 3 else (999.0, *s)  # type: ignore[return-value]

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Array shape (z, y, x), always 3 entries (z = 1 for 2D)."""
        s = tuple(int(v) for v in reversed(self.size))
        return s if len(s) == 3 else (1, *s)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
            "n_components": self.n_components,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        return cls(
            size=tuple(int(v) for v in d["size"]),
            spacing=tuple(float(v) for v in d["spacing"]),
            origin=tuple(float(v) for v in d["origin"]),
            direction=tuple(float(v) for v in d["direction"]),
            n_components=int(d.get("n_components", 1)),
        )

    def matches(self, other: Geometry, *, spacing_rtol: float = 1e-3, origin_atol_mm: float = 1e-2,
                direction_atol: float = 1e-3) -> list[str]:
        """Return the ways ``other`` differs from this geometry (empty when they match within tolerance)."""
        if self.size != other.size:
            return [f"size {other.size} != {self.size}"]
        out = []
        if not np.allclose(self.spacing, other.spacing, rtol=spacing_rtol, atol=0):
            out.append(f"spacing {_fmt(other.spacing)} != {_fmt(self.spacing)}")
        if not np.allclose(self.origin, other.origin, atol=origin_atol_mm, rtol=0):
            out.append(f"origin {_fmt(other.origin)} != {_fmt(self.origin)}")
        if not np.allclose(self.direction, other.direction, atol=direction_atol, rtol=0):
            out.append(f"direction {_fmt(other.direction)} != {_fmt(self.direction)}")
        return out


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
