"""Tests of automedseg.morphology: the element in mm, opening, closing, hole filling, on masks with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from automedseg.morphology import (
    close_classes,
    close_mask,
    ellipsoid_element,
    fill_holes,
    fill_holes_mask,
    open_classes,
    open_mask,
)

ISO = (1.0, 1.0, 1.0)
FLAT = (999.0, 1.0, 1.0)  # a single-slice image (1, Y, X) with its dummy z spacing


def _box(shape: tuple[int, ...], *slices: slice) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[slices] = True
    return mask


# --- the structuring element ---------------------------------------------------------------------------


@pytest.mark.parametrize("radius_mm, spacing_mm, shape, count", [
    (1.0, (1.0, 1.0, 1.0), (3, 3, 3), 7),  # the 6-neighbourhood
    (1.5, (1.0, 1.0, 1.0), (3, 3, 3), 19),  # the cube without its 8 corners
    (1.75, (1.0, 1.0, 1.0), (3, 3, 3), 27),  # the full cube
    (1.0, (3.0, 1.0, 1.0), (1, 3, 3), 5),  # anisotropic: flat, a cross in-plane
    (3.0, (3.0, 1.0, 1.0), (3, 7, 7), 31),  # the in-plane disk of radius 3 (29) and one voxel above and below
    (2.0, (2.0, 0.5), (3, 9), 11),  # 2D: 9 along x, 1 more above and below
    (0.4, (0.5, 0.5, 0.5), (1, 1, 1), 1),  # smaller than a voxel: the voxel itself
])
def test_ellipsoid_element(radius_mm: float, spacing_mm: tuple[float, ...], shape: tuple[int, ...], count: int):
    element = ellipsoid_element(radius_mm=radius_mm, spacing_mm=spacing_mm)
    assert element.shape == shape and int(element.sum()) == count
    assert element[tuple(n // 2 for n in shape)]
    assert np.array_equal(element, element[tuple(slice(None, None, -1) for _ in shape)])  # symmetric


def test_anisotropic_element_reaches_by_mm_not_voxels():
    element = ellipsoid_element(radius_mm=3.0, spacing_mm=(3.0, 1.0, 1.0))
    assert element[0].sum() == element[2].sum() == 1 and element[0, 3, 3]  # 3 mm along z: the next slice only
    assert element[1, 3].tolist() == [True] * 7  # 3 mm in-plane: 3 voxels each side


@pytest.mark.parametrize("spacing_mm, radius_mm", [(ISO, 1.0), (ISO, 1.5), ((3.0, 1.0, 1.0), 3.0),
                                                     ((2.0, 0.7, 0.7), 1.5)])
def test_opening_and_closing_equal_scipy_with_the_element(spacing_mm: tuple[float, ...], radius_mm: float):
    """Away from the image border the distance-transform computation is binary opening/closing with the element."""
    rng = np.random.default_rng(0)
    mask = np.zeros((14, 24, 24), bool)
    mask[4:10, 7:17, 7:17] = rng.random((6, 10, 10)) < 0.7
    element = ellipsoid_element(radius_mm=radius_mm, spacing_mm=spacing_mm)
    assert np.array_equal(open_mask(mask, radius_mm=radius_mm, spacing_mm=spacing_mm),
                          ndimage.binary_opening(mask, element))
    assert np.array_equal(close_mask(mask, radius_mm=radius_mm, spacing_mm=spacing_mm),
                          ndimage.binary_closing(mask, element))


# --- opening --------------------------------------------------------------------------------------------


def _spur_cases() -> list[tuple[str, np.ndarray, tuple[int, ...], tuple[float, ...], float]]:
    square = _box((1, 7, 8), 0, slice(2, 5), slice(2, 5))  # 3 x 3 in-plane, open under a 3 x 3 element
    cube = _box((8, 8, 8), slice(2, 6), slice(2, 6), slice(2, 6))
    slab = _box((3, 8, 8), slice(0, 3), slice(2, 5), slice(2, 5))
    return [("2D square, 3 x 3 element", square, (0, 3, 5), ISO, 1.5),
            ("3D cube, 3 x 3 x 3 element", cube, (3, 3, 6), ISO, 1.75),
            ("anisotropic: flat element, per slice", slab, (1, 3, 5), (3.0, 1.0, 1.0), 1.5)]


@pytest.mark.parametrize("name, body, spur, spacing_mm, radius_mm", _spur_cases(), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_opening_removes_a_one_voxel_spur(name: str, body: np.ndarray, spur: tuple[int, ...],
                                          spacing_mm: tuple[float, ...], radius_mm: float):
    mask = body.copy()
    assert not mask[spur]
    mask[spur] = True
    assert np.array_equal(open_mask(mask, radius_mm=radius_mm, spacing_mm=spacing_mm), body)
    seg = mask.astype(np.uint8) * 3
    assert np.array_equal(open_classes(seg, radii_mm={3: radius_mm}, spacing_mm=spacing_mm), body * 3)


def test_opening_keeps_an_object_cut_by_the_image_border():
    mask = _box((1, 6, 6), 0, slice(0, 3), slice(0, 6))  # touches three borders
    assert np.array_equal(open_mask(mask, radius_mm=1.5, spacing_mm=ISO), mask)


# --- closing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing_mm, radius_mm, bridged", [
    (ISO, 1.0, True),  # the gap is one slice of 1 mm
    ((3.0, 1.0, 1.0), 1.0, False),  # ... of 3 mm: a 1 mm ball does not reach across
    ((3.0, 1.0, 1.0), 3.0, True),
])
def test_closing_bridges_a_gap_as_wide_as_the_ball(spacing_mm: tuple[float, ...], radius_mm: float, bridged: bool):
    full = _box((7, 4, 4), slice(1, 6), slice(None), slice(None))  # cut by the image border in-plane
    mask = full.copy()
    mask[3] = False  # a gap of one slice between two blocks
    closed = close_mask(mask, radius_mm=radius_mm, spacing_mm=spacing_mm)
    assert np.array_equal(closed, full if bridged else mask)


def test_closing_fills_a_slit_in_plane():
    full = _box((1, 9, 12), 0, slice(2, 7), slice(2, 10))
    mask = full.copy()
    mask[0, :, 6] = False
    assert np.array_equal(close_mask(mask, radius_mm=1.5, spacing_mm=FLAT), full)  # the 3 x 3 element
    cross = close_mask(mask, radius_mm=1.0, spacing_mm=FLAT)  # the cross: not the slit's two ends
    assert np.array_equal(cross, full & ~_box(full.shape, 0, slice(2, 7, 4), 6))


def test_closing_keeps_an_object_cut_by_the_image_border():
    mask = _box((1, 6, 6), 0, slice(0, 3), slice(0, 6))
    assert np.array_equal(close_mask(mask, radius_mm=2.0, spacing_mm=ISO), mask)


def test_closing_takes_background_only_and_contested_voxels_stay_background():
    seg = np.zeros((1, 5, 7), np.uint8)
    seg[0, :, :3] = 1
    seg[0, :, 4:] = 1
    seg[0, 2, 3] = 2  # another class in the gap
    out = close_classes(seg, radii_mm={1: 1.0}, spacing_mm=FLAT)
    assert out[0, :, 3].tolist() == [1, 1, 2, 1, 1]
    cross = np.zeros((1, 7, 7), np.uint8)
    cross[0, 3, :] = 1  # a horizontal line of class 1 and a vertical one of class 2, both broken at the middle
    cross[0, :, 3] = 2
    cross[0, 3, 3] = 0
    for radii, middle in [({1: 1.5}, 1), ({2: 1.5}, 2), ({1: 1.5, 2: 1.5}, 0), ({2: 1.5, 1: 1.5}, 0)]:
        out = close_classes(cross, radii_mm=radii, spacing_mm=FLAT)
        assert out[0, 3, 3] == middle  # alone each class bridges it; together neither does, in either order
        out[0, 3, 3] = 0
        assert np.array_equal(out, cross)


# --- hole filling ---------------------------------------------------------------------------------------


def _hollow_cube() -> np.ndarray:
    mask = _box((7, 7, 7), slice(1, 6), slice(1, 6), slice(1, 6))
    mask[2:5, 2:5, 2:5] = False
    return mask


def _tube() -> np.ndarray:
    mask = _box((4, 7, 7), slice(None), slice(1, 6), slice(1, 6))
    mask[:, 3, 3] = False  # a channel through every slice: open at both ends
    return mask


def _ring_2d() -> np.ndarray:
    mask = _box((1, 7, 7), 0, slice(1, 6), slice(1, 6))
    mask[0, 2:5, 2:5] = False
    return mask


def _open_c() -> np.ndarray:
    mask = _ring_2d()
    mask[0, 3, 5] = False  # the ring opened to the outside
    return mask


@pytest.mark.parametrize("make, mode, filled", [
    (_hollow_cube, "3d", 27), (_hollow_cube, "2d", 27),
    (_tube, "3d", 0), (_tube, "2d", 4),
    (_ring_2d, "3d", 9), (_ring_2d, "2d", 9),  # one slice: in-plane in both modes
    (_open_c, "3d", 0), (_open_c, "2d", 0),
])
def test_fill_holes(make, mode: str, filled: int):
    mask = make()
    out = fill_holes_mask(mask, mode=mode)
    assert np.all(out[mask]) and int(out.sum() - mask.sum()) == filled
    seg = mask.astype(np.uint8) * 2
    assert np.array_equal(fill_holes(seg, modes={2: mode}), out.astype(np.uint8) * 2)


def test_fill_holes_leaves_another_class_inside():
    seg = _ring_2d().astype(np.uint8)
    seg[0, 3, 3] = 2
    out = fill_holes(seg, modes={1: "3d"})
    assert out[0, 3, 3] == 2 and int((out == 1).sum()) == int(_ring_2d().sum()) + 8


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, message", [
    (lambda: open_mask(np.ones((2, 2), bool), radius_mm=1.0, spacing_mm=ISO), "spacing_mm"),
    (lambda: close_mask(np.ones((2, 2, 2), bool), radius_mm=0.0, spacing_mm=ISO), "radius_mm"),
    (lambda: close_mask(np.ones((2, 2, 2), bool), radius_mm=1.0, spacing_mm=(1.0, 0.0, 1.0)), "spacing_mm"),
    (lambda: fill_holes_mask(np.ones((2, 2, 2), bool), mode="4d"), "mode"),
    (lambda: open_classes(np.zeros((2, 2, 2), np.uint8), radii_mm={0: 1.0}, spacing_mm=ISO), "foreground"),
])
def test_bad_arguments_are_refused(call, message: str):
    with pytest.raises(ValueError, match=message):
        call()


def test_empty_masks_stay_empty():
    empty = np.zeros((3, 4, 4), bool)
    for out in (open_mask(empty, radius_mm=1.0, spacing_mm=ISO), close_mask(empty, radius_mm=1.0, spacing_mm=ISO),
                fill_holes_mask(empty)):
        assert not out.any() and out is not empty
