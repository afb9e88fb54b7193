"""Plans: the frozen, versioned, JSON-only description of how a dataset is trained.

A plan is derived by :mod:`automedseg.planning` from a fingerprint and read by every later stage
(preprocessing, training, inference). It holds only JSON types, so a person can read and edit
``plans.json``; loading validates every field and names the one that is wrong.

Axis conventions: every spatial tuple is in *array order* (z, y, x) of the image after the plan's
``transpose_forward`` was applied. 2D data is stored as 3D arrays with a z size of 1.

Example:
    >>> plans = Plans.from_json(Plans.to_json(plans))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from automedseg.device_profile import (  # noqa: F401  (re-exported)
    WORKER_PLACEMENTS,
    CalibrationProvenance,
    DeviceProfile,
    StepShapeCost,
)
from automedseg.intensity_matching import LANDMARK_PERCENTILES
from automedseg.labelmap import index_dtype, indices_to_values, label_values, value_dtype, values_to_indices  # noqa: F401
from automedseg.serialize import PlanError, from_jsonable, to_jsonable  # noqa: F401  (re-exported)

SCHEMA_VERSION = 1

NORMALIZATION_SCHEMES = ("ct", "zscore", "rgb_to_01", "none")
#: Network families (:mod:`automedseg.network`): the two rule-planned U-Nets, then the variants that
#: ``automedseg plan --architecture`` adds as configurations of their own.
ARCHITECTURES = ("plain_unet", "residual_unet", "attention_unet", "aspp_unet", "segnet_unet")
NORMS = ("instance", "batch", "group")
OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("bf16", "fp16", "fp32")
CLASS_SAMPLING = ("uniform", "difficulty")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise PlanError(message)


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and value == value and abs(value) != float("inf")


@dataclass(frozen=True)
class ChannelNormalization:
    """How one input channel is normalised.

    Attributes:
        scheme: ``ct`` (clip to the foreground percentiles, then z-score with the foreground mean and
            std of the whole dataset), ``zscore`` (per-image z-score), ``rgb_to_01`` (divide by 255) or
            ``none``.
        clip_low: Lower clip value (``ct`` only).
        clip_high: Upper clip value (``ct`` only).
        mean: Dataset foreground mean (``ct`` only).
        std: Dataset foreground standard deviation (``ct`` only).
        landmarks: Intensity standardisation before the scheme (``automedseg adapt --match-intensities``): the
            training images' mean nonzero-voxel intensities at
            :data:`~automedseg.intensity_matching.LANDMARK_PERCENTILES`, onto which each image's own are mapped
            (:func:`~automedseg.intensity_matching.match_to_landmarks`); ``None`` (left out of plans.json): none.
    """

    scheme: str
    clip_low: float | None = None
    clip_high: float | None = None
    mean: float | None = None
    std: float | None = None
    landmarks: tuple[float, ...] | None = field(default=None, metadata={"omit_if_none": True})

    def __post_init__(self) -> None:
        if self.scheme not in NORMALIZATION_SCHEMES:
            raise PlanError(f"normalization scheme {self.scheme!r} is not one of {NORMALIZATION_SCHEMES}")
        if self.scheme == "ct" and None in (self.clip_low, self.clip_high, self.mean, self.std):
            raise PlanError("ct normalization needs clip_low, clip_high, mean and std")
        if self.landmarks is not None:
            marks = self.landmarks
            _require(len(marks) == len(LANDMARK_PERCENTILES) and all(_finite(v) for v in marks)
                     and all(a <= b for a, b in zip(marks, marks[1:])),
                     f"normalization landmarks: {len(LANDMARK_PERCENTILES)} non-decreasing numbers (the "
                     f"percentiles {LANDMARK_PERCENTILES}) expected, got {list(marks)}")


@dataclass(frozen=True)
class NetworkPlan:
    """Topology of the dynamic U-Net (see :mod:`automedseg.network`).

    Attributes:
        architecture: Registry key (:data:`ARCHITECTURES`): ``plain_unet``, ``residual_unet`` (residual
            encoder), ``attention_unet`` (attention-gated skips), ``aspp_unet`` (ASPP at the bottleneck) or
            ``segnet_unet`` (max-pooling encoder, max-unpooling decoder, no concatenated skips).
        features_per_stage: Feature width of each resolution stage, shallowest first.
        kernel_sizes: Convolution kernel per stage, one int per spatial axis.
        strides: Downsampling stride per stage (the first is all ones), one int per axis.
        n_conv_per_stage_encoder: Convolutions (or residual blocks) per encoder stage.
        n_conv_per_stage_decoder: Convolutions per decoder stage (``n_stages - 1`` entries).
        deep_supervision: Whether the decoder has an output head at each resolution.
        norm: Normalisation after every convolution block: ``instance`` (nnU-Net's), ``batch`` or ``group``.
        dropout: Dropout probability after every convolution block's activation, in [0, 1); 0: none.
        aspp_dilations: ``aspp_unet`` only: the dilation of each atrous branch, one int per axis (the planner
            sets them from the bottleneck's size); ``null``: :data:`automedseg.network_cost.DEFAULT_ASPP_RATES`.
    """

    architecture: str
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    n_conv_per_stage_encoder: tuple[int, ...]
    n_conv_per_stage_decoder: tuple[int, ...]
    deep_supervision: bool = True
    norm: str = "instance"
    dropout: float = 0.0
    aspp_dilations: tuple[tuple[int, ...], ...] | None = field(default=None, metadata={"omit_if_none": True})

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise PlanError(f"architecture {self.architecture!r} is not one of {ARCHITECTURES}")
        n = len(self.features_per_stage)
        if not (len(self.kernel_sizes) == len(self.strides) == len(self.n_conv_per_stage_encoder) == n):
            raise PlanError("features_per_stage, kernel_sizes, strides and n_conv_per_stage_encoder differ in length")
        if len(self.n_conv_per_stage_decoder) != n - 1:
            raise PlanError("n_conv_per_stage_decoder must have one entry fewer than features_per_stage")
        _require(all(f >= 1 for f in self.features_per_stage), "features_per_stage must be at least 1")
        _require(all(v >= 1 for k in self.kernel_sizes + self.strides for v in k),
                 "kernel_sizes and strides must be at least 1")
        _require(all(c >= 1 for c in self.n_conv_per_stage_encoder + self.n_conv_per_stage_decoder),
                 "n_conv_per_stage_encoder and n_conv_per_stage_decoder must be at least 1")
        _require(self.norm in NORMS, f"norm {self.norm!r} is not one of {NORMS}")
        _require(_finite(self.dropout) and 0.0 <= self.dropout < 1.0,
                 f"dropout must be a probability in [0, 1), got {self.dropout}")
        if self.aspp_dilations is not None:
            _require(len(self.aspp_dilations) >= 1 and all(v >= 1 for d in self.aspp_dilations for v in d),
                     "aspp_dilations must hold at least one dilation, every entry at least 1")

    @property
    def n_stages(self) -> int:
        return len(self.features_per_stage)


@dataclass(frozen=True)
class AugmentationPlan:
    """Probabilities and ranges of the training augmentation (batchgenerators).

    Angles are in radians, ranges are ``(low, high)``. ``do_dummy_2d`` makes the spatial transform act
    in-plane only, for strongly anisotropic patches.
    """

    rotation_p: float = 0.2
    rotation_range_rad: tuple[float, float] = (-0.5236, 0.5236)
    scale_p: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    elastic_p: float = 0.0
    elastic_alpha: tuple[float, float] = (0.0, 200.0)
    elastic_sigma: tuple[float, float] = (9.0, 13.0)
    noise_p: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    brightness_p: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    contrast_p: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    lowres_p: float = 0.25
    lowres_zoom_range: tuple[float, float] = (0.5, 1.0)
    gamma_p: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    do_dummy_2d: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_p"):
                _require(0.0 <= value <= 1.0, f"{f.name} must be a probability in [0, 1], got {value}")
            elif isinstance(value, tuple) and f.name != "mirror_axes":
                _require(all(_finite(v) for v in value) and value[0] <= value[1],
                         f"{f.name} must be a finite (low, high) range, got {list(value)}")
        _require(all(a in (0, 1, 2) for a in self.mirror_axes) and len(set(self.mirror_axes)) == len(self.mirror_axes),
                 f"mirror_axes must be distinct axes among 0, 1, 2, got {list(self.mirror_axes)}")


@dataclass(frozen=True)
class TrainingPlan:
    """Optimisation settings and the schedule that fits the time budget.

    Attributes:
        epochs: Number of epochs.
        iterations_per_epoch: Training iterations per epoch.
        val_iterations: Validation batches per epoch for the pseudo-Dice.
        optimizer: ``sgd`` (Nesterov) or ``adamw``.
        initial_lr: Learning rate at the start of the poly schedule.
        weight_decay: Weight decay.
        momentum: SGD momentum.
        poly_exponent: Exponent of the poly learning-rate decay.
        grad_clip_norm: Gradient norm clipping threshold.
        oversample_foreground: Fraction of each batch forced to contain foreground.
        dice_weight: Weight of the soft-Dice term of the loss.
        ce_weight: Weight of the cross-entropy term of the loss.
        num_workers: Background augmentation worker processes.
        seed: Seed for splits, sampling and augmentation.
        time_budget_s: Wall-clock budget the schedule was fitted to (``None``: rule default).
        estimated_seconds_per_iteration: Cost-model estimate of one training step on the planned device.
        estimated_fold_seconds: Estimated wall time of one fold (training only).
        precision: Precision the fold trained with: ``bf16`` (autocast), ``fp16`` (autocast and a gradient
            scaler) or ``fp32``; chosen by :func:`automedseg.device.precision_for` and written by the trainer
            into the fold's plan copy (``null`` in a plan from the planner).
        fixed_epochs: The number of epochs is fixed (search trials: the pruner's steps): a time budget sets
            the iterations per epoch only, and the trainer does not refit the epochs to it
            (:func:`automedseg.planning.schedule_for_budget`).
        class_sampling: How the forced-foreground samples pick their class: ``uniform`` (each class equally
            often) or ``difficulty`` (classes with a low training soft Dice more often; see
            :mod:`automedseg.class_sampling`).
        augment_on_device: Augment batched on the training device (:mod:`automedseg.device_batches`; the CPU
            workers only read windows) instead of in the CPU workers. ``null``: on CUDA devices only; the
            trainer records its choice in the fold's plan copy.
        worker_placement: Where the augmentation worker runs on a CPU (:data:`WORKER_PLACEMENTS`): ``shared``
            (torch on all cores, the worker niced among them) or ``own_core`` (the worker pinned to a core of
            its own, training on the others with one thread fewer), as the calibration chose it
            (:mod:`automedseg.thread_placement`); ignored on a GPU. Left out of ``plans.json`` while ``shared``,
            so older plans load and save unchanged.
    """

    epochs: int
    iterations_per_epoch: int
    val_iterations: int = 20
    optimizer: str = "sgd"
    initial_lr: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    poly_exponent: float = 0.9
    grad_clip_norm: float = 12.0
    oversample_foreground: float = 0.33
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    num_workers: int = 1
    seed: int = 12345
    time_budget_s: float | None = None
    estimated_seconds_per_iteration: float | None = None
    estimated_fold_seconds: float | None = None
    precision: str | None = None
    fixed_epochs: bool = False
    augment_on_device: bool | None = None
    class_sampling: str = "uniform"
    worker_placement: str = field(default="shared", metadata={"omit_if_default": True})

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise PlanError(f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise PlanError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.epochs < 1 or self.iterations_per_epoch < 1:
            raise PlanError("epochs and iterations_per_epoch must be at least 1")
        _require(self.val_iterations >= 1, "val_iterations must be at least 1")
        for name in ("initial_lr", "grad_clip_norm", "poly_exponent"):
            _require(_finite(getattr(self, name)) and getattr(self, name) > 0, f"{name} must be a positive number")
        for name in ("weight_decay", "momentum", "dice_weight", "ce_weight"):
            _require(_finite(getattr(self, name)) and getattr(self, name) >= 0, f"{name} must not be negative")
        _require(self.dice_weight + self.ce_weight > 0, "dice_weight and ce_weight cannot both be 0")
        _require(0.0 <= self.oversample_foreground <= 1.0, "oversample_foreground must be in [0, 1]")
        _require(self.class_sampling in CLASS_SAMPLING,
                 f"class_sampling {self.class_sampling!r} is not one of {CLASS_SAMPLING}")
        _require(self.num_workers >= 0, "num_workers must not be negative")
        _require(self.worker_placement in WORKER_PLACEMENTS,
                 f"worker_placement {self.worker_placement!r} is not one of {WORKER_PLACEMENTS}")
        for name in ("time_budget_s", "estimated_seconds_per_iteration", "estimated_fold_seconds"):
            value = getattr(self, name)
            _require(value is None or (_finite(value) and value > 0), f"{name} must be a positive number or null")


@dataclass(frozen=True)
class ConfigurationPlan:
    """Everything one configuration (``2d``, ``3d_fullres``, ``3d_lowres`` ...) needs.

    Attributes:
        name: Configuration name.
        data_identifier: Name of the preprocessed cache folder; configurations that preprocess
            identically share one.
        dims: 2 or 3: the network's spatial dimensionality (2D networks train on z-slices).
        spacing_mm: Target spacing (z, y, x) after transposition.
        patch_size: Training patch, 2 entries (y, x) for 2D, 3 (z, y, x) for 3D.
        batch_size: Training batch size.
        median_shape: Median image shape after cropping and resampling (z, y, x).
        normalization: One entry per input channel.
        image_order: Spline order for image resampling.
        label_order: Spline order for label resampling (applied to one-hot channels).
        separate_z: Resample the out-of-plane axis separately (anisotropic data).
        out_of_plane_order: Order used along the out-of-plane axis when ``separate_z``.
        network: Network topology.
        augmentation: Augmentation settings.
        training: Optimisation and schedule.
        previous_stage: For cascades: the configuration whose output feeds this one (unused for now).
        notes: Free-form explanations of the planner's choices.
    """

    name: str
    data_identifier: str
    dims: int
    spacing_mm: tuple[float, float, float]
    patch_size: tuple[int, ...]
    batch_size: int
    median_shape: tuple[int, int, int]
    normalization: tuple[ChannelNormalization, ...]
    image_order: int
    label_order: int
    separate_z: bool
    out_of_plane_order: int
    network: NetworkPlan
    augmentation: AugmentationPlan
    training: TrainingPlan
    previous_stage: str | None = None
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.dims not in (2, 3):
            raise PlanError(f"configuration {self.name}: dims must be 2 or 3, got {self.dims}")
        if len(self.patch_size) != self.dims:
            raise PlanError(f"configuration {self.name}: patch_size needs {self.dims} entries")
        if any(len(k) != self.dims for k in self.network.kernel_sizes + self.network.strides):
            raise PlanError(f"configuration {self.name}: kernel sizes and strides need {self.dims} entries each")
        if any(len(d) != self.dims for d in self.network.aspp_dilations or ()):
            raise PlanError(f"configuration {self.name}: network.aspp_dilations need {self.dims} entries each")
        if self.batch_size < 1:
            raise PlanError(f"configuration {self.name}: batch_size must be at least 1")
        where = f"configuration {self.name}"
        _require(all(_finite(v) and v > 0 for v in self.spacing_mm),
                 f"{where}: spacing_mm must be positive, got {list(self.spacing_mm)}")
        _require(all(v >= 1 for v in self.patch_size), f"{where}: patch_size entries must be at least 1")
        _require(all(v >= 1 for v in self.median_shape), f"{where}: median_shape entries must be at least 1")
        for name, top in (("image_order", 5), ("label_order", 1), ("out_of_plane_order", 5)):
            _require(0 <= getattr(self, name) <= top,
                     f"{where}: {name} must be a spline order 0-{top}, got {getattr(self, name)}")


@dataclass(frozen=True)
class Plans:
    """The whole plan of a dataset.

    Attributes:
        dataset_name: Name from dataset.json.
        channel_names: Input channel names, in file order.
        labels: Label name -> integer value, background included. The network predicts training indices
            ``0..K-1``, index ``k`` being the ``k``-th smallest value (:attr:`label_values`,
            :meth:`to_indices`, :meth:`to_values`); caches and probabilities are in index order.
        transpose_forward: Axis permutation applied to (z, y, x) arrays before everything else.
        original_median_spacing_mm: Median spacing of the raw data (z, y, x, before transposition).
        original_median_shape: Median raw shape (z, y, x, before transposition).
        device: The machine this plan was fitted to.
        configurations: Configuration name -> configuration.
        schema_version: Version of this file format.
        planner_version: Version of the package that wrote the plan.
    """

    dataset_name: str
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    transpose_forward: tuple[int, int, int]
    original_median_spacing_mm: tuple[float, float, float]
    original_median_shape: tuple[int, int, int]
    device: DeviceProfile
    configurations: dict[str, ConfigurationPlan] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    planner_version: str = ""

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise PlanError(
                f"schema_version {self.schema_version} is not supported (this automedseg reads {SCHEMA_VERSION})"
            )
        if sorted(self.transpose_forward) != [0, 1, 2]:
            raise PlanError(f"transpose_forward {self.transpose_forward} is not a permutation of (0, 1, 2)")
        label_values(self.labels)  # validates: background 0, no negative value

    @property
    def transpose_backward(self) -> tuple[int, int, int]:
        """The inverse permutation of :attr:`transpose_forward`."""
        return tuple(int(i) for i in sorted(range(3), key=lambda a: self.transpose_forward[a]))  # type: ignore[return-value]

    @property
    def label_values(self) -> tuple[int, ...]:
        """Declared label values, sorted; position ``k`` is training index ``k`` (see :func:`label_values`)."""
        return label_values(self.labels)

    @property
    def num_classes(self) -> int:
        """Number of output classes (distinct declared label values), background included."""
        return len(self.label_values)

    def to_indices(self, seg: np.ndarray) -> np.ndarray:
        """Label map of declared values -> training indices (see :func:`values_to_indices`)."""
        return values_to_indices(seg, self.label_values)

    def to_values(self, index_map: np.ndarray) -> np.ndarray:
        """Training indices (an argmax) -> declared label values (see :func:`indices_to_values`)."""
        return indices_to_values(index_map, self.label_values)

    def configuration(self, name: str) -> ConfigurationPlan:
        """Return a configuration by name, with an error that lists the available ones."""
        if name not in self.configurations:
            raise PlanError(f"configuration {name!r} is not in the plan; available: {sorted(self.configurations)}")
        return self.configurations[name]

    def with_configuration(self, config: ConfigurationPlan) -> Plans:
        """Return a copy with ``config`` added or replaced."""
        return dataclasses.replace(self, configurations={**self.configurations, config.name: config})

    # --- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as nested JSON types."""
        return to_jsonable(self)

    def to_json(self) -> str:
        """Return the plan as indented, deterministic JSON text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> Plans:
        """Build and validate a plan from JSON types; raises :class:`PlanError` naming the bad field."""
        # The version comes first: a plan of another schema fails on it, not on a field that schema renamed.
        if isinstance(data, dict) and "schema_version" in data and data["schema_version"] != SCHEMA_VERSION:
            raise PlanError(
                f"plans: schema_version {data['schema_version']!r} is not supported (this automedseg reads "
                f"{SCHEMA_VERSION}); re-run automedseg plan"
            )
        return from_jsonable(cls, data, "plans")

    @classmethod
    def from_json(cls, text: str) -> Plans:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"not valid JSON: {e}") from None
        return cls.from_dict(data)

    def save(self, path: Path) -> None:
        """Write ``plans.json`` atomically."""
        from automedseg.io import atomic_write_text

        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> Plans:
        """Read and validate a plan file; errors name the file."""
        path = Path(path)
        try:
            return cls.from_json(path.read_text())
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from None
        except OSError as e:
            raise PlanError(f"{path}: cannot read: {e.strerror}") from None
        except UnicodeDecodeError:
            raise PlanError(f"{path}: not a UTF-8 text file") from None
