"""A real training step, timed per feature width: what a CPU training iteration costs on this machine.

The planner's cost model (:mod:`automedseg.cost_model`) used to charge a CPU step as the analytic training FLOPs
over the throughput of a lone convolution, times a fixed overhead for the rest (norms, loss, optimizer, the
augmentation worker sharing the cores). That overhead was fitted on one CPU and missed another by 1.8x (issue
#19). So the calibration also times the step itself (:func:`calibrate_steps`), with everything training runs:

* the planner's network (:func:`automedseg.planning.network_for`) for a reference patch (:data:`STEP_REFERENCE_PATCH`,
  the size the planner picks for 3D and 2D configurations on a 2-core CPU) at each width of :data:`STEP_WIDTHS`,
  channels-last, in training mode, with deep supervision;
* the trainer's own step (:func:`automedseg.training_step.train_step`: autocast in the precision training uses,
  the deep-supervision loss, gradient clipping) and the optimizer a CPU plan gets (AdamW, :func:`~automedseg.schedule.
  recipe_for` a short schedule);
* batches of :data:`STEP_BATCH` from the real training loader: one augmentation worker process (niced as in
  training) sampling and augmenting a synthetic cached case (:func:`automedseg.calibration_timing.synthetic_case`),
  so its CPU time is taken from the step as it is in training.

After :data:`STEP_WARMUP` untimed steps (kernel choice, the optimizer's state), steps are timed by wall clock for
:data:`STEP_WINDOW_S` per width (at least :data:`STEP_MIN_STEPS`, the loader's waits included, as the trainer's
``seconds_per_iteration``), all of them (3D, 2D, probes) taking turns in :data:`STEP_ROUNDS` rounds
(:func:`time_step_groups`), each keeping its median round. The figure kept is a throughput: the network's training FLOPs
(:func:`~automedseg.network_cost.estimate_training_flops`) times the batch over the step's seconds less
:data:`~automedseg.cost_model.STEP_LATENCY_S` (:func:`step_gflops`), so the cost model can charge another patch,
batch or depth of the same width. About 30 s for the three widths in 3D and 2D and the probe on a 2-core CPU.

A network of the same width can still run slower per FLOP than the reference one: more parameters per FLOP (a
deep 2D U-Net on a small patch). So the network of :data:`STEP_PROBES` is timed too (with the widths), and
:func:`fit_step_shape_cost` prices the parameters beyond the reference's (:class:`~automedseg.plans.StepShapeCost`),
which the cost model adds where the profile has it.

Where the augmentation worker runs (:mod:`automedseg.thread_placement`: sharing all cores with the training
threads, or on a core of its own) is chosen here too (:func:`calibrate_placement`): the 3D step at
:data:`PLACEMENT_WIDTH` is timed under both placements (:data:`PLACEMENT_WINDOW_S` each, in
:data:`PLACEMENT_ROUNDS` rounds; about 7 s more on an idle 2-core CPU),
:func:`automedseg.cost_model.choose_worker_placement` picks ``own_core`` only when it is
:data:`~automedseg.cost_model.PLACEMENT_MARGIN` faster, and the widths are then timed under the chosen placement,
the one the plan trains with.

Example:
    >>> calibrate_steps(threads=2)  # doctest: +SKIP
    CalibratedSteps(steps_3d=((8, 110.0), (16, 230.0), (32, 320.0)), steps_2d=((8, 60.0), (16, 150.0), (32, 250.0)),
                    probes=((2, 'w32 128x128 b2', 124.0),))
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from automedseg.allocator import retain_freed_memory
from automedseg.calibration_timing import DATA_SEED, reference_config, synthetic_case
from automedseg.cost_model import STEP_LATENCY_S, choose_worker_placement
from automedseg.planning import network_for
from automedseg.plans import WORKER_PLACEMENTS, ConfigurationPlan, StepShapeCost, TrainingPlan
from automedseg.schedule import recipe_for
from automedseg.thread_placement import placed, placement_layout

STEP_WIDTHS = (8, 16, 32)  # the planner's CPU widths are 8-32 (planning.WIDTH_CANDIDATES); others interpolate
# Hippocampus' 3d_fullres patch; 2D: the size of the 2D patches planned on a 2-core CPU (192x256, 160x224,
# 224x224 in benchmarks/results/shared_datasets.md).
STEP_REFERENCE_PATCH: dict[int, tuple[int, ...]] = {3: (40, 56, 40), 2: (224, 224)}
STEP_BATCH = 2
STEP_CLASSES = 3  # the synthetic case's labels (background and two classes, like hippocampus)
STEP_WARMUP = 2  # untimed steps: the first picks kernels, the first optimizer step allocates its state
# Timed wall seconds per width (and probe), over all rounds. 0.8 s timed two steps of the 2D width-32 step (0.9 s
# each with its worker on a 2-core Xeon): one slow step moved its figure by a quarter.
STEP_WINDOW_S = 2.0
# The steps take turns in rounds (time_step_groups) and keep their median round. On a shared 2-core Xeon VM
# (2026-12-01) the machine's speed swung 350-840 GFLOP/s between 5-second blocks of a sustained bf16 matmul, and
# the 3D width-8 step, timed in one 1.5 s window, read 62-115 GFLOP/s across seven timings within 20 minutes.
STEP_ROUNDS = 4
STEP_MIN_STEPS = 3
STEP_MAX_STEPS = 20
STEP_WORKER_NICENESS = 10  # as the trainer's workers on a CPU (training._run_epochs)
PLACEMENT_WIDTH = 16  # the placements are compared on the 3D step at this width (the middle of STEP_WIDTHS)
PLACEMENT_WINDOW_S = 1.0  # timed wall seconds per placement
# Rounds the placements take turns in (shared, own_core, own_core, shared). Timed once each, one after the other,
# the placement flipped between calibrations minutes apart on a shared 2-core Xeon VM (2026-12-01: own_core 0.236 vs
# shared 0.314 s, then 0.303 vs 0.336, 0.420 vs 0.393, 0.434 vs 0.307).
PLACEMENT_ROUNDS = 2
# (width, patch, batch) of the networks timed beside the reference ones so the cost model can tell what a step
# costs per parameter beyond the reference network's (fit_step_shape_cost). 2D: a deep network on a small patch (6
# stages to 512 features on 128x128, 20.6 M parameters, as the width-32 reference on 224x224 but with a third of
# its FLOPs: like openkbp_hn_ct's 2d plan, whose step was 1.48x its estimate from the width's throughput alone on
# an AMD EPYC). Each width must be one of STEP_WIDTHS; the cache names a probe by probe_name(), so a changed probe
# is timed anew. Measured on a 2-core Xeon (AMX, bf16, 2026-12-01, networks timed without their worker,
# benchmarks/results/profile_step.md): 0.0106 s per million parameters beyond the reference's; ten 2D networks
# (widths 8-32, 56x40 x 22 to 224x224 x 2, 0.5-20.6 M parameters) then ran at 0.88-1.12x of their estimate, where
# the throughput alone gave 0.99-1.68x (the deep probe's shape). A shallow probe (4 stages on
# 16 x 64x48, for an activation cost) was tried and dropped: with the calibration's worker augmenting 16 slices of
# its synthetic case it cost 1.3-1.4x more per FLOP than without, which real training on hippocampus' small slices
# did not show (its 2d step was estimated 1.33-1.72x too slow with it). 3D: none; the planner's CPU 3D networks
# have at most 5.6 M parameters, and four 3D networks there were within 0.87-1.01x of the throughput alone.
STEP_PROBES: dict[int, tuple[tuple[int, tuple[int, ...], int], ...]] = {
    2: ((32, (128, 128), 2),),
    3: (),
}

@dataclass(frozen=True)
class StepTiming:
    """One width's timed training steps.

    Attributes:
        width: Features of the network's first stage.
        flops: Training FLOPs of one step (the network's per sample times the batch).
        seconds: Wall seconds per timed step.
        steps: Steps timed.
        placement: Where the augmentation worker ran, as applied (:mod:`automedseg.thread_placement`).
    """

    width: int
    flops: float
    seconds: float
    steps: int
    placement: str = "shared"

    @property
    def gflops(self) -> float:
        """The step's throughput (:func:`step_gflops`)."""
        return step_gflops(self.flops, self.seconds)


def step_gflops(flops: float, seconds: float) -> float:
    """GFLOP/s of a step of ``flops`` that took ``seconds``, its fixed latency left out, three significant digits.

    The cost model adds :data:`~automedseg.cost_model.STEP_LATENCY_S` back to every step it estimates, so the
    step timed here is estimated as it was measured (at most half of it counts as latency).

    Example:
        >>> step_gflops(15.7e9, 0.16), step_gflops(1e9, 0.01)
        (105.0, 200.0)
    """
    return float(f"{flops / max(seconds - STEP_LATENCY_S, 0.5 * seconds) / 1e9:.3g}")


def reference_step_config(dims: int, width: int, *, patch: Sequence[int] | None = None,
                          batch: int = STEP_BATCH) -> ConfigurationPlan:
    """The configuration a step of ``width`` is timed with: the planner's network for the reference patch.

    Example:
        >>> config = reference_step_config(3, 8)
        >>> config.network.features_per_stage, config.patch_size, config.training.optimizer
        ((8, 16, 32, 64), (40, 56, 40), 'adamw')
    """
    base = reference_config(dims)
    net, rounded = network_for([1.0] * dims, list(patch or STEP_REFERENCE_PATCH[dims]), dims=dims, base=width)
    recipe = recipe_for(1000)  # a CPU budget's schedule: a few thousand steps
    training = TrainingPlan(epochs=1, iterations_per_epoch=1, optimizer=recipe.optimizer,
                            initial_lr=recipe.initial_lr, weight_decay=recipe.weight_decay, num_workers=1,
                            seed=DATA_SEED)
    return dataclasses.replace(base, name=f"calibration_step_{dims}d", patch_size=tuple(int(v) for v in rounded),
                               batch_size=batch, network=net, training=training)


@dataclass(frozen=True)
class StepGroup:
    """Training steps timed on one loader: one reference patch and batch, one or more widths.

    Attributes:
        dims: 3 or 2.
        widths: Features of the first stage.
        patch: Reference patch (``None``: :data:`STEP_REFERENCE_PATCH`; rounded as the planner rounds it).
        batch: Samples per step.
    """

    dims: int
    widths: tuple[int, ...] = STEP_WIDTHS
    patch: tuple[int, ...] | None = None
    batch: int = STEP_BATCH


def time_step_groups(groups: Sequence[StepGroup], *, threads: int | None = None, placement: str = "shared",
                     warmup: int = STEP_WARMUP, window_s: float = STEP_WINDOW_S, min_steps: int = STEP_MIN_STEPS,
                     max_steps: int = STEP_MAX_STEPS, rounds: int = STEP_ROUNDS,
                     clock: Callable[[], float] = time.perf_counter) -> tuple[tuple[StepTiming, ...], ...]:
    """Time real CPU training steps of every group's widths, with an augmentation worker feeding each group.

    One worker process (the real loader) serves each group: the networks of one patch share their deep
    supervision strides, so their batches are alike. Every step takes turns in ``rounds`` rounds of ``window_s /
    rounds`` (at least one step a round, ``min_steps`` and at most ``max_steps`` over the rounds), and each
    step's figure is its median round: a burst of speed or of another tenant's load on a shared machine then
    moves one round of every step, not one step's whole figure. Where a round moves on to another group, one
    untimed step of it comes first: the previous group's worker refills its queue (two batches) meanwhile, which
    the first timed step of the group may still share the cores with, as the group's prefetched batches spare
    it its own worker's first batch (in training each batch's worker time falls beside some step). Every group's
    networks, optimizers and worker stay alive until the end (:func:`calibrate_steps`' seven networks: 55 M
    parameters, 0.8 GiB of weights, gradients and AdamW state at 16 bytes a parameter). The process's torch
    threads and affinity are restored afterwards.

    Args:
        groups: The steps, by loader.
        threads: Torch threads (default: leave as is; ``own_core``: all usable cores), as ``train --threads``.
        placement: ``shared`` or ``own_core`` (:func:`automedseg.thread_placement.placement_layout`; where no
            core can be spared, own_core runs as shared and the timings say so).
        warmup: Untimed steps per width.
        window_s: Timed seconds per width (over all rounds).
        min_steps: Timed steps at least (over all rounds).
        max_steps: Timed steps at most (over all rounds).
        rounds: Rounds the steps take turns in.
        clock: Wall clock.

    Returns:
        Per group, its widths' timings.
    """
    import torch

    from automedseg.augmentation_loaders import make_training_loader
    from automedseg.device import memory_format
    from automedseg.losses import DeepSupervisionLoss
    from automedseg.network import build_network, estimate_training_flops
    from automedseg.network_cost import output_strides
    from automedseg.training_step import make_optimizer, train_step

    if any(g.dims not in (2, 3) for g in groups):
        raise ValueError(f"dims must be 2 or 3, got {[g.dims for g in groups]}")
    rounds = max(1, min(int(rounds), int(max_steps)))
    retain_freed_memory()  # as training does
    layout = placement_layout(placement, threads=threads)
    device = torch.device("cpu")
    configs = [[reference_step_config(g.dims, w, patch=g.patch, batch=g.batch) for w in g.widths] for g in groups]
    per_round = [_round_steps(min_steps, rounds, r) for r in range(rounds)]
    cap = [_round_steps(max_steps, rounds, r) for r in range(rounds)]
    timed = [[[] for _ in group] for group in configs]  # seconds per step, per round
    counts = [[0] * len(group) for group in configs]
    with tempfile.TemporaryDirectory(prefix="automedseg-step-") as tmp, torch.random.fork_rng(devices=[]), \
            placed(layout), contextlib.ExitStack() as stack:
        steps = []
        for k, (group, group_configs) in enumerate(zip(groups, configs, strict=True)):
            folder = Path(tmp) / f"group_{k}"
            folder.mkdir()
            synthetic_case(folder, group.dims)
            strides = output_strides(group_configs[0].network)
            loader = stack.enter_context(make_training_loader(
                folder, ["case"], group_configs[0], deep_supervision_strides=strides,
                worker_niceness=STEP_WORKER_NICENESS, worker_cpus=layout.worker_cpus))
            group_steps = []
            for config in group_configs:
                if output_strides(config.network) != strides:  # pragma: no cover - network_for keeps the topology
                    raise AssertionError("the reference networks differ in their strides")
                torch.manual_seed(DATA_SEED)
                tr = config.training
                model = build_network(config.network, in_channels=1, num_classes=STEP_CLASSES, dims=group.dims)
                model = model.to(memory_format=memory_format(group.dims)).train()
                optimizer = make_optimizer(model.parameters(), tr)
                loss_fn = DeepSupervisionLoss(len(strides), dice_weight=tr.dice_weight, ce_weight=tr.ce_weight,
                                              track_classes=True)

                def step(model: torch.nn.Module = model, optimizer: torch.optim.Optimizer = optimizer,
                         loss_fn: DeepSupervisionLoss = loss_fn, tr: TrainingPlan = tr,
                         loader: Iterator[dict[str, Any]] = loader) -> None:
                    train_step(model, next(loader), optimizer=optimizer, loss_fn=loss_fn, device=device,
                               grad_clip_norm=tr.grad_clip_norm)

                for _ in range(warmup):
                    step()
                group_steps.append(step)
            steps.append(group_steps)
        for r in range(rounds):
            for k, group_steps in enumerate(steps):
                if len(steps) > 1:
                    group_steps[0]()
                for i, step in enumerate(group_steps):
                    n, t0 = 0, clock()
                    while n < per_round[r] or (n < cap[r] and clock() - t0 < window_s / rounds):
                        step()
                        n += 1
                    timed[k][i].append(max(clock() - t0, 1e-9) / n)
                    counts[k][i] += n
    out = []
    for group, group_configs, seconds, n in zip(groups, configs, timed, counts, strict=True):
        out.append(tuple(
            StepTiming(int(c.network.features_per_stage[0]),
                       estimate_training_flops(c.network, in_channels=1, num_classes=STEP_CLASSES,
                                               patch_size=c.patch_size, dims=group.dims) * c.batch_size,
                       float(np.median(sec)), count, layout.placement)
            for c, sec, count in zip(group_configs, seconds, n, strict=True)))
    return tuple(out)


def time_training_steps(*, dims: int = 3, widths: Sequence[int] = STEP_WIDTHS, threads: int | None = None,
                        placement: str = "shared", patch: Sequence[int] | None = None, batch: int = STEP_BATCH,
                        **kw: object) -> tuple[StepTiming, ...]:
    """Time real CPU training steps at each width of one reference patch (:func:`time_step_groups`, one group).

    Further keywords (``warmup``, ``window_s``, ``min_steps``, ``max_steps``, ``rounds``, ``clock``) go to
    :func:`time_step_groups`.

    Args:
        dims: 3 or 2.
        widths: Features of the first stage.
        threads: Torch threads, as ``train --threads``.
        placement: ``shared`` or ``own_core``.
        patch: Reference patch (default :data:`STEP_REFERENCE_PATCH`).
        batch: Samples per step.
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    group = StepGroup(dims, tuple(int(w) for w in widths), None if patch is None else tuple(int(v) for v in patch),
                      batch)
    return time_step_groups([group], threads=threads, placement=placement, **kw)[0]  # type: ignore[arg-type]


def _round_steps(total: int, rounds: int, r: int) -> int:
    """Round ``r``'s share of ``total`` steps split over ``rounds`` (at least one; the first rounds take the rest).

    Example:
        >>> [_round_steps(5, 3, r) for r in range(3)], [_round_steps(2, 3, r) for r in range(3)]
        ([2, 2, 1], [1, 1, 1])
    """
    return max(1, total // rounds + (1 if r < total % rounds else 0))


class CalibratedSteps(NamedTuple):
    """The calibration's CPU training steps (:func:`calibrate_steps`).

    Attributes:
        steps_3d: ``(width, GFLOP/s)`` of the 3D reference steps (:func:`step_gflops`).
        steps_2d: The same for 2D.
        probes: ``(dims, probe name, GFLOP/s)`` of the :data:`STEP_PROBES` (:func:`probe_name`).
    """

    steps_3d: tuple[tuple[int, float], ...]
    steps_2d: tuple[tuple[int, float], ...]
    probes: tuple[tuple[int, str, float], ...]


def calibrate_steps(*, threads: int | None = None, placement: str = "shared") -> CalibratedSteps:
    """The calibration's CPU training steps, all taking turns (:func:`time_step_groups`): the 3D and 2D
    reference steps per width and the :data:`STEP_PROBES`.

    Args:
        threads: Torch threads (default: leave as is).
        placement: Where the augmentation worker runs (``shared``, ``own_core``).
    """
    probes = [(d, probe) for d in (3, 2) for probe in STEP_PROBES[d]]
    groups = [StepGroup(3), StepGroup(2),
              *(StepGroup(d, (width,), tuple(patch), batch) for d, (width, patch, batch) in probes)]
    timed = time_step_groups(groups, threads=threads, placement=placement)
    return CalibratedSteps(tuple((t.width, t.gflops) for t in timed[0]), tuple((t.width, t.gflops) for t in timed[1]),
                           tuple((d, probe_name(*probe), t.gflops)
                                 for (d, probe), (t,) in zip(probes, timed[2:], strict=True)))


def time_placements(*, threads: int | None = None, dims: int = 3, width: int = PLACEMENT_WIDTH,
                    window_s: float = PLACEMENT_WINDOW_S, rounds: int = PLACEMENT_ROUNDS,
                    **kw: object) -> tuple[tuple[str, float], ...]:
    """``(placement, seconds per step)`` of the training step at ``width`` under each placement this machine allows.

    The placements take turns in ``rounds`` rounds, the order reversed every other round (shared, own_core,
    own_core, shared: a trend in the machine's speed favours neither), ``window_s / rounds`` each; a placement's
    figure is the median of its rounds. ``own_core`` is left out where no core can be spared (one usable core,
    one thread, no affinity). Further keywords go to :func:`time_training_steps` (``patch``, ``warmup``,
    ``clock``, ...).

    Args:
        threads: Torch threads, as ``train --threads`` (:mod:`automedseg.thread_placement`).
        dims: 3 or 2.
        width: Features of the first stage.
        window_s: Timed wall seconds per placement (over all rounds).
        rounds: Rounds the placements take turns in.
    """
    names = [p for p in WORKER_PLACEMENTS if placement_layout(p, threads=threads).placement == p]
    seconds: dict[str, list[float]] = {p: [] for p in names}
    for r in range(max(1, rounds)):
        for p in names if r % 2 == 0 else names[::-1]:
            (timing,) = time_training_steps(dims=dims, widths=(width,), threads=threads, placement=p,
                                            window_s=window_s / max(1, rounds), rounds=1, **kw)
            seconds[p].append(timing.seconds)
    return tuple((p, float(np.median(seconds[p]))) for p in names)


def calibrate_placement(*, threads: int | None = None) -> tuple[str, tuple[tuple[str, float], ...]]:
    """The placement the widths are timed under and the plan trains with, and the step timings it was chosen from.

    Example:
        >>> calibrate_placement(threads=2)  # doctest: +SKIP
        ('shared', (('shared', 0.31), ('own_core', 0.33)))
    """
    seconds = time_placements(threads=threads)
    return choose_worker_placement(dict(seconds)), seconds


def _step_size(dims: int, width: int, patch: Sequence[int] | None = None, batch: int = STEP_BATCH,
               ) -> tuple[float, float]:
    """GFLOP (of the batch) and million parameters of a timed step's network."""
    from automedseg.network_cost import estimate_parameters, estimate_training_flops

    config = reference_step_config(dims, width, patch=patch, batch=batch)
    kw = {"in_channels": 1, "num_classes": STEP_CLASSES, "dims": dims}
    return (estimate_training_flops(config.network, patch_size=config.patch_size, **kw) * batch / 1e9,
            estimate_parameters(config.network, **kw) / 1e6)


def probe_name(width: int, patch: Sequence[int], batch: int) -> str:
    """How the calibration cache names a probe of :data:`STEP_PROBES`.

    Example:
        >>> probe_name(32, (128, 128), 2)
        'w32 128x128 b2'
    """
    return f"w{width} {'x'.join(str(int(v)) for v in patch)} b{batch}"


def fit_step_shape_cost(dims: int, step_gflops_by_width: Sequence[tuple[int, float]],
                        probe_gflops: Sequence[tuple[str, float]]) -> StepShapeCost | None:
    """What a step costs per million parameters beyond the reference network's (:class:`~automedseg.plans.
    StepShapeCost`), from the probes.

    A probe of width ``w`` with ``k`` times the FLOPs of that width's reference step is modelled as ``k`` times the
    reference step plus ``p`` seconds per million parameters beyond ``k`` times the reference's; ``p`` (>= 0) is
    the least-squares fit over the probes. Fit it on the timings as cached, not on rounded ones: the probe's
    excess over its reference is a difference, which magnifies rounding.

    Args:
        dims: 2 or 3.
        step_gflops_by_width: The reference steps' throughputs (``Calibration.step_gflops_by_width``).
        probe_gflops: ``(probe name, GFLOP/s)`` of the :data:`STEP_PROBES` of ``dims`` (:func:`probe_name`;
            others are left out).

    Returns:
        The cost, or ``None`` without a probe at a timed width.

    Example:
        >>> cost = fit_step_shape_cost(2, ((8, 80.4), (16, 148.0), (32, 212.0)), (("w32 128x128 b2", 124.0),))
        >>> cost.seconds_per_m_parameters, cost.parameters_per_gflop_by_width  # a 2-core Xeon, bf16
        (0.0106, ((8, 0.141), (16, 0.149), (32, 0.153)))
    """
    table, probes = dict(step_gflops_by_width), dict(probe_gflops)
    usable = [(probe, probes[probe_name(*probe)]) for probe in STEP_PROBES[dims]
              if probe_name(*probe) in probes and probe[0] in table]
    if not usable:
        return None
    ref = {w: _step_size(dims, w) for w in table}
    xx = xy = 0.0
    for (width, patch, batch), gflops in usable:
        g, p = _step_size(dims, width, patch, batch)
        g_ref, p_ref = ref[width]
        k = g / g_ref  # the reference step of this width, scaled to the probe's FLOPs
        x, y = p - k * p_ref, g / gflops - k * g_ref / table[width]
        if x > 0:  # (fewer parameters than the reference's are not charged: they price nothing)
            xx, xy = xx + x * x, xy + x * y
    per_p = max(0.0, xy / xx) if xx > 0 else 0.0
    # at most a reference step's whole time per parameter of it: more would make larger batches faster per FLOP
    per_p = min(per_p, *((1 / table[w]) / (p / g) for w, (g, p) in ref.items()))
    return StepShapeCost(dims, tuple((w, float(f"{p / g:.3g}")) for w, (g, p) in sorted(ref.items())),
                         float(f"{per_p:.3g}"))
