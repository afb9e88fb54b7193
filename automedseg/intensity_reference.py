"""The intensity reference of a trained model: where histogram matching maps new images to.

The reference is, per channel, the mean landmarks (:data:`~automedseg.intensity_matching.LANDMARK_PERCENTILES` of
the nonzero voxels) of the model's training images. A model made by ``automedseg adapt --match-intensities`` keeps
them in its plan (``ChannelNormalization.landmarks``), so its preprocessing matches every image by itself. For
any other model they are computed once from the raw training images that its preprocessed cache names (at most
:data:`MAX_CASES` of them, evenly spread) and kept in ``<work>/intensity_reference.json``, which this module
owns (:class:`IntensityReference`, :func:`read_reference`, :func:`write_reference`).

``automedseg predict --match-intensities`` wraps the case segmenter with :func:`matching_segmenter`, which
matches each raw image before the plan's preprocessing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from automedseg.artifacts import read_artifact, write_artifact
from automedseg.errors import InputError
from automedseg.intensity_matching import LANDMARK_PERCENTILES, landmarks, match_image, mean_landmarks
from automedseg.plans import ConfigurationPlan, Plans
from automedseg.workspace import Workspace

if TYPE_CHECKING:
    from automedseg.inference import CaseSegmenter

REFERENCE_FILE = "intensity_reference.json"
MAX_CASES = 50
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class IntensityReference:
    """``intensity_reference.json``: the landmarks new images are matched to.

    Attributes:
        percentiles: The landmark percentiles (:data:`~automedseg.intensity_matching.LANDMARK_PERCENTILES`).
        landmarks: Per channel, the mean of the training images' landmarks at ``percentiles``.
        cases: How many training images they were taken from.
        foreground: Which voxels count: ``nonzero``.
    """

    percentiles: tuple[float, ...]
    landmarks: tuple[tuple[float, ...], ...]
    cases: int
    foreground: str = "nonzero"

    def __post_init__(self) -> None:
        if any(len(c) != len(self.percentiles) for c in self.landmarks):
            raise InputError(f"landmarks: {len(self.percentiles)} per channel expected (one per percentile)")


def reference_path(ws: Workspace) -> Path:
    """``<work>/intensity_reference.json``."""
    return ws.root / REFERENCE_FILE


def read_reference(path: Path) -> IntensityReference:
    """Read ``intensity_reference.json`` (an ``InputError`` names the file and the field when it is malformed)."""
    return read_artifact(IntensityReference, path)


def write_reference(path: Path, reference: IntensityReference) -> None:
    """Write ``intensity_reference.json`` atomically."""
    write_artifact(path, reference)


def reference_of_images(images: Sequence[np.ndarray], *,
                        percentiles: Sequence[float] = LANDMARK_PERCENTILES) -> IntensityReference:
    """The reference of ``(C, ...)`` images: per channel the mean of their landmarks.

    Example:
        >>> a = np.array([[0.0, 1.0, 2.0, 3.0]]); b = np.array([[0.0, 3.0, 4.0, 5.0]])
        >>> reference_of_images([a, b], percentiles=(0.0, 100.0)).landmarks
        ((2.0, 4.0),)
    """
    if not images:
        raise InputError("no images to take intensity landmarks from")
    n_ch = images[0].shape[0]
    per_channel = tuple(tuple(float(v) for v in mean_landmarks(
        landmarks(image[c], percentiles=percentiles) for image in images)) for c in range(n_ch))
    return IntensityReference(tuple(float(p) for p in percentiles), per_channel, len(images))


def plan_landmarks(config: ConfigurationPlan) -> tuple[tuple[float, ...], ...] | None:
    """The landmarks a configuration's preprocessing matches every image to (``None``: it matches none)."""
    marks = [n.landmarks for n in config.normalization]
    return None if any(m is None for m in marks) else tuple(tuple(m) for m in marks if m is not None)


def with_landmarks(config: ConfigurationPlan, reference: IntensityReference) -> ConfigurationPlan:
    """``config`` whose preprocessing first matches every image's channels to ``reference``."""
    if len(reference.landmarks) != len(config.normalization):
        raise InputError(f"the intensity reference has {len(reference.landmarks)} channel(s), configuration "
                         f"{config.name} normalises {len(config.normalization)}")
    if tuple(reference.percentiles) != LANDMARK_PERCENTILES:
        raise InputError(f"the intensity reference's percentiles {list(reference.percentiles)} are not "
                         f"{list(LANDMARK_PERCENTILES)}")
    norms = tuple(dataclasses.replace(n, landmarks=tuple(m)) for n, m in zip(config.normalization,
                                                                            reference.landmarks))
    return dataclasses.replace(config, normalization=norms)


