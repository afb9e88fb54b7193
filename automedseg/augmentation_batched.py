"""Batched augmentation in torch: the costly part of :mod:`automedseg.augmentation`, on whole batches, on any device.

On a GPU the CPU workers of the batchgenerators pipeline cannot keep up (an H200 waited for data 9-26 % of
each step with 12 workers). Here the workers only read the enlarged sampling windows
(:func:`~automedseg.augmentation.sampling_patch_size`) and these functions transform the batch where its
tensors live:

* :func:`spatial_transform`: rotation, scaling and optional elastic deformation with ``grid_sample``
  (trilinear / bilinear for images; labels as nnU-Net does it: each label's indicator interpolated linearly,
  then the argmax), then the centre crop to the training patch; samples drawing no spatial augmentation are
  cropped without interpolation.
* :func:`intensity_transforms`: Gaussian noise, Gaussian blur, multiplicative brightness, contrast,
  low-resolution simulation, inverted gamma and gamma.
* :func:`mirror`: flips per sample and axis.
* :func:`augment_batch` runs them in the CPU pipeline's order; :func:`deep_supervision_targets` makes the
  targets afterwards.

The probabilities and parameter distributions are the CPU pipeline's (:func:`~automedseg.augmentation.
build_transforms`, batchgenerators), read from the same :class:`~automedseg.plans.AugmentationPlan` fields.
Two interpolations differ: images are resampled linearly, not with cubic splines, in the spatial transform and
when the low-resolution simulation upsamples (``grid_sample`` and ``interpolate`` have no tricubic mode).

Randomness is local: per-sample parameters come from an ``np.random.Generator`` (:attr:`BatchRandom.params`),
per-voxel noise from a ``torch.Generator`` on the tensors' device (:attr:`BatchRandom.voxels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from automedseg.plans import AugmentationPlan

__all__ = [
    "BatchRandom",
    "SpatialDraw",
    "augment_batch",
    "deep_supervision_targets",
    "draw_spatial",
    "gaussian_blur",
    "intensity_transforms",
    "make_batch_random",
    "mirror",
    "spatial_matrices",
    "spatial_transform",
]

INVERTED_GAMMA_P = 0.1  # as build_transforms' default


@dataclass
class BatchRandom:
    """The random streams of the batched augmentation.

    Attributes:
        params: Per-sample decisions and parameters (cheap, on the CPU).
        voxels: Per-voxel noise (Gaussian noise, elastic fields), on the tensors' device.
    """

    params: np.random.Generator
    voxels: torch.Generator


def make_batch_random(seed: int, device: torch.device | str = "cpu") -> BatchRandom:
    """Both streams of :class:`BatchRandom` derived from one integer seed."""
    params = np.random.default_rng([int(seed) % 2**63, 11])
    voxels = torch.Generator(device=torch.device(device))
    voxels.manual_seed(int(np.random.SeedSequence([int(seed) % 2**63, 12]).generate_state(1)[0]))
    return BatchRandom(params, voxels)


def _two_sided(rng: np.random.Generator, low: float, high: float, n: int) -> np.ndarray:
    """batchgenerators' draw for a range spanning 1: half below 1 (``U(low, 1)``), half above (``U(1, high)``)."""
    below = (rng.random(n) < 0.5) & (low < 1)
    return np.where(below, rng.uniform(low, 1.0, n), rng.uniform(max(low, 1.0), high, n))


# --- spatial ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpatialDraw:
    """Per-sample spatial parameters, as :class:`~automedseg.augmentation.RotateScaleCropTransform` draws them.

    Attributes:
        rotate: (B,) whether the sample is rotated.
        angles: (B, 1) in 2D (in-plane), (B, 3) in 3D: angle about each axis, radians (0 where not rotated).
        scale: (B,) whether the sample is scaled.
        factors: (B,) scale factor of the sampling coordinates (> 1 zooms out; 1 where not scaled).
        elastic: (B,) whether the sample is deformed.
        alpha: (B,) deformation magnitude.
        sigma: (B,) deformation smoothness (voxels).
    """

    rotate: np.ndarray
    angles: np.ndarray
    scale: np.ndarray
    factors: np.ndarray
    elastic: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray

    @property
    def any(self) -> np.ndarray:
        """(B,) whether the sample draws any spatial augmentation (else it is only centre-cropped)."""
        return self.rotate | self.scale | self.elastic


