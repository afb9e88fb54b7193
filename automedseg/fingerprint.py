"""Dataset fingerprint: what the planner needs to know about the data, computed once.

Per case: spacing, shape, shape after cropping to the nonzero region, per-channel foreground intensity
statistics from a deterministic sample of foreground voxels, voxel count and connected-component count
per class. Dataset level: median and percentile spacing and shape, modality per channel and pooled
foreground intensity statistics (used by CT normalisation).

All spatial tuples are in array order (z, y, x) of the raw images. The result is plain JSON
(``fingerprint.json``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from automedseg.checks import CaseInspection, dataset_level_problems, inspect_case, no_foreground_problem
from automedseg.io import CaseFiles, DatasetError, DatasetSpec, atomic_write_json
from automedseg.lateral import centroid_rel
from automedseg.parallel import parallel_map

FINGERPRINT_VERSION = 3  # 2: per-class centroids; 3: per-class in-plane structure size
SAMPLES_PER_CASE = 10_000
SAMPLE_SEED = 1234

def modality_of(channel_name: str) -> str:
    """Map a channel name to a normalisation family: ``ct``, ``rgb``, ``none`` or ``zscore``.

    Example:
        >>> [modality_of(n) for n in ("CT", "T2", "R", "noNorm")]
        ['ct', 'zscore', 'rgb', 'none']
    """
    n = channel_name.strip().lower()
    if n == "ct" or n.startswith("ct ") or n.endswith(" ct"):
        return "ct"
    if n in {"r", "g", "b", "red", "green", "blue", "rgb", "rgb_to_0_1", "rgb_to_01"}:
        return "rgb"
    if n in {"nonorm", "none", "no_norm"}:
        return "none"
    return "zscore"


def nonzero_bbox(image: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Bounding box ``((z0, z1), (y0, y1), (x0, x1))`` (end exclusive) of voxels nonzero in any channel.

    Example:
        >>> a = np.zeros((1, 4, 4, 4)); a[0, 1:3, 2, 0:2] = 5
        >>> nonzero_bbox(a)
        ((1, 3), (2, 3), (0, 2))
    """
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        return tuple((0, s) for s in mask.shape)
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append((int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)


def structure_size_px(mask: np.ndarray) -> float:
    """In-plane size of a mask's structures in pixels: twice its area over its boundary pixels.

    About the radius of a round structure and the width of a thin one (a vessel, a membrane), so it says how
    far the in-plane resolution can be coarsened before the structure is lost. The boundary is the set of
    mask pixels with a 4-neighbour (in the y-x plane) outside the mask; slices of a 3D mask are pooled.

    Example:
        >>> disk = np.zeros((1, 101, 101), bool)
        >>> yy, xx = np.mgrid[:101, :101]
        >>> disk[0] = (yy - 50) ** 2 + (xx - 50) ** 2 <= 30 ** 2
        >>> 25 < structure_size_px(disk) < 35
        True
        >>> line = np.zeros((1, 50, 50), bool); line[0, 20:23, 5:45] = True
        >>> round(structure_size_px(line), 1)
        2.9
    """
    m = np.asarray(mask, dtype=bool)
    inner = m.copy()
    inner[:, 1:, :] &= m[:, :-1, :]
    inner[:, :-1, :] &= m[:, 1:, :]
    inner[:, :, 1:] &= m[:, :, :-1]
    inner[:, :, :-1] &= m[:, :, 1:]
    inner[:, 0, :] = inner[:, -1, :] = False  # the image border counts as outside
    inner[:, :, 0] = inner[:, :, -1] = False
    boundary = int(m.sum() - inner.sum())
    return round(2.0 * float(m.sum()) / max(boundary, 1), 3)


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {k: float("nan") for k in ("mean", "std", "median", "min", "max", "p00_5", "p99_5")}
    p = np.percentile(values, [50.0, 0.5, 99.5])
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "median": float(p[0]),
        "min": float(values.min()),
        "max": float(values.max()),
        "p00_5": float(p[1]),
        "p99_5": float(p[2]),
    }


def case_fingerprint(inspection: CaseInspection, labels: Iterable[int]) -> tuple[dict[str, Any], np.ndarray]:
    """Fingerprint of one checked case; also returns the foreground intensity sample (C, N)."""
    assert inspection.image is not None and inspection.label is not None and inspection.geometry is not None
    image, label, geom = inspection.image, inspection.label, inspection.geometry
    bbox = nonzero_bbox(image)
    fg = label > 0
    rng = np.random.default_rng(SAMPLE_SEED)
    fg_idx = np.flatnonzero(fg)
    if fg_idx.size > SAMPLES_PER_CASE:
        fg_idx = np.sort(rng.choice(fg_idx, SAMPLES_PER_CASE, replace=False))
    sample = image.reshape(image.shape[0], -1)[:, fg_idx]
    classes = {}
    for k in labels:
        if k == 0:
            continue
        m = label == k
        n = int(m.sum())
        classes[str(k)] = {
            "voxels": n,
            "components": int(ndimage.label(m)[1]) if n else 0,
            "centroid_rel": centroid_rel(m) if n else None,  # for lateralised labels (automedseg.lateral)
            "size_px": structure_size_px(m) if n else None,  # for the 2D scale rule (automedseg.topology)
        }
    return {
        "case_id": inspection.case_id,
        "spacing_mm": list(geom.spacing_zyx),
        "shape": list(geom.shape_zyx),
        "shape_after_crop": [b - a for a, b in bbox],
        "crop_bbox": [list(b) for b in bbox],
        "geometry": geom.to_dict(),
        "foreground_voxels": int(fg.sum()),
        "intensity": [_stats(sample[c]) for c in range(sample.shape[0])],
        "classes": classes,
    }, sample.astype(np.float32)


