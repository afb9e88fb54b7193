"""Reading and writing the typed JSON files of the work folder.

Each JSON file in the work folder has one owner module, which reads and writes it; other modules call the
owner's reader instead of parsing the file:

* ``plans.json``: :mod:`automedseg.plans` (``Plans.load`` / ``Plans.save``);
* ``fingerprint.json``: :mod:`automedseg.fingerprint` (``Fingerprint``, ``save_fingerprint`` / ``load_fingerprint``;
  the dataclasses are in :mod:`automedseg.fingerprint_types`);
* the preprocessed ``<case>.json``: :mod:`automedseg.preprocessing` (``CaseMeta``, ``read_case_meta``);
* ``splits.json``: :mod:`automedseg.splits` (``FoldSplit``, ``read_splits`` / ``write_splits``);
* a fold's ``log.jsonl``: :mod:`automedseg.training_log` (``EpochRecord``, ``read_training_log``);
* a fold's ``validation/summary.json``: :mod:`automedseg.validation_summary` (``ValidationSummary``);
* ``postprocessing.json``: :mod:`automedseg.postprocessing_format` (``Postprocessing.load`` / ``.save``;
  chosen and applied by :mod:`automedseg.postprocessing`, which re-exports them);
* ``find_best.json``: :mod:`automedseg.best_choice` (``FindBest``, ``read_find_best``; written by
  :func:`automedseg.model_selection.find_best`);
* a search's ``search/<study>/confirmation.json``: :mod:`automedseg.search_confirm` (``Confirmation``,
  ``read_confirmation``);
* an evaluation's ``metrics_summary.json``: :mod:`automedseg.metrics` (``MetricsSummary``, ``read_metrics_summary``;
  written by :func:`automedseg.metrics.evaluate_folders`; its precision-recall curves are
  :class:`automedseg.pr_curves.PRCurve`);
* a prediction's ``uncertainty_summary.json`` and ``uncertainty/<case>.json``: :mod:`automedseg.uncertainty`
  (``UncertaintySummary``, ``read_uncertainty_summary``; ``CaseUncertainty``).
* ``adapt.json`` of an adapted model: :mod:`automedseg.adapt` (``AdaptRecord``, ``read_adapt_record``);
* ``intensity_reference.json``: :mod:`automedseg.intensity_reference` (``IntensityReference``, ``read_reference``).

The frozen dataclasses among them are read and written with :func:`read_artifact` / :func:`write_artifact`
(:func:`automedseg.plans.from_jsonable` / :func:`~automedseg.plans.to_jsonable`): a malformed file raises
:class:`~automedseg.errors.InputError` naming the file and the field.

Example:
    >>> import tempfile
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Note:
    ...     text: str
    >>> path = Path(tempfile.mkdtemp()) / "note.json"
    >>> write_artifact(path, Note("hello"))
    >>> read_artifact(Note, path)
    Note(text='hello')
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from automedseg.atomic import atomic_write_json
from automedseg.errors import InputError
from automedseg.plans import from_jsonable, to_jsonable

T = TypeVar("T")


def read_json_file(path: Path) -> Any:
    """The JSON content of ``path``.

    Raises:
        FileNotFoundError: There is no such file.
        InputError: The file cannot be read or is not JSON (the message names the file).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: unreadable ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def read_artifact(tp: type[T], path: Path) -> T:
    """Read ``path`` as a ``tp`` dataclass (see :func:`automedseg.plans.from_jsonable`).

    Raises:
        FileNotFoundError: There is no such file.
        InputError: The file is not JSON or a field is missing or of the wrong type (the message names the file
            and the field).
    """
    return from_jsonable(tp, read_json_file(path), str(path))


def write_artifact(path: Path, obj: Any) -> None:
    """Write a dataclass as indented JSON, atomically (non-finite numbers as ``null``)."""
    atomic_write_json(Path(path), to_jsonable(obj))
