"""Training data pipeline: patches from the preprocessed cache to augmented batches.

Three layers, each usable on its own:

1. :class:`PatchSampler` reads patches from the memory-mapped cache (``<case>.npy``, ``<case>_seg.npy``,
   ``<case>_locs.npz``) with nnU-Net's foreground oversampling. It is a batchgenerators data loader
   (``next(sampler)`` returns a batch dict) and samples a patch larger than the training patch when the
   spatial augmentation rotates or scales, so that the transformed patch is covered by real image data
   (see :func:`sampling_patch_size`).
2. :func:`build_transforms` / :func:`build_validation_transforms` compose batchgenerators transforms:
   rotation and scaling (and optional elastic deformation) that crop back to the training patch, intensity
   augmentation, mirroring, deep-supervision targets (:func:`downsample_seg_for_deep_supervision`) and the
   conversion to contiguous arrays.
3. :func:`make_training_loader` / :func:`make_validation_loader` run sampler and transforms in background
   worker processes (or in-process for ``num_processes=0``) and wrap them in a :class:`BatchLoader`, an
   infinite iterator that measures how long ``next()`` waits and shuts the workers down on :meth:`close`
   or at the end of a ``with`` block.

The layers live in :mod:`automedseg.augmentation_sampler`, :mod:`automedseg.augmentation_transforms` and
:mod:`automedseg.augmentation_loaders`; this module re-exports their public names.

Batches are dicts of numpy arrays, ready for ``torch.from_numpy`` (no copy)::

    {"data": float32 (B, C, *patch), "seg": int8 (B, 1, *patch), "keys": [case ids],
     "target": [int8 (B, 1, *patch // stride) for each deep-supervision level]}   # target: optional

Randomness: the sampler draws from its own ``np.random.Generator``; batchgenerators' transforms draw
from the global ``np.random`` and ``random`` modules, which every worker seeds from the loader seed and
its index. The in-process loader swaps a private copy of both global states in and out around each batch,
so it is deterministic for a given seed and leaves the caller's global random state untouched. Worker
``i`` of a background loader draws the same streams for every run with the same seed, and worker 0 draws
exactly what the in-process loader draws.

Example:
    >>> with make_training_loader(folder, train_ids, config) as loader:  # doctest: +SKIP
    ...     batch = next(loader)
    ...     loader.wait_seconds  # time the training loop spent waiting for batches
"""

from automedseg.augmentation_loaders import BatchLoader, make_training_loader, make_validation_loader
from automedseg.augmentation_sampler import PatchSampler, sampling_patch_size
from automedseg.augmentation_transforms import (
    Convert2DTo3DTransform,
    Convert3DTo2DTransform,
    DeepSupervisionTargetsTransform,
    RotateScaleCropTransform,
    ToContiguousArraysTransform,
    build_transforms,
    build_validation_transforms,
    downsample_seg_for_deep_supervision,
)

__all__ = [
    "BatchLoader",
    "Convert2DTo3DTransform",
    "Convert3DTo2DTransform",
    "DeepSupervisionTargetsTransform",
    "PatchSampler",
    "RotateScaleCropTransform",
    "ToContiguousArraysTransform",
    "build_transforms",
    "build_validation_transforms",
    "downsample_seg_for_deep_supervision",
    "make_training_loader",
    "make_validation_loader",
    "sampling_patch_size",
]
