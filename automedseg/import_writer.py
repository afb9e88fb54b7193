"""Writing an imported dataset: build it in a hidden sibling folder, then rename it into place.

Each file is written with :func:`automedseg.atomic.atomic_write` (fsynced) inside a folder named
``.tmp-<pid>-<random>-import-<name>`` next to the output; only when every case is written without a problem
is that folder renamed to the output (an existing output, with ``--overwrite``, is first renamed aside and
removed after). A killed import leaves its hidden folder, which the next import in the same place removes
when its process is gone.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from automedseg.atomic import _pid_alive, atomic_write, atomic_write_json, fsync_path
from automedseg.import_labels import LabelTable, fill_outlines, mask_kind, to_labels, unknown_message
from automedseg.import_rasters import RasterInfo, read_pages
from automedseg.io import DatasetError


@dataclass(frozen=True)
class ImportCase:
    """One output case: one page of a source image with its mask and field-of-view pages."""

    case_id: str
    split: str  # "training" or "test"
    image: RasterInfo
    mask: RasterInfo | None
    fov: RasterInfo | None
    page: int | None  # page of a multi-page file, None for single-page files
    spacing_yx: tuple[float, float] | None = None



def stale_import_folders(parent: Path) -> list[Path]:
    """Hidden folders ``.tmp-<pid>-*-import-*`` (or ``-old-``) in ``parent`` whose process is gone."""
    out = []
    for p in sorted(parent.glob(".tmp-*-*-*-*")) if parent.is_dir() else []:
        parts = p.name.split("-")
        if (p.is_dir() and parts[1].isdigit() and parts[3] in ("import", "old") and int(parts[1]) != os.getpid()
                and not _pid_alive(int(parts[1]))):
            out.append(p)
    return out


def temp_sibling(output: Path, what: str) -> Path:
    """An unpredictable hidden name next to ``output`` for building it (``import``) or retiring it (``old``)."""
    return output.parent / f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{what}-{output.name}"


def write_dataset(output: Path, cases: list[ImportCase], *, table: LabelTable, channel_names: tuple[str, ...],
                  ending: str, fill: bool, name: str, source: Path, report: dict[str, Any],
                  overwrite: bool = False) -> None:
    """Write every case, ``dataset.json`` and ``import_report.json``, then publish the folder as ``output``.

    Raises:
        DatasetError: Masks that could not be converted (open outlines, values not in the table): nothing
            is published then.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_import_folders(output.parent):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_sibling(output, "import")
    tmp.mkdir()
    try:
        problems: list[str] = []
        solid: list[Path] = []
        rows: dict[str, dict[str, Any]] = {}
        for _, group in itertools.groupby(cases, key=lambda c: (c.split, c.image.path)):
            group = list(group)
            by_index = table.source == "inferred"
            for case, image, mask, fov in zip(group, read_pages(group[0].image), _pages(group[0].mask, by_index),
                                              _pages(group[0].fov, False)):
                problems += _write_case(tmp, case, image, mask, fov, table=table, ending=ending, fill=fill,
                                        n_channels=len(channel_names), solid=solid)
                rows[f"{case.split}/{case.case_id}"] = _row(case, source)
        if solid:
            problems.append(f"{len(solid)} mask file(s) hold filled regions, not outlines (e.g. {solid[0]}): "
                            "filling adds nothing; import them without --fill-outlines")
        if problems:
            raise DatasetError(problems)
        atomic_write_json(tmp / "dataset.json", _dataset_json(cases, table, channel_names, ending, name, source))
        atomic_write_json(tmp / "import_report.json", {**report, "cases": rows})
        _publish(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _pages(info: Any, palette_indices: bool) -> Iterator[np.ndarray | None]:
    return read_pages(info, palette_indices=palette_indices) if info is not None else itertools.repeat(None)


def _publish(tmp: Path, output: Path) -> None:
    if output.exists():  # an empty folder, or one --overwrite replaces
        old = temp_sibling(output, "old")
        os.rename(output, old)
        try:
            os.rename(tmp, output)
        except OSError:
            os.rename(old, output)
            raise
        fsync_path(output.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, output)
        fsync_path(output.parent)


def _folders(split: str) -> tuple[str, str, str]:
    return ("imagesTr", "labelsTr", "fovTr") if split == "training" else ("imagesTs", "labelsTs", "fovTs")


def _write_case(root: Path, case: ImportCase, image: np.ndarray, mask: np.ndarray | None, fov: np.ndarray | None,
                *, table: LabelTable, ending: str, fill: bool, n_channels: int, solid: list[Path]) -> list[str]:
    images_dir, labels_dir, fov_dir = _folders(case.split)
    spacing_xy = tuple(reversed(case.spacing_yx)) if case.spacing_yx else (1.0, 1.0)
    if image.ndim == 2 and n_channels == 3:
        image = np.repeat(image[..., None], 3, axis=-1)
    if ending == ".png":
        _write(root / images_dir / f"{case.case_id}_0000{ending}", image, None, vector=image.ndim == 3)
    else:
        for c in range(n_channels):
            channel = image[..., c] if image.ndim == 3 else image
            _write(root / images_dir / f"{case.case_id}_{c:04d}{ending}", channel, spacing_xy)
    if mask is not None:
        assert case.mask is not None
        labels, unknown = to_labels(mask, mask_kind(case.mask.kind, by_index=table.source == "inferred"), table)
        if unknown:
            return [unknown_message(str(case.mask.path), unknown, table.kind)]
        if fill:
            labels, open_outlines = fill_outlines(labels)
            where = f"{case.mask.path}" + (f" page {case.page}" if case.page is not None else "")
            if open_outlines and all(o.solid for o in open_outlines):
                solid.append(case.mask.path)
                return []
            curves = [o for o in open_outlines if not o.solid]
            if curves:
                more = f" and {len(curves) - 1} more" if len(curves) > 1 else ""
                return [f"{where}: the outline at y={curves[0].y}, x={curves[0].x}{more} is not closed (filling "
                        "adds nothing); close it or import without --fill-outlines"]
        _write(root / labels_dir / f"{case.case_id}{ending}", labels.astype(np.uint8),
               spacing_xy if ending != ".png" else None)
    if fov is not None:
        inside = (fov != 0).any(axis=-1) if fov.ndim == 3 else fov != 0
        _write(root / fov_dir / f"{case.case_id}{ending}", inside.astype(np.uint8),
               spacing_xy if ending != ".png" else None)
    return []


def _write(path: Path, array: np.ndarray, spacing_xy: tuple[float, ...] | None, *, vector: bool = False) -> None:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=vector)
    if spacing_xy is not None:
        img.SetSpacing(tuple(float(v) for v in spacing_xy))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: sitk.WriteImage(img, str(tmp), useCompression=True))


