"""RNG state capture and restore, including states that ``map_location`` moved off the CPU."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from automedseg.rng import capture_rng_state, restore_rng_state


def _draws() -> tuple[np.ndarray, torch.Tensor, float]:
    return np.random.rand(3), torch.rand(3), random.random()


def test_moved_state_is_rejected_by_torch_as_on_cuda(moved: Callable[[Any], Any]) -> None:
    with pytest.raises(TypeError, match="ByteTensor"):
        torch.set_rng_state(moved(capture_rng_state())["torch"])


def test_restore_from_moved_state_round_trips(moved: Callable[[Any], Any]) -> None:
    _ = _draws()
    state = moved(capture_rng_state(cuda=False))
    a = _draws()
    restore_rng_state(state)
    b = _draws()
    assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    now = torch.get_rng_state()
    assert now.device.type == "cpu" and now.dtype == torch.uint8


def test_cuda_states_saved_and_restored_as_cpu_bytes(monkeypatch: pytest.MonkeyPatch,
                                                     moved: Callable[[Any], Any]) -> None:
    """With CUDA in use the per-device states are captured, and restored as CPU uint8 tensors."""
    fake = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored: list[list[torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [t.clone() for t in fake])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = capture_rng_state()
    assert [torch.equal(s, f) for s, f in zip(state["cuda"], fake)] == [True, True]
    restore_rng_state(moved(state))
    (got,) = restored
    assert len(got) == 1  # as many devices as this machine has
    assert got[0].device.type == "cpu" and got[0].dtype == torch.uint8 and torch.equal(got[0], fake[0])


def test_cpu_only_capture_has_no_cuda_states() -> None:
    assert "cuda" not in capture_rng_state(cuda=False)
