"""The calibration's real training steps: the planner's network, the trainer's step and optimizer, batches from the
real loader with its worker process. Tiny networks and patches keep each timing well under a second; a counting
clock makes the timing window exact."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from automedseg import calibration_step as S
from automedseg import thread_placement
from automedseg.cost_model import STEP_LATENCY_S
from automedseg.network import estimate_training_flops
from automedseg.planning import network_for

TINY = {3: (16, 16, 16), 2: (32, 32)}


@pytest.mark.parametrize(("flops", "seconds", "expected"), [
    (15.7e9, 0.16, 105.0),  # 15.7 GFLOP in 0.16 - 0.01 s
    (1e9, 0.011, 182.0),  # at most half of a step is latency
    (3e11, 1.01, 300.0),
])
def test_step_gflops(flops: float, seconds: float, expected: float) -> None:
    assert S.step_gflops(flops, seconds) == expected
    assert S.StepTiming(8, flops, seconds, 3).gflops == expected


@pytest.mark.parametrize("dims", [2, 3])
def test_the_reference_step_is_the_planners_network(dims: int) -> None:
    for width in S.STEP_WIDTHS:
        config = S.reference_step_config(dims, width)
        net, rounded = network_for([1.0] * dims, list(S.STEP_REFERENCE_PATCH[dims]), dims=dims, base=width)
        assert (config.network, config.patch_size, config.batch_size) == (net, tuple(rounded), S.STEP_BATCH)
        assert (config.training.optimizer, config.training.num_workers) == ("adamw", 1)  # a CPU plan's, one worker


@pytest.mark.parametrize("dims", [2, 3])
def test_real_steps_on_a_tiny_network(dims: int) -> None:
    timings = S.time_training_steps(dims=dims, widths=(4, 8), threads=1, patch=TINY[dims], warmup=1, window_s=0.0)
    least = max(S.STEP_MIN_STEPS, S.STEP_ROUNDS)  # at least one step a round
    assert [t.width for t in timings] == [4, 8] and all(t.steps == least for t in timings)
    for t in timings:
        config = S.reference_step_config(dims, t.width, patch=TINY[dims])
        assert t.flops == estimate_training_flops(config.network, in_channels=1, num_classes=S.STEP_CLASSES,
                                                  patch_size=config.patch_size, dims=dims) * S.STEP_BATCH
        assert 0 < t.seconds < 30 and t.gflops > 0


def test_the_timing_window() -> None:
    # Each reading of the clock advances it 0.1 s: steps are timed until the window of 0.35 s has passed.
    clock = itertools.count(0.0, 0.1).__next__
    (timing,) = S.time_training_steps(dims=2, widths=(4,), threads=1, patch=TINY[2], warmup=0, window_s=0.35,
                                      min_steps=2, rounds=1, clock=clock)
    assert timing.steps == 5 and timing.seconds == pytest.approx(0.1)
    (capped,) = S.time_training_steps(dims=2, widths=(4,), threads=1, patch=TINY[2], warmup=0, window_s=10.0,
                                      max_steps=3, rounds=1, clock=itertools.count(0.0, 0.1).__next__)
    assert capped.steps == 3


def test_the_widths_take_turns_and_keep_their_median_round() -> None:
    # Three rounds of two widths, one step each (window 0): the clock is read when a window opens, when it is
    # checked after the step, and when it closes. The second round of width 4 is slow (a burst of another
    # tenant's load): its median round ignores it.
    seconds = [0.1, 0.2, 5.0, 0.2, 0.1, 0.2]  # round 1: width 4, width 8; round 2; round 3
    ticks = iter([t for s in seconds for t in (0.0, s, s)])
    four, eight = S.time_training_steps(dims=2, widths=(4, 8), threads=1, patch=TINY[2], warmup=0, window_s=0.0,
                                        min_steps=3, rounds=3, clock=ticks.__next__)
    assert (four.seconds, eight.seconds) == (pytest.approx(0.1), pytest.approx(0.2))
    assert four.steps == eight.steps == 3


def test_calibrate_steps_times_the_widths_and_the_probes_together(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake(groups: list[S.StepGroup], **kw: object) -> tuple[tuple[S.StepTiming, ...], ...]:
        seen.update(kw, groups=list(groups))
        def timing(w: int) -> S.StepTiming:
            return S.StepTiming(w, 15.7e9, 0.16, 5) if w == 8 else S.StepTiming(w, 6e10, 0.25 + STEP_LATENCY_S, 3)

        return tuple(tuple(timing(w) for w in g.widths) for g in groups)

    monkeypatch.setattr(S, "time_step_groups", fake)
    timed = S.calibrate_steps(threads=2, placement="own_core")
    assert timed.steps_3d == timed.steps_2d == ((8, 105.0), (16, 240.0), (32, 240.0))
    assert timed.probes == tuple((2, S.probe_name(*p), 240.0) for p in S.STEP_PROBES[2])
    assert seen["groups"] == [S.StepGroup(3), S.StepGroup(2), *(S.StepGroup(2, (w,), patch, batch)
                                                                for w, patch, batch in S.STEP_PROBES[2])]
    assert (seen["threads"], seen["placement"]) == (2, "own_core")


def test_time_training_steps_rejects_other_dims() -> None:
    with pytest.raises(ValueError, match="dims must be 2 or 3"):
        S.time_training_steps(dims=1)


# --- the thread placement ---------------------------------------------------------------------------------


@pytest.mark.skipif(not (thread_placement.affinity_supported() and len(thread_placement.usable_cpus()) >= 2),
                    reason="needs os.sched_setaffinity and at least 2 usable cores")
def test_own_core_steps_run_pinned_and_leave_the_process_as_it_was() -> None:
    cpus, threads_before = thread_placement.usable_cpus(), torch.get_num_threads()
    seen = []
    ticks = itertools.count(0.0, 0.1)

    def clock() -> float:  # read in the timing loop: what the training process runs on meanwhile
        seen.append((tuple(sorted(os.sched_getaffinity(0))), torch.get_num_threads()))
        return next(ticks)

    (timing,) = S.time_training_steps(dims=2, widths=(4,), threads=2, placement="own_core", patch=TINY[2],
                                      warmup=0, window_s=0.0, clock=clock)
    assert timing.placement == "own_core"
    assert set(seen) == {((cpus[0],), 1)}  # --threads 2: one training thread on the first core, the worker beside
    assert thread_placement.usable_cpus() == cpus and torch.get_num_threads() == threads_before


def test_a_single_thread_cannot_spare_a_core() -> None:
    (timing,) = S.time_training_steps(dims=2, widths=(4,), threads=1, placement="own_core", patch=TINY[2],
                                      warmup=0, window_s=0.0)
    assert timing.placement == "shared" and timing.steps == max(S.STEP_MIN_STEPS, S.STEP_ROUNDS)


@pytest.mark.parametrize(("layouts", "seconds", "expected"), [
    (("shared", "own_core"), {"shared": 0.30, "own_core": 0.27}, ("own_core", (("shared", 0.30), ("own_core", 0.27)))),
    (("shared", "own_core"), {"shared": 0.30, "own_core": 0.29}, ("shared", (("shared", 0.30), ("own_core", 0.29)))),
    (("shared", "shared"), {"shared": 0.30}, ("shared", (("shared", 0.30),))),  # no core to spare: not timed
])
def test_calibrate_placement_times_the_reference_step_under_each_placement(
        monkeypatch: pytest.MonkeyPatch, layouts: tuple[str, str], seconds: dict[str, float], expected) -> None:
    calls = []

    def fake(**kw: object) -> tuple[S.StepTiming, ...]:
        calls.append(kw)
        return (S.StepTiming(16, 1e9, seconds[str(kw["placement"])], 3, str(kw["placement"])),)

    applied = dict(zip(("shared", "own_core"), layouts))
    monkeypatch.setattr(S, "time_training_steps", fake)
    monkeypatch.setattr(S, "placement_layout", lambda p, **_: thread_placement.PlacementLayout(applied[p]))
    assert S.calibrate_placement(threads=2) == expected
    rounds = S.PLACEMENT_ROUNDS
    assert all((c["dims"], c["widths"], c["threads"], c["window_s"]) == (3, (S.PLACEMENT_WIDTH,), 2,
                                                                         S.PLACEMENT_WINDOW_S / rounds) for c in calls)
    timed = [str(c["placement"]) for c in calls]
    assert timed == (["shared", "own_core", "own_core", "shared"] * rounds)[:2 * rounds] if len(expected[1]) == 2 \
        else timed == ["shared"] * rounds


def test_the_placements_take_turns_and_keep_their_median(monkeypatch: pytest.MonkeyPatch) -> None:
    # Four rounds, shared / own_core in ABBA order: own_core's one slow round (a burst of load) is outvoted.
    times = iter([0.30, 0.28, 0.90, 0.31, 0.30, 0.28, 0.27, 0.31])  # shared, own, own, shared, shared, own, own, ..
    order = []

    def fake(**kw: object) -> tuple[S.StepTiming, ...]:
        order.append(kw["placement"])
        return (S.StepTiming(16, 1e9, next(times), 3, str(kw["placement"])),)

    monkeypatch.setattr(S, "time_training_steps", fake)
    monkeypatch.setattr(S, "placement_layout", lambda p, **_: thread_placement.PlacementLayout(p))
    seconds = dict(S.time_placements(threads=2, rounds=4))
    assert order == ["shared", "own_core", "own_core", "shared"] * 2
    assert seconds == {"shared": pytest.approx(0.305), "own_core": pytest.approx(0.28)}


# --- the step's shape: parameters beyond the reference network's ------------------------------------------


def _timed(per_parameter: float, table: dict[int, float], dims: int, width: int, patch=None,
           batch: int = S.STEP_BATCH) -> float:
    """The GFLOP/s a step shows when it costs its reference's seconds per GFLOP plus ``per_parameter`` seconds per
    million parameters beyond the reference's at its FLOPs."""
    g, p = S._step_size(dims, width, patch, batch)
    g_ref, p_ref = S._step_size(dims, width)
    seconds = g / table[width] + per_parameter * max(0.0, p - g / g_ref * p_ref)
    return g / seconds


