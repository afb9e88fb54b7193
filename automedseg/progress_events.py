"""A machine-readable progress stream (``--progress json``): one JSON object a line on stdout, for services.

The command's own messages go to stderr in that mode, so stdout holds nothing but these lines (flushed as
written; numbers that are not finite are ``null``). Events:

- ``{"event": "stage", "stage": COMMAND, "status": "start"}`` when the command (``plan``, ``train``,
  ``predict``) starts, and ``"status": "end"`` (with what the command noted, e.g. counts) or ``"failed"``
  (with ``error`` or ``exit_code``) when it ends.
- ``{"event": "stage", "stage": "training" | "validation", "status": ..., "configuration": ..., "fold": ...}``
  from the trainer (:mod:`automedseg.tracking` lists what each carries).
- ``{"event": "epoch", "epoch": 3, "epochs": 20, ...}`` after each epoch, ``epoch`` counted from 1 (as the log
  lines print it) out of the ``epochs`` now planned, with ``train_loss``, ``val_loss``, ``pseudo_dice`` (mean
  over classes, whole validation images), ``ema_pseudo_dice``, ``pseudo_dice_per_class`` (by label name),
  ``lr``, ``epoch_seconds``, ``eta_seconds`` (the epochs left times the mean wall time of the last three,
  final validation not included) and ``time`` (Unix time).

Example:
    >>> import io
    >>> out = io.StringIO()
    >>> ProgressEvents(out).emit("stage", stage="plan", status="start", took=float("nan"))
    >>> out.getvalue()
    '{"event": "stage", "stage": "plan", "status": "start", "took": null}\\n'
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from automedseg.atomic import jsonable

if TYPE_CHECKING:
    from automedseg.tracking import RunInfo
    from automedseg.training_log import EpochRecord

FORMATS = ("text", "json")


class ProgressEvents:
    """Writes events as JSON lines to ``stream``; :meth:`tracker` follows a training run.

    Attributes:
        notes: Fields added to the command's ``end`` event (:func:`json_session`).
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.notes: dict[str, Any] = {}

    def emit(self, event: str, **fields: Any) -> None:
        """Write one event line and flush."""
        self.stream.write(json.dumps(jsonable({"event": event, **fields}), allow_nan=False) + "\n")
        self.stream.flush()

    def note(self, **fields: Any) -> None:
        """Add fields to the command's ``end`` event."""
        self.notes.update(fields)

    def tracker(self, run: RunInfo) -> JsonProgressTracker:
        """A :data:`~automedseg.tracking.TrackerFactory`: epoch and stage events of one fold."""
        return JsonProgressTracker(self, run)


def eta_seconds(epoch_walls: Sequence[float], *, done: int, planned: int) -> float | None:
    """Seconds left: the epochs left times the mean of the last three epoch wall times (``None``: none yet).

    Example:
        >>> eta_seconds([10.0, 2.0, 4.0, 6.0], done=4, planned=10)
        24.0
    """
    if not epoch_walls:
        return None
    recent = list(epoch_walls)[-3:]
    return max(0, planned - done) * sum(recent) / len(recent)


class JsonProgressTracker:
    """A :class:`~automedseg.tracking.Tracker` writing ``epoch`` and ``stage`` events (module docstring)."""

    def __init__(self, events: ProgressEvents, run: RunInfo, *, clock: Callable[[], float] | None = None) -> None:
        import time

        self.events, self.run = events, run
        self._clock = clock or time.time
        self._last: float | None = None  # when the previous epoch (or the training) ended (Unix time)
        self._walls: list[float] = []

    def _where(self) -> dict[str, Any]:
        return {"configuration": self.run.config.name, "fold": self.run.fold}

    def on_epoch(self, record: EpochRecord) -> None:
        """Write an ``epoch`` event with the ETA."""
        now = record.time if record.time is not None else self._clock()
        self._walls.append(now - self._last if self._last is not None else record.epoch_seconds)
        self._last = now
        planned = record.planned_epochs or record.epoch + 1
        self.events.emit(
            "epoch", **self._where(), epoch=record.epoch + 1, epochs=planned, train_loss=record.train_loss,
            val_loss=record.val_loss, pseudo_dice=record.mean_pseudo_dice, ema_pseudo_dice=record.ema_pseudo_dice,
            pseudo_dice_per_class=self.run.per_class(record.pseudo_dice), lr=record.lr,
            epoch_seconds=record.epoch_seconds, eta_seconds=eta_seconds(self._walls, done=record.epoch + 1,
                                                                        planned=planned),
            time=record.time)

    def on_stage(self, stage: str, status: str, **info: Any) -> None:
        """Write a ``stage`` event (per-class Dice by label name)."""
        if stage == "training" and status == "start":
            self._last = self._clock()
        if "dice_per_class" in info:
            info = {**info, "dice_per_class": self.run.per_class(info["dice_per_class"] or {})}
        self.events.emit("stage", stage=stage, status=status, **self._where(), **info)

    def close(self) -> None:
        """Nothing to release (every line is flushed as written)."""


@contextlib.contextmanager
def json_session(command: str, *, stream: TextIO | None = None) -> Iterator[ProgressEvents]:
    """Events on ``stream`` (default: stdout) while everything else written to stdout goes to stderr.

    Emits the command's ``start`` event, then ``end`` (with :attr:`ProgressEvents.notes`) or ``failed``.
    """
    events = ProgressEvents(stream if stream is not None else sys.stdout)
    events.emit("stage", stage=command, status="start")
    with contextlib.redirect_stdout(sys.stderr):
        try:
            yield events
        except SystemExit as e:
            if e.code in (None, 0):
                events.emit("stage", stage=command, status="end", **events.notes)
            else:
                events.emit("stage", stage=command, status="failed", exit_code=e.code)
            raise
        except BaseException as e:
            events.emit("stage", stage=command, status="failed", error=f"{type(e).__name__}: {e}".rstrip(": "))
            raise
    events.emit("stage", stage=command, status="end", **events.notes)


def progress_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """The ``--progress text|json`` option (parameter ``progress_format``); see :func:`open_progress`."""
    import click

    return click.option(
        "--progress", "progress_format", type=click.Choice(FORMATS), default="text", show_default=True,
        help="json: one JSON object per line on stdout for each stage and epoch (with ETA), for services; "
             "messages go to stderr.")(f)


def open_progress(progress_format: str) -> ProgressEvents | None:
    """For ``json``: a :func:`json_session` for the running click command, closed with it; else ``None``."""
    if progress_format != "json":
        return None
    import click

    ctx = click.get_current_context()
    return ctx.with_resource(json_session(ctx.info_name or "command"))
