"""Durations as users write them (``90s``, ``30m``, ``2h``, ``1h30m``, plain seconds): the API's and the CLI's one
parser."""

from __future__ import annotations

import math


def duration_seconds(value: float | str | None) -> float | None:
    """A duration in seconds: a number of seconds, or text like ``90s``, ``30m``, ``2h``, ``1h30m`` or ``45``.

    Example:
        >>> duration_seconds("1h30m"), duration_seconds("45"), duration_seconds(90), duration_seconds(None)
        (5400.0, 45.0, 90.0, None)
        >>> duration_seconds("soon")
        Traceback (most recent call last):
        ...
        automedseg.errors.InputError: 'soon' is not a duration like 90s, 30m, 2h or 1h30m

    Raises:
        InputError: Text that is not a duration, or a duration that is not longer than 0.
    """
    import re

    from automedseg.errors import InputError

    if value is None:
        return None
    if isinstance(value, str):
        t = value.strip().lower()
        if re.fullmatch(r"\d+(\.\d+)?", t):
            seconds = float(t)
        else:
            parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", t)
            if not parts or "".join(a + b for a, b in parts) != t.replace(" ", ""):
                raise InputError(f"{value!r} is not a duration like 90s, 30m, 2h or 1h30m")
            seconds = float(sum(float(v) * {"h": 3600, "m": 60, "s": 1}[u] for v, u in parts))
    else:
        seconds = float(value)
    if not seconds > 0 or math.isinf(seconds):
        raise InputError(f"{value!r}: a duration must be longer than 0")
    return seconds
