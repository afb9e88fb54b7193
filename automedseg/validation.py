"""Validation of a fold: the pseudo-Dice on patches after every epoch, and the final sliding-window validation of
the held-out cases at original resolution (``validation/``, which post-processing and ensembling read).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from automedseg.device import autocast_context
from automedseg.distributed import Dist
from automedseg.full_image_dice import image_tiles
from automedseg.inference import LoadedFold, predict_probabilities_preprocessed
from automedseg.plans import ConfigurationPlan, Plans
from automedseg.validation_summary import write_validation_summary
from automedseg.workspace import Workspace

Log = Callable[[str], None]

VALIDATION_MIRROR_MAX_SHARE = 0.10
"""The final validation mirrors (as ``predict`` does by default) when its 2^n passes take at most this share of
the fold's budget (or, without a budget, of its training time). Measured on AMD EPYC, 2 threads, 20-minute folds:
openkbp_hn_ct (1 axis) ~100 s, 8 % of the budget, mean Dice 0.6868 -> 0.6970 on the same weights; hippocampus
(3 axes, 8 passes) ~32 s, 3 %; a 5-minute hippocampus fold would spend 11 % and validates without mirroring."""


def validation_mirror_axes(mirror_axes: Sequence[int], *, single_pass_s: float | None,
                           allowed_s: float | None, fixed_s: float = 0.0) -> tuple[int, ...]:
    """The axes the final validation averages mirrored predictions over.

    The plan's mirror axes (what ``predict`` uses by default, so that post-processing and model selection are
    chosen on predictions like the ones users get) when all ``2 ** len(axes)`` passes fit in ``allowed_s``;
    none when they do not, or when the time of one pass is unknown under a limit.

    Args:
        mirror_axes: The configuration's mirroring axes (patch axes).
        single_pass_s: Estimated wall time of the validation without mirroring (``None``: unknown).
        allowed_s: Time the mirrored validation may take (``None``: no limit).
        fixed_s: The part of ``single_pass_s`` that mirroring does not repeat (restoring, writing, scoring).

    Example:
        >>> validation_mirror_axes((0, 1, 2), single_pass_s=4.0, allowed_s=120.0)
        (0, 1, 2)
        >>> validation_mirror_axes((0,), single_pass_s=100.0, allowed_s=120.0)
        ()
        >>> validation_mirror_axes((0, 1), single_pass_s=None, allowed_s=None)
        (0, 1)
    """
    axes = tuple(int(a) for a in mirror_axes)
    if not axes or allowed_s is None:
        return axes
    if single_pass_s is None:
        return ()
    return axes if (single_pass_s - fixed_s) * 2 ** len(axes) + fixed_s <= allowed_s else ()


def final_validation_axes(config: ConfigurationPlan, *, single_pass_s: float | None,
                          history: Sequence[dict[str, Any]], train_seconds: float, n_val: int,
                          fixed_s: float = 0.0) -> tuple[int, ...]:
    """The mirror axes of a fold's final validation (:func:`validation_mirror_axes` under the share of the budget,
    or without one, of the training time); the one-pass time as the trainer estimated it, else from the last
    whole-image scoring in the epoch history (``pseudo_dice_seconds`` per image); ``fixed_s`` of it is not
    repeated by the mirrored passes."""
    if single_pass_s is None:
        timed = [h for h in history if h.get("pseudo_dice_images") and h.get("pseudo_dice_seconds")]
        if timed:
            single_pass_s = timed[-1]["pseudo_dice_seconds"] / timed[-1]["pseudo_dice_images"] * n_val * 1.5
    budget = config.training.time_budget_s
    allowed = VALIDATION_MIRROR_MAX_SHARE * (budget if budget is not None else train_seconds)
    return validation_mirror_axes(config.augmentation.mirror_axes, single_pass_s=single_pass_s, allowed_s=allowed,
                                  fixed_s=fixed_s)


def validation_tiles(cache: Path, case_ids: Sequence[str], patch_size: Sequence[int], *, step: float = 0.5) -> int:
    """Tiles the final sliding-window validation of ``case_ids`` runs through the network (no mirroring), from
    the cached image shapes, laid as :func:`~automedseg.inference.predict_preprocessed` lays them."""
    tiles = 0
    for cid in case_ids:
        shape = np.load(Path(cache) / f"{cid}.npy", mmap_mode="r").shape[1:]
        tiles += image_tiles(shape, patch_size, step=step) * (shape[0] if len(patch_size) == 2 else 1)
    return tiles


@dataclass
class ValidationEstimate:
    """The final validation's expected wall time, refined as the run measures its parts.

    Attributes:
        tiles: Tiles of the validation cases (one pass, no mirroring).
        cases: Validation cases.
        seconds_per_tile: Sliding-window seconds per tile: first from the epoch's validation patches, then the
            median over the epochs' whole-image scorings (the first epoch's, warm-up, left out once later ones
            are timed).
        finish_s_per_case: What a case costs besides the network (:func:`time_case_finish`).
        whole_images: Seconds per tile of each whole-image scoring so far.
        patch_s: The latest validation patches' forward seconds per patch: the part of a tile that mirrored
            passes repeat (the rest of a whole-image tile, windowing and accumulation, is done once).
    """

    tiles: int
    cases: int
    seconds_per_tile: float | None = None
    finish_s_per_case: float = 0.0
    whole_images: list[float] = field(default_factory=list)
    patch_s: float | None = None

    @property
    def fixed_s(self) -> float:
        """The seconds mirroring does not repeat: every case's finish."""
        return self.cases * self.finish_s_per_case

    def observe_patches(self, seconds_per_patch: float) -> None:
        """The validation patches' forward time per patch (the tile's time too until whole images are timed)."""
        self.patch_s = seconds_per_patch
        if not self.whole_images:
            self.seconds_per_tile = seconds_per_patch

    def observe_whole_images(self, seconds: float, tiles: int) -> None:
        """An epoch's whole-image scoring: ``seconds`` for ``tiles`` tiles."""
        if tiles > 0 and seconds > 0:
            self.whole_images.append(seconds / tiles)
            timed = self.whole_images[1:] or self.whole_images
            self.seconds_per_tile = float(np.median(timed))

    def seconds(self, mirrors: int = 1) -> float | None:
        """Wall seconds with ``mirrors`` forward passes per tile (``None``: nothing measured yet).

        Example:
            >>> e = ValidationEstimate(tiles=100, cases=4, finish_s_per_case=2.0)
            >>> e.observe_patches(0.05); e.seconds()
            13.0
            >>> e.observe_whole_images(9.0, 100); e.observe_whole_images(3.0, 100); e.seconds(mirrors=4)
            20.0
            >>> e.observe_patches(0.01); e.seconds(mirrors=4)  # forward 0.01 of a 0.03-s tile: mirrored 4 times
            14.0
        """
        if self.seconds_per_tile is None:
            return None
        forward = min(self.patch_s if self.patch_s is not None else self.seconds_per_tile, self.seconds_per_tile)
        return self.tiles * (forward * mirrors + self.seconds_per_tile - forward) + self.fixed_s


