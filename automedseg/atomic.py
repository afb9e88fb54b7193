"""Atomic, durable file writes and the clean-up of what a killed writer left behind.

Every file automedseg writes goes through :func:`atomic_write`: the content is written to an unpredictable
temporary name in the target's folder (``.tmp-<pid>-<random>-<name>``), flushed and fsynced, renamed over
the target, and the folder is fsynced, so a reader sees the old file or the new one, never half of one,
and a completed write survives a power loss. A process killed mid-write leaves only its temporary file;
:func:`remove_stale_temp_files` deletes those whose writer is gone.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> atomic_write_text(folder / "a.txt", "hello")
    >>> (folder / "a.txt").read_text()
    'hello'
    >>> sorted(p.name for p in folder.iterdir())
    ['a.txt']
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)
_TEMP_NAME = re.compile(r"^\.tmp-(\d+)-")


def _temp_path(path: Path) -> Path:
    """A unique temporary name next to ``path`` that keeps its file ending (SimpleITK needs it)."""
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix="-" + path.name, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
    return Path(tmp)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename or creation in it), to disk.

    A no-op where the path cannot be opened (directories on some systems).
    """
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Let ``write(tmp)`` produce the file under a temporary name, then fsync and rename it to ``path``.

    The one atomic-write primitive: every other writer here and in the package calls it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    """Write text atomically (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(obj: Any) -> Any:
    """``obj`` with NumPy scalars as Python numbers, tuples as lists, and NaN or infinity as ``None``.

    The one JSON policy of the package: a number that is not finite is written as ``null``.

    Example:
        >>> jsonable({"a": float("nan"), 1: (2.5, float("inf"))})
        {'a': None, '1': [2.5, None]}
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # NumPy / torch scalar
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write indented JSON atomically, non-finite numbers as ``null`` (:func:`jsonable`)."""
    atomic_write_text(path, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


def atomic_save_figure(fig: Any, path: Path, *, dpi: int = 90) -> None:
    """Save a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def atomic_save_npy(path: Path, array: Any) -> None:
    """Save one array as ``.npy`` atomically (loadable with ``mmap_mode='r'``)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)

    atomic_write(path, write)


def atomic_save_npz(path: Path, *, compressed: bool = False, **arrays: Any) -> None:
    """Save several arrays as ``.npz`` atomically."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            (np.savez_compressed if compressed else np.savez)(f, **arrays)

    atomic_write(path, write)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(folder: Path, *, recursive: bool = False) -> list[Path]:
    """Delete ``.tmp-<pid>-*`` files in ``folder`` whose writing process no longer exists.

    Files of a live process (a write in progress, here or in another process) are left alone.

    Returns:
        The files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.rglob(".tmp-*") if recursive else folder.glob(".tmp-*"):
        m = _TEMP_NAME.match(p.name)
        if m is None or not p.is_file() or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed
