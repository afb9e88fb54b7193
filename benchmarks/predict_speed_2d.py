"""2D inference speed: ``predict_preprocessed`` with slices batched per forward call vs one slice at a time.

Issue #19, item 2. A 2D configuration predicts z-slice by z-slice; before the change every slice ran its
tiles 4 at a time and their mirrored copies 8 samples per forward call, so a stack of slices that each fit in
one patch ran one forward call of 4 samples (a tile and its 3 mirrored copies) per slice. Now tiles of several
slices and all their mirrored copies share a forward call (:func:`automedseg.inference.forward_batch_size`
samples).

* Network: DRIVE's 2D plan on a 2-core CPU (``benchmarks/results/shared_datasets.json``): plain U-Net, 6
  stages, features 8-16-32-64-128-128, patch 192 x 256, 3 input channels, 2 classes, mirroring over both
  axes (4 copies of every tile), random weights (timing does not depend on them); ``--width`` changes the
  first stage's features (the others double from it, capped at 16x).
* Images, synthetic (preprocessed, normal noise): ``drive``, one DRIVE image (3 x 584 x 565: 24 tiles of
  192 x 256), and ``stack``, a 2D-planned volume of 48 slices of 192 x 160 (one tile a slice).
* Variants: ``per-slice, GroupNorm``, the implementation before the change (a copy of it lies below) with the
  network as CPU inference used to set it up (every InstanceNorm as a per-channel GroupNorm), ``batched,
  GroupNorm``, :func:`~automedseg.inference.predict_preprocessed` with that network, and ``batched``, both as
  ``predict`` runs them now (:func:`~automedseg.inference.cpu_inference_model`: the fused norm kernel where it
  builds); ``--batches 8,16,...`` adds the batched path at those
  forward batch sizes (the sweep behind :data:`~automedseg.inference.FORWARD_VOXELS_2D`). Both give the same
  logits (the largest difference is printed).
* Each variant: one untimed warm-up, then ``--reps`` timed repetitions; the median is reported, in seconds
  per image (a DRIVE image; a whole 48-slice stack and per slice), wall and process CPU time. ``--threads``
  torch threads (default 1). Other processes' CPU use during the timings is recorded: on a busy machine the wall
  figures are noisy, and the CPU seconds (with 1 thread, the work done) are the steadier comparison.

Usage::

    python benchmarks/predict_speed_2d.py                         # both images, 3 repetitions, 1 thread
    python benchmarks/predict_speed_2d.py --batches 4,8,16,32,64 --images stack --reps 2
    python benchmarks/predict_speed_2d.py --reps 1 --slices 8 --results-dir /tmp/p2d   # smoke test

Results go to ``benchmarks/results/predict_speed_2d.{json,md}`` (``--results-dir`` elsewhere); the summary is
also the ``predict_speed_2d`` section of ``predict_speed.md`` beside them (kept when ``predict_speed.py`` rewrites it).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import md_table, write_results, write_section  # noqa: E402

PATCH = (192, 256)
STAGES = 6
CHANNELS = 3
CLASSES = 2
SEED = 0


def drive_config(*, width: int = 8) -> object:
    """DRIVE's 2D configuration (plain U-Net, 6 stages, patch 192 x 256), first stage ``width`` features."""
    from automedseg.plans import AugmentationPlan, ConfigurationPlan, NetworkPlan, TrainingPlan

    network = NetworkPlan(
        architecture="plain_unet", features_per_stage=tuple(width * min(2**s, 16) for s in range(STAGES)),
        kernel_sizes=((3, 3),) * STAGES, strides=((1, 1),) + ((2, 2),) * (STAGES - 1),
        n_conv_per_stage_encoder=(2,) * STAGES, n_conv_per_stage_decoder=(2,) * (STAGES - 1))
    return ConfigurationPlan(
        name="2d", data_identifier="bench", dims=2, spacing_mm=(999.0, 1.0, 1.0), patch_size=PATCH, batch_size=2,
        median_shape=(1, 584, 565), normalization=(), image_order=3, label_order=1, separate_z=False,
        out_of_plane_order=0, network=network, augmentation=AugmentationPlan(),
        training=TrainingPlan(epochs=1, iterations_per_epoch=1))


def images(*, slices: int = 48) -> dict[str, np.ndarray]:
    """The synthetic preprocessed images ``(C, Z, Y, X)``: one DRIVE image and a stack of 192 x 160 slices."""
    rng = np.random.default_rng(SEED)
    return {"drive": rng.normal(size=(CHANNELS, 1, 584, 565)).astype(np.float32),
            "stack": rng.normal(size=(CHANNELS, slices, 192, 160)).astype(np.float32)}