def draw_spatial(aug: AugmentationPlan, *, batch_size: int, n_axes: int, rng: np.random.Generator) -> SpatialDraw:
    """Draw the spatial augmentation of a batch (``n_axes``: 2 for 2D and in-plane ``do_dummy_2d``, else 3)."""
    b = int(batch_size)
    elastic = rng.random(b) < aug.elastic_p
    alpha = np.where(elastic, rng.uniform(*aug.elastic_alpha, b), 0.0)
    sigma = np.where(elastic, rng.uniform(*aug.elastic_sigma, b), 0.0)
    rotate = rng.random(b) < aug.rotation_p
    n_angles = 1 if n_axes == 2 else 3
    angles = np.where(rotate[:, None], rng.uniform(*aug.rotation_range_rad, (b, n_angles)), 0.0)
    scale = rng.random(b) < aug.scale_p
    factors = np.where(scale, _two_sided(rng, *aug.scale_range, b), 1.0)
    return SpatialDraw(rotate, angles, scale, factors, elastic, alpha, sigma)


def _rotation(angles: np.ndarray) -> np.ndarray:
    """batchgenerators' rotation matrix: ``R(a)`` in 2D, ``Rx(a0) @ Ry(a1) @ Rz(a2)`` in 3D; (B, d, d)."""
    c, s = np.cos(angles), np.sin(angles)
    one, zero = np.ones(len(angles)), np.zeros(len(angles))
    if angles.shape[1] == 1:
        return np.stack([np.stack([c[:, 0], -s[:, 0]], -1), np.stack([s[:, 0], c[:, 0]], -1)], -2)
    rx = np.stack([np.stack([one, zero, zero], -1), np.stack([zero, c[:, 0], -s[:, 0]], -1),
                   np.stack([zero, s[:, 0], c[:, 0]], -1)], -2)
    ry = np.stack([np.stack([c[:, 1], zero, s[:, 1]], -1), np.stack([zero, one, zero], -1),
                   np.stack([-s[:, 1], zero, c[:, 1]], -1)], -2)
    rz = np.stack([np.stack([c[:, 2], -s[:, 2], zero], -1), np.stack([s[:, 2], c[:, 2], zero], -1),
                   np.stack([zero, zero, one], -1)], -2)
    return rx @ ry @ rz


def spatial_matrices(draw: SpatialDraw) -> np.ndarray:
    """(B, d, d) linear maps from output offsets to input offsets (voxels, array axis order): ``s * R^T``.

    The CPU path rotates its zero-centred coordinates as ``coords^T @ R`` and scales them, so an output voxel at
    offset ``c`` from the patch centre reads the input at ``centre + s * R^T c``.
    """
    return draw.factors[:, None, None] * np.swapaxes(_rotation(draw.angles), 1, 2)


