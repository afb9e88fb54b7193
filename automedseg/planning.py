"""Planning rules: from a fingerprint and a machine to a :class:`~automedseg.plans.Plans`.

nnU-Net v2's experiment planner is the reference for what the data decides: target spacing (median, with
the anisotropy rule), axis order, patch size, pooling and kernel sizes per axis, feature widths,
normalisation and resampling. Beyond it, the plan fits **the machine and the time given**: a FLOP model
of the candidate networks, calibrated by a short timing on the device, chooses width, patch, batch and
schedule so that one fold fits the training budget (``time_budget_s``). On a GPU with no budget the
schedule is nnU-Net's (1000 epochs x 250 iterations); on a CPU with no budget it is
:data:`DEFAULT_CPU_BUDGET_S`.

The schedule rule (epochs, iterations and validation batches for a time budget) is :mod:`automedseg.schedule`, the
spacing and pooling rules :mod:`automedseg.topology`; their names are re-exported here.
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
from automedseg.network_cost import aspp_rates_for
from automedseg.plans import (
    AugmentationPlan,
    ChannelNormalization,
    ConfigurationPlan,
    DeviceProfile,
    NetworkPlan,
    Plans,
    TrainingPlan,
    label_values,
)
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

MAX_FEATURES = {2: 512, 3: 320}
BASE_FEATURES = 32
DEFAULT_CPU_BUDGET_S = 30 * 60.0
GPU_DEFAULT_EPOCHS = 1000
MIN_ITERATIONS = 4000  # below this the planner trades width, then batch, then patch for more steps
DATASET_COVERAGE_CAP = 0.05  # a batch covers at most 5% of the dataset's voxels (nnU-Net)
SHORTEST_USEFUL_STEP_S = 0.1
WIDTH_CANDIDATES = (32, 24, 16, 12, 8)
DATA_BOUND_WIDTHS = (40, 48, 64)  # wider than nnU-Net's 32, for a device that would otherwise wait for data
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


def network_for(spacing: Sequence[float], patch: Sequence[int], *, dims: int, base: int,
                architecture: str = "plain_unet") -> tuple[NetworkPlan, list[int]]:
    """Network topology for a patch and spacing; returns the network and the divisibility-rounded patch.

    Encoder blocks per stage: 2 convs, or for ``residual_unet`` 1, 2, 3 ... (at most 6) residual blocks; an
    ``aspp_unet`` gets atrous rates for its bottleneck (:func:`~automedseg.network_cost.aspp_rates_for`).
    """
    kernels, strides, rounded = pooling_topology(spacing, patch)
    n = len(strides)
    feats = tuple(min(base * 2**s, MAX_FEATURES[dims] * base // BASE_FEATURES) for s in range(n))
    enc = tuple(min(1 + s, 6) for s in range(n)) if architecture == "residual_unet" else tuple(2 for _ in range(n))
    net = NetworkPlan(
        architecture=architecture,
        features_per_stage=feats,
        kernel_sizes=tuple(tuple(k) for k in kernels),
        strides=tuple(tuple(s) for s in strides),
        n_conv_per_stage_encoder=enc,
        n_conv_per_stage_decoder=tuple(2 for _ in range(n - 1)),
        deep_supervision=True,
    )
    return aspp_rates_for(net, rounded), rounded


# --- configurations -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Context:
    fingerprint: Fingerprint
    device: DeviceProfile
    time_budget_s: float | None
    seed: int
    in_channels: int
    num_classes: int
    normalization: tuple[ChannelNormalization, ...]
    total_voxels: float
    architecture: str
    no_mirror: dict[int, str] = dataclasses.field(default_factory=dict)  # transposed axis -> reason


def _normalization(fingerprint: Fingerprint) -> tuple[ChannelNormalization, ...]:
    schemes = {"rgb": "rgb_to_01", "none": "none"}  # ct: below; any other modality: zscore
    return tuple(  # the pooled statistics of a ct channel are numbers (DatasetSummary checks)
        ChannelNormalization("ct", clip_low=stats.p00_5, clip_high=stats.p99_5, mean=stats.mean,
                             std=max(stats.std or 0.0, 1e-8)) if modality == "ct"
        else ChannelNormalization(schemes.get(modality, "zscore"))
        for modality, stats in zip(fingerprint.modalities, fingerprint.dataset.intensity))


def _schedule(step_s: float, ctx: _Context, *, dims: int) -> tuple[Schedule, float | None, list[str]]:
    """The schedule for a step time; also the budget used and notes."""
    budget, _ = _budget(ctx)
    notes = [] if budget is None or ctx.time_budget_s is not None else \
        [f"no --time-budget given: CPU default of {DEFAULT_CPU_BUDGET_S / 60:.0f} min per fold"]
    if budget is None:
        ipe = ITERATIONS_PER_EPOCH_MAX
        return Schedule(GPU_DEFAULT_EPOCHS, ipe, validation_batches(ipe, fixed=False)), None, notes
    return schedule_for_budget(step_s, budget), budget, notes


def _fit(ctx: _Context, *, name: str, spacing: np.ndarray, median_shape: np.ndarray, dims: int,
         data_identifier: str) -> ConfigurationPlan:
    """Choose patch, width and batch for one configuration, then the schedule."""
    sp = [float(v) for v in (spacing if dims == 3 else spacing[1:])]
    med = [float(v) for v in (median_shape if dims == 3 else median_shape[1:])]
    patch = initial_patch(sp, med, dims=dims)
    limit_bytes = memory_limit_bytes(ctx.device)
    notes: list[str] = []
    budget, min_iters = _budget(ctx)
    reduced = False
    while True:
        net, rounded = network_for(sp, patch, dims=dims, base=BASE_FEATURES, architecture=ctx.architecture)
        bs_cap = max(2, int(round(DATASET_COVERAGE_CAP * ctx.total_voxels / math.prod(rounded))))
        choice = None
        # Without a budget (GPU) the width stays nnU-Net's and only the patch shrinks to fit memory.
        for base in WIDTH_CANDIDATES if budget is not None else (BASE_FEATURES,):
            net, rounded = network_for(sp, patch, dims=dims, base=base, architecture=ctx.architecture)
            if activation_bytes(net, rounded, batch=2) > limit_bytes:
                continue
            if budget is None:  # GPU without budget: nnU-Net widths, batch by memory
                choice = (net, rounded, 2)
                break
            t = step_seconds(net, rounded, batch=2, dims=dims, in_channels=ctx.in_channels,
                             num_classes=ctx.num_classes, device=ctx.device)
            if budget / t >= min_iters:
                choice = (net, rounded, 2)
                break
        shrinkable = [i for i, p in enumerate(patch) if p > 4 * MIN_FEATURE_MAP]
        if choice is not None or not shrinkable:
            break
        axis = max(shrinkable, key=lambda i: patch[i] / med[i])
        patch[axis] = max(4 * MIN_FEATURE_MAP, int(patch[axis] * 0.8))
        reduced = True
    if reduced:
        notes.append("patch reduced below the rule-based size to fit the time budget or memory")
    if choice is None:
        base = WIDTH_CANDIDATES[-1] if budget is not None else BASE_FEATURES
        net, rounded = network_for(sp, patch, dims=dims, base=base, architecture=ctx.architecture)
        choice = (net, rounded, 2)
        notes.append(f"the budget allows fewer than {min_iters} iterations even for the smallest network")
    net, rounded, batch = choice
    # Grow the batch while memory, dataset coverage and the iteration floor allow.
    while batch < bs_cap:
        nb = batch + 1
        if activation_bytes(net, rounded, batch=nb) > limit_bytes:
            break
        if budget is not None:
            t = step_seconds(net, rounded, batch=nb, dims=dims, in_channels=ctx.in_channels,
                             num_classes=ctx.num_classes, device=ctx.device)
            if budget / t < min_iters:
                break
        batch = nb
    net, step = _use_idle_device(ctx, sp, patch, net, rounded, batch=batch, dims=dims, limit_bytes=limit_bytes,
                                 notes=notes)
    return _finish(ctx, name=name, spacing=spacing, median_shape=median_shape, dims=dims,
                   data_identifier=data_identifier, net=net, rounded=rounded, batch=batch, step=step, notes=notes)


def _budget(ctx: _Context) -> tuple[float | None, int]:
    """The training budget (``None``: GPU without one) and the fewest iterations a configuration should get."""
    budget = ctx.time_budget_s
    if budget is None and ctx.device.kind == "cpu":
        budget = DEFAULT_CPU_BUDGET_S
    # Short budgets cannot buy MIN_ITERATIONS of any useful network: ask for what ~0.1 s steps would give.
    return budget, MIN_ITERATIONS if budget is None else min(MIN_ITERATIONS,
                                                             max(50, int(budget / SHORTEST_USEFUL_STEP_S)))


def _finish(ctx: _Context, *, name: str, spacing: np.ndarray, median_shape: np.ndarray, dims: int,
            data_identifier: str, net: NetworkPlan, rounded: Sequence[int], batch: int, step: StepEstimate,
            notes: list[str]) -> ConfigurationPlan:
    """The configuration of a chosen network, patch and batch: schedule, augmentation, training recipe, notes."""
    step_s = step.seconds
    (epochs, ipe, val_iterations), used_budget, sched_notes = _schedule(step_s, ctx, dims=dims)
    notes += sched_notes
    fold_s = step_s * epochs * ipe
    notes.append(
        f"width {net.features_per_stage[0]}, batch {batch}, patch {rounded}: "
        f"~{step_s:.2f} s/iteration ({step.describe()}), {epochs} x {ipe} iterations, ~{fold_s / 60:.0f} min per "
        f"fold on {ctx.device.name}"
    )
    aniso_patch = dims == 3 and max(rounded) / rounded[0] > ANISO_THRESHOLD
    # Axes along which mirroring would swap lateralised classes stay out of mirroring (training and TTA).
    in_plane = range(3) if dims == 3 else range(1, 3)
    mirror = tuple(i for i, a in enumerate(in_plane) if a not in ctx.no_mirror)
    # (before the schedule line, which stays last: the CLI prints a configuration's last note as its summary)
    notes[-1:-1] = [f"{ctx.no_mirror[a]}: axis left out of mirroring" for a in in_plane if a in ctx.no_mirror]
    aug = AugmentationPlan(
        rotation_range_rad=(-math.pi, math.pi) if dims == 2 else (-0.5236, 0.5236),
        mirror_axes=mirror,
        do_dummy_2d=aniso_patch,
    )
    workers = data_workers(ctx.device)
    recipe = recipe_for(epochs * ipe if used_budget is not None else None)
    notes.insert(-1, recipe.reason)
    sampling, placement = class_sampling_for(ctx.num_classes - 1), worker_placement_for(ctx.device)
    notes[-1:-1] = [reason for reason in (sampling.reason, placement.reason) if reason]
    training = TrainingPlan(
        epochs=epochs,
        iterations_per_epoch=ipe,
        optimizer=recipe.optimizer,
        initial_lr=recipe.initial_lr,
        weight_decay=recipe.weight_decay,
        class_sampling=sampling.mode,
        worker_placement=placement.mode,
        val_iterations=val_iterations,
        num_workers=workers,
        seed=ctx.seed,
        time_budget_s=used_budget,
        estimated_seconds_per_iteration=round(step_s, 4),
        estimated_fold_seconds=round(fold_s, 1),
    )
    sep_z = bool(max(spacing) / min(spacing) > ANISO_THRESHOLD) if dims == 3 or spacing[0] < 999 else False
    return ConfigurationPlan(
        name=name,
        data_identifier=data_identifier,
        dims=dims,
        spacing_mm=tuple(float(f"{v:.6g}") for v in spacing),  # type: ignore[arg-type]
        patch_size=tuple(int(v) for v in rounded),
        batch_size=batch,
        median_shape=tuple(int(round(v)) for v in median_shape),  # type: ignore[arg-type]
        normalization=ctx.normalization,
        image_order=3,
        label_order=1,
        separate_z=sep_z,
        out_of_plane_order=0,
        network=net,
        augmentation=aug,
        training=training,
        notes=tuple(notes),
    )


def _use_idle_device(ctx: _Context, spacing: Sequence[float], patch: Sequence[int], net: NetworkPlan,
                     rounded: Sequence[int], *, batch: int, dims: int, limit_bytes: float,
                     notes: list[str]) -> tuple[NetworkPlan, StepEstimate]:
    """The network and its step; a data-bound device (its workers slower than its step) gets a wider network.

    Up to the width whose step matches the data time (:data:`DATA_BOUND_WIDTHS`): the device would otherwise
    idle for the difference. A note says so.
    """
    def estimate(n: NetworkPlan, p: Sequence[int]) -> StepEstimate:
        return estimate_step(n, p, batch=batch, dims=dims, in_channels=ctx.in_channels,
                             num_classes=ctx.num_classes, device=ctx.device)

    step = estimate(net, rounded)
    if not step.data_bound:
        return net, step
    width = net.features_per_stage[0]
    wider = widen_for_data(
        lambda w: network_for(spacing, patch, dims=dims, base=w, architecture=ctx.architecture),
        [w for w in DATA_BOUND_WIDTHS if w > width], estimate=estimate,
        fits=lambda n, p: activation_bytes(n, p, batch=batch) <= limit_bytes)
    idle = 100 * (1 - step.network_s / step.data_s)
    if wider is None:
        notes.append(f"data-bound: the {data_workers(ctx.device)} data workers need ~{step.data_s:.3g} s a batch, the "
                     f"network ~{step.network_s:.3g} s: the device idles ~{idle:.0f}% of each step")
        return net, step
    wide = estimate(*wider)
    notes.append(f"data-bound: the {data_workers(ctx.device)} data workers need ~{step.data_s:.3g} s a batch, the "
                 f"width-{width} network ~{step.network_s:.3g} s (the device idle ~{idle:.0f}%): width raised to "
                 f"{wider[0].features_per_stage[0]} (~{wide.network_s:.3g} s) at the same step time")
    return wider[0], wide


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
            ``<configuration>_<architecture>`` besides (:func:`_architecture_variant`).
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
    ctx = _Context(
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
                         _fit(ctx, name="2d", spacing=sp_t, median_shape=median_shape, dims=2,
                              data_identifier="fullres" if z_same else "2d"))
    if not is_2d and wanted & {"3d_fullres", "3d_lowres"}:
        full = _fit(ctx, name="3d_fullres", spacing=sp_t, median_shape=median_shape, dims=3,
                    data_identifier="fullres")
        if "3d_fullres" in wanted:
            configs["3d_fullres"] = full
        if "3d_lowres" in wanted:
            low = _lowres(ctx, full, sp_t, median_shape, spacings, shapes, fullres, tf)
            if low is not None:
                configs["3d_lowres"] = low
    if architecture not in RULE_ARCHITECTURES:
        variant_ctx = dataclasses.replace(ctx, architecture=architecture)
        configs.update({f"{name}_{architecture}": _architecture_variant(variant_ctx, config)
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


def _fit_2d_images(ctx: _Context, spacing: np.ndarray, median_shape: np.ndarray) -> ConfigurationPlan:
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
        config = _fit(ctx, name="2d", spacing=sp, median_shape=med, dims=2, data_identifier=ident)
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


def _lowres(ctx: _Context, full: ConfigurationPlan, sp_t: np.ndarray, median_shape: np.ndarray,
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
    return _fit(ctx, name="3d_lowres", spacing=spacing, median_shape=med, dims=3,
                data_identifier="lowres_" + "x".join(f"{v:.3g}" for v in spacing))


def _architecture_variant(ctx: _Context, rule: ConfigurationPlan) -> ConfigurationPlan:
    """``rule`` with the network of ``ctx.architecture``, named ``<rule>_<architecture>``: the rule's patch and batch
    (a schedule for the new step time) while the cost model says they still fit the memory and the iterations
    :func:`_budget` asks for, else fitted afresh with the new architecture (:func:`_fit`, same spacing and cache).
    """
    name, arch = f"{rule.name}_{ctx.architecture}", ctx.architecture
    spacing, median = np.asarray(rule.spacing_mm, dtype=float), np.asarray(rule.median_shape, dtype=float)
    net = aspp_rates_for(dataclasses.replace(rule.network, architecture=arch), rule.patch_size)
    step = estimate_step(net, rule.patch_size, batch=rule.batch_size, dims=rule.dims, in_channels=ctx.in_channels,
                         num_classes=ctx.num_classes, device=ctx.device)
    budget, min_iters = _budget(ctx)
    fits = activation_bytes(net, rule.patch_size, batch=rule.batch_size) <= memory_limit_bytes(ctx.device) and (
        budget is None or budget / step.seconds >= min_iters)
    if not fits:
        config = _fit(ctx, name=name, spacing=spacing, median_shape=median, dims=rule.dims,
                      data_identifier=rule.data_identifier)
        note = f"{arch} variant of {rule.name}: its patch and batch no longer fit the memory or time; fitted afresh"
        return dataclasses.replace(config, notes=(note, *config.notes))
    note = f"{arch} variant of {rule.name}: same patch and batch (they still fit the memory and time)"
    return _finish(ctx, name=name, spacing=spacing, median_shape=median, dims=rule.dims,
                   data_identifier=rule.data_identifier, net=net, rounded=list(rule.patch_size), batch=rule.batch_size,
                   step=step, notes=[note])
