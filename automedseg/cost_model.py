"""The planner's cost model: how long one training iteration takes on a device, network and data pipeline.

A step has two parts, both calibrated per machine (:mod:`automedseg.calibration_timing`,
:mod:`automedseg.calibration_step`, cached by :mod:`automedseg.calibration`) and read from the
:class:`~automedseg.plans.DeviceProfile`:

* **The network**: the analytic training FLOPs (:func:`automedseg.network.estimate_training_flops`) over a
  calibrated throughput at the network's first-stage width. On a CPU whose profile has timed training steps
  (``step_gflops_by_width``, ``step_gflops_by_width_2d``: the real step with its augmentation worker), that
  throughput, plus :data:`STEP_LATENCY_S`, and nothing else: norms, loss, optimizer and the worker sharing the
  cores are in the measurement. Where the profile also prices parameters (``step_shape_costs``:
  :class:`~automedseg.plans.StepShapeCost`), a network with more parameters per FLOP than the timed reference
  network of its width (a deep 2D U-Net on a small patch) pays for those beyond the reference's. Otherwise
  (GPUs, older profiles) the convolution throughput (``gflops_by_width``; for 2D configurations
  ``gflops_by_width_2d``, or the 3D figure times :data:`CPU_2D_CONV_EFFICIENCY` on a CPU where a profile has no
  2D timing), times an overhead for what is not a
  convolution.
* **The data**: the CPU seconds one data worker spends on a batch: reading the sampling windows
  (``window_voxels_per_s``) and, unless augmentation runs on the device, augmenting the training patches
  (``augment_voxels_per_s``).

How they combine depends on where the workers run (:func:`estimate_step`):

* **GPU** (and MPS): the workers run in parallel to the step on their own cores, so a step takes the longer
  of the network step and the data time (a batch's worker seconds over the workers). A step whose data
  time is the longer one is *data-bound*: the device idles for the difference.
* **CPU**: the worker shares the cores with the training threads. With timed steps the network's part already
  holds what the worker takes; without, the training loses :data:`CPU_AUGMENT_SHARE` seconds of wall time per
  CPU second the worker takes.

A profile without data figures (nominal GPU profiles, plans from before the data calibration) has an
infinitely fast data pipeline: the step is the network's.

Where a CPU plan's augmentation worker runs (sharing the cores, or on a core of its own:
:mod:`automedseg.thread_placement`) is chosen once per machine by the calibration with
:func:`choose_worker_placement` (its step figures are timed so) and copied into the plan by
:func:`worker_placement_for`.

Example:
    >>> from automedseg.planning import NOMINAL_PROFILES, network_for
    >>> net, patch = network_for([1.0, 1.0, 1.0], [40, 56, 40], dims=3, base=24)  # doctest: +SKIP
    >>> estimate_step(net, patch, batch=2, dims=3, in_channels=1, num_classes=3,
    ...               device=NOMINAL_PROFILES["reference-cpu-2core"])  # doctest: +SKIP
    StepEstimate(network_s=0.29, data_s=0.061, seconds=0.35, data_bound=False)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from automedseg.network_cost import estimate_activation_elements, estimate_parameters, family_of
from automedseg.plans import AugmentationPlan, DeviceProfile, NetworkPlan
from automedseg.topology import ANISO_THRESHOLD

# Data loading, optimizer, loss and memory-bound layers on top of the conv FLOPs (fitted on a 2-core Xeon). Used on
# a CPU only for profiles without timed training steps: on a 2-core AMD EPYC (bf16, torch 2.13) it over-estimated
# the 3D width-8 step 1.8x (0.287 s planned against 0.150 s hippocampus and 0.161 s openkbp_hn_ct measured, median
# over 20-minute folds, benchmarks/results/shared_datasets.md, 2026-12-01), which the step calibration replaces.
# Charging each layer at its own width's convolution figure instead of the first stage's was checked on paper with
# that machine's calibration (3D 88/210/240/260, 2D 46/100/170/230 GFLOP/s at widths 8/16/32/64): measured over
# estimated became 0.70-0.75 (the two 3D folds) and 1.27-1.43 (drive, hc18, isbi2012_em 2d, under 0.6 cores of
# other load) instead of 0.52-0.56 and 0.57-0.77: a spread of 2.0x instead of 1.5x across 2D and 3D, so the first
# stage's width stays (for the timed steps too: they are timed on the planner's networks, width by width).
CPU_STEP_OVERHEAD = 1.6
GPU_STEP_OVERHEAD = 1.15
# A per-parameter step cost on every network (optimizer, clipping, weight casts), fitted from the 2D width-32 step at
# 224x224 and 128x128, was tried on an AMD EPYC (2026-12-01) and reverted: it lifted the throughputs left for the
# FLOPs and moved hippocampus 2d (4 stages, 1.9 M parameters) from 1.02 to 1.54x. What was adopted instead
# (calibration_step.fit_step_shape_cost) charges only the parameters beyond the reference network's at the same
# FLOPs, so a shallow network keeps the timed throughput.
# Per step, whatever its size (launches, the optimizer's Python). The step calibration leaves it out of its
# throughput (calibration_step.step_gflops) and the estimate adds it back.
STEP_LATENCY_S = 0.01
# 2D convolutions reach ~60% of the 3D calibration's throughput on CPU (measured: 2D U-Net, width 32, batch 92,
# 56x40: 362 GFLOP/s vs 3D width 24: 441 GFLOP/s at a calibrated 800 vs 1000 GFLOP/s; see train_speed). Used only
# for profiles without their own 2D timing (``gflops_by_width_2d``).
CPU_2D_CONV_EFFICIENCY = 0.6
# Wall seconds a CPU training step loses per CPU second of the augmentation worker that shares its cores. A fit
# on two runs (hippocampus on a Xeon, openkbp on an EPYC) once gave 1.4; the six 20-minute folds of
# benchmarks/results/shared_datasets.md (AMD EPYC, 2 threads, 2026-11-30, 0.4-0.7 cores taken by other processes)
# then trained at 0.19-0.24 s/iteration where the network-only estimate said 0.26-0.29 (openkbp 2d: 0.317 vs
# 0.290): the network part already over-estimates the step on this CPU, and adding the worker's time moved five
# of six estimates further from the measurement (and shrank the 3D patches). So 0; a profile with timed training
# steps (calibration_step: the step with its data pipeline, issue #19 item 3) replaces both; the data figures still
# decide GPU plans.
CPU_AUGMENT_SHARE = 0.0
MAX_DATA_WORKERS = 12
# The augmentation worker gets a core of its own (thread_placement: own_core) only when the calibration's training
# step is at least this much faster so than with all cores shared: timing noise (+-10 % between runs, less between
# two timings back to back) must not give the training a core fewer for nothing.
PLACEMENT_MARGIN = 0.05


@dataclass(frozen=True)
class StepEstimate:
    """One training iteration as the cost model sees it.

    Attributes:
        network_s: The network's forward + backward + optimizer step.
        data_s: GPU: wall seconds the workers need for a batch (in parallel to the step); CPU: the seconds the
            step loses to the worker sharing its cores. 0 when the profile has no data figures.
        seconds: The iteration: ``max(network_s, data_s)`` on a GPU, ``network_s + data_s`` on a CPU.
        data_bound: The workers are slower than the device (GPU only): it idles ``data_s - network_s`` a step.
        timed_step: ``network_s`` comes from the calibration's timed training steps (CPU), the augmentation
            worker beside them included.
        parameter_s: The part of ``network_s`` charged for parameters beyond the timed reference network's
            (:func:`parameter_charge_seconds`).

    Example:
        >>> StepEstimate(0.3, 0.0, 0.3, False, timed_step=True, parameter_s=0.05).describe().split("steps ")[1]
        "(0.05 s of it for parameters beyond the reference's)"
    """

    network_s: float
    data_s: float
    seconds: float
    data_bound: bool
    timed_step: bool = False
    parameter_s: float = 0.0

    def describe(self) -> str:
        """The parts, for the plan's notes, e.g. ``network 0.29 s + augmentation worker 0.06 s``."""
        if self.timed_step and self.data_s <= 0:
            charge = (f" ({self.parameter_s:.2g} s of it for parameters beyond the reference's)"
                      if self.parameter_s > 0 else "")
            return (f"network with its augmentation worker {self.network_s:.3g} s, from the timed training "
                    f"steps{charge}")
        if self.data_s <= 0:
            return f"network {self.network_s:.3g} s"
        if self.data_bound:
            return f"data-bound: the workers need {self.data_s:.3g} s a batch, the network {self.network_s:.3g} s"
        if self.seconds > self.network_s:  # CPU: the worker shares the cores
            return f"network {self.network_s:.3g} s + augmentation worker {self.data_s:.3g} s"
        return f"network {self.network_s:.3g} s, data {self.data_s:.3g} s in parallel"


def data_workers(device: DeviceProfile) -> int:
    """Background data workers the planner gives a device: one on a CPU, one per spare core (at most 12) else."""
    return 1 if device.kind == "cpu" else max(1, min(MAX_DATA_WORKERS, device.cpu_threads - 1))


class PlacementChoice(NamedTuple):
    """Where a CPU plan's augmentation worker runs (``TrainingPlan.worker_placement``), and why (a plan note)."""

    mode: str
    reason: str


def choose_worker_placement(step_seconds: Mapping[str, float], *, margin: float = PLACEMENT_MARGIN) -> str:
    """``own_core`` when its timed step is at least ``margin`` faster than ``shared``'s, else ``shared``.

    Args:
        step_seconds: Seconds per training step by placement (:mod:`automedseg.calibration_step`); ``shared``
            alone (one usable core) or nothing gives ``shared``.
        margin: Share of the shared step own_core must save.

    Example:
        >>> choose_worker_placement({"shared": 0.30, "own_core": 0.28}), choose_worker_placement({"shared": 0.3})
        ('own_core', 'shared')
    """
    shared, own = step_seconds.get("shared"), step_seconds.get("own_core")
    return "own_core" if shared is not None and own is not None and own <= shared * (1 - margin) else "shared"


def worker_placement_for(device: DeviceProfile) -> PlacementChoice:
    """The plan's worker placement: the calibration's choice on a CPU (``shared`` without one, and on a GPU).

    The choice itself is made once per machine by the calibration (:func:`choose_worker_placement`, whose step
    figures are timed under it); the planner copies it, with the two timings in the reason.

    Example:
        >>> from automedseg.device_profile import NOMINAL_PROFILES
        >>> worker_placement_for(NOMINAL_PROFILES["reference-cpu-2core"])
        PlacementChoice(mode='shared', reason='')
    """
    if device.kind != "cpu" or device.worker_placement is None:
        return PlacementChoice("shared", "")
    mode, seconds = device.worker_placement, dict(device.placement_step_seconds or ())
    if "own_core" not in seconds or "shared" not in seconds:
        return PlacementChoice(mode, "")
    own, shared = seconds["own_core"], seconds["shared"]
    timed = (f"the calibration's 3D training step took {own:.3g} s with the worker on a core of its own, "
             f"{shared:.3g} s sharing all cores")
    if mode == "own_core":
        return PlacementChoice(mode, f"augmentation worker on a core of its own, training on the others: {timed} "
                                     f"({100 * (1 - own / shared):.0f} % faster)")
    return PlacementChoice(mode, f"augmentation worker sharing the cores with the training threads: {timed} (a core "
                                 f"of its own is chosen from {100 * PLACEMENT_MARGIN:.0f} % faster)")


def augments_on_device(device: DeviceProfile, requested: bool | None = None) -> bool:
    """Whether training augments on the device (:func:`automedseg.device_batches.use_device_augmentation`'s rule)."""
    return bool(requested) if requested is not None else device.kind == "cuda"


def activation_bytes(net: NetworkPlan, patch: Sequence[int], *, batch: int) -> float:
    """Rough training memory: ~10 float32 activation copies per stage (calibrated on nnU-Net's 8 GB plans), times
    :func:`family_memory_factor` for the families beyond the plain and residual U-Nets."""
    total, size = 0.0, np.asarray(patch, dtype=float)
    for feats, stride in zip(net.features_per_stage, net.strides):
        size = size / np.asarray(stride)
        total += feats * float(np.prod(size))
    return total * 10 * 4 * batch * family_memory_factor(net, patch)


def family_memory_factor(net: NetworkPlan, patch: Sequence[int]) -> float:
    """Activations kept for backward by ``net`` over those of the U-Net with its encoder and plain skips.

    1 for ``plain_unet`` and ``residual_unet`` (what :func:`activation_bytes` was calibrated on); the others'
    attention gates, ASPP branches, pooling indices or missing concatenations move it (the cost model's count,
    :func:`automedseg.network_cost.estimate_activation_elements`).
    """
    reference = "residual_unet" if family_of(net).encoder == "residual" else "plain_unet"
    if net.architecture == reference:
        return 1.0
    kw = {"in_channels": 1, "num_classes": 2, "patch_size": tuple(int(p) for p in patch), "dims": len(patch)}
    return (estimate_activation_elements(net, **kw)
            / estimate_activation_elements(dataclasses.replace(net, architecture=reference), **kw))


