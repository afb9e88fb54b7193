"""Random-number-generator state for checkpoints: Python, NumPy, torch CPU and (when in use) every CUDA device.

A checkpoint is loaded with ``map_location`` set to the training device, which moves *every* tensor there,
the RNG states included; ``torch.set_rng_state`` and ``torch.cuda.set_rng_state_all`` only take CPU
``uint8`` tensors. :func:`restore_rng_state` therefore brings each state back to a contiguous CPU byte tensor
(or CPU int64 for NumPy's keys) whatever device or dtype it arrives with.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch


def _cpu_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU ``uint8`` copy of an RNG state tensor, from any device or (value-preserving) dtype."""
    return t.detach().to(device="cpu", dtype=torch.uint8).contiguous()


def capture_rng_state(*, cuda: bool | None = None) -> dict[str, Any]:
    """The state of every generator training draws from.

    Args:
        cuda: Also capture the CUDA generators (one per device); default: when CUDA has been initialised.

    Returns:
        A dict of tensors and plain values, loadable with ``torch.load(weights_only=True)``.
    """
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": json.dumps(random.getstate()),
    }
    if cuda is None:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        state["cuda"] = [_cpu_bytes(t) for t in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the generators from :func:`capture_rng_state`'s dict, on whatever device its tensors were loaded.

    CUDA states are restored for as many devices as both the checkpoint and this machine have; a
    checkpoint written on CUDA resumes on a CPU-only machine (its CUDA states are then ignored).
    """
    torch.set_rng_state(_cpu_bytes(state["torch"]))
    keys = state["numpy_keys"].detach().to("cpu").numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), 0, 0.0))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        n = min(len(cuda_states), torch.cuda.device_count())
        if n:
            torch.cuda.set_rng_state_all([_cpu_bytes(t) for t in cuda_states[:n]])
