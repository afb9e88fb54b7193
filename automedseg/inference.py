"""Sliding-window inference from a plan and trained weights (no training code needed).

A trained fold folder holds ``plans.json`` (the plan with the configuration as trained) and
``checkpoint_final.pt`` (or ``checkpoint_best.pt`` / ``checkpoint_latest.pt``). :func:`load_fold`
rebuilds the network from them; :func:`predict_preprocessed` runs a Gaussian-weighted sliding window with
optional mirroring in preprocessed space (:mod:`automedseg.sliding_window`, whose names are re-exported here);
:func:`predict_case` goes from a raw image to class probabilities on the raw image grid, averaging several folds
(an ensemble); :func:`segment_case` makes the label map of one image as ``automedseg predict`` writes it, and
:func:`predict_folder` does that for a folder.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from automedseg.allocator import retain_freed_memory
from automedseg.atomic import remove_stale_temp_files
from automedseg.checkpoints import CheckpointError, load_checkpoint  # noqa: F401  (re-exported)
from automedseg.device import channels_last_norms, memory_format, select_device
from automedseg.errors import InputError, LockedError
from automedseg.fused_norm import fused_available
from automedseg.io import CaseFiles, Geometry
from automedseg.loaded_fold import LoadedFold
from automedseg.locks import folder_lock, waiting_lock
from automedseg.network import build_network
from automedseg.plans import Plans
from automedseg.preprocessing import preprocess_image, restore_probabilities
from automedseg.sliding_window import (  # noqa: F401  (re-exported)
    FORWARD_VOXELS_2D,
    MAX_FORWARD_BATCH,
    _mirror_sets,
    forward_batch_size,
    gaussian_importance,
    predict_preprocessed,
    tile_starts,
)

Postprocess = Callable[[np.ndarray, tuple[float, ...]], np.ndarray]
"""Post-processing of a predicted label map ``(Z, Y, X)``, given its voxel spacing ``(z, y, x)`` in mm (the image's:
operations in millimetres need it), e.g. :func:`automedseg.postprocessing.apply_postprocessing` of a choice."""
SUMMARY_LOCK = ".automedseg-summary.lock"  # what sums up a folder predicted in parts is written under it
CHECKPOINT_PREFERENCE = ("checkpoint_final.pt", "checkpoint_best.pt", "checkpoint_latest.pt")
CaseSegmenter = Callable[[Path], Callable[..., tuple[np.ndarray, np.ndarray]]]
"""Mask path -> what segments that case as :func:`segment_case` does (:func:`predict_folder`'s hook)."""


def load_fold(fold_dir: Path, *, device: torch.device, checkpoint: str | None = None,
              warn: Callable[[str], None] = print) -> LoadedFold:
    """Rebuild the network of a trained fold from its ``plans.json`` and weights.

    A damaged checkpoint is skipped with a warning (``warn``) when a later one of
    :data:`CHECKPOINT_PREFERENCE` loads.
    """
    fold_dir = Path(fold_dir)
    plans = Plans.load(fold_dir / "plans.json")
    (name,) = plans.configurations  # a fold's plan copy holds exactly its configuration
    config = plans.configurations[name]
    names = [checkpoint] if checkpoint else list(CHECKPOINT_PREFERENCE)
    paths = [fold_dir / n for n in names if (fold_dir / n).is_file()]
    if not paths:
        raise FileNotFoundError(f"{fold_dir}: no checkpoint ({', '.join(names)})")
    ckpt, path, damaged = None, paths[0], []
    for path in paths:  # a damaged final checkpoint falls back to the best, then the latest one
        try:
            ckpt = load_checkpoint(path, device)
            break
        except CheckpointError as e:
            damaged.append(str(e))
    if ckpt is None:
        raise CheckpointError("; ".join(damaged))
    if damaged:
        warn(f"{damaged[0]}; using {path.name} instead")
    model = build_network(config.network, in_channels=len(plans.channel_names), num_classes=plans.num_classes,
                          dims=config.dims)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: weights do not fit the network of {fold_dir / 'plans.json'} "
                              f"({str(e).strip().splitlines()[0][:120]})") from None
    model.deep_supervision = False
    model.to(device).eval()
    if device.type == "cpu":
        model = cpu_inference_model(model, dims=config.dims)
    return LoadedFold(plans, config, model, path)


