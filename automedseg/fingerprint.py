"""Dataset fingerprint: what the planner needs to know about the data, computed once.

Per case: spacing, shape, shape after cropping to the nonzero region, per-channel foreground intensity
statistics from a deterministic sample of foreground voxels, voxel count and connected-component count
per class. Dataset level: median and percentile spacing and shape, modality per channel and pooled
foreground intensity statistics (used by CT normalisation).

All spatial tuples are in array order (z, y, x) of the raw images. The result is a typed
:class:`~automedseg.fingerprint_types.Fingerprint` (frozen dataclasses, re-exported here); this module owns
``fingerprint.json`` (:func:`save_fingerprint`, :func:`load_fingerprint`), and every other module reads the
fingerprint's attributes, never its JSON.

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "fingerprint.json"
    >>> _ = path.write_text(json.dumps({"fingerprint_version": FINGERPRINT_VERSION}))
    >>> problems = []
    >>> load_fingerprint(path, problems=problems) is None  # not reused: plan fingerprints the dataset again
    True
    >>> print(problems[0].replace(str(path), "fingerprint.json"))
    fingerprint.json: missing field 'dataset_name'
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from scipy import ndimage

from automedseg.checks import CaseInspection, dataset_level_problems, inspect_case, no_foreground_problem
from automedseg.fingerprint_types import (  # noqa: F401  (re-exported: the owner's types)
    FINGERPRINT_VERSION,
    CaseFingerprint,
    ClassStats,
    ClassSummary,
    DatasetSummary,
    Fingerprint,
    IntensityStats,
)
from automedseg.io import CaseFiles, DatasetError, DatasetSpec, atomic_write_json
from automedseg.lateral import centroid_rel
from automedseg.parallel import parallel_map
from automedseg.serialize import PlanError

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


def case_fingerprint(inspection: CaseInspection, labels: Iterable[int]) -> tuple[CaseFingerprint, np.ndarray]:
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
    classes: dict[str, ClassStats] = {}
    for k in labels:
        if k == 0:
            continue
        m = label == k
        n = int(m.sum())
        centre = centroid_rel(m) if n else None  # for lateralised labels (automedseg.lateral)
        classes[str(k)] = ClassStats(
            voxels=n,
            components=int(ndimage.label(m)[1]) if n else 0,
            centroid_rel=tuple(centre) if centre is not None else None,
            size_px=structure_size_px(m) if n else None,  # for the 2D scale rule (automedseg.topology)
        )
    return CaseFingerprint(
        case_id=inspection.case_id,
        spacing_mm=geom.spacing_zyx,
        shape=geom.shape_zyx,
        shape_after_crop=tuple(b - a for a, b in bbox),  # type: ignore[arg-type]
        crop_bbox=bbox,  # type: ignore[arg-type]
        geometry=geom,
        foreground_voxels=int(fg.sum()),
        intensity=tuple(IntensityStats.of(sample[c]) for c in range(sample.shape[0])),
        classes=classes,
    ), sample.astype(np.float32)


def _fingerprint_worker(
    args: tuple[CaseFiles, DatasetSpec],
) -> tuple[list[str], CaseFingerprint | None, np.ndarray | None]:
    case, spec = args
    insp = inspect_case(case, spec)
    if insp.problems:
        return insp.problems, None, None
    fp, sample = case_fingerprint(insp, spec.labels.values())
    return [], fp, sample


def compute_fingerprint(spec: DatasetSpec, *, jobs: int = 2, progress: bool = False,
                        min_cases: int = 1) -> Fingerprint:
    """Check and fingerprint every training case.

    Args:
        spec: The dataset.
        jobs: Parallel processes.
        progress: Show a progress bar.
        min_cases: Fewer training cases is a problem (``plan`` passes the cross-validation fold count).

    Returns:
        The fingerprint, without ``files_signature`` (``plan`` adds it with :func:`dataclasses.replace`).

    Raises:
        DatasetError: Any integrity problem (all of them listed, one line each).
    """
    problems = dataset_level_problems(spec, min_cases=min_cases)
    cases: list[CaseFingerprint] = []
    samples: list[np.ndarray] = []
    for probs, fp, sample in parallel_map(_fingerprint_worker, [(c, spec) for c in spec.cases], jobs=jobs,
                                          desc="fingerprint", progress=progress):
        problems.extend(probs)
        if fp is not None and sample is not None:
            cases.append(fp)
            samples.append(sample)
    if problems:
        raise DatasetError(problems)
    if not any(c.foreground_voxels for c in cases):
        # Nothing to learn, and the pooled intensity statistics would be NaN (invalid JSON, NaN CT clipping).
        raise DatasetError([no_foreground_problem(spec)])
    pooled = np.concatenate(samples, axis=1)
    intensity = [IntensityStats.of(pooled[c]) for c in range(pooled.shape[0])]
    return Fingerprint(
        dataset_name=spec.name,
        layout=spec.layout,
        channel_names=tuple(spec.channel_names),
        modalities=tuple(modality_of(n) for n in spec.channel_names),
        labels=dict(spec.labels),
        is_2d=bool(all(c.shape[0] == 1 for c in cases)),
        num_cases=len(cases),
        dataset=DatasetSummary.of_cases(cases, intensity=intensity, labels=spec.labels.values()),
        cases=tuple(cases),
    )


def save_fingerprint(fingerprint: Fingerprint, path: Path) -> None:
    """Write ``fingerprint.json`` atomically."""
    atomic_write_json(Path(path), fingerprint.to_dict())


def load_fingerprint(path: Path, *, signature: str | None = None,
                     problems: list[str] | None = None) -> Fingerprint | None:
    """The saved ``fingerprint.json`` when it can be reused, else ``None``.

    Reusable means: the file exists and is a JSON object, of this :data:`FINGERPRINT_VERSION`, (when
    ``signature`` is given) computed from the same files (its ``files_signature``), and a valid
    :class:`Fingerprint`. Anything else (missing, unreadable, older, other files, malformed) means the dataset
    must be fingerprinted again.

    Args:
        path: The file.
        signature: The signature of the dataset's files now (:func:`automedseg.pipeline.files_signature`).
        problems: Where a malformed file's problem (naming the file and the field) is appended.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("fingerprint_version") != FINGERPRINT_VERSION:
        return None
    if signature is not None and data.get("files_signature") != signature:
        return None
    try:
        return Fingerprint.from_dict(data, str(path))
    except PlanError as e:
        if problems is not None:
            problems.append(str(e))
        return None
