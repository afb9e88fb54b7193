"""Per-voxel uncertainty of an ensemble's prediction (``automedseg predict --uncertainty``), and which cases to check.

For every case ``predict --uncertainty`` writes, besides the mask and before it, into ``OUTPUT/uncertainty/``:

* ``<case>_entropy<ending>``: the Shannon entropy of the ensemble's mean class probabilities divided by
  ``log K`` (K classes, background included): 0 where the ensemble puts all its probability on one class, 1
  where it spreads it evenly over all (:func:`normalized_entropy`);
* ``<case>_disagreement<ending>``: the fraction of the ensemble's members (every fold of every configuration)
  whose own argmax differs from the ensemble's argmax (the mask before post-processing): 0 where all agree, at
  most ``1 - 1/M`` when M members split evenly; 0 everywhere with a single member (:func:`fold_disagreement`);
* ``<case>.json``: the case's means (:class:`CaseUncertainty`).

Both maps are float32 images with exactly the input's size, spacing, origin and direction, written as the masks
are (:func:`automedseg.io.write_array`), in the mask's format where it holds float32 (NIfTI, NRRD, MetaImage,
TIFF), else as TIFF (PNG, JPEG and BMP inputs) or NIfTI (DICOM series) (:func:`map_ending`). The ensemble's
probabilities and mask are exactly those of ``predict`` without ``--uncertainty``; the members' argmaxes cost one
extra resampling of each member's probabilities to the input grid.

After the cases, ``OUTPUT/uncertainty_summary.json`` (:class:`UncertaintySummary`, :func:`write_uncertainty_summary`,
read with :func:`read_uncertainty_summary`) lists every case's record, the least certain first: by the mean
entropy within the predicted foreground (the mask as written, post-processed), then the mean disagreement there;
cases with no foreground predicted come last. ``automedseg report --predictions OUTPUT`` shows that list.

Several ``--num-parts`` runs may predict into one output folder. The summary is one file that each of them
rebuilds from what the folder holds, not from what the run did: the records of every case in ``uncertainty/``
(each written atomically by the part that predicted it), plus the kept cases without maps of the summary
before and of this run. It is written atomically while the run still holds the output folder's lock (the
``after_cases`` hook of :func:`automedseg.inference.predict_folder`; a part started while another holds the folder
is refused), so no two parts write it at once, the last one to finish leaves a summary of every part's cases, and
an earlier part's summary can never overwrite a later one's.

Example:
    >>> probs = np.array([[0.5, 1.0, 0.9], [0.5, 0.0, 0.1]], np.float32)
    >>> normalized_entropy(probs).astype(float).round(3).tolist()
    [1.0, 0.0, 0.469]
    >>> fold_disagreement([np.array([0, 0, 1]), np.array([1, 0, 1])], np.array([0, 0, 0])).tolist()
    [0.5, 0.0, 1.0]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from automedseg.artifacts import read_artifact, write_artifact
from automedseg.atomic import remove_stale_temp_files
from automedseg.errors import InputError

if TYPE_CHECKING:  # the computing functions import inference (torch) when called: reading summaries stays light
    import torch

    from automedseg.geometry import Geometry
    from automedseg.loaded_fold import LoadedFold

UNCERTAINTY_DIR = "uncertainty"
"""The folder of the maps and per-case records, inside predict's output folder."""

SUMMARY_FILE = "uncertainty_summary.json"
"""The summary of every case, in predict's output folder."""

FLOAT_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".tif", ".tiff")
"""Mask endings whose format holds float32 maps; the maps of other masks are TIFF (2D) or NIfTI (3D)."""


@dataclass(frozen=True, kw_only=True)
class CaseUncertainty:
    """How uncertain the prediction of one case is (``uncertainty/<case>.json``).

    Attributes:
        case: The case name.
        members: Members of the ensemble (folds of every configuration).
        foreground_voxels: Voxels of the mask as written (post-processed) other than background.
        mean_entropy_foreground: Mean normalised entropy over those voxels (``None``: no foreground).
        mean_disagreement_foreground: Mean fold disagreement over them (``None``: no foreground).
        mean_entropy: Mean normalised entropy over the whole image.
        mean_disagreement: Mean fold disagreement over the whole image.
        entropy_map: File name of the entropy map, in ``uncertainty/``.
        disagreement_map: File name of the disagreement map, in ``uncertainty/``.
    """

    case: str
    members: int
    foreground_voxels: int
    mean_entropy_foreground: float | None
    mean_disagreement_foreground: float | None
    mean_entropy: float
    mean_disagreement: float
    entropy_map: str
    disagreement_map: str


