"""Loading a trained checkpoint safely, and the error that names a checkpoint that cannot be used.

Its own module (re-exported by :mod:`automedseg.inference`, where callers know it from) so that inference stays small.
"""

from __future__ import annotations

from pathlib import Path

import torch

from automedseg.errors import InputError


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain containers only).

    Raises:
        CheckpointError: The file is missing, empty, truncated or not a checkpoint (message names the file).
    """
    import pickle
    import zipfile

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file is missing") from None
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        if isinstance(e, CheckpointError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{path}: damaged or not a checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not an automedseg checkpoint (no model weights)")
    return ckpt


class CheckpointError(InputError):
    """A checkpoint file cannot be used; the message names it."""