@torch.inference_mode()
def pseudo_dice(model, loader, n_batches: int, device, mf, amp: bool, num_classes: int, dist: Dist
                 ) -> tuple[float, list[float]]:
    """Validation loss and per-foreground-class Dice accumulated over ``n_batches`` patches (and all ranks)."""
    model.eval()
    model.deep_supervision = False
    tp = np.zeros(num_classes - 1)
    fp = np.zeros(num_classes - 1)
    fn = np.zeros(num_classes - 1)
    losses = []
    for _ in range(n_batches):
        batch = next(loader)
        x = torch.from_numpy(batch["data"]).to(device).contiguous(memory_format=mf)
        y = torch.from_numpy(batch["target"][0]).to(device).long()
        with autocast_context(device, amp):
            out = model(x)
        out = out.float()
        losses.append(float(F.cross_entropy(out, y[:, 0])))
        pred = out.argmax(1)
        for k in range(1, num_classes):
            p, t = pred == k, y[:, 0] == k
            tp[k - 1] += float((p & t).sum())
            fp[k - 1] += float((p & ~t).sum())
            fn[k - 1] += float((~p & t).sum())
    model.deep_supervision = True
    tp, fp, fn = np.split(dist.sum(np.concatenate([tp, fp, fn])), 3)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    return float(np.mean(losses)) if losses else float("nan"), [float(d) for d in dice]


