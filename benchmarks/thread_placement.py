"""Thread placement (issue #19 item 4): should the CPU augmentation worker get a core of its own?

On a CPU the trainer runs torch's threads and one augmentation worker process side by side
(``automedseg/thread_placement.py``): ``shared`` (torch on all N cores, the worker niced among them) or
``own_core`` (N - 1 torch threads pinned to N - 1 cores, the worker pinned to the N-th). The calibration picks one
from the 3D step at width 16 (``automedseg/calibration_step.py``: ``calibrate_placement``); this script measures
the same real training step (the planner's network, the trainer's step and AdamW, the real loader with its
worker: ``calibration_step.time_training_steps`` with a ``placement``) more widely:

* per core count of ``--cores`` (default: all usable cores; on a machine with 16, e.g. ``--cores 2,4,8,16``) a
  fresh Python process restricted to the first N usable cores (CPU affinity, as ``taskset``), with the CLI's
  ``OMP_WAIT_POLICY=PASSIVE`` and the BLAS pools limited to N threads (``_common.thread_env``), times
* per ``--dims`` (3D: the reference patch 40x56x40, 2D: 224x224, batch 2) and ``--widths`` (8, 16, 32) the step
  under both placements, ``--repeats`` times in alternating order (shared first, then own_core first, ...) so a
  slow drift of the machine does not favour one, each timing ``--window-s`` seconds per width after the warm-up
  steps;
* and reports the median seconds per step of each placement, own_core's saving, what the calibration's rule
  (``cost_model.choose_worker_placement``: own_core from 5 % faster) would choose, and the CPU other processes
  used during each timing (``train_speed.ForeignCpu``; on an idle machine about 0).

Run it on an idle machine: every other busy process distorts both placements, and not by the same amount.

Usage::

    python benchmarks/thread_placement.py --dry-run               # the timings and the estimated time
    python benchmarks/thread_placement.py                         # all usable cores, 3D and 2D, widths 8/16/32
    python benchmarks/thread_placement.py --cores 2,4,8,16        # each core count in its own process
    python benchmarks/thread_placement.py --cores 2 --dims 3 --widths 4 --patch-3d 16,16,16 --window-s 0 \\
        --repeats 1 --results-dir /tmp/tp                         # smoke test (seconds)

Results: ``benchmarks/results/thread_placement.{json,md}`` (``--results-dir`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO_ROOT, machine_info, md_table, thread_env, write_results  # noqa: E402

BENCHMARK = "thread_placement"
PLACEMENTS = ("shared", "own_core")
DIMS = (3, 2)
WIDTHS = (8, 16, 32)
WINDOW_S = 3.0
REPEATS = 2
WARMUP = 2
MAX_STEPS = 100_000  # the window decides (the calibration caps its timings at 20 steps)
CHILD_MARKER = "THREAD_PLACEMENT_RESULT "
# Rough time model of --dry-run, seconds: a timing's start-up (worker process, synthetic case) and one warm-up step.
EST_START_S = 2.0
EST_WARMUP_STEP_S = 0.5


def parse_ints(text: str) -> list[int]:
    """``"2,4, 8"`` -> ``[2, 4, 8]``.

    Example:
        >>> parse_ints("2,4, 8"), parse_ints("")
        ([2, 4, 8], [])
    """
    return [int(v) for v in text.replace(" ", "").split(",") if v]


def alternating_orders(repeats: int) -> list[tuple[str, str]]:
    """The order of the placements in each repeat: shared first, then own_core first, and so on.

    Example:
        >>> alternating_orders(3)
        [('shared', 'own_core'), ('own_core', 'shared'), ('shared', 'own_core')]
    """
    return [PLACEMENTS if r % 2 == 0 else PLACEMENTS[::-1] for r in range(repeats)]


def saving(shared_s: float | None, own_s: float | None) -> float | None:
    """The share of the shared step own_core saves (negative: own_core is slower); ``None`` when one is missing.

    Example:
        >>> saving(0.30, 0.27), saving(0.30, 0.33), saving(None, 0.3)
        (0.1, -0.1, None)
    """
    if not shared_s or own_s is None:
        return None
    return round(1 - own_s / shared_s, 4)


def estimated_seconds(cores: Sequence[int], *, dims: Sequence[int], widths: Sequence[int], window_s: float,
                      repeats: int, warmup: int = WARMUP) -> float:
    """Rough wall time of the measurements (the step times are not known before: a warm-up step ~0.5 s).

    Example:
        >>> estimated_seconds([2], dims=[3, 2], widths=[8, 16, 32], window_s=3.0, repeats=2)
        112.0
    """
    per_call = EST_START_S + len(widths) * (window_s + warmup * EST_WARMUP_STEP_S)
    return len(cores) * len(dims) * len(PLACEMENTS) * repeats * per_call


def usable_cpus() -> list[int]:
    """The cores this process may run on (its affinity), sorted."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return list(range(os.cpu_count() or 1))


