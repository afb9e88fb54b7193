"""Tests of automedseg.components: largest component and small-component removal on label maps."""

from __future__ import annotations

import numpy as np
import pytest

from automedseg.components import (
    keep_largest_component,
    label_components,
    largest_only,
    remove_small_components,
    remove_small_components_mm3,
    voxel_volume_mm3,
)


def _blobs() -> np.ndarray:
    """(4, 16, 16): label 1 big block (32 voxels) + label 1 speck (1) + label 2 block touching 1 (8) +
    label 2 far block (4)."""
    seg = np.zeros((4, 16, 16), np.uint8)
    seg[0:2, 0:4, 0:4] = 1  # 32 voxels
    seg[3, 15, 15] = 1  # 1 voxel, isolated
    seg[0:2, 4:6, 0:2] = 2  # 8 voxels, touches the big label-1 block
    seg[3, 10:12, 10:12] = 2  # 4 voxels, far away
    return seg


@pytest.mark.parametrize("labels, expected_counts", [
    (None, {1: 32, 2: 8}),  # foreground together: big block of 1 plus the attached 2-block
    ([1], {1: 32, 2: 12}),
    ([2], {1: 33, 2: 8}),
    ([1, 2], {1: 32, 2: 8}),
])
def test_keep_largest_component(labels, expected_counts):
    seg = _blobs()
    out = keep_largest_component(seg, labels=labels)
    assert out.dtype == seg.dtype and out.shape == seg.shape
    assert {k: int((out == k).sum()) for k in (1, 2)} == expected_counts
    assert np.array_equal(seg, _blobs())  # input untouched


def test_keep_largest_component_diagonal_contact_is_connected():
    seg = np.zeros((1, 5, 5), np.uint8)
    seg[0, 0, 0] = seg[0, 1, 1] = seg[0, 2, 2] = 1  # a diagonal line: one component (full connectivity)
    seg[0, 4, 0] = 1
    assert int(keep_largest_component(seg, labels=[1]).sum()) == 3


def test_keep_largest_component_empty_and_4d():
    empty = np.zeros((2, 3, 3), np.int16)
    assert np.array_equal(keep_largest_component(empty), empty)
    seg = _blobs()[None]
    assert keep_largest_component(seg, labels=None).shape == seg.shape


@pytest.mark.parametrize("min_voxels, labels, expected_counts", [
    (2, None, {1: 32, 2: 12}),  # only the speck goes
    (5, None, {1: 32, 2: 8}),  # the far 2-block (4) goes too; the attached one is part of a 40-voxel blob
    (5, [2], {1: 33, 2: 8}),
    (9, [2], {1: 33, 2: 0}),
    (0, None, {1: 33, 2: 12}),
    (1, [1, 2], {1: 33, 2: 12}),
])
def test_remove_small_components(min_voxels, labels, expected_counts):
    out = remove_small_components(_blobs(), min_voxels=min_voxels, labels=labels)
    assert {k: int((out == k).sum()) for k in (1, 2)} == expected_counts


def test_remove_small_components_rejects_bad_threshold():
    with pytest.raises(ValueError, match="min_voxels"):
        remove_small_components(_blobs(), min_voxels=-1)
    with pytest.raises(ValueError, match="foreground"):
        keep_largest_component(_blobs(), labels=[0])


@pytest.mark.parametrize("mask, sizes", [
    (np.zeros((2, 3, 3), bool), [18]),
    (_blobs() == 1, [4 * 16 * 16 - 33, 32, 1]),
    (_blobs() > 0, [4 * 16 * 16 - 45, 40, 4, 1]),  # raster order: the far 2-block comes before the speck
])
def test_label_components_sizes(mask, sizes):
    labeled, counts = label_components(mask)
    assert labeled.shape == mask.shape and counts.tolist() == sizes


def test_largest_only_keeps_an_empty_mask_empty():
    empty = np.zeros((3, 3), bool)
    assert largest_only(empty) is empty
    assert int(largest_only(_blobs() == 2).sum()) == 8


@pytest.mark.parametrize("spacing_mm, shape, volume", [
    ((1.0, 1.0, 1.0), (4, 16, 16), 1.0),
    ((3.0, 0.8, 0.5), (4, 16, 16), 1.2),
    ((999.0, 0.5, 0.5), (1, 16, 16), 0.25),  # one slice: the z spacing is a dummy, the size an area
])
def test_voxel_volume_mm3(spacing_mm, shape, volume):
    assert voxel_volume_mm3(spacing_mm, shape) == pytest.approx(volume)


@pytest.mark.parametrize("min_size_mm3, spacing_mm, labels, expected_counts", [
    (8.0, (1.0, 1.0, 1.0), None, {1: 32, 2: 8}),  # the speck (1 mm^3) and the far block (4 mm^3) go
    (8.0, (2.0, 1.0, 1.0), None, {1: 32, 2: 12}),  # at 2 mm^3 a voxel the far block is 8 mm^3: kept
    (8.0, (2.0, 1.0, 1.0), [1], {1: 32, 2: 12}),
    (3.0, (2.0, 2.0, 2.0), [2], {1: 33, 2: 12}),
    (0.0, (1.0, 1.0, 1.0), None, {1: 33, 2: 12}),
])
def test_remove_small_components_mm3(min_size_mm3, spacing_mm, labels, expected_counts):
    out = remove_small_components_mm3(_blobs(), min_size_mm3=min_size_mm3, spacing_mm=spacing_mm, labels=labels)
    assert {v: int((out == v).sum()) for v in (1, 2)} == expected_counts


@pytest.mark.parametrize("kwargs, message", [
    ({"min_size_mm3": -1.0, "spacing_mm": (1.0, 1.0, 1.0)}, "min_size_mm3"),
    ({"min_size_mm3": 1.0, "spacing_mm": (1.0, 1.0)}, "spacing_mm"),
])
def test_remove_small_components_mm3_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        remove_small_components_mm3(_blobs(), **kwargs)