def cpu_inference_model(model: torch.nn.Module, *, dims: int) -> torch.nn.Module:
    """A network set up for CPU inference: channels-last, its norms as fast as they come here (the fused kernel of
    :mod:`automedseg.fused_norm` where it builds, else per-channel GroupNorms), freed memory kept for reuse."""
    retain_freed_memory()
    if not fused_available():  # the fused norm keeps channels-last itself, and is faster (2D: 3-5x per image)
        model = channels_last_norms(model)
    return model.to(memory_format=memory_format(dims))


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    """Numerically stable softmax over ``axis``."""
    e = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def predict_case(folds: Sequence[LoadedFold], image: np.ndarray, geometry: Geometry, *, device: torch.device,
                 step: float = 0.5, mirror: bool = True, amp: bool = True) -> np.ndarray:
    """Class probabilities ``(K, Z, Y, X)`` on the raw image grid, averaged over ``folds``.

    All folds must share a configuration's preprocessing (they do when trained from one plan).
    """
    plans, config = folds[0].plans, folds[0].config
    data, _, props = preprocess_image(image, geometry, plans, config)
    probs = predict_probabilities_preprocessed(folds, data, device=device, step=step, mirror=mirror, amp=amp)
    return restore_probabilities(probs, props, plans, config)


def predict_probabilities_preprocessed(folds: Sequence[LoadedFold], data: np.ndarray, *, device: torch.device,
                                       step: float = 0.5, mirror: bool = True, amp: bool = True) -> np.ndarray:
    """Average softmax probabilities of several folds on one preprocessed image."""
    total = None
    for fold in folds:
        axes = fold.config.augmentation.mirror_axes if mirror else ()
        logits = predict_preprocessed(fold.model, data, fold.config, device=device,
                                      num_classes=fold.plans.num_classes, step=step, mirror_axes=axes, amp=amp)
        p = softmax(logits)
        total = p if total is None else total + p
    assert total is not None
    return total / len(folds)



# --- folders -------------------------------------------------------------------------------------------


@dataclass
class FolderReport:
    """Outcome of :func:`predict_folder`."""

    written: list[str]
    skipped_existing: list[str]
    failed: dict[str, str]
    seconds_per_case: float

    def summary(self) -> str:
        """The counts in one line, as ``automedseg predict`` and ``automedseg demo`` print them.

        Example:
            >>> FolderReport(["a"], ["b", "c"], {}, 0.5).summary()
            '1 written, 2 kept (exist), 0 failed; 0.50 s per case'
        """
        return (f"{len(self.written)} written, {len(self.skipped_existing)} kept (exist), {len(self.failed)} failed; "
                f"{self.seconds_per_case:.2f} s per case")


def find_folds(configuration_dir: Path, folds: Sequence[int | str] | None = None) -> list[Path]:
    """Trained fold folders of a configuration (those with a checkpoint), optionally a subset."""
    configuration_dir = Path(configuration_dir)
    names = [f"fold_{f}" for f in folds] if folds else sorted(
        p.name for p in configuration_dir.glob("fold_*") if p.name != "fold_all")
    out = []
    for n in names:
        d = configuration_dir / n
        if not any((d / c).is_file() for c in CHECKPOINT_PREFERENCE):
            raise FileNotFoundError(f"{d}: no trained checkpoint")
        out.append(d)
    if not out:
        raise FileNotFoundError(f"{configuration_dir}: no trained folds")
    return out


