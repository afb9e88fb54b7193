"""Training-step throughput: automedseg vs nnU-Net v2's ``nnUNetTrainer.train_step`` on CPU.

Both tools train the SAME network on the same patch and batch: nnU-Net's 3d_fullres plan of the benchmark
dataset (read from ``nnUNetPlans.json`` in nnU-Net's preprocessed folder), rebuilt on the automedseg side
as an equivalent ``plain_unet`` NetworkPlan (the parameter counts of both networks are reported and must
match). Data loading is excluded on both sides: each step gets the same random batch (automedseg's
trainer logs its data wait separately).

* nnU-Net: a small script run with the nnU-Net venv's python builds a real ``nnUNetTrainer`` (device cpu),
  calls ``initialize()`` (network from the plan, DC_and_CE_loss in the deep-supervision wrapper, SGD
  Nesterov 0.99) and times ``trainer.train_step({'data', 'target'})``, i.e. nnU-Net's own code path.
  On CPU nnU-Net uses no autocast and no torch.compile (fp32, contiguous memory format).
* automedseg: the step of ``automedseg.training._run_epochs`` (bf16 autocast on CPUs that support it,
  channels_last_3d, DeepSupervisionLoss outside autocast, backward, gradient clipping, SGD Nesterov),
  with the network, loss, optimizer settings and memory format taken from automedseg itself. fp32 (autocast
  off) is measured for reference, and so is automedseg's own CPU plan (narrower network, batch 2).

Each measurement: 2 warm-up steps, then at least ``--steps`` steps and at least ``--min-seconds``; the
median seconds/step is reported. A bf16 (and fp32) 2048x2048 matrix-multiply peak measured in the same run
puts automedseg's achieved GFLOP/s (``estimate_training_flops`` x batch / step time) into perspective.
Both sides use ``BENCH_THREADS`` (2) torch threads.

Target (issue #19): automedseg (bf16) samples/s >= 3x nnU-Net's.

Usage::

    python benchmarks/train_speed.py                  # both tools
    python benchmarks/train_speed.py --steps 10
    python benchmarks/train_speed.py --skip-nnunet    # automedseg only (no ratio)

Results go to ``benchmarks/results/train_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BENCH_THREADS,
    DEFAULT_MSD_DIR,
    DEFAULT_VENV_DIR,
    WORK_DIR,
    ensure_nnunet_venv,
    heartbeat,
    machine_info,
    md_table,
    nnunet_dataset_name,
    nnunet_env,
    nnunet_paths,
    thread_env,
    write_results,
)

CONFIGURATION = "3d_fullres"
PLANS_IDENTIFIER = "nnUNetPlans"
TARGET_SPEEDUP = 3.0  # issue #19 (was 2.5 before it)
#: Issue #19's step targets as fractions of the same run's matrix-multiply peak: bf16 on a CPU with AMX, bf16 on
#: AVX-512 BF16 without AMX, fp32 anywhere.
PEAK_TARGET_AMX, PEAK_TARGET_AVX512_BF16, PEAK_TARGET_FP32 = 0.5, 0.7, 0.8


def peak_targets(cpu_flags: set[str]) -> dict:
    """The fractions of the matmul peak the bf16 and fp32 steps must reach on a CPU with these flags.

    Example:
        >>> peak_targets({"amx_bf16", "avx512_bf16"})["bf16"], peak_targets({"avx512_bf16"})["bf16"]
        (0.5, 0.7)
        >>> peak_targets({"avx2"})
        {'bf16': None, 'bf16_kind': 'no native bf16', 'fp32': 0.8}
    """
    if "amx_bf16" in cpu_flags:
        return {"bf16": PEAK_TARGET_AMX, "bf16_kind": "AMX", "fp32": PEAK_TARGET_FP32}
    if "avx512_bf16" in cpu_flags:
        return {"bf16": PEAK_TARGET_AVX512_BF16, "bf16_kind": "AVX-512 BF16 without AMX", "fp32": PEAK_TARGET_FP32}
    return {"bf16": None, "bf16_kind": "no native bf16", "fp32": PEAK_TARGET_FP32}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _verdict(measured: float | None, target: float | None) -> str:
    if measured is None or target is None:
        return "n/a"
    return "PASS" if measured >= target else "FAIL"
WARMUP_STEPS = 2
MAX_STEPS = 500
MATMUL_SIZE = 2048
MATMUL_SECONDS = 2.0
PROBE_SECONDS = 0.3  # the matmul peak measured beside each timed step
SEED = 12345
#: automedseg's CPU plan for Hippocampus on the 2-core benchmark machine (used when no plans.json is given).
OWN_PLAN_FEATURES = (24, 48, 96, 192)
OWN_PLAN_BATCH = 2

# The nnU-Net side, run with the nnU-Net venv's python: argv[1] is a JSON object of settings, the result
# is written as JSON to settings["out"]. Kept as a string so that this file is the whole benchmark.
NNUNET_SCRIPT = r'''
import json, os, statistics, sys, time

cfg = json.loads(sys.argv[1])
import torch

torch.set_num_threads(cfg["threads"])
import nnunetv2
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

plans = load_json(cfg["plans_file"])
plans["continue_training"] = False  # what nnunetv2.run.run_training.get_trainer_from_args sets
dataset_json = load_json(cfg["dataset_json"])
torch.manual_seed(cfg["seed"])
trainer = nnUNetTrainer(plans=plans, configuration=cfg["configuration"], fold=0, dataset_json=dataset_json,
                        device=torch.device("cpu"))
trainer.initialize()
torch.set_num_threads(cfg["threads"])
trainer.on_train_epoch_start()  # network.train(), lr schedule step, as in run_training
cm = trainer.configuration_manager
patch = [int(p) for p in cm.patch_size]
batch_size = int(trainer.batch_size)
n_heads = int(trainer.label_manager.num_segmentation_heads)
scales = trainer._get_deep_supervision_scales()
gen = torch.Generator().manual_seed(cfg["seed"])
data = torch.randn((batch_size, trainer.num_input_channels, *patch), generator=gen)
# the dataloader yields int16 segmentations; DownsampleSegForDSTransform rounds patch * scale
target = [torch.randint(0, n_heads, (batch_size, 1, *[int(round(p * s)) for p, s in zip(patch, sc)]),
                        generator=gen).to(torch.int16) for sc in scales]
batch = {"data": data, "target": target}

losses, times = [], []
for _ in range(cfg["warmup"]):
    losses.append(float(trainer.train_step(batch)["loss"]))
t_start = time.perf_counter()
while len(times) < cfg["max_steps"] and (len(times) < cfg["steps"]
                                         or time.perf_counter() - t_start < cfg["min_seconds"]):
    t0 = time.perf_counter()
    losses.append(float(trainer.train_step(batch)["loss"]))
    times.append(time.perf_counter() - t0)

net = trainer.network
loss = trainer.loss
result = {
    "nnunetv2": getattr(nnunetv2, "__version__", None),
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "device": str(trainer.device),
    "autocast": trainer.device.type == "cuda",
    "compiled": bool(trainer._do_i_compile()),
    "grad_scaler": trainer.grad_scaler is not None,
    "network_class": f"{type(net).__module__}.{type(net).__name__}",
    "parameters": int(sum(p.numel() for p in net.parameters() if p.requires_grad)),
    "batch_size": batch_size,
    "patch_size": patch,
    "num_input_channels": int(trainer.num_input_channels),
    "num_segmentation_heads": n_heads,
    "deep_supervision_scales": [[float(v) for v in s] for s in scales],
    "loss": type(loss).__name__,
    "inner_loss": type(getattr(loss, "loss", loss)).__name__,
    "loss_weights": [float(w) for w in getattr(loss, "weight_factors", [])],
    "batch_dice": bool(cm.batch_dice),
    "optimizer": type(trainer.optimizer).__name__,
    "optimizer_defaults": {k: trainer.optimizer.defaults[k] for k in ("momentum", "nesterov", "weight_decay")},
    "warmup_steps": cfg["warmup"],
    "step_seconds": times,
    "losses": losses,
    "load_avg_end": list(os.getloadavg()),
}
with open(cfg["out"], "w") as fh:
    json.dump(result, fh, indent=1)
'''


# --------------------------------------------------------------------------------------------------------
# nnU-Net plan -> automedseg NetworkPlan
# --------------------------------------------------------------------------------------------------------


def nnunet_plan_summary(plans_path: Path, configuration: str = CONFIGURATION) -> dict:
    """Patch, batch and network of one configuration of nnU-Net's plans file."""
    plans = json.loads(Path(plans_path).read_text())
    cfg = plans["configurations"][configuration]
    arch = cfg["architecture"]["arch_kwargs"]
    return {
        "plans_file": str(plans_path),
        "configuration": configuration,
        "patch_size": [int(p) for p in cfg["patch_size"]],
        "batch_size": int(cfg["batch_size"]),
        "network_class": cfg["architecture"]["network_class_name"],
        "n_stages": int(arch["n_stages"]),
        "features_per_stage": [int(f) for f in arch["features_per_stage"]],
        "kernel_sizes": [[int(k) for k in ks] for ks in arch["kernel_sizes"]],
        "strides": [[int(s) for s in st] for st in arch["strides"]],
        "n_conv_per_stage": [int(n) for n in arch["n_conv_per_stage"]],
        "n_conv_per_stage_decoder": [int(n) for n in arch["n_conv_per_stage_decoder"]],
        "conv_bias": bool(arch.get("conv_bias", False)),
        "norm_op": arch.get("norm_op"),
        "norm_op_kwargs": arch.get("norm_op_kwargs"),
        "nonlin": arch.get("nonlin"),
        "batch_dice": bool(cfg.get("batch_dice", False)),
    }


def automedseg_network_plan(summary: dict) -> Any:
    """The automedseg ``plain_unet`` NetworkPlan equivalent to nnU-Net's PlainConvUNet of ``summary``.

    nnU-Net lists ``n_conv_per_stage_decoder`` deepest decoder stage first; automedseg indexes it by the
    resolution of the decoder stage's output, shallowest first, hence the reversal.
    """
    from automedseg.plans import NetworkPlan

    if not summary["network_class"].endswith("PlainConvUNet"):
        raise ValueError(f"expected nnU-Net's PlainConvUNet, the plan has {summary['network_class']}")
    return NetworkPlan(
        architecture="plain_unet",
        features_per_stage=tuple(summary["features_per_stage"]),
        kernel_sizes=tuple(tuple(k) for k in summary["kernel_sizes"]),
        strides=tuple(tuple(s) for s in summary["strides"]),
        n_conv_per_stage_encoder=tuple(summary["n_conv_per_stage"]),
        n_conv_per_stage_decoder=tuple(reversed(summary["n_conv_per_stage_decoder"])),
        deep_supervision=True,
    )


def own_cpu_plan(nnunet_net: Any, plans_path: Path | None) -> tuple[Any, tuple[int, ...], int, str]:
    """automedseg's own 3d_fullres CPU plan: (network, patch, batch, source description)."""
    import dataclasses

    if plans_path is not None:
        from automedseg.plans import Plans

        cfg = Plans.load(plans_path).configuration(CONFIGURATION)
        return cfg.network, tuple(cfg.patch_size), int(cfg.batch_size), f"{plans_path} ({CONFIGURATION})"
    net = dataclasses.replace(nnunet_net, features_per_stage=OWN_PLAN_FEATURES)
    return net, (), OWN_PLAN_BATCH, f"built in: widths {OWN_PLAN_FEATURES}, batch {OWN_PLAN_BATCH}"


