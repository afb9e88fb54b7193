"""Tests of automedseg.label_resampling: the same labels as batchgenerators' per-label interpolation."""

from __future__ import annotations

import numpy as np
import pytest
from batchgenerators.augmentations.utils import (
    create_zero_centered_coordinate_mesh,
    interpolate_img,
    rotate_coords_2d,
    rotate_coords_3d,
    scale_coords,
)

from automedseg.augmentation import RotateScaleCropTransform
from automedseg.label_resampling import CHUNK_POINTS, resample_labels_linear


def _labels(rng: np.random.Generator, shape: tuple[int, ...], n_labels: int, *, blocky: bool,
            dtype: type, values: tuple[int, ...] | None = None) -> np.ndarray:
    """Random labels (``values``, default ``0..n_labels - 1``); ``blocky``: 2-voxel blocks, where half-voxel shifts
    give exact ties."""
    table = np.array(values if values is not None else range(n_labels))
    if not blocky:
        return table[rng.integers(0, n_labels, shape)].astype(dtype)
    coarse = rng.integers(0, n_labels, tuple(s // 2 + 1 for s in shape))
    index = np.kron(coarse, np.ones((2,) * len(shape), dtype=np.int64))[tuple(slice(0, s) for s in shape)]
    return table[index].astype(dtype)


def _coords(rng: np.random.Generator, kind: str, out_shape: tuple[int, ...], in_shape: tuple[int, ...]) -> np.ndarray:
    coords = create_zero_centered_coordinate_mesh(out_shape)
    if kind == "rotate":
        coords = (rotate_coords_3d(coords, *rng.uniform(-1, 1, 3)) if len(out_shape) == 3
                  else rotate_coords_2d(coords, rng.uniform(-3, 3)))
    elif kind == "scale":
        coords = scale_coords(coords, rng.uniform(0.7, 1.4))
    elif kind == "half_shift":  # every point between voxels: exact ties wherever two labels meet
        coords = coords + 0.5
    elif kind == "zoom_2x":
        coords = scale_coords(coords, 0.5)
    # part of the grid leaves the input; a whole-voxel shift keeps the half and quarter voxels of the tie kinds
    shift = rng.uniform(-4, 4) if kind in ("rotate", "scale") else float(rng.integers(-4, 5))
    centre = np.floor(np.array(in_shape) / 2) + shift
    return coords + centre.reshape(-1, *([1] * len(out_shape)))


@pytest.mark.parametrize("kind", ["rotate", "scale", "half_shift", "zoom_2x"])
@pytest.mark.parametrize(("dims", "n_labels", "blocky", "dtype", "values"), [
    (3, 8, False, np.int8, None),
    (3, 3, True, np.int8, None),
    (3, 1, False, np.uint8, None),
    (2, 5, True, np.int16, None),
    (2, 2, False, np.int32, None),
    (2, 4, True, np.int16, (-3, -1, 0, 7)),  # negative labels
    (3, 3, True, np.int32, (0, 5, 70000)),  # a range too wide to count
    (2, 3, True, np.uint64, (0, 2, 9)),
])
def test_equals_batchgenerators(kind: str, dims: int, n_labels: int, blocky: bool, dtype: type,
                                values: tuple[int, ...] | None) -> None:
    rng = np.random.default_rng(dims * 100 + n_labels)
    for _ in range(3):
        in_shape = tuple(int(v) for v in rng.integers(5, 24, dims))
        labels = _labels(rng, in_shape, n_labels, blocky=blocky, dtype=dtype, values=values)
        coords = _coords(rng, kind, tuple(int(v) for v in rng.integers(4, 20, dims)), in_shape)
        expected = interpolate_img(labels, coords, 1, "constant", cval=0, is_seg=True)
        got = resample_labels_linear(labels, coords)
        assert got.dtype == labels.dtype and got.shape == coords.shape[1:]
        np.testing.assert_array_equal(got, expected)


def test_more_points_than_a_chunk() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, (30, 30, 30)).astype(np.int8)
    coords = _coords(rng, "rotate", (40, 40, 40), labels.shape)
    assert coords[0].size > 2 * CHUNK_POINTS
    np.testing.assert_array_equal(resample_labels_linear(labels, coords),
                                  interpolate_img(labels, coords, 1, "constant", cval=0, is_seg=True))


@pytest.mark.parametrize(("point", "expected"), [
    ((0.5, 0.0), 5),  # 3 and 5 tie; the nearest neighbour (rounding half up: row 1) settles it
    ((0.25, 0.0), 3),
    ((0.75, 1.0), 5),
    ((1.0, 1.0), 5),  # on the last voxel: inside
    ((-0.01, 0.0), -1),  # just outside: cval, as scipy's constant mode
    ((0.0, 1.01), -1),
    ((0.49999999999999994, 0.0), 5),  # scipy's weights: 1 - t and 1 - (1 - t) are both 0.5 here, a tie
])
def test_points(point: tuple[float, float], expected: int) -> None:
    labels = np.array([[3, 3], [5, 5]], dtype=np.int16)
    coords = np.array(point, dtype=float).reshape(2, 1)
    assert resample_labels_linear(labels, coords, cval=-1)[0] == expected
    assert interpolate_img(labels, coords, 1, "constant", cval=-1, is_seg=True)[0] == expected


def test_three_labels_where_the_nearest_neighbour_lost() -> None:
    # At the centre of a 2x2x2 block, 1 and 2 each hold three corners and tie above 3 (two corners); the nearest
    # neighbour (rounding half up: the last corner) is a 3, which lost: the smallest tied label, 1, wins.
    labels = np.array([[[3, 1], [1, 1]], [[2, 2], [2, 3]]], dtype=np.int8)
    coords = np.full((3, 1), 0.5)
    assert resample_labels_linear(labels, coords)[0] == 1
    assert interpolate_img(labels, coords, 1, "constant", cval=0, is_seg=True)[0] == 1


def test_cval_is_cast_as_batchgenerators_casts_it() -> None:
    labels = np.array([[1, 1], [2, 2]], dtype=np.uint8)
    coords = np.array([[-1.0], [0.0]])
    with np.errstate(invalid="ignore"):
        expected = interpolate_img(labels, coords, 1, "constant", cval=-1, is_seg=True)
        np.testing.assert_array_equal(resample_labels_linear(labels, coords, cval=-1), expected)


def test_empty_and_bad_input() -> None:
    out = resample_labels_linear(np.zeros((0, 4), dtype=np.int8), np.zeros((2, 3, 3)), cval=2)
    assert out.shape == (3, 3) and (out == 2).all()
    with pytest.raises(ValueError, match="rows"):
        resample_labels_linear(np.zeros((4, 4), dtype=np.int8), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="integers"):
        resample_labels_linear(np.zeros((4, 4), dtype=np.float32), np.zeros((2, 2)))


def test_spatial_transform_uses_it_with_the_same_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The transform's labels are the same with the one-pass resampling as with batchgenerators'."""
    import automedseg.augmentation_transforms as transforms

    rng = np.random.default_rng(3)
    data = rng.normal(size=(2, 1, 20, 22, 24)).astype(np.float32)
    seg = _labels(rng, (2, 1, 20, 22, 24), 6, blocky=True, dtype=np.int8)
    transform = RotateScaleCropTransform((10, 12, 14), rotation_p=1.0, rotation_range_rad=(-0.5, 0.5), scale_p=1.0,
                                         scale_range=(0.7, 1.4))
    np.random.seed(0)
    fast = transform(data=data.copy(), seg=seg.copy())
    monkeypatch.setattr(transforms, "resample_labels_linear",
                        lambda labels, coords, cval: interpolate_img(labels, coords, 1, "constant", cval=cval,
                                                                     is_seg=True))
    np.random.seed(0)
    slow = transform(data=data.copy(), seg=seg.copy())
    np.testing.assert_array_equal(fast["seg"], slow["seg"])
    np.testing.assert_array_equal(fast["data"], slow["data"])
    assert len(np.unique(fast["seg"])) > 2
