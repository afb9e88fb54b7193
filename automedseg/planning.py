"""Planning rules: from a fingerprint and a machine to a :class:`~automedseg.plans.Plans`.

nnU-Net v2's experiment planner is the reference for what the data decides: target spacing (median, with
the anisotropy rule), axis order, patch size, pooling and kernel sizes per axis, feature widths,
normalisation and resampling. Beyond it, the plan fits **the machine and the time given**: a FLOP model
of the candidate networks, calibrated by a short timing on the device, chooses width, patch, batch and
schedule so that one fold fits the training budget (``time_budget_s``). On a GPU with no budget the
schedule is nnU-Net's (1000 epochs x 250 iterations); on a CPU with no budget it is
:data:`DEFAULT_CPU_BUDGET_S`.

This module holds the rules of the whole plan: the device profile (:func:`measure_device`), the normalisation,
the target spacing and axis order, which configurations there are (``2d``, ``3d_fullres``, ``3d_lowres``, the 2D
pixel grid of a 2D dataset, architecture variants) and the :class:`~automedseg.plans.Plans` (:func:`plan_dataset`).
Fitting one configuration to the machine and the budget (width, patch, batch, then the schedule) is
:mod:`automedseg.configuration_fit`, the schedule rule (epochs, iterations and validation batches for a time
budget) :mod:`automedseg.schedule`, the spacing and pooling rules :mod:`automedseg.topology`; their names are
re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from automedseg.calibration_timing import (  # noqa: F401  (re-exported)
    CALIBRATION_WIDTHS,
    calibrate_conv_gflops,
    calibrate_data_throughput,
)
from automedseg.configuration_fit import (  # noqa: F401  (re-exported)
    BASE_FEATURES,
    DATA_BOUND_WIDTHS,
    DATASET_COVERAGE_CAP,
    DEFAULT_CPU_BUDGET_S,
    GPU_DEFAULT_EPOCHS,
    MAX_FEATURES,
    MIN_ITERATIONS,
    SHORTEST_USEFUL_STEP_S,
    WIDTH_CANDIDATES,
    FitContext,
    architecture_variant,
    fit_configuration,
    network_for,
)
from automedseg.cost_model import (  # noqa: F401  (re-exported)
    CPU_2D_CONV_EFFICIENCY,
    CPU_STEP_OVERHEAD,
    StepEstimate,
    activation_bytes,
    data_workers,
    estimate_step,
    memory_limit_bytes,
    step_seconds,
    widen_for_data,
    worker_placement_for,
)
from automedseg.device_profile import NOMINAL_PROFILES  # noqa: F401  (re-exported)
from automedseg.fingerprint_types import Fingerprint
from automedseg.lateral import mirror_axes_to_keep
from automedseg.machine import cpu_model_name, host_memory_gib
from automedseg.plans import ChannelNormalization, ConfigurationPlan, DeviceProfile, Plans, label_values
from automedseg.schedule import (  # noqa: F401  (re-exported)
    END_WINDOW,
    ITERATIONS_PER_EPOCH_MAX,
    MAX_VAL_ITERATIONS,
    TRAIN_FRACTION,
    Schedule,
    budget_epochs,
    class_sampling_for,
    last_epoch_iterations,
    recipe_for,
    schedule_for_budget,
    validation_batches,
)
from automedseg.topology import (  # noqa: F401  (re-exported)
    ANISO_THRESHOLD,
    MIN_FEATURE_MAP,
    SCALE_LADDER_2D,
    class_sizes_mm,
    coarsening_limit,
    initial_patch,
    pooling_topology,
    target_spacing,
)
from automedseg.version import __version__

#: Architectures the rules plan the configurations with; any other (``attention_unet``, ``aspp_unet``,
#: ``segnet_unet``) is added as a variant of each configuration (:func:`plan_dataset`).
RULE_ARCHITECTURES = ("plain_unet", "residual_unet")

# --- device ---------------------------------------------------------------------------------------


def measure_device(kind: str = "auto", *, threads: int | None = None) -> DeviceProfile:
    """Profile this machine's CPU or GPU (a short timing, every call), or return a nominal profile by name.

    ``automedseg plan`` goes through :func:`automedseg.calibration.device_profile` instead, which times once
    per machine, caches the result and quantises it, so plans do not follow timing noise.

    Args:
        kind: ``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda``, ``mps`` or a key of
            :data:`NOMINAL_PROFILES`.
        threads: CPU threads for training (default: all cores).
    """
    if kind in NOMINAL_PROFILES:
        return NOMINAL_PROFILES[kind]
    import os

    import torch

    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA device here; plan with --device reference-gpu-24g instead")
        props = torch.cuda.get_device_properties(0)
        return _timed_profile("cuda", props.name, os.cpu_count() or 1, round(props.total_memory / 2**30, 1), None)
    if kind == "mps":
        return DeviceProfile(kind="mps", name="Apple MPS", cpu_threads=os.cpu_count() or 1,
                             memory_gib=host_memory_gib(), gflops_by_width=((8, 200.0), (64, 2000.0)))
    if kind != "cpu":
        raise ValueError(f"unknown device {kind!r}; use cpu, cuda, mps or one of {sorted(NOMINAL_PROFILES)}")
    n = threads or os.cpu_count() or 1
    return _timed_profile("cpu", f"{cpu_model_name()}, {n} threads", n, host_memory_gib(), n)


def _timed_profile(kind: str, name: str, cpu_threads: int, memory_gib: float, threads: int | None) -> DeviceProfile:
    """A profile from fresh timings: 3D and 2D convolutions on the device, the data pipeline on the CPU."""
    data = calibrate_data_throughput()
    return DeviceProfile(
        kind=kind, name=name, cpu_threads=cpu_threads, memory_gib=memory_gib,
        gflops_by_width=calibrate_conv_gflops(device=kind, threads=threads),
        gflops_by_width_2d=calibrate_conv_gflops(device=kind, threads=threads, dims=2),
        window_voxels_per_s=data.window_voxels_per_s, augment_voxels_per_s=data.augment_voxels_per_s,
    )


# --- configurations -------------------------------------------------------------------------------


def _normalization(fingerprint: Fingerprint) -> tuple[ChannelNormalization, ...]:
    schemes = {"rgb": "rgb_to_01", "none": "none"}  # ct: below; any other modality: zscore
    return tuple(  # the pooled statistics of a ct channel are numbers (DatasetSummary checks)
        ChannelNormalization("ct", clip_low=stats.p00_5, clip_high=stats.p99_5, mean=stats.mean,
                             std=max(stats.std or 0.0, 1e-8)) if modality == "ct"
        else ChannelNormalization(schemes.get(modality, "zscore"))
        for modality, stats in zip(fingerprint.modalities, fingerprint.dataset.intensity))


def plan_dataset(fingerprint: Fingerprint, *, device: DeviceProfile, time_budget_s: float | None = None,
                 seed: int = 12345, configurations: Sequence[str] | None = None,
                 architecture: str = "plain_unet") -> Plans:
    """Derive all configurations for a fingerprinted dataset.

    Args:
        fingerprint: Output of :func:`automedseg.fingerprint.compute_fingerprint` (or ``load_fingerprint``).
        device: The machine to plan for (:func:`measure_device`).
        time_budget_s: Wall-clock training budget per fold in seconds (``None``: rule default).
        seed: Seed recorded in the training plans.
        configurations: Subset of ``2d``, ``3d_fullres``, ``3d_lowres`` to plan (default: all that apply).
        architecture: ``plain_unet`` or ``residual_unet``: the network of every configuration. Another
            architecture of :data:`~automedseg.plans.ARCHITECTURES` (``attention_unet``, ``aspp_unet``,
            ``segnet_unet``): the configurations are planned with ``plain_unet`` and each gets a variant
            ``<configuration>_<architecture>`` besides (:func:`architecture_variant`).
    """
    cases = fingerprint.cases
    spacings = np.array([c.spacing_mm for c in cases], dtype=float)
    shapes = np.array([c.shape_after_crop for c in cases], dtype=float)
    is_2d = fingerprint.is_2d
    if is_2d:
        fullres = np.median(spacings, axis=0)
        transpose = (0, 1, 2)
    else:
        fullres = target_spacing(spacings, shapes)
        worst = int(np.argmax(fullres))
        transpose = (worst, *[i for i in range(3) if i != worst])
    tf = list(transpose)
    sp_t = fullres[tf]
    new_shapes = (shapes * spacings / fullres)[:, tf]
    median_shape = np.median(new_shapes, axis=0)
    labels = dict(fingerprint.labels)
    ctx = FitContext(
        fingerprint=fingerprint, device=device, time_budget_s=time_budget_s, seed=seed,
        in_channels=len(fingerprint.channel_names), num_classes=len(label_values(labels)),
        normalization=_normalization(fingerprint),
        total_voxels=float(np.prod(new_shapes, axis=1).sum()),
        architecture=architecture if architecture in RULE_ARCHITECTURES else "plain_unet",
        no_mirror=mirror_axes_to_keep(fingerprint.cases, labels, tf),
    )
    wanted = set(configurations) if configurations else {"2d", "3d_fullres", "3d_lowres"}
    configs: dict[str, ConfigurationPlan] = {}
    if "2d" in wanted:
        # 2D keeps each case's own out-of-plane spacing; it shares the 3D cache only when no case would have
        # its z resampled by 3d_fullres anyway.
        z_same = bool(np.allclose(spacings[:, tf[0]], fullres[tf[0]], rtol=1e-3))
        configs["2d"] = (_fit_2d_images(ctx, sp_t, median_shape) if is_2d else
                         fit_configuration(ctx, name="2d", spacing=sp_t, median_shape=median_shape, dims=2,
                                           data_identifier="fullres" if z_same else "2d"))
    if not is_2d and wanted & {"3d_fullres", "3d_lowres"}:
        full = fit_configuration(ctx, name="3d_fullres", spacing=sp_t, median_shape=median_shape, dims=3,
                                 data_identifier="fullres")
        if "3d_fullres" in wanted:
            configs["3d_fullres"] = full
        if "3d_lowres" in wanted:
            low = _lowres(ctx, full, sp_t, median_shape, spacings, shapes, fullres, tf)
            if low is not None:
                configs["3d_lowres"] = low
    if architecture not in RULE_ARCHITECTURES:
        variant_ctx = dataclasses.replace(ctx, architecture=architecture)
        configs.update({f"{name}_{architecture}": architecture_variant(variant_ctx, config)
                        for name, config in list(configs.items())})
    return Plans(
        dataset_name=fingerprint.dataset_name,
        channel_names=fingerprint.channel_names,
        labels=labels,
        transpose_forward=transpose,  # type: ignore[arg-type]
        original_median_spacing_mm=tuple(float(v) for v in np.median(spacings, axis=0)),  # type: ignore[arg-type]
        original_median_shape=tuple(  # type: ignore[arg-type]
            int(round(v)) for v in np.median([c.shape for c in cases], axis=0)),
        device=device,
        configurations=configs,
        planner_version=__version__,
    )


def _fit_2d_images(ctx: FitContext, spacing: np.ndarray, median_shape: np.ndarray) -> ConfigurationPlan:
    """The 2D configuration of a 2D dataset: context before resolution.

    The finest pixel grid (coarsening ladder :data:`~automedseg.topology.SCALE_LADDER_2D`) on which a patch
    covering the whole median image fits the budget and memory, but never coarser than the classes' sizes
    allow (:func:`~automedseg.topology.coarsening_limit`): a fetal head or a lung keeps its whole-image context
    on a coarser grid, a vessel or a membrane keeps its native pixels.
    """
    limit = coarsening_limit(class_sizes_mm(ctx.fingerprint.cases), float(min(spacing[1:])))
    factors = [f for f in SCALE_LADDER_2D if f <= limit]
    for i, f in enumerate(factors):
        sp = np.array([spacing[0], spacing[1] * f, spacing[2] * f])
        med = np.array([median_shape[0], median_shape[1] / f, median_shape[2] / f])
        ident = "fullres" if f == 1.0 else "2d_" + "x".join(f"{v:.4g}" for v in sp[1:])
        config = fit_configuration(ctx, name="2d", spacing=sp, median_shape=med, dims=2, data_identifier=ident)
        covers = all(p >= 0.95 * m for p, m in zip(config.patch_size, med[1:]))
        if f == 1.0 and covers:
            return config
        if covers or i == len(factors) - 1:
            why = ("a patch covers the whole median image" if covers else
                   "the coarsest grid the structures allow; the patch still covers only part of the image")
            note = (f"2D context before resolution: pixel grid {f:g}x coarser than the median spacing "
                    f"({sp[1]:.4g} x {sp[2]:.4g}), median image {med[1]:.0f} x {med[2]:.0f}: {why} "
                    f"(coarsening limit {limit:.1f}x from the smallest class size)")
            if f == 1.0:
                note = (f"2D: native pixel grid; the classes' sizes allow no coarsening (limit {limit:.1f}x), "
                        "so the patch covers only part of the median image")
            return dataclasses.replace(config, notes=(note, *config.notes))
    raise AssertionError("unreachable: the ladder starts at 1")


def _lowres(ctx: FitContext, full: ConfigurationPlan, sp_t: np.ndarray, median_shape: np.ndarray,
            spacings: np.ndarray, shapes: np.ndarray, fullres: np.ndarray, tf: list[int]) -> ConfigurationPlan | None:
    """A low-resolution configuration when the full-resolution patch covers under a quarter of the image."""
    coverage = math.prod(full.patch_size) / float(np.prod(median_shape))
    if coverage >= 0.25:
        return None
    spacing = np.array(sp_t, dtype=float)
    for _ in range(200):
        # Coarsen the finest axes first, towards isotropy, then all together.
        finest = spacing.min()
        grow = spacing < 2 * finest
        spacing = np.where(grow, spacing * 1.03, spacing)
        med = np.median((shapes * spacings)[:, tf] / spacing, axis=0)
        if math.prod(full.patch_size) / float(np.prod(med)) >= 0.25:
            break
    med = np.median((shapes * spacings)[:, tf] / spacing, axis=0)
    return fit_configuration(ctx, name="3d_lowres", spacing=spacing, median_shape=med, dims=3,
                             data_identifier="lowres_" + "x".join(f"{v:.3g}" for v in spacing))
