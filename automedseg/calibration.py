"""The machine's speed calibration: measured once, cached with its provenance, reused, so plans stay put.

The planner's cost model (:mod:`automedseg.cost_model`) needs the training throughput of this machine's 3D and 2D
convolutions (:func:`automedseg.planning.calibrate_conv_gflops`), of one CPU data worker
(:func:`automedseg.calibration_timing.calibrate_data_throughput`: sampling windows and augmentation, voxels per
second of the worker's CPU time) and, on a CPU, of a real 3D and 2D training step with its data pipeline
(:func:`automedseg.calibration_step.calibrate_steps`: GFLOP/s per width, and the step of a deep 2D network
that prices the parameters beyond the reference network's, all taking turns in rounds), which is what it charges
a CPU network with, timed with the augmentation worker where it runs faster: sharing the cores or on a core of its
own (:func:`automedseg.calibration_step.calibrate_placement`, the choice and both timings cached; the planner
writes the choice into the plan). A timing is noisy (about +-10 % between runs on an idle
machine), too low while another process uses the CPU, and the planner's decisions sit on thresholds: a plan
made from a fresh timing every time flips between runs. So:

* **Measured once, cached.** A calibration is kept per machine in a JSON cache file (the CLI chooses the
  path: ``$AUTOMEDSEG_CALIBRATION``, else ``$XDG_CACHE_HOME/automedseg/calibration.json``, else
  ``~/.cache/automedseg/calibration.json``), keyed by device kind, CPU model or GPU name, threads, torch
  version and precision, with the date it was measured. Every later ``plan`` reuses it and times nothing;
  ``plan --recalibrate`` measures again.
* **A timing under load is recognised.** While timing (the convolutions and the training steps), the CPU time
  the process's threads were granted is compared with the time they waited for a CPU
  (``/proc/self/task/*/schedstat``; elsewhere process CPU time against wall time x threads; the calibration's own
  augmentation worker is not counted: :mod:`automedseg.calibration_load`). When they got less than
  :data:`MIN_CPU_SHARE` of what they asked for, another process was busy: with a cached calibration the new
  timing is not believed; without one the best of :data:`LOADED_ATTEMPTS` timings is kept, flagged as taken
  under load (provisional), with a warning.
  A provisional calibration is timed again by every ``plan`` and replaced by a timing that is not under load
  (or a faster one beyond the hysteresis), so it only ever moves towards the idle machine's speed.
* **Hysteresis.** A new measurement within a factor :data:`HYSTERESIS` of the cached one (every width) keeps
  the cached one: timing noise never changes a plan; a real change of the machine replaces it.
* **Quantised.** The planner sees each throughput (GFLOP/s and voxels/s alike) rounded to a geometric grid
  (:func:`quantise_gflops`, eight steps per doubling), so no noisy digits reach ``plans.json`` (the step shape
  cost is fitted on the cached figures, three significant digits: the hysteresis keeps it put).
* **Older cache entries are completed.** An entry written before the 2D convolutions, the data pipeline or
  (on a CPU) the training steps, the thread placement or the step shape probes were timed still loads (the
  cache's ``schema_version`` stays 1: the new fields are optional); the next ``plan`` times the machine once
  more, keeps the cached figures under the hysteresis rule and caches the entry completed with the parts it
  lacked (an entry completed with the placement ``own_core`` takes the new step figures too: its own were timed
  with the worker sharing the cores).

``plans.json`` records which calibration it was planned with (:class:`CalibrationProvenance`: where and
when it was measured), never a raw timing, so re-plans are byte-identical. Nothing here reads environment
variables: the cache path is an argument. The cache file's typed form is :mod:`automedseg.calibration_cache`.

Example:
    >>> quantise_gflops(1000.0), quantise_gflops(900.0)
    (1024.0, 939.0)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from automedseg.calibration_cache import (  # noqa: F401  (re-exported)
    CACHE_SCHEMA_VERSION,
    Calibration,
    CalibrationCache,
    calibration_throughputs,
    probes_complete,
    read_calibration_cache,
    write_calibration_cache,
)
from automedseg.calibration_load import (  # noqa: F401  (re-exported)
    MIN_CPU_SHARE,
    MIN_CPU_SHARE_WITHOUT_SCHEDSTAT,
    children_cpu_seconds,
    cpu_usage,
    granted_share,
)
from automedseg.plans import (  # CalibrationProvenance: re-exported, the plan records it
    CalibrationProvenance,
    DeviceProfile,
    PlanError,  # noqa: F401
)

# Grid 2^(k/8): neighbouring values 9 % apart, so the planner sees a timing at most 4.4 % off. (It was 2^(k/4),
# up to 9 % off: alone that put openkbp_hn_ct's planned 3D step 9 % too fast on a 2-core Xeon, 83 -> 90.5 GFLOP/s,
# benchmarks/results/calibration_check.md, 2026-12-01. The hysteresis, not the grid, keeps plans put.)
QUANTA_PER_OCTAVE = 8
HYSTERESIS = 1.25  # a re-measurement within 25 % of the cached calibration keeps the cached one
LOADED_ATTEMPTS = 3  # timings tried when the machine is busy and nothing is cached
# The cached timing is taken once: longer windows than a one-off timing (about 4 s instead of 2 s on a 2-core
# CPU) halve its spread between runs (measured on a shared 2-core EPYC: up to 38 % -> 13 % per width).
TIMING_WINDOWS = 3
TIMING_WINDOW_S = 0.3

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _parts_text(names: tuple[str, ...], conjunction: str) -> str:
    """``a``, ``a or b``, ``a, b or c`` (``conjunction``: ``or`` / ``and``)."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {conjunction} {names[-1]}"