def _training_image_files(ws: Workspace, plans: Plans) -> list[tuple[str, tuple[str, ...]]]:
    """(case, raw image files) of the training cases a preprocessed cache of ``ws`` names."""
    from automedseg.preprocessing import CACHE_MANIFEST, read_case_meta

    for config in plans.configurations.values():
        folder = ws.preprocessed_dir(config.data_identifier)
        metas = sorted(folder.glob("*.json")) if folder.is_dir() else []
        out = []
        for path in metas:
            if path.name.startswith(".") or path.name == CACHE_MANIFEST:
                continue
            meta = read_case_meta(folder, path.stem)
            if meta.image_files:
                out.append((path.stem, meta.image_files))
        if out:
            return out
    return []


def workspace_reference(ws: Workspace, *, log: Log = _quiet) -> IntensityReference:
    """The reference of a work folder's training images: ``intensity_reference.json``, else computed and saved.

    Computed from at most :data:`MAX_CASES` raw training images (evenly spread over the cases) that the
    preprocessed cache names; saved when the folder is writable.

    Raises:
        InputError: No ``intensity_reference.json`` and no raw training images to compute it from (a model
            bundle, a moved dataset), or a malformed file.
    """
    path = reference_path(ws)
    if path.is_file():
        reference = read_reference(path)
        if tuple(reference.percentiles) == LANDMARK_PERCENTILES:
            return reference
    from automedseg.case_files import CaseFiles
    from automedseg.images import read_images

    plans = Plans.load(ws.plans_path) if ws.plans_path.is_file() else None
    files = _training_image_files(ws, plans) if plans is not None else []
    missing = [f for _, fs in files for f in fs if not Path(f).exists()]
    if not files or missing:
        why = f"{missing[0]} is gone" if missing else "it has no preprocessed cache naming them"
        raise InputError(f"{path}: missing, and the training images to compute it from cannot be read ({why}); "
                         "intensity matching needs the training images' landmarks: use the work folder the model "
                         "was trained in, or a model made with `automedseg adapt --match-intensities`")
    assert plans is not None
    picks = np.unique(np.linspace(0, len(files) - 1, min(MAX_CASES, len(files))).round().astype(int))
    images = [read_images(CaseFiles(files[i][0], tuple(Path(f) for f in files[i][1])),
                          n_channels=len(plans.channel_names))[0] for i in picks]
    reference = reference_of_images(images)
    try:
        write_reference(path, reference)
        log(f"intensity reference from {len(images)} training image(s): {path}")
    except OSError as e:
        log(f"intensity reference from {len(images)} training image(s) (not saved: {e})")
    return reference


def model_reference(ws: Workspace, config: ConfigurationPlan, *, log: Log = _quiet) -> IntensityReference:
    """What images for a configuration of ``ws`` are matched to: its plan's landmarks, else its training images'."""
    marks = plan_landmarks(config)
    if marks is not None:
        return IntensityReference(LANDMARK_PERCENTILES, marks, 0)
    return workspace_reference(ws, log=log)


def matching_segmenter(ws: Workspace, configurations: Sequence[str], inner: CaseSegmenter | None, *,
                       log: Log = _quiet) -> CaseSegmenter | None:
    """``inner`` (``None``: :func:`~automedseg.inference.segment_case`) given raw images matched to the reference.

    Configurations whose plan matches by itself (an ``adapt --match-intensities`` model) need nothing: ``inner`` is
    returned as it is.
    """
    plans = Plans.load(ws.plans_path) if ws.plans_path.is_file() else None
    configs = [plans.configurations[c] for c in configurations if c in plans.configurations] if plans else []
    if configs and all(plan_landmarks(c) is not None for c in configs):
        log("intensities: the plan matches them to its training landmarks already")
        return inner
    reference = workspace_reference(ws, log=log)
    log(f"intensities matched to the training images' landmarks ({reference.cases} images, percentiles "
        f"{', '.join(f'{p:g}' for p in reference.percentiles)})")

    def segmenter(out: Path) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
        if inner is None:
            from automedseg.inference import segment_case

            segment: Callable[..., Any] = segment_case
        else:
            segment = inner(out)

        def matched(groups: Any, image: np.ndarray, geometry: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
            return segment(groups, match_image(image, reference=reference.landmarks,
                                               percentiles=reference.percentiles), geometry, **kwargs)

        return matched

    return segmenter
