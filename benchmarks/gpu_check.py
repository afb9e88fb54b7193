"""GPU check: the whole automedseg pipeline on one CUDA GPU in about 8 minutes, with the figures that matter there.

On Hippocampus (``--data``; default ``.gpu-bundle/msd_hippocampus`` when the bundle of ``../shared/gpu`` is
present, else ``../shared/data/msd_hippocampus``), through the CLI as a user runs it:

1. ``plan --time-budget 3m`` (3d_fullres);
2. fold 0 with a 3-minute budget, sampling GPU utilisation (``nvidia-smi``, or pynvml) while it trains and
   reading the trainer's data-wait fraction per epoch from the fold's ``log.jsonl``;
3. fold 1 with a 1-minute budget, killed with SIGKILL in the middle of its second epoch, then resumed by the
   same command: the resume must succeed and continue at the first unfinished epoch;
4. folds 2-4 with 1-minute budgets (one process);
5. ``find-best``, then the 5-fold ensemble ``predict`` of ``imagesTs`` and, when ``labelsTs`` exists, its
   evaluation.

Writes ``benchmarks/results/gpu_check.{json,md}``: times of every step, utilisation mean / p50 / p90 and the
data wait, Dice per fold and the cross-validation mean, precision and where augmentation ran, the kill/resume
outcome, and the machine (GPU, driver, torch and CUDA versions, CPU model). Exits 2 with a message on a machine
without CUDA, 1 when a step fails (the results written so far name it).

On a GPU machine without a package index::

    ../shared/gpu/make-bundle.sh                      # here, once: fills .gpu-bundle/
    source .gpu-bundle/activate.sh && python3 benchmarks/gpu_check.py      # there
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from automedseg.training_log import EpochRecord

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_MSD_DIR, REPO_ROOT, WORK_DIR, machine_info, md_table, write_results  # noqa: E402

CONFIGURATION = "3d_fullres"
BUNDLE_DATA = REPO_ROOT / ".gpu-bundle" / "msd_hippocampus"
NAME = "gpu_check"


def default_data() -> Path:
    """The bundle's copy of Hippocampus if present (it travels to a GPU machine), else the shared one."""
    return BUNDLE_DATA if (BUNDLE_DATA / "dataset.json").is_file() else DEFAULT_MSD_DIR


