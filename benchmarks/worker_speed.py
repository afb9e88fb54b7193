"""Data worker speed: the augmentation worker's CPU time per batch on real datasets, labels resampled in one pass
or one interpolation per label (issue #19: the worker shares the CPU with the training step).

The spatial augmentation resamples the labels as nnU-Net does, each label's indicator interpolated linearly and
the argmax taken. batchgenerators does that with one ``map_coordinates`` per label present (plus a nearest-
neighbour pass); :func:`automedseg.label_resampling.resample_labels_linear` gives the same labels in one pass.
Per dataset and configuration (its plan and preprocessed cache, as ``automedseg plan`` leaves them) this script
makes the training batches in-process (the real loader and transforms, one thread) in both variants, interleaved
in blocks with the same seeds, and reports the worker's CPU seconds per batch and whether the batches' labels are
identical.

Usage::

    python benchmarks/worker_speed.py --dry-run
    python benchmarks/worker_speed.py --work-root benchmarks/work/calibration_check   # its planned datasets
    python benchmarks/worker_speed.py --cases openkbp_hn_ct:3d_fullres --batches 60

Results: ``benchmarks/results/worker_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import WORK_DIR, machine_info, md_table, write_results  # noqa: E402

BENCHMARK = "worker_speed"
CASES = ("msd_hippocampus:3d_fullres", "msd_hippocampus:2d", "openkbp_hn_ct:3d_fullres", "openkbp_hn_ct:2d")
VARIANTS = ("per label", "one pass")
SEED = 12345


@contextlib.contextmanager
def label_resampling(variant: str) -> Iterator[None]:
    """Within: the spatial transform resamples labels as ``variant`` says (``one pass`` is the default)."""
    from batchgenerators.augmentations.utils import interpolate_img

    import automedseg.augmentation_transforms as transforms

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    original = transforms.resample_labels_linear
    if variant == "per label":
        transforms.resample_labels_linear = (  # type: ignore[assignment]
            lambda labels, coords, cval: interpolate_img(labels, coords, 1, "constant", cval=cval, is_seg=True))
    try:
        yield
    finally:
        transforms.resample_labels_linear = original  # type: ignore[assignment]


def make_batches(cache: Path, case_ids: Sequence[str], config: object, *, batches: int, seed: int
                 ) -> tuple[float, list]:
    """Worker CPU seconds per batch (this thread's) for ``batches`` batches, and the batches' labels."""
    from automedseg.augmentation_loaders import make_training_loader
    from automedseg.network_cost import output_strides

    with make_training_loader(cache, list(case_ids), config, num_processes=0, seed=seed,
                              deep_supervision_strides=output_strides(config.network)) as loader:
        t0, labels = time.thread_time(), []
        for _ in range(batches):
            labels.append(next(loader)["seg"])
        return (time.thread_time() - t0) / batches, labels


def time_worker(cache: Path, case_ids: Sequence[str], config: object, *, batches: int, blocks: int) -> dict:
    """Both variants, interleaved in ``blocks`` blocks of ``batches`` batches (block ``k`` seeded ``SEED + k`` in
    both), with the median block's CPU seconds per batch and whether all labels were identical."""
    import numpy as np

    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    identical = True
    for k in range(blocks):
        seen = {}
        for variant in (VARIANTS if k % 2 == 0 else VARIANTS[::-1]):
            with label_resampling(variant):
                s, labels = make_batches(cache, case_ids, config, batches=batches, seed=SEED + k)
            seconds[variant].append(s)
            seen[variant] = labels
        identical &= all(np.array_equal(a, b) for a, b in zip(*seen.values(), strict=True))
    per_batch = {v: round(statistics.median(s), 4) for v, s in seconds.items()}
    return {"cpu_s_per_batch": per_batch, "blocks_cpu_s_per_batch": seconds,
            "speedup": round(per_batch["per label"] / per_batch["one pass"], 2), "labels_identical": identical}


def cached_cases(cache: Path, *, limit: int = 20) -> list[str]:
    """Up to ``limit`` case ids of a preprocessed cache (``<id>.npy`` beside ``<id>_seg.npy``)."""
    return sorted(p.name[: -len("_seg.npy")] for p in cache.glob("*_seg.npy"))[:limit]


def build_summary(f: dict) -> str:
    m = f["machine"]
    rows = [[c["dataset"], c["configuration"], f"{c['batch_size']} x {c['patch_size']}", c["labels"],
             f"{c['cpu_s_per_batch']['per label']:.3f}", f"{c['cpu_s_per_batch']['one pass']:.3f}",
             f"{c['speedup']:.2f}x", "yes" if c["labels_identical"] else "NO"] for c in f["cases"]]
    return "\n".join([
        "# Data worker speed: labels resampled in one pass or one interpolation per label",
        "",
        f"Command: `{f['command']}`. Machine: {m['cpu_model']}, {m['cpu_count_logical']} logical CPUs; "
        f"python {m['python']}, torch {m['torch']}, numpy {m.get('numpy', '-')}.",
        f"The real loader and transforms in-process (one thread), the plan's patch, batch and augmentation, up to 20 "
        f"cached cases; {f['blocks']} blocks of {f['batches']} batches per variant, interleaved, the same seeds; "
        "CPU seconds per batch of the median block.",
        "",
        md_table(["dataset", "configuration", "batch x patch", "labels", "per label (s/batch)", "one pass (s/batch)",
                  "speed-up", "labels identical"], rows),
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="DATASET:CONFIGURATION pairs")
    parser.add_argument("--work-root", type=Path, default=WORK_DIR / "calibration_check",
                        help="one planned and preprocessed work folder per dataset")
    parser.add_argument("--batches", type=int, default=20, help="batches per block")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per variant")
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    print(f"{len(args.cases)} configurations x {len(VARIANTS)} variants x {args.blocks} blocks of {args.batches} "
          "batches", flush=True)
    if args.dry_run:
        return 0
    import torch

    from automedseg.plans import Plans

    torch.set_num_threads(1)
    cases = []
    for text in args.cases:
        dataset, _, configuration = text.partition(":")
        work = args.work_root / dataset
        try:
            plans = Plans.load(work / "plans.json")
            config = plans.configuration(configuration)
        except (OSError, KeyError, ValueError) as e:
            print(f"skip {text}: no plan in {work} ({e})", flush=True)
            continue
        cache = work / "preprocessed" / config.data_identifier
        ids = cached_cases(cache)
        if not ids:
            print(f"skip {text}: no cached cases in {cache}", flush=True)
            continue
        result = time_worker(cache, ids, config, batches=args.batches, blocks=args.blocks)
        cases.append({"dataset": dataset, "configuration": configuration, "patch_size": list(config.patch_size),
                      "batch_size": config.batch_size, "labels": len(plans.labels), **result})
        print(f"{text}: {result['cpu_s_per_batch']} ({result['speedup']}x, labels identical: "
              f"{result['labels_identical']})", flush=True)
    figures = {"command": "python benchmarks/worker_speed.py " + " ".join(argv or sys.argv[1:]),
               "machine": machine_info(), "batches": args.batches, "blocks": args.blocks, "cases": cases}
    write_results(BENCHMARK, figures, build_summary(figures), results_dir=args.results_dir)
    return 0 if all(c["labels_identical"] for c in cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
