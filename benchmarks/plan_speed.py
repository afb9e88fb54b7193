"""Benchmark: automedseg ``plan`` against nnU-Net v2 ``plan_and_preprocess`` on the same machine.

Both tools do fingerprint extraction, planning and preprocessing of the 2d and 3d_fullres
configurations of an MSD dataset with 2 worker processes. nnU-Net's MSD conversion happens beforehand
and is not timed; nnU-Net's preprocessed folder (and automedseg's work folder) are cleared before every
timed run so that everything is really recomputed. Wall time and the peak summed RSS of the whole process
tree (workers included) are measured for both.

Targets: automedseg wall time <= 0.25x nnU-Net's, peak memory <= 0.5x nnU-Net's.

Usage::

    python benchmarks/plan_speed.py                      # both tools, one repeat
    python benchmarks/plan_speed.py --repeats 3
    python benchmarks/plan_speed.py --skip-nnunet        # compare against the stored nnU-Net baseline
    python benchmarks/plan_speed.py --skip-automedseg    # only (re)measure nnU-Net

Results go to ``benchmarks/results/plan_speed.{json,md}``; every nnU-Net measurement is also stored as
``benchmarks/results/plan_speed_nnunet_baseline.json`` for later ``--skip-nnunet`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BENCH_THREADS,
    DEFAULT_MSD_DIR,
    DEFAULT_VENV_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    WORK_DIR,
    ensure_nnunet_venv,
    heartbeat,
    machine_info,
    md_table,
    nnunet_dataset_name,
    nnunet_env,
    nnunet_paths,
    prepare_nnunet_raw,
    run_measured,
    thread_env,
    write_results,
)

CONFIGURATIONS = ("2d", "3d_fullres")
TARGET_WALL_RATIO = 0.25
TARGET_MEMORY_RATIO = 0.5
BASELINE_NAME = "plan_speed_nnunet_baseline"


def automedseg_command(msd_dir: Path, work_dir: Path) -> list[str]:
    """The timed automedseg command: this repository's CLI (run with PYTHONPATH set to the repo root)."""
    # the CLI's -c is a repeatable click option: "-c 2d -c 3d_fullres"
    args = ["plan", str(msd_dir), "--work-dir", str(work_dir)]
    args += [arg for name in CONFIGURATIONS for arg in ("-c", name)]
    args += ["-j", str(BENCH_THREADS), "--overwrite"]
    code = "import sys; from automedseg.cli import main; sys.exit(main(prog_name='automedseg'))"
    return [sys.executable, "-c", code, *args]


def nnunet_command(bin_dir: Path, dataset_id: int) -> list[str]:
    """The timed nnU-Net command: fingerprint (-npfp), planning and preprocessing (-np) with 2 processes."""
    return [
        str(bin_dir / "nnUNetv2_plan_and_preprocess"),
        "-d",
        str(dataset_id),
        "-npfp",
        str(BENCH_THREADS),
        "-c",
        *CONFIGURATIONS,
        "-np",
        *[str(BENCH_THREADS)] * len(CONFIGURATIONS),
        "--verify_dataset_integrity",
        "--clean",
    ]


def _folder_stats(folder: Path) -> dict:
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    return {"n_files": len(files), "mib": round(sum(p.stat().st_size for p in files) / 2**20, 1)}


def summarize_nnunet_plans(plans_path: Path) -> dict:
    """The key numbers of nnU-Net's plans for the benchmarked configurations."""
    plans = json.loads(plans_path.read_text())
    out: dict = {}
    for name in CONFIGURATIONS:
        cfg = plans.get("configurations", {}).get(name)
        if cfg is None:
            continue
        arch = cfg.get("architecture", {}).get("arch_kwargs", {})
        out[name] = {
            "patch_size": cfg.get("patch_size"),
            "batch_size": cfg.get("batch_size"),
            "spacing": cfg.get("spacing"),
            "median_image_size_in_voxels": cfg.get("median_image_size_in_voxels"),
            "n_stages": arch.get("n_stages"),
            "features_per_stage": arch.get("features_per_stage"),
            "kernel_sizes": arch.get("kernel_sizes"),
            "strides": arch.get("strides"),
            "n_conv_per_stage": arch.get("n_conv_per_stage"),
            "n_conv_per_stage_decoder": arch.get("n_conv_per_stage_decoder"),
            "network_class": cfg.get("architecture", {}).get("network_class_name"),
            "normalization_schemes": cfg.get("normalization_schemes"),
        }
    out["transpose_forward"] = plans.get("transpose_forward")
    out["original_median_spacing_after_transp"] = plans.get("original_median_spacing_after_transp")
    return out


