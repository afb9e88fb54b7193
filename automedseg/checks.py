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


@dataclass
class CaseInspection:
    """What reading one case gave: arrays when all is well, problems otherwise."""

    case_id: str
    problems: list[str] = field(default_factory=list)
    image: np.ndarray | None = None  # float32 (C, Z, Y, X)
    label: np.ndarray | None = None  # int (Z, Y, X)
    geometry: Geometry | None = None


def inspect_case(case: CaseFiles, spec: DatasetSpec, *, need_label: bool = True) -> CaseInspection:
    """Read and check one case; never raises for a data problem.

    Checks: missing or unreadable files, 4D where 3D is expected, channel count, geometry agreement
    between channel files and the label (size, spacing, origin, direction, with tolerance), NaN or
    infinite intensities, non-integral and undeclared label values.
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
        arrays.append(arr)
    if arrays and len(arrays) == len(case.images):
        image = np.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0]
        if image.shape[0] != n_channels:
            out.problems.append(
                f"{case.images[0]}: has {image.shape[0]} channel(s), dataset.json declares {n_channels}"
            )
        else:
            image = image.astype(np.float32, copy=False)
            bad = ~np.isfinite(image)
            if bad.any():
                out.problems.append(
                    f"{case.images[0]}: {int(bad.sum())} NaN or infinite intensity value(s)"
                )
            else:
                out.image = image
                out.geometry = ref
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
    undeclared = sorted(set(values.tolist()) - set(spec.labels.values()))
    if undeclared:
        out.problems.append(f"{path}: label values {undeclared} are not declared in dataset.json")
        return
    out.label = lab.astype(label_dtype(values.max(initial=0)), copy=False)


def dataset_level_problems(spec: DatasetSpec) -> list[str]:
    """Problems visible without opening images: empty dataset, count mismatches."""
    problems = list(spec.notes)
    if not spec.cases:
        where = spec.root / ("labelsTr" if spec.layout == "nnunet" else "dataset.json")
        problems.append(f"{where}: the dataset has no training cases")
    return problems


def check_dataset(root: Path, *, jobs: int = 2, progress: bool = False) -> list[str]:
    """Run every check on a dataset folder and return all problems (empty list: the dataset is fine)."""
    try:
        spec = load_dataset_spec(root)
    except DatasetError as e:
        return e.problems
    from automedseg.fingerprint import parallel_map

    problems = dataset_level_problems(spec)
    for result in parallel_map(_problems_of_case, [(c, spec) for c in spec.cases], jobs=jobs,
                               desc="checking", progress=progress):
        problems.extend(result)
    return problems


def _problems_of_case(args: tuple[CaseFiles, DatasetSpec]) -> list[str]:
    case, spec = args
    return inspect_case(case, spec).problems
