"""A trained model held in memory that segments NumPy arrays and SimpleITK images: :class:`Predictor`.

:func:`automedseg.load_model` makes one from a work folder or a model bundle. It runs exactly what
``automedseg predict`` runs on each case (:func:`automedseg.inference.segment_case`: the folds of each configuration
averaged, then the configurations of an ensemble, the declared label values, the post-processing chosen on
cross-validation), so a mask it returns equals the file ``predict`` writes for the same image.

Array conventions: NumPy arrays are in array order, ``(Z, Y, X)`` for a volume and ``(Y, X)`` for a 2D image, with
the channels first, ``(C, Z, Y, X)`` or ``(C, Y, X)``, for a model of several channels; ``spacing_mm`` is in the
same order. A SimpleITK image carries its own geometry, and its mask comes back with exactly that geometry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, overload

import numpy as np

from automedseg.errors import InputError
from automedseg.geometry import Geometry

if TYPE_CHECKING:
    import SimpleITK as sitk
    import torch

    from automedseg.inference import Postprocess
    from automedseg.loaded_fold import LoadedFold
    from automedseg.plans import Plans
    from automedseg.workspace import Workspace

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


class Predictor:
    """Trained folds in memory, ensembled and post-processed as ``automedseg predict`` does.

    Made by :func:`automedseg.load_model` (or :func:`load_predictor` from a work folder); not constructed directly.

    Attributes:
        configuration: The configuration, or ``+``-joined ensemble, it predicts with.
        fold_dirs: The fold folders loaded, one list per member configuration (for a bundle: where they were).
        postprocessing: The post-processing operations applied to every mask (empty: none).
        device: Where the network runs (``cpu``, ``cuda``, ``mps``).
    """

    def __init__(self, groups: Sequence[Sequence[LoadedFold]], *, device: torch.device, configuration: str,
                 fold_dirs: Sequence[Sequence[Path]], postprocessing: Postprocess | None = None,
                 postprocessing_operations: Sequence[str] = (), amp: bool = True) -> None:
        self._groups = [list(g) for g in groups]
        self._device = device
        self._post = postprocessing
        self._amp = amp
        self.configuration = configuration
        self.fold_dirs = [list(g) for g in fold_dirs]
        self.postprocessing = tuple(postprocessing_operations)
        self.device = str(device)

    @property
    def plans(self) -> Plans:
        """The plan the (first) configuration was trained with."""
        return self._groups[0][0].plans

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> the value the masks hold for it (background 0 included)."""
        return dict(self.plans.labels)

    @property
    def channel_names(self) -> tuple[str, ...]:
        """The input channels the model takes, in order."""
        return tuple(self.plans.channel_names)

    def __repr__(self) -> str:
        folds = "; ".join(f"{g[0].parent.name} {', '.join(d.name for d in g)}" for g in self.fold_dirs)
        return f"Predictor({self.configuration!r}: {folds}; labels {self.labels}; device {self.device!r})"

    @overload
    def predict(self, image: np.ndarray, *, spacing_mm: Sequence[float] | None = None, step: float = 0.5,
                mirror: bool = True, amp: bool = True) -> np.ndarray: ...

    @overload
    def predict(self, image: sitk.Image, *, spacing_mm: None = None, step: float = 0.5, mirror: bool = True,
                amp: bool = True) -> sitk.Image: ...

    @overload
    def predict(self, image: np.ndarray | sitk.Image, *, spacing_mm: Sequence[float] | None = None,
                step: float = 0.5, mirror: bool = True, amp: bool = True) -> np.ndarray | sitk.Image: ...

    def predict(self, image: np.ndarray | sitk.Image, *, spacing_mm: Sequence[float] | None = None,
                step: float = 0.5, mirror: bool = True, amp: bool = True) -> np.ndarray | sitk.Image:
        """Segment one image in memory.

        Args:
            image: A NumPy array ``(Z, Y, X)`` or ``(Y, X)`` (channels first, ``(C, Z, Y, X)`` or ``(C, Y, X)``,
                for a model of several channels; a one-channel model also takes ``(1, Z, Y, X)``), or a SimpleITK
                image (a vector image or a 4D image holds the channels).
            spacing_mm: The array's voxel spacing in array order, ``(z, y, x)`` or ``(y, x)``; default 1 mm. Not
                for a SimpleITK image, which carries its own.
            step: Tile step as a fraction of the patch, in (0, 1] (``predict --step``).
            mirror: Test-time mirroring over the plan's mirror axes (``predict --no-mirror`` turns it off).
            amp: bf16 / fp16 inference where the device computes in it natively (``predict --no-amp``).

        Returns:
            For an array: the label map with the image's spatial shape, holding the declared label values. For a
            SimpleITK image: the label map as a SimpleITK image with exactly the input's size, spacing, origin and
            direction (``uint8`` for values under 256, as ``automedseg predict`` writes masks).

        Raises:
            InputError: A shape or channel count the model does not take, a bad spacing or step, a 2D image for a
                model trained on 3D volumes (or the other way round).
            ValueError: NaN or infinite intensities.
        """
        from automedseg.inference import check_step

        check_step(step)
        if isinstance(image, np.ndarray):
            array, geometry = self._from_array(image, spacing_mm)
            seg = self._segment(array, geometry, step=step, mirror=mirror, amp=amp, source="image")
            return seg[0] if geometry.ndim == 2 else seg
        import SimpleITK as sitk

        if not isinstance(image, sitk.Image):
            raise InputError(f"image: a NumPy array or a SimpleITK image, not {type(image).__name__}")
        if spacing_mm is not None:
            raise InputError("spacing_mm: a SimpleITK image carries its own spacing; pass it only with an array")
        from automedseg.images import array_to_image, image_to_array

        array, geometry = image_to_array(image)
        self._check_channels(array.shape[0], "image")
        seg = self._segment(array.astype(np.float32, copy=False), geometry, step=step, mirror=mirror, amp=amp,
                            source="image")
        top = int(seg.max(initial=0))
        return array_to_image(seg.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32), geometry)

    def predict_folder(self, input_dir: str | Path, *, step: float = 0.5, mirror: bool = True,
                       amp: bool = True) -> dict[str, np.ndarray]:
        """Segment every case of a folder of images in memory (nothing is written).

        Args:
            input_dir: Images as ``automedseg predict -i`` takes them (nnU-Net ``_0000`` files, one (4D) file per
                case, or DICOM series one per subfolder).
            step: As :meth:`predict`.
            mirror: As :meth:`predict`.
            amp: As :meth:`predict`.

        Returns:
            Case name -> label map in array order (``(Z, Y, X)``, or ``(Y, X)`` for a 2D image).

        Raises:
            DatasetError: The folder holds no images.
            ValueError: A case cannot be read or segmented (the message names its file); nothing is skipped.
        """
        from automedseg.inference import check_step
        from automedseg.io import discover_images, read_images

        check_step(step)
        out = {}
        for case in discover_images(Path(input_dir), n_channels=len(self.channel_names)):
            array, geometry = read_images(case, n_channels=len(self.channel_names))
            seg = self._segment(array, geometry, step=step, mirror=mirror, amp=amp, source=str(case.images[0]))
            out[case.case_id] = seg[0] if geometry.ndim == 2 else seg
        return out

    def _segment(self, array: np.ndarray, geometry: Geometry, *, step: float, mirror: bool, amp: bool,
                 source: str) -> np.ndarray:
        from automedseg.inference import segment_case

        seg, _ = segment_case(self._groups, array, geometry, device=self._device, step=step, mirror=mirror,
                              amp=amp and self._amp, postprocessing=self._post, source=source)
        return seg

    def _check_channels(self, n: int, source: str) -> None:
        want = len(self.channel_names)
        if n != want:
            raise InputError(f"{source}: has {n} channel(s), the model takes {want} ({', '.join(self.channel_names)})")

    def _from_array(self, image: np.ndarray, spacing_mm: Sequence[float] | None) -> tuple[np.ndarray, Geometry]:
        """``(C, Z, Y, X)`` float32 and a geometry at the origin, axis-aligned, with ``spacing_mm``."""
        want = len(self.channel_names)
        a = np.asarray(image)
        shapes = "(Z, Y, X) or (Y, X)" if want == 1 else f"({want}, Z, Y, X) or ({want}, Y, X), channels first"
        if want == 1 and a.ndim in (2, 3):
            a = a[None]
        elif not (a.ndim in (3, 4) and (want > 1 or a.ndim == 4)) or a.shape[0] != want:
            raise InputError(f"image: shape {a.shape}; the model takes {shapes} ({', '.join(self.channel_names)})")
        spatial = tuple(int(s) for s in a.shape[1:])
        spacing = spacing_of(spacing_mm, len(spatial))
        n = len(spatial)
        geometry = Geometry(size=spatial[::-1], spacing=spacing[::-1], origin=(0.0,) * n,
                            direction=tuple(float(i == j) for i in range(n) for j in range(n)), n_components=want)
        a = a.astype(np.float32, copy=False)
        return (a[:, None] if n == 2 else a), geometry