# --- one core count (the child process) -------------------------------------------------------------------


def measure(*, dims: Sequence[int], widths: Sequence[int], window_s: float, repeats: int, warmup: int = WARMUP,
            patches: dict[int, tuple[int, ...] | None] | None = None, log=print) -> list[dict]:  # noqa: ANN001
    """Time the steps under both placements on this process's cores (all of them: N threads in all).

    Returns:
        One row per dims, width and placement: the seconds per step of each repeat, their median, the steps timed,
        the placement as applied (``own_core`` runs as ``shared`` where no core can be spared) and the CPU other
        processes used during each timing (cores).
    """
    from train_speed import ForeignCpu

    from automedseg.calibration_step import time_training_steps

    threads = len(usable_cpus())
    rows: dict[tuple[int, int, str], dict] = {}
    for d in dims:
        for order in alternating_orders(repeats):
            for placement in order:
                with ForeignCpu() as foreign:
                    timings = time_training_steps(dims=d, widths=tuple(widths), threads=threads, placement=placement,
                                                  patch=(patches or {}).get(d), warmup=warmup, window_s=window_s,
                                                  max_steps=MAX_STEPS, rounds=1)  # (one window: as measured)
                for t in timings:
                    row = rows.setdefault((d, t.width, placement), {
                        "dims": d, "width": t.width, "placement": placement, "applied": t.placement,
                        "threads": threads, "seconds": [], "steps": [], "foreign_cores": []})
                    row["seconds"].append(round(t.seconds, 4))
                    row["steps"].append(t.steps)
                    row["foreign_cores"].append(foreign.figures["foreign_cpu_fraction_of_one_core"])
                log(f"  {d}D {placement}: " + ", ".join(f"width {t.width} {t.seconds:.3f} s" for t in timings)
                    + f" (other processes {foreign.figures['foreign_cpu_fraction_of_one_core']:.2f} cores)")
    out = list(rows.values())
    for row in out:
        row["median_s"] = round(statistics.median(row["seconds"]), 4)
    return out


def choices(rows: Sequence[dict]) -> list[dict]:
    """Per dims and width: both placements' median step, own_core's saving and the calibration rule's choice.

    Example:
        >>> rows = [{"dims": 3, "width": 16, "placement": "shared", "applied": "shared", "median_s": 0.3},
        ...         {"dims": 3, "width": 16, "placement": "own_core", "applied": "own_core", "median_s": 0.27}]
        >>> choices(rows)
        [{'dims': 3, 'width': 16, 'shared_s': 0.3, 'own_core_s': 0.27, 'saving': 0.1, 'choice': 'own_core'}]
    """
    from automedseg.cost_model import choose_worker_placement

    by_key: dict[tuple[int, int], dict[str, float]] = {}
    for r in rows:
        if r["applied"] == r["placement"]:  # an own_core that ran as shared is no own_core timing
            by_key.setdefault((r["dims"], r["width"]), {})[r["placement"]] = r["median_s"]
    return [{"dims": d, "width": w, "shared_s": s.get("shared"), "own_core_s": s.get("own_core"),
             "saving": saving(s.get("shared"), s.get("own_core")), "choice": choose_worker_placement(s)}
            for (d, w), s in sorted(by_key.items(), key=lambda kv: (-kv[0][0], kv[0][1]))]


