"""The Gaussian-weighted sliding window over a preprocessed image: tiling, batching and test-time mirroring.

:func:`predict_preprocessed` runs a network tile by tile over a preprocessed ``(C, Z, Y, X)`` image (the volume in
3D, each z-slice in 2D), blends the tiles' logits with :func:`gaussian_importance` and averages the mirrored copies.
The tile grid is :func:`tile_starts`; how many samples go through the network per call is
:func:`forward_batch_size` (:data:`FORWARD_VOXELS_2D`, :data:`MAX_FORWARD_BATCH`). Loading folds, ensembling and
whole images are :mod:`automedseg.inference`, which re-exports these names.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

from automedseg.device import autocast_context, memory_format
from automedseg.plans import ConfigurationPlan


def gaussian_importance(patch_size: Sequence[int], *, sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian weight map for blending tiles (centre 1, edges small but nonzero).

    Example:
        >>> w = gaussian_importance((5, 5))
        >>> float(w[2, 2]), bool(w[0, 0] > 0)
        (1.0, True)
    """
    grids = np.meshgrid(*[np.arange(p, dtype=np.float64) - (p - 1) / 2 for p in patch_size], indexing="ij")
    sq = sum((g / max(p * sigma_scale, 1e-6)) ** 2 for g, p in zip(grids, patch_size))
    w = np.exp(-0.5 * sq)
    w /= w.max()
    w[w == 0] = w[w > 0].min()
    return w.astype(np.float32)


def tile_starts(size: int, patch: int, step: float) -> list[int]:
    """Start offsets of tiles along one axis, overlapping by ``1 - step``, covering [0, size)."""
    if size <= patch:
        return [0]
    n = int(math.ceil((size - patch) / (patch * step))) + 1
    return [int(round(i * (size - patch) / (n - 1))) for i in range(n)]


def _mirror_sets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


#: Input voxels per forward call of a 2D configuration (all samples: tiles of several slices and their mirrored
#: copies): 16 tiles of 192 x 256 (DRIVE's plan), 3 of 512 x 512. Provenance (``benchmarks/predict_speed_2d.py
#: --batches``, 2-core AMD EPYC, 1 thread, bf16, DRIVE's network of width 8, a busy machine): CPU seconds for 48
#: slices of 192 x 160 with 4 mirrored copies fell from 5.9 (one slice, 4 samples, per call) to 5.3 / 5.1 at 8 /
#: 16 samples per call and rose again at 42 / 64 (5.6 / 6.3: the activations outgrow the caches; a second run:
#: 6.4 -> 5.6-5.8 at 8-24, 6.0 at 32). Peak memory of such a forward call: ~6.5 MiB a sample at width 8 and
#: ~23 MiB at width 32 in bf16, twice that in float32, so well under 1 GiB here.
FORWARD_VOXELS_2D = 16 * 192 * 256
#: At most this many samples per forward call, however small the patch.
MAX_FORWARD_BATCH = 32


