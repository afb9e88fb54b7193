"""The planner's cost model: network and data pipeline, how they combine per device, and what the planner does
with a data-bound device. Profiles are built by hand (no timing), so every figure is exact."""

from __future__ import annotations

import dataclasses
import math

import pytest

from automedseg import cost_model as M
from automedseg.augmentation_sampler import sampling_patch_size
from automedseg.device_profile import interpolate_by_width
from automedseg.network import estimate_training_flops
from automedseg.network_cost import estimate_parameters
from automedseg.planning import DATA_BOUND_WIDTHS, NOMINAL_PROFILES, network_for, plan_dataset
from automedseg.plans import AugmentationPlan, DeviceProfile, StepShapeCost

CPU = NOMINAL_PROFILES["reference-cpu-2core"]
GPU = NOMINAL_PROFILES["reference-gpu-24g"]
NO_DATA = {"window_voxels_per_s": None, "augment_voxels_per_s": None}
PATCH = (40, 56, 40)


def _net(base: int = 24, patch: tuple[int, ...] = PATCH, dims: int = 3):
    return network_for([1.0] * dims, list(patch), dims=dims, base=base)


def _profile(base: DeviceProfile, **kw: object) -> DeviceProfile:
    return dataclasses.replace(base, **kw)


def _estimate(device: DeviceProfile, *, batch: int = 2, base: int = 24, patch: tuple[int, ...] = PATCH,
              **kw: object) -> M.StepEstimate:
    net, rounded = _net(base, patch, len(patch))
    return M.estimate_step(net, rounded, batch=batch, dims=len(patch), in_channels=1, num_classes=3, device=device,
                           **kw)


# --- the network ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "dims", "factor"), [
    (CPU, 3, M.CPU_STEP_OVERHEAD),
    (CPU, 2, M.CPU_STEP_OVERHEAD / M.CPU_2D_CONV_EFFICIENCY),  # no 2D timing: the fixed efficiency
    (_profile(CPU, gflops_by_width_2d=CPU.gflops_by_width), 2, M.CPU_STEP_OVERHEAD),  # 2D timed: no factor
    (GPU, 2, M.GPU_STEP_OVERHEAD),
])
def test_network_step_overheads(device: DeviceProfile, dims: int, factor: float) -> None:
    patch = PATCH if dims == 3 else (224, 192)
    net, rounded = _net(32, patch, dims)
    flops = estimate_training_flops(net, in_channels=1, num_classes=3, patch_size=tuple(rounded), dims=dims) * 2
    expected = factor * flops / (device.gflops_at(32, dims=dims) * 1e9) + M.STEP_LATENCY_S
    got = M.network_step_seconds(net, rounded, batch=2, dims=dims, in_channels=1, num_classes=3, device=device)
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("gflops_2d", [500.0, 1000.0, 2000.0])
def test_2d_calibration_is_used_when_present(gflops_2d: float) -> None:
    net, rounded = _net(32, (224, 192), 2)
    timed = _profile(CPU, gflops_by_width_2d=((8, gflops_2d), (64, gflops_2d)))
    seconds = M.network_step_seconds(net, rounded, batch=4, dims=2, in_channels=1, num_classes=3, device=timed)
    flops = estimate_training_flops(net, in_channels=1, num_classes=3, patch_size=tuple(rounded), dims=2) * 4
    assert seconds == pytest.approx(M.CPU_STEP_OVERHEAD * flops / (gflops_2d * 1e9) + M.STEP_LATENCY_S)


# --- the timed training steps (CPU) -----------------------------------------------------------------------

STEPS_3D = ((8, 110.0), (16, 230.0), (32, 310.0))
STEPS_2D = ((8, 60.0), (16, 140.0), (32, 230.0))
TIMED = _profile(CPU, step_gflops_by_width=STEPS_3D, step_gflops_by_width_2d=STEPS_2D)