# --- measuring --------------------------------------------------------------------------------------------


def quantise_gflops(value: float) -> float:
    """Round a throughput to the grid ``2^(k/8)`` GFLOP/s (4 significant digits).

    Example:
        >>> [quantise_gflops(v) for v in (190.0, 200.0, 240.0, 260.0)]
        [197.4, 197.4, 234.8, 256.0]
    """
    k = round(QUANTA_PER_OCTAVE * math.log2(max(value, 1e-6)))
    return float(f"{2.0 ** (k / QUANTA_PER_OCTAVE):.4g}")


@dataclass(frozen=True)
class _Machine:
    """What identifies a calibration of this machine, and what is read rather than timed."""

    kind: str
    device: str
    threads: int
    torch_version: str
    precision: str
    memory_gib: float


def this_machine(kind: str, *, threads: int | None = None) -> _Machine:
    """Describe this machine's CPU (``kind="cpu"``) or first CUDA GPU."""
    import os

    import torch

    from automedseg.machine import cpu_model_name, host_memory_gib

    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA device here; plan with --device reference-gpu-24g instead")
        props = torch.cuda.get_device_properties(0)
        return _Machine("cuda", props.name, os.cpu_count() or 1, torch.__version__, "fp16",
                        round(props.total_memory / 2**30, 1))
    from automedseg.device import cpu_supports_bf16

    n = threads or os.cpu_count() or 1
    return _Machine("cpu", cpu_model_name(), n, torch.__version__, "bf16" if cpu_supports_bf16() else "fp32",
                    host_memory_gib())


