"""Batch transforms of the training data pipeline (:mod:`automedseg.augmentation`): batchgenerators
transforms composed by :func:`build_transforms` / :func:`build_validation_transforms`, and the
deep-supervision targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from batchgenerators.augmentations.utils import (
    create_zero_centered_coordinate_mesh,
    elastic_deform_coordinates,
    interpolate_img,
    rotate_coords_2d,
    rotate_coords_3d,
    scale_coords,
)
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform
from scipy.ndimage import map_coordinates

from automedseg.label_resampling import resample_labels_linear
from automedseg.plans import AugmentationPlan

Stride = Sequence[int]


class Convert3DTo2DTransform(AbstractTransform):
    """Fold z into the channels, (B, C, Z, Y, X) -> (B, C*Z, Y, X), so 2D transforms act on each slice."""

    def __init__(self, keys: Sequence[str] = ("data", "seg")) -> None:
        self.keys = tuple(keys)

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        for key in self.keys:
            arr = data_dict.get(key)
            if arr is None:
                continue
            if arr.ndim != 5:
                raise ValueError(f"Convert3DTo2DTransform: {key} must be 5D, got shape {arr.shape}")
            data_dict[f"_orig_shape_{key}"] = arr.shape
            data_dict[key] = arr.reshape(arr.shape[0], arr.shape[1] * arr.shape[2], *arr.shape[3:])
        return data_dict


class Convert2DTo3DTransform(AbstractTransform):
    """Undo :class:`Convert3DTo2DTransform`: (B, C*Z, Y', X') -> (B, C, Z, Y', X')."""

    def __init__(self, keys: Sequence[str] = ("data", "seg")) -> None:
        self.keys = tuple(keys)

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        for key in self.keys:
            shape = data_dict.pop(f"_orig_shape_{key}", None)
            if shape is None or data_dict.get(key) is None:
                continue
            arr = data_dict[key]
            data_dict[key] = arr.reshape(shape[0], shape[1], shape[2], *arr.shape[2:])
        return data_dict


class RotateScaleCropTransform(AbstractTransform):
    """Rotation, scaling and elastic deformation, then a centre crop to ``patch_size``.

    The same augmentation as batchgenerators' ``SpatialTransform`` with ``random_crop=False`` and the
    same parameter draws (built from its coordinate utilities), but it interpolates only the bounding box
    of the transformed sampling grid (plus a margin for the spline support) rather than the whole input
    window: the cubic-spline prefilter, which dominates the cost, then runs on that box, not on the
    enlarged window. Samples that draw no spatial augmentation are centre-cropped without interpolation.
    Outside the input window, data and seg are 0.

    Args:
        patch_size: Output spatial size (2 or 3 entries, matching the batch's spatial axes).
        rotation_p: Probability per sample of a rotation (about every axis in 3D).
        rotation_range_rad: Angle range, radians.
        scale_p: Probability per sample of an isotropic scaling (> 1 zooms out).
        scale_range: Scale range; half of the draws fall below 1 when the range spans 1.
        elastic_p: Probability per sample of an elastic deformation.
        elastic_alpha: Deformation magnitude range.
        elastic_sigma: Deformation smoothness range.
        order_data: Spline order for the image.
        order_seg: 0 (nearest) or 1 (linear per-label indicators, argmax) for the labels; integer labels at
            order 1 take :func:`automedseg.label_resampling.resample_labels_linear` (the same labels, one pass
            instead of one interpolation per label).
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        *,
        rotation_p: float = 0.0,
        rotation_range_rad: tuple[float, float] = (0.0, 0.0),
        scale_p: float = 0.0,
        scale_range: tuple[float, float] = (1.0, 1.0),
        elastic_p: float = 0.0,
        elastic_alpha: tuple[float, float] = (0.0, 0.0),
        elastic_sigma: tuple[float, float] = (10.0, 13.0),
        order_data: int = 3,
        order_seg: int = 1,
    ) -> None:
        self.patch_size = tuple(int(p) for p in patch_size)
        self.rotation_p = float(rotation_p)
        self.rotation_range_rad = tuple(float(a) for a in rotation_range_rad)
        self.scale_p = float(scale_p)
        self.scale_range = tuple(float(a) for a in scale_range)
        self.elastic_p = float(elastic_p)
        self.elastic_alpha = tuple(float(a) for a in elastic_alpha)
        self.elastic_sigma = tuple(float(a) for a in elastic_sigma)
        self.order_data = int(order_data)
        self.order_seg = int(order_seg)

    def _draw_coordinates(self) -> np.ndarray | None:
        """Zero-centred sampling grid of the transformed patch, or None if nothing was drawn."""
        dim = len(self.patch_size)
        coords = None
        if self.elastic_p > 0 and np.random.uniform() < self.elastic_p:
            alpha = np.random.uniform(*self.elastic_alpha)
            sigma = np.random.uniform(*self.elastic_sigma)
            coords = elastic_deform_coordinates(
                create_zero_centered_coordinate_mesh(self.patch_size), alpha, sigma
            )
        if self.rotation_p > 0 and np.random.uniform() < self.rotation_p:
            if coords is None:
                coords = create_zero_centered_coordinate_mesh(self.patch_size)
            angles = [np.random.uniform(*self.rotation_range_rad) for _ in range(1 if dim == 2 else 3)]
            coords = rotate_coords_2d(coords, angles[0]) if dim == 2 else rotate_coords_3d(coords, *angles)
        if self.scale_p > 0 and np.random.uniform() < self.scale_p:
            if coords is None:
                coords = create_zero_centered_coordinate_mesh(self.patch_size)
            low, high = self.scale_range
            if np.random.uniform() < 0.5 and low < 1:
                factor = np.random.uniform(low, 1)
            else:
                factor = np.random.uniform(max(low, 1), high)
            coords = scale_coords(coords, factor)
        return coords

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data = data_dict["data"]
        seg = data_dict.get("seg")
        dim = len(self.patch_size)
        if data.ndim != dim + 2:
            raise ValueError(f"RotateScaleCropTransform: data {data.shape} does not have {dim} spatial axes")
        shape = np.array(data.shape[2:])
        data_out = np.zeros((data.shape[0], data.shape[1], *self.patch_size), dtype=np.float32)
        seg_out = None
        if seg is not None:
            seg_out = np.zeros((seg.shape[0], seg.shape[1], *self.patch_size), dtype=np.float32)
        margin = max(self.order_data, self.order_seg) + 2
        for b in range(data.shape[0]):
            coords = self._draw_coordinates()
            if coords is None:
                lower = (shape - np.array(self.patch_size)) // 2
                window = tuple(slice(lo, lo + p) for lo, p in zip(lower, self.patch_size, strict=True))
                data_out[b] = data[(b, slice(None), *window)]
                if seg is not None:
                    seg_out[b] = seg[(b, slice(None), *window)]
                continue
            coords += (shape.astype(float) / 2 - 0.5).reshape(-1, *([1] * dim))
            flat = coords.reshape(dim, -1)
            lower = np.clip(np.floor(flat.min(axis=1)).astype(int) - margin, 0, shape)
            upper = np.clip(np.ceil(flat.max(axis=1)).astype(int) + margin + 1, lower, shape)
            coords -= lower.reshape(-1, *([1] * dim))
            box = tuple(slice(lo, hi) for lo, hi in zip(lower, upper, strict=True))
            for c in range(data.shape[1]):
                region = np.asarray(data[(b, c, *box)], dtype=np.float32)
                if region.size == 0:
                    continue
                map_coordinates(
                    region, coords, order=self.order_data, mode="constant", cval=0.0, output=data_out[b, c]
                )
            if seg is not None:
                for c in range(seg.shape[1]):
                    region = np.asarray(seg[(b, c, *box)])
                    if region.size == 0:
                        continue
                    if self.order_seg == 1 and region.dtype.kind in "iu":  # one pass, not one per label
                        seg_out[b, c] = resample_labels_linear(region, coords, cval=0)
                    else:
                        seg_out[b, c] = interpolate_img(
                            region, coords, self.order_seg, "constant", cval=0, is_seg=True
                        )
        data_dict["data"] = data_out
        if seg is not None:
            data_dict["seg"] = seg_out
        return data_dict


