"""Exclusive per-folder locks, so two runs never write the same fold, work folder or output folder.

A lock is an ``flock`` on a file inside the folder: the kernel releases it when the process ends, however it
ends, so a ``kill -9`` never leaves a stale lock. The file records who holds it (pid, command, start time) so
the refused run can say so; the file itself stays (deleting it would race with the next taker).

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with folder_lock(folder, purpose="train fold 0"):
    ...     pass
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from automedseg.errors import LockedError

LOCK_NAME = ".automedseg.lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"process {info['pid']} ({info['purpose']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def folder_lock(folder: Path, *, purpose: str, name: str = LOCK_NAME, shared: bool = False) -> Iterator[Path]:
    """Hold a lock on ``folder`` (created if missing) for the ``with`` block: exclusive unless ``shared``.

    Args:
        folder: The folder to protect.
        purpose: What this process does there, shown to a process that is refused.
        name: Lock file name inside ``folder`` (different names lock independently).
        shared: Take the lock shared: any number of shared holders at once (e.g. the parts of one prediction,
            each writing its own cases), none while an exclusive holder has it. Shared holders are not recorded
            in the file (a refused process is told "another process").

    Raises:
        LockedError: Another live process holds the lock (message names the folder and the holder).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locking
        yield Path(folder) / name
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"{folder}: in use by {_holder(path)}; wait for it to finish or stop it") from None
        if not shared:
            info = {"pid": os.getpid(), "purpose": purpose, "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": " ".join(sys.argv[:6])}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield path
        finally:
            if not shared:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def waiting_lock(folder: Path, *, purpose: str, name: str = LOCK_NAME, poll_s: float = 2.0) -> Iterator[None]:
    """:func:`folder_lock`, waiting (polling every ``poll_s`` seconds) while another process holds it."""
    while True:
        try:
            lock = folder_lock(folder, purpose=purpose, name=name)
            lock.__enter__()
        except LockedError:
            time.sleep(poll_s)
            continue
        break
    try:
        yield
    finally:
        lock.__exit__(None, None, None)