WIDTHS_2D = {8: 80.0, 16: 150.0, 32: 210.0}


@pytest.mark.parametrize("per_parameter", [0.0, 0.004, 0.011, 0.03])
def test_the_fit_recovers_the_parameter_cost_that_made_the_timings(per_parameter: float) -> None:
    probes = tuple((S.probe_name(*probe), _timed(per_parameter, WIDTHS_2D, 2, *probe)) for probe in S.STEP_PROBES[2])
    cost = S.fit_step_shape_cost(2, tuple(WIDTHS_2D.items()), probes)
    assert cost.seconds_per_m_parameters == pytest.approx(per_parameter, abs=2e-5)
    assert [w for w, _ in cost.parameters_per_gflop_by_width] == list(S.STEP_WIDTHS)
    for w, ratio in cost.parameters_per_gflop_by_width:
        g, p = S._step_size(2, w)
        assert ratio == pytest.approx(p / g, rel=1e-2)


def test_a_deep_network_pays_for_its_parameters_a_shallow_one_is_not_credited() -> None:
    """openkbp_hn_ct's 2d plan (6 stages on 128x128): the width's throughput alone under-estimated it 1.48x."""
    probes = tuple((S.probe_name(*probe), _timed(0.011, WIDTHS_2D, 2, *probe)) for probe in S.STEP_PROBES[2])
    cost = S.fit_step_shape_cost(2, tuple(WIDTHS_2D.items()), probes)
    g, p = S._step_size(2, 32, (128, 128), 2)
    excess = cost.excess_seconds(flops=g * 1e9, parameters=p * 1e6, width=32)
    assert g / WIDTHS_2D[32] + excess == pytest.approx(g / _timed(0.011, WIDTHS_2D, 2, 32, (128, 128), 2), rel=1e-3)
    assert excess > 0.5 * g / WIDTHS_2D[32]
    g, p = S._step_size(2, 32, (56, 40), 22)  # hippocampus' 2d: 4 stages, fewer parameters per FLOP
    assert cost.excess_seconds(flops=g * 1e9, parameters=p * 1e6, width=32) == 0.0