def _aggregate(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["returncode"] == 0]
    use = ok or runs
    agg: dict = {"n_runs": len(runs), "n_ok": len(ok), "all_ok": len(ok) == len(runs) and bool(runs)}
    for key in ("wall_s", "peak_rss_mib", "peak_rss_raw_mib", "peak_pss_mib"):
        vals = [r[key] for r in use if r.get(key) is not None]
        agg[f"{key}_median"] = round(statistics.median(vals), 3) if vals else None
        agg[f"{key}_min"] = round(min(vals), 3) if vals else None
    return agg


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def run_automedseg(msd_dir: Path, work_root: Path, repeat: int) -> dict:
    work_dir = work_root / "automedseg_plan_speed"
    if work_dir.exists():
        shutil.rmtree(work_dir)
    env = dict(os.environ)
    env.update(thread_env(BENCH_THREADS))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    cmd = automedseg_command(msd_dir, work_dir)
    return _timed(
        f"automedseg #{repeat}",
        cmd,
        env,
        REPO_ROOT,
        work_root / "logs" / f"automedseg_{repeat}.log",
        work_dir,
    )


def run_nnunet(bin_dir: Path, dataset_name: str, dataset_id: int, work_root: Path, repeat: int) -> dict:
    preprocessed = nnunet_paths(work_root)["nnUNet_preprocessed"] / dataset_name
    if preprocessed.exists():
        shutil.rmtree(preprocessed)
    env = nnunet_env(work_root)
    cmd = nnunet_command(bin_dir, dataset_id)
    return _timed(f"nnU-Net #{repeat}", cmd, env, work_root, work_root / "logs" / f"nnunet_{repeat}.log", preprocessed)


def _timed(label: str, cmd: list[str], env: dict, cwd: Path, log_path: Path, out_dir: Path) -> dict:
    print(f"[{label}] {' '.join(cmd)}", flush=True)
    with heartbeat(label):
        res = run_measured(cmd, env=env, cwd=cwd, log_path=log_path)
    res["output"] = _folder_stats(out_dir)
    res["log"] = str(log_path)
    print(
        f"  -> rc={res['returncode']} wall={res['wall_s']} s peak_rss={res['peak_rss_mib']} MiB "
        f"peak_pss={res['peak_pss_mib']} MiB",
        flush=True,
    )
    if res["returncode"] != 0:
        print(res["stdout_tail"][-2000:], flush=True)
    return res


def _fmt(v: object, unit: str = "") -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f}{unit}" if isinstance(v, float) else f"{v}{unit}"


def _pass(v: bool | None) -> str:
    return "n/a" if v is None else ("PASS" if v else "FAIL")