def _time_once(machine: _Machine) -> Calibration:
    """One calibration timing, with the CPU share the process was granted meanwhile.

    The convolutions (3D, then 2D) and, on a CPU, the placements of the augmentation worker, then the training
    steps (3D and 2D and the step shape probes taking turns; with their workers, as placed) are timed by wall
    clock in a window judged for load; the
    data pipeline after it, by the CPU time of one thread
    (:func:`automedseg.calibration_timing.calibrate_data_throughput`), which load barely changes.
    """
    from automedseg import calibration_step, calibration_timing, planning, training_step

    threads = machine.threads if machine.kind == "cpu" else None
    before, children, t0 = cpu_usage(), children_cpu_seconds(), time.perf_counter()
    gflops = planning.calibrate_conv_gflops(device=machine.kind, threads=threads, windows=TIMING_WINDOWS,
                                            window_s=TIMING_WINDOW_S)
    gflops_2d = planning.calibrate_conv_gflops(device=machine.kind, threads=threads, windows=TIMING_WINDOWS,
                                               window_s=TIMING_WINDOW_S, dims=2)
    steps: dict[int, tuple[tuple[int, float], ...]] = {2: (), 3: ()}
    placement, placement_s, probes = None, (), ()
    if machine.kind == "cpu":  # (a GPU step is the network's or the workers', both calibrated apart)
        placement, placement_s = calibration_step.calibrate_placement(threads=threads)
        timed = calibration_step.calibrate_steps(threads=threads, placement=placement)
        steps = {3: timed.steps_3d, 2: timed.steps_2d}
        probes = tuple((int(d), str(name), float(g)) for d, name, g in timed.probes)
    wall, after = time.perf_counter() - t0, cpu_usage()
    children = children_cpu_seconds() - children
    data = calibration_timing.calibrate_data_throughput()
    share, threshold = granted_share(before, after, wall_s=wall, threads=machine.threads, own_children_s=children)
    loaded = machine.kind == "cpu" and share is not None and share < threshold
    provenance = CalibrationProvenance(
        kind=machine.kind, device=machine.device, threads=machine.threads, torch_version=machine.torch_version,
        precision=machine.precision, measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        under_load=loaded)
    return Calibration(provenance, machine.memory_gib, tuple((int(w), float(g)) for w, g in gflops),
                       share if machine.kind == "cpu" else None,
                       gflops_by_width_2d=tuple((int(w), float(g)) for w, g in gflops_2d),
                       window_voxels_per_s=float(data.window_voxels_per_s),
                       augment_voxels_per_s=tuple((int(d), float(v)) for d, v in data.augment_voxels_per_s),
                       step_gflops_by_width=tuple((int(w), float(g)) for w, g in steps[3]),
                       step_gflops_by_width_2d=tuple((int(w), float(g)) for w, g in steps[2]),
                       worker_placement=placement,
                       placement_step_seconds=tuple((str(p), float(v)) for p, v in placement_s),
                       step_probe_gflops=probes,
                       step_kernels=training_step.step_kernels() if machine.kind == "cpu" else None)


def _best_of(a: Calibration, b: Calibration) -> Calibration:
    """Per throughput the faster of two timings (load only ever slows a timing down); the placement: ``b``'s."""
    def best(pairs_a: tuple[tuple[int, float], ...], pairs_b: tuple[tuple[int, float], ...]
             ) -> tuple[tuple[int, float], ...]:
        seen = dict(pairs_a)
        return tuple((k, max(v, seen.get(k, v))) for k, v in pairs_b)

    share = max((s for s in (a.cpu_share, b.cpu_share) if s is not None), default=None)
    seen_probes = {(d, name): g for d, name, g in a.step_probe_gflops}
    windows = max((v for v in (a.window_voxels_per_s, b.window_voxels_per_s) if v is not None), default=None)
    return dataclasses.replace(b, gflops_by_width=best(a.gflops_by_width, b.gflops_by_width), cpu_share=share,
                               gflops_by_width_2d=best(a.gflops_by_width_2d, b.gflops_by_width_2d),
                               window_voxels_per_s=windows,
                               augment_voxels_per_s=best(a.augment_voxels_per_s, b.augment_voxels_per_s),
                               step_gflops_by_width=best(a.step_gflops_by_width, b.step_gflops_by_width),
                               step_gflops_by_width_2d=best(a.step_gflops_by_width_2d, b.step_gflops_by_width_2d),
                               step_probe_gflops=tuple((d, n, max(g, seen_probes.get((d, n), g)))
                                                       for d, n, g in b.step_probe_gflops))