def _rel(path: Path | None, source: Path) -> str | None:
    if path is None:
        return None
    try:
        return path.resolve().relative_to(source.resolve()).as_posix()
    except ValueError:
        return str(path)


def _row(case: ImportCase, source: Path) -> dict[str, Any]:
    return {"image": _rel(case.image.path, source), "page": case.page,
            "mask": _rel(case.mask.path if case.mask else None, source),
            "fov": _rel(case.fov.path if case.fov else None, source),
            "spacing_mm_yx": list(case.spacing_yx) if case.spacing_yx else None}


def _dataset_json(cases: list[ImportCase], table: LabelTable, channel_names: tuple[str, ...], ending: str,
                  name: str, source: Path) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": name,
        "description": f"imported from {source} by automedseg import",
        "channel_names": {str(i): n for i, n in enumerate(channel_names)},
        "labels": table.labels(),
        "numTraining": sum(c.split == "training" for c in cases),
        "numTest": sum(c.split == "test" for c in cases),
        "file_ending": ending,
    }
    spacings = {c.spacing_yx for c in cases if c.spacing_yx is not None}
    if ending == ".png" and len(spacings) == 1:
        data["spacing_2d_mm"] = list(next(iter(spacings)))
    if any(c.fov is not None for c in cases):
        data["fov"] = True
    return data