def forward_batch_size(patch_size: Sequence[int], *, voxels: int = FORWARD_VOXELS_2D,
                       cap: int = MAX_FORWARD_BATCH) -> int:
    """Samples per forward call for a 2D patch: ``voxels`` input voxels, at least 1, at most ``cap``.

    Example:
        >>> forward_batch_size((192, 256)), forward_batch_size((512, 512)), forward_batch_size((32, 32))
        (16, 3, 32)
    """
    return max(1, min(int(cap), int(voxels) // math.prod(int(p) for p in patch_size)))


def _even_bounds(n: int, most: int) -> list[int]:
    """Bounds that split ``range(n)`` into as few chunks of at most ``most`` as possible, evened out.

    Example:
        >>> _even_bounds(10, 3), _even_bounds(24, 10), _even_bounds(3, 10)
        ([0, 2, 5, 7, 10], [0, 8, 16, 24], [0, 3])
    """
    calls = -(-n // max(1, most))
    return [n * k // calls for k in range(calls + 1)]


@torch.inference_mode()
def predict_preprocessed(model: torch.nn.Module, data: np.ndarray, config: ConfigurationPlan, *,
                         device: torch.device, num_classes: int, step: float = 0.5,
                         mirror_axes: Sequence[int] | None = None, tile_batch: int | None = None,
                         forward_batch: int | None = None, amp: bool = True) -> np.ndarray:
    """Sliding-window logits over a preprocessed ``(C, Z, Y, X)`` image.

    The tiles of every item (the volume in 3D, each z-slice in 2D) are blended with a Gaussian; with
    ``mirror_axes`` (patch axes) the logits of all flip combinations are averaged. Tiles are taken
    ``tile_batch`` at a time, in a 2D configuration across slices, and these tiles and all their mirrored copies
    go through the network ``forward_batch`` samples per call: a few large batches use a CPU far better than
    many small ones. Only the slices a batch touches are held padded, so memory stays that of the output.

    Args:
        model: The network (or any callable from a ``(N, C, *patch)`` tensor to ``(N, K, *patch)`` logits).
        data: The preprocessed image.
        config: Supplies the patch and dims.
        device: Where the network runs and the logits are accumulated.
        num_classes: ``K``.
        step: Tile step as a fraction of the patch.
        mirror_axes: Patch axes to mirror over (test-time augmentation); ``None``: no mirroring.
        tile_batch: Tiles per batch; default: 2D ``forward_batch`` over the mirrored copies (at least 1), 3D 4.
        forward_batch: Samples per forward call; default: 2D ``tile_batch`` times the mirrored copies, with
            ``tile_batch`` from :func:`forward_batch_size` of the patch (so at least one tile and all its copies),
            3D 8.
        amp: bf16 (CPU) / fp16 (CUDA) autocast.

    Returns:
        float32 logits ``(K, Z, Y, X)``.
    """
    patch = tuple(config.patch_size)
    dims = config.dims
    c, *spatial = data.shape
    vol = data if dims == 3 else data.transpose(1, 0, 2, 3)  # 2D: slices become the items (Z, C, Y, X)
    img_shape = tuple(spatial) if dims == 3 else tuple(spatial[1:])
    pad = [max(p - s, 0) for p, s in zip(patch, img_shape)]
    pad_before = [p // 2 for p in pad]
    padded_shape = tuple(s + p for s, p in zip(img_shape, pad))
    crop = (slice(None), *[slice(b, b + s) for b, s in zip(pad_before, img_shape)])
    weight = torch.from_numpy(gaussian_importance(patch)).to(device)
    starts = list(itertools.product(*[tile_starts(s, p, step) for s, p in zip(padded_shape, patch)]))
    regions = [tuple(slice(s, s + p) for s, p in zip(st, patch)) for st in starts]
    flips = _mirror_sets([a + 2 for a in (mirror_axes or ())])
    if dims == 3:  # 3D as before: a 3D patch is large already
        tile_batch, forward_batch = tile_batch or 4, forward_batch or 8
    elif forward_batch is None:  # whole tiles with all their mirrored copies, at least one
        tile_batch = tile_batch or max(1, forward_batch_size(patch) // len(flips))
        forward_batch = tile_batch * len(flips)
    else:
        tile_batch = tile_batch or max(1, forward_batch // len(flips))
    mf = memory_format(dims) if device.type == "cpu" else torch.contiguous_format
    norm = torch.zeros(padded_shape, dtype=torch.float32, device=device)
    for region in regions:  # every item has the same tiles, so the same normaliser
        norm[region] += weight
    n_items = 1 if dims == 3 else vol.shape[0]
    jobs = [(item, t) for item in range(n_items) for t in range(len(starts))]  # item by item: few are live
    live: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # item -> (padded input, weighted logit sum)
    out = np.zeros((num_classes, *spatial), dtype=np.float32)
    bounds = _even_bounds(len(jobs), tile_batch)
    for i, end in zip(bounds, bounds[1:]):
        chunk = jobs[i:end]
        for item, _ in chunk:
            if item not in live:
                x = torch.zeros((c, *padded_shape), dtype=torch.float32)
                x[crop] = torch.from_numpy(np.array(vol if dims == 3 else vol[item], dtype=np.float32))
                live[item] = (x.to(device), torch.zeros((num_classes, *padded_shape), dtype=torch.float32,
                                                        device=device))
        tiles = torch.stack([live[item][0][(slice(None), *regions[t])] for item, t in chunk])
        # All mirrored copies of all tiles go through the network together, ``forward_batch`` at a time.
        inputs = torch.cat([torch.flip(tiles, f) if f else tiles for f in flips])
        outs = []
        for j in range(0, len(inputs), forward_batch):
            with autocast_context(device, amp):
                outs.append(model(inputs[j:j + forward_batch].contiguous(memory_format=mf)).float())
        y = torch.cat(outs).view(len(flips), len(chunk), num_classes, *patch)
        logits = sum(torch.flip(y[k], f) if f else y[k] for k, f in enumerate(flips)) / len(flips)
        for (item, t), lg in zip(chunk, logits):
            live[item][1][(slice(None), *regions[t])] += lg * weight
        finished = end // len(starts)  # items before this one have all their tiles
        for item in [k for k in live if k < finished]:
            acc = live.pop(item)[1]
            acc /= norm
            res = acc[crop].cpu().numpy()
            if dims == 3:
                out[:] = res
            else:
                out[:, item] = res
    return out