def downsample_seg_for_deep_supervision(seg: np.ndarray, strides: Sequence[Stride]) -> list[np.ndarray]:
    """Nearest-neighbour (order 0) segmentation targets for each deep-supervision output.

    Level ``k`` keeps every ``strides[k][d]``-th voxel along spatial axis ``d`` starting at 0, i.e. the
    voxel each output of a stride-``s`` convolution stack (kernel 3, padding 1) is centred on; its size is
    ``ceil(n / s)``, the size of that convolution output.

    Args:
        seg: (B, C, *spatial) segmentation batch.
        strides: Cumulative stride of each output relative to full resolution, highest resolution first,
            e.g. ``[(1, 1, 1), (1, 2, 2), (2, 4, 4)]``; one entry per spatial axis.

    Returns:
        One array per level (C-contiguous); a level of stride 1 is ``seg`` itself.
    """
    spatial = seg.ndim - 2
    out = []
    for stride in strides:
        if len(stride) != spatial:
            raise ValueError(f"stride {tuple(stride)} does not match the {spatial} spatial axes of seg")
        if any(int(s) < 1 for s in stride):
            raise ValueError(f"strides must be positive, got {tuple(stride)}")
        if all(int(s) == 1 for s in stride):
            out.append(seg)
        else:
            out.append(
                np.ascontiguousarray(
                    seg[(slice(None), slice(None), *(slice(None, None, int(s)) for s in stride))]
                )
            )
    return out


