"""Type-checked conversion between the frozen dataclasses of the work folder and JSON types.

:func:`to_jsonable` turns dataclasses, tuples and dicts into JSON types; :func:`from_jsonable` builds them back
from the declared types and names the field that is wrong (:class:`PlanError`). ``plans.json`` and every
typed work-folder file (:mod:`automedseg.artifacts`) go through these two functions.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Point:
    ...     x: int
    ...     y: tuple[float, ...] = ()
    >>> to_jsonable(Point(1, (2.0,)))
    {'x': 1, 'y': [2.0]}
    >>> from_jsonable(Point, {"x": 1, "y": [2]}, "point")
    Point(x=1, y=(2.0,))
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from automedseg.errors import InputError


class PlanError(InputError):
    """A plan (or another typed work-folder file) is malformed; the message names the field and the problem."""


def to_jsonable(obj: Any, tp: Any = None) -> Any:
    """Convert dataclasses, tuples and dicts into JSON types (tuples become lists).

    ``tp`` is the declared type of ``obj`` (taken from the dataclass fields); an integer stored in a
    ``float`` field is written as a float, so save -> load -> save gives identical text. A field declared
    with ``metadata={"omit_if_none": True}`` is left out while it is ``None`` (its default on reading), one with
    ``metadata={"omit_if_default": True}`` while it equals its default.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        hints = typing.get_type_hints(type(obj))
        return {f.name: to_jsonable(getattr(obj, f.name), hints.get(f.name)) for f in dataclasses.fields(obj)
                if not _omitted(f, getattr(obj, f.name))}
    if isinstance(obj, (list, tuple)):
        args = typing.get_args(tp) if typing.get_origin(tp) is tuple else ()
        if len(args) == 2 and args[1] is Ellipsis:
            types_ = [args[0]] * len(obj)
        elif len(args) == len(obj):
            types_ = list(args)
        else:
            types_ = [None] * len(obj)
        return [to_jsonable(v, t) for v, t in zip(obj, types_)]
    if isinstance(obj, dict):
        args = typing.get_args(tp) if typing.get_origin(tp) is dict else ()
        return {str(k): to_jsonable(v, args[1] if len(args) == 2 else None) for k, v in obj.items()}
    if not isinstance(obj, (bool, int, float, str)) and hasattr(obj, "item") and callable(obj.item):
        obj = obj.item()  # numpy scalars
    if isinstance(obj, float) or (isinstance(obj, int) and not isinstance(obj, bool) and _declares_float(tp)):
        return float(obj)
    return obj


def _omitted(f: dataclasses.Field, value: Any) -> bool:
    """A field left out of the JSON: an optional one added later, while it holds nothing or its default."""
    return bool((f.metadata.get("omit_if_none") and value is None)
                or (f.metadata.get("omit_if_default") and value == f.default))


def _declares_float(tp: Any) -> bool:
    if tp is float:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp)


def from_jsonable(tp: Any, data: Any, where: str) -> Any:
    """Build a value of type ``tp`` from JSON data, checking types; ``where`` names the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:  # free-form JSON (work-folder files; no plan field is declared so)
        return data
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise PlanError(f"{where}: expected an object, got {type(data).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise PlanError(f"{where}: unknown field(s) {unknown}")
        kwargs = {}
        for name, f in fields.items():
            if name in data:
                kwargs[name] = from_jsonable(hints[name], data[name], f"{where}.{name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise PlanError(f"{where}: missing field {name!r}")
        try:
            return tp(**kwargs)
        except PlanError as e:
            raise PlanError(f"{where}: {e}") from None
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return from_jsonable(a, data, where)
            except PlanError as e:
                errors.append(str(e))
        raise PlanError(errors[0] if errors else f"{where}: unexpected null")
    if origin is tuple:
        if not isinstance(data, list):
            raise PlanError(f"{where}: expected a list, got {type(data).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_jsonable(args[0], v, f"{where}[{i}]") for i, v in enumerate(data))
        if len(data) != len(args):
            raise PlanError(f"{where}: expected {len(args)} entries, got {len(data)}")
        return tuple(from_jsonable(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, data)))
    if origin is dict:
        if not isinstance(data, dict):
            raise PlanError(f"{where}: expected an object, got {type(data).__name__}")
        return {str(k): from_jsonable(args[1], v, f"{where}.{k}") for k, v in data.items()}
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise PlanError(f"{where}: expected a number, got {data!r}")
        return float(data)
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            if isinstance(data, float) and data.is_integer():
                return int(data)
            raise PlanError(f"{where}: expected an integer, got {data!r}")
        return data
    if tp is bool:
        if not isinstance(data, bool):
            raise PlanError(f"{where}: expected true or false, got {data!r}")
        return data
    if tp is str:
        if not isinstance(data, str):
            raise PlanError(f"{where}: expected a string, got {data!r}")
        return data
    raise PlanError(f"{where}: unsupported type {tp}")  # pragma: no cover - programming error