@dataclass(frozen=True, kw_only=True)
class UncertaintySummary:
    """``uncertainty_summary.json``: every case's :class:`CaseUncertainty`, the least certain first.

    Attributes:
        cases: The records, least certain first (:func:`least_certain_first`).
        without_maps: Cases predicted earlier without ``--uncertainty`` whose masks were kept (no record).
    """

    cases: tuple[CaseUncertainty, ...]
    without_maps: tuple[str, ...] = ()

    def describe(self, *, top: int = 3) -> str:
        """One line: how many cases, the least certain ones, the cases without maps.

        Example:
            >>> UncertaintySummary(cases=(), without_maps=("a",)).describe()
            'uncertainty of 0 case(s); 1 kept without maps (predict them again with --overwrite --uncertainty)'
        """
        text = f"uncertainty of {len(self.cases)} case(s)"
        if self.cases:
            text += "; least certain first: " + ", ".join(
                f"{c.case} ({_fmt(c.mean_entropy_foreground)})" for c in self.cases[:top])
        if self.without_maps:
            text += (f"; {len(self.without_maps)} kept without maps (predict them again with --overwrite "
                     "--uncertainty)")
        return text


def normalized_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy over axis 0 divided by ``log K``, float32 in ``[0, 1]`` (``K`` = ``probabilities.shape[0]``).

    Example:
        >>> normalized_entropy(np.array([[0.25], [0.25], [0.5]])).astype(float).round(4).tolist()
        [0.9464]
    """
    p = np.asarray(probabilities)
    k = p.shape[0]
    if k < 2:
        raise ValueError(f"entropy of {k} class(es): need at least 2")
    h = np.zeros(p.shape[1:], dtype=np.float64)
    for c in range(k):
        pc = np.asarray(p[c], dtype=np.float64)
        positive = pc > 0
        h -= np.where(positive, pc * np.log(np.where(positive, pc, 1.0)), 0.0)
    return np.clip(h / np.log(k), 0.0, 1.0).astype(np.float32)


def fold_disagreement(member_argmax: Sequence[np.ndarray], ensemble_argmax: np.ndarray) -> np.ndarray:
    """Fraction of the members whose argmax differs from the ensemble's, per voxel, float32.

    Example:
        >>> fold_disagreement([np.array([2, 1])], np.array([2, 2])).tolist()
        [0.0, 1.0]
    """
    if not member_argmax:
        raise ValueError("fold_disagreement needs at least one member")
    differ = np.zeros(np.shape(ensemble_argmax), dtype=np.int32)
    for m in member_argmax:
        differ += np.asarray(m) != ensemble_argmax
    return (differ / len(member_argmax)).astype(np.float32)


def ensemble_probabilities(groups: Sequence[Sequence[LoadedFold]], image: np.ndarray, geometry: Geometry, *,
                           device: torch.device, step: float = 0.5, mirror: bool = True,
                           amp: bool = True) -> tuple[np.ndarray, list[np.ndarray]]:
    """The ensemble's class probabilities on the input grid and each member's argmax there.

    The probabilities are computed as :func:`automedseg.inference.segment_case` computes them (the same
    operations in the same order, so the same numbers): each configuration's folds averaged in preprocessed
    space and restored to the input grid, then the configurations averaged. Each member's own probabilities are
    restored too, for its argmax.

    Args:
        groups: Loaded folds, one list per configuration.
        image: float32 ``(C, Z, Y, X)``.
        geometry: Its geometry.
        device: Where the sliding window runs.
        step: Tile step as a fraction of the patch.
        mirror: Test-time mirroring.
        amp: bf16 / fp16 inference where allowed.

    Returns:
        float32 ``(K, Z, Y, X)`` probabilities and one training-index map ``(Z, Y, X)`` per member.
    """
    from automedseg.inference import predict_probabilities_preprocessed
    from automedseg.preprocessing import preprocess_image, restore_probabilities

    total: np.ndarray | int = 0
    members: list[np.ndarray] = []
    for group in groups:
        plans, config = group[0].plans, group[0].config
        data, _, props = preprocess_image(image, geometry, plans, config)
        summed = None
        for fold in group:
            p = predict_probabilities_preprocessed([fold], data, device=device, step=step, mirror=mirror, amp=amp)
            summed = p if summed is None else summed + p
            index = restore_probabilities(p, props, plans, config).argmax(0)
            members.append(index.astype(np.uint8 if plans.num_classes <= 256 else np.uint16))
        assert summed is not None
        total = total + restore_probabilities(summed / len(group), props, plans, config)
    assert isinstance(total, np.ndarray)
    return total / len(groups), members


def map_ending(mask_ending: str, *, two_d: bool) -> str:
    """The file ending of the float32 maps of a mask with ``mask_ending``.

    Example:
        >>> map_ending(".nii.gz", two_d=False), map_ending(".png", two_d=True), map_ending(".dcm", two_d=False)
        ('.nii.gz', '.tif', '.nii.gz')
    """
    ending = mask_ending.lower()
    if ending in FLOAT_ENDINGS:
        return ending
    return ".tif" if two_d else ".nii.gz"


def case_uncertainty(case: str, *, entropy: np.ndarray, disagreement: np.ndarray, segmentation: np.ndarray,
                     members: int, entropy_map: str = "", disagreement_map: str = "") -> CaseUncertainty:
    """The record of one case from its maps and its mask (nonzero: foreground).

    Example:
        >>> r = case_uncertainty("a", entropy=np.array([0.5, 0.1]), disagreement=np.array([0.0, 0.0]),
        ...                      segmentation=np.array([1, 0]), members=2)
        >>> r.mean_entropy_foreground, r.mean_entropy, r.foreground_voxels
        (0.5, 0.3, 1)
    """
    fg = np.asarray(segmentation) != 0
    n = int(fg.sum())
    return CaseUncertainty(
        case=case, members=int(members), foreground_voxels=n,
        mean_entropy_foreground=float(np.mean(entropy[fg], dtype=np.float64)) if n else None,
        mean_disagreement_foreground=float(np.mean(disagreement[fg], dtype=np.float64)) if n else None,
        mean_entropy=float(np.mean(entropy, dtype=np.float64)),
        mean_disagreement=float(np.mean(disagreement, dtype=np.float64)),
        entropy_map=entropy_map, disagreement_map=disagreement_map)


def segment_case_with_uncertainty(groups: Sequence[Sequence[LoadedFold]], image: np.ndarray, geometry: Geometry, *,
                                  out: Path, device: torch.device, step: float = 0.5, mirror: bool = True,
                                  amp: bool = True,
                                  postprocessing: Callable[[np.ndarray, tuple[float, ...]], np.ndarray] | None = None,
                                  source: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """:func:`automedseg.inference.segment_case`, also writing the case's maps and record (module note).

    Args:
        out: The path the mask will be written to (``OUTPUT/<case><ending>``): names the case, the folder and the
            format of the maps.
        Others: as :func:`automedseg.inference.segment_case`.

    Returns:
        The label map (declared values, post-processed) and the ensemble's class probabilities.

    Raises:
        InputError: A 2D image for a 3D model or the other way round.
        ValueError: NaN or infinite intensities.
    """
    from automedseg.inference import check_case_image
    from automedseg.io import file_ending, write_array

    plans = groups[0][0].plans
    check_case_image(plans, image, geometry, source=source)
    probs, members = ensemble_probabilities(groups, image, geometry, device=device, step=step, mirror=mirror,
                                            amp=amp)
    index = probs.argmax(0)
    seg = plans.to_values(index)
    if postprocessing is not None:
        seg = postprocessing(seg, geometry.spacing_zyx)
    entropy = normalized_entropy(probs)
    disagreement = fold_disagreement(members, index)
    out = Path(out)
    mask_ending = file_ending(out)
    case = out.name[: len(out.name) - len(mask_ending)]
    folder = out.parent / UNCERTAINTY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    ending = map_ending(mask_ending, two_d=geometry.ndim == 2)
    names = (f"{case}_entropy{ending}", f"{case}_disagreement{ending}")
    write_array(entropy, geometry, folder / names[0])
    write_array(disagreement, geometry, folder / names[1])
    write_artifact(folder / f"{case}.json", case_uncertainty(
        case, entropy=entropy, disagreement=disagreement, segmentation=seg, members=len(members),
        entropy_map=names[0], disagreement_map=names[1]))
    return seg, probs


def uncertainty_segmenter(out: Path) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """:func:`segment_case_with_uncertainty` for the mask ``out``: the ``case_segmenter`` of
    :func:`automedseg.inference.predict_folder`.

    Example:
        >>> uncertainty_segmenter(Path("out/case_001.nii.gz")).keywords
        {'out': PosixPath('out/case_001.nii.gz')}
    """
    return functools.partial(segment_case_with_uncertainty, out=Path(out))


def least_certain_first(records: Sequence[CaseUncertainty]) -> list[CaseUncertainty]:
    """Records by mean foreground entropy, then foreground disagreement, highest first; no foreground last.

    Example:
        >>> rs = [case_uncertainty(c, entropy=np.array([e]), disagreement=np.array([0.0]),
        ...                        segmentation=np.array([s]), members=1) for c, e, s in
        ...       [("a", 0.1, 1), ("b", 0.9, 0), ("c", 0.4, 1)]]
        >>> [r.case for r in least_certain_first(rs)]
        ['c', 'a', 'b']
    """
    return sorted(records, key=lambda r: (r.mean_entropy_foreground is None, -(r.mean_entropy_foreground or 0.0),
                                          -(r.mean_disagreement_foreground or 0.0), r.case))


def write_uncertainty_summary(output_dir: Path, *, cases: Sequence[str] = ()) -> UncertaintySummary:
    """Collect every record in ``output_dir/uncertainty/`` into ``output_dir/uncertainty_summary.json``, atomically.

    Every record there counts (so the summary covers cases predicted by earlier runs or other ``--part-id``
    parts too), and the cases the summary there lists as kept without maps stay listed until they get a record:
    parts merge, they do not overwrite each other. Call it while holding the output folder's lock (predict does,
    through :func:`automedseg.inference.predict_folder`'s ``after_cases``), so no other part writes the summary
    at the same time; a damaged earlier summary is replaced (only its list of cases without maps is lost).

    Args:
        output_dir: Predict's output folder.
        cases: The cases this run wrote or kept; those without a record are listed under ``without_maps``.

    Returns:
        The summary written.

    Raises:
        InputError: A record is damaged (names the file).

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp())
        >>> write_artifact(out / UNCERTAINTY_DIR / "a.json", case_uncertainty(
        ...     "a", entropy=np.array([0.5]), disagreement=np.array([0.0]), segmentation=np.array([1]), members=2))
        >>> write_uncertainty_summary(out, cases=["a", "x"]).without_maps  # part 0
        ('x',)
        >>> s = write_uncertainty_summary(out, cases=["y"])  # part 1: part 0's cases stay
        >>> [c.case for c in s.cases], s.without_maps
        (['a'], ('x', 'y'))
    """
    output_dir = Path(output_dir)
    folder = output_dir / UNCERTAINTY_DIR
    records = []
    if folder.is_dir():
        remove_stale_temp_files(folder)
        records = [read_artifact(CaseUncertainty, p) for p in sorted(folder.glob("*.json"))]
    have = {r.case for r in records}
    before: tuple[str, ...] = ()
    if (output_dir / SUMMARY_FILE).is_file():
        try:
            before = read_uncertainty_summary(output_dir).without_maps
        except InputError:
            pass  # rebuilt from the records below; only the earlier runs' cases without maps are not listed
    without = [c for c in dict.fromkeys([*before, *cases]) if c not in have]
    summary = UncertaintySummary(cases=tuple(least_certain_first(records)), without_maps=tuple(without))
    write_artifact(output_dir / SUMMARY_FILE, summary)
    return summary


def read_uncertainty_summary(path: Path) -> UncertaintySummary:
    """Read ``uncertainty_summary.json`` (a file, or predict's output folder holding it).

    Raises:
        InputError: The file is missing, not JSON, or a field is wrong (the message names the file).
    """
    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY_FILE
    if not path.is_file():
        raise InputError(f"{path}: missing (automedseg predict --uncertainty writes it)")
    return read_artifact(UncertaintySummary, path)


def _fmt(value: float | None) -> str:
    return "no foreground" if value is None else f"entropy {value:.3f}"