class DeepSupervisionTargetsTransform(AbstractTransform):
    """Add ``output_key``: the list of :func:`downsample_seg_for_deep_supervision` targets of ``seg``."""

    def __init__(self, strides: Sequence[Stride], input_key: str = "seg", output_key: str = "target") -> None:
        self.strides = [tuple(int(s) for s in stride) for stride in strides]
        self.input_key = input_key
        self.output_key = output_key

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data_dict[self.output_key] = downsample_seg_for_deep_supervision(
            data_dict[self.input_key], self.strides
        )
        return data_dict


class ToContiguousArraysTransform(AbstractTransform):
    """Make ``data`` C-contiguous float32 and ``seg`` C-contiguous int8 (int16 if labels exceed 127)."""

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data_dict["data"] = np.ascontiguousarray(data_dict["data"], dtype=np.float32)
        seg = data_dict.get("seg")
        if seg is not None:
            if seg.dtype.kind == "f":
                seg = np.rint(seg)
            dtype = np.int8 if seg.size == 0 or (seg.min() >= -128 and seg.max() <= 127) else np.int16
            data_dict["seg"] = np.ascontiguousarray(seg, dtype=dtype)
        return data_dict


def _mirror_axes(aug: AugmentationPlan, dims: int) -> tuple[int, ...]:
    return tuple(sorted({int(a) for a in aug.mirror_axes if 0 <= int(a) < dims}))