def predict_per_slice(model: Callable, data: np.ndarray, config: object, *, device: object, num_classes: int,
                      step: float = 0.5, mirror_axes: Sequence[int] | None = None, tile_batch: int = 4,
                      forward_batch: int = 8, amp: bool = True) -> np.ndarray:
    """``predict_preprocessed`` before issue #19 item 2 (a verbatim copy): 2D slices one at a time."""
    import torch

    from automedseg.device import autocast_context, memory_format
    from automedseg.inference import _mirror_sets, gaussian_importance, tile_starts

    with torch.inference_mode():
        patch = tuple(config.patch_size)
        dims = config.dims
        c, *spatial = data.shape
        vol = data if dims == 3 else data.transpose(1, 0, 2, 3)
        img_shape = tuple(spatial) if dims == 3 else tuple(spatial[1:])
        pad = [max(p - s, 0) for p, s in zip(patch, img_shape)]
        pad_before = [p // 2 for p in pad]
        padded_shape = tuple(s + p for s, p in zip(img_shape, pad))
        weight = torch.from_numpy(gaussian_importance(patch)).to(device)
        starts = list(itertools.product(*[tile_starts(s, p, step) for s, p in zip(padded_shape, patch)]))
        flips = _mirror_sets([a + 2 for a in (mirror_axes or ())])
        mf = memory_format(dims) if device.type == "cpu" else torch.contiguous_format
        n_items = 1 if dims == 3 else vol.shape[0]
        out = np.zeros((num_classes, *spatial), dtype=np.float32)
        for item in range(n_items):
            arr = vol if dims == 3 else vol[item]
            x = torch.zeros((c, *padded_shape), dtype=torch.float32)
            sl = tuple(slice(b, b + s) for b, s in zip(pad_before, img_shape))
            x[(slice(None), *sl)] = torch.from_numpy(np.array(arr, dtype=np.float32))
            x = x.to(device)
            acc = torch.zeros((num_classes, *padded_shape), dtype=torch.float32, device=device)
            norm = torch.zeros(padded_shape, dtype=torch.float32, device=device)
            for i in range(0, len(starts), tile_batch):
                chunk = starts[i:i + tile_batch]
                tiles = torch.stack([x[(slice(None), *[slice(s, s + p) for s, p in zip(st, patch)])]
                                     for st in chunk])
                inputs = torch.cat([torch.flip(tiles, f) if f else tiles for f in flips])
                outs = []
                for j in range(0, len(inputs), forward_batch):
                    with autocast_context(device, amp):
                        outs.append(model(inputs[j:j + forward_batch].contiguous(memory_format=mf)).float())
                y = torch.cat(outs).view(len(flips), len(chunk), num_classes, *patch)
                logits = sum(torch.flip(y[k], f) if f else y[k] for k, f in enumerate(flips)) / len(flips)
                for st, lg in zip(chunk, logits):
                    region = tuple(slice(s, s + p) for s, p in zip(st, patch))
                    acc[(slice(None), *region)] += lg * weight
                    norm[region] += weight
            acc /= norm
            res = acc[(slice(None), *sl)].cpu().numpy()
            if dims == 3:
                out[:] = res
            else:
                out[:, item] = res
        return out


def time_variant(run: Callable[[], np.ndarray], *, reps: int) -> tuple[dict, np.ndarray]:
    """One untimed warm-up, then ``reps`` timed runs (wall and process CPU seconds); the logits of the last one."""
    from train_speed import ForeignCpu

    out = run()
    times, cpu = [], []
    with ForeignCpu() as foreign:
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            out = run()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"seconds": [round(t, 3) for t in times], "median_s": round(statistics.median(times), 3),
            "cpu_seconds": [round(t, 3) for t in cpu], "median_cpu_s": round(statistics.median(cpu), 3),
            "foreign_cpu": foreign.figures}, out


