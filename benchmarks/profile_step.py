"""Where a CPU training step's time goes: torch.profiler over the trainer's own step, top operators by self time.

The step is :func:`automedseg.training_step.train_step` (autocast in the device's precision, channels-last, the
deep-supervision loss, gradient clipping, the plan's optimizer) on the planner's network for a reference patch
(:func:`automedseg.calibration_step.reference_step_config`: hippocampus' 40x56x40 in 3D, 224x224 in 2D) with a
fixed random batch (no data loading: the loader's cost is the calibration's business). Variants:

* ``--optimizer-impl``: ``default`` (what the trainer uses), ``foreach`` or ``fused`` (AdamW's ``fused=True`` on CPU);
* ``--norm-impl``: ``instance`` (the network as trained: the fused kernel of :mod:`automedseg.fused_norm` where it
  builds), ``pytorch`` (PyTorch's own instance norm and LeakyReLU, the kernel switched off) or ``group`` (every
  InstanceNorm replaced by the equivalent per-channel GroupNorm, :func:`automedseg.device.channels_last_norms`);
* ``--allocator``: ``retain`` (as training: :func:`automedseg.allocator.retain_freed_memory`) or ``glibc``
  (its default: every large tensor mmap-ed afresh); the minor page faults per step are printed;
* ``--compile``: ``torch.compile`` (inductor) of the model, compile time reported apart.

Usage::

    python benchmarks/profile_step.py --width 8                      # top operators, 3D width 8, batch 2
    python benchmarks/profile_step.py --width 16 --optimizer-impl fused --steps 20 --no-profile   # step time only
    python benchmarks/profile_step.py --dims 2 --width 16 --compile

Prints a table; ``--json PATH`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH_THREADS, REPO_ROOT, machine_info  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))


def build(dims: int, width: int, batch: int, optimizer_impl: str, norm_impl: str = "instance",
          patch: list[int] | None = None):
    """Model, optimizer, loss and a fixed batch for the reference configuration at ``width``."""
    import numpy as np
    import torch

    from automedseg.calibration_step import STEP_CLASSES, reference_step_config
    from automedseg.device import memory_format
    from automedseg.losses import DeepSupervisionLoss
    from automedseg.network import build_network
    from automedseg.network_cost import output_shapes

    config = reference_step_config(dims, width, patch=patch)
    tr = config.training
    model = build_network(config.network, in_channels=1, num_classes=STEP_CLASSES, dims=dims)
    if norm_impl == "group":
        from automedseg.device import channels_last_norms

        channels_last_norms(model)
    model = model.to(memory_format=memory_format(dims)).train()
    kw = {} if optimizer_impl == "default" else {optimizer_impl: True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=tr.initial_lr, weight_decay=tr.weight_decay, **kw)
    shapes = output_shapes(config.network, config.patch_size)
    loss_fn = DeepSupervisionLoss(len(shapes), dice_weight=tr.dice_weight, ce_weight=tr.ce_weight)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((batch, 1, *config.patch_size)).astype(np.float32)
    target = [rng.integers(0, STEP_CLASSES, size=(batch, 1, *s)).astype(np.int16) for s in shapes]
    return config, model, optimizer, loss_fn, {"data": data, "target": target}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, choices=(2, 3), default=3)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--patch", type=int, nargs="+", default=None,
                        help="patch (default: the calibration's reference patch), rounded as the planner rounds it")
    parser.add_argument("--steps", type=int, default=10, help="timed (and profiled) steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--optimizer-impl", choices=("default", "foreach", "fused"), default="default")
    parser.add_argument("--norm-impl", choices=("instance", "pytorch", "group"), default="instance")
    parser.add_argument("--allocator", choices=("retain", "glibc"), default="retain")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    parser.add_argument("--no-profile", action="store_true", help="time the steps only")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.norm_impl == "pytorch":
        os.environ["AUTOMEDSEG_FUSED_NORM"] = "0"  # before the kernel is first asked for
    import torch

    from automedseg.allocator import retain_freed_memory
    from automedseg.network import estimate_training_flops
    from automedseg.training_step import train_step

    torch.set_num_threads(BENCH_THREADS)
    torch.manual_seed(0)
    if args.allocator == "retain":
        retain_freed_memory()
    config, model, optimizer, loss_fn, batch = build(args.dims, args.width, args.batch, args.optimizer_impl,
                                                         args.norm_impl, args.patch)
    compile_s = None
    if args.compile:
        model = torch.compile(model)
    device = torch.device("cpu")

    def step() -> float:
        return train_step(model, batch, optimizer=optimizer, loss_fn=loss_fn, device=device,
                          grad_clip_norm=config.training.grad_clip_norm)

    t0 = time.perf_counter()
    step()
    first_s = time.perf_counter() - t0
    if args.compile:
        compile_s = first_s
    for _ in range(args.warmup - 1):
        step()
    times = []
    prof = None
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    if args.no_profile:
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
    flops = estimate_training_flops(config.network, in_channels=1, num_classes=3, patch_size=config.patch_size,
                                    dims=args.dims) * args.batch
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / len(times)
    med = statistics.median(times)
    print(f"{args.dims}D width {args.width} batch {args.batch} patch {list(config.patch_size)} "
          f"optimizer {args.optimizer_impl} norm {args.norm_impl} allocator {args.allocator} compile {args.compile}: "
          f"median step {med:.4f} s (min {min(times):.4f}), {flops / med / 1e9:.0f} GFLOP/s (model), "
          f"first step {first_s:.1f} s, {faults:.0f} minor page faults per step")
    top = []
    if prof is not None:
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        print(f"{'operator':48s} {'self ms/step':>12s} {'share':>7s} {'calls/step':>10s}")
        for e in events[: args.top]:
            ms = e.self_cpu_time_total / 1e3 / args.steps
            share = e.self_cpu_time_total / total
            print(f"{e.key[:48]:48s} {ms:12.2f} {share:7.1%} {e.count / args.steps:10.1f}")
            top.append({"operator": e.key, "self_ms_per_step": ms, "share": share,
                        "calls_per_step": e.count / args.steps})
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "median_step_s": med, "steps_s": times,
                                         "page_faults_per_step": faults, "compile_s": compile_s,
                                         "model_gflops_per_s": flops / med / 1e9, "top": top,
                                         "machine": machine_info()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
