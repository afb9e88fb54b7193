"""Fitting one configuration to the machine and the time: width, patch and batch, then the schedule.

:func:`fit_configuration` takes a configuration's spacing and median shape (what the data decides,
:mod:`automedseg.planning`) and chooses the network width (:data:`WIDTH_CANDIDATES`), the patch and the batch so
that the step fits the device's memory and enough iterations (:data:`MIN_ITERATIONS`) fit the training budget
(:func:`training_budget`), by the cost model (:mod:`automedseg.cost_model`); a data-bound device gets a wider
network (:data:`DATA_BOUND_WIDTHS`). :func:`finish_configuration` adds the schedule, augmentation and training recipe
of the chosen network; :func:`architecture_variant` derives a configuration of another architecture from a rule
configuration. :func:`network_for` is the network topology of a patch and spacing. :mod:`automedseg.planning`
re-exports these names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from automedseg.cost_model import (
    StepEstimate,
    activation_bytes,
    data_workers,
    estimate_step,
    memory_limit_bytes,
    step_seconds,
    widen_for_data,
    worker_placement_for,
)
from automedseg.fingerprint_types import Fingerprint
from automedseg.network_cost import aspp_rates_for
from automedseg.plans import (
    AugmentationPlan,
    ChannelNormalization,
    ConfigurationPlan,
    DeviceProfile,
    NetworkPlan,
    TrainingPlan,
)
from automedseg.schedule import (
    ITERATIONS_PER_EPOCH_MAX,
    Schedule,
    class_sampling_for,
    recipe_for,
    schedule_for_budget,
    validation_batches,
)
from automedseg.topology import ANISO_THRESHOLD, MIN_FEATURE_MAP, initial_patch, pooling_topology

MAX_FEATURES = {2: 512, 3: 320}
BASE_FEATURES = 32
DEFAULT_CPU_BUDGET_S = 30 * 60.0  # a fold's training budget on a CPU when none is given
GPU_DEFAULT_EPOCHS = 1000
MIN_ITERATIONS = 4000  # below this the planner trades width, then batch, then patch for more steps
DATASET_COVERAGE_CAP = 0.05  # a batch covers at most 5% of the dataset's voxels (nnU-Net)
SHORTEST_USEFUL_STEP_S = 0.1
WIDTH_CANDIDATES = (32, 24, 16, 12, 8)
DATA_BOUND_WIDTHS = (40, 48, 64)  # wider than nnU-Net's 32, for a device that would otherwise wait for data


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


@dataclasses.dataclass(frozen=True)
class FitContext:
    """What every configuration of one plan is fitted with (made by :func:`automedseg.planning.plan_dataset`).

    Attributes:
        fingerprint: The dataset's fingerprint.
        device: The machine planned for.
        time_budget_s: The training budget per fold given (``None``: the rule default, :func:`training_budget`).
        seed: Seed recorded in the training plans.
        in_channels: Input channels of the networks.
        num_classes: Output classes (background included).
        normalization: Per-channel intensity normalisation.
        total_voxels: Voxels of all cases at the full-resolution spacing (caps the batch's dataset coverage).
        architecture: The network architecture fitted.
        no_mirror: Transposed axis -> why it stays out of mirroring (lateralised classes).
    """

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


def _schedule(step_s: float, ctx: FitContext, *, dims: int) -> tuple[Schedule, float | None, list[str]]:
    """The schedule for a step time; also the budget used and notes."""
    budget, _ = training_budget(ctx)
    notes = [] if budget is None or ctx.time_budget_s is not None else \
        [f"no --time-budget given: CPU default of {DEFAULT_CPU_BUDGET_S / 60:.0f} min per fold"]
    if budget is None:
        ipe = ITERATIONS_PER_EPOCH_MAX
        return Schedule(GPU_DEFAULT_EPOCHS, ipe, validation_batches(ipe, fixed=False)), None, notes
    return schedule_for_budget(step_s, budget), budget, notes


def fit_configuration(ctx: FitContext, *, name: str, spacing: np.ndarray, median_shape: np.ndarray, dims: int,
                      data_identifier: str) -> ConfigurationPlan:
    """Choose patch, width and batch for one configuration, then the schedule.

    Args:
        ctx: The plan's context.
        name: The configuration's name.
        spacing: Its target spacing, in transposed axis order (a 2D configuration uses the last two axes).
        median_shape: The median image shape at that spacing, same order.
        dims: 2 or 3.
        data_identifier: The preprocessed cache it reads.

    Returns:
        The configuration (:func:`finish_configuration`).
    """
    sp = [float(v) for v in (spacing if dims == 3 else spacing[1:])]
    med = [float(v) for v in (median_shape if dims == 3 else median_shape[1:])]
    patch = initial_patch(sp, med, dims=dims)
    limit_bytes = memory_limit_bytes(ctx.device)
    notes: list[str] = []
    budget, min_iters = training_budget(ctx)
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
    return finish_configuration(ctx, name=name, spacing=spacing, median_shape=median_shape, dims=dims,
                                data_identifier=data_identifier, net=net, rounded=rounded, batch=batch, step=step,
                                notes=notes)


def training_budget(ctx: FitContext) -> tuple[float | None, int]:
    """The training budget (``None``: GPU without one) and the fewest iterations a configuration should get."""
    budget = ctx.time_budget_s
    if budget is None and ctx.device.kind == "cpu":
        budget = DEFAULT_CPU_BUDGET_S
    # Short budgets cannot buy MIN_ITERATIONS of any useful network: ask for what ~0.1 s steps would give.
    return budget, MIN_ITERATIONS if budget is None else min(MIN_ITERATIONS,
                                                             max(50, int(budget / SHORTEST_USEFUL_STEP_S)))


def finish_configuration(ctx: FitContext, *, name: str, spacing: np.ndarray, median_shape: np.ndarray, dims: int,
                         data_identifier: str, net: NetworkPlan, rounded: Sequence[int], batch: int,
                         step: StepEstimate, notes: list[str]) -> ConfigurationPlan:
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


def _use_idle_device(ctx: FitContext, spacing: Sequence[float], patch: Sequence[int], net: NetworkPlan,
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


def architecture_variant(ctx: FitContext, rule: ConfigurationPlan) -> ConfigurationPlan:
    """``rule`` with the network of ``ctx.architecture``, named ``<rule>_<architecture>``.

    The rule's patch and batch (a schedule for the new step time) while the cost model says they still fit the
    memory and the iterations :func:`training_budget` asks for, else fitted afresh with the new architecture
    (:func:`fit_configuration`, same spacing and cache).
    """
    name, arch = f"{rule.name}_{ctx.architecture}", ctx.architecture
    spacing, median = np.asarray(rule.spacing_mm, dtype=float), np.asarray(rule.median_shape, dtype=float)
    net = aspp_rates_for(dataclasses.replace(rule.network, architecture=arch), rule.patch_size)
    step = estimate_step(net, rule.patch_size, batch=rule.batch_size, dims=rule.dims, in_channels=ctx.in_channels,
                         num_classes=ctx.num_classes, device=ctx.device)
    budget, min_iters = training_budget(ctx)
    fits = activation_bytes(net, rule.patch_size, batch=rule.batch_size) <= memory_limit_bytes(ctx.device) and (
        budget is None or budget / step.seconds >= min_iters)
    if not fits:
        config = fit_configuration(ctx, name=name, spacing=spacing, median_shape=median, dims=rule.dims,
                                   data_identifier=rule.data_identifier)
        note = f"{arch} variant of {rule.name}: its patch and batch no longer fit the memory or time; fitted afresh"
        return dataclasses.replace(config, notes=(note, *config.notes))
    note = f"{arch} variant of {rule.name}: same patch and batch (they still fit the memory and time)"
    return finish_configuration(ctx, name=name, spacing=spacing, median_shape=median, dims=rule.dims,
                                data_identifier=rule.data_identifier, net=net, rounded=list(rule.patch_size),
                                batch=rule.batch_size, step=step, notes=[note])
