"""automedseg.sliding_window: the tile grid, the Gaussian weights, tiles and mirrored copies batched per call."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from automedseg.network import build_network
from automedseg.sliding_window import (
    FORWARD_VOXELS_2D,
    MAX_FORWARD_BATCH,
    forward_batch_size,
    gaussian_importance,
    predict_preprocessed,
    tile_starts,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("size,patch,step,expected", [
    (10, 10, 0.5, [0]),
    (8, 10, 0.5, [0]),
    (20, 10, 0.5, [0, 5, 10]),
    (21, 10, 0.5, [0, 4, 7, 11]),
    (30, 10, 1.0, [0, 10, 20]),
])
def test_tile_starts_cover_the_axis(size: int, patch: int, step: float, expected: list[int]) -> None:
    starts = tile_starts(size, patch, step)
    assert starts == expected
    assert starts[0] == 0 and starts[-1] + patch >= size


def test_gaussian_is_peaked_and_positive() -> None:
    w = gaussian_importance((9, 11))
    assert w.max() == 1.0 and w.min() > 0
    assert w[4, 5] == 1.0


# --- the sliding window against a straightforward reference ---------------------------------------------


def _reference_window(model: torch.nn.Module, data: np.ndarray, patch: tuple[int, ...], *, num_classes: int,
                      step: float, mirror_axes: tuple[int, ...] | None) -> np.ndarray:
    """The sliding window written plainly: item by item (the volume, or each z-slice in 2D), tile by tile, flip by
    flip, one sample per forward call, Gaussian-weighted and normalised."""
    import itertools

    dims = len(patch)
    items = [data] if dims == 3 else [data[:, z] for z in range(data.shape[1])]
    weight = gaussian_importance(patch).astype(np.float64)
    axes = tuple(mirror_axes or ())
    flips = [f for r in range(len(axes) + 1) for f in itertools.combinations(axes, r)]
    results = []
    for arr in items:
        shape = arr.shape[1:]
        padded = [max(s, p) for s, p in zip(shape, patch)]
        crop = (slice(None), *[slice((q - s) // 2, (q - s) // 2 + s) for q, s in zip(padded, shape)])
        x = np.zeros((arr.shape[0], *padded), dtype=np.float32)
        x[crop] = arr
        acc = np.zeros((num_classes, *padded))
        norm = np.zeros(padded)
        for st in itertools.product(*[tile_starts(q, p, step) for q, p in zip(padded, patch)]):
            region = tuple(slice(s, s + p) for s, p in zip(st, patch))
            tile = torch.from_numpy(np.ascontiguousarray(x[(slice(None), *region)]))
            logits = 0.0
            for f in flips:  # f: patch axes; the sample is (C, *patch)
                flipped = torch.flip(tile, [a + 1 for a in f]) if f else tile
                y = model(flipped[None])[0]
                logits = logits + (torch.flip(y, [a + 1 for a in f]) if f else y).double().numpy()
            acc[(slice(None), *region)] += logits / len(flips) * weight
            norm[region] += weight
        results.append((acc / norm)[crop])
    return (results[0] if dims == 3 else np.stack(results, axis=1)).astype(np.float32)


@pytest.mark.parametrize(("shape", "patch", "step", "mirror", "tile_batch", "forward_batch"), [
    ((2, 3, 16, 20), (8, 12), 0.5, (0, 1), None, None),  # several tiles a slice, slices share a forward call
    ((2, 3, 16, 20), (8, 12), 0.5, None, None, None),
    ((2, 3, 16, 20), (8, 12), 0.5, (0, 1), None, 3),  # a tile's mirrored copies split over forward calls
    ((2, 3, 16, 20), (8, 12), 0.5, (1,), 7, 5),  # batches end mid-slice
    ((1, 3, 17, 13), (8, 8), 1.0, (0, 1), None, 1),
    ((1, 3, 17, 13), (8, 8), 0.3, (0,), 2, None),
    ((2, 3, 6, 9), (8, 12), 0.5, (0, 1), None, None),  # slices smaller than the patch: zero-padded, one tile
    ((1, 1, 20, 24), (8, 12), 0.5, (0, 1), None, None),  # a 2D image
    ((1, 6, 10, 12), (4, 8, 8), 0.5, (0, 1, 2), None, None),  # 3D: the volume is the only item
    ((1, 6, 10, 12), (4, 8, 8), 0.5, None, None, None),
    ((2, 5, 9, 11), (4, 8, 8), 0.7, (1, 2), 3, 5),
    ((1, 3, 6, 5), (4, 8, 8), 0.5, (0,), None, 1),  # 3D smaller than the patch
])
def test_sliding_window_matches_the_plain_reference(configuration_plan: Any, shape: tuple[int, ...],
                                                    patch: tuple[int, ...], step: float,
                                                    mirror: tuple[int, ...] | None, tile_batch: int | None,
                                                    forward_batch: int | None) -> None:
    """Tiles of several slices and their mirrored copies batched: the logits of the plain per-slice window."""
    config = configuration_plan(patch)
    torch.manual_seed(0)
    model = build_network(config.network, in_channels=shape[0], num_classes=3, dims=len(patch)).eval()
    model.deep_supervision = False
    data = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    got = predict_preprocessed(model, data, config, device=torch.device("cpu"), num_classes=3, step=step,
                               mirror_axes=mirror, tile_batch=tile_batch, forward_batch=forward_batch, amp=False)
    with torch.no_grad():
        want = _reference_window(model, data, patch, num_classes=3, step=step, mirror_axes=mirror)
    assert got.shape == want.shape == (3, *shape[1:]) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


class _Recorder(torch.nn.Module):
    """Logits from a 1x1 convolution; remembers the batch size of every forward call."""

    def __init__(self, in_channels: int, dims: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = (torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d)(in_channels, 3, 1)
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        return self.conv(x)


@pytest.mark.parametrize(("shape", "patch", "mirror", "forward_batch", "calls"), [
    ((1, 6, 8, 8), (8, 8), (0, 1), None, [24]),  # 6 slices x 4 copies in one call (once: 6 calls of 4)
    ((1, 6, 8, 8), (8, 8), (0, 1), 16, [12, 12]),  # 4 tiles a call at most, evened out: 3 + 3
    ((1, 6, 8, 8), (8, 8), None, 4, [3, 3]),
    ((1, 2, 512, 512), (512, 512), (0, 1), None, [4, 4]),  # budget under 4 copies: one tile and its copies
    ((1, 2, 24, 8), (8, 8), (0,), 6, [4, 6, 4, 6]),  # 5 tiles a slice; 3 tiles x 2 copies a call at most
    ((1, 5, 12, 12), (4, 8, 8), (0, 1, 2), None, [8, 8, 8, 8, 8, 8, 8, 8]),  # 3D as before: 8 a call
    ((1, 5, 12, 12), (4, 8, 8), None, None, [4, 4]),  # 3D as before: 8 tiles, 4 at a time
])
def test_forward_calls_batch_slices_and_mirrors(configuration_plan: Any, shape: tuple[int, ...],
                                                patch: tuple[int, ...], mirror: tuple[int, ...] | None,
                                                forward_batch: int | None, calls: list[int]) -> None:
    model = _Recorder(shape[0], len(patch))
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    predict_preprocessed(model, data, configuration_plan(patch), device=torch.device("cpu"), num_classes=3,
                         mirror_axes=mirror, forward_batch=forward_batch, amp=False)
    assert model.calls == calls


def test_forward_batch_follows_the_voxel_budget() -> None:
    assert forward_batch_size((192, 256)) == FORWARD_VOXELS_2D // (192 * 256)
    assert forward_batch_size((8, 8)) == MAX_FORWARD_BATCH
    assert forward_batch_size((4096, 4096)) == 1
    assert forward_batch_size((100, 100), voxels=50_000, cap=3) == 3