def build_summary(figures: dict) -> str:
    a, n = figures.get("automedseg"), figures.get("nnunet")
    rows = []
    for label, agg in (("automedseg plan", a), ("nnUNetv2_plan_and_preprocess", n)):
        if agg is None:
            rows.append([label, "skipped", "", "", "", ""])
            continue
        rows.append(
            [
                label,
                f"{_fmt(agg['wall_s_min'], ' s')} / {_fmt(agg['wall_s_median'], ' s')}",
                _fmt(agg["peak_rss_mib_median"], " MiB"),
                _fmt(agg.get("peak_rss_raw_mib_median"), " MiB"),
                _fmt(agg["peak_pss_mib_median"], " MiB"),
                f"{agg['n_ok']}/{agg['n_runs']}",
            ]
        )
    t = figures["targets"]
    m = figures["machine"]
    lines = [
        "# plan_speed: automedseg plan vs nnU-Net v2 plan_and_preprocess",
        "",
        f"Dataset: `{figures['dataset']}` ({figures['n_training_cases']} training cases); configurations "
        f"{', '.join(CONFIGURATIONS)}; {BENCH_THREADS} worker processes each; repeats: {figures['repeats']} "
        "(wall time: best / median of the runs, the best is compared, as other jobs may share the machine; "
        "memory: medians).",
        f"Machine: {m['cpu_model']}, {m['cpu_count_usable']} cores, {m['memory_total_gib']} GiB; "
        f"python {m['python']}, torch {m['torch']}, automedseg {m['automedseg']}, "
        f"nnunetv2 {m['nnunetv2']} (torch {m['nnunet_venv_torch']} in its venv).",
        "",
        md_table(
            [
                "tool",
                "wall time (best / median)",
                "peak RSS (tree sum)",
                "raw RSS sum",
                "peak PSS (tree sum)",
                "ok runs",
            ],
            rows,
        ),
        "",
    ]
    if figures.get("nnunet_source"):
        lines += [f"nnU-Net figures: {figures['nnunet_source']}.", ""]
    lines += [
        md_table(
            ["target", "measured", "result"],
            [
                [
                    f"wall time <= {TARGET_WALL_RATIO}x nnU-Net",
                    _fmt(t["wall_ratio"], "x"),
                    _pass(t["wall_pass"]),
                ],
                [
                    f"peak memory (RSS) <= {TARGET_MEMORY_RATIO}x nnU-Net",
                    _fmt(t["memory_ratio"], "x"),
                    _pass(t["memory_pass"]),
                ],
                ["(info) peak PSS ratio", _fmt(t["pss_ratio"], "x"), ""],
            ],
        ),
        "",
        "Commands:",
        "",
    ]
    for key in ("automedseg_cmd", "nnunet_cmd"):
        if figures.get(key):
            lines.append(f"- `{' '.join(figures[key])}`")
    lines += [
        "",
        "Peak memory is the largest sum of RSS over the command and all its descendant processes, sampled "
        "every 0.05 s from /proc; a child that has not exec'd yet (a fork worker, or a worker start caught "
        "between fork and exec) counts with its private pages only, since its other pages are its parent's. "
        "'raw RSS sum' is the literal sum of RSS. PSS (shared pages split between processes) is "
        "sampled every 0.5 s. nnU-Net's MSD conversion is done beforehand and not timed; its preprocessed "
        "folder is deleted before each run (and `--clean` forces a new fingerprint).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_MSD_DIR, help="MSD-layout dataset folder")
    parser.add_argument("--dataset-id", type=int, default=4, help="nnU-Net dataset id (default 4)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per tool (default 1)")
    parser.add_argument("--work-root", type=Path, default=WORK_DIR, help="scratch folder (git-ignored)")
    parser.add_argument("--skip-nnunet", action="store_true", help="use the stored nnU-Net baseline, if any")
    parser.add_argument("--skip-automedseg", action="store_true", help="only measure nnU-Net")
    args = parser.parse_args(argv)

    msd_dir = args.dataset.resolve()
    work_root = args.work_root.resolve()
    meta = json.loads((msd_dir / "dataset.json").read_text())
    dataset_name = nnunet_dataset_name(msd_dir, args.dataset_id)

    bin_dir = None
    if not args.skip_nnunet:
        bin_dir = ensure_nnunet_venv(DEFAULT_VENV_DIR)
        raw_root = nnunet_paths(work_root)["nnUNet_raw"]
        raw_root.mkdir(parents=True, exist_ok=True)
        prepare_nnunet_raw(msd_dir, raw_root, args.dataset_id, venv_dir=DEFAULT_VENV_DIR)  # not timed

    a_runs: list[dict] = []
    n_runs: list[dict] = []
    for rep in range(1, args.repeats + 1):
        if not args.skip_automedseg:
            a_runs.append(run_automedseg(msd_dir, work_root, rep))
        if bin_dir is not None:
            n_runs.append(run_nnunet(bin_dir, dataset_name, args.dataset_id, work_root, rep))

    figures: dict = {
        "benchmark": "plan_speed",
        "dataset": str(msd_dir),
        "n_training_cases": meta.get("numTraining"),
        "configurations": list(CONFIGURATIONS),
        "workers": BENCH_THREADS,
        "repeats": args.repeats,
        "machine": machine_info(DEFAULT_VENV_DIR),
        "automedseg": _aggregate(a_runs) if a_runs else None,
        "automedseg_runs": a_runs,
        "automedseg_cmd": a_runs[0]["cmd"] if a_runs else None,
        "nnunet": _aggregate(n_runs) if n_runs else None,
        "nnunet_runs": n_runs,
        "nnunet_cmd": n_runs[0]["cmd"] if n_runs else None,
        "nnunet_source": None,
        "nnunet_plans": None,
    }

    plans_path = nnunet_paths(work_root)["nnUNet_preprocessed"] / dataset_name / "nnUNetPlans.json"
    if n_runs and plans_path.exists():
        figures["nnunet_plans"] = summarize_nnunet_plans(plans_path)
    baseline_path = RESULTS_DIR / f"{BASELINE_NAME}.json"
    if n_runs and figures["nnunet"]["all_ok"]:
        write_results(
            BASELINE_NAME,
            {
                k: figures[k]
                for k in (
                    "dataset",
                    "repeats",
                    "machine",
                    "nnunet",
                    "nnunet_runs",
                    "nnunet_cmd",
                    "nnunet_plans",
                )
            },
            build_summary({**figures, "automedseg": None, "targets": _targets(None, figures["nnunet"])}),
        )
    elif not n_runs and baseline_path.exists():
        base = json.loads(baseline_path.read_text())
        figures["nnunet"] = base.get("nnunet")
        figures["nnunet_cmd"] = base.get("nnunet_cmd")
        figures["nnunet_plans"] = base.get("nnunet_plans")
        figures["nnunet_source"] = (
            f"stored baseline {baseline_path.name} from {base.get('created_utc')} "
            f"(cpu: {base.get('machine', {}).get('cpu_model')}), not re-measured in this run"
        )

    figures["targets"] = _targets(figures["automedseg"], figures["nnunet"])
    summary = build_summary(figures)
    json_path, md_path = write_results("plan_speed", figures, summary)
    print(summary)
    print(f"\nwrote {json_path} and {md_path}")
    failed = any(r["returncode"] != 0 for r in a_runs + n_runs)
    return 1 if failed else 0


def _targets(a: dict | None, n: dict | None) -> dict:
    a_ok = a is not None and a["all_ok"]
    n_ok = n is not None and n["all_ok"]
    wall = _ratio(a["wall_s_min"], n["wall_s_min"]) if a_ok and n_ok else None
    mem = _ratio(a["peak_rss_mib_median"], n["peak_rss_mib_median"]) if a_ok and n_ok else None
    pss = _ratio(a["peak_pss_mib_median"], n["peak_pss_mib_median"]) if a_ok and n_ok else None
    failed = a is not None and not a_ok  # automedseg ran but failed: the targets are missed
    return {
        "wall_ratio_target": TARGET_WALL_RATIO,
        "memory_ratio_target": TARGET_MEMORY_RATIO,
        "wall_ratio": wall,
        "memory_ratio": mem,
        "pss_ratio": pss,
        "wall_pass": False if failed else (None if wall is None else wall <= TARGET_WALL_RATIO),
        "memory_pass": False if failed else (None if mem is None else mem <= TARGET_MEMORY_RATIO),
    }


if __name__ == "__main__":
    sys.exit(main())