def predict_folder(input_dir: Path, output_dir: Path, fold_groups: Sequence[Sequence[Path]], *,
                   device: str | None = None, step: float = 0.5, mirror: bool = True, amp: bool = True,
                   overwrite: bool = False, save_probabilities: bool = False,
                   postprocessing: Postprocess | None = None,
                   output_ending: str | None = None, overlays: bool = False, progress: bool = False,
                   num_parts: int = 1, part_id: int = 0, log: Callable[[str], None] = print,
                   engine: str = "torch", output_format: str = "image",
                   case_segmenter: CaseSegmenter | None = None,
                   after_cases: Callable[[FolderReport], None] | None = None) -> FolderReport:
    """Predict every case of a folder with an ensemble; bad inputs are reported and skipped.

    Args:
        input_dir: Images in nnU-Net layout (``CASE_0000.nii.gz`` ...) or one (4D) file per case.
        output_dir: Where masks go; they have the input's format and exactly its geometry.
        fold_groups: One list of fold folders per configuration; folds are averaged within a
            configuration, then configurations are averaged (a configuration ensemble).
        device: ``cpu``, ``cuda``, ``mps`` or ``None`` for what exists.
        step: Tile step as a fraction of the patch (0.5: tiles overlap by half).
        mirror: Test-time mirroring over the plan's mirror axes.
        amp: bf16 (CPU) / fp16 (CUDA) inference.
        overwrite: Re-predict cases whose output exists (otherwise kept, so interrupted runs continue).
        save_probabilities: Also write ``<case>.npz`` with float16 class probabilities.
        postprocessing: Applied to each label map, with the image's voxel spacing in mm, before writing.
        output_ending: Output file ending (default: the input's).
        overlays: Also write PNG overlays of a few slices to ``output_dir/overlays`` (one colour per label, a legend
            with the plan's label names; :mod:`automedseg.overlays`).
        progress: Show a progress bar.
        num_parts: Split the cases into this many disjoint parts (several processes or machines) ...
        part_id: ... and predict only this one (0-based): case ``i`` belongs to part ``i % num_parts``.
        log: Where per-case problems are reported.
        engine: ``torch``, or ``onnxruntime``: the folds' ONNX graphs (``export --onnx``) run the network, in
            float32, in the same pipeline (:mod:`automedseg.onnx_engine`).
        output_format: ``image`` (the input's format; NIfTI for DICOM series) or ``dicom-seg`` (DICOM series
            input only: :func:`automedseg.dicom.write_dicom_seg`).
        case_segmenter: Given the mask path of a case, what segments it instead of :func:`segment_case` (called
            as that, before the mask is written; e.g. :func:`automedseg.uncertainty.uncertainty_segmenter`).
        after_cases: Called with the report after the cases, while ``output_dir`` is still locked: what writes a
            file summing up the whole folder, which several ``num_parts`` runs share (the lock keeps them from
            writing it at once), e.g. :func:`automedseg.uncertainty.write_uncertainty_summary`.
    """
    from automedseg.io import discover_images

    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise InputError(f"--num-parts {num_parts} / --part-id {part_id}: need num_parts >= 1 and "
                         "0 <= part_id < num_parts")
    check_step(step)
    output_dir = Path(output_dir)
    check_output_folder(Path(input_dir), output_dir)
    groups, dev = load_fold_groups(fold_groups, device=device, engine=engine, warn=log)
    amp = amp and engine == "torch"
    plans = groups[0][0].plans
    n_ch = len(plans.channel_names)
    cases = discover_images(Path(input_dir), n_channels=n_ch)[part_id::num_parts]
    if output_format != "image":
        from automedseg.dicom import check_dicom_output

        check_dicom_output(cases, output_format)
    with output_lock(output_dir, num_parts=num_parts, part_id=part_id):
        remove_stale_temp_files(output_dir)  # only those of ended processes: a running part's stay
        remove_stale_temp_files(output_dir / "overlays")
        report = _predict_cases(cases, output_dir, groups, plans=plans, device=dev, step=step, mirror=mirror,
                                amp=amp, overwrite=overwrite, save_probabilities=save_probabilities,
                                postprocessing=postprocessing, output_ending=output_ending, overlays=overlays,
                                progress=progress, log=log, dicom_seg=output_format == "dicom-seg",
                                case_segmenter=case_segmenter)
        if after_cases is not None:
            with waiting_lock(output_dir, purpose="predict: folder summary", name=SUMMARY_LOCK, poll_s=0.2):
                after_cases(report)
        return report


@contextlib.contextmanager
def output_lock(output_dir: Path, *, num_parts: int = 1, part_id: int = 0) -> Iterator[None]:
    """What a prediction holds on its output folder while it writes there.

    A whole-folder run (``num_parts`` 1) holds the folder exclusively. The parts of a split prediction run at
    once: each holds the folder shared (so no whole-folder run starts meanwhile, and none of them starts while
    one runs), its split (``num_parts``) shared and its own part exclusively (the same part twice is refused).
    A part of another split is refused while parts of this one run: the two splits would deal the same cases
    out differently and write some of them twice. What sums up the whole folder is written under a further
    lock, :data:`SUMMARY_LOCK`, taken in turn.

    Raises:
        LockedError: A whole-folder run, the same part, or parts of another split hold the folder.
    """
    if num_parts == 1:
        with folder_lock(output_dir, purpose="predict"):
            yield
        return
    purpose = f"predict part {part_id} of {num_parts}"
    with folder_lock(output_dir, purpose=purpose, shared=True), \
            folder_lock(output_dir, purpose=purpose, name=_split_lock_name(num_parts), shared=True), \
            folder_lock(output_dir, purpose=purpose, name=f".automedseg-part-{part_id}-of-{num_parts}.lock"):
        _refuse_other_splits(Path(output_dir), num_parts)
        yield


