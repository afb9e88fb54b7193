"""Dataset integrity checks: every problem found, one line each, naming the file.

The same per-case inspection feeds the fingerprint, so ``automedseg plan`` reads each file once.

Example:
    >>> problems = check_dataset(Path("my_dataset"))  # doctest: +SKIP
    >>> print("\\n".join(problems))                    # doctest: +SKIP
    my_dataset/labelsTr/case_007.nii.gz: label values [3] are not declared in dataset.json
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from automedseg.constants import N_SPLITS
from automedseg.io import (
    IMAGE_ENDINGS_2D,
    CaseFiles,
    DatasetError,
    DatasetSpec,
    Geometry,
    label_dtype,
    load_dataset_spec,
    read_image_file,
)
from automedseg.parallel import parallel_map


@dataclass
class CaseInspection:
    """What reading one case gave: arrays when all is well, problems otherwise."""

    case_id: str
    problems: list[str] = field(default_factory=list)
    image: np.ndarray | None = None  # float32 (C, Z, Y, X)
    label: np.ndarray | None = None  # int (Z, Y, X)
    geometry: Geometry | None = None
    has_foreground: bool | None = None  # whether the label holds any nonzero value; None: label not read


def inspect_case(case: CaseFiles, spec: DatasetSpec, *, need_label: bool = True) -> CaseInspection:
    """Read and check one case; never raises for a data problem.

    Checks: missing, unreadable (permission) or unreadable-by-SimpleITK files, files that contradict their
    header (truncated, inflated, invalid spacing: :func:`automedseg.imagefile.check_image_file`), 4D where 3D
    is expected, channel count, geometry agreement between channel files and the label (size, spacing,
    origin, direction, with tolerance), NaN or infinite intensities (naming the channel file), non-integral
    and undeclared label values.
    """
    out = CaseInspection(case.case_id)
    n_channels = len(spec.channel_names)
    arrays: list[np.ndarray] = []
    ref: Geometry | None = None
    for path in case.images:
        try:
            arr, geom = read_image_file(path, spacing_2d_mm=spec.spacing_2d_mm)
        except (FileNotFoundError, OSError) as e:
            out.problems.append(str(e) if str(path) in str(e) else f"{path}: {e}")
            continue
        four_d = geom.ndim == 3 and geom.n_components > 1 and not _rgb_like(path)
        if four_d and (spec.layout == "nnunet" or n_channels == 1):
            out.problems.append(f"{path}: 4D image ({geom.n_components} volumes) where a 3D image is expected")
            continue
        if ref is None:
            ref = geom
        else:
            diff = ref.matches(geom)
            if diff:
                out.problems.append(f"{path}: geometry differs from {case.images[0].name}: {'; '.join(diff)}")
                continue
        if np.issubdtype(arr.dtype, np.floating):  # NIfTI NaN/inf already failed the read; MHA/NRRD keep them
            bad = int((~np.isfinite(arr)).sum())
            if bad:
                out.problems.append(f"{path}: {bad} NaN or infinite intensity value(s)")
                continue
        arrays.append(arr)
    if arrays and len(arrays) == len(case.images):
        image = np.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0]
        if image.shape[0] != n_channels:
            out.problems.append(
                f"{case.images[0]}: has {image.shape[0]} channel(s), dataset.json declares {n_channels}"
            )
        else:
            image = image.astype(np.float32, copy=False)
            if np.isfinite(image).all():
                out.image, out.geometry = image, ref
            else:  # finite float64 values beyond the float32 range
                out.problems.append(f"{case.images[0]}: intensities beyond the float32 range (about 3.4e38)")
    if need_label:
        _inspect_label(case, spec, ref, out)
    return out


def _rgb_like(path: Path) -> bool:
    return str(path).lower().endswith(IMAGE_ENDINGS_2D)


def _inspect_label(case: CaseFiles, spec: DatasetSpec, ref: Geometry | None, out: CaseInspection) -> None:
    path = case.label
    if path is None:
        out.problems.append(f"{case.images[0]}: training case has no label file")
        return
    try:
        arr, geom = read_image_file(path, spacing_2d_mm=spec.spacing_2d_mm)
    except (FileNotFoundError, OSError) as e:
        out.problems.append(str(e))
        return
    if arr.shape[0] != 1:
        kind = "4D" if geom.ndim == 3 else "multi-channel"
        out.problems.append(f"{path}: {kind} label ({arr.shape[0]} components) where a 3D label map is expected")
        return
    if ref is not None:
        diff = ref.matches(geom)
        if diff:
            out.problems.append(f"{path}: label geometry differs from image {case.images[0].name}: {'; '.join(diff)}")
            return
    lab = arr[0]
    if not np.issubdtype(lab.dtype, np.integer):
        finite = np.isfinite(lab)
        if not finite.all():
            out.problems.append(f"{path}: label has {int((~finite).sum())} NaN or infinite value(s)")
            return
        nonint = lab != np.round(lab)
        if nonint.any():
            examples = np.unique(lab[nonint])[:3]
            out.problems.append(
                f"{path}: label has non-integral values (e.g. {', '.join(f'{v:g}' for v in examples)})"
            )
            return
    values = np.unique(lab).astype(np.int64)
    out.has_foreground = bool(np.any(values != 0))
    undeclared = sorted(set(values.tolist()) - set(spec.labels.values()))
    if undeclared:
        out.problems.append(f"{path}: label values {undeclared} are not declared in dataset.json")
        return
    out.label = lab.astype(label_dtype(values.max(initial=0)), copy=False)


def dataset_level_problems(spec: DatasetSpec, *, min_cases: int = N_SPLITS) -> list[str]:
    """Problems visible without opening images: no or too few training cases, count mismatches.

    Args:
        spec: The dataset.
        min_cases: Fewer training cases than this (but at least one) is a problem; the default is the
            number of cross-validation folds, which ``train --fold K`` needs (``check`` and ``plan``).
    """
    problems = list(spec.notes)
    where = spec.root / ("labelsTr" if spec.layout == "nnunet" else "dataset.json")
    if not spec.cases:
        problems.append(f"{where}: the dataset has no training cases")
    elif len(spec.cases) < min_cases:
        problems.append(f"{where}: {len(spec.cases)} training case(s) are too few for {N_SPLITS}-fold "
                        f"cross-validation (at least {min_cases} needed)")
    return problems


def no_foreground_problem(spec: DatasetSpec) -> str:
    """The problem line for a dataset whose labels are all background (shared by ``check`` and ``plan``)."""
    label = spec.cases[0].label if spec.cases else None
    return f"{label.parent if label is not None else spec.root}: no training case has any foreground label"


def check_dataset(root: Path, *, jobs: int = 2, progress: bool = False) -> list[str]:
    """Run every check on a dataset folder and return all problems (empty list: the dataset is fine).

    Per case see :func:`inspect_case`; per dataset see :func:`dataset_level_problems`, and, reported
    last, labels that were all read but hold no foreground at all.
    """
    try:
        spec = load_dataset_spec(root)
    except DatasetError as e:
        return e.problems
    problems = dataset_level_problems(spec)
    foreground: list[bool | None] = []
    for result, has_foreground in parallel_map(_problems_of_case, [(c, spec) for c in spec.cases], jobs=jobs,
                                               desc="checking", progress=progress):
        problems.extend(result)
        foreground.append(has_foreground)
    if foreground and not any(foreground) and all(f is not None for f in foreground):
        problems.append(no_foreground_problem(spec))
    return problems


def _problems_of_case(args: tuple[CaseFiles, DatasetSpec]) -> tuple[list[str], bool | None]:
    case, spec = args
    insp = inspect_case(case, spec)
    return insp.problems, insp.has_foreground