def cuda_problem() -> str | None:
    """Why this machine cannot run the check (no CUDA), or ``None``."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dependency
        return f"torch cannot be imported ({e})"
    if not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA (a CPU build)"
        return (f"no CUDA device is available here (torch {torch.__version__}, built with {built}); "
                "run benchmarks/gpu_check.py on a machine with an NVIDIA GPU")
    return None


# --- GPU utilisation ----------------------------------------------------------------------------------------


class UtilisationSampler:
    """Samples GPU utilisation (%) and memory (MiB) about every ``period_s`` in a background thread.

    Uses pynvml when importable, else ``nvidia-smi --query-gpu ... -lms``; with neither, no samples.
    """

    def __init__(self, period_s: float = 0.5, gpu: int = 0) -> None:
        self.period_s, self.gpu = period_s, gpu
        self.samples: list[tuple[float, float, float]] = []  # (time, utilisation %, memory MiB)
        self.source = "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    def _nvml(self) -> bool:
        try:
            import pynvml
        except ImportError:
            return False
        try:
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.gpu)
        except Exception:  # noqa: BLE001 - any NVML failure: fall back to nvidia-smi
            return False
        self.source = "pynvml"
        while not self._stop.wait(self.period_s):
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            self.samples.append((time.time(), float(util.gpu), mem.used / 2**20))
        pynvml.nvmlShutdown()
        return True

    def _smi(self) -> None:
        if shutil.which("nvidia-smi") is None:
            return
        self.source = "nvidia-smi"
        cmd = ["nvidia-smi", f"--id={self.gpu}", "--query-gpu=utilization.gpu,memory.used",
               "--format=csv,noheader,nounits", f"-lms={int(self.period_s * 1000)}"]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if self._stop.is_set():
                break
            with contextlib.suppress(ValueError):
                util, mem = (float(v) for v in line.strip().split(","))
                self.samples.append((time.time(), util, mem))

    def _run(self) -> None:
        if not self._nvml():
            self._smi()

    def __enter__(self) -> UtilisationSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self, start: float | None = None, end: float | None = None) -> dict[str, Any]:
        """Statistics of the samples taken between ``start`` and ``end`` (epoch seconds)."""
        import numpy as np

        rows = [s for s in self.samples if (start is None or s[0] >= start) and (end is None or s[0] <= end)]
        if not rows:
            return {"source": self.source, "n_samples": 0}
        util = np.array([r[1] for r in rows])
        return {"source": self.source, "n_samples": len(rows), "mean": round(float(util.mean()), 1),
                "p50": round(float(np.percentile(util, 50)), 1), "p10": round(float(np.percentile(util, 10)), 1),
                "p90": round(float(np.percentile(util, 90)), 1), "memory_max_mib": round(max(r[2] for r in rows))}


# --- running the CLI ----------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "automedseg", *args]


class StepFailed(RuntimeError):
    """A pipeline step exited non-zero."""


def run_step(name: str, args: list[str], log_dir: Path, steps: dict[str, Any]) -> str:
    """Run an ``automedseg`` command, echoing and logging its output; records its time; raises on failure."""
    log_path = log_dir / f"{name}.log"
    print(f"[{name}] automedseg {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=_env())
        assert proc.stdout is not None
        out = []
        for line in proc.stdout:
            out.append(line)
            log.write(line)
            print(f"  {line.rstrip()}", flush=True)
        rc = proc.wait()
    steps[name] = {"seconds": round(time.perf_counter() - t0, 1), "returncode": rc, "log": str(log_path)}
    if rc != 0:
        raise StepFailed(f"{name} failed (exit {rc}); see {log_path}")
    return "".join(out)


def run_parallel(name: str, commands: list[list[str]], log_dir: Path, steps: dict[str, Any]) -> None:
    """Run ``automedseg`` commands at the same time (logs ``<name>_<i>.log``); records the wall time; raises if any
    fails."""
    print(f"[{name}] {len(commands)} at once: " + "; ".join(f"automedseg {' '.join(c)}" for c in commands), flush=True)
    t0 = time.perf_counter()
    procs = []
    for i, args in enumerate(commands):
        with open(log_dir / f"{name}_{i}.log", "w") as log:
            procs.append(subprocess.Popen(_cmd(*args), stdout=log, stderr=subprocess.STDOUT, env=_env()))
    rcs = [p.wait() for p in procs]
    steps[name] = {"seconds": round(time.perf_counter() - t0, 1), "returncode": max(rcs, key=abs),
                   "log": str(log_dir / f"{name}_*.log")}
    for i, rc in enumerate(rcs):
        print(f"  {name}_{i}: exit {rc}", flush=True)
    if any(rcs):
        raise StepFailed(f"{name} failed (exits {rcs}); see {log_dir}/{name}_*.log")


def _history(fold_dir: Path) -> list[EpochRecord]:
    """The fold's ``log.jsonl`` (training_log's typed reader; a line being written is skipped)."""
    from automedseg.training_log import read_training_log

    return read_training_log(fold_dir / "log.jsonl", problems=[])


def kill_and_resume(train_args: list[str], fold_dir: Path, log_dir: Path, steps: dict[str, Any]) -> dict[str, Any]:
    """Start training, SIGKILL the trainer in the middle of its second epoch, resume with the same command."""
    shutil.rmtree(fold_dir, ignore_errors=True)
    print(f"[kill] automedseg {' '.join(train_args)}  (killed with SIGKILL mid-epoch)", flush=True)
    t0 = time.perf_counter()
    with open(log_dir / "kill_run.log", "w") as log:
        proc = subprocess.Popen(_cmd(*train_args), stdout=log, stderr=subprocess.STDOUT, env=_env(),
                                start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not _history(fold_dir):
            time.sleep(0.1)
        hist = _history(fold_dir)
        if proc.poll() is not None or not hist:
            raise StepFailed(f"kill run ended before its first epoch (exit {proc.poll()}); see {log_dir}/kill_run.log")
        time.sleep(0.5 * hist[-1].epoch_seconds)  # half-way through the next epoch
        os.kill(proc.pid, signal.SIGKILL)  # the trainer alone, as the OOM killer would
        proc.wait()
        time.sleep(2.0)  # its workers follow it (PR_SET_PDEATHSIG); then clear anything left of the group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    done = len(_history(fold_dir))
    steps["kill_run"] = {"seconds": round(time.perf_counter() - t0, 1), "epochs_before_kill": done}
    resumed = [a for a in train_args if a != "--restart"]
    out = run_step("resume", resumed, log_dir, steps)
    hist = _history(fold_dir)
    expected = f"at epoch {done}"
    return {
        "epochs_logged_before_kill": done,
        "resume_message_seen": any("resuming" in ln and expected in ln for ln in out.splitlines()),
        "epochs_after_resume": len(hist),
        "epochs_contiguous": [h.epoch for h in hist] == list(range(len(hist))),
        "ok": (fold_dir / "checkpoint_final.pt").is_file() and [h.epoch for h in hist] == list(range(len(hist)))
        and len(hist) > done,
    }


# --- reading results ----------------------------------------------------------------------------------------


def fold_figures(fold_dir: Path) -> dict[str, Any]:
    """Epochs, iterations, data wait, step time, precision, augmentation and validation Dice of a trained fold."""
    import numpy as np

    from automedseg.plans import Plans
    from automedseg.validation_summary import read_validation_summary, summary_path

    def number(value: float | None) -> float:
        return math.nan if value is None else float(value)

    hist = _history(fold_dir)
    out: dict[str, Any] = {"epochs": len(hist)}
    if hist:
        waits = np.array([number(h.data_wait_fraction) for h in hist])
        first, last = hist[0], hist[-1]
        out.update(
            iterations=int(sum(h.iterations or 0 for h in hist)),
            train_seconds=round(float(sum(h.epoch_seconds for h in hist)), 1),
            seconds_per_iteration=round(float(np.median([number(h.seconds_per_iteration) for h in hist])), 4),
            data_wait_mean=round(float(waits.mean()), 3), data_wait_max=round(float(waits.max()), 3),
            data_wait_after_first_epoch=round(float(waits[1:].mean()), 3) if len(waits) > 1 else None,
            window=(number(first.time) - first.epoch_seconds, number(last.time)),
        )
    if (fold_dir / "plans.json").is_file():
        cfg = Plans.load(fold_dir / "plans.json").configuration(CONFIGURATION)
        out.update(precision=cfg.training.precision, augment_on_device=cfg.training.augment_on_device,
                   batch_size=cfg.batch_size, patch_size=list(cfg.patch_size))
    if summary_path(fold_dir).is_file():
        out["validation_mean_dice"] = read_validation_summary(summary_path(fold_dir)).mean_dice
    return out


def gpu_description() -> dict[str, Any]:
    import torch

    props = torch.cuda.get_device_properties(0)
    driver = None
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                                    capture_output=True, text=True, timeout=20).stdout.strip() or None
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "driver": driver, "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def render(fig: dict[str, Any]) -> str:
    """The Markdown summary."""
    g, m = fig.get("gpu", {}), fig.get("machine", {})
    folds = fig.get("folds", {})
    util = fig.get("utilisation_fold0", {})
    f0 = folds.get("0", {})
    lines = [
        f"# GPU check ({Path(str(fig.get('data', '?'))).name}, {CONFIGURATION})",
        "",
        f"`python3 benchmarks/gpu_check.py` on {g.get('name', '?')} ({g.get('memory_gib', '?')} GiB, compute "
        f"capability {g.get('capability', '?')}, driver {g.get('driver') or '?'}); torch {g.get('torch', '?')}, "
        f"CUDA {g.get('cuda', '?')}, cuDNN {g.get('cudnn', '?')}; CPU {m.get('cpu_model', '?')} "
        f"({m.get('cpu_count_usable', '?')} cores), {m.get('memory_total_gib', '?')} GiB; "
        f"{fig.get('created_utc', '')}.",
        "",
        f"Status: **{fig.get('status', '?')}** in {_fmt(fig.get('total_seconds'), '.0f')} s"
        + (f" ({fig['error']})" if fig.get("error") else "") + ".",
        "",
        f"## Fold 0 ({f0.get('budget', '?')} budget)",
        "",
        md_table(["figure", "value"], [
            ["precision / augmentation", f"{f0.get('precision', '-')} / "
             f"{'on the GPU' if f0.get('augment_on_device') else 'CPU workers'}"],
            ["batch x patch", f"{f0.get('batch_size', '-')} x {f0.get('patch_size', '-')}"],
            ["epochs x iterations", f"{f0.get('epochs', '-')} epochs, {f0.get('iterations', '-')} iterations"],
            ["seconds per iteration (median epoch)", _fmt(f0.get("seconds_per_iteration"))],
            ["GPU utilisation mean / p50 / p10 / p90 (%)",
             f"{_fmt(util.get('mean'), '.1f')} / {_fmt(util.get('p50'), '.1f')} / {_fmt(util.get('p10'), '.1f')} / "
             f"{_fmt(util.get('p90'), '.1f')} ({util.get('n_samples', 0)} samples, {util.get('source', '-')})"],
            ["GPU memory max (MiB)", _fmt(util.get("memory_max_mib"))],
            ["data wait, mean / after epoch 1 / max (share of the step)",
             f"{_fmt(f0.get('data_wait_mean'), '.1%')} / {_fmt(f0.get('data_wait_after_first_epoch'), '.1%')} / "
             f"{_fmt(f0.get('data_wait_max'), '.1%')}"],
        ]),
        "",
        "## Cross-validation",
        "",
        f"Fold 1 was killed and resumed; folds 2-4 trained {fig.get('parallel_folds', 1)} at a time on the GPU.",
        "",
        md_table(["fold", "budget", "epochs", "iterations", "s/iteration", "data wait", "validation Dice"],
                 [[k, v.get("budget", "-"), v.get("epochs", "-"), v.get("iterations", "-"),
                   _fmt(v.get("seconds_per_iteration")), _fmt(v.get("data_wait_mean"), ".1%"),
                   _fmt(v.get("validation_mean_dice"))] for k, v in sorted(folds.items())]),
        "",
        f"CV mean Dice (mean of the folds' validation): **{_fmt(fig.get('cv_mean_dice'))}**; find-best: "
        f"{fig.get('find_best', {}).get('configuration', '-')} at {_fmt(fig.get('find_best', {}).get('mean_dice'))}.",
        "",
    ]
    kr = fig.get("kill_resume")
    if kr:
        lines += [f"Kill and resume (fold 1): SIGKILL after {kr['epochs_logged_before_kill']} logged epoch(s), "
                  f"resumed {'at the right epoch' if kr['resume_message_seen'] else 'WITHOUT the expected message'}, "
                  f"{kr['epochs_after_resume']} epochs in all: **{'PASS' if kr['ok'] else 'FAIL'}**.", ""]
    pred = fig.get("prediction")
    if pred:
        lines += [f"Ensemble prediction of imagesTs: {pred['cases']} cases in {_fmt(pred['seconds'], '.1f')} s "
                  f"({_fmt(pred['seconds_per_case'], '.3f')} s per case)"
                  + (f"; mean Dice against labelsTs {_fmt(pred['mean_dice'])}" if pred.get("mean_dice") is not None
                     else "; no labelsTs to evaluate against") + ".", ""]
    lines += ["## Steps", "", md_table(["step", "seconds", "exit"], [
        [k, _fmt(v.get("seconds"), ".1f"), v.get("returncode", "-")] for k, v in fig.get("steps", {}).items()])]
    return "\n".join(lines) + "\n"


# --- the check ----------------------------------------------------------------------------------------------


def run_check(args: argparse.Namespace, fig: dict[str, Any]) -> None:
    """Every step; fills ``fig`` as it goes (so a failure still leaves the figures so far)."""
    data, work = Path(args.data).resolve(), Path(args.work_dir).resolve()
    if not (data / "dataset.json").is_file():
        raise StepFailed(f"{data}: no dataset.json (pass --data)")
    log_dir = work / "logs"
    if not args.keep_plan:
        shutil.rmtree(work, ignore_errors=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    steps = fig["steps"]
    ws_args = [str(data), "--work-dir", str(work)]
    if not (args.keep_plan and (work / "plans.json").is_file()):
        run_step("plan", ["plan", *ws_args, "-c", CONFIGURATION, "--time-budget", args.plan_budget,
                          *(["--device", "cpu"] if args.cpu_dry_run else [])], log_dir, steps)
    device = ["--device", "cpu"] if args.cpu_dry_run else []
    train = ["train", *ws_args, "-c", CONFIGURATION, "--augment-on", args.augment_on, "--restart", *device]
    fold_root = work / CONFIGURATION

    with UtilisationSampler(period_s=0.5) as sampler:
        run_step("train_fold0", [*train, "-f", "0", "--time-budget", args.fold0_budget], log_dir, steps)
    f0 = fold_figures(fold_root / "fold_0")
    window = f0.pop("window", None)
    fig["utilisation_fold0"] = sampler.summary(*(window or (None, None)))
    fig["folds"]["0"] = {**f0, "budget": args.fold0_budget}

    fig["kill_resume"] = kill_and_resume([*train, "-f", "1", "--time-budget", args.fold_budget],
                                         fold_root / "fold_1", log_dir, steps)
    if not fig["kill_resume"]["ok"]:
        raise StepFailed("fold 1 did not resume correctly after SIGKILL")
    rest = [[*train, "-f", str(k), "--time-budget", args.fold_budget] for k in (2, 3, 4)]
    if args.parallel_folds > 1:  # the GPU has room: train them side by side, sharing the cores between them
        workers = str(max(2, (os.cpu_count() or 4) // args.parallel_folds - 1))
        groups = [rest[i : i + args.parallel_folds] for i in range(0, len(rest), args.parallel_folds)]
        for i, group in enumerate(groups):
            run_parallel(f"train_folds_2_4_{i}" if len(groups) > 1 else "train_folds_2_4",
                         [[*c, "--workers", workers] for c in group], log_dir, steps)
    else:
        run_step("train_folds_2_4", [*train, "-f", "2,3,4", "--time-budget", args.fold_budget], log_dir, steps)
    for k in range(1, 5):
        f = fold_figures(fold_root / f"fold_{k}")
        f.pop("window", None)
        fig["folds"][str(k)] = {**f, "budget": args.fold_budget}
    dice = [v.get("validation_mean_dice") for v in fig["folds"].values()]
    fig["cv_mean_dice"] = sum(dice) / len(dice) if dice and None not in dice else None

    run_step("find_best", ["find-best", *ws_args, "-c", CONFIGURATION], log_dir, steps)
    from automedseg.best_choice import read_find_best

    best = read_find_best(work / "find_best.json").best
    fig["find_best"] = {"configuration": best.configuration, "mean_dice": best.mean_dice}

    images = data / "imagesTs"
    if images.is_dir() and any(images.iterdir()):
        pred_dir = work / "predictions"
        run_step("predict", ["predict", "-i", str(images), "-o", str(pred_dir), "-d", str(data), "--work-dir",
                             str(work), *device], log_dir, steps)
        cases = sorted(p for p in pred_dir.glob("*.nii.gz"))
        seconds = steps["predict"]["seconds"]
        pred: dict[str, Any] = {"cases": len(cases), "seconds": seconds,
                                "seconds_per_case": seconds / max(1, len(cases)), "mean_dice": None}
        labels = data / "labelsTs"
        if labels.is_dir() and any(labels.iterdir()):
            from automedseg.metrics import evaluate_folders

            summary = evaluate_folders(labels, pred_dir, output_dir=work / "evaluation")
            per_label = [v["dice"] for v in summary["per_label"].values()]
            pred["mean_dice"] = sum(per_label) / len(per_label) if per_label else None
        fig["prediction"] = pred


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data(), help="Hippocampus (MSD) dataset folder.")
    p.add_argument("--work-dir", type=Path, default=WORK_DIR / NAME, help="Work folder (emptied first).")
    p.add_argument("--plan-budget", default="3m", help="plan --time-budget.")
    p.add_argument("--fold0-budget", default="3m", help="Fold 0's training budget.")
    p.add_argument("--fold-budget", default="1m", help="Folds 1-4's training budget.")
    p.add_argument("--augment-on", choices=["auto", "device", "workers"], default="auto",
                   help="train --augment-on (auto: on the GPU).")
    p.add_argument("--parallel-folds", type=int, default=3,
                   help="Train folds 2-4 this many at a time on the one GPU (1: one after the other, one process); "
                        "3 keeps the whole check under ~8 minutes.")
    p.add_argument("--keep-plan", action="store_true", help="Reuse the work folder's plan and cache if present.")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="Run the steps on the CPU (with small budgets and a small dataset) to test this script; "
                        "no GPU figures.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = None if args.cpu_dry_run else cuda_problem()
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    fig: dict[str, Any] = {"benchmark": NAME, "data": str(args.data), "parallel_folds": args.parallel_folds,
                           "gpu": {} if args.cpu_dry_run else gpu_description(),
                           "machine": machine_info(), "steps": {}, "folds": {}, "status": "running"}
    try:
        run_check(args, fig)
        fig["status"] = "PASS"
    except (StepFailed, OSError, ValueError, KeyError) as e:
        fig["status"], fig["error"] = "FAIL", str(e)
        print(f"gpu_check: {e}", file=sys.stderr)
    finally:
        fig["total_seconds"] = round(time.perf_counter() - t0, 1)
        from datetime import datetime, timezone

        fig["created_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        if args.cpu_dry_run:  # not a result: next to the work folder
            json_path, md_path = (Path(args.work_dir).with_suffix(s) for s in (".json", ".md"))
            json_path.write_text(json.dumps(fig, indent=2, default=str) + "\n")
            md_path.write_text(render(fig))
        else:
            json_path, md_path = write_results(NAME, fig, render(fig))
        print(f"gpu_check: {fig['status']} in {fig['total_seconds']:.0f} s; {md_path} and {json_path}")
    return 0 if fig["status"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