# --------------------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------------------


def _load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its waited-for children)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    jiffies = [int(v) for v in fields]
    busy = sum(jiffies) - jiffies[3] - (jiffies[4] if len(jiffies) > 4 else 0)  # minus idle and iowait
    own = sum(os.times()[:4])
    return busy / os.sysconf("SC_CLK_TCK"), own


class ForeignCpu:
    """Context manager measuring CPU seconds used by OTHER processes (a sign that timings are disturbed)."""

    def __enter__(self) -> ForeignCpu:
        self._t0 = time.perf_counter()
        self._busy0, self._own0 = _cpu_seconds()
        self.figures: dict = {}
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own = _cpu_seconds()
        wall = time.perf_counter() - self._t0
        foreign = max(0.0, (busy - self._busy0) - (own - self._own0))
        self.figures = {
            "wall_s": round(wall, 1),
            "foreign_cpu_s": round(foreign, 1),
            "foreign_cpu_fraction_of_one_core": round(foreign / max(wall, 1e-9), 3),
        }


def time_steps(step: Callable[[], float], *, steps: int, min_seconds: float, warmup: int = WARMUP_STEPS,
               probe: Callable[[], float] | None = None) -> dict:
    """Run ``warmup`` untimed steps, then at least ``steps`` timed steps and at least ``min_seconds``.

    ``probe`` (the matmul peak, GFLOP/s) runs before the first timed step and after each: on a shared machine
    whose speed drifts within seconds, a step is compared with the peak measured beside it.
    """
    losses = [step() for _ in range(warmup)]
    times: list[float] = []
    probes: list[float] = [probe()] if probe else []
    t_start = time.perf_counter()
    while len(times) < MAX_STEPS and (len(times) < steps or time.perf_counter() - t_start < min_seconds):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
        if probe:
            probes.append(probe())
    return {"warmup_steps": warmup, "step_seconds": times, "losses": losses, "probe_gflops": probes}


def interleaved_fraction(flops_per_step: float, step_seconds: list[float], probe_gflops: list[float]) -> float | None:
    """The median over steps of the step's GFLOP/s over the mean of the peaks probed before and after it.

    Example:
        >>> interleaved_fraction(100e9, [1.0, 0.5, 1.0], [200.0, 200.0, 400.0, 200.0])
        0.5
    """
    if len(probe_gflops) != len(step_seconds) + 1:
        return None
    ratios = [flops_per_step / t / 1e9 / ((probe_gflops[i] + probe_gflops[i + 1]) / 2)
              for i, t in enumerate(step_seconds)]
    return round(statistics.median(ratios), 3)