def spacing_of(spacing_mm: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """A voxel spacing for an array of ``ndim`` spatial axes: ``spacing_mm`` checked, or 1 mm per axis.

    Example:
        >>> spacing_of(None, 3), spacing_of((3, 0.8, 0.8), 3)
        ((1.0, 1.0, 1.0), (3.0, 0.8, 0.8))
        >>> spacing_of((1.0,), 2)
        Traceback (most recent call last):
        ...
        automedseg.errors.InputError: spacing_mm (1.0,): give 2 positive numbers, one per spatial axis in array order
    """
    if spacing_mm is None:
        return (1.0,) * ndim
    try:
        values = tuple(float(v) for v in spacing_mm)
    except (TypeError, ValueError):
        values = ()
    if len(values) != ndim or not all(0 < v < float("inf") for v in values):
        raise InputError(f"spacing_mm {tuple(spacing_mm) if isinstance(spacing_mm, Sequence) else spacing_mm!r}: "
                         f"give {ndim} positive numbers, one per spatial axis in array order")
    return values


def load_predictor(ws: Workspace, *, configuration: str | None = None, folds: Sequence[int | str] | None = None,
                   device: str | None = None, postprocess: bool = True, engine: str = "torch",
                   threads: int | None = None, check_bundle: bool = True, log: Log = _quiet) -> Predictor:
    """Load the trained folds of a work folder (or an imported model folder) as ``automedseg predict -d`` would.

    Args:
        ws: The work folder.
        configuration: A configuration or ``+``-joined ensemble; ``None``: the imported model's, else
            ``find_best.json``'s choice.
        folds: Folds to ensemble (``None``: every trained fold).
        device: ``cpu``, ``cuda``, ``mps`` or ``None`` for what exists.
        postprocess: Apply the post-processing chosen on cross-validation when there is one.
        engine: ``torch``, or ``onnxruntime`` (the folds' ONNX graphs from ``automedseg export --onnx``).
        threads: Torch CPU threads (``None``: leave as is).
        check_bundle: Check an imported model's files against its manifest first.
        log: Where notes go (the post-processing used, a damaged checkpoint replaced by another).

    Raises:
        InputError: As :func:`automedseg.prediction.choose_model`.
        FileNotFoundError: A configuration or fold without a trained checkpoint.
    """
    from automedseg.inference import load_fold_groups
    from automedseg.prediction import choose_model

    choice = choose_model(ws, configuration=configuration, folds=folds, postprocess=postprocess,
                          check_bundle=check_bundle, threads=threads, log=log)
    groups, dev = load_fold_groups(choice.fold_groups, device=device, engine=engine, warn=log)
    return Predictor(groups, device=dev, configuration=choice.configuration, fold_dirs=choice.fold_groups,
                     postprocessing=choice.postprocessing, postprocessing_operations=choice.postprocessing_operations,
                     amp=engine == "torch")