def validate_fold(ws: Workspace, plans: Plans, config: ConfigurationPlan, fold_dir: Path, val_ids: Sequence[str],
                  *, model: torch.nn.Module, device: torch.device, log: Log = print,
                  step: float = 0.5, mirror_axes: Sequence[int] = ()) -> dict[str, Any]:
    """Sliding-window prediction of the held-out cases at original resolution.

    With ``mirror_axes`` (the configuration's, see :func:`validation_mirror_axes`) the predictions average the
    mirrored passes as ``predict`` does; the summary records the axes.

    Writes ``validation/<case>.npz`` (float16 probabilities, compressed; channel ``k`` is training index
    ``k``, i.e. the ``k``-th smallest declared label value, ``label_values`` says which),
    ``validation/<case>.nii.gz`` (the argmax mapped back to the declared label values) and
    ``validation/summary.json`` (per-case, per-class Dice and the mean, keyed by declared value), which the
    post-processing and ensemble choices read.
    """
    from automedseg.metrics import summarize
    from automedseg.preprocessing import read_case_meta

    out_dir = fold_dir / "validation"
    out_dir.mkdir(exist_ok=True)
    model.eval()
    model.deep_supervision = False
    if tuple(mirror_axes) and tuple(mirror_axes) != tuple(config.augmentation.mirror_axes):
        raise ValueError(f"mirror_axes {tuple(mirror_axes)}: validation mirrors along the configuration's axes "
                         f"{tuple(config.augmentation.mirror_axes)} or none")
    fold = LoadedFold(plans, config, model, fold_dir)
    cache = ws.preprocessed_dir(config.data_identifier)
    labels = sorted(v for v in plans.labels.values() if v > 0)
    per_case = []
    t0 = time.perf_counter()
    for cid in val_ids:
        meta = read_case_meta(cache, cid)
        props = meta.properties
        assert props is not None, f"{cache}: {cid} has no properties"
        data = np.load(cache / f"{cid}.npy", mmap_mode="r")
        probs = predict_probabilities_preprocessed([fold], np.asarray(data), device=device, step=step,
                                                   mirror=bool(tuple(mirror_axes)))
        m = _finish_case(probs, meta, plans, config, out_dir, labels)
        if m is not None:  # None: the raw reference is gone, nothing to score against
            per_case.append({"case": cid, "metrics": {str(k): v for k, v in m.items()}})
    summary = summarize([c["metrics"] for c in per_case]) if per_case else {}
    dice = {str(k): summary["per_label"][k]["dice"] for k in summary.get("per_label", {})} if summary else {}
    result = {
        "configuration": config.name,
        "fold": fold_dir.name,
        "cases": list(val_ids),
        "mean_dice": float(np.mean(list(dice.values()))) if dice else None,
        "dice_per_class": dice,
        "summary": _jsonable(summary),
        "per_case": _jsonable(per_case),
        "seconds": time.perf_counter() - t0,
        "mirror_axes": [int(a) for a in mirror_axes],
    }
    write_validation_summary(out_dir / "summary.json", result)
    if result["mean_dice"] is not None:
        log(f"validation {fold_dir}: mean Dice {result['mean_dice']:.4f} "
            f"({', '.join(f'{k}: {v:.4f}' for k, v in dice.items())}) on {len(per_case)} cases"
            + (f", mirrored along axes {tuple(mirror_axes)}" if tuple(mirror_axes) else ""))
    return result


def _finish_case(probs: np.ndarray, meta: Any, plans: Plans, config: ConfigurationPlan, out_dir: Path,
                 labels: Sequence[int]) -> dict[int, dict[str, float]] | None:
    """What the validation does with a case's probabilities besides predicting them: back to the original
    geometry, argmax, ``<case>.npz`` and ``<case>.nii.gz`` written, scored against the raw reference (``None``:
    the reference is gone)."""
    from automedseg.io import atomic_save_npz, read_label, write_segmentation
    from automedseg.metrics import compute_case_metrics
    from automedseg.preprocessing import restore_probabilities

    props = meta.properties
    probs = restore_probabilities(probs, props, plans, config)
    seg = plans.to_values(probs.argmax(0))  # training indices -> declared label values
    atomic_save_npz(out_dir / f"{props.case_id}.npz", compressed=True, probabilities=probs.astype(np.float16),
                    label_values=np.asarray(plans.label_values))
    write_segmentation(seg, props.geometry, out_dir / f"{props.case_id}.nii.gz")
    if not meta.label_file or not Path(meta.label_file).is_file():
        return None
    ref, _ = read_label(Path(meta.label_file))
    return compute_case_metrics(ref, seg, labels=labels, spacing_mm=props.geometry.spacing_zyx)


def time_case_finish(cache: Path, plans: Plans, config: ConfigurationPlan, case_id: str, *,
                     scratch: Path | None = None) -> float:
    """Seconds :func:`validate_fold` spends on ``case_id`` (cached in ``cache``) besides the network.

    The case's preprocessed labels, one-hot, stand for the probabilities: they are restored to the original
    geometry, written (to a temporary folder) and scored as a prediction would be. The trainer adds this, per
    validation case, to the network's share of its final-validation estimate: on CT volumes it is most of the
    validation (openkbp_hn_ct, 8 classes, 128^3 voxels: ~3.6 s a case against ~3 s of forward passes). The
    files go to a temporary folder inside ``scratch`` (default: the system's), removed afterwards.
    """
    import tempfile

    from automedseg.preprocessing import read_case_meta

    meta = read_case_meta(cache, case_id)
    seg = np.load(cache / f"{case_id}_seg.npy", mmap_mode="r")[0]
    probs = np.zeros((plans.num_classes, *seg.shape), dtype=np.float32)
    np.put_along_axis(probs, np.clip(np.asarray(seg, dtype=np.int64), 0, plans.num_classes - 1)[None], 1.0, axis=0)
    labels = sorted(v for v in plans.labels.values() if v > 0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".automedseg-val-probe-", dir=scratch) as tmp:
        _finish_case(probs, meta, plans, config, Path(tmp), labels)
    return time.perf_counter() - t0


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (np.floating, np.integer)):
        return _jsonable(obj.item())
    return obj
