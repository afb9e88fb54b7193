"""The cross-validation split of a work folder: ``splits.json``, its one owner.

Made once (scikit-learn ``KFold``, shuffled, seed :data:`SPLIT_SEED`) from the cases of the preprocessed cache
and then read back through :func:`read_splits`, which every other module uses; a split edited by hand is
accepted when it names exactly the dataset's cases and never trains and validates a fold on one case.

In memory a split is :data:`Splits`, a tuple of frozen :class:`FoldSplit`; on disk it is a JSON list of
``{"train": [case ids], "val": [case ids]}``, one per fold.

Example:
    >>> ws = Workspace(Path(tempfile.mkdtemp()))
    >>> splits = load_or_create_splits(ws, [f"c{i}" for i in range(10)])
    >>> len(splits), sorted(len(s.val) for s in splits)
    (5, [2, 2, 2, 2, 2])
    >>> read_splits(ws.splits_path) == splits
    True
"""

from __future__ import annotations

import json
import tempfile  # noqa: F401  (used by the docstring example)
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automedseg.atomic import atomic_write_json
from automedseg.constants import N_SPLITS
from automedseg.errors import InputError
from automedseg.workspace import Workspace

SPLIT_SEED = 12345
_SHAPE = '{"train": [case ids], "val": [case ids]}'


@dataclass(frozen=True)
class FoldSplit:
    """One fold of the cross-validation.

    Attributes:
        train: The cases the fold trains on.
        val: The held-out cases it validates on.

    Example:
        >>> FoldSplit(train=("a", "b"), val=("c",)).val
        ('c',)
    """

    train: tuple[str, ...]
    val: tuple[str, ...]


Splits = tuple[FoldSplit, ...]
"""The whole split: one :class:`FoldSplit` per fold, fold ``k`` at index ``k``."""


def load_or_create_splits(ws: Workspace, case_ids: Sequence[str], *, n_splits: int = N_SPLITS,
                          seed: int = SPLIT_SEED) -> Splits:
    """The cross-validation split, made once (scikit-learn KFold, shuffled) and then read from splits.json.

    A split read back (possibly edited by hand) must name exactly the cases of ``case_ids`` and never train
    and validate one fold on the same case.

    Raises:
        InputError: splits.json is unreadable, malformed or made for another case list; too few cases.
    """
    if ws.splits_path.is_file():
        splits = read_splits(ws.splits_path)
        _check_splits(splits, case_ids, ws.splits_path)
        return splits
    from sklearn.model_selection import KFold

    ids = sorted(case_ids)
    if len(ids) < n_splits:
        raise InputError(f"{len(ids)} training case(s) are too few for {n_splits}-fold cross-validation "
                         f"(at least {n_splits} needed); use --fold all to train on every case")
    kf = KFold(n_splits=n_splits, shuffle=True, random_state=seed)
    splits = tuple(FoldSplit(train=tuple(ids[i] for i in tr), val=tuple(ids[i] for i in va))
                   for tr, va in kf.split(ids))
    write_splits(ws.splits_path, splits)
    return splits


def write_splits(path: Path, splits: Sequence[FoldSplit]) -> None:
    """Write splits.json atomically (a split edited in code, e.g. fewer validation cases, goes through here).

    Raises:
        InputError: ``splits`` is not at least 2 :class:`FoldSplit` of case-id strings (nothing written).
    """
    ok = len(splits) >= 2 and all(
        isinstance(s, FoldSplit) and all(isinstance(c, str) for c in (*s.train, *s.val)) for s in splits)
    if not ok:
        raise InputError(f"{path}: expected a list of at least 2 FoldSplit (train and val case ids); "
                         "nothing written")
    atomic_write_json(Path(path), [{"train": list(s.train), "val": list(s.val)} for s in splits])


def read_splits(path: Path) -> Splits:
    """Read splits.json: a list of ``{"train": [case ids], "val": [case ids]}``, one per fold.

    Raises:
        InputError: The file is not valid JSON or not of that shape (the message names the file).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); move it aside to make a new split"
                         ) from None
    _check_shape(data, path)
    return tuple(FoldSplit(train=tuple(s["train"]), val=tuple(s["val"])) for s in data)


def _check_shape(data: Any, path: Path) -> None:
    ok = isinstance(data, list) and len(data) >= 2 and all(
        isinstance(s, dict) and set(s) >= {"train", "val"}
        and all(isinstance(s[k], list) and all(isinstance(c, str) for c in s[k]) for k in ("train", "val"))
        for s in data)
    if not ok:
        raise InputError(f"{path}: expected a list of at least 2 {_SHAPE} objects; move it aside to make a new "
                         "split")


def _check_splits(splits: Splits, case_ids: Sequence[str], path: Path) -> None:
    known = set(case_ids)
    hint = "it was made for another case list; move it aside to make a new split"
    named = {c for s in splits for c in (*s.train, *s.val)}
    unknown = sorted(named - known)
    if unknown:
        raise InputError(f"{path}: names {len(unknown)} case(s) not in the preprocessed dataset "
                         f"(e.g. {unknown[0]}); {hint}")
    left_out = sorted(known - named)
    if left_out:
        raise InputError(f"{path}: {len(left_out)} case(s) of the dataset are in no fold "
                         f"(e.g. {left_out[0]}); {hint}")
    for k, s in enumerate(splits):
        both = set(s.train) & set(s.val)
        if both:
            raise InputError(f"{path}: fold {k} trains and validates on {sorted(both)[0]}; move it aside")