@pytest.mark.parametrize(("dims", "patch", "base"), [(3, PATCH, 8), (3, PATCH, 12), (3, PATCH, 32), (3, PATCH, 64),
                                                     (2, (224, 192), 8), (2, (56, 40), 24)])
def test_timed_steps_replace_the_overheads_and_the_worker(dims: int, patch, base: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(M, "CPU_AUGMENT_SHARE", 1.4)  # what the timing holds is not added again
    net, rounded = _net(base, patch, dims)
    flops = estimate_training_flops(net, in_channels=1, num_classes=3, patch_size=tuple(rounded), dims=dims) * 4
    expected = flops / (TIMED.step_gflops_at(base, dims=dims) * 1e9) + M.STEP_LATENCY_S
    assert M.network_step_seconds(net, rounded, batch=4, dims=dims, in_channels=1, num_classes=3,
                                  device=TIMED) == pytest.approx(expected)
    est = _estimate(TIMED, batch=4, base=base, patch=patch)
    assert (est.network_s, est.data_s, est.seconds, est.data_bound, est.timed_step) == (
        pytest.approx(expected), 0.0, pytest.approx(expected), False, True)
    assert est.describe().endswith("s, from the timed training steps")


def test_the_timed_step_is_interpolated_between_widths() -> None:
    assert TIMED.step_gflops_at(8) == 110.0 and TIMED.step_gflops_at(64) == 310.0  # the ends beyond the table
    assert TIMED.step_gflops_at(12) == pytest.approx(110.0 * (230.0 / 110.0) ** math.log2(12 / 8))  # log-linear
    assert TIMED.step_gflops_at(16, dims=2) == pytest.approx(140.0)


@pytest.mark.parametrize(("device", "dims"), [
    (_profile(CPU, step_gflops_by_width=STEPS_3D), 2),  # 2D not timed: the convolution figures and overheads
    (_profile(CPU, step_gflops_by_width_2d=STEPS_2D), 3),
    (_profile(GPU, step_gflops_by_width=STEPS_3D, step_gflops_by_width_2d=STEPS_2D), 3),  # GPU: unchanged
    (_profile(GPU, step_gflops_by_width=STEPS_3D, step_gflops_by_width_2d=STEPS_2D), 2),
])
def test_without_timed_steps_for_the_dims_the_old_path_is_kept(device: DeviceProfile, dims: int) -> None:
    patch = PATCH if dims == 3 else (224, 192)
    untimed = _profile(device, step_gflops_by_width=None, step_gflops_by_width_2d=None)
    net, rounded = _net(32, patch, dims)
    kw = {"batch": 2, "dims": dims, "in_channels": 1, "num_classes": 3}
    assert M.network_step_seconds(net, rounded, device=device, **kw) == M.network_step_seconds(
        net, rounded, device=untimed, **kw)
    assert not _estimate(device, patch=patch, base=32).timed_step


def test_in_process_batches_still_add_to_a_timed_step() -> None:
    est = _estimate(TIMED, workers=0)
    assert est.seconds == pytest.approx(est.network_s + est.data_s) and est.data_s > 0


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_the_planner_fits_the_timed_step(synthetic_fingerprint, factor: float) -> None:
    fp = _hippocampus_like(synthetic_fingerprint)
    device = _profile(TIMED, step_gflops_by_width=tuple((w, g * factor) for w, g in STEPS_3D))
    config = plan_dataset(fp, device=device, time_budget_s=1200, configurations=["3d_fullres"]).configuration(
        "3d_fullres")
    est = M.estimate_step(config.network, config.patch_size, batch=config.batch_size, dims=3, in_channels=1,
                          num_classes=3, device=device)
    assert est.timed_step and config.training.estimated_seconds_per_iteration == pytest.approx(round(est.seconds, 4))
    assert "from the timed training steps" in config.notes[-1]
    slow = plan_dataset(fp, device=_profile(TIMED, step_gflops_by_width=tuple((w, g / 4) for w, g in STEPS_3D)),
                        time_budget_s=1200, configurations=["3d_fullres"]).configuration("3d_fullres")
    # a machine four times slower per step cannot afford a wider network or larger patch and batch
    assert math.prod(slow.patch_size) * slow.batch_size * slow.network.features_per_stage[0] <= (
        math.prod(config.patch_size) * config.batch_size * config.network.features_per_stage[0])


# --- the data pipeline ------------------------------------------------------------------------------------


def test_data_cpu_seconds_are_windows_plus_augmentation() -> None:
    aug = M.default_augmentation(PATCH, 3)
    window = math.prod(sampling_patch_size(PATCH, aug, dims=3))
    per_sample = window / CPU.window_voxels_per_s + math.prod(PATCH) / CPU.augment_rate(3)
    assert M.data_cpu_seconds(PATCH, batch=3, dims=3, device=CPU) == pytest.approx(3 * per_sample)
    windows_only = M.data_cpu_seconds(PATCH, batch=3, dims=3, device=CPU, on_device=True)
    assert windows_only == pytest.approx(3 * window / CPU.window_voxels_per_s)


@pytest.mark.parametrize(("patch", "dims", "dummy_2d", "rate_dims"), [
    ((40, 56, 40), 3, False, 3),
    ((8, 160, 160), 3, True, 2),  # anisotropic patch: in-plane spatial augmentation, the 2D rate
    ((224, 192), 2, False, 2),
])
def test_the_augmentation_rate_follows_the_spatial_transform(patch, dims: int, dummy_2d: bool, rate_dims: int) -> None:
    aug = M.default_augmentation(patch, dims)
    assert aug.do_dummy_2d == dummy_2d
    device = _profile(CPU, augment_voxels_per_s=((rate_dims, 1e6),), window_voxels_per_s=1e30)
    assert M.data_cpu_seconds(patch, batch=1, dims=dims, device=device) == pytest.approx(math.prod(patch) / 1e6)


def test_a_profile_without_data_figures_has_a_free_data_pipeline() -> None:
    old = _profile(CPU, **NO_DATA)
    est = _estimate(old)
    assert est.data_s == 0.0 and est.seconds == est.network_s and not est.data_bound


@pytest.mark.parametrize("augment_rate", [2e7, 5e6, 1e6, 2e5])
def test_the_cpu_step_adds_the_workers_share(augment_rate: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU the worker's time is added at CPU_AUGMENT_SHARE (0 as measured on the EPYC runs on record: the
    plans stay those of the network alone); with a share, slower augmentation makes a slower step."""
    device = _profile(CPU, augment_voxels_per_s=((2, augment_rate), (3, augment_rate)))
    free = _estimate(_profile(CPU, **NO_DATA))
    assert _estimate(device).seconds == pytest.approx(free.seconds)  # the shipped share: 0
    monkeypatch.setattr(M, "CPU_AUGMENT_SHARE", 1.4)
    est = _estimate(device)
    cpu_s = M.data_cpu_seconds(_net()[1], batch=2, dims=3, device=device)
    assert est.network_s == free.network_s
    assert est.seconds == pytest.approx(free.seconds + 1.4 * cpu_s)  # the worker shares the cores
    assert not est.data_bound
    slower = _estimate(_profile(device, augment_voxels_per_s=((2, augment_rate / 2), (3, augment_rate / 2))))
    assert slower.seconds > est.seconds


@pytest.mark.parametrize(("workers", "window_rate", "bound"), [
    (11, 1e12, False),  # fast workers: the network's step
    (11, 1e6, True),  # slow workers: the data time
    (1, 1e7, True),
])
def test_gpu_step_is_the_longer_of_network_and_data(workers: int, window_rate: float, bound: bool) -> None:
    device = _profile(GPU, window_voxels_per_s=window_rate, augment_voxels_per_s=((2, 1e7), (3, 1e7)))
    est = _estimate(device, batch=4, workers=workers)
    data = M.data_cpu_seconds(_net()[1], batch=4, dims=3, device=device, on_device=True) / workers
    assert est.data_s == pytest.approx(data)
    assert est.seconds == pytest.approx(max(est.network_s, data)) and est.data_bound == bound


@pytest.mark.parametrize(("requested", "augmentation_counted"), [(None, False), (True, False), (False, True)])
def test_cuda_workers_augment_only_when_augmentation_is_off_the_device(requested, augmentation_counted) -> None:
    device = _profile(GPU, window_voxels_per_s=2e8, augment_voxels_per_s=((2, 1e6), (3, 1e6)))
    est = _estimate(device, augment_on_device=requested, workers=1)
    windows = M.data_cpu_seconds(_net()[1], batch=2, dims=3, device=device, on_device=True)
    assert (est.data_s > 1.5 * windows) == augmentation_counted


def test_in_process_batches_add_to_the_step() -> None:
    est = _estimate(_profile(GPU, window_voxels_per_s=1e7), workers=0)
    assert est.seconds == pytest.approx(est.network_s + est.data_s) and not est.data_bound


@pytest.mark.parametrize(("kind", "threads", "workers"), [("cpu", 2, 1), ("cpu", 64, 1), ("cuda", 16, 12),
                                                          ("cuda", 4, 3), ("cuda", 1, 1), ("mps", 8, 7)])
def test_data_workers(kind: str, threads: int, workers: int) -> None:
    assert M.data_workers(_profile(CPU, kind=kind, cpu_threads=threads)) == workers


# --- the planner with a data-bound device -----------------------------------------------------------------


def _hippocampus_like(make) -> dict:
    return make([(1.0, 1.0, 1.0)] * 20, [(36, 50, 35)] * 20, labels={"background": 0, "anterior": 1,
                                                                        "posterior": 2})


@pytest.mark.parametrize("budget", [None, 240.0])
def test_a_data_bound_gpu_gets_a_wider_network_than_with_free_data(synthetic_fingerprint, budget) -> None:
    fp = _hippocampus_like(synthetic_fingerprint)
    free = plan_dataset(fp, device=GPU, time_budget_s=budget, configurations=["3d_fullres"])
    slow = _profile(GPU, window_voxels_per_s=5e7, augment_voxels_per_s=((2, 5e5), (3, 5e5)))
    fed = plan_dataset(fp, device=slow, time_budget_s=budget, configurations=["3d_fullres"])
    a, b = free.configuration("3d_fullres"), fed.configuration("3d_fullres")
    assert not any("data-bound" in n for n in a.notes)
    assert a.batch_size == b.batch_size and a.patch_size == b.patch_size
    # with augmentation on the device the workers only read windows: not data-bound, the same plan
    assert a.network == b.network

    # The workers augment beside the device (MPS; CUDA with augment_on_device false): 11 workers at 5e5 voxels/s
    # leave the device idle.
    workers_augment = dataclasses.replace(slow, kind="mps")
    fed = plan_dataset(fp, device=workers_augment, time_budget_s=budget, configurations=["3d_fullres"])
    c = fed.configuration("3d_fullres")
    assert c.network.features_per_stage[0] > a.network.features_per_stage[0]
    note = next(n for n in c.notes if n.startswith("data-bound"))
    assert f"width raised to {c.network.features_per_stage[0]}" in note
    est = M.estimate_step(c.network, c.patch_size, batch=c.batch_size, dims=3, in_channels=1, num_classes=3,
                          device=workers_augment)
    assert est.data_bound or est.network_s == pytest.approx(est.data_s, rel=0.3)  # up to the data time
    assert c.training.estimated_seconds_per_iteration == pytest.approx(round(est.seconds, 4))
    assert "data-bound" in c.notes[-1]  # the summary line names it


def test_a_starved_device_gets_the_widest_candidate(synthetic_fingerprint) -> None:
    fp = _hippocampus_like(synthetic_fingerprint)
    starved = _profile(GPU, kind="mps", window_voxels_per_s=1e6, augment_voxels_per_s=((2, 1e5), (3, 1e5)))
    config = plan_dataset(fp, device=starved, configurations=["3d_fullres"]).configuration("3d_fullres")
    assert config.network.features_per_stage[0] == max(DATA_BOUND_WIDTHS)
    assert "width raised to 64" in next(n for n in config.notes if n.startswith("data-bound"))


def test_data_bound_with_no_wider_network_that_fits_the_data_time_says_the_device_idles(synthetic_fingerprint) -> None:
    fp = _hippocampus_like(synthetic_fingerprint)
    device = _profile(GPU, kind="mps", **NO_DATA)
    free = plan_dataset(fp, device=device, configurations=["3d_fullres"]).configuration("3d_fullres")
    batch, patch = free.batch_size, free.patch_size
    n32, n40 = (_estimate(device, batch=batch, base=w, patch=patch).network_s for w in (32, 40))
    # Workers that need a little more than the width-32 step, less than the width-40 one.
    window = math.prod(sampling_patch_size(patch, M.default_augmentation(patch, 3), dims=3))
    rate = batch * window / (M.data_workers(device) * (n32 + n40) / 2)
    slow = _profile(device, window_voxels_per_s=rate, augment_voxels_per_s=((2, 1e30), (3, 1e30)))
    config = plan_dataset(fp, device=slow, configurations=["3d_fullres"]).configuration("3d_fullres")
    assert config.network == free.network
    assert "the device idles" in next(n for n in config.notes if n.startswith("data-bound"))


@pytest.mark.parametrize(("steps", "expected"), [
    ([(64, 0.010, 0.020), (96, 0.025, 0.020)], 64),  # stops before the network outgrows the data time
    ([(64, 0.030, 0.020)], None),
    ([(64, 0.010, 0.020), (96, 0.015, 0.020)], 96),
])
def test_widen_for_data(steps, expected) -> None:
    table = {w: M.StepEstimate(n, d, max(n, d), d > n) for w, n, d in steps}
    nets = {w: _net(w)[0] for w in table}
    got = M.widen_for_data(lambda w: (nets[w], PATCH), list(table),
                           estimate=lambda net, _: table[net.features_per_stage[0]], fits=lambda *_: True)
    assert (got[0].features_per_stage[0] if got else None) == expected


def test_widen_for_data_stops_at_memory() -> None:
    nets = {w: _net(w)[0] for w in (40, 48)}
    got = M.widen_for_data(lambda w: (nets[w], PATCH), [40, 48],
                           estimate=lambda net, _: M.StepEstimate(0.01, 0.02, 0.02, True),
                           fits=lambda net, _: net.features_per_stage[0] < 48)
    assert got is not None and got[0].features_per_stage[0] == 40


# --- notes and the trainer's line -------------------------------------------------------------------------


@pytest.mark.parametrize(("est", "text"), [
    (M.StepEstimate(0.29, 0.0, 0.29, False), "network 0.29 s"),
    (M.StepEstimate(0.29, 0.06, 0.35, False), "network 0.29 s + augmentation worker 0.06 s"),
    (M.StepEstimate(0.02, 0.01, 0.02, False), "network 0.02 s, data 0.01 s in parallel"),
    (M.StepEstimate(0.02, 0.03, 0.03, True), "data-bound: the workers need 0.03 s a batch, the network 0.02 s"),
])
def test_step_estimate_describe(est: M.StepEstimate, text: str) -> None:
    assert est.describe() == text


@pytest.mark.parametrize(("predicted", "measured", "text"), [
    (0.30, 0.42, ", planned 0.300 s/it (measured 1.40x)"),
    (0.5, 0.25, ", planned 0.500 s/it (measured 0.50x)"),
    (None, 0.42, ""),
    (0.3, float("nan"), ""),
])
def test_step_ratio_note(predicted, measured: float, text: str) -> None:
    assert M.step_ratio_note(predicted, measured) == text


def test_the_nominal_cpu_plan_notes_name_the_worker_when_it_counts(synthetic_fingerprint,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    fp = _hippocampus_like(synthetic_fingerprint)

    def note() -> str:
        return plan_dataset(fp, device=CPU, time_budget_s=1200, configurations=["3d_fullres"]).configuration(
            "3d_fullres").notes[-1]

    assert "augmentation worker" not in note()  # the shipped share is 0: the network's step alone
    monkeypatch.setattr(M, "CPU_AUGMENT_SHARE", 1.4)
    assert "augmentation worker" in note()


def test_default_augmentation_matches_the_planner(synthetic_fingerprint) -> None:
    fp = _hippocampus_like(synthetic_fingerprint)
    config = plan_dataset(fp, device=CPU, time_budget_s=1200, configurations=["3d_fullres"]).configuration(
        "3d_fullres")
    aug = M.default_augmentation(config.patch_size, 3)
    assert sampling_patch_size(config.patch_size, aug, dims=3) == sampling_patch_size(
        config.patch_size, config.augmentation, dims=3)
    assert isinstance(aug, AugmentationPlan)


# --- where the augmentation worker runs ---------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "expected"), [
    ({"shared": 0.300, "own_core": 0.285}, "own_core"),  # exactly the margin: 5 % faster
    ({"shared": 0.300, "own_core": 0.286}, "shared"),  # 4.7 % faster: within the noise, the core stays shared
    ({"shared": 0.300, "own_core": 0.200}, "own_core"),
    ({"shared": 0.300, "own_core": 0.300}, "shared"),
    ({"shared": 0.200, "own_core": 0.300}, "shared"),  # own_core slower
    ({"shared": 0.300}, "shared"),  # one usable core: own_core was not timed
    ({}, "shared"),
])
def test_choose_worker_placement(seconds: dict[str, float], expected: str) -> None:
    assert M.choose_worker_placement(seconds) == expected


def test_choose_worker_placement_margin() -> None:
    seconds = {"shared": 0.300, "own_core": 0.280}  # 6.7 % faster
    assert M.choose_worker_placement(seconds, margin=0.05) == "own_core"
    assert M.choose_worker_placement(seconds, margin=0.10) == "shared"


PLACEMENT_S = (("shared", 0.31), ("own_core", 0.27))


@pytest.mark.parametrize(("device", "mode", "reason"), [
    (CPU, "shared", ""),  # nominal: no placement timed
    (_profile(CPU, worker_placement="own_core", placement_step_seconds=PLACEMENT_S), "own_core",
     "augmentation worker on a core of its own, training on the others: the calibration's 3D training step took "
     "0.27 s with the worker on a core of its own, 0.31 s sharing all cores (13 % faster)"),
    (_profile(CPU, worker_placement="shared", placement_step_seconds=(("shared", 0.31), ("own_core", 0.30))),
     "shared", "augmentation worker sharing the cores with the training threads: the calibration's 3D training "
     "step took 0.3 s with the worker on a core of its own, 0.31 s sharing all cores (a core of its own is chosen "
     "from 5 % faster)"),
    (_profile(CPU, worker_placement="shared", placement_step_seconds=(("shared", 0.31),)), "shared", ""),  # 1 core
    (_profile(GPU, worker_placement="own_core", placement_step_seconds=PLACEMENT_S), "shared", ""),  # GPU: ignored
])
def test_worker_placement_for(device: DeviceProfile, mode: str, reason: str) -> None:
    assert M.worker_placement_for(device) == (mode, reason)


def test_the_planner_copies_the_calibrations_placement_and_notes_it(synthetic_fingerprint) -> None:
    fp = _hippocampus_like(synthetic_fingerprint)

    def plan(device: DeviceProfile):
        return plan_dataset(fp, device=device, time_budget_s=1200, configurations=["3d_fullres", "2d"])

    for name, config in plan(_profile(CPU, worker_placement="own_core",
                                      placement_step_seconds=PLACEMENT_S)).configurations.items():
        assert config.training.worker_placement == "own_core", name
        assert any(n.startswith("augmentation worker on a core of its own") for n in config.notes[:-1]), name
        assert "s/iteration" in config.notes[-1]  # the schedule line stays last
    for config in plan(CPU).configurations.values():  # no placement timed: shared, no note
        assert config.training.worker_placement == "shared"
        assert not any("core of its own" in n for n in config.notes)


SHAPE_2D = StepShapeCost(2, ((8, 0.141), (16, 0.149), (32, 0.153)), 0.0106)


@pytest.mark.parametrize(("patch", "batch", "base", "charged"), [
    ((128, 128), 2, 32, True),  # 6 stages to 512 features on a small patch: more parameters per FLOP
    ((56, 40), 22, 32, False),  # 4 stages on small slices: fewer, not credited
    ((96, 96), 8, 8, False),  # one stage fewer than the reference on 224x224
])
def test_a_step_shape_cost_charges_the_parameters_beyond_the_reference(patch, batch: int, base: int,
                                                                       charged: bool) -> None:
    device = _profile(TIMED, step_shape_costs=(SHAPE_2D,))
    net, rounded = _net(base, patch, 2)
    kw = {"in_channels": 1, "num_classes": 3, "dims": 2}
    flops = estimate_training_flops(net, patch_size=tuple(rounded), **kw) * batch
    excess = max(0.0, estimate_parameters(net, **kw) / 1e6
                 - flops / 1e9 * interpolate_by_width(SHAPE_2D.parameters_per_gflop_by_width, base)) * 0.0106
    assert (excess > 0) == charged
    expected = flops / (TIMED.step_gflops_at(base, dims=2) * 1e9) + excess + M.STEP_LATENCY_S
    assert M.network_step_seconds(net, rounded, batch=batch, device=device, **kw) == pytest.approx(expected, rel=1e-5)
    assert M.estimate_step(net, rounded, batch=batch, device=device, **kw).timed_step
    # 3D networks (no 3D entry here) keep the timed throughput
    net3, rounded3 = _net(16, PATCH, 3)
    kw3 = {**kw, "dims": 3, "batch": 2}
    assert M.network_step_seconds(net3, rounded3, device=device, **kw3) == M.network_step_seconds(
        net3, rounded3, device=TIMED, **kw3)


def test_the_plan_note_names_the_parameter_charge(synthetic_fingerprint) -> None:
    device = _profile(TIMED, step_shape_costs=(SHAPE_2D,))
    net, rounded = _net(32, (128, 128), 2)
    kw = {"batch": 2, "dims": 2, "in_channels": 1, "num_classes": 3}
    est = M.estimate_step(net, rounded, device=device, **kw)
    flops = estimate_training_flops(net, in_channels=1, num_classes=3, patch_size=tuple(rounded), dims=2) * 2
    assert est.parameter_s == pytest.approx(M.parameter_charge_seconds(net, flops=flops, device=device, dims=2,
                                                                       in_channels=1, num_classes=3))
    assert est.parameter_s > 0 and f"({est.parameter_s:.2g} s of it for parameters" in est.describe()
    assert M.estimate_step(net, rounded, device=TIMED, **kw).parameter_s == 0.0
    fp = synthetic_fingerprint([(1.0, 0.8, 0.8)] * 20, [(60, 128, 128)] * 20)
    config = plan_dataset(fp, device=_profile(device, step_shape_costs=(dataclasses.replace(
        SHAPE_2D, seconds_per_m_parameters=1e-4),)), time_budget_s=1200, configurations=["2d"]).configuration("2d")
    assert "s of it for parameters beyond the reference's" in config.notes[-1]
