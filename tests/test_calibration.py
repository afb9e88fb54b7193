"""Same inputs, same plan: the machine's calibration is cached, quantised, held by hysteresis, and a timing
taken under load is not believed.

The convolution timing (:func:`automedseg.planning.calibrate_conv_gflops`, 3D and 2D), the data pipeline's
(:func:`automedseg.calibration_timing.calibrate_data_throughput`), the training steps'
(:func:`automedseg.calibration_step.calibrate_steps`), the placement's
(:func:`automedseg.calibration_step.calibrate_placement`) and the CPU-time accounting
(:func:`automedseg.calibration.cpu_usage`) are replaced by fakes, so every case is instant and exact; ``plan``
runs through the CLI with the cache file in ``tmp_path`` (``AUTOMEDSEG_CALIBRATION``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from automedseg import calibration as C
from automedseg import calibration_step, calibration_timing, planning
from automedseg.calibration import quantise_gflops, read_calibration_cache
from automedseg.calibration_timing import DataThroughput
from automedseg.cli import calibration_cache_path, main
from automedseg.plans import Plans
from automedseg.training_step import step_kernels

# A +-5 % change moves some width to another value of the 2^(k/8) grid (half a step is 4.4 %), so quantisation
# alone would change the plan and the hysteresis is what keeps it.
BASE = ((8, 165.0), (16, 470.0), (32, 940.0), (64, 1300.0))
BASE_2D = ((8, 90.0), (16, 300.0), (32, 600.0), (64, 800.0))
DATA = DataThroughput(window_voxels_per_s=2.1e8, augment_voxels_per_s=((2, 6.3e6), (3, 5.4e6)))
STEPS = {3: ((8, 110.0), (16, 230.0), (32, 310.0)), 2: ((8, 60.0), (16, 140.0), (32, 230.0))}
PROBES = {3: (), 2: (("w32 128x128 b2", 120.0),)}  # calibration_step.STEP_PROBES' GFLOP/s
PLACED = ("shared", (("shared", 0.31), ("own_core", 0.3)))  # own_core 3 % faster: not enough


def _scaled(factor: float) -> tuple[tuple[int, float], ...]:
    return tuple((w, g * factor) for w, g in BASE)


@dataclass
class FakeTiming:
    """Stands in for the convolution timing: 3D returns ``tables`` in turn (the last one repeats), 2D ``BASE_2D``.

    ``calls`` counts the calibrations (the 3D timings); ``calls_2d`` the 2D ones.
    """

    tables: list[tuple[tuple[int, float], ...]] = field(default_factory=lambda: [BASE])
    calls: int = 0
    calls_2d: int = 0
    fail: bool = False

    def __call__(self, *, device: str, threads: int | None = None, dims: int = 3,
                 **_: object) -> tuple[tuple[int, float], ...]:
        if self.fail:
            raise AssertionError("the device was timed although a calibration is cached")
        if dims == 2:
            self.calls_2d += 1
            return BASE_2D
        table = self.tables[min(self.calls, len(self.tables) - 1)]
        self.calls += 1
        return table


@dataclass
class FakeData:
    """Stands in for the data pipeline's timing."""

    result: DataThroughput = DATA
    calls: int = 0

    def __call__(self, **_: object) -> DataThroughput:
        self.calls += 1
        return self.result


@dataclass
class FakeSteps:
    """Stands in for the training steps' timing: ``tables[dims]``; ``calls`` counts the 3D timings."""

    tables: dict[int, tuple[tuple[int, float], ...]] = field(default_factory=lambda: dict(STEPS))
    calls: int = 0
    placements: list[str] = field(default_factory=list)  # the placement each timing was asked for

    def __call__(self, *, dims: int = 3, placement: str = "shared", **_: object) -> tuple[tuple[int, float], ...]:
        self.calls += dims == 3
        self.placements.append(placement)
        return self.tables[dims]