def test_no_probe_no_cost_and_a_faster_probe_costs_nothing() -> None:
    widths = tuple(WIDTHS_2D.items())
    assert S.fit_step_shape_cost(2, widths, ()) is None
    assert S.fit_step_shape_cost(3, widths, (("w32 128x128 b2", 100.0),)) is None  # no 3D probes
    assert S.fit_step_shape_cost(2, widths, (("w32 64x64 b2", 100.0),)) is None  # not a probe (any more)
    assert S.fit_step_shape_cost(2, ((8, 80.0),), (("w32 128x128 b2", 100.0),)) is None  # its width not timed
    assert S.fit_step_shape_cost(2, widths, (("w32 128x128 b2", 900.0),)).seconds_per_m_parameters == 0.0


def test_groups_take_turns_on_their_own_loaders() -> None:
    # A 3D and a 2D group, two rounds: each group's figure is its own (its own network and loader).
    three, two = S.time_step_groups([S.StepGroup(3, (4,), TINY[3]), S.StepGroup(2, (4, 8), TINY[2], 1)], threads=1,
                                    warmup=0, window_s=0.0, min_steps=2, rounds=2)
    assert [t.width for t in three] == [4] and [t.width for t in two] == [4, 8]
    assert all(t.steps == 2 and t.seconds > 0 for t in (*three, *two))
    assert two[0].flops == estimate_training_flops(S.reference_step_config(2, 4, patch=TINY[2]).network, in_channels=1,
                                                   num_classes=S.STEP_CLASSES, patch_size=TINY[2], dims=2)


def test_every_probe_is_at_a_timed_width_and_the_price_is_capped() -> None:
    assert all(w in S.STEP_WIDTHS for probes in S.STEP_PROBES.values() for w, _, _ in probes)
    slow = S.fit_step_shape_cost(2, tuple(WIDTHS_2D.items()), (("w32 128x128 b2", 0.5),))  # absurdly slow
    for w, ratio in slow.parameters_per_gflop_by_width:  # never more than a reference step's time per parameter
        assert slow.seconds_per_m_parameters <= (1 / WIDTHS_2D[w]) / ratio * 1.01