PROBE_ATTEMPTS = 5


def _split_lock_name(num_parts: int) -> str:
    return f".automedseg-split-{num_parts}.lock"


def _refuse_other_splits(output_dir: Path, num_parts: int) -> None:
    """Raise when parts of a split other than ``num_parts`` hold ``output_dir`` (their split lock is held)."""
    for path in sorted(output_dir.glob(".automedseg-split-*.lock")):
        other = path.name.removeprefix(".automedseg-split-").removesuffix(".lock")
        if other == str(num_parts):
            continue
        for attempt in range(PROBE_ATTEMPTS):  # a part of this split probing the same file holds it for an instant
            try:
                with folder_lock(output_dir, purpose="predict: probing a split", name=path.name):
                    pass
                break
            except LockedError:
                time.sleep(0.05 * (attempt + 1))
        else:
            raise LockedError(f"{output_dir}: parts of a --num-parts {other} prediction write here; a "
                              f"--num-parts {num_parts} part would deal the cases out differently and write some "
                              f"twice: use --num-parts {other}, or wait for them to finish") from None


def load_fold_groups(fold_groups: Sequence[Sequence[Path]], *, device: str | None = None, engine: str = "torch",
                     warn: Callable[[str], None] = print) -> tuple[list[list[LoadedFold]], torch.device]:
    """Load the folds of an ensemble (one list of fold folders per configuration) for :func:`segment_case`.

    Args:
        fold_groups: As :func:`predict_folder` takes them.
        device: ``cpu``, ``cuda``, ``mps`` or ``None`` for what exists.
        engine: ``torch``, or ``onnxruntime`` (the folds' ONNX graphs; they compute in float32, so pass
            ``amp=False`` to :func:`segment_case`).
        warn: Where a damaged checkpoint that a later one replaces is reported.

    Returns:
        The loaded folds and the device the sliding window accumulates on (the CPU for ONNX Runtime).
    """
    dev = select_device(device)
    loader = load_fold
    if engine == "onnxruntime":
        from automedseg.onnx_engine import load_onnx_fold

        loader = load_onnx_fold
    elif engine != "torch":
        raise InputError(f"--engine {engine}: use torch or onnxruntime")
    groups = [[loader(d, device=dev, warn=warn) for d in group] for group in fold_groups]
    if engine == "onnxruntime":
        dev = torch.device("cpu")  # the sliding window accumulates where ONNX Runtime hands its outputs back
    return groups, dev