def summarize_steps(raw: dict, batch_size: int) -> dict:
    """Median / mean / min seconds per step and samples per second (from the median)."""
    times = raw["step_seconds"]
    med = statistics.median(times)
    return {
        "batch_size": batch_size,
        "n_timed_steps": len(times),
        "seconds_per_step_median": round(med, 4),
        "seconds_per_step_mean": round(statistics.fmean(times), 4),
        "seconds_per_step_min": round(min(times), 4),
        "seconds_per_step_stdev": round(statistics.stdev(times), 4) if len(times) > 1 else 0.0,
        "samples_per_s": round(batch_size / med, 3),
        "loss_first": round(raw["losses"][0], 4),
        "loss_last": round(raw["losses"][-1], 4),
        "step_seconds": [round(t, 4) for t in times],
        "probe_gflops": [round(g, 1) for g in raw.get("probe_gflops", [])],
    }


def matmul_peak(dtype_name: str, *, n: int = MATMUL_SIZE, seconds: float = MATMUL_SECONDS) -> dict:
    """GFLOP/s of repeated ``torch.matmul`` of two n x n matrices of ``dtype_name`` for about ``seconds``."""
    import torch

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(SEED)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    count = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.matmul(a, b, out=out)
        count += 1
    elapsed = time.perf_counter() - t0
    return {
        "dtype": dtype_name,
        "n": n,
        "matmuls": count,
        "seconds": round(elapsed, 3),
        "gflops": round(2.0 * n**3 * count / elapsed / 1e9, 1),
    }


def measure_automedseg(
    net: Any,
    *,
    patch_size: tuple[int, ...],
    batch_size: int,
    in_channels: int,
    num_classes: int,
    amp: bool,
    steps: int,
    min_seconds: float,
) -> dict:
    """Time automedseg's training step (as in ``automedseg.training._run_epochs``) on a random batch."""
    import numpy as np
    import torch

    from automedseg.allocator import retain_freed_memory
    from automedseg.device import cpu_supports_bf16, memory_format
    from automedseg.fused_norm import fused_available
    from automedseg.network import build_network, count_parameters, output_shapes, output_strides
    from automedseg.plans import TrainingPlan
    from automedseg.training import DeepSupervisionLoss, train_step

    dims = len(patch_size)
    device = torch.device("cpu")
    retained = retain_freed_memory()  # as train_fold does on a CPU
    tr = TrainingPlan(epochs=1, iterations_per_epoch=1)  # the plan defaults: lr, momentum, decay, clipping
    torch.manual_seed(SEED)
    # model, optimizer and loss exactly as train_fold builds them on a CPU
    model = build_network(net, in_channels=in_channels, num_classes=num_classes, dims=dims).to(device)
    model = model.to(memory_format=memory_format(dims))
    optimizer = torch.optim.SGD(model.parameters(), lr=tr.initial_lr, momentum=tr.momentum, nesterov=True,
                                weight_decay=tr.weight_decay)
    strides = output_strides(net)
    loss_fn = DeepSupervisionLoss(len(strides), dice_weight=tr.dice_weight, ce_weight=tr.ce_weight)
    mf = memory_format(dims)
    model.train()
    model.deep_supervision = True

    # a batch as the training loader yields it: float32 data, int8 targets per deep-supervision output
    rng = np.random.default_rng(SEED)
    batch = {
        "data": rng.standard_normal((batch_size, in_channels, *patch_size), dtype=np.float32),
        "target": [rng.integers(0, num_classes, (batch_size, 1, *shape), dtype=np.int8)
                   for shape in output_shapes(net, patch_size)],
    }

    def step() -> float:
        # exactly the trainer's step (automedseg.training.train_step)
        return train_step(model, batch, optimizer=optimizer, loss_fn=loss_fn, device=device, amp=amp,
                          grad_clip_norm=tr.grad_clip_norm)

    load_before = _load_avg()
    with ForeignCpu() as foreign:
        dtype = "bfloat16" if amp and cpu_supports_bf16() else "float32"
        raw = time_steps(step, steps=steps, min_seconds=min_seconds,
                         probe=lambda: matmul_peak(dtype, seconds=PROBE_SECONDS)["gflops"])
    out = summarize_steps(raw, batch_size)
    out.update(
        {
            "foreign_cpu": foreign.figures,
            "amp_requested": amp,
            "autocast_dtype": "bfloat16" if amp and cpu_supports_bf16() else "float32",
            "memory_format": str(mf),
            "fused_norm": fused_available(),
            "retained_memory": retained,
            "parameters": count_parameters(model),
            "patch_size": list(patch_size),
            "threads": torch.get_num_threads(),
            "load_avg_before": load_before,
            "load_avg_after": _load_avg(),
        }
    )
    return out