def _ratio(new: Calibration, old: Calibration) -> float:
    """The largest factor (>= 1) by which a throughput differs between two calibrations.

    Throughputs the old calibration lacks (an older cache entry) are not compared, nor its training steps when
    they ran on other kernels (:attr:`Calibration.step_kernels`: a faster step is no change of the machine); one
    the new lacks is an infinite difference.
    """
    old_t, new_t = calibration_throughputs(old), calibration_throughputs(new)
    if old.provenance.kind == "cpu" and old.step_kernels != new.step_kernels:
        old_t = {k: v for k, v in old_t.items() if " step " not in k}
    if set(old_t) - set(new_t):
        return math.inf
    return max(max(new_t[k] / v, v / new_t[k]) for k, v in old_t.items())


def _completed(cached: Calibration, new: Calibration) -> Calibration:
    """A cached calibration with the parts it lacks (an older automedseg did not time them) taken from ``new``."""
    if cached.provenance.kind == "cpu" and cached.step_kernels != new.step_kernels:
        # the steps ran on other kernels then: every step figure (and the placement they were timed under) is new
        cached = dataclasses.replace(cached, step_gflops_by_width=(), step_gflops_by_width_2d=(),
                                     step_probe_gflops=(), worker_placement=None, placement_step_seconds=(),
                                     step_kernels=new.step_kernels)
    if cached.worker_placement is None and new.worker_placement not in (None, "shared"):  # (steps timed as placed)
        cached = dataclasses.replace(cached, step_gflops_by_width=new.step_gflops_by_width,
                                     step_gflops_by_width_2d=new.step_gflops_by_width_2d,
                                     step_probe_gflops=new.step_probe_gflops)
    return dataclasses.replace(
        cached, gflops_by_width_2d=cached.gflops_by_width_2d or new.gflops_by_width_2d,
        window_voxels_per_s=cached.window_voxels_per_s if cached.window_voxels_per_s is not None
        else new.window_voxels_per_s,
        augment_voxels_per_s=cached.augment_voxels_per_s or new.augment_voxels_per_s,
        step_gflops_by_width=cached.step_gflops_by_width or new.step_gflops_by_width,
        step_gflops_by_width_2d=cached.step_gflops_by_width_2d or new.step_gflops_by_width_2d,
        worker_placement=cached.worker_placement if cached.worker_placement is not None else new.worker_placement,
        placement_step_seconds=cached.placement_step_seconds if cached.worker_placement is not None
        else new.placement_step_seconds,
        step_probe_gflops=cached.step_probe_gflops if probes_complete(cached.step_probe_gflops)
        else _rescaled_probes(new, cached))


def _rescaled_probes(new: Calibration, cached: Calibration) -> tuple[tuple[int, str, float], ...]:
    """``new``'s probes as if timed with ``cached``'s speed: each times its width's cached reference step over the
    new one (the fit prices the probe's excess over the reference, which a faster or slower run would misread)."""
    from automedseg.calibration_step import STEP_PROBES, probe_name

    widths = {(d, probe_name(*probe)): probe[0] for d, probes in STEP_PROBES.items() for probe in probes}
    tables = {d: (dict(cached.step_gflops_by_width_2d if d == 2 else cached.step_gflops_by_width),
                  dict(new.step_gflops_by_width_2d if d == 2 else new.step_gflops_by_width)) for d in (2, 3)}
    out = []
    for d, name, g in new.step_probe_gflops:
        old_t, new_t = tables[d]
        w = widths.get((d, name))
        scale = old_t[w] / new_t[w] if w in old_t and w in new_t else 1.0
        out.append((d, name, float(f"{g * scale:.3g}")))
    return tuple(out)


def _geomean(cal: Calibration) -> float:
    return math.exp(sum(math.log(g) for _, g in cal.gflops_by_width) / len(cal.gflops_by_width))


def _placement_text(cal: Calibration) -> str:
    """``; augmentation worker own_core (3D step: shared 0.31 s, own_core 0.28 s)``, or nothing."""
    timed = ", ".join(f"{p} {v:.3g} s" for p, v in cal.placement_step_seconds) or "-"
    return "" if cal.worker_placement is None else f"; augmentation worker {cal.worker_placement} (3D step: {timed})"