def memory_limit_bytes(device: DeviceProfile) -> float:
    """The activation memory a plan may use: 85 % of a GPU's memory, half of a CPU machine's."""
    return device.memory_gib * 2**30 * (0.85 if device.kind != "cpu" else 0.5)


def timed_step_gflops(device: DeviceProfile, width: int, dims: int) -> float | None:
    """The throughput of the calibration's timed training steps the cost model charges a CPU network at (GFLOP/s;
    ``None``: not a CPU, or a profile without them)."""
    return device.step_gflops_at(width, dims=dims) if device.kind == "cpu" else None


def network_step_seconds(net: NetworkPlan, patch: Sequence[int], *, batch: int, dims: int, in_channels: int,
                         num_classes: int, device: DeviceProfile) -> float:
    """The network's part of one training iteration on ``device`` (on a CPU with timed steps: with its worker)."""
    return _network_step(net, patch, batch=batch, dims=dims, in_channels=in_channels, num_classes=num_classes,
                         device=device)[0]


def _network_step(net: NetworkPlan, patch: Sequence[int], *, batch: int, dims: int, in_channels: int,
                  num_classes: int, device: DeviceProfile) -> tuple[float, float]:
    """:func:`network_step_seconds` and the part of it charged for parameters (:func:`parameter_charge_seconds`)."""
    from automedseg.network import estimate_training_flops

    flops = estimate_training_flops(net, in_channels=in_channels, num_classes=num_classes,
                                    patch_size=tuple(patch), dims=dims) * batch
    timed = timed_step_gflops(device, net.features_per_stage[0], dims)
    if timed is not None:  # the real step: no overheads to add, they were timed
        excess = parameter_charge_seconds(net, flops=flops, dims=dims, in_channels=in_channels,
                                          num_classes=num_classes, device=device)
        return flops / (timed * 1e9) + excess + STEP_LATENCY_S, excess
    overhead = CPU_STEP_OVERHEAD if device.kind == "cpu" else GPU_STEP_OVERHEAD
    if dims == 2 and device.kind == "cpu" and not device.gflops_by_width_2d:
        overhead /= CPU_2D_CONV_EFFICIENCY
    return overhead * flops / (device.gflops_at(net.features_per_stage[0], dims=dims) * 1e9) + STEP_LATENCY_S, 0.0


def parameter_charge_seconds(net: NetworkPlan, *, flops: float, dims: int, in_channels: int, num_classes: int,
                             device: DeviceProfile) -> float:
    """What a CPU step of ``net`` and ``flops`` training FLOPs (the batch's) costs for parameters beyond the timed
    reference network's at those FLOPs (``device.step_shape_costs``; 0 without them, on a GPU and for a network
    with fewer parameters per FLOP)."""
    shape = device.step_shape_cost(dims) if device.kind == "cpu" else None
    if shape is None:
        return 0.0
    return shape.excess_seconds(flops=flops, width=net.features_per_stage[0],
                                parameters=estimate_parameters(net, in_channels=in_channels,
                                                               num_classes=num_classes, dims=dims))


def default_augmentation(patch: Sequence[int], dims: int) -> AugmentationPlan:
    """The planner's augmentation for a patch, as far as it sets the worker's work (rotation range, dummy 2D)."""
    dummy_2d = dims == 3 and max(patch) / patch[0] > ANISO_THRESHOLD
    return AugmentationPlan(rotation_range_rad=(-math.pi, math.pi) if dims == 2 else (-0.5236, 0.5236),
                            do_dummy_2d=dummy_2d)


def data_cpu_seconds(patch: Sequence[int], *, batch: int, dims: int, device: DeviceProfile,
                     augmentation: AugmentationPlan | None = None, on_device: bool = False) -> float:
    """CPU seconds one data worker spends on a batch (0 when the profile has no data figures).

    Args:
        patch: Training patch.
        batch: Samples per batch.
        dims: 2 or 3.
        device: The profile with ``window_voxels_per_s`` and ``augment_voxels_per_s``.
        augmentation: The configuration's augmentation (default: :func:`default_augmentation`); it sets the
            sampling window and whether the spatial transform is 2D (``do_dummy_2d``).
        on_device: Augmentation runs on the device: the worker only reads windows.
    """
    from automedseg.augmentation_sampler import sampling_patch_size

    if device.window_voxels_per_s is None:
        return 0.0
    aug = augmentation if augmentation is not None else default_augmentation(patch, dims)
    window = math.prod(sampling_patch_size(patch, aug, dims=dims))
    seconds = window / device.window_voxels_per_s
    if not on_device:
        rate = device.augment_rate(2 if aug.do_dummy_2d else dims)
        seconds += math.prod(patch) / rate if rate else 0.0
    return batch * seconds