def add_flops(run: dict, net: Any, *, patch_size: tuple[int, ...], in_channels: int, num_classes: int,
              peak_gflops: float | None) -> None:
    """Add achieved GFLOP/s (cost model with and without the elementwise charge) and the peak fraction."""
    from automedseg.network import estimate_training_flops

    kw = {"in_channels": in_channels, "num_classes": num_classes, "patch_size": patch_size, "dims": len(patch_size)}
    per_sample = estimate_training_flops(net, **kw)
    per_sample_conv = estimate_training_flops(net, **kw, elementwise_flops=0.0)
    step_s = run["seconds_per_step_median"]
    gflops = per_sample * run["batch_size"] / step_s / 1e9
    gflops_conv = per_sample_conv * run["batch_size"] / step_s / 1e9
    run.update(
        {
            "training_gflop_per_sample": round(per_sample / 1e9, 3),
            "training_gflop_per_sample_conv_only": round(per_sample_conv / 1e9, 3),
            "achieved_gflops": round(gflops, 1),
            "achieved_gflops_conv_only": round(gflops_conv, 1),
            "fraction_of_matmul_peak": round(gflops / peak_gflops, 3) if peak_gflops else None,
            "fraction_of_matmul_peak_conv_only": round(gflops_conv / peak_gflops, 3) if peak_gflops else None,
            "fraction_of_interleaved_peak": interleaved_fraction(per_sample * run["batch_size"], run["step_seconds"],
                                                                 run.get("probe_gflops", [])),
        }
    )


def measure_nnunet(
    *, bin_dir: Path, work_root: Path, dataset_name: str, steps: int, min_seconds: float
) -> dict:
    """Run nnU-Net's real ``nnUNetTrainer.train_step`` in the venv and return its timings."""
    paths = nnunet_paths(work_root)
    pre = paths["nnUNet_preprocessed"] / dataset_name
    scratch = work_root / "train_speed"
    results_dir = scratch / "nnUNet_results"  # the trainer creates its log folder here, not in the real one
    results_dir.mkdir(parents=True, exist_ok=True)
    out_path = scratch / "nnunet_train_step.json"
    out_path.unlink(missing_ok=True)
    settings = {
        "plans_file": str(pre / f"{PLANS_IDENTIFIER}.json"),
        "dataset_json": str(pre / "dataset.json"),
        "configuration": CONFIGURATION,
        "threads": BENCH_THREADS,
        "warmup": WARMUP_STEPS,
        "steps": steps,
        "min_seconds": min_seconds,
        "max_steps": MAX_STEPS,
        "seed": SEED,
        "out": str(out_path),
    }
    env = nnunet_env(work_root, overrides={"nnUNet_results": str(results_dir)})
    cmd = [str(bin_dir / "python"), "-c", NNUNET_SCRIPT, json.dumps(settings)]
    load_before = _load_avg()
    t0 = time.perf_counter()
    with heartbeat("nnU-Net train_step"), ForeignCpu() as foreign:
        proc = subprocess.run(cmd, env=env, cwd=scratch, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out_path.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"nnU-Net train_step script failed (rc={proc.returncode}):\n{tail}")
    raw = json.loads(out_path.read_text())
    out = summarize_steps(raw, raw["batch_size"])
    out.update({k: v for k, v in raw.items() if k not in ("step_seconds", "losses")})
    # foreign CPU covers the whole subprocess (start-up and trainer initialisation included)
    out.update({"load_avg_before": load_before, "load_avg_after": raw["load_avg_end"],
                "process_wall_s": round(wall, 1), "foreign_cpu": foreign.figures})
    return out


# --------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------


def _fmt(v: object, nd: int = 2, unit: str = "") -> str:
    if v is None:
        return "n/a"
    return f"{v:.{nd}f}{unit}" if isinstance(v, float) else f"{v}{unit}"


