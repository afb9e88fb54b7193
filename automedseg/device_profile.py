"""The machine a plan is made for: :class:`DeviceProfile` and the provenance of its calibration.

Part of ``plans.json`` (``device``; re-exported by :mod:`automedseg.plans`); measured by
:mod:`automedseg.calibration`, read by the cost model (:mod:`automedseg.cost_model`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from automedseg.serialize import PlanError

_OMIT = {"omit_if_none": True}  # an optional field added later: left out of plans.json while it is null
#: Where a CPU training run's augmentation worker runs (:mod:`automedseg.thread_placement`): ``shared`` (all cores
#: shared with the training threads, the worker niced) or ``own_core`` (the worker pinned to a core of its own).
WORKER_PLACEMENTS = ("shared", "own_core")


def _positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class CalibrationProvenance:
    """Where and when a calibration was measured (:mod:`automedseg.calibration`): what ``plans.json`` records.

    Attributes:
        kind: ``cpu`` or ``cuda``.
        device: CPU model or GPU name.
        threads: Torch threads the timing used (CPU) or the host's CPU count (CUDA).
        torch_version: ``torch.__version__`` of the timing.
        precision: ``bf16`` or ``fp32`` (CPU, as training uses), ``fp16`` (CUDA AMP).
        measured_at: UTC time of the timing, ISO 8601.
        under_load: The timing ran while another process took CPU time (a provisional calibration).
    """

    kind: str
    device: str
    threads: int
    torch_version: str
    precision: str
    measured_at: str
    under_load: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "cuda"):
            raise PlanError(f"kind {self.kind!r} is not cpu or cuda")
        if self.threads < 1:
            raise PlanError(f"threads must be at least 1, got {self.threads}")

    @property
    def key(self) -> str:
        """The cache key: one calibration per device, thread count, torch version and precision."""
        return f"{self.kind} | {self.device} | {self.threads} threads | torch {self.torch_version} | {self.precision}"

    def describe(self) -> str:
        """One line for logs, e.g. ``AMD EPYC, 2 threads, torch 2.13.0, fp32, measured 2025-01-02T10:00:00Z``."""
        load = " (under load)" if self.under_load else ""
        return (f"{self.device}, {self.threads} threads, torch {self.torch_version}, {self.precision}, "
                f"measured {self.measured_at}{load}")


def interpolate_by_width(table: tuple[tuple[int, float], ...], width: float) -> float:
    """A ``(width, throughput)`` table at ``width``: log-linear between its widths, the end values beyond them.

    Example:
        >>> table = ((8, 100.0), (32, 400.0))
        >>> round(interpolate_by_width(table, 16), 6), interpolate_by_width(table, 64)
        (200.0, 400.0)
    """
    pts = sorted(table)
    if width <= pts[0][0]:
        return pts[0][1]
    if width >= pts[-1][0]:
        return pts[-1][1]
    for (w0, g0), (w1, g1) in zip(pts, pts[1:]):
        if w0 <= width <= w1:
            t = (math.log(width) - math.log(w0)) / (math.log(w1) - math.log(w0))
            return math.exp(math.log(g0) + t * (math.log(g1) - math.log(g0)))
    return pts[-1][1]  # pragma: no cover


@dataclass(frozen=True)
class StepShapeCost:
    """What a CPU training step costs for parameters beyond those of the calibration's reference network.

    The timed steps (``DeviceProfile.step_gflops_by_width``) are throughputs of the planner's networks for one
    reference patch. A network of the same width with more parameters per FLOP (a deep 2D U-Net on a small patch:
    its 512-feature stages on 4x4 pixels, the optimizer's and the weight gradients' passes over 20 M parameters)
    runs slower per FLOP than those. The calibration times such a network
    (:data:`automedseg.calibration_step.STEP_PROBES`) and charges the parameters a network has beyond the
    reference's at its FLOPs (``parameters - FLOPs x parameters_per_gflop``) at ``seconds_per_m_parameters``
    (:func:`automedseg.calibration_step.fit_step_shape_cost`). A network with fewer parameters per FLOP is
    charged as the reference is: a shallow one on many small slices saves on parameters what it spends on more
    activations per FLOP (the two cancelled within 6 % in a 2D network of 4 stages on 22 x 56x40, timed without
    its worker on a 2-core Xeon; with the calibration's worker on its synthetic slices the activations looked far
    dearer than in real training, so they are not charged).

    Attributes:
        dims: 2 or 3.
        parameters_per_gflop_by_width: ``(feature width, million parameters per GFLOP)`` of the reference network
            of that width and its batch.
        seconds_per_m_parameters: Seconds a step takes per million parameters beyond those.

    Example:
        >>> cost = StepShapeCost(2, ((16, 0.15), (32, 0.15)), 0.01)
        >>> cost.excess_seconds(flops=40e9, parameters=20e6, width=32)  # 20 M against 6 M at 40 GFLOP
        0.14
        >>> cost.excess_seconds(flops=40e9, parameters=2e6, width=32)
        0.0
    """

    dims: int
    parameters_per_gflop_by_width: tuple[tuple[int, float], ...]
    seconds_per_m_parameters: float

    def __post_init__(self) -> None:
        if self.dims not in (2, 3):
            raise PlanError(f"step_shape_costs: dims must be 2 or 3, got {self.dims}")
        table = self.parameters_per_gflop_by_width
        if not table or not all(isinstance(w, int) and w > 0 and _positive(v) for w, v in table):
            raise PlanError("step_shape_costs: parameters_per_gflop_by_width must hold (positive width, positive "
                            "value) pairs")
        value = self.seconds_per_m_parameters
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise PlanError(f"step_shape_costs: seconds_per_m_parameters must be a number >= 0, got {value!r}")

    def excess_seconds(self, *, flops: float, parameters: float, width: int) -> float:
        """Seconds a step of ``flops`` (the batch's) takes for its ``parameters`` beyond the reference's."""
        reference = flops / 1e9 * interpolate_by_width(self.parameters_per_gflop_by_width, width)
        return round(max(0.0, parameters / 1e6 - reference) * self.seconds_per_m_parameters, 6)


@dataclass(frozen=True)
class DeviceProfile:
    """The machine a plan was made for.

    Attributes:
        kind: ``cpu``, ``cuda`` or ``mps``.
        name: Human-readable device name.
        cpu_threads: Torch threads used for training.
        memory_gib: Host memory (CPU) or accelerator memory (GPU) available for training.
        gflops_by_width: ``(feature width, GFLOP/s)`` pairs: measured training throughput of a 3x3(x3)
            convolution of that width (forward + backward, mixed precision where supported).
        measured: ``False`` for a nominal profile (planning for a machine other than this one).
        calibration: Which cached calibration of this machine the throughput comes from (its provenance,
            see :mod:`automedseg.calibration`); absent for nominal profiles and older plans.
        gflops_by_width_2d: The same for a 3x3 2D convolution (absent: 2D uses the 3D figures).
        window_voxels_per_s: Sampling-window voxels one CPU data worker reads per second of its CPU time.
        augment_voxels_per_s: ``(dims, voxels/s)``: patch voxels one CPU data worker augments per CPU second.
        step_gflops_by_width: ``(feature width, GFLOP/s)``: a real 3D training step of the planner's network at
            that width (forward, loss, backward, optimizer, with the augmentation worker running beside it), as
            training FLOPs per second of the step less :data:`automedseg.cost_model.STEP_LATENCY_S` (CPU only).
        step_gflops_by_width_2d: The same for a 2D training step.
        worker_placement: Where the augmentation worker ran when the steps were timed, as the calibration chose it
            (:data:`WORKER_PLACEMENTS`; CPU only): the planner writes it into the plan
            (:func:`automedseg.cost_model.worker_placement_for`).
        placement_step_seconds: ``(placement, seconds)``: a 3D training step at the reference width
            (:data:`automedseg.calibration_step.PLACEMENT_WIDTH`) under each placement timed, which the choice
            was made from (one entry on a machine with one usable core).
        step_shape_costs: Per dims, what a step costs for parameters beyond the timed reference networks'
            (:class:`StepShapeCost`; CPU only): the cost model adds it to the timed throughput's estimate.

    The data figures come from :func:`automedseg.calibration_timing.calibrate_data_throughput` (absent: the
    cost model takes the data pipeline as free), the step figures from
    :func:`automedseg.calibration_step.calibrate_steps` (absent: the cost model charges the convolution
    figures with fixed overheads). The fields from ``gflops_by_width_2d`` on are newer than the first plans:
    absent (``null``) they are left out of ``plans.json``, so older plans load and save unchanged.
    """

    kind: str
    name: str
    cpu_threads: int
    memory_gib: float
    gflops_by_width: tuple[tuple[int, float], ...]
    measured: bool = True
    calibration: CalibrationProvenance | None = field(default=None, metadata=_OMIT)
    gflops_by_width_2d: tuple[tuple[int, float], ...] | None = field(default=None, metadata=_OMIT)
    window_voxels_per_s: float | None = field(default=None, metadata=_OMIT)
    augment_voxels_per_s: tuple[tuple[int, float], ...] | None = field(default=None, metadata=_OMIT)
    step_gflops_by_width: tuple[tuple[int, float], ...] | None = field(default=None, metadata=_OMIT)
    step_gflops_by_width_2d: tuple[tuple[int, float], ...] | None = field(default=None, metadata=_OMIT)
    worker_placement: str | None = field(default=None, metadata=_OMIT)
    placement_step_seconds: tuple[tuple[str, float], ...] | None = field(default=None, metadata=_OMIT)
    step_shape_costs: tuple[StepShapeCost, ...] | None = field(default=None, metadata=_OMIT)

    def __post_init__(self) -> None:
        if not self.gflops_by_width:
            raise PlanError("gflops_by_width must not be empty")
        for name in ("gflops_by_width", "gflops_by_width_2d", "augment_voxels_per_s", "step_gflops_by_width",
                     "step_gflops_by_width_2d"):
            if not all(_positive(v) for _, v in getattr(self, name) or ()):
                raise PlanError(f"{name} must hold positive throughputs")
        if not all(d in (2, 3) for d, _ in self.augment_voxels_per_s or ()):
            raise PlanError("augment_voxels_per_s must be (dims, voxels/s) pairs with dims 2 or 3")
        if self.window_voxels_per_s is not None and not _positive(self.window_voxels_per_s):
            raise PlanError("window_voxels_per_s must be a positive number or null")
        if self.worker_placement is not None and self.worker_placement not in WORKER_PLACEMENTS:
            raise PlanError(f"worker_placement {self.worker_placement!r} is not one of {WORKER_PLACEMENTS} or null")
        if not all(p in WORKER_PLACEMENTS and _positive(s) for p, s in self.placement_step_seconds or ()):
            raise PlanError(f"placement_step_seconds must be (placement, seconds) pairs with a placement of "
                            f"{WORKER_PLACEMENTS} and positive seconds")
        dims = [c.dims for c in self.step_shape_costs or ()]
        if len(dims) != len(set(dims)):
            raise PlanError(f"step_shape_costs must hold one entry per dims, got dims {dims}")
        if any(not (self.step_gflops_by_width_2d if d == 2 else self.step_gflops_by_width) for d in dims):
            raise PlanError("step_shape_costs: an entry needs the timed steps of its dims (step_gflops_by_width"
                            "(_2d))")

    def gflops_at(self, width: int, *, dims: int = 3) -> float:
        """Throughput for a given feature width, interpolated log-linearly between calibrated widths.

        ``dims=2`` reads ``gflops_by_width_2d`` where the profile has it, else the 3D figures.
        """
        return interpolate_by_width(
            self.gflops_by_width_2d if dims == 2 and self.gflops_by_width_2d else self.gflops_by_width, width)

    def step_gflops_at(self, width: int, *, dims: int = 3) -> float | None:
        """A real training step's throughput at a feature width (as :meth:`gflops_at`); ``None``: not calibrated.

        Example:
            >>> NOMINAL_PROFILES["reference-cpu-2core"].step_gflops_at(16) is None
            True
        """
        table = self.step_gflops_by_width_2d if dims == 2 else self.step_gflops_by_width
        return interpolate_by_width(table, width) if table else None

    def step_shape_cost(self, dims: int) -> StepShapeCost | None:
        """The calibrated step cost of ``dims``-D networks beyond their FLOPs (``None``: not calibrated)."""
        return next((c for c in self.step_shape_costs or () if c.dims == dims), None)

    def augment_rate(self, dims: int) -> float | None:
        """Voxels per second one data worker augments for a ``dims``-D patch (``None``: not calibrated)."""
        return dict(self.augment_voxels_per_s or ()).get(dims)


# Nominal profiles for planning a machine that is not this one (plans/ examples, tests). The CPU's data figures
# are calibrate_data_throughput's on a 2-core EPYC; the GPU's data pipeline is not modelled (its host is unknown).
#: Nominal profiles (:func:`automedseg.planning.measure_device` returns them by name).
NOMINAL_PROFILES: dict[str, DeviceProfile] = {
    "reference-cpu-2core": DeviceProfile(
        kind="cpu", name="nominal 2-core AVX-512 CPU", cpu_threads=2, memory_gib=23.0,
        gflops_by_width=((8, 210.0), (16, 610.0), (32, 1000.0), (64, 1400.0)), measured=False,
        window_voxels_per_s=2.0e8, augment_voxels_per_s=((2, 6.0e6), (3, 5.5e6)),
    ),
    "reference-gpu-24g": DeviceProfile(
        kind="cuda", name="nominal 24 GiB CUDA GPU", cpu_threads=12, memory_gib=24.0,
        gflops_by_width=((8, 2000.0), (16, 6000.0), (32, 15000.0), (64, 25000.0)), measured=False,
    ),
}