def _share_text(cal: Calibration) -> str:
    return "" if cal.cpu_share is None else f"{100 * cal.cpu_share:.0f}%"


def _choose(cached: Calibration | None, new: Calibration, *, attempts: int, log: Log) -> Calibration:
    """Which calibration to keep after a new timing (hysteresis; a timing under load is not believed)."""
    loaded = new.provenance.under_load
    if loaded:
        log(f"calibration: during the timing this process got {_share_text(new)} of the CPU its "
            f"{new.provenance.threads} thread(s) asked for: another process is busy")
    if cached is None:
        if loaded:
            log(f"warning: calibration taken under load (best of {attempts} timings) may underestimate this "
                "machine; it is cached as provisional: run `automedseg plan --recalibrate` on an idle machine")
        return new
    ratio = _ratio(new, cached)
    when = cached.provenance.measured_at
    if ratio <= HYSTERESIS and not (cached.provenance.under_load and not loaded):
        log(f"calibration: re-measured within {100 * (ratio - 1):.0f}% of the calibration of {when}; keeping that "
            "one so plans stay put")
        return cached
    if loaded and not cached.provenance.under_load:
        log(f"calibration: not believed (up to {100 * (ratio - 1):.0f}% off); keeping the calibration of {when}")
        return cached
    if loaded and _geomean(new) <= _geomean(cached):
        log(f"calibration: keeping the (faster) calibration of {when}; both were taken under load")
        return cached
    if cached.provenance.under_load:
        log(f"calibration: replacing the calibration of {when}, which was taken under load")
    else:
        log(f"calibration: the machine measured up to {100 * (ratio - 1):.0f}% differently from the calibration "
            f"of {when}; replacing it")
    return new


def calibrate(machine: _Machine, *, cache_path: Path | None = None, recalibrate: bool = False,
              log: Log = _quiet) -> Calibration:
    """This machine's calibration: from the cache, or timed (and cached) when missing or ``recalibrate``.

    Args:
        machine: What is calibrated (:func:`this_machine`).
        cache_path: The cache file (``None``: time every call, cache nothing).
        recalibrate: Time again even when a calibration is cached (kept if the new timing is within
            :data:`HYSTERESIS` of it or was taken under load).
        log: Where messages go.
    """
    from automedseg.errors import InputError

    cache = CalibrationCache()
    if cache_path is not None:
        try:
            cache = read_calibration_cache(cache_path)
        except InputError as e:
            log(f"warning: {e}; measuring again")
    key = CalibrationProvenance(machine.kind, machine.device, machine.threads, machine.torch_version,
                                machine.precision, "").key
    cached = cache.calibrations.get(key)
    if cached is not None and not recalibrate and not cached.provenance.under_load and cached.complete:
        log(f"calibration: reusing {cached.provenance.describe()} from {cache_path} "
            "(`automedseg plan --recalibrate` measures again)")
        return cached
    if cached is not None and not recalibrate and not cached.complete:
        log(f"calibration: the cached one ({cached.provenance.describe()}) has no "
            f"{_parts_text(cached.missing, 'or')} timing (an older automedseg): timing again")
    elif cached is not None and not recalibrate:
        log(f"calibration: the cached one ({cached.provenance.describe()}) is provisional: timing again")
    attempts = 1 if cached is not None else LOADED_ATTEMPTS
    new = _time_once(machine)
    for _ in range(attempts - 1):
        if not new.provenance.under_load:
            break
        new = _best_of(new, _time_once(machine))
    chosen = _choose(cached, new, attempts=attempts, log=log)
    if chosen is new:
        granted = f" (the process got {_share_text(new)} of the CPU it asked for)" if new.cpu_share is not None else ""
        log(f"calibration: measured {new.provenance.describe()}{granted}{_placement_text(new)}")
    elif not chosen.complete and not new.provenance.under_load:  # (under load: timed again by the next plan)
        missing = chosen.missing
        chosen = _completed(chosen, new)
        log(f"calibration: the {_parts_text(missing, 'and')} timings added to the calibration of "
            f"{chosen.provenance.measured_at}")
    changed = chosen is not cached
    if chosen.provenance.kind == "cpu" and chosen.step_kernels != new.step_kernels:
        # steps timed on other kernels, and this timing (under load) not believed: this plan does without them
        chosen = dataclasses.replace(chosen, step_gflops_by_width=(), step_gflops_by_width_2d=(),
                                     step_probe_gflops=(), worker_placement=None, placement_step_seconds=())
    if changed and cache_path is not None:
        calibrations = {**cache.calibrations, key: chosen}
        write_calibration_cache(cache_path, CalibrationCache(dict(sorted(calibrations.items()))))
        log(f"calibration: cached in {cache_path}")
    return chosen


