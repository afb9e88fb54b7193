"""The per-epoch pseudo-Dice on whole validation images, the figure that steers training and the search's pruner.

The patch pseudo-Dice (:func:`automedseg.validation.pseudo_dice`) scores patches sampled with forced foreground,
so false positives far from the foreground are rarely seen and it flatters the model (colon polyps, 2D: 0.65-0.73
on patches, 0.40 on whole images). Here a few whole preprocessed validation images from the cache are predicted
with the sliding window of :func:`~automedseg.inference.predict_preprocessed` (no mirroring; 2D images that fit
in one patch are batched, :func:`predict_single_tiles`), and true/false positives and false negatives are pooled
per class over them.

An *image* is what the network sees whole: a case's volume for a 3D configuration, one z-slice of a case for a
2D one. :class:`ImageRotation` decides which images an epoch scores, deterministically from the epoch alone
(resumed and distributed runs agree): round ``r`` is a permutation of all images seeded by ``(seed, r)``; the
rounds are laid end to end by their tile counts, and epoch ``e`` scores the images whose first tile falls in
``[e * B, (e + 1) * B)``, ``B`` being the tiles per epoch. So an epoch costs about ``B`` tiles on average and at
most ``B`` plus one image; an image larger than ``B`` is scored every few epochs (the epochs between score
nothing), and every image is scored once per round. When all images together cost at most ``B`` tiles, every
epoch scores each of them once.

Example:
    >>> images = [WholeImage(f"case{i}", None, tiles=2) for i in range(5)]
    >>> rotation = ImageRotation(images, tiles_per_epoch=4, seed=0)
    >>> [len(rotation.for_epoch(e)) for e in range(5)]
    [2, 2, 2, 2, 2]
    >>> sorted({i.case_id for e in range(3) for i in rotation.for_epoch(e)}) == [i.case_id for i in images]
    True
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from automedseg.device import autocast_context, memory_format
from automedseg.distributed import Dist
from automedseg.inference import predict_preprocessed, tile_starts
from automedseg.plans import ConfigurationPlan


@dataclass(frozen=True)
class WholeImage:
    """One whole image of a cached case.

    Attributes:
        case_id: The case in the preprocessed cache.
        z: The z-slice (2D configurations); ``None``: the whole volume (3D configurations).
        tiles: Sliding-window tiles it takes (its cost).
    """

    case_id: str
    z: int | None
    tiles: int


def image_tiles(shape: Sequence[int], patch_size: Sequence[int], *, step: float = 0.5) -> int:
    """Tiles of the sliding window over one image, as :func:`~automedseg.inference.predict_preprocessed` lays them.

    Args:
        shape: The image's spatial shape; its last ``len(patch_size)`` axes are tiled.
        patch_size: The network's patch.
        step: Tile step as a fraction of the patch.

    Example:
        >>> image_tiles((1, 300, 100), (128, 128))
        4
    """
    dims = len(patch_size)
    return math.prod(len(tile_starts(int(s), int(p), step)) for s, p in zip(tuple(shape)[-dims:], patch_size))


def whole_images(cache: Path, case_ids: Sequence[str], config: ConfigurationPlan, *,
                 step: float = 0.5) -> list[WholeImage]:
    """The whole images of ``case_ids`` in the cache (a volume per case in 3D, one per z-slice in 2D)."""
    out = []
    for cid in case_ids:
        shape = np.load(Path(cache) / f"{cid}.npy", mmap_mode="r").shape[1:]
        tiles = image_tiles(shape, config.patch_size, step=step)
        if config.dims == 2:
            out.extend(WholeImage(str(cid), z, tiles) for z in range(shape[0]))
        else:
            out.append(WholeImage(str(cid), None, tiles))
    return out


class ImageRotation:
    """Which whole images each epoch scores: a deterministic stream that covers every image once per round.

    Args:
        images: All images to rotate through (the validation cases' :func:`whole_images`).
        tiles_per_epoch: The average tiles an epoch may cost (``B`` in the module's description).
        seed: Seeds the per-round permutations.
    """

    def __init__(self, images: Sequence[WholeImage], *, tiles_per_epoch: int, seed: int) -> None:
        if tiles_per_epoch < 1:
            raise ValueError(f"tiles_per_epoch must be at least 1, got {tiles_per_epoch}")
        self.images = list(images)
        self.tiles_per_epoch = int(tiles_per_epoch)
        self.seed = int(seed)
        self._tiles = np.array([max(1, i.tiles) for i in self.images], dtype=np.int64)
        self.round_tiles = int(self._tiles.sum())

    @classmethod
    def from_cache(cls, cache: Path, case_ids: Sequence[str], config: ConfigurationPlan, *, tiles_per_epoch: int,
                   seed: int, step: float = 0.5) -> ImageRotation:
        """The rotation over the whole images of ``case_ids`` in the preprocessed cache."""
        return cls(whole_images(cache, case_ids, config, step=step), tiles_per_epoch=tiles_per_epoch, seed=seed)

    def for_epoch(self, epoch: int) -> list[WholeImage]:
        """The images epoch ``epoch`` scores, in stream order (may be empty while a large image is paid for)."""
        if not self.images:
            return []
        if self.round_tiles <= self.tiles_per_epoch:
            return list(self.images)
        lo, hi = epoch * self.tiles_per_epoch, (epoch + 1) * self.tiles_per_epoch
        out = []
        for r in range(lo // self.round_tiles, (hi - 1) // self.round_tiles + 1):
            order = np.random.default_rng([self.seed, r]).permutation(len(self.images))
            starts = r * self.round_tiles + np.concatenate([[0], np.cumsum(self._tiles[order])[:-1]])
            out.extend(self.images[int(i)] for i, s in zip(order, starts) if lo <= s < hi)
        return out


@dataclass(frozen=True)
class ImageDice:
    """The pseudo-Dice of one epoch's whole images.

    Attributes:
        dice: Dice per foreground class, pooled over the images (``nan``: the class is neither in the references
            nor predicted); empty when no image was scored.
        images: Images scored (over all ranks).
        seconds: Wall time of the scoring on this rank.
    """

    dice: tuple[float, ...]
    images: int
    seconds: float

    @property
    def mean(self) -> float | None:
        """Mean over the classes with a Dice; ``None`` when there is none (nothing scored, or nothing to score)."""
        finite = [d for d in self.dice if math.isfinite(d)]
        return float(np.mean(finite)) if finite else None

    def describe(self) -> str:
        """The per-class figures for a log line, e.g. ``0.812 0.455 on 6 images``."""
        if not self.images:
            return "- (no whole image this epoch)"
        return f"{' '.join(f'{d:.3f}' for d in self.dice)} on {self.images} image{'s' * (self.images != 1)}"


def confusion_counts(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """True positives, false positives and false negatives per foreground class, as rows of a ``(3, K - 1)`` array.

    Reference voxels outside ``0..K-1`` are not counted.

    Example:
        >>> confusion_counts(np.array([0, 1, 1, 2]), np.array([0, 1, 0, 1]), 3).tolist()
        [[1, 0], [1, 1], [1, 0]]
    """
    index = np.asarray(ref).astype(np.int32).ravel()  # reference * K + prediction, in one int32 array
    keep = (index >= 0) & (index < num_classes)
    index *= num_classes
    np.add(index, np.asarray(pred).ravel(), out=index, casting="unsafe")
    m = np.bincount(index if keep.all() else index[keep], minlength=num_classes * num_classes)
    m = m.reshape(num_classes, num_classes)  # m[reference, prediction]
    tp = np.diag(m)[1:]
    return np.stack([tp, m[:, 1:].sum(0) - tp, m[1:, :].sum(1) - tp])


def _read(cache: Path, image: WholeImage) -> tuple[np.ndarray, np.ndarray]:
    """The image ``(C, Z, Y, X)`` (Z = 1 for a slice) and its training indices ``(Z, Y, X)`` from the cache."""
    data = np.load(Path(cache) / f"{image.case_id}.npy", mmap_mode="r")
    seg = np.load(Path(cache) / f"{image.case_id}_seg.npy", mmap_mode="r")
    if image.z is not None:
        data, seg = data[:, image.z:image.z + 1], seg[..., image.z:image.z + 1, :, :]
    return np.asarray(data, dtype=np.float32), np.asarray(seg).reshape(data.shape[1:])


def predict_single_tiles(model: torch.nn.Module, slices: Sequence[np.ndarray], patch_size: Sequence[int], *,
                         device: torch.device, amp: bool = True) -> list[np.ndarray]:
    """Logits ``(K, Y, X)`` of 2D images ``(C, Y, X)`` that fit in one patch, in one forward pass.

    What :func:`~automedseg.inference.predict_preprocessed` computes for such an image (zero-padded, centred, one
    tile, whose Gaussian weight cancels), but for a batch of images at once: the sliding window would run the
    network on one image at a time.
    """
    patch = tuple(int(p) for p in patch_size)
    x = torch.zeros((len(slices), slices[0].shape[0], *patch), dtype=torch.float32)
    regions = []
    for i, a in enumerate(slices):
        region = tuple(slice((p - s) // 2, (p - s) // 2 + s) for p, s in zip(patch, a.shape[1:]))
        x[(i, slice(None), *region)] = torch.from_numpy(np.array(a, dtype=np.float32))
        regions.append(region)
    mf = memory_format(2) if device.type == "cpu" else torch.contiguous_format
    with autocast_context(device, amp):
        out = model(x.to(device).contiguous(memory_format=mf)).float().cpu().numpy()
    return [o[(slice(None), *r)] for o, r in zip(out, regions)]


@torch.inference_mode()
def score_images(model: torch.nn.Module, cache: Path, images: Sequence[WholeImage], config: ConfigurationPlan, *,
                 num_classes: int, device: torch.device, amp: bool = True, dist: Dist | None = None,
                 step: float = 0.5) -> ImageDice:
    """Sliding-window pseudo-Dice of ``model`` over whole cached images, TP/FP/FN pooled per class.

    2D images that fit in one patch go through the network ``config.batch_size`` (at least 4) at a time
    (:func:`predict_single_tiles`), the others through :func:`~automedseg.inference.predict_preprocessed`. In a
    distributed run every rank is given the same ``images``, scores its share (every ``world``-th) and the counts
    are summed over the ranks; every rank gets the same result.

    Args:
        model: The bare network (not a DistributedDataParallel wrapper); left in eval mode with deep supervision on.
        cache: The preprocessed cache folder (``<case>.npy``, ``<case>_seg.npy``).
        images: What to score (all ranks the same list).
        config: Supplies the patch size, dims and batch size.
        num_classes: Output classes, background included.
        device: Where the network runs.
        amp: Mixed precision as in training.
        dist: Rank bookkeeping (default: a single process).
        step: Tile step as a fraction of the patch.
    """
    dist = dist or Dist()
    if not images:
        return ImageDice((), 0, 0.0)
    t0 = time.perf_counter()
    model.eval()
    model.deep_supervision = False
    counts = np.zeros((3, num_classes - 1), dtype=np.float64)
    batch = max(4, int(config.batch_size))
    mine = images[dist.rank::dist.world]
    single = [i for i in mine if config.dims == 2 and i.tiles == 1]
    try:
        for k in range(0, len(single), batch):
            read = [_read(cache, i) for i in single[k:k + batch]]
            logits = predict_single_tiles(model, [d[:, 0] for d, _ in read], config.patch_size, device=device,
                                          amp=amp)
            for lg, (_, seg) in zip(logits, read):
                counts += confusion_counts(lg.argmax(0), seg[0], num_classes)
        for img in (i for i in mine if not (config.dims == 2 and i.tiles == 1)):
            data, seg = _read(cache, img)
            logits = predict_preprocessed(model, data, config, device=device, num_classes=num_classes, step=step,
                                          mirror_axes=None, tile_batch=batch, forward_batch=batch, amp=amp)
            counts += confusion_counts(logits.argmax(0), seg, num_classes)
    finally:
        model.deep_supervision = True
    tp, fp, fn = dist.sum(counts.ravel()).reshape(3, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    return ImageDice(tuple(float(d) for d in dice), len(images), time.perf_counter() - t0)
