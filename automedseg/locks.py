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
def folder_lock(folder: Path, *, purpose: str, name: str = LOCK_NAME) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if missing) for the ``with`` block.

    Args:
        folder: The folder to protect.
        purpose: What this process does there, shown to a process that is refused.
        name: Lock file name inside ``folder`` (different names lock independently).

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
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"{folder}: in use by {_holder(path)}; wait for it to finish or stop it") from None
        info = {"pid": os.getpid(), "purpose": purpose, "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv[:6])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