def build_transforms(
    aug: AugmentationPlan,
    *,
    patch_size: Sequence[int],
    dims: int,
    deep_supervision_strides: Sequence[Stride] | None = None,
    order_data: int = 3,
    order_seg: int = 1,
    inverted_gamma_p: float = 0.1,
) -> Compose:
    """The training augmentation pipeline (batchgenerators), nnU-Net's default recipe.

    Expects batches of windows of ``sampling_patch_size(patch_size, aug, dims=dims)`` (what
    :class:`PatchSampler` returns) and crops them back to ``patch_size`` around their centre. Steps:
    rotation (about every axis in 3D, in-plane for 2D and ``do_dummy_2d``), scaling and optional elastic
    deformation; Gaussian noise; Gaussian blur; multiplicative brightness; contrast; low-resolution
    simulation (in-plane only for ``do_dummy_2d``); inverted gamma (``inverted_gamma_p``) and gamma;
    mirroring over ``aug.mirror_axes`` that exist in the patch; deep-supervision targets; contiguous
    float32 / int8 arrays.

    Args:
        aug: Probabilities and ranges.
        patch_size: Training patch, (y, x) or (z, y, x).
        dims: 2 or 3.
        deep_supervision_strides: If given, adds ``"target"`` (see
            :func:`downsample_seg_for_deep_supervision`).
        order_data: Spline order for resampling the image in the spatial transform.
        order_seg: Order for the labels (1: linear per-label indicators + argmax, as nnU-Net; 0: nearest).
        inverted_gamma_p: Probability of gamma on the inverted image (0 disables it).

    Returns:
        A :class:`~batchgenerators.transforms.abstract_transforms.Compose`.
    """
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != dims:
        raise ValueError(f"patch_size {patch_size} does not have {dims} entries")
    dummy_2d = dims == 3 and aug.do_dummy_2d
    transforms: list[AbstractTransform] = []
    if dummy_2d:
        transforms.append(Convert3DTo2DTransform())
    spatial_patch = patch_size[1:] if dummy_2d else patch_size
    transforms.append(
        RotateScaleCropTransform(
            spatial_patch,
            rotation_p=aug.rotation_p,
            rotation_range_rad=aug.rotation_range_rad,
            scale_p=aug.scale_p,
            scale_range=aug.scale_range,
            elastic_p=aug.elastic_p,
            elastic_alpha=aug.elastic_alpha,
            elastic_sigma=aug.elastic_sigma,
            order_data=order_data,
            order_seg=order_seg,
        )
    )
    if dummy_2d:
        transforms.append(Convert2DTo3DTransform())
    if aug.noise_p > 0:
        transforms.append(GaussianNoiseTransform(tuple(aug.noise_variance), p_per_sample=aug.noise_p))
    if aug.blur_p > 0:
        transforms.append(
            GaussianBlurTransform(
                tuple(aug.blur_sigma),
                different_sigma_per_channel=True,
                p_per_sample=aug.blur_p,
                p_per_channel=0.5,
            )
        )
    if aug.brightness_p > 0:
        transforms.append(
            BrightnessMultiplicativeTransform(
                multiplier_range=tuple(aug.brightness_range), p_per_sample=aug.brightness_p
            )
        )
    if aug.contrast_p > 0:
        transforms.append(
            ContrastAugmentationTransform(tuple(aug.contrast_range), p_per_sample=aug.contrast_p)
        )
    if aug.lowres_p > 0:
        transforms.append(
            SimulateLowResolutionTransform(
                zoom_range=tuple(aug.lowres_zoom_range),
                per_channel=True,
                p_per_channel=0.5,
                order_downsample=0,
                order_upsample=3,
                p_per_sample=aug.lowres_p,
                ignore_axes=(0,) if dummy_2d else None,
            )
        )
    if aug.gamma_p > 0:
        if inverted_gamma_p > 0:
            transforms.append(
                GammaTransform(
                    tuple(aug.gamma_range), True, True, retain_stats=True, p_per_sample=inverted_gamma_p
                )
            )
        transforms.append(
            GammaTransform(tuple(aug.gamma_range), False, True, retain_stats=True, p_per_sample=aug.gamma_p)
        )
    mirror_axes = _mirror_axes(aug, dims)
    if mirror_axes:
        transforms.append(MirrorTransform(mirror_axes))
    transforms.append(ToContiguousArraysTransform())
    if deep_supervision_strides is not None:
        transforms.append(DeepSupervisionTargetsTransform(deep_supervision_strides))
    return Compose(transforms)


def build_validation_transforms(*, deep_supervision_strides: Sequence[Stride] | None = None) -> Compose:
    """No augmentation: optional deep-supervision targets and contiguous float32 / int8 arrays."""
    transforms: list[AbstractTransform] = [ToContiguousArraysTransform()]
    if deep_supervision_strides is not None:
        transforms.append(DeepSupervisionTargetsTransform(deep_supervision_strides))
    return Compose(transforms)