def measure(*, image_names: Sequence[str], batches: Sequence[int], reps: int, threads: int, width: int,
            slices: int, amp: bool, log: Callable[[str], None] = print) -> dict:
    """Time the variants on each image; returns the figures (see the module docstring)."""
    import torch

    from automedseg.device import channels_last_norms, cpu_supports_bf16, memory_format
    from automedseg.fused_norm import fused_available
    from automedseg.inference import (
        FORWARD_VOXELS_2D,
        MAX_FORWARD_BATCH,
        cpu_inference_model,
        forward_batch_size,
        predict_preprocessed,
    )
    from automedseg.network import build_network, count_parameters

    torch.set_num_threads(threads)
    config = drive_config(width=width)
    torch.manual_seed(SEED)
    model = build_network(config.network, in_channels=CHANNELS, num_classes=CLASSES, dims=2)
    model.deep_supervision = False
    group_model = channels_last_norms(copy.deepcopy(model).eval()).to(memory_format=memory_format(2))
    model = cpu_inference_model(model.eval(), dims=2)  # as `predict` loads it
    device = torch.device("cpu")
    kw = dict(device=device, num_classes=CLASSES, mirror_axes=(0, 1), amp=amp)
    default_batch = forward_batch_size(PATCH)
    figures: dict = {
        "patch_size": list(PATCH), "features_per_stage": list(config.network.features_per_stage),
        "parameters": count_parameters(model), "threads": threads, "mirror_axes": [0, 1],
        "autocast": "bfloat16" if amp and cpu_supports_bf16() else "float32",
        "forward_voxels_2d": FORWARD_VOXELS_2D, "max_forward_batch": MAX_FORWARD_BATCH,
        "default_forward_batch": default_batch, "fused_norm": fused_available(), "images": {},
    }
    data = images(slices=slices)
    for name in image_names:
        arr = data[name]
        variants: dict[str, Callable[[], np.ndarray]] = {
            "per-slice, GroupNorm": lambda a=arr: predict_per_slice(group_model, a, config, **kw),
            f"batched ({default_batch}), GroupNorm": lambda a=arr: predict_preprocessed(group_model, a, config, **kw),
            f"batched ({default_batch})": lambda a=arr: predict_preprocessed(model, a, config, **kw),
        }
        for b in batches:
            if b != default_batch:
                variants[f"batched ({b})"] = lambda a=arr, b=b: predict_preprocessed(model, a, config,
                                                                                     forward_batch=b, **kw)
        rows, reference = {}, None
        for label, run in variants.items():
            log(f"{name} {tuple(arr.shape)}: {label} ...")
            res, out = time_variant(run, reps=reps)
            reference = out if reference is None else reference
            res["max_abs_diff_vs_per_slice"] = float(np.abs(out - reference).max())
            res["seconds_per_slice"] = round(res["median_s"] / arr.shape[1], 4)
            log(f"  median {res['median_s']:.3f} s wall, {res['median_cpu_s']:.3f} s CPU ({res['seconds']}), "
                f"max |diff| {res['max_abs_diff_vs_per_slice']:.2e}, "
                f"other processes {res['foreign_cpu']['foreign_cpu_fraction_of_one_core']:.2f} core")
            rows[label] = res
        base, base_cpu = rows["per-slice, GroupNorm"]["median_s"], rows["per-slice, GroupNorm"]["median_cpu_s"]
        for res in rows.values():
            res["speedup_vs_per_slice"] = round(base / res["median_s"], 3)
            res["cpu_speedup_vs_per_slice"] = round(base_cpu / res["median_cpu_s"], 3)
        figures["images"][name] = {"shape": list(arr.shape), "variants": rows}
    return figures


def build_summary(figures: dict) -> str:
    """The Markdown summary of :func:`measure`'s figures."""
    m = figures.get("machine", {})
    lines = [
        "# 2D inference: slices batched per forward call vs one slice at a time",
        "",
        f"Machine: {m.get('cpu_model', '?')}, {figures['threads']} torch thread(s), autocast "
        f"{figures['autocast']}. DRIVE's 2D network (features {figures['features_per_stage']}, "
        f"{figures['parameters']:,} parameters), patch {figures['patch_size']}, mirroring over both axes; "
        f"default forward batch {figures['default_forward_batch']} ({figures['forward_voxels_2d']:,} voxels, "
        f"at most {figures['max_forward_batch']}).",
        "",
    ]
    rows = []
    for name, img in figures["images"].items():
        for label, r in img["variants"].items():
            rows.append([name, "x".join(map(str, img["shape"])), label, f"{r['median_s']:.3f}",
                         f"{r['seconds_per_slice']:.4f}", f"{r['speedup_vs_per_slice']:.2f}x",
                         f"{r['median_cpu_s']:.3f}", f"{r['cpu_speedup_vs_per_slice']:.2f}x",
                         f"{r['max_abs_diff_vs_per_slice']:.1e}",
                         f"{r['foreign_cpu']['foreign_cpu_fraction_of_one_core']:.2f}"])
    lines.append(md_table(["image", "C x Z x Y x X", "variant", "s per image (median)", "s per slice", "speed-up",
                           "CPU s per image", "CPU speed-up", "max abs diff", "other processes (cores)"], rows))
    return "\n".join(lines) + "\n"


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers") from None


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default="drive,stack", help="drive, stack or both (default: both)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per variant (default: 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--width", type=int, default=8, help="first-stage features (default: 8, DRIVE's plan)")
    p.add_argument("--slices", type=int, default=48, help="slices of the stack (default: 48)")
    p.add_argument("--batches", type=_ints, default=(), help="extra forward batch sizes, e.g. 8,16,32,64")
    p.add_argument("--no-amp", action="store_true", help="float32 instead of bf16 autocast")
    p.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.images.split(",") if n.strip()]
    if not names or set(names) - {"drive", "stack"}:
        p.error(f"--images {args.images}: use drive, stack or drive,stack")
    figures = measure(image_names=names, batches=args.batches, reps=args.reps, threads=args.threads,
                      width=args.width, slices=args.slices, amp=not args.no_amp)
    from _common import machine_info

    figures["machine"] = machine_info()
    summary = build_summary(figures)
    json_path, md_path = write_results("predict_speed_2d", figures, summary, results_dir=args.results_dir)
    # The 3D comparison's file carries the 2D figures too (a section of their own, kept when it is rewritten).
    write_section(md_path.with_name("predict_speed.md"), "predict_speed_2d",
                  "#" + summary if summary.startswith("# ") else summary)
    print(summary)
    print(f"wrote {json_path}, {md_path} and its section in {md_path.with_name('predict_speed.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