def _fingerprint_worker(
    args: tuple[CaseFiles, DatasetSpec],
) -> tuple[list[str], dict[str, Any] | None, np.ndarray | None]:
    case, spec = args
    insp = inspect_case(case, spec)
    if insp.problems:
        return insp.problems, None, None
    fp, sample = case_fingerprint(insp, spec.labels.values())
    return [], fp, sample


def compute_fingerprint(spec: DatasetSpec, *, jobs: int = 2, progress: bool = False,
                        min_cases: int = 1) -> dict[str, Any]:
    """Check and fingerprint every training case.

    Args:
        spec: The dataset.
        jobs: Parallel processes.
        progress: Show a progress bar.
        min_cases: Fewer training cases is a problem (``plan`` passes the cross-validation fold count).

    Raises:
        DatasetError: Any integrity problem (all of them listed, one line each).
    """
    problems = dataset_level_problems(spec, min_cases=min_cases)
    cases: list[dict[str, Any]] = []
    samples: list[np.ndarray] = []
    for probs, fp, sample in parallel_map(_fingerprint_worker, [(c, spec) for c in spec.cases], jobs=jobs,
                                          desc="fingerprint", progress=progress):
        problems.extend(probs)
        if fp is not None and sample is not None:
            cases.append(fp)
            samples.append(sample)
    if problems:
        raise DatasetError(problems)
    if not any(c["foreground_voxels"] for c in cases):
        # Nothing to learn, and the pooled intensity statistics would be NaN (invalid JSON, NaN CT clipping).
        raise DatasetError([no_foreground_problem(spec)])
    spacings = np.array([c["spacing_mm"] for c in cases], dtype=float)
    shapes = np.array([c["shape"] for c in cases], dtype=float)
    cropped = np.array([c["shape_after_crop"] for c in cases], dtype=float)
    pooled = np.concatenate(samples, axis=1)
    modalities = [modality_of(n) for n in spec.channel_names]
    class_summary = {}
    for k in sorted(spec.labels.values()):
        if k == 0:
            continue
        vox = np.array([c["classes"][str(k)]["voxels"] for c in cases], dtype=float)
        comps = np.array([c["classes"][str(k)]["components"] for c in cases], dtype=float)
        class_summary[str(k)] = {
            "present_in_cases": int((vox > 0).sum()),
            "median_voxels": float(np.median(vox)),
            "min_voxels": float(vox.min()),
            "median_components": float(np.median(comps)),
            "max_components": float(comps.max()),
        }
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "dataset_name": spec.name,
        "layout": spec.layout,
        "channel_names": list(spec.channel_names),
        "modalities": modalities,
        "labels": dict(spec.labels),
        "is_2d": bool(all(c["shape"][0] == 1 for c in cases)),
        "num_cases": len(cases),
        "dataset": {
            "median_spacing_mm": np.median(spacings, axis=0).tolist(),
            "spacing_p10_mm": np.percentile(spacings, 10, axis=0).tolist(),
            "spacing_p90_mm": np.percentile(spacings, 90, axis=0).tolist(),
            "median_shape": np.median(shapes, axis=0).tolist(),
            "median_shape_after_crop": np.median(cropped, axis=0).tolist(),
            "min_shape_after_crop": cropped.min(axis=0).tolist(),
            "max_shape_after_crop": cropped.max(axis=0).tolist(),
            "intensity": [_stats(pooled[c]) for c in range(pooled.shape[0])],
            "classes": class_summary,
        },
        "cases": cases,
    }


def save_fingerprint(fingerprint: dict[str, Any], path: Path) -> None:
    """Write ``fingerprint.json`` atomically."""
    atomic_write_json(path, fingerprint)


def load_fingerprint(path: Path, *, signature: str | None = None) -> dict[str, Any] | None:
    """The saved ``fingerprint.json`` when it can be reused, else ``None``.

    Reusable means: the file exists and is a JSON object, of this :data:`FINGERPRINT_VERSION`, and (when
    ``signature`` is given) computed from the same files (its ``files_signature``). Anything else (missing,
    unreadable, older, other files) means the dataset must be fingerprinted again.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        fingerprint = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(fingerprint, dict) or fingerprint.get("fingerprint_version") != FINGERPRINT_VERSION:
        return None
    if signature is not None and fingerprint.get("files_signature") != signature:
        return None
    return fingerprint