def estimate_step(net: NetworkPlan, patch: Sequence[int], *, batch: int, dims: int, in_channels: int,
                  num_classes: int, device: DeviceProfile, workers: int | None = None,
                  augment_on_device: bool | None = None,
                  augmentation: AugmentationPlan | None = None) -> StepEstimate:
    """Cost-model estimate of one training iteration on ``device``, with its network and data parts.

    Args:
        net: The network.
        patch: Training patch.
        batch: Samples per batch.
        dims: 2 or 3.
        in_channels: Input channels.
        num_classes: Output classes.
        device: The profile.
        workers: Data workers (default :func:`data_workers`; 0: batches made in the training process).
        augment_on_device: As the plan's ``training.augment_on_device`` (``None``: on CUDA).
        augmentation: The configuration's augmentation (default :func:`default_augmentation`).
    """
    network, charge = _network_step(net, patch, batch=batch, dims=dims, in_channels=in_channels,
                                    num_classes=num_classes, device=device)
    cpu_s = data_cpu_seconds(patch, batch=batch, dims=dims, device=device, augmentation=augmentation,
                             on_device=augments_on_device(device, augment_on_device))
    workers = data_workers(device) if workers is None else workers
    if workers == 0:  # batches made in the training process, between the steps
        return StepEstimate(network, cpu_s, network + cpu_s, False)
    if device.kind == "cpu":
        if timed_step_gflops(device, net.features_per_stage[0], dims) is not None:  # the worker was timed with it
            return StepEstimate(network, 0.0, network, False, timed_step=True, parameter_s=charge)
        data = CPU_AUGMENT_SHARE * cpu_s
        return StepEstimate(network, data, network + data, False)
    data = cpu_s / workers
    return StepEstimate(network, data, max(network, data), data > network)


def step_seconds(net: NetworkPlan, patch: Sequence[int], *, batch: int, dims: int, in_channels: int,
                 num_classes: int, device: DeviceProfile, workers: int | None = None,
                 augment_on_device: bool | None = None, augmentation: AugmentationPlan | None = None) -> float:
    """Cost-model estimate of one training iteration on ``device`` in seconds (:func:`estimate_step`)."""
    return estimate_step(net, patch, batch=batch, dims=dims, in_channels=in_channels, num_classes=num_classes,
                         device=device, workers=workers, augment_on_device=augment_on_device,
                         augmentation=augmentation).seconds


def widen_for_data(make_network: Callable[[int], tuple[NetworkPlan, Sequence[int]]], widths: Sequence[int], *,
                   estimate: Callable[[NetworkPlan, Sequence[int]], StepEstimate],
                   fits: Callable[[NetworkPlan, Sequence[int]], bool]) -> tuple[NetworkPlan, Sequence[int]] | None:
    """The widest network whose step stays within the data time of a data-bound configuration.

    A data-bound device idles while the workers prepare the next batch; a wider network uses that time at no
    cost in wall time (a larger batch would not: its data time grows with it).

    Args:
        make_network: Width -> (network, patch) of the configuration.
        widths: Candidate widths, narrowest first (all wider than the current one).
        estimate: The step of a network and patch at the configuration's batch.
        fits: Whether a network and patch fit the device's memory at that batch.

    Returns:
        The widest candidate whose network step does not exceed its data time, or ``None``.
    """
    best = None
    for width in widths:
        net, patch = make_network(width)
        est = estimate(net, patch)
        if not fits(net, patch) or est.network_s > est.data_s:
            break
        best = (net, patch)
    return best


def step_ratio_note(predicted_s: float | None, measured_s: float) -> str:
    """How a measured step compares with the plan's, for the trainer's log (empty without a prediction).

    Example:
        >>> step_ratio_note(0.30, 0.42)
        ', planned 0.300 s/it (measured 1.40x)'
    """
    if not predicted_s or not math.isfinite(measured_s):
        return ""
    return f", planned {predicted_s:.3f} s/it (measured {measured_s / predicted_s:.2f}x)"
