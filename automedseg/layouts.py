"""Raw dataset layouts read in place: nnU-Net v2 and the Medical Segmentation Decathlon (:func:`load_dataset_spec`).

Two raw layouts are read in place:

* **nnU-Net v2**: ``dataset.json`` with ``channel_names``, ``labels`` (name -> int), ``numTraining`` and
  ``file_ending``; images ``imagesTr/CASE_XXXX<ending>`` (one file per channel), labels
  ``labelsTr/CASE<ending>``, optional ``imagesTs/``.
* **Medical Segmentation Decathlon**: ``dataset.json`` with ``modality``, ``labels`` (id -> name) and a
  ``training`` list of ``{"image", "label"}`` paths; several channels are stored as one 4D NIfTI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automedseg.case_files import CaseFiles
from automedseg.errors import DatasetError
from automedseg.images import IMAGE_ENDINGS_2D, file_ending


@dataclass(frozen=True)
class DatasetSpec:
    """What ``dataset.json`` and the folder say about a dataset.

    Attributes:
        root: Dataset folder.
        name: Dataset name.
        layout: ``nnunet`` or ``msd``.
        channel_names: One name per input channel (e.g. ``("T2",)`` or ``("CT",)``).
        labels: Label name -> value, background included.
        file_ending: Image file ending (``.nii.gz`` ...).
        cases: Training cases.
        test_cases: Cases of ``imagesTs`` (no labels).
        spacing_2d_mm: Pixel spacing (y, x) for 2D raster files, from ``dataset.json`` key
            ``spacing_2d_mm`` (default 1 mm).
    """

    root: Path
    name: str
    layout: str
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    file_ending: str
    cases: tuple[CaseFiles, ...]
    test_cases: tuple[CaseFiles, ...] = ()
    spacing_2d_mm: tuple[float, float] | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def is_2d(self) -> bool:
        return self.file_ending in IMAGE_ENDINGS_2D


def _read_dataset_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not root.is_dir():
        raise DatasetError([f"{root}: dataset folder does not exist"])
    if not path.is_file():
        raise DatasetError([f"{path}: dataset.json is missing"])
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError([f"{path}: not valid JSON ({e})"]) from None
    if not isinstance(data, dict):
        raise DatasetError([f"{path}: expected a JSON object at the top level"])
    return data


def load_dataset_spec(root: Path) -> DatasetSpec:
    """Read ``dataset.json`` of either layout and list the cases.

    Files are not opened here (see :mod:`automedseg.checks`); a missing file shows up as a path that
    does not exist.

    Raises:
        DatasetError: dataset.json is missing, malformed or incomplete (all problems listed).
    """
    root = Path(root)
    data = _read_dataset_json(root)
    if "channel_names" in data or "file_ending" in data:
        return _load_nnunet(root, data)
    if "modality" in data or "training" in data:
        return _load_msd(root, data)
    raise DatasetError([
        f"{root / 'dataset.json'}: neither nnU-Net v2 (channel_names, file_ending) nor MSD (modality, training) format"
    ])


def _spacing_2d(data: dict[str, Any], where: Path, problems: list[str]) -> tuple[float, float] | None:
    s = data.get("spacing_2d_mm")
    if s is None:
        return None
    if not (isinstance(s, list) and len(s) == 2 and all(isinstance(v, (int, float)) and v > 0 for v in s)):
        problems.append(f"{where}: spacing_2d_mm must be a list of two positive numbers (y, x)")
        return None
    return (float(s[0]), float(s[1]))


def _counts(data: dict[str, Any], where: Path, problems: list[str]) -> None:
    for key in ("numTraining", "numTest"):
        value = data.get(key)
        if key in data and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            problems.append(f"{where}: '{key}' must be a non-negative integer, got {value!r}")


def _channel_names(raw: Any, key: str, where: Path, problems: list[str]) -> tuple[str, ...]:
    if isinstance(raw, list):
        raw = {str(i): v for i, v in enumerate(raw)}  # ["T1", "T2"]: channels in order
    if not isinstance(raw, dict) or not raw:
        problems.append(f"{where}: '{key}' must be a non-empty object like {{\"0\": \"CT\"}} (or a list of names)")
        return ()
    bad = [v for v in raw.values() if not isinstance(v, str) or not v]
    if bad:
        problems.append(f"{where}: '{key}' values must be channel names (non-empty strings), got {bad[0]!r}")
        return ()
    try:
        items = sorted(((int(k), str(v)) for k, v in raw.items()))
    except ValueError:
        problems.append(f"{where}: '{key}' keys must be channel numbers \"0\", \"1\", ...")
        return ()
    if [k for k, _ in items] != list(range(len(items))):
        problems.append(f"{where}: '{key}' keys must be consecutive from 0, got {[k for k, _ in items]}")
    return tuple(v for _, v in items)


def _label_value_problems(labels: dict[str, int], where: Path, zero: str, problems: list[str]) -> None:
    """Background 0 must be declared and no value be negative (training indices map sorted values to 0..K-1)."""
    if labels and 0 not in labels.values():
        problems.append(f"{where}: 'labels' must declare background as {zero}")
    negative = sorted(n for n, v in labels.items() if v < 0)
    if negative:
        problems.append(f"{where}: label(s) {negative} have negative values; labels must be >= 0")


def _load_nnunet(root: Path, data: dict[str, Any]) -> DatasetSpec:
    where = root / "dataset.json"
    problems: list[str] = []
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        if key not in data:
            problems.append(f"{where}: required key '{key}' is missing")
    channels: tuple[str, ...] = ()
    if "channel_names" in data:
        channels = _channel_names(data["channel_names"], "channel_names", where, problems)
    labels: dict[str, int] = {}
    raw_labels = data.get("labels")
    if raw_labels is not None:
        if not isinstance(raw_labels, dict) or not raw_labels:
            problems.append(f"{where}: 'labels' must be an object of name -> integer value")
        else:
            for name, value in raw_labels.items():
                if isinstance(value, bool) or not isinstance(value, int):
                    problems.append(
                        f"{where}: label {name!r} has value {value!r}; only integer labels are supported "
                        "(region-based training is not)"
                    )
                else:
                    labels[str(name)] = value
            _label_value_problems(labels, where, "0", problems)
    ending = data.get("file_ending")
    if ending is not None and (not isinstance(ending, str) or not ending.startswith(".")):
        problems.append(f"{where}: 'file_ending' must be a string like \".nii.gz\", got {ending!r}")
        ending = None
    spacing_2d = _spacing_2d(data, where, problems)
    _counts(data, where, problems)
    if problems:
        raise DatasetError(problems)
    assert isinstance(ending, str)
    n_ch = len(channels)

    def cases_in(images_dir: Path, labels_dir: Path | None) -> list[CaseFiles]:
        ids: set[str] = set()
        # Hidden files are skipped: they include the temporary files of interrupted atomic writes.
        if labels_dir is not None and labels_dir.is_dir():
            ids |= {p.name[: -len(ending)] for p in labels_dir.iterdir()
                    if p.name.endswith(ending) and not p.name.startswith(".")}
        if images_dir.is_dir():
            for p in images_dir.iterdir():
                stem = p.name[: -len(ending)]
                if (p.name.endswith(ending) and not p.name.startswith(".") and len(stem) > 5 and stem[-5] == "_"
                        and stem[-4:].isdigit()):
                    ids.add(stem[:-5])
        out = []
        for cid in sorted(ids):
            images = tuple(images_dir / f"{cid}_{c:04d}{ending}" for c in range(n_ch))
            if (n_ch > 1 and ending in IMAGE_ENDINGS_2D and images[0].is_file()
                    and not any(p.exists() for p in images[1:])):
                images = images[:1]  # one RGB raster file holds all channels (nnU-Net's natural-image convention)
            label = labels_dir / f"{cid}{ending}" if labels_dir is not None else None
            out.append(CaseFiles(cid, images, label))
        return out

    cases = cases_in(root / "imagesTr", root / "labelsTr")
    notes = []
    if isinstance(data.get("numTraining"), int) and data["numTraining"] != len(cases):
        notes.append(f"{where}: numTraining is {data['numTraining']} but {len(cases)} training cases were found")
    tests = cases_in(root / "imagesTs", None)
    return DatasetSpec(
        root=root,
        name=str(data.get("name", root.name)),
        layout="nnunet",
        channel_names=channels,
        labels=labels,
        file_ending=ending,
        cases=tuple(cases),
        test_cases=tuple(tests),
        spacing_2d_mm=spacing_2d,
        notes=tuple(notes),
    )


def _case_id_from_path(path: str, ending: str) -> str:
    name = Path(path).name
    return name[: -len(ending)] if ending and name.endswith(ending) else Path(path).stem


def _load_msd(root: Path, data: dict[str, Any]) -> DatasetSpec:
    where = root / "dataset.json"
    problems: list[str] = []
    for key in ("modality", "labels", "training"):
        if key not in data:
            problems.append(f"{where}: required key '{key}' is missing")
    channels = _channel_names(data.get("modality"), "modality", where, problems) if "modality" in data else ()
    labels: dict[str, int] = {}
    raw_labels = data.get("labels")
    if raw_labels is not None:
        if not isinstance(raw_labels, dict) or not raw_labels:
            problems.append(f"{where}: 'labels' must be an object of value -> name")
        else:
            for value, name in raw_labels.items():
                try:
                    labels[str(name)] = int(value)
                except ValueError:
                    problems.append(f"{where}: label key {value!r} is not an integer")
                if not isinstance(name, str):
                    problems.append(f"{where}: label {value!r} must be named by a string, got {name!r}")
            _label_value_problems(labels, where, '"0"', problems)
    training = data.get("training")
    entries: list[tuple[str, str]] = []
    if training is not None:
        if not isinstance(training, list):
            problems.append(f"{where}: 'training' must be a list of {{\"image\", \"label\"}} objects")
        else:
            for i, item in enumerate(training):
                if not (isinstance(item, dict) and isinstance(item.get("image"), str)
                        and isinstance(item.get("label"), str)):
                    problems.append(f"{where}: training[{i}] must have string 'image' and 'label' paths")
                else:
                    entries.append((item["image"], item["label"]))
    if not isinstance(data.get("test", []), list):
        problems.append(f"{where}: 'test' must be a list of image paths")
    spacing_2d = _spacing_2d(data, where, problems)
    _counts(data, where, problems)
    if problems:
        raise DatasetError(problems)
    ending = file_ending(entries[0][0]) if entries else ".nii.gz"
    cases = tuple(
        CaseFiles(_case_id_from_path(img, ending), ((root / img).resolve(),), (root / lab).resolve())
        for img, lab in entries
    )
    seen: set[str] = set()
    dupes = [c.case_id for c in cases if c.case_id in seen or seen.add(c.case_id)]  # type: ignore[func-returns-value]
    if dupes:
        raise DatasetError([f"{where}: case ids listed twice in 'training': {sorted(set(dupes))}"])
    tests: list[CaseFiles] = []
    test_entries = data.get("test") if isinstance(data.get("test"), list) else []
    for t in test_entries:
        p = t.get("image") if isinstance(t, dict) else t
        if isinstance(p, str):
            tests.append(CaseFiles(_case_id_from_path(p, ending), ((root / p).resolve(),), None))
    if not tests and (root / "imagesTs").is_dir():
        tests = [
            CaseFiles(_case_id_from_path(p.name, ending), (p,), None)
            for p in sorted((root / "imagesTs").iterdir()) if p.name.endswith(ending) and not p.name.startswith(".")
        ]
    return DatasetSpec(
        root=root,
        name=str(data.get("name", root.name)),
        layout="msd",
        channel_names=channels,
        labels=labels,
        file_ending=ending,
        cases=cases,
        test_cases=tuple(tests),
        spacing_2d_mm=spacing_2d,
    )