def build_summary(figures: dict) -> str:
    m = figures["machine"]
    plan = figures["nnunet_plan"]
    runs = figures["runs"]
    peaks = figures["matmul_peak"]
    bf16_peak = peaks["bfloat16"]["gflops"]
    rows = []
    for key, label in (
        ("automedseg_bf16", "automedseg, nnU-Net's network (bf16 autocast, channels_last)"),
        ("automedseg_fp32", "automedseg, nnU-Net's network (fp32, channels_last)"),
        ("nnunet", "nnU-Net nnUNetTrainer.train_step (fp32, CPU)"),
        ("automedseg_own_bf16", "automedseg, own CPU plan (bf16, channels_last)"),
        ("automedseg_own_fp32", "automedseg, own CPU plan (fp32, channels_last)"),
    ):
        r = runs.get(key)
        if r is None:
            rows.append([label, "skipped", "", "", "", "", "", "", ""])
            continue
        rows.append(
            [
                label,
                r["batch_size"],
                f"{r['seconds_per_step_median']:.3f} s",
                _fmt(r["samples_per_s"], 2),
                r["n_timed_steps"],
                _fmt(r.get("achieved_gflops"), 0),
                _fmt(r.get("fraction_of_matmul_peak"), 2),
                _fmt(r.get("fraction_of_interleaved_peak"), 2),
                _fmt(r["foreign_cpu"]["foreign_cpu_fraction_of_one_core"], 2),
            ]
        )
    t = figures["targets"]
    params = figures["parameters"]
    match = {True: "match", False: "DIFFER"}.get(params["match"], "n/a")
    lines = [
        "# train_speed: automedseg training step vs nnU-Net v2 nnUNetTrainer.train_step (CPU)",
        "",
        f"Network: nnU-Net's `{plan['configuration']}` plan ({Path(plan['plans_file']).name}): "
        f"PlainConvUNet, features {plan['features_per_stage']}, kernels {plan['kernel_sizes'][0]}, strides "
        f"{plan['strides']}, convs/stage {plan['n_conv_per_stage']}; patch {plan['patch_size']}, batch "
        f"{plan['batch_size']}. Parameters: automedseg {params['automedseg']:,}, nnU-Net "
        f"{_fmt(params['nnunet'])} ({match}).",
        f"Machine: {m['cpu_model']}, {m['cpu_count_usable']} cores, {m['memory_total_gib']} GiB; "
        f"{figures['threads']} torch threads each; python {m['python']}, torch {m['torch']}, automedseg "
        f"{m['automedseg']}, nnunetv2 {m['nnunetv2']} (torch {m['nnunet_venv_torch']} in its venv).",
        f"Protocol: {WARMUP_STEPS} warm-up steps, then >= {figures['steps']} steps and >= "
        f"{figures['min_seconds']:.0f} s per row; median step time; same random batch every step (no data "
        "loading).",
        "",
        md_table(
            ["run", "batch", "s/step (median)", "samples/s", "timed steps", "GFLOP/s (model)",
             "of matmul peak (same dtype)", "of the peak measured beside each step", "other processes' CPU (cores)"],
            rows,
        ),
        "",
        f"Matrix-multiply peak ({MATMUL_SIZE}x{MATMUL_SIZE}, {figures['threads']} threads): bf16 "
        f"{bf16_peak:.0f} GFLOP/s, fp32 {peaks['float32']['gflops']:.0f} GFLOP/s, once at the start. This machine's "
        f"speed drifts within seconds, so the peak is also measured for {PROBE_SECONDS} s before the first timed "
        "step and after each, and each step is compared with the mean of the two beside it (median over the "
        "steps): the targets use that fraction.",
    ]
    bf = runs.get("automedseg_bf16")
    if bf is not None:
        lines.append(
            f"automedseg bf16 GFLOP/s uses `estimate_training_flops` ({bf['training_gflop_per_sample']:.2f} "
            f"GFLOP/sample, norm/activation elements charged as in the planner's cost model); counting "
            f"convolutions only ({bf['training_gflop_per_sample_conv_only']:.2f} GFLOP/sample) it is "
            f"{bf['achieved_gflops_conv_only']:.0f} GFLOP/s = {bf['fraction_of_matmul_peak_conv_only']:.2f} "
            "of the bf16 peak."
        )
    if bf is not None and "fused_norm" in bf:
        lines.append(f"automedseg's step kernels: fused instance norm + LeakyReLU {bf['fused_norm']}, freed memory "
                     f"retained {bf['retained_memory']} (`automedseg.fused_norm`, `automedseg.allocator`).")
    lines += [
        "",
        md_table(
            ["target", "measured", "result"],
            [
                [
                    f"automedseg (bf16) samples/s >= {TARGET_SPEEDUP}x nnU-Net",
                    _fmt(t["speedup_bf16"], 2, "x"),
                    "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL"),
                ],
                ["(info) automedseg fp32 vs nnU-Net", _fmt(t["speedup_fp32"], 2, "x"), ""],
                [f"automedseg bf16 step >= {_fmt(t['peak_target_bf16'], 2)} of the bf16 matmul peak "
                 f"({t['peak_target_bf16_kind']})", _fmt(t["peak_fraction_bf16"], 2),
                 _verdict(t["peak_fraction_bf16"], t["peak_target_bf16"])],
                [f"automedseg fp32 step >= {_fmt(t['peak_target_fp32'], 2)} of the fp32 matmul peak",
                 _fmt(t["peak_fraction_fp32"], 2), _verdict(t["peak_fraction_fp32"], t["peak_target_fp32"])],
            ],
        ),
        "",
    ]
    n = runs.get("nnunet")
    if n is not None:
        lines.append(
            f"nnU-Net side: `{n['network_class']}` built by `nnUNetTrainer.initialize()` on device "
            f"{n['device']} (autocast: {n['autocast']}, torch.compile: {n['compiled']}), loss {n['loss']}"
            f"({n['inner_loss']}) with weights {[round(w, 3) for w in n['loss_weights']]}, batch_dice "
            f"{n['batch_dice']}, {n['optimizer']} {n['optimizer_defaults']}."
        )
    own = figures.get("own_plan")
    if own is not None:
        lines.append(f"automedseg's own CPU plan: {own['source']}; features {own['features_per_stage']}.")
    lines.append(
        "Differences that remain by design: automedseg's Dice term is a batch Dice (nnU-Net's plan has "
        "batch_dice false), automedseg computes the loss in fp32 outside autocast. Load average before each "
        "run is stored in the JSON file. The machine must be otherwise idle: the last column is the CPU "
        "time used by other processes during the row divided by its wall time (anything above ~0.05 means "
        "the row was disturbed; rerun)."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_MSD_DIR, help="MSD-layout dataset folder")
    parser.add_argument("--dataset-id", type=int, default=4, help="nnU-Net dataset id (default 4)")
    parser.add_argument("--work-root", type=Path, default=WORK_DIR, help="nnU-Net work folder (git-ignored)")
    parser.add_argument("--steps", type=int, default=5, help="minimum timed steps per run (default 5)")
    parser.add_argument("--min-seconds", type=float, default=30.0,
                        help="minimum timed seconds per run (default 30)")
    parser.add_argument("--skip-nnunet", action="store_true", help="measure automedseg only")
    parser.add_argument("--automedseg-plans", type=Path, default=None,
                        help="plans.json whose 3d_fullres configuration is automedseg's own CPU plan "
                             f"(default: nnU-Net's topology with widths {OWN_PLAN_FEATURES}, batch {OWN_PLAN_BATCH})")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    os.environ.update(thread_env(BENCH_THREADS))  # before torch is imported
    import torch

    torch.set_num_threads(BENCH_THREADS)

    work_root = args.work_root.resolve()
    dataset_name = nnunet_dataset_name(args.dataset.resolve(), args.dataset_id)
    pre = nnunet_paths(work_root)["nnUNet_preprocessed"] / dataset_name
    plans_path = pre / f"{PLANS_IDENTIFIER}.json"
    if not plans_path.exists():
        raise SystemExit(f"{plans_path} not found: run benchmarks/plan_speed.py first (nnU-Net preprocessing)")
    plan = nnunet_plan_summary(plans_path)
    ds = json.loads((pre / "dataset.json").read_text())
    in_channels = len(ds["channel_names"])
    num_classes = len(ds["labels"])
    patch = tuple(plan["patch_size"])
    batch = plan["batch_size"]
    net = automedseg_network_plan(plan)
    with ForeignCpu() as idle_check:
        time.sleep(2.0)
    if idle_check.figures["foreign_cpu_fraction_of_one_core"] > 0.05:
        print(f"warning: other processes use {idle_check.figures['foreign_cpu_fraction_of_one_core']:.2f} "
              "cores: the machine is not idle, timings will suffer", flush=True)

    print("matrix-multiply peak ...", flush=True)
    peaks = {name: matmul_peak(name) for name in ("bfloat16", "float32")}
    print(f"  bf16 {peaks['bfloat16']['gflops']} GFLOP/s, fp32 {peaks['float32']['gflops']} GFLOP/s", flush=True)

    own_net, own_patch, own_batch, own_source = own_cpu_plan(net, args.automedseg_plans)
    own_patch = own_patch or patch
    runs: dict[str, dict | None] = {}
    common = {"in_channels": in_channels, "num_classes": num_classes, "steps": args.steps,
              "min_seconds": args.min_seconds}
    for key, n_plan, p, b, amp in (
        ("automedseg_bf16", net, patch, batch, True),
        ("automedseg_fp32", net, patch, batch, False),
        ("automedseg_own_bf16", own_net, own_patch, own_batch, True),
        ("automedseg_own_fp32", own_net, own_patch, own_batch, False),
    ):
        print(f"{key}: batch {b}, patch {list(p)} ...", flush=True)
        with heartbeat(key):
            run = measure_automedseg(n_plan, patch_size=p, batch_size=b, amp=amp, **common)
        peak = peaks["bfloat16" if run["autocast_dtype"] == "bfloat16" else "float32"]["gflops"]
        add_flops(run, n_plan, patch_size=p, in_channels=in_channels, num_classes=num_classes, peak_gflops=peak)
        run["peak_used"] = run["autocast_dtype"]
        runs[key] = run
        print(f"  {run['seconds_per_step_median']:.3f} s/step, {run['samples_per_s']:.2f} samples/s, "
              f"{run['achieved_gflops']:.0f} GFLOP/s, loss {run['loss_first']:.3f} -> {run['loss_last']:.3f}, "
              f"other processes {run['foreign_cpu']['foreign_cpu_fraction_of_one_core']:.2f} cores", flush=True)

    runs["nnunet"] = None
    if not args.skip_nnunet:
        bin_dir = ensure_nnunet_venv(DEFAULT_VENV_DIR)
        print(f"nnU-Net nnUNetTrainer.train_step: batch {batch}, patch {list(patch)} ...", flush=True)
        runs["nnunet"] = measure_nnunet(bin_dir=bin_dir, work_root=work_root, dataset_name=dataset_name,
                                        steps=args.steps, min_seconds=args.min_seconds)
        n = runs["nnunet"]
        print(f"  {n['seconds_per_step_median']:.3f} s/step, {n['samples_per_s']:.2f} samples/s, "
              f"loss {n['loss_first']:.3f} -> {n['loss_last']:.3f}, "
              f"other processes {n['foreign_cpu']['foreign_cpu_fraction_of_one_core']:.2f} cores", flush=True)
        if n["batch_size"] != batch or n["patch_size"] != list(patch):
            print("warning: nnU-Net trained another batch/patch than its plan says", flush=True)

    n = runs["nnunet"]
    params_a = runs["automedseg_bf16"]["parameters"]
    params_n = n["parameters"] if n else None
    speed_bf16 = round(runs["automedseg_bf16"]["samples_per_s"] / n["samples_per_s"], 3) if n else None
    speed_fp32 = round(runs["automedseg_fp32"]["samples_per_s"] / n["samples_per_s"], 3) if n else None
    peak = peak_targets(cpu_flags())
    figures: dict = {
        "benchmark": "train_speed",
        "configuration": CONFIGURATION,
        "threads": BENCH_THREADS,
        "steps": args.steps,
        "min_seconds": args.min_seconds,
        "warmup_steps": WARMUP_STEPS,
        "machine": machine_info(DEFAULT_VENV_DIR),
        "nnunet_plan": plan,
        "automedseg_network_plan": {
            "architecture": net.architecture,
            "features_per_stage": list(net.features_per_stage),
            "kernel_sizes": [list(k) for k in net.kernel_sizes],
            "strides": [list(s) for s in net.strides],
            "n_conv_per_stage_encoder": list(net.n_conv_per_stage_encoder),
            "n_conv_per_stage_decoder": list(net.n_conv_per_stage_decoder),
            "deep_supervision": net.deep_supervision,
        },
        "own_plan": {
            "source": own_source,
            "features_per_stage": list(own_net.features_per_stage),
            "patch_size": list(own_patch),
            "batch_size": own_batch,
        },
        "parameters": {
            "automedseg": params_a,
            "nnunet": params_n,
            "match": None if params_n is None else params_a == params_n,
        },
        "idle_check": idle_check.figures,
        "matmul_peak": peaks,
        "runs": runs,
        "targets": {
            "speedup_target": TARGET_SPEEDUP,
            "speedup_bf16": speed_bf16,
            "speedup_fp32": speed_fp32,
            "pass": None if speed_bf16 is None else speed_bf16 >= TARGET_SPEEDUP,
            "peak_target_bf16": peak["bf16"],
            "peak_target_bf16_kind": peak["bf16_kind"],
            "peak_target_fp32": peak["fp32"],
            "peak_fraction_bf16": runs["automedseg_bf16"].get("fraction_of_interleaved_peak")
            if runs["automedseg_bf16"]["autocast_dtype"] == "bfloat16" else None,
            "peak_fraction_fp32": runs["automedseg_fp32"].get("fraction_of_interleaved_peak"),
        },
    }
    summary = build_summary(figures)
    json_path, md_path = write_results("train_speed", figures, summary)
    print(summary)
    print(f"\nwrote {json_path} and {md_path}")
    disturbed = [k for k, r in runs.items() if r and r["foreign_cpu"]["foreign_cpu_fraction_of_one_core"] > 0.05]
    if disturbed:
        print(f"warning: other processes used CPU during {', '.join(disturbed)}: rerun on an idle machine", flush=True)
    if figures["parameters"]["match"] is False:
        print(f"error: parameter counts differ (automedseg {params_a}, nnU-Net {params_n})", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
