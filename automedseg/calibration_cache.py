"""The calibration cache file (owner: this module): :class:`Calibration` entries by machine, read and written.

What a calibration holds and how it is kept (measured once, hysteresis, quantised, older entries completed) is
described in :mod:`automedseg.calibration`, which measures and chooses; this module is the file's typed form.

Example:
    >>> read_calibration_cache(Path("/nonexistent/calibration.json")).calibrations
    {}
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from automedseg.plans import WORKER_PLACEMENTS, CalibrationProvenance, PlanError, from_jsonable, to_jsonable

CACHE_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Calibration:
    """One cached calibration: provenance, host or device memory and the measured throughput.

    Attributes:
        provenance: What was measured, where and when.
        memory_gib: Host memory (CPU: ``MemTotal``) or GPU memory, GiB.
        gflops_by_width: ``(feature width, GFLOP/s)`` of a 3D convolution as measured (best window), before
            quantisation.
        cpu_share: Share of the CPU its threads asked for that the process was granted during the
            convolution timings (``None``: not judged).
        gflops_by_width_2d: The same for a 2D convolution (empty in caches written before it was timed).
        window_voxels_per_s: Sampling-window voxels one CPU data worker reads per CPU second (``None`` in
            caches written before the data pipeline was timed).
        augment_voxels_per_s: ``(dims, voxels/s)``: patch voxels one CPU data worker augments per CPU second.
        step_gflops_by_width: ``(feature width, GFLOP/s)`` of a real 3D training step with its data pipeline
            (CPU only; empty in caches written before it was timed and on CUDA).
        step_gflops_by_width_2d: The same for a 2D training step.
        worker_placement: Where the augmentation worker ran for the step figures, as chosen
            (:func:`automedseg.calibration_step.calibrate_placement`: ``shared`` or ``own_core``; ``None`` in caches
            written before it was chosen and on CUDA).
        placement_step_seconds: ``(placement, seconds)``: the 3D step at the reference width under each placement
            timed (measured, not compared by the hysteresis: the step figures are).
        step_probe_gflops: ``(dims, probe name, GFLOP/s)`` of the training steps of
            :data:`automedseg.calibration_step.STEP_PROBES` (CPU only), timed as the widths' steps.
        step_kernels: What the timed CPU steps ran on (:func:`automedseg.training_step.step_kernels`; ``None`` in
            caches written before it was recorded and on CUDA): the steps are timed again when it changes.
    """

    provenance: CalibrationProvenance
    memory_gib: float
    gflops_by_width: tuple[tuple[int, float], ...]
    cpu_share: float | None = None
    gflops_by_width_2d: tuple[tuple[int, float], ...] = ()
    window_voxels_per_s: float | None = None
    augment_voxels_per_s: tuple[tuple[int, float], ...] = ()
    step_gflops_by_width: tuple[tuple[int, float], ...] = ()
    step_gflops_by_width_2d: tuple[tuple[int, float], ...] = ()
    worker_placement: str | None = None
    placement_step_seconds: tuple[tuple[str, float], ...] = ()
    step_probe_gflops: tuple[tuple[int, str, float], ...] = ()
    step_kernels: str | None = None

    def __post_init__(self) -> None:
        if not self.gflops_by_width:
            raise PlanError("gflops_by_width must hold positive throughputs")
        if any(not (g > 0 and math.isfinite(g)) for g in calibration_throughputs(self).values()):
            raise PlanError("gflops_by_width, gflops_by_width_2d, window_voxels_per_s, augment_voxels_per_s and "
                            "step_gflops_by_width(_2d), step_probe_gflops must hold positive throughputs")
        keys = [(d, name) for d, name, _ in self.step_probe_gflops]
        if any(d not in (2, 3) for d, _ in keys) or len(keys) != len(set(keys)):
            raise PlanError("step_probe_gflops must be (dims 2 or 3, probe name, GFLOP/s), one per probe")
        if not all(g > 0 and math.isfinite(g) for _, _, g in self.step_probe_gflops):
            raise PlanError("step_probe_gflops must hold positive throughputs")
        if not self.memory_gib > 0:
            raise PlanError(f"memory_gib must be positive, got {self.memory_gib}")
        if self.worker_placement is not None and self.worker_placement not in WORKER_PLACEMENTS:
            raise PlanError(f"worker_placement {self.worker_placement!r} is not one of {WORKER_PLACEMENTS} or null")
        if not all(p in WORKER_PLACEMENTS and s > 0 and math.isfinite(s) for p, s in self.placement_step_seconds):
            raise PlanError("placement_step_seconds must be (placement, seconds) pairs with positive seconds")

    @property
    def missing(self) -> tuple[str, ...]:
        """The timings this entry lacks (a cache entry of an older automedseg), e.g. ``("training step",)``."""
        parts = {"2D convolution": bool(self.gflops_by_width_2d),
                 "data pipeline": self.window_voxels_per_s is not None and bool(self.augment_voxels_per_s),
                 "training step": self.provenance.kind != "cpu" or bool(
                     self.step_gflops_by_width and self.step_gflops_by_width_2d),
                 "thread placement": self.provenance.kind != "cpu" or self.worker_placement is not None,
                 "training step shape": self.provenance.kind != "cpu" or probes_complete(self.step_probe_gflops),
                 "training step kernels": self.provenance.kind != "cpu" or self.step_kernels == _current_kernels()}
        return tuple(name for name, timed in parts.items() if not timed)

    @property
    def complete(self) -> bool:
        """Every part is timed (a cache entry of an older automedseg lacks some, see :attr:`missing`)."""
        return not self.missing


def probes_complete(probes: tuple[tuple[int, str, float], ...]) -> bool:
    """Every probe of :data:`automedseg.calibration_step.STEP_PROBES` has a timing (by its name: a probe changed
    since is missing)."""
    return _current_probes() <= {(d, name) for d, name, _ in probes}


def _current_kernels() -> str:
    from automedseg.training_step import step_kernels

    return step_kernels()


def _current_probes() -> set[tuple[int, str]]:
    """``(dims, probe name)`` of :data:`automedseg.calibration_step.STEP_PROBES`."""
    from automedseg.calibration_step import STEP_PROBES, probe_name

    return {(d, probe_name(*probe)) for d, probes_d in STEP_PROBES.items() for probe in probes_d}


def calibration_throughputs(cal: Calibration) -> dict[str, float]:
    """Every throughput of a calibration by name, e.g. ``3d width 32`` or ``augment 2d`` (the hysteresis compares
    them); a probe no longer in :data:`automedseg.calibration_step.STEP_PROBES` is left out (its entry is
    completed with the current one, not replaced for lacking the old one)."""
    out = {f"3d width {w}": g for w, g in cal.gflops_by_width}
    out.update({f"2d width {w}": g for w, g in cal.gflops_by_width_2d})
    if cal.window_voxels_per_s is not None:
        out["windows"] = cal.window_voxels_per_s
    out.update({f"augment {d}d": v for d, v in cal.augment_voxels_per_s})
    out.update({f"3d step width {w}": g for w, g in cal.step_gflops_by_width})
    out.update({f"2d step width {w}": g for w, g in cal.step_gflops_by_width_2d})
    current = _current_probes()
    out.update({f"{d}d step probe {name}": g for d, name, g in cal.step_probe_gflops if (d, name) in current})
    return out


@dataclass(frozen=True)
class CalibrationCache:
    """The cache file: calibrations by :attr:`CalibrationProvenance.key`."""

    calibrations: dict[str, Calibration] = dataclasses.field(default_factory=dict)
    schema_version: int = CACHE_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != CACHE_SCHEMA_VERSION:
            raise PlanError(f"schema_version {self.schema_version} is not {CACHE_SCHEMA_VERSION}")


# --- the cache file ---------------------------------------------------------------------------------------


def read_calibration_cache(path: Path) -> CalibrationCache:
    """Read a cache file; a missing file is an empty cache.

    Raises:
        InputError: The file cannot be read or does not hold a calibration cache (names the file and field).
    """
    from automedseg.errors import InputError

    path = Path(path)
    if not path.is_file():
        return CalibrationCache()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read the calibration cache: {e}") from None
    try:
        return from_jsonable(CalibrationCache, data, str(path))
    except PlanError as e:
        raise InputError(str(e)) from None


def write_calibration_cache(path: Path, cache: CalibrationCache) -> None:
    """Write the cache file atomically (its folder is made when missing)."""
    from automedseg.atomic import atomic_write_json

    atomic_write_json(Path(path), to_jsonable(cache))