def _child(args: argparse.Namespace) -> int:
    patches = {3: tuple(parse_ints(args.patch_3d)) or None, 2: tuple(parse_ints(args.patch_2d)) or None}
    rows = measure(dims=parse_ints(args.dims), widths=parse_ints(args.widths), window_s=args.window_s,
                   repeats=args.repeats, warmup=args.warmup, patches=patches,
                   log=lambda s: print(s, file=sys.stderr, flush=True))
    print(CHILD_MARKER + json.dumps(rows), flush=True)
    return 0


# --- the runs (the parent) --------------------------------------------------------------------------------


def child_env(cores: int) -> dict[str, str]:
    """The child's environment: the CLI's ``OMP_WAIT_POLICY`` (a user's own wins), BLAS pools of ``cores``."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(thread_env(cores))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run_cores(cores: int, cpus: Sequence[int], child_args: list[str]) -> list[dict]:
    """Measure in a fresh process restricted to ``cpus`` (the first ``cores`` usable cores)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *child_args]
    proc = subprocess.run(cmd, env=child_env(cores), cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, check=False,
                          preexec_fn=lambda: os.sched_setaffinity(0, set(cpus)))  # noqa: PLW1509
    if proc.returncode != 0:
        raise RuntimeError(f"the measurement on {cores} cores failed (rc={proc.returncode})")
    lines = [v for v in proc.stdout.splitlines() if v.startswith(CHILD_MARKER)]
    return json.loads(lines[-1][len(CHILD_MARKER):])


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def build_summary(figures: dict) -> str:
    """The Markdown summary: per core count, both placements' step per dims and width, and the rule's choice."""
    m = figures.get("machine", {})
    s = figures["settings"]
    lines = [
        "# Thread placement: the augmentation worker sharing the cores or on its own core", "",
        f"Machine: {m.get('cpu_model', '?')}, {m.get('cpu_count_usable', '?')} usable cores; torch "
        f"{m.get('torch', '?')}. Command: `{figures.get('command', '')}`.", "",
        f"The real training step (`calibration_step.time_training_steps`: the planner's network, batch 2, AdamW, "
        f"the real loader with one augmentation worker) per width, {s['repeats']} x {s['window_s']} s per "
        "placement in alternating order, median seconds per step. `shared`: N torch threads, the worker niced "
        "among them; `own_core`: N - 1 torch threads pinned to N - 1 cores, the worker pinned to the N-th. The "
        "calibration compares them on the 3D step at width 16 and keeps own_core from 5 % faster (saving = 1 - "
        "own_core / shared). Other processes: the most CPU (cores) they used during one of the row's timings.", "",
    ]
    for run in figures["runs"]:
        lines += [f"## {run['cores']} cores ({','.join(str(c) for c in run['cpus'])})", ""]
        foreign = {}
        for r in run["rows"]:
            key = (r["dims"], r["width"])
            foreign[key] = max([foreign.get(key, 0.0), *r["foreign_cores"]])
        rows = [[f"{c['dims']}D", c["width"], _f(c["shared_s"], ".3f"), _f(c["own_core_s"], ".3f"),
                 "-" if c["saving"] is None else f"{100 * c['saving']:+.1f} %", c["choice"],
                 _f(foreign.get((c["dims"], c["width"])), ".2f")] for c in run["choices"]]
        lines += [md_table(["dims", "width", "shared s/step", "own_core s/step", "own_core saving", "rule's choice",
                            "other processes (cores)"], rows), ""]
        if run.get("note"):
            lines += [run["note"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cores", default="", help="core counts, comma-separated (default: all usable cores)")
    parser.add_argument("--dims", default=",".join(map(str, DIMS)), help="default: %(default)s")
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="default: %(default)s")
    parser.add_argument("--window-s", type=float, default=WINDOW_S, help="timed seconds per width and placement")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timings per placement (alternating order)")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="untimed steps per width")
    parser.add_argument("--patch-3d", default="", help="instead of the reference 40,56,40 (smoke tests)")
    parser.add_argument("--patch-2d", default="", help="instead of the reference 224,224 (smoke tests)")
    parser.add_argument("--results-dir", type=Path, default=None, help="instead of benchmarks/results (smoke runs)")
    parser.add_argument("--dry-run", action="store_true", help="print the timings and the estimated time only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dims, widths = parse_ints(args.dims), parse_ints(args.widths)
    if not dims or set(dims) - {2, 3}:
        parser.error("--dims: 3 and/or 2")
    if not widths or min(widths) < 1 or args.repeats < 1 or args.window_s < 0 or args.warmup < 0:
        parser.error("--widths, --repeats must be positive; --window-s and --warmup must not be negative")
    if args.child:
        sys.path.insert(0, str(REPO_ROOT))
        return _child(args)
    usable = usable_cpus()
    cores = parse_ints(args.cores) or [len(usable)]
    if min(cores) < 1:
        parser.error("--cores must be positive")
    runnable = [n for n in cores if n <= len(usable)]
    for n in cores:
        state = f"cores {','.join(map(str, usable[:n]))}" if n <= len(usable) else \
            f"skipped: only {len(usable)} usable cores"
        print(f"{n} cores ({state}): {'/'.join(f'{d}D' for d in dims)} widths {widths}, shared and own_core, "
              f"{args.repeats} x {args.window_s} s each, alternating")
    total = estimated_seconds(runnable, dims=dims, widths=widths, window_s=args.window_s, repeats=args.repeats,
                              warmup=args.warmup)
    print(f"estimated time: ~{total / 60:.1f} min (an idle machine; longer where a step takes over a second)")
    if args.dry_run:
        return 0
    if not runnable:
        raise SystemExit(f"no core count of {cores} fits the {len(usable)} usable cores")
    child_args = [f"--dims={args.dims}", f"--widths={args.widths}", f"--window-s={args.window_s}",
                  f"--repeats={args.repeats}", f"--warmup={args.warmup}", f"--patch-3d={args.patch_3d}",
                  f"--patch-2d={args.patch_2d}"]
    sys.path.insert(0, str(REPO_ROOT))
    runs, started = [], time.perf_counter()
    for n in runnable:
        print(f"[{n} cores]", flush=True)
        rows = run_cores(n, usable[:n], child_args)
        note = "" if n >= 2 else "One core: own_core cannot spare a core and runs as shared (not compared)."
        runs.append({"cores": n, "cpus": usable[:n], "env": {k: v for k, v in child_env(n).items()
                                                             if k in (*thread_env(n), "OMP_WAIT_POLICY")},
                     "rows": rows, "choices": choices(rows), "note": note})
    figures = {"command": "python benchmarks/thread_placement.py " + " ".join(argv if argv is not None
                                                                              else sys.argv[1:]),
               "settings": {"dims": dims, "widths": widths, "window_s": args.window_s, "repeats": args.repeats,
                            "warmup": args.warmup, "patch_3d": args.patch_3d or "reference",
                            "patch_2d": args.patch_2d or "reference"},
               "wall_s": round(time.perf_counter() - started, 1), "machine": machine_info(), "runs": runs}
    json_path, md_path = write_results(BENCHMARK, figures, build_summary(figures), results_dir=args.results_dir)
    print(f"results: {json_path}, {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
