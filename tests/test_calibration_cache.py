"""The calibration cache file: typed entries, read and written atomically, errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from automedseg import calibration_cache as CC
from automedseg.calibration_step import STEP_PROBES, probe_name
from automedseg.errors import InputError
from automedseg.plans import CalibrationProvenance
from automedseg.training_step import step_kernels

PROVENANCE = CalibrationProvenance("cpu", "x", 2, "2.13", "bf16", "2026-12-01T00:00:00Z")
PROBES = tuple((d, probe_name(*probe), 100.0) for d, probes in STEP_PROBES.items() for probe in probes)


def _entry(**kw: object) -> CC.Calibration:
    return CC.Calibration(PROVENANCE, 8.0, ((8, 100.0), (16, 200.0)), gflops_by_width_2d=((8, 50.0),),
                          window_voxels_per_s=1e8, augment_voxels_per_s=((2, 1e6), (3, 1e6)),
                          step_gflops_by_width=((8, 90.0),), step_gflops_by_width_2d=((8, 40.0),),
                          worker_placement="shared", **{"step_kernels": step_kernels(), **kw})


def test_round_trip_and_a_missing_file_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "calibration.json"
    assert CC.read_calibration_cache(path).calibrations == {}
    cache = CC.CalibrationCache({PROVENANCE.key: _entry(step_probe_gflops=PROBES)})
    CC.write_calibration_cache(path, cache)
    assert CC.read_calibration_cache(path) == cache
    assert json.loads(path.read_text())["schema_version"] == CC.CACHE_SCHEMA_VERSION


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "cannot read the calibration cache"),
    (json.dumps({"schema_version": 99, "calibrations": {}}), "schema_version 99"),
    (json.dumps({"calibrations": {"k": {"memory_gib": 8.0}}}), "provenance"),
])
def test_a_bad_cache_file_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        CC.read_calibration_cache(path)
    assert str(path) in str(err.value)


def test_the_probes_complete_an_entry_and_must_be_positive() -> None:
    assert _entry().missing == ("training step shape",)
    assert _entry(step_probe_gflops=PROBES).complete and CC.probes_complete(PROBES)
    assert not CC.probes_complete(()) and not CC.probes_complete(((2, "w32 96x96 b2", 100.0),))
    assert CC.calibration_throughputs(_entry(step_probe_gflops=PROBES))["2d step probe w32 128x128 b2"] == 100.0
    with pytest.raises(CC.PlanError, match="step_probe_gflops must hold positive"):
        _entry(step_probe_gflops=((2, "w32 128x128 b2", 0.0),))
    with pytest.raises(CC.PlanError, match="one per probe"):
        _entry(step_probe_gflops=((2, "a", 1.0), (2, "a", 2.0)))
    with pytest.raises(CC.PlanError, match="dims 2 or 3"):
        _entry(step_probe_gflops=((4, "a", 1.0),))


@pytest.mark.parametrize(("kernels", "complete"), [
    (step_kernels(), True), (None, False), ("other kernels", False),
])
def test_steps_timed_on_other_kernels_are_missing(kernels: str | None, complete: bool) -> None:
    entry = _entry(step_probe_gflops=PROBES, step_kernels=kernels)
    assert entry.complete == complete
    assert entry.missing == (() if complete else ("training step kernels",))