def segment_case(groups: Sequence[Sequence[LoadedFold]], image: np.ndarray, geometry: Geometry, *,
                 device: torch.device, step: float = 0.5, mirror: bool = True, amp: bool = True,
                 postprocessing: Postprocess | None = None,
                 source: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Segment one image with an ensemble: what ``automedseg predict`` does to each case before writing it.

    Folds are averaged within a configuration, then configurations; the argmax is mapped to the declared label
    values and ``postprocessing`` applied.

    Args:
        groups: Loaded folds, one list per configuration (:func:`load_fold_groups`).
        image: float32 ``(C, Z, Y, X)`` as :func:`automedseg.io.read_images` reads it (Z = 1 for a 2D image).
        geometry: Its geometry.
        device: Where the sliding window runs.
        step: Tile step as a fraction of the patch.
        mirror: Test-time mirroring over the plan's mirror axes.
        amp: bf16 / fp16 inference where :func:`~automedseg.device.precision_for` allows it.
        postprocessing: Applied to the label map, with ``geometry.spacing_zyx`` (mm).
        source: What the image is (its file), for the messages.

    Returns:
        The label map ``(Z, Y, X)`` of declared label values and the class probabilities ``(K, Z, Y, X)``.

    Raises:
        InputError: A 2D image for a model trained on 3D volumes, or the other way round.
        ValueError: NaN or infinite intensities.
    """
    plans = groups[0][0].plans
    check_case_image(plans, image, geometry, source=source)
    probs = sum(predict_case(g, image, geometry, device=device, step=step, mirror=mirror, amp=amp)
                for g in groups) / len(groups)
    seg = plans.to_values(probs.argmax(0))  # training indices -> declared label values
    if postprocessing is not None:
        seg = postprocessing(seg, geometry.spacing_zyx)
    return seg, probs


def check_case_image(plans: Plans, image: np.ndarray, geometry: Geometry, *, source: str = "image") -> None:
    """Refuse what :func:`segment_case` refuses (see there): a 2D image for a 3D model or the other way round, NaN.

    Raises:
        InputError: A 2D image for a model trained on 3D volumes, or the other way round (names ``source``).
        ValueError: NaN or infinite intensities (names ``source``).
    """
    trained_2d = plans.original_median_shape[0] == 1
    if (geometry.ndim == 2 or geometry.size[-1] == 1) != trained_2d:
        raise InputError(f"{source}: a {'2D image' if not trained_2d else '3D volume'}, but the "
                         f"model was trained on {'2D images' if trained_2d else '3D volumes'}")
    if not np.all(np.isfinite(image)):
        raise ValueError(f"{source}: NaN or infinite intensities")


def check_step(step: float) -> None:
    """Refuse a tile step outside (0, 1]: larger steps leave voxels no tile covers.

    Example:
        >>> check_step(0.5)
        >>> check_step(5)
        Traceback (most recent call last):
        ...
        automedseg.errors.InputError: --step 5: the tile step must be in (0, 1] (a fraction of the patch)
    """
    if not (0 < step <= 1):
        raise InputError(f"--step {step:g}: the tile step must be in (0, 1] (a fraction of the patch)")


def check_output_folder(input_dir: Path, output_dir: Path) -> None:
    """Refuse an output folder that is, contains or lies inside the input folder (inputs are never written).

    Raises:
        InputError: The folders overlap.
    """
    src, dst = Path(input_dir).resolve(), Path(output_dir).resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        how = "is" if src == dst else "lies inside" if src in dst.parents else "contains"
        raise InputError(f"{output_dir}: the output folder {how} the input folder {input_dir}; "
                         "choose a folder outside it (input images are never overwritten)")


def _predict_cases(cases: Sequence[CaseFiles], output_dir: Path, groups: Sequence[Sequence[LoadedFold]], *,
                   plans: Plans, device: torch.device, step: float, mirror: bool, amp: bool, overwrite: bool,
                   save_probabilities: bool, postprocessing: Postprocess | None,
                   output_ending: str | None, overlays: bool, progress: bool, log: Callable[[str], None],
                   dicom_seg: bool = False, case_segmenter: CaseSegmenter | None = None) -> FolderReport:
    import time

    from automedseg.io import atomic_save_npz, file_ending, read_images, write_segmentation

    n_ch = len(plans.channel_names)
    report = FolderReport([], [], {}, 0.0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cases), desc="predict", unit="case", dynamic_ncols=True)
    t0 = time.perf_counter()
    for case in cases:
        series = case.images[0].is_dir()  # a DICOM series: NIfTI masks, or DICOM-SEG
        ending = ".dcm" if dicom_seg else output_ending or (".nii.gz" if series else file_ending(case.images[0]))
        out = output_dir / f"{case.case_id}{ending}"
        try:
            if out.is_file() and not overwrite:
                report.skipped_existing.append(case.case_id)
                continue
            image, geometry = read_images(case, n_channels=n_ch)
            segment = segment_case if case_segmenter is None else case_segmenter(out)
            seg, probs = segment(groups, image, geometry, device=device, step=step, mirror=mirror, amp=amp,
                                 postprocessing=postprocessing, source=str(case.images[0]))
            # The mask is written last: its presence marks a finished case (a kill before it redoes the case).
            if overlays:
                from automedseg.overlays import save_overlay

                save_overlay(image[0], seg, output_dir / "overlays" / f"{case.case_id}.png",
                             label_names={v: n for n, v in plans.labels.items() if v != 0})
            if save_probabilities:  # channel k: training index k, the k-th smallest declared label value
                atomic_save_npz(output_dir / f"{case.case_id}.npz", compressed=True,
                                probabilities=probs.astype(np.float16), label_values=np.asarray(plans.label_values))
            if dicom_seg:
                from automedseg.dicom import write_dicom_seg

                write_dicom_seg(seg, case.images[0], out, labels=plans.labels)
            else:
                write_segmentation(seg, geometry, out)
            report.written.append(case.case_id)
        except (OSError, ValueError, EOFError) as e:
            report.failed[case.case_id] = str(e)
            log(f"{case.images[0]}: skipped: {e}")
        finally:
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    report.seconds_per_case = (time.perf_counter() - t0) / max(1, len(report.written))
    return report