def _centre_crop(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    lower = [(s - p) // 2 for s, p in zip(x.shape[2:], patch, strict=True)]
    return x[(slice(None), slice(None), *(slice(lo, lo + p) for lo, p in zip(lower, patch, strict=True)))]


def _elastic_offsets(n: int, patch: Sequence[int], alpha: torch.Tensor, sigma: Sequence[float],
                     generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, *patch, d) offsets: uniform(-1, 1) noise smoothed with a Gaussian (zero outside) times alpha."""
    d = len(patch)
    noise = torch.rand((n * d, *patch), generator=generator, device=device) * 2 - 1
    smooth = gaussian_blur(noise, torch.tensor(np.repeat(np.asarray(sigma, dtype=np.float64), d)), mode="constant")
    smooth = smooth.view(n, d, *patch) * alpha.view(n, 1, *([1] * d)).to(device)
    return smooth.movedim(1, -1)


def _sampling_grid(matrices: torch.Tensor, patch: Sequence[int], window: Sequence[int],
                   offsets: torch.Tensor | None) -> torch.Tensor:
    """``grid_sample`` grid (n, *patch, d), (x, y[, z]) last, ``align_corners=True`` normalisation."""
    device = matrices.device
    axes = [torch.arange(p, device=device, dtype=torch.float32) - (p - 1) / 2 for p in patch]
    base = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)  # (*patch, d), array axis order
    pts = base.unsqueeze(0) if offsets is None else base.unsqueeze(0) + offsets
    pos = torch.einsum("n...j,nij->n...i", pts.expand(len(matrices), *pts.shape[1:]), matrices)
    size = torch.tensor(window, device=device, dtype=torch.float32)
    centre = (size - 1) / 2
    norm = torch.where(size > 1, (pos + centre) * 2 / (size - 1).clamp_min(1) - 1, torch.zeros_like(pos))
    return norm.flip(-1)


def _sample(x: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """``grid_sample`` that is 0 wherever the grid leaves the window, as scipy's ``map_coordinates(mode="constant")``
    (``padding_mode="zeros"`` alone would blend the edge voxels with 0 for up to one voxel outside)."""
    out = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=True)
    inside = (grid.abs() <= 1 + 1e-5).all(-1).unsqueeze(1)
    return out * inside


def _transform_labels(seg: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """Labels (n, 1, *window) resampled on ``grid``: nearest, or linear per-label indicators + argmax."""
    if mode == "nearest":
        return _sample(seg.float(), grid, "nearest").round().to(seg.dtype)
    labels = torch.unique(seg)
    onehot = (seg == labels.view(1, -1, *([1] * (seg.ndim - 2)))).float()  # (n, K, *window)
    scores = _sample(onehot, grid, "bilinear")
    best, index = scores.max(1, keepdim=True)
    out = labels[index]
    return torch.where(best > 0, out, torch.zeros_like(out)).to(seg.dtype)  # entirely outside: background


def spatial_transform(data: torch.Tensor, seg: torch.Tensor | None, *, aug: AugmentationPlan,
                      patch_size: Sequence[int], rng: BatchRandom, in_plane: bool = False,
                      label_mode: str = "linear", draw: SpatialDraw | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate, scale and deform the sampling windows of a batch and crop them to ``patch_size``.

    Args:
        data: (B, C, *window) images.
        seg: (B, 1, *window) labels (integer dtype) or ``None``.
        aug: Probabilities and ranges (``rotation_*``, ``scale_*``, ``elastic_*``).
        patch_size: Output spatial size (2 or 3 entries, matching the batch).
        rng: Random streams.
        in_plane: Transform each z-slice in-plane only (``do_dummy_2d``; 3D batches).
        label_mode: ``linear`` (per-label indicators interpolated linearly, argmax: nnU-Net) or ``nearest``.
        draw: Use these parameters instead of drawing them (tests).

    Returns:
        Images (B, C, *patch_size) float32 and labels (B, 1, *patch_size) of ``seg``'s dtype. Outside the
        window both are 0.
    """
    patch = tuple(int(p) for p in patch_size)
    if data.ndim != len(patch) + 2:
        raise ValueError(f"data {tuple(data.shape)} does not have {len(patch)} spatial axes")
    b = data.shape[0]
    draw = draw or draw_spatial(aug, batch_size=b, n_axes=2 if in_plane or len(patch) == 2 else 3,
                                rng=rng.params)
    data_out = _centre_crop(data, patch).float().clone()
    seg_out = _centre_crop(seg, patch).clone() if seg is not None else None
    chosen = np.flatnonzero(draw.any)
    if len(chosen) == 0:
        return data_out, seg_out
    idx = torch.as_tensor(chosen, device=data.device)
    x, s = data[idx].float(), seg[idx] if seg is not None else None
    sp_patch = patch[1:] if in_plane else patch
    if in_plane:  # fold z into the channels: every slice of a sample gets the sample's 2D transform
        n, c, z = x.shape[:3]
        x = x.reshape(n, c * z, *x.shape[3:])
    window = tuple(x.shape[2:])
    matrices = torch.as_tensor(spatial_matrices(draw)[chosen], dtype=torch.float32, device=data.device)
    offsets = None
    elastic = draw.elastic[chosen]
    if elastic.any():
        offsets = _elastic_offsets(len(chosen), sp_patch, torch.as_tensor(draw.alpha[chosen], dtype=torch.float32),
                                   np.where(elastic, draw.sigma[chosen], 1.0), rng.voxels, data.device)
        offsets = offsets * torch.as_tensor(elastic, device=data.device).view(-1, *([1] * (len(sp_patch) + 1)))
    grid = _sampling_grid(matrices, sp_patch, window, offsets)
    y = _sample(x, grid, "bilinear")
    if in_plane:
        y = y.reshape(n, c, z, *sp_patch)
    data_out[idx] = y
    if s is not None:
        if in_plane:
            # one-hot per label and slice, folded the same way
            labels = _transform_labels_in_plane(s, grid, label_mode)
        else:
            labels = _transform_labels(s, grid, label_mode)
        seg_out[idx] = labels
    return data_out, seg_out


def _transform_labels_in_plane(seg: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    n, _, z = seg.shape[:3]
    folded = seg.reshape(n * z, 1, *seg.shape[3:])
    out = _transform_labels(folded, grid.repeat_interleave(z, 0), mode)
    return out.reshape(n, 1, z, *out.shape[2:])


# --- intensity ----------------------------------------------------------------------------------------------


def _reflect_index(n: int, r: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-``n`` axis padded by ``r`` with scipy's ``reflect`` (d c b a | a b c d | d c b a)."""
    i = torch.arange(-r, n + r, device=device) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def gaussian_blur(x: torch.Tensor, sigmas: torch.Tensor, *, mode: str = "reflect", truncate: float = 4.0
                  ) -> torch.Tensor:
    """Blur each volume of ``x`` (n, *spatial) with its own isotropic Gaussian, as scipy's ``gaussian_filter``.

    Args:
        x: (n, *spatial) volumes (1 to 3 spatial axes).
        sigmas: (n,) standard deviations in voxels.
        mode: ``reflect`` (scipy's default) or ``constant`` (zeros outside).
        truncate: Kernel radius in standard deviations (scipy's default 4).
    """
    n = x.shape[0]
    sig = sigmas.to(device=x.device, dtype=torch.float32).clamp_min(1e-6)
    r = int(truncate * float(sig.max()) + 0.5)
    if r == 0:
        return x.clone()
    taps = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps[None] / sig[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).unsqueeze(1)  # (n, 1, 2r+1)
    out = x.float()
    for axis in range(1, x.ndim):
        moved = out.movedim(axis, -1)
        length = moved.shape[-1]
        if mode == "reflect":
            padded = moved.index_select(-1, _reflect_index(length, r, x.device))
        else:
            padded = F.pad(moved, (r, r))
        lines = padded.reshape(n, -1, length + 2 * r).transpose(0, 1)  # (lines, n, L + 2r): one group per volume
        blurred = F.conv1d(lines, kernel, groups=n).transpose(0, 1)
        out = blurred.reshape(moved.shape).movedim(-1, axis)
    return out


def _chosen(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
    """Indices of the samples that draw a transform of probability ``p`` (no draws when ``p`` is 0)."""
    return np.flatnonzero(rng.random(n) < p) if p > 0 else np.zeros(0, dtype=np.int64)


def _ix(indices: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(indices, dtype=torch.long, device=like.device)


def _per(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """(n, C) parameters as a tensor broadcastable against (n, C, *spatial)."""
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(*values.shape,
                                                                              *([1] * (like.ndim - 2)))


def _noise(x: torch.Tensor, aug: AugmentationPlan, rng: BatchRandom) -> None:
    idx = _chosen(rng.params, x.shape[0], aug.noise_p)
    if len(idx):
        std = rng.params.uniform(*aug.noise_variance, len(idx))  # batchgenerators' "variance" is the std
        i = _ix(idx, x)
        sel = x[i]
        noise = torch.randn(sel.shape, generator=rng.voxels, device=x.device, dtype=sel.dtype)
        x[i] = sel + noise * _per(std[:, None], sel)


def _blur(x: torch.Tensor, aug: AugmentationPlan, rng: BatchRandom) -> None:
    idx = _chosen(rng.params, x.shape[0], aug.blur_p)
    if not len(idx):
        return
    c = x.shape[1]
    channels = rng.params.random((len(idx), c)) <= 0.5  # p_per_channel 0.5, a sigma per channel
    sigmas = rng.params.uniform(*aug.blur_sigma, (len(idx), c))
    b_idx, c_idx = np.nonzero(channels)
    if len(b_idx):
        samples, chans = _ix(idx[b_idx], x), _ix(c_idx, x)
        x[samples, chans] = gaussian_blur(x[samples, chans], torch.as_tensor(sigmas[b_idx, c_idx])).to(x.dtype)


def _brightness(x: torch.Tensor, aug: AugmentationPlan, rng: BatchRandom) -> None:
    idx = _chosen(rng.params, x.shape[0], aug.brightness_p)
    if len(idx):
        mult = rng.params.uniform(*aug.brightness_range, (len(idx), x.shape[1]))  # per channel
        i = _ix(idx, x)
        x[i] = x[i] * _per(mult, x)


def _contrast(x: torch.Tensor, aug: AugmentationPlan, rng: BatchRandom) -> None:
    idx = _chosen(rng.params, x.shape[0], aug.contrast_p)
    if not len(idx):
        return
    c = x.shape[1]
    factor = _two_sided(rng.params, *aug.contrast_range, len(idx) * c).reshape(len(idx), c)
    i = _ix(idx, x)
    sel = x[i]
    dims = tuple(range(2, sel.ndim))
    mean = sel.mean(dims, keepdim=True)
    lo, hi = sel.amin(dims, keepdim=True), sel.amax(dims, keepdim=True)
    x[i] = torch.minimum(torch.maximum((sel - mean) * _per(factor, sel) + mean, lo), hi)  # range preserved


def _lowres(x: torch.Tensor, aug: AugmentationPlan, rng: BatchRandom, *, in_plane: bool) -> None:
    idx = _chosen(rng.params, x.shape[0], aug.lowres_p)
    if not len(idx):
        return
    c = x.shape[1]
    channels = rng.params.random((len(idx), c)) < 0.5
    zoom = rng.params.uniform(*aug.lowres_zoom_range, (len(idx), c))
    shape = np.array(x.shape[2:])
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    for k, ch in zip(*np.nonzero(channels)):
        target = np.round(shape * zoom[k, ch]).astype(int)
        if in_plane:
            target[0] = shape[0]
        b = int(idx[k])
        down = F.interpolate(x[b, ch][None, None], size=tuple(int(max(1, t)) for t in target), mode="nearest-exact")
        x[b, ch] = F.interpolate(down, size=tuple(int(v) for v in shape), mode=mode, align_corners=False)[0, 0]


def _gamma(x: torch.Tensor, gamma_range: tuple[float, float], p: float, rng: BatchRandom, *, invert: bool) -> None:
    idx = _chosen(rng.params, x.shape[0], p)
    if not len(idx):
        return
    c = x.shape[1]
    gamma = _two_sided(rng.params, *gamma_range, len(idx) * c).reshape(len(idx), c)
    i = _ix(idx, x)
    sel = -x[i] if invert else x[i]
    dims = tuple(range(2, sel.ndim))
    mean, std = sel.mean(dims, keepdim=True), sel.std(dims, keepdim=True, unbiased=False)
    lo = sel.amin(dims, keepdim=True)
    rng_ = sel.amax(dims, keepdim=True) - lo + 1e-7
    out = ((sel - lo) / rng_).clamp_min(0) ** _per(gamma, sel) * rng_ + lo
    out = out - out.mean(dims, keepdim=True)
    out = out / (out.std(dims, keepdim=True, unbiased=False) + 1e-8) * std + mean  # statistics retained
    x[i] = -out if invert else out


def intensity_transforms(data: torch.Tensor, *, aug: AugmentationPlan, rng: BatchRandom, in_plane: bool = False,
                         inverted_gamma_p: float = INVERTED_GAMMA_P) -> torch.Tensor:
    """Noise, blur, brightness, contrast, low resolution, inverted gamma and gamma on a batch (B, C, *patch).

    Per sample with the plan's probability each, parameters as batchgenerators draws them: noise std
    ``U(noise_variance)`` for all channels; blur per channel with probability 1/2, sigma ``U(blur_sigma)``;
    brightness factor ``U(brightness_range)`` per channel; contrast and gamma factors per channel, half below 1
    and half above; low resolution per channel with probability 1/2, zoom ``U(lowres_zoom_range)``, nearest
    down and linear up (in-plane only for ``in_plane``); gamma keeps each channel's mean and std.

    Returns:
        A new float32 tensor.
    """
    x = data.float().clone()
    _noise(x, aug, rng)
    _blur(x, aug, rng)
    _brightness(x, aug, rng)
    _contrast(x, aug, rng)
    _lowres(x, aug, rng, in_plane=in_plane)
    if aug.gamma_p > 0 and inverted_gamma_p > 0:
        _gamma(x, aug.gamma_range, inverted_gamma_p, rng, invert=True)
    _gamma(x, aug.gamma_range, aug.gamma_p, rng, invert=False)
    return x


def mirror(data: torch.Tensor, seg: torch.Tensor | None, *, axes: Sequence[int], rng: np.random.Generator
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flip each sample along each of ``axes`` (spatial axis numbers) with probability 1/2, images and labels."""
    b = data.shape[0]
    for axis in axes:
        flip = rng.random(b) < 0.5
        if not flip.any():
            continue
        mask = torch.as_tensor(flip, device=data.device).view(b, *([1] * (data.ndim - 1)))
        data = torch.where(mask, data.flip(axis + 2), data)
        if seg is not None:
            seg = torch.where(mask, seg.flip(axis + 2), seg)
    return data, seg


def augment_batch(data: torch.Tensor, seg: torch.Tensor, *, aug: AugmentationPlan, patch_size: Sequence[int],
                  dims: int, rng: BatchRandom, label_mode: str = "linear") -> tuple[torch.Tensor, torch.Tensor]:
    """The whole training augmentation of :func:`~automedseg.augmentation.build_transforms`, batched.

    Args:
        data: (B, C, *window) float sampling windows (:func:`~automedseg.augmentation.sampling_patch_size`).
        seg: (B, 1, *window) integer labels.
        aug: The plan's augmentation.
        patch_size: Training patch.
        dims: 2 or 3.
        rng: Random streams.
        label_mode: See :func:`spatial_transform`.

    Returns:
        Images (B, C, *patch_size) float32 and labels (B, 1, *patch_size), contiguous.
    """
    in_plane = dims == 3 and aug.do_dummy_2d
    x, s = spatial_transform(data, seg, aug=aug, patch_size=patch_size, rng=rng, in_plane=in_plane,
                             label_mode=label_mode)
    x = intensity_transforms(x, aug=aug, rng=rng, in_plane=in_plane)
    axes = sorted({int(a) for a in aug.mirror_axes if 0 <= int(a) < dims})
    x, s = mirror(x, s, axes=axes, rng=rng.params)
    return x.contiguous(), s.contiguous()


def deep_supervision_targets(seg: torch.Tensor, strides: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """:func:`~automedseg.augmentation.downsample_seg_for_deep_supervision` for tensors: every ``s``-th voxel."""
    out = []
    for stride in strides:
        if len(stride) != seg.ndim - 2:
            raise ValueError(f"stride {tuple(stride)} does not match the {seg.ndim - 2} spatial axes of seg")
        if all(int(v) == 1 for v in stride):
            out.append(seg)
        else:
            out.append(seg[(slice(None), slice(None), *(slice(None, None, int(v)) for v in stride))].contiguous())
    return out