@dataclass
class FakePlacement:
    """Stands in for the placement's timing: ``(choice, seconds by placement)``; ``calls`` counts them."""

    result: tuple[str, tuple[tuple[str, float], ...]] = PLACED
    calls: int = 0

    def __call__(self, **_: object) -> tuple[str, tuple[tuple[str, float], ...]]:
        self.calls += 1
        return self.result


def fake_steps(planner: Planner, **kw: object) -> calibration_step.CalibratedSteps:
    """Stands in for ``calibration_step.calibrate_steps``: the planner's fake 3D and 2D step tables and probes."""
    return calibration_step.CalibratedSteps(planner.steps(dims=3, **kw), planner.steps(dims=2, **kw),
                                            tuple((d, name, g) for d in (3, 2) for name, g in planner.probes[d]))


def _cpu_share(share: float) -> Callable[[], tuple[float, float]]:
    """A fake :func:`cpu_usage` under which each timing gets exactly ``share`` of the CPU it asks for."""
    state = [0.0, 0.0]

    def usage() -> tuple[float, float]:
        state[0] += share
        state[1] += 1.0 - share
        return state[0], state[1]

    return usage


@dataclass
class Planner:
    dataset: Path
    work: Path
    cache: Path
    timing: FakeTiming
    data: FakeData
    steps: FakeSteps
    placement: FakePlacement
    probes: dict = field(default_factory=lambda: dict(PROBES))  # what the probes' timing returns, by dims

    def plan(self, *extra: str) -> Result:
        args = ["plan", str(self.dataset), "--work-dir", str(self.work), "-c", "3d_fullres", "-j", "1",
                "--time-budget", "2m", "--device", "cpu", "--threads", "2", "--no-preprocess", *extra]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        return result

    @property
    def plans_bytes(self) -> bytes:
        return (self.work / "plans.json").read_bytes()

    def entry(self) -> C.Calibration:
        (entry,) = read_calibration_cache(self.cache).calibrations.values()
        return entry


