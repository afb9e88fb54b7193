"""Tests for automedseg.planning: the rules that map a fingerprint and a machine to a plan.

Fingerprints are built directly (``synthetic_fingerprint`` fixture) from just what the planner reads,
and the devices are the nominal profiles, so every test is deterministic and takes milliseconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from automedseg import planning as P
from automedseg.fingerprint import ClassStats
from automedseg.planning import (
    DEFAULT_CPU_BUDGET_S,
    GPU_DEFAULT_EPOCHS,
    ITERATIONS_PER_EPOCH_MAX,
    NOMINAL_PROFILES,
    initial_patch,
    measure_device,
    plan_dataset,
    pooling_topology,
    target_spacing,
)
from automedseg.plans import Plans
from automedseg.topology import MIN_STRUCTURE_PX

CPU = NOMINAL_PROFILES["reference-cpu-2core"]
GPU = NOMINAL_PROFILES["reference-gpu-24g"]
DEVICES = {"cpu": CPU, "gpu": GPU}


def _fp(make, spacing, shape, n=3, **kw):
    return make([spacing] * n, [shape] * n, **kw)


# ----------------------------------------------------------------------------------------------------
# axis order, kernels, separate_z
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", sorted(DEVICES))
@pytest.mark.parametrize("spacing,shape,transpose", [
    ((3.0, 0.8, 0.8), (40, 160, 150), (0, 1, 2)),
    ((0.8, 3.0, 0.8), (160, 40, 150), (1, 0, 2)),
    ((0.8, 0.8, 3.0), (160, 150, 40), (2, 0, 1)),
])
def test_anisotropic_coarse_axis_first(synthetic_fingerprint, device, spacing, shape, transpose):
    plans = plan_dataset(_fp(synthetic_fingerprint, spacing, shape), device=DEVICES[device], time_budget_s=1200)
    assert plans.transpose_forward == transpose
    assert plans.original_median_spacing_mm == pytest.approx(spacing)
    cfg = plans.configuration("3d_fullres")
    assert cfg.spacing_mm == pytest.approx((3.0, 0.8, 0.8))
    assert cfg.median_shape == (40, 160, 150)
    assert cfg.network.kernel_sizes[0] == (1, 3, 3)
    assert cfg.network.strides[1] == (1, 2, 2)  # in-plane pooling first
    assert cfg.separate_z is True
    assert cfg.out_of_plane_order == 0 and cfg.image_order == 3 and cfg.label_order == 1


@pytest.mark.parametrize("device", sorted(DEVICES))
def test_isotropic_gets_3x3x3(synthetic_fingerprint, device):
    plans = plan_dataset(_fp(synthetic_fingerprint, (1.0, 1.0, 1.0), (64, 72, 80)), device=DEVICES[device],
                         time_budget_s=1200)
    assert plans.transpose_forward == (0, 1, 2)
    cfg = plans.configuration("3d_fullres")
    assert all(k == (3, 3, 3) for k in cfg.network.kernel_sizes)
    assert all(s == (2, 2, 2) for s in cfg.network.strides[1:])
    assert cfg.separate_z is False
    assert cfg.augmentation.do_dummy_2d is False


@pytest.mark.parametrize("device", sorted(DEVICES))
@pytest.mark.parametrize("channels", [("gray",), ("R", "G", "B")])
def test_2d_dataset_gets_only_2d(synthetic_fingerprint, device, channels):
    fp = _fp(synthetic_fingerprint, (999.0, 0.5, 0.5), (1, 300, 260), channel_names=channels, is_2d=True)
    plans = plan_dataset(fp, device=DEVICES[device], time_budget_s=600)
    assert list(plans.configurations) == ["2d"]
    cfg = plans.configuration("2d")
    assert cfg.dims == 2 and len(cfg.patch_size) == 2
    assert all(len(k) == 2 for k in cfg.network.kernel_sizes + cfg.network.strides)
    assert cfg.spacing_mm == pytest.approx((999.0, 0.5, 0.5))
    assert cfg.separate_z is False
    assert cfg.augmentation.mirror_axes == (0, 1)
    assert plans.transpose_forward == (0, 1, 2)
    expected = "rgb_to_01" if channels == ("R", "G", "B") else "zscore"
    assert [n.scheme for n in cfg.normalization] == [expected] * len(channels)


def test_2d_on_3d_data_has_2d_topology(synthetic_fingerprint):
    plans = plan_dataset(_fp(synthetic_fingerprint, (3.0, 0.8, 0.8), (40, 160, 150)), device=CPU,
                         time_budget_s=1200, configurations=["2d"])
    assert list(plans.configurations) == ["2d"]
    cfg = plans.configuration("2d")
    assert cfg.dims == 2 and all(k == (3, 3) for k in cfg.network.kernel_sizes)
    assert cfg.patch_size[0] <= 160 + 16 and cfg.patch_size[1] <= 150 + 16


# ----------------------------------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels,schemes", [
    (("T1", "T2"), ["zscore", "zscore"]),
    (("FLAIR", "T1w", "T1gd", "T2w"), ["zscore"] * 4),
    (("CT", "noNorm", "ADC"), ["ct", "none", "zscore"]),
])
def test_normalization_per_channel(synthetic_fingerprint, channels, schemes):
    plans = plan_dataset(_fp(synthetic_fingerprint, (1.0, 1.0, 1.0), (48, 48, 48), channel_names=channels),
                         device=CPU, time_budget_s=600)
    for cfg in plans.configurations.values():
        assert [n.scheme for n in cfg.normalization] == schemes
    assert plans.channel_names == channels


def test_ct_uses_pooled_foreground_percentiles(synthetic_fingerprint):
    stats = {"mean": 61.5, "std": 140.25, "median": 55.0, "min": -950.0, "max": 2500.0, "p00_5": -79.5,
             "p99_5": 412.75}
    fp = _fp(synthetic_fingerprint, (2.5, 0.7, 0.7), (60, 200, 200), channel_names=("CT",), intensity=[stats])
    plans = plan_dataset(fp, device=CPU, time_budget_s=600)
    for cfg in plans.configurations.values():
        (norm,) = cfg.normalization
        assert norm.scheme == "ct"
        assert (norm.clip_low, norm.clip_high, norm.mean, norm.std) == (-79.5, 412.75, 61.5, 140.25)


def test_ct_zero_std_is_guarded(synthetic_fingerprint):
    stats = {"mean": 40.0, "std": 0.0, "median": 40.0, "min": 40.0, "max": 40.0, "p00_5": 40.0, "p99_5": 40.0}
    fp = _fp(synthetic_fingerprint, (1.0, 1.0, 1.0), (32, 32, 32), channel_names=("CT",), intensity=[stats])
    plans = plan_dataset(fp, device=CPU, time_budget_s=600)
    assert plans.configuration("3d_fullres").normalization[0].std > 0


# ----------------------------------------------------------------------------------------------------
# configurations: lowres, subsets
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,budget", [("cpu", None), ("cpu", 1200), ("gpu", 1200)])
def test_large_image_gets_lowres(synthetic_fingerprint, device, budget):
    plans = plan_dataset(_fp(synthetic_fingerprint, (1.0, 1.0, 1.0), (400, 400, 400)), device=DEVICES[device],
                         time_budget_s=budget)
    assert set(plans.configurations) == {"2d", "3d_fullres", "3d_lowres"}
    full, low = plans.configuration("3d_fullres"), plans.configuration("3d_lowres")
    assert all(lo > fu for lo, fu in zip(low.spacing_mm, full.spacing_mm))
    assert math.prod(low.median_shape) < math.prod(full.median_shape)
    assert low.data_identifier != full.data_identifier and low.data_identifier.startswith("lowres")
    assert math.prod(full.patch_size) / math.prod(full.median_shape) < 0.25


@pytest.mark.parametrize("device", sorted(DEVICES))
def test_small_image_has_no_lowres(synthetic_fingerprint, device):
    plans = plan_dataset(_fp(synthetic_fingerprint, (3.0, 0.8, 0.8), (8, 24, 24)), device=DEVICES[device])
    assert set(plans.configurations) == {"2d", "3d_fullres"}


@pytest.mark.parametrize("wanted", [["3d_fullres"], ["2d"], ["3d_lowres"], ["2d", "3d_lowres"]])
def test_configuration_subset(synthetic_fingerprint, wanted):
    plans = plan_dataset(_fp(synthetic_fingerprint, (1.0, 1.0, 1.0), (400, 400, 400)), device=CPU,
                         time_budget_s=1200, configurations=wanted)
    assert sorted(plans.configurations) == sorted(wanted)


# ----------------------------------------------------------------------------------------------------
# time budget and schedule
# ----------------------------------------------------------------------------------------------------

DATASETS = {
    "aniso_small": ((3.0, 0.8, 0.8), (8, 24, 24)),
    "aniso_ct": ((5.0, 0.7, 0.7), (80, 512, 512)),
    "iso_mid": ((1.0, 1.0, 1.0), (128, 128, 128)),
    "iso_large": ((1.0, 1.0, 1.0), (400, 400, 400)),
    "hippocampus": ((1.0, 1.0, 1.0), (36, 50, 35)),
}


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("budget", [1200.0, 300.0])
def test_cpu_budget_is_respected(synthetic_fingerprint, name, budget):
    spacing, shape = DATASETS[name]
    plans = plan_dataset(_fp(synthetic_fingerprint, spacing, shape), device=CPU, time_budget_s=budget)
    for cfg in plans.configurations.values():
        t = cfg.training
        assert t.time_budget_s == budget
        assert t.estimated_fold_seconds is not None and t.estimated_fold_seconds <= budget, cfg.name
        assert (t.epochs, t.iterations_per_epoch) != (GPU_DEFAULT_EPOCHS, ITERATIONS_PER_EPOCH_MAX)
        assert t.estimated_fold_seconds == pytest.approx(
            t.estimated_seconds_per_iteration * t.epochs * t.iterations_per_epoch, rel=1e-2)
        assert t.num_workers == 1
        assert 1 <= t.iterations_per_epoch <= ITERATIONS_PER_EPOCH_MAX


def test_cpu_without_budget_uses_the_default(synthetic_fingerprint):
    plans = plan_dataset(_fp(synthetic_fingerprint, *DATASETS["iso_mid"]), device=CPU)
    for cfg in plans.configurations.values():
        assert cfg.training.time_budget_s == DEFAULT_CPU_BUDGET_S
        assert cfg.training.estimated_fold_seconds <= DEFAULT_CPU_BUDGET_S
        assert any("CPU default" in n for n in cfg.notes)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_gpu_without_budget_is_nnunet_schedule(synthetic_fingerprint, name):
    plans = plan_dataset(_fp(synthetic_fingerprint, *DATASETS[name]), device=GPU)
    for cfg in plans.configurations.values():
        t = cfg.training
        assert (t.epochs, t.iterations_per_epoch) == (GPU_DEFAULT_EPOCHS, ITERATIONS_PER_EPOCH_MAX)
        assert t.time_budget_s is None
        assert t.num_workers == GPU.cpu_threads - 1


def test_smaller_budget_never_gives_a_bigger_schedule(synthetic_fingerprint):
    fp = _fp(synthetic_fingerprint, *DATASETS["iso_mid"])
    small = plan_dataset(fp, device=CPU, time_budget_s=300).configuration("3d_fullres").training
    large = plan_dataset(fp, device=CPU, time_budget_s=3600).configuration("3d_fullres").training
    assert small.epochs * small.iterations_per_epoch * small.estimated_seconds_per_iteration <= (
        large.epochs * large.iterations_per_epoch * large.estimated_seconds_per_iteration)


# ----------------------------------------------------------------------------------------------------
# structural invariants and determinism
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", sorted(DEVICES))
@pytest.mark.parametrize("name", sorted(DATASETS))
def test_plan_invariants(synthetic_fingerprint, device, name):
    plans = plan_dataset(_fp(synthetic_fingerprint, *DATASETS[name]), device=DEVICES[device], time_budget_s=1200,
                         seed=7)
    assert plans.device == DEVICES[device]
    for cfg in plans.configurations.values():
        net = cfg.network
        assert net.strides[0] == (1,) * cfg.dims
        divisor = [math.prod(s[i] for s in net.strides) for i in range(cfg.dims)]
        assert all(p % d == 0 for p, d in zip(cfg.patch_size, divisor)), (cfg.patch_size, divisor)
        assert cfg.batch_size >= 2
        assert len(net.n_conv_per_stage_decoder) == net.n_stages - 1
        assert list(net.features_per_stage) == sorted(net.features_per_stage)
        assert cfg.training.seed == 7
        assert len(cfg.normalization) == 1


@pytest.mark.parametrize("device", sorted(DEVICES))
@pytest.mark.parametrize("budget", [None, 900.0])
def test_same_inputs_give_identical_json(synthetic_fingerprint, device, budget):
    fp = _fp(synthetic_fingerprint, (0.8, 0.8, 3.0), (200, 180, 50))
    a = plan_dataset(fp, device=DEVICES[device], time_budget_s=budget).to_json()
    b = plan_dataset(fp, device=DEVICES[device], time_budget_s=budget).to_json()
    assert a == b
    assert Plans.from_json(a).to_json() == a


def test_residual_architecture(synthetic_fingerprint):
    plans = plan_dataset(_fp(synthetic_fingerprint, *DATASETS["iso_mid"]), device=CPU, time_budget_s=1200,
                         architecture="residual_unet")
    net = plans.configuration("3d_fullres").network
    assert net.architecture == "residual_unet" and net.n_conv_per_stage_encoder[0] == 1


def test_measure_device_returns_nominal_profiles():
    for name, profile in NOMINAL_PROFILES.items():
        assert measure_device(name) is profile
    with pytest.raises(ValueError, match="unknown device"):
        measure_device("tpu")


# ----------------------------------------------------------------------------------------------------
# rule functions with known numbers
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacings,shapes,expected", [
    # median spacing when not anisotropic
    ([[1.0, 1.0, 1.0], [1.5, 1.2, 1.2], [2.0, 0.8, 0.8]], [[100, 100, 100]] * 3, [1.5, 1.0, 1.0]),
    # anisotropic spacing and voxels: 10th percentile of the coarse axis (5, 3, 5 -> 3.4)
    ([[5.0, 0.8, 0.8], [3.0, 0.8, 0.8], [5.0, 0.8, 0.8]], [[20, 512, 512]] * 3, [3.4, 0.8, 0.8]),
    # anisotropic spacing but not anisotropic voxels (many slices): plain median
    ([[5.0, 0.8, 0.8], [3.0, 0.8, 0.8], [5.0, 0.8, 0.8]], [[400, 512, 512]] * 3, [5.0, 0.8, 0.8]),
    # the percentile may not drop below the in-plane spacing: max(in-plane) + 1e-5
    ([[0.5, 0.8, 0.8], [0.5, 0.8, 0.8], [5.0, 0.8, 0.8], [5.0, 0.8, 0.8], [5.0, 0.8, 0.8]],
     [[20, 512, 512]] * 5, [0.8 + 1e-5, 0.8, 0.8]),
    # the coarse axis need not be z
    ([[0.7, 0.7, 4.0], [0.7, 0.7, 6.0], [0.7, 0.7, 4.0]], [[512, 512, 30]] * 3, [0.7, 0.7, 4.0]),
    # exactly 3x is not anisotropic (strictly greater)
    ([[3.0, 1.0, 1.0]] * 3, [[20, 512, 512]] * 3, [3.0, 1.0, 1.0]),
])
def test_target_spacing(spacings, shapes, expected):
    out = target_spacing(np.array(spacings, dtype=float), np.array(shapes, dtype=float))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("spacing,patch,first_kernel,second_stride,n_stages", [
    ([5.0, 1.0, 1.0], [16, 64, 64], [1, 3, 3], [1, 2, 2], 5),
    ([1.0, 1.0, 1.0], [128, 128, 128], [3, 3, 3], [2, 2, 2], 6),
    ([3.0, 0.8, 0.8], [28, 112, 80], [1, 3, 3], [1, 2, 2], 5),
    ([1.0, 1.0], [256, 256], [3, 3], [2, 2], 7),
])
def test_pooling_topology(spacing, patch, first_kernel, second_stride, n_stages):
    kernels, strides, rounded = pooling_topology(spacing, patch)
    assert kernels[0] == first_kernel and strides[1] == second_stride
    assert len(kernels) == len(strides) == n_stages
    assert strides[0] == [1] * len(spacing)
    for i, p in enumerate(rounded):
        assert p >= patch[i] and p % math.prod(s[i] for s in strides) == 0
        assert p // math.prod(s[i] for s in strides) >= P.MIN_FEATURE_MAP


def test_pooling_topology_caps_stages():
    kernels, strides, _ = pooling_topology([1.0, 1.0], [2048, 2048], max_stages=7)
    assert len(strides) == 7 == len(kernels)


@pytest.mark.parametrize("spacing,median,dims,expected", [
    ([1.0, 1.0, 1.0], [500, 500, 500], 3, [256, 256, 256]),
    ([1.0, 1.0, 1.0], [40, 500, 500], 3, [40, 256, 256]),
    ([4.0, 1.0, 1.0], [500, 900, 900], 3, [102, 406, 406]),
    ([1.0, 1.0], [100, 3000], 2, [100, 2048]),
])
def test_initial_patch(spacing, median, dims, expected):
    assert initial_patch(spacing, median, dims=dims) == expected


# ----------------------------------------------------------------------------------------------------
# regressions: problems found in review
# ----------------------------------------------------------------------------------------------------


def test_known_issue_2d_and_3d_caches_are_distinct_when_z_spacing_varies(synthetic_fingerprint):
    from automedseg.preprocessing import preprocessing_key

    fp = synthetic_fingerprint([(2.0, 0.8, 0.8), (3.0, 0.8, 0.8), (5.0, 0.8, 0.8)], [(40, 160, 160)] * 3)
    plans = plan_dataset(fp, device=CPU, time_budget_s=1200)
    c2, c3 = plans.configuration("2d"), plans.configuration("3d_fullres")
    assert c2.data_identifier != c3.data_identifier or preprocessing_key(plans, c2) == preprocessing_key(plans, c3)


def test_known_issue_pooling_continues_after_short_axis_stops():
    _, strides, _ = pooling_topology([1.0, 1.0, 1.0], [32, 160, 128])
    y_total = math.prod(s[1] for s in strides)
    assert 160 // y_total < 2 * P.MIN_FEATURE_MAP  # the bottleneck is small on every axis


# ----------------------------------------------------------------------------------------------------
# the plan command end to end on the fixture datasets (nominal device: no calibration, instant)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["nnunet_3d", "msd_4d", "png_rgb", "ct_dataset"])
def test_cli_plan_end_to_end(request, tmp_path, fixture):
    from click.testing import CliRunner

    from automedseg.cli import main

    ds = request.getfixturevalue(fixture)
    work = tmp_path / "work"
    args = ["plan", str(ds.root), "--work-dir", str(work), "--device", "reference-cpu-2core", "--time-budget",
            "20m", "-j", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    plans = Plans.load(work / "plans.json")
    assert plans.channel_names == ds.channel_names
    assert (work / "fingerprint.json").is_file()
    for cfg in plans.configurations.values():
        assert cfg.training.estimated_fold_seconds <= 1200
        folder = work / "preprocessed" / cfg.data_identifier
        assert sorted(p.name for p in folder.glob("*.npy") if not p.name.endswith("_seg.npy")) == sorted(
            f"{c}.npy" for c in ds.case_ids)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "0 case(s) computed" in again.output


@pytest.mark.parametrize(("step_s", "budget_s", "fixed", "expected"), [
    (0.25, 1200.0, None, (20, 220, 44)),  # a full fold: ~20 epochs of up to 250 iterations
    (0.05, 7200.0, None, (529, 250, 50)),
    (1.0, 5.0, None, (1, 20, 5)),  # at least 20 iterations
    (0.25, 100.0, 20, (20, 18, 5)),  # a search trial: exactly its epochs, iterations fill the budget
    (0.25, 10.0, 20, (20, 2, 2)),  # at least 2 iterations per epoch
    (0.01, 3600.0, 4, (4, 82800, 50)),
])
def test_schedule_for_budget_table(step_s: float, budget_s: float, fixed: int | None,
                                   expected: tuple[int, int, int]) -> None:
    from automedseg.planning import schedule_for_budget

    assert tuple(schedule_for_budget(step_s, budget_s, fixed_epochs=fixed)) == expected


# ----------------------------------------------------------------------------------------------------
# 2D datasets: context before resolution (the scale rule); the short-schedule recipe
# ----------------------------------------------------------------------------------------------------


def _fp_2d_with_sizes(make, *, spacing: float, shape: tuple[int, int], size_px: float, n: int = 5):
    one = ClassStats(voxels=1000, components=1, centroid_rel=(0.5, 0.5, 0.5), size_px=size_px)
    return _fp(make, (999.0, spacing, spacing), (1, *shape), n=n, is_2d=True, classes={"1": one})


@pytest.mark.parametrize("size_px,coarser", [
    (200.0, True),   # big round structures (a fetal head): a coarser grid keeps the whole image in a patch
    (3.0, False),    # vessels a few pixels wide: native pixels, the patch covers part of the image
])
def test_2d_large_images_coarsen_only_when_the_structures_allow(synthetic_fingerprint, size_px, coarser):
    fp = _fp_2d_with_sizes(synthetic_fingerprint, spacing=0.13, shape=(540, 800), size_px=size_px)
    cfg = plan_dataset(fp, device=CPU, time_budget_s=1200).configuration("2d")
    if coarser:
        factor = cfg.spacing_mm[1] / 0.13
        assert factor > 1.0 and 200.0 / factor >= MIN_STRUCTURE_PX
        assert all(p >= 0.95 * m for p, m in zip(cfg.patch_size, cfg.median_shape[1:]))
        assert cfg.data_identifier != "fullres"
        assert "context before resolution" in cfg.notes[0]
    else:
        assert cfg.spacing_mm[1:] == pytest.approx((0.13, 0.13))
        assert cfg.data_identifier == "fullres"
        assert "native pixel grid" in cfg.notes[0]


def test_2d_image_that_fits_keeps_native_grid(synthetic_fingerprint):
    fp = _fp_2d_with_sizes(synthetic_fingerprint, spacing=1.0, shape=(224, 224), size_px=60.0)
    cfg = plan_dataset(fp, device=CPU, time_budget_s=900).configuration("2d")  # 4000 steps with the worker's share
    assert cfg.spacing_mm[1:] == pytest.approx((1.0, 1.0))
    assert tuple(cfg.patch_size) == (224, 224)
    assert not any("pixel grid" in n for n in cfg.notes)


@pytest.mark.parametrize("device,budget,optimizer", [
    ("cpu", 600, "adamw"),    # a few thousand iterations: AdamW 1e-3
    ("gpu", None, "sgd"),     # nnU-Net's 250,000 iterations: its SGD 1e-2
])
def test_recipe_follows_the_number_of_iterations(synthetic_fingerprint, device, budget, optimizer):
    fp = _fp(synthetic_fingerprint, (1.0, 1.0, 1.0), (40, 56, 40))
    tr = plan_dataset(fp, device=DEVICES[device], time_budget_s=budget).configuration("3d_fullres").training
    assert tr.optimizer == optimizer
    assert tr.initial_lr == pytest.approx(1e-3 if optimizer == "adamw" else 1e-2)


def test_the_fitting_names_stay_importable_from_planning() -> None:
    from automedseg import configuration_fit as F

    for name in ("BASE_FEATURES", "DATA_BOUND_WIDTHS", "DATASET_COVERAGE_CAP", "DEFAULT_CPU_BUDGET_S",
                 "GPU_DEFAULT_EPOCHS", "MAX_FEATURES", "MIN_ITERATIONS", "SHORTEST_USEFUL_STEP_S", "WIDTH_CANDIDATES",
                 "network_for"):
        assert getattr(P, name) is getattr(F, name)