def profile_from(calibration: Calibration) -> DeviceProfile:
    """The planner's device profile of a calibration: throughputs (GFLOP/s, voxels/s) quantised, provenance attached.

    Parts an older cache entry lacks stay absent (the cost model then falls back, see :mod:`automedseg.cost_model`).
    """
    from automedseg.calibration_step import fit_step_shape_cost

    p = calibration.provenance
    steps = {3: tuple((w, quantise_gflops(g)) for w, g in calibration.step_gflops_by_width),
             2: tuple((w, quantise_gflops(g)) for w, g in calibration.step_gflops_by_width_2d)}
    raw = {3: calibration.step_gflops_by_width, 2: calibration.step_gflops_by_width_2d}  # (the fit: unrounded)
    shapes = [fit_step_shape_cost(d, raw[d], tuple((n, g) for dd, n, g in calibration.step_probe_gflops if dd == d))
              for d in (3, 2)]
    return DeviceProfile(
        kind=p.kind, name=f"{p.device}, {p.threads} threads" if p.kind == "cpu" else p.device,
        cpu_threads=p.threads, memory_gib=calibration.memory_gib,
        gflops_by_width=tuple((w, quantise_gflops(g)) for w, g in calibration.gflops_by_width),
        measured=True, calibration=p,
        gflops_by_width_2d=tuple((w, quantise_gflops(g)) for w, g in calibration.gflops_by_width_2d) or None,
        window_voxels_per_s=None if calibration.window_voxels_per_s is None
        else quantise_gflops(calibration.window_voxels_per_s),
        augment_voxels_per_s=tuple((d, quantise_gflops(v)) for d, v in calibration.augment_voxels_per_s) or None,
        step_gflops_by_width=steps[3] or None, step_gflops_by_width_2d=steps[2] or None,
        worker_placement=calibration.worker_placement,
        placement_step_seconds=tuple((n, float(f"{v:.3g}")) for n, v in calibration.placement_step_seconds) or None,
        step_shape_costs=tuple(c for c in shapes if c is not None) or None,
    )


def device_profile(kind: str = "auto", *, threads: int | None = None, cache_path: Path | None = None,
                   recalibrate: bool = False, log: Log = _quiet) -> DeviceProfile:
    """The device profile ``plan`` fits to: a nominal one by name, or this machine's cached calibration.

    Args:
        kind: ``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda``, ``mps`` or a nominal profile name
            (:data:`automedseg.planning.NOMINAL_PROFILES`, returned as they are).
        threads: CPU threads for training (default: all cores).
        cache_path: The calibration cache file (``None``: time now, cache nothing).
        recalibrate: Time again even when a calibration is cached.
        log: Where messages go.

    Raises:
        ValueError: An unknown ``kind``.
        RuntimeError: ``cuda`` without a CUDA device.
    """
    from automedseg.planning import NOMINAL_PROFILES, measure_device

    if kind in NOMINAL_PROFILES:
        return NOMINAL_PROFILES[kind]
    if kind == "auto":
        import torch

        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind not in ("cpu", "cuda"):
        return measure_device(kind, threads=threads)  # mps (nominal numbers) or the error for an unknown kind
    machine = this_machine(kind, threads=threads)
    return profile_from(calibrate(machine, cache_path=cache_path, recalibrate=recalibrate, log=log))