@pytest.fixture
def planner(demo_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Planner:
    cache = tmp_path / "cache" / "calibration.json"
    monkeypatch.setenv("AUTOMEDSEG_CALIBRATION", str(cache))
    timing, data, steps, placement = FakeTiming(), FakeData(), FakeSteps(), FakePlacement()
    monkeypatch.setattr(planning, "calibrate_conv_gflops", timing)
    monkeypatch.setattr(calibration_timing, "calibrate_data_throughput", data)
    monkeypatch.setattr(calibration_step, "calibrate_placement", placement)
    monkeypatch.setattr(C, "cpu_usage", _cpu_share(1.0))
    planner = Planner(demo_dataset, tmp_path / "work", cache, timing, data, steps, placement)
    monkeypatch.setattr(calibration_step, "calibrate_steps", lambda **kw: fake_steps(planner, **kw))
    return planner


@pytest.mark.parametrize("factor", [0.9, 0.95, 1.05, 1.1])
def test_replan_with_perturbed_calibration_gives_the_same_plans_json(planner: Planner, factor: float) -> None:
    planner.plan()
    first = planner.plans_bytes
    perturbed = _scaled(factor)
    assert [quantise_gflops(g) for _, g in perturbed] != [quantise_gflops(g) for _, g in BASE]
    planner.timing.tables = [perturbed]
    result = planner.plan("--recalibrate")
    assert planner.timing.calls == 2
    assert planner.plans_bytes == first
    assert "keeping that one so plans stay put" in result.output
    assert planner.entry().gflops_by_width == BASE


def test_cache_is_written_once_and_reused(planner: Planner) -> None:
    first = planner.plan()
    assert planner.timing.calls == 1 and "calibration: measured" in first.output
    entry = planner.entry()
    p = entry.provenance
    assert (p.kind, p.device, p.threads, p.torch_version) == ("cpu", planning.cpu_model_name(), 2, torch.__version__)
    assert p.precision in ("bf16", "fp32") and not p.under_load
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", p.measured_at)
    plans_before, cache_before = planner.plans_bytes, planner.cache.read_bytes()

    planner.timing.fail = True  # a second plan must not time anything
    second = planner.plan()
    assert "calibration: reusing" in second.output
    assert planner.plans_bytes == plans_before and planner.cache.read_bytes() == cache_before

    device = Plans.load(planner.work / "plans.json").device
    assert device.calibration == p  # provenance recorded ...
    assert device.gflops_by_width == tuple((w, quantise_gflops(g)) for w, g in BASE)  # ... and the grid values
    assert "940.0" not in plans_before.decode()  # never the raw timing


def test_recalibrate_measures_again_and_a_real_change_replaces_the_calibration(planner: Planner) -> None:
    planner.plan()
    first = planner.plans_bytes
    planner.timing.tables = [_scaled(2.0)]
    result = planner.plan("--recalibrate")
    assert planner.timing.calls == 2
    assert "replacing it" in result.output
    assert planner.entry().gflops_by_width == _scaled(2.0)
    assert planner.plans_bytes != first
    assert Plans.load(planner.work / "plans.json").device.gflops_by_width == tuple(
        (w, quantise_gflops(g)) for w, g in _scaled(2.0))


def test_timing_under_load_is_not_believed_when_a_calibration_is_cached(planner: Planner,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    planner.plan()
    first, cache_before = planner.plans_bytes, planner.cache.read_bytes()
    monkeypatch.setattr(C, "cpu_usage", _cpu_share(0.5))  # another process takes half the CPU
    planner.timing.tables = [_scaled(0.5)]
    result = planner.plan("--recalibrate")
    assert planner.timing.calls == 2
    assert "got 50% of the CPU" in result.output and "not believed" in result.output
    assert planner.plans_bytes == first and planner.cache.read_bytes() == cache_before


def test_timing_under_load_without_a_cache_takes_the_best_of_several_and_warns(
        planner: Planner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C, "cpu_usage", _cpu_share(0.5))
    planner.timing.tables = [_scaled(0.5), _scaled(0.6), _scaled(0.55)]
    result = planner.plan()
    assert planner.timing.calls == C.LOADED_ATTEMPTS
    assert "warning: calibration taken under load" in result.output
    entry = planner.entry()
    assert entry.provenance.under_load and entry.gflops_by_width == _scaled(0.6)
    assert Plans.load(planner.work / "plans.json").device.calibration.under_load

    plans_before = planner.plans_bytes
    again = planner.plan()  # still busy: the provisional calibration is timed once more and kept
    assert planner.timing.calls == C.LOADED_ATTEMPTS + 1 and "provisional: timing again" in again.output
    assert planner.plans_bytes == plans_before and planner.entry() == entry

    monkeypatch.setattr(C, "cpu_usage", _cpu_share(1.0))  # idle now: an idle timing replaces the provisional one
    planner.timing.tables = [BASE]
    idle = planner.plan()
    assert "which was taken under load" in idle.output
    assert not planner.entry().provenance.under_load and planner.entry().gflops_by_width == BASE
    calls = planner.timing.calls
    planner.plan()  # no longer provisional: reused without timing
    assert planner.timing.calls == calls


def test_unreadable_cache_is_measured_again(planner: Planner) -> None:
    planner.cache.parent.mkdir(parents=True)
    planner.cache.write_text("{not json")
    result = planner.plan()
    assert "warning:" in result.output and str(planner.cache) in result.output
    assert planner.timing.calls == 1 and planner.entry().gflops_by_width == BASE


def test_nominal_profiles_stay_as_they_are(planner: Planner) -> None:
    result = CliRunner().invoke(main, ["plan", str(planner.dataset), "--work-dir", str(planner.work), "-c",
                                       "3d_fullres", "-j", "1", "--device", "reference-cpu-2core", "--no-preprocess"])
    assert result.exit_code == 0, result.output
    assert planner.timing.calls == 0 and not planner.cache.exists()
    assert "calibration" not in json.loads(planner.plans_bytes)["device"]


@pytest.mark.parametrize(("value", "expected"), [
    (100.0, 98.7), (128.0, 128.0), (133.0, 128.0), (134.0, 139.6), (1000.0, 1024.0), (20000.0, 19480.0),
])
def test_quantise_gflops_grid(value: float, expected: float) -> None:
    assert quantise_gflops(value) == expected
    assert quantise_gflops(expected) == expected  # grid values stay put


@pytest.mark.parametrize(("env", "expected"), [
    ({"AUTOMEDSEG_CALIBRATION": "/x/cal.json", "XDG_CACHE_HOME": "/y"}, "/x/cal.json"),
    ({"XDG_CACHE_HOME": "/y"}, "/y/automedseg/calibration.json"),
    ({"HOME": "/home/u"}, "/home/u/.cache/automedseg/calibration.json"),
])
def test_calibration_cache_location(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str) -> None:
    for name in ("AUTOMEDSEG_CALIBRATION", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert calibration_cache_path() == Path(expected)


# --- the 2D convolutions and the data pipeline ------------------------------------------------------------


def test_calibration_stores_2d_convolutions_and_the_data_pipeline(planner: Planner) -> None:
    planner.plan()
    assert (planner.timing.calls, planner.timing.calls_2d, planner.data.calls) == (1, 1, 1)
    entry = planner.entry()
    assert entry.complete and entry.gflops_by_width_2d == BASE_2D, entry.missing
    assert (entry.window_voxels_per_s, entry.augment_voxels_per_s) == (DATA.window_voxels_per_s,
                                                                        DATA.augment_voxels_per_s)
    device = Plans.load(planner.work / "plans.json").device
    assert device.gflops_by_width_2d == tuple((w, quantise_gflops(g)) for w, g in BASE_2D)
    assert device.window_voxels_per_s == quantise_gflops(DATA.window_voxels_per_s)
    assert device.augment_voxels_per_s == tuple((d, quantise_gflops(v)) for d, v in DATA.augment_voxels_per_s)
    planner.timing.fail = True
    planner.plan()  # reused: nothing timed again
    assert planner.data.calls == 1


def _strip_new_fields(cache: Path) -> None:
    """Rewrite the cache as an automedseg from before the 2D and data timings wrote it."""
    data = json.loads(cache.read_text())
    for entry in data["calibrations"].values():
        for name in ("gflops_by_width_2d", "window_voxels_per_s", "augment_voxels_per_s"):
            del entry[name]
    cache.write_text(json.dumps(data))


@pytest.mark.parametrize(("factor", "kept"), [
    (0.95, True),  # within the hysteresis: the cached 3D figures stay, the new parts are added
    (2.0, False),  # a real change: the new calibration replaces the old entry
])
def test_an_old_cache_entry_loads_and_is_completed_once(planner: Planner, factor: float, kept: bool) -> None:
    planner.plan()
    first, measured_at = planner.plans_bytes, planner.entry().provenance.measured_at
    _strip_new_fields(planner.cache)
    old = planner.entry()
    assert not old.complete and old.gflops_by_width == BASE and old.window_voxels_per_s is None

    planner.timing.tables = [_scaled(factor)]
    result = planner.plan()
    assert "has no 2D convolution or data pipeline timing" in result.output
    assert (planner.timing.calls, planner.data.calls) == (2, 2)
    entry = planner.entry()
    assert entry.complete and entry.gflops_by_width_2d == BASE_2D
    assert entry.gflops_by_width == (BASE if kept else _scaled(factor))
    assert (planner.plans_bytes == first) == kept
    if kept:
        assert entry.provenance.measured_at == measured_at
        assert "timings added to the calibration of" in result.output

    planner.timing.fail = True
    planner.plan()  # complete now: reused without timing
    assert planner.data.calls == 2


def test_an_old_cache_entry_is_not_completed_from_a_timing_under_load(planner: Planner,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    planner.plan()
    _strip_new_fields(planner.cache)
    stripped = planner.cache.read_bytes()
    monkeypatch.setattr(C, "cpu_usage", _cpu_share(0.5))
    planner.timing.tables = [_scaled(0.5)]
    planner.plan()
    assert planner.cache.read_bytes() == stripped  # kept as it was; the next plan times again
    monkeypatch.setattr(C, "cpu_usage", _cpu_share(1.0))
    planner.timing.tables = [BASE]
    planner.plan()
    assert planner.entry().complete and planner.timing.calls == 3


@pytest.mark.parametrize(("data", "replaced"), [
    (DataThroughput(2.2e8, ((2, 6.0e6), (3, 5.6e6))), False),  # noise
    (DataThroughput(2.1e8, ((2, 6.3e6), (3, 2.0e6))), True),  # 3D augmentation 2.7x slower: a real change
    (DataThroughput(1.0e8, ((2, 6.3e6), (3, 5.4e6))), True),
])
def test_hysteresis_covers_the_data_pipeline(planner: Planner, data: DataThroughput, replaced: bool) -> None:
    planner.plan()
    first = planner.plans_bytes
    planner.data.result = data
    result = planner.plan("--recalibrate")
    assert ("replacing it" in result.output) == replaced
    entry = planner.entry()
    assert (entry.window_voxels_per_s, entry.augment_voxels_per_s) == (
        (data.window_voxels_per_s, data.augment_voxels_per_s) if replaced else
        (DATA.window_voxels_per_s, DATA.augment_voxels_per_s))
    if not replaced:
        assert planner.plans_bytes == first


# --- the training steps -----------------------------------------------------------------------------------


def test_calibration_stores_the_training_steps_and_the_cpu_plan_uses_them(planner: Planner) -> None:
    planner.plan()
    assert planner.steps.calls == 1
    entry = planner.entry()
    assert entry.complete and (entry.step_gflops_by_width, entry.step_gflops_by_width_2d) == (STEPS[3], STEPS[2])
    plans = Plans.load(planner.work / "plans.json")
    assert plans.device.step_gflops_by_width == tuple((w, quantise_gflops(g)) for w, g in STEPS[3])
    assert plans.device.step_gflops_by_width_2d == tuple((w, quantise_gflops(g)) for w, g in STEPS[2])
    assert "from the timed training steps" in plans.configuration("3d_fullres").notes[-1]
    planner.timing.fail = True
    planner.plan()  # reused: nothing timed again
    assert planner.steps.calls == 1


def _strip_steps(cache: Path) -> None:
    """Rewrite the cache as an automedseg from before the training steps were timed wrote it."""
    data = json.loads(cache.read_text())
    for entry in data["calibrations"].values():
        for name in ("step_gflops_by_width", "step_gflops_by_width_2d"):
            del entry[name]
    cache.write_text(json.dumps(data))


def test_an_entry_without_training_steps_loads_and_is_completed_once(planner: Planner) -> None:
    planner.plan()
    first, measured_at = planner.plans_bytes, planner.entry().provenance.measured_at
    _strip_steps(planner.cache)
    old = planner.entry()
    assert old.missing == ("training step",) and old.gflops_by_width == BASE
    planner.timing.tables = [_scaled(0.95)]  # within the hysteresis: the cached convolution figures stay
    result = planner.plan()
    assert "has no training step timing" in result.output
    assert "the training step timings added to the calibration of" in result.output
    entry = planner.entry()
    assert entry.complete and entry.gflops_by_width == BASE and entry.provenance.measured_at == measured_at
    assert entry.step_gflops_by_width == STEPS[3] and planner.plans_bytes == first
    planner.timing.fail = True
    planner.plan()  # complete now: reused
    assert planner.steps.calls == 2


@pytest.mark.parametrize(("factor", "replaced"), [(1.1, False), (0.5, True)])
def test_hysteresis_covers_the_training_steps(planner: Planner, factor: float, replaced: bool) -> None:
    planner.plan()
    first = planner.plans_bytes
    planner.steps.tables = {d: tuple((w, g * factor) for w, g in t) for d, t in STEPS.items()}
    result = planner.plan("--recalibrate")
    assert ("replacing it" in result.output) == replaced
    assert planner.entry().step_gflops_by_width == (planner.steps.tables[3] if replaced else STEPS[3])
    assert (planner.plans_bytes == first) != replaced


def _calibration(kind: str, **kw: object) -> C.Calibration:
    provenance = C.CalibrationProvenance(kind, "x", 2, "2.13", "bf16", "2026-12-01T00:00:00Z")
    return C.Calibration(provenance, 8.0, BASE, gflops_by_width_2d=BASE_2D, window_voxels_per_s=1e8,
                         augment_voxels_per_s=((2, 1e6), (3, 1e6)), **kw)


def test_only_a_cpu_calibration_needs_the_training_steps() -> None:
    assert _calibration("cuda").complete
    assert _calibration("cpu").missing == ("training step", "thread placement", "training step shape",
                                           "training step kernels")
    assert not _calibration("cpu", step_gflops_by_width=STEPS[3], worker_placement="shared").complete  # 3D, no 2D
    steps = {"step_gflops_by_width": STEPS[3], "step_gflops_by_width_2d": STEPS[2], "worker_placement": "shared",
             "step_kernels": step_kernels()}
    assert _calibration("cpu", **steps).missing == ("training step shape",)
    probes = tuple((d, i, g) for d, pairs in PROBES.items() for i, g in pairs)
    assert _calibration("cpu", **steps, step_probe_gflops=probes).complete
    assert not _calibration("cpu", **steps, step_probe_gflops=((2, "w32 96x96 b2", 120.0),)).complete  # another
    with pytest.raises(C.PlanError, match="positive throughputs"):
        _calibration("cpu", step_gflops_by_width=((8, 0.0),))
    profile = C.profile_from(_calibration("cuda"))
    assert profile.step_gflops_by_width is None and profile.step_gflops_by_width_2d is None


# --- the thread placement ---------------------------------------------------------------------------------

OWN = ("own_core", (("shared", 0.31), ("own_core", 0.27)))


def test_calibration_chooses_the_placement_and_the_plan_trains_with_it(planner: Planner) -> None:
    planner.placement.result = OWN
    result = planner.plan()
    assert "augmentation worker own_core (3D step: shared 0.31 s, own_core 0.27 s)" in result.output
    assert planner.steps.placements == ["own_core", "own_core"]  # 3D and 2D steps timed as the plan trains
    entry = planner.entry()
    assert (entry.worker_placement, entry.placement_step_seconds) == OWN and entry.complete
    plans = Plans.load(planner.work / "plans.json")
    assert (plans.device.worker_placement, plans.device.placement_step_seconds) == OWN
    config = plans.configuration("3d_fullres")
    assert config.training.worker_placement == "own_core"
    assert any("0.27 s with the worker on a core of its own, 0.31 s sharing all cores" in n for n in config.notes)
    planner.timing.fail = True
    planner.plan()  # reused: nothing timed again
    assert planner.placement.calls == 1


def test_a_shared_placement_is_left_out_of_the_training_plan(planner: Planner) -> None:
    planner.plan()
    data = json.loads(planner.plans_bytes)
    assert "worker_placement" not in data["configurations"]["3d_fullres"]["training"]
    assert data["device"]["worker_placement"] == "shared"


def _strip_placement(cache: Path) -> None:
    """Rewrite the cache as an automedseg from before the thread placement was chosen wrote it."""
    data = json.loads(cache.read_text())
    for entry in data["calibrations"].values():
        for name in ("worker_placement", "placement_step_seconds"):
            del entry[name]
    cache.write_text(json.dumps(data))


@pytest.mark.parametrize("chosen", [PLACED, OWN])
def test_an_entry_without_the_placement_loads_and_is_completed_once(planner: Planner, chosen) -> None:
    planner.plan()
    first, measured_at = planner.plans_bytes, planner.entry().provenance.measured_at
    _strip_placement(planner.cache)
    old = planner.entry()
    assert old.missing == ("thread placement",) and old.worker_placement is None
    assert C.profile_from(old).worker_placement is None
    planner.placement.result = chosen
    faster = {d: tuple((w, g * 1.1) for w, g in t) for d, t in STEPS.items()}  # within the hysteresis
    planner.steps.tables = faster
    result = planner.plan()
    assert "has no thread placement timing" in result.output
    assert "the thread placement timings added to the calibration of" in result.output
    entry = planner.entry()
    assert entry.complete and entry.provenance.measured_at == measured_at
    assert (entry.worker_placement, entry.placement_step_seconds) == chosen
    if chosen == PLACED:  # the cached steps were timed as shared: kept (hysteresis), the plan as before
        assert entry.step_gflops_by_width == STEPS[3] and planner.plans_bytes == first
    else:  # timed shared, trained own_core: the steps timed own_core come with the placement
        assert (entry.step_gflops_by_width, entry.step_gflops_by_width_2d) == (faster[3], faster[2])
    planner.timing.fail = True
    planner.plan()  # complete now: reused
    assert planner.placement.calls == 2


def test_hysteresis_keeps_the_cached_placement(planner: Planner) -> None:
    planner.placement.result = OWN
    planner.plan()
    first = planner.plans_bytes
    planner.placement.result = PLACED  # noise flips the choice; the step figures stay within the hysteresis
    result = planner.plan("--recalibrate")
    assert "keeping that one so plans stay put" in result.output
    assert planner.entry().worker_placement == "own_core" and planner.plans_bytes == first


def test_the_placement_is_validated() -> None:
    with pytest.raises(C.PlanError, match="worker_placement 'pinned' is not one of"):
        _calibration("cpu", worker_placement="pinned")
    with pytest.raises(C.PlanError, match="placement_step_seconds must be"):
        _calibration("cpu", worker_placement="shared", placement_step_seconds=(("shared", 0.0),))
    profile = C.profile_from(_calibration("cpu", worker_placement="own_core",
                                          placement_step_seconds=(("shared", 0.31234), ("own_core", 0.27))))
    assert profile.worker_placement == "own_core" and profile.placement_step_seconds == (("shared", 0.312),
                                                                                          ("own_core", 0.27))
    assert C.profile_from(_calibration("cuda")).worker_placement is None


def test_an_entry_without_the_step_shape_is_completed_and_the_plan_charges_it(planner: Planner) -> None:
    planner.plan()
    data = json.loads(planner.cache.read_text())
    for entry in data["calibrations"].values():
        del entry["step_probe_gflops"]
    planner.cache.write_text(json.dumps(data))
    old = planner.entry()
    assert old.missing == ("training step shape",)
    assert C.profile_from(old).step_shape_costs is None  # charged at the widths' throughputs, as before
    result = planner.plan()
    assert "has no training step shape timing" in result.output
    entry = planner.entry()
    assert entry.complete and entry.step_probe_gflops == ((2, "w32 128x128 b2", 120.0),)
    device = Plans.load(planner.work / "plans.json").device
    (shape,) = device.step_shape_costs
    assert shape.dims == 2 and shape.seconds_per_m_parameters > 0 and device.step_shape_cost(3) is None
    assert shape == calibration_step.fit_step_shape_cost(2, STEPS[2], PROBES[2])  # fitted on the cached figures


def test_probes_added_to_an_old_entry_are_rescaled_to_its_speed(planner: Planner) -> None:
    """The fit prices the probe's excess over its reference step: a completing run 10 % faster must not be read
    as a cheaper parameter."""
    planner.plan()
    fitted = Plans.load(planner.work / "plans.json").device.step_shape_cost(2)
    data = json.loads(planner.cache.read_text())
    for entry in data["calibrations"].values():
        del entry["step_probe_gflops"]
    planner.cache.write_text(json.dumps(data))
    planner.steps.tables = {d: tuple((w, g * 1.1) for w, g in t) for d, t in STEPS.items()}  # within the hysteresis
    planner.probes = {3: (), 2: (("w32 128x128 b2", 132.0),)}  # the same machine, 10 % faster this time
    planner.plan()
    entry = planner.entry()
    assert entry.step_gflops_by_width_2d == STEPS[2] and entry.step_probe_gflops == ((2, "w32 128x128 b2", 120.0),)
    assert Plans.load(planner.work / "plans.json").device.step_shape_cost(2) == fitted


def test_an_entry_with_a_probe_of_an_older_automedseg_is_completed_not_replaced(planner: Planner) -> None:
    planner.plan()
    first_steps = planner.entry().step_gflops_by_width
    data = json.loads(planner.cache.read_text())
    for entry in data["calibrations"].values():
        entry["step_probe_gflops"] = [[2, "w32 96x96 b2", 120.0]]  # a probe STEP_PROBES no longer has
    planner.cache.write_text(json.dumps(data))
    assert planner.entry().missing == ("training step shape",)
    planner.steps.tables = {d: tuple((w, g * 1.1) for w, g in t) for d, t in STEPS.items()}  # within the hysteresis
    result = planner.plan()
    assert "replacing it" not in result.output and "timings added to the calibration of" in result.output
    entry = planner.entry()
    # the old probe dropped, the current one added at the cached speed (timed 120 while the steps timed 1.1x faster)
    assert entry.step_gflops_by_width == first_steps and entry.step_probe_gflops == ((2, "w32 128x128 b2", 109.0),)


def test_steps_timed_on_other_kernels_are_timed_again_and_replaced(planner: Planner) -> None:
    """A faster step (the fused norm, retained memory) is no change of the machine: the convolutions stay, the
    steps and their placement are timed again and replace the old ones, even within the hysteresis."""
    planner.plan()
    first = planner.entry()
    assert first.step_kernels == step_kernels()
    data = json.loads(planner.cache.read_text())
    for entry in data["calibrations"].values():
        entry["step_kernels"] = "other kernels"
    planner.cache.write_text(json.dumps(data))
    assert planner.entry().missing == ("training step kernels",)
    planner.steps.tables = {d: tuple((w, g * 1.4) for w, g in t) for d, t in STEPS.items()}  # 40 % faster steps
    planner.timing.tables = [_scaled(1.05)]  # the convolutions within the hysteresis
    result = planner.plan()
    assert "has no training step kernels timing" in result.output and "replacing it" not in result.output
    entry = planner.entry()
    assert entry.complete and entry.step_kernels == step_kernels() and entry.gflops_by_width == BASE
    assert entry.step_gflops_by_width == planner.steps.tables[3]
    assert entry.step_gflops_by_width_2d == planner.steps.tables[2]
    assert entry.provenance.measured_at == first.provenance.measured_at
    assert planner.placement.calls == 2
    planner.timing.fail = True
    planner.plan()  # complete now: reused
    assert planner.steps.calls == 2


def test_steps_on_other_kernels_are_not_used_when_the_new_timing_is_under_load(planner: Planner,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    planner.plan()
    data = json.loads(planner.cache.read_text())
    for entry in data["calibrations"].values():
        entry["step_kernels"] = "other kernels"
    planner.cache.write_text(json.dumps(data))
    cache_before = planner.cache.read_bytes()
    monkeypatch.setattr(C, "cpu_usage", _cpu_share(0.5))
    planner.plan()
    assert planner.cache.read_bytes() == cache_before  # nothing believed, nothing written: timed again next time
    device = Plans.load(planner.work / "plans.json").device
    assert device.step_gflops_by_width is None and device.worker_placement is None
    assert "from the timed training steps" not in Plans.load(planner.work / "plans.json").configuration(
        "3d_fullres").notes[-1]
