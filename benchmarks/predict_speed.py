"""Inference speed: ``automedseg predict`` vs ``nnUNetv2_predict``, seconds per case on the same CPU.

Both tools predict the same test images (the first ``--cases`` of ``<dataset>/imagesTs``, default all 50)
with an ensemble of the same number of folds (default 5), the same network and the same test-time
augmentation setting (mirroring over all three axes; ``--tta off`` / ``both`` adds the variant without):

* Network: nnU-Net's ``3d_fullres`` plan of the dataset (PlainConvUNet, features 32-64-128-256, 4 stages,
  patch 40x56x40 for Hippocampus) on BOTH sides. Timing does not depend on the weights, so untrained
  networks are used:

  - nnU-Net: a script run with the nnU-Net venv's python builds ``nnUNetTrainer`` for folds 0..n-1
    (device cpu), calls ``initialize()`` and ``save_checkpoint(fold_K/checkpoint_final.pth)``, in a
    scratch ``nnUNet_results`` (``benchmarks/work/predict_speed/nnUNet_results``) next to the plans.json
    and dataset.json a trained model folder holds.
  - automedseg: ``automedseg plan --device reference-gpu-24g --no-preprocess -c 3d_fullres`` (the nominal
    GPU profile plans exactly nnU-Net's network and patch; checked, and replaced by nnU-Net's topology if
    it ever differs), then ``fold_K/plans.json`` + ``checkpoint_final.pt`` (``{"model": state_dict}`` of
    ``automedseg.network.build_network``, random initialisation). The parameter counts of both are reported.

* Commands (2 threads each: OMP/MKL/... variables, ``--threads 2`` for automedseg; nnU-Net on CPU sets
  torch's threads to the core count, 2 here):

  - ``nnUNetv2_predict -i IN -o OUT -d 4 -c 3d_fullres -f 0 1 2 3 4 -device cpu -npp 1 -nps 1 [--disable_tta]``
  - ``automedseg predict -i IN -o OUT -d WORK -c 3d_fullres -f 0 ... -f 4 --threads 2 [--no-mirror]``

  The same input folder (``CASE_0000.nii.gz`` links to the test images) serves both.

* Per case: whole process wall time / cases, and without the start-up (imports, model loading):
  nnU-Net from its line "There are N cases in the source folder" (printed after the models are loaded,
  before the first case is read) to the process end; automedseg its own "s per case" (the loop over the
  cases, reading and writing included). Stdout lines are time-stamped as they arrive (PYTHONUNBUFFERED).

* ``--automedseg-work-dir W``: also times automedseg's real trained ensemble in W (its own CPU plan,
  configuration 3d_fullres, the folds 0..n-1 that have a checkpoint), for information.

Target: automedseg seconds per case <= 1/3 of nnU-Net's (with TTA; the variant without is reported too).

Usage::

    python benchmarks/predict_speed.py                                   # 50 cases, 5 folds, TTA on and off
    python benchmarks/predict_speed.py --automedseg-work-dir /work/runs/hippo
    python benchmarks/predict_speed.py --cases 2 --folds 1 --tta on      # smoke test
    python benchmarks/predict_speed.py --cases 20 --engines torch,onnxruntime --skip-nnunet
        # + ONNX Runtime and torch fp32 rows on an exported bundle (predict_speed_onnx.py); nnU-Net's rows
        # are taken from the previous results JSON when it has the same cases and folds

Results go to ``benchmarks/results/predict_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import predict_speed_onnx as onnx_rows  # noqa: E402
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
    thread_env,
    write_results,
)
from train_speed import ForeignCpu  # noqa: E402

CONFIGURATION = "3d_fullres"
PLANS_IDENTIFIER = "nnUNetPlans"
TRAINER = "nnUNetTrainer"
TARGET_RATIO = 1.0 / 3.0
SEED = 12345
AUTOMEDSEG_CLI = "import sys; from automedseg.cli import main; sys.exit(main(prog_name='automedseg'))"

# Run with the nnU-Net venv's python: argv[1] is a JSON object of settings. Creates fold_0..fold_{n-1}
# with an untrained checkpoint_final.pth (plus plans.json and dataset.json in the model folder, as training
# leaves them) and writes a JSON summary to settings["out"].
NNUNET_CHECKPOINT_SCRIPT = r'''
import copy, json, os, sys

cfg = json.loads(sys.argv[1])
import torch

torch.set_num_threads(cfg["threads"])
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

plans = load_json(cfg["plans_file"])
dataset_json = load_json(cfg["dataset_json"])
out = {"folds": [], "parameters": None, "mirror_axes": None}
for fold in range(cfg["folds"]):
    p = copy.deepcopy(plans)
    p["continue_training"] = False  # popped by nnUNetTrainer.__init__ (run_training sets it)
    torch.manual_seed(cfg["seed"] + fold)
    trainer = nnUNetTrainer(plans=p, configuration=cfg["configuration"], fold=fold, dataset_json=dataset_json,
                            device=torch.device("cpu"))
    trainer.initialize()
    # sets trainer.inference_allowed_mirroring_axes, which the checkpoint carries and inference mirrors over
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    path = os.path.join(trainer.output_folder, "checkpoint_final.pth")
    trainer.save_checkpoint(path)
    # what on_train_start copies into the model folder; nnUNetv2_predict reads them from there
    save_json(trainer.plans_manager.plans, os.path.join(trainer.output_folder_base, "plans.json"), sort_keys=False)
    save_json(dataset_json, os.path.join(trainer.output_folder_base, "dataset.json"), sort_keys=False)
    out["folds"].append(path)
    out["parameters"] = int(sum(t.numel() for t in trainer.network.parameters()))
    out["mirror_axes"] = [int(a) for a in trainer.inference_allowed_mirroring_axes]
    out["model_folder"] = trainer.output_folder_base
    out["network_class"] = f"{type(trainer.network).__module__}.{type(trainer.network).__name__}"
with open(cfg["out"], "w") as fh:
    json.dump(out, fh, indent=1)
'''


# --------------------------------------------------------------------------------------------------------
# running a command with time-stamped output lines
# --------------------------------------------------------------------------------------------------------


def run_timestamped(cmd: list[str], *, env: dict, cwd: Path, log_path: Path) -> dict:
    """Run ``cmd``; every stdout/stderr line is stamped with seconds since start (and kept in ``log_path``).

    Returns:
        Dict with cmd, wall_s, returncode, lines (``[(seconds, text), ...]``) and foreign_cpu (CPU seconds
        that other processes used meanwhile, a sign of disturbed timings).
    """
    cmd = [str(c) for c in cmd]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lines: list[tuple[float, str]] = []
    with ForeignCpu() as foreign, open(log_path, "w", encoding="utf-8") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1, start_new_session=True)
        assert proc.stdout is not None
        for raw in proc.stdout:
            t = time.perf_counter() - t0
            text = raw.rstrip("\n")
            lines.append((round(t, 3), text))
            log.write(f"[{t:9.3f}] {text}\n")
        rc = proc.wait()
        wall = time.perf_counter() - t0
    return {"cmd": cmd, "wall_s": round(wall, 3), "returncode": rc, "lines": lines,
            "foreign_cpu": foreign.figures, "log": str(log_path)}


def _first_time(lines: list[tuple[float, str]], pattern: str) -> float | None:
    rx = re.compile(pattern)
    return next((t for t, text in lines if rx.search(text)), None)


def _tail(lines: list[tuple[float, str]], n: int = 30) -> str:
    return "\n".join(text for _, text in lines[-n:])


# --------------------------------------------------------------------------------------------------------
# setup: inputs, nnU-Net model folder, automedseg work folder
# --------------------------------------------------------------------------------------------------------


def prepare_inputs(msd_dir: Path, dest: Path, n_cases: int | None) -> list[str]:
    """Links ``dest/<case>_0000.nii.gz`` -> the first ``n_cases`` test images (sorted); returns the case ids."""
    images = sorted(p for p in (msd_dir / "imagesTs").iterdir()
                    if p.name.endswith(".nii.gz") and not p.name.startswith("."))
    if n_cases is not None:
        images = images[:n_cases]
    if not images:
        raise SystemExit(f"{msd_dir / 'imagesTs'}: no .nii.gz images")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    cases = []
    for p in images:
        case = p.name[: -len(".nii.gz")]
        (dest / f"{case}_0000.nii.gz").symlink_to(p.resolve())
        cases.append(case)
    return cases


def nnunet_plan_summary(plans_path: Path) -> dict:
    """Patch and network of nnU-Net's 3d_fullres configuration."""
    cfg = json.loads(plans_path.read_text())["configurations"][CONFIGURATION]
    arch = cfg["architecture"]["arch_kwargs"]
    return {
        "plans_file": str(plans_path),
        "patch_size": [int(p) for p in cfg["patch_size"]],
        "network_class": cfg["architecture"]["network_class_name"],
        "n_stages": int(arch["n_stages"]),
        "features_per_stage": [int(f) for f in arch["features_per_stage"]],
        "kernel_sizes": [[int(k) for k in ks] for ks in arch["kernel_sizes"]],
        "strides": [[int(s) for s in st] for st in arch["strides"]],
        "n_conv_per_stage": [int(n) for n in arch["n_conv_per_stage"]],
        "n_conv_per_stage_decoder": [int(n) for n in arch["n_conv_per_stage_decoder"]],
    }


def make_nnunet_models(bin_dir: Path, work_root: Path, results_dir: Path, dataset_name: str, folds: int) -> dict:
    """Untrained nnUNetTrainer checkpoints for folds 0..folds-1 in ``results_dir`` (nnUNet_results)."""
    pre = nnunet_paths(work_root)["nnUNet_preprocessed"] / dataset_name
    if results_dir.exists():
        shutil.rmtree(results_dir)
    results_dir.mkdir(parents=True)
    out_path = results_dir.parent / "nnunet_checkpoints.json"
    out_path.unlink(missing_ok=True)
    settings = {
        "plans_file": str(pre / f"{PLANS_IDENTIFIER}.json"),
        "dataset_json": str(pre / "dataset.json"),
        "configuration": CONFIGURATION,
        "folds": folds,
        "threads": BENCH_THREADS,
        "seed": SEED,
        "out": str(out_path),
    }
    env = nnunet_env(work_root, overrides={"nnUNet_results": str(results_dir)})
    cmd = [str(bin_dir / "python"), "-c", NNUNET_CHECKPOINT_SCRIPT, json.dumps(settings)]
    proc = subprocess.run(cmd, env=env, cwd=results_dir.parent, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out_path.exists():
        raise RuntimeError(f"creating nnU-Net checkpoints failed (rc={proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(out_path.read_text())


def _automedseg_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(thread_env(BENCH_THREADS))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def make_automedseg_models(msd_dir: Path, work: Path, nn_plan: dict, folds: int,
                           fingerprint_from: list[Path]) -> dict:
    """automedseg work folder whose 3d_fullres folds have nnU-Net's network, randomly initialised."""
    import torch

    from automedseg.network import build_network, count_parameters
    from automedseg.plans import NetworkPlan, Plans

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for fp in fingerprint_from:  # reuse a fingerprint of the same files (automedseg checks its signature)
        if fp.is_file():
            shutil.copy2(fp, work / "fingerprint.json")
            break
    cmd = [sys.executable, "-c", AUTOMEDSEG_CLI, "plan", str(msd_dir), "--work-dir", str(work), "--device",
           "reference-gpu-24g", "--no-preprocess", "-c", CONFIGURATION, "-j", str(BENCH_THREADS)]
    proc = subprocess.run(cmd, env=_automedseg_env(), cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"automedseg plan failed (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    plans = Plans.load(work / "plans.json")
    cfg = plans.configuration(CONFIGURATION)
    wanted = NetworkPlan(
        architecture="plain_unet",
        features_per_stage=tuple(nn_plan["features_per_stage"]),
        kernel_sizes=tuple(tuple(k) for k in nn_plan["kernel_sizes"]),
        strides=tuple(tuple(s) for s in nn_plan["strides"]),
        n_conv_per_stage_encoder=tuple(nn_plan["n_conv_per_stage"]),
        # nnU-Net lists decoder stages deepest first, automedseg shallowest first
        n_conv_per_stage_decoder=tuple(reversed(nn_plan["n_conv_per_stage_decoder"])),
        deep_supervision=cfg.network.deep_supervision,
    )
    planned_network_matches = cfg.network == wanted
    planned_patch_matches = list(cfg.patch_size) == list(nn_plan["patch_size"])
    if not (planned_network_matches and planned_patch_matches):
        print(f"warning: automedseg's reference-gpu-24g plan differs from nnU-Net's (network {cfg.network}, patch "
              f"{list(cfg.patch_size)}); using nnU-Net's network and patch", flush=True)
        cfg = dataclasses.replace(cfg, network=wanted, patch_size=tuple(nn_plan["patch_size"]))
    fold_plans = dataclasses.replace(plans, configurations={CONFIGURATION: cfg})
    params = None
    for fold in range(folds):
        fold_dir = work / CONFIGURATION / f"fold_{fold}"
        fold_dir.mkdir(parents=True)
        fold_plans.save(fold_dir / "plans.json")
        torch.manual_seed(SEED + fold)
        model = build_network(cfg.network, in_channels=len(plans.channel_names), num_classes=plans.num_classes,
                              dims=cfg.dims)
        params = count_parameters(model)
        torch.save({"model": model.state_dict()}, fold_dir / "checkpoint_final.pt")
    return {
        "work_dir": str(work),
        "planned_network_matches_nnunet": planned_network_matches,
        "planned_patch_matches_nnunet": planned_patch_matches,
        "features_per_stage": list(cfg.network.features_per_stage),
        "patch_size": list(cfg.patch_size),
        "mirror_axes": list(cfg.augmentation.mirror_axes),
        "parameters": params,
    }


def trained_folds(work: Path, folds: int) -> list[int]:
    """Folds 0..folds-1 of ``work/3d_fullres`` that hold a checkpoint."""
    names = ("checkpoint_final.pt", "checkpoint_best.pt", "checkpoint_latest.pt")
    return [f for f in range(folds) if any((work / CONFIGURATION / f"fold_{f}" / n).is_file() for n in names)]


# --------------------------------------------------------------------------------------------------------
# timed runs
# --------------------------------------------------------------------------------------------------------


def _count_outputs(folder: Path) -> int:
    return len(list(folder.glob("*.nii.gz"))) if folder.is_dir() else 0


def time_nnunet(bin_dir: Path, *, work_root: Path, results_dir: Path, dataset_id: int, inputs: Path, out: Path,
                folds: int, tta: bool, n_cases: int, log_path: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cmd = [str(bin_dir / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", str(dataset_id),
           "-c", CONFIGURATION, "-f", *[str(f) for f in range(folds)], "-device", "cpu", "-npp", "1", "-nps", "1"]
    if not tta:
        cmd.append("--disable_tta")
    env = nnunet_env(work_root, overrides={"nnUNet_results": str(results_dir), "PYTHONUNBUFFERED": "1"})
    label = f"nnUNetv2_predict ({'TTA' if tta else 'no TTA'})"
    print(f"[{label}] {' '.join(cmd)}", flush=True)
    with heartbeat(label):
        res = run_timestamped(cmd, env=env, cwd=out.parent, log_path=log_path)
    t_work = _first_time(res["lines"], r"There are \d+ cases in the source folder")
    t_first = _first_time(res["lines"], r"^\s*Predicting ")
    done = [t for t, text in res["lines"] if text.startswith("done with ")]
    n_out = _count_outputs(out)
    res.update({
        "tool": "nnunet",
        "label": "nnUNetv2_predict (fp32)",
        "tta": tta,
        "folds": folds,
        "n_cases": n_cases,
        "n_outputs": n_out,
        "startup_s": t_work,
        "first_case_start_s": t_first,
        "seconds_per_case_wall": round(res["wall_s"] / n_cases, 3),
        "seconds_per_case_excl_startup": round((res["wall_s"] - t_work) / n_cases, 3) if t_work is not None else None,
        "seconds_per_case_steady": round((done[-1] - done[0]) / (len(done) - 1), 3) if len(done) > 1 else None,
    })
    return _finish(res)


def time_automedseg(*, work: Path | None = None, inputs: Path, out: Path, folds: list[int], tta: bool,
                    n_cases: int, log_path: Path, label: str, source: list[str] | None = None,
                    extra: list[str] = ()) -> dict:
    """Time ``automedseg predict`` on ``work``'s folds, or on ``source`` (e.g. ``--model BUNDLE``) + ``extra``."""
    if out.exists():
        shutil.rmtree(out)
    if source is None:
        source = ["-d", str(work), "-c", CONFIGURATION, *[a for f in folds for a in ("-f", str(f))]]
    cmd = [sys.executable, "-c", AUTOMEDSEG_CLI, "predict", "-i", str(inputs), "-o", str(out), *source,
           "--threads", str(BENCH_THREADS), *extra]
    if not tta:
        cmd.append("--no-mirror")
    title = f"{label} ({'TTA' if tta else 'no TTA'})"
    print(f"[{title}] automedseg {' '.join(cmd[3:])}", flush=True)
    with heartbeat(title):
        res = run_timestamped(cmd, env=_automedseg_env(), cwd=REPO_ROOT, log_path=log_path)
    m = None
    for _, text in res["lines"]:
        m = re.search(r"(\d+) written, (\d+) kept \(exist\), (\d+) failed; ([0-9.]+) s per case", text) or m
    per_case = float(m.group(4)) if m else None
    res.update({
        "tool": "automedseg",
        "label": label,
        "tta": tta,
        "folds": len(folds),
        "fold_ids": folds,
        "n_cases": n_cases,
        "n_outputs": _count_outputs(out),
        "reported_written": int(m.group(1)) if m else None,
        "reported_failed": int(m.group(3)) if m else None,
        "startup_s": round(res["wall_s"] - per_case * n_cases, 3) if per_case is not None else None,
        "seconds_per_case_wall": round(res["wall_s"] / n_cases, 3),
        "seconds_per_case_excl_startup": per_case,
        "seconds_per_case_steady": None,
    })
    return _finish(res)


def _finish(res: dict) -> dict:
    ok = res["returncode"] == 0 and res["n_outputs"] == res["n_cases"]
    res["ok"] = ok
    print(f"  -> rc={res['returncode']} outputs {res['n_outputs']}/{res['n_cases']} wall={res['wall_s']} s, "
          f"{res['seconds_per_case_wall']} s/case (whole), {res['seconds_per_case_excl_startup']} s/case "
          f"(excl. start-up {res['startup_s']} s), other processes "
          f"{res['foreign_cpu']['foreign_cpu_fraction_of_one_core']:.2f} cores", flush=True)
    if not ok:
        print(_tail(res["lines"]), flush=True)
    res["output_tail"] = _tail(res["lines"])
    del res["lines"]  # the full time-stamped output is in res["log"]
    return res


# --------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def _fmt(v: object, nd: int = 2, unit: str = "") -> str:
    if v is None:
        return "n/a"
    return f"{v:.{nd}f}{unit}" if isinstance(v, float) else f"{v}{unit}"


def _verdict(ratio: float | None) -> str:
    return "n/a" if ratio is None else ("PASS" if ratio <= TARGET_RATIO else "FAIL")


def compare(runs: dict) -> dict:
    out: dict = {}
    for tta in ("tta", "no_tta"):
        a, n = runs.get(f"automedseg_{tta}"), runs.get(f"nnunet_{tta}")
        if not (a and n and a["ok"] and n["ok"]):
            continue
        out[tta] = {
            "ratio_wall": _ratio(a["seconds_per_case_wall"], n["seconds_per_case_wall"]),
            "ratio_excl_startup": _ratio(a["seconds_per_case_excl_startup"], n["seconds_per_case_excl_startup"]),
            "speedup_wall": _ratio(n["seconds_per_case_wall"], a["seconds_per_case_wall"]),
            "speedup_excl_startup": _ratio(n["seconds_per_case_excl_startup"], a["seconds_per_case_excl_startup"]),
        }
        out[tta]["pass_wall"] = out[tta]["ratio_wall"] is not None and out[tta]["ratio_wall"] <= TARGET_RATIO
        r = out[tta]["ratio_excl_startup"]
        out[tta]["pass_excl_startup"] = r is not None and r <= TARGET_RATIO
    return out


def build_summary(figures: dict) -> str:
    m = figures["machine"]
    nn = figures["nnunet_plan"]
    runs = figures["runs"]
    rows = []
    for r in runs.values():
        if r is None:
            continue
        rows.append([
            r["label"], "on" if r["tta"] else "off", r["folds"], f"{r['n_outputs']}/{r['n_cases']}",
            _fmt(r["wall_s"], 1, " s"), _fmt(r["seconds_per_case_wall"], 3, " s"),
            _fmt(r["seconds_per_case_excl_startup"], 3, " s"), _fmt(r["seconds_per_case_steady"], 3, " s"),
            _fmt(r["startup_s"], 1, " s"),
            _fmt(r["foreign_cpu"]["foreign_cpu_fraction_of_one_core"], 2),
        ])
    params = figures["parameters"]
    match = {True: "match", False: "DIFFER"}.get(params["match"], "n/a")
    am = figures["automedseg_models"]
    lines = [
        "# predict_speed: automedseg predict vs nnUNetv2_predict (CPU, seconds per case)",
        "",
        f"Inputs: the first {figures['n_cases']} images of `{figures['dataset']}/imagesTs`; ensembles of "
        f"{figures['folds']} folds; configuration {CONFIGURATION}; tile step 0.5, Gaussian blending on both sides; "
        f"TTA = mirroring over axes {figures['nnunet_mirror_axes']} (8 passes per fold).",
        f"Network (both sides, untrained weights): nnU-Net's `{CONFIGURATION}` plan, {nn['network_class']}, "
        f"features {nn['features_per_stage']}, {nn['n_stages']} stages, patch {nn['patch_size']}. Parameters: "
        f"automedseg {_fmt(params['automedseg'])}, nnU-Net {_fmt(params['nnunet'])} ({match}). automedseg's "
        f"reference-gpu-24g plan gave this network itself: {am['planned_network_matches_nnunet']} (patch: "
        f"{am['planned_patch_matches_nnunet']}).",
        f"Machine: {m['cpu_model']}, {m['cpu_count_usable']} cores, {m['memory_total_gib']} GiB; {BENCH_THREADS} "
        f"threads each; python {m['python']}, torch {m['torch']}, automedseg {m['automedseg']} (inference autocast: "
        f"{figures['automedseg_autocast']}), nnunetv2 {m['nnunetv2']} (torch {m['nnunet_venv_torch']} in its venv, "
        "fp32 on CPU).",
        "",
        md_table(["run", "TTA", "folds", "outputs", "wall", "s/case (whole wall)", "s/case (excl. start-up)",
                  "s/case (steady)", "start-up", "other processes' CPU (cores)"], rows),
        "",
    ]
    target_rows = []
    for tta, c in figures["comparison"].items():
        name = "with TTA" if tta == "tta" else "without TTA"
        target_rows.append([f"automedseg <= 1/3 of nnU-Net s/case, {name}, whole wall", _fmt(c["ratio_wall"], 3, "x"),
                            _verdict(c["ratio_wall"])])
        target_rows.append([f"automedseg <= 1/3 of nnU-Net s/case, {name}, excl. start-up",
                            _fmt(c["ratio_excl_startup"], 3, "x"), _verdict(c["ratio_excl_startup"])])
    if target_rows:
        lines += [md_table(["target", "automedseg / nnU-Net", "result"], target_rows), ""]
    lines += [
        "Commands:",
        "",
        *[f"- `{' '.join(r['cmd'] if r['tool'] == 'nnunet' else ['automedseg', *r['cmd'][3:]])}`"
          for r in runs.values() if r is not None],
        "",
        "Start-up: nnU-Net until its line 'There are N cases in the source folder' (python and torch imports, "
        "loading every fold's checkpoint); automedseg the wall time minus its own per-case loop time (imports, "
        "loading the folds). Steady (nnU-Net only): time between its first and last 'done with' lines / (cases - "
        "1), i.e. without its start-up and without its worker start and first-case preprocessing. nnU-Net "
        "preprocesses and exports in one background process each (-npp 1 -nps 1) "
        "while it predicts; automedseg works case by case in one process. automedseg runs in bf16 autocast where "
        "the CPU supports it, nnU-Net in fp32. The last column is the CPU time other processes used during the "
        "run divided by its wall time (above ~0.05: the machine was not idle, rerun).",
    ]
    if figures.get("onnx_export"):
        ex = figures["onnx_export"]
        lines += ["", f"ONNX Runtime rows (issue #16): the untrained work folder exported with `automedseg export "
                  f"-c {CONFIGURATION} -f 0..{figures['folds'] - 1} --onnx --onnx-exporter {ex['exporter']}` "
                  f"({ex['wall_s']:.1f} s, {ex['size_mb']:.1f} MB), then `automedseg predict --model BUNDLE` with "
                  "`--engine onnxruntime` (fp32) and with `--no-amp` (torch fp32) on the same bundle, so fp32 is "
                  "compared with fp32.", "",
                  *(onnx_rows.engine_lines(figures.get("engine_comparison") or {}, m["cpu_model"])
                    or ["- Engines: n/a (a run failed)."])]
    for key in ("nnunet_reused_note", "trained_note"):
        if figures.get(key):
            lines += ["", figures[key]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_MSD_DIR, help="MSD-layout dataset folder")
    parser.add_argument("--dataset-id", type=int, default=4, help="nnU-Net dataset id (default 4)")
    parser.add_argument("--work-root", type=Path, default=WORK_DIR, help="nnU-Net work folder (git-ignored)")
    parser.add_argument("--cases", type=int, default=None, help="use the first N test images (default: all)")
    parser.add_argument("--folds", type=int, default=5, help="ensemble size on both sides (default 5)")
    parser.add_argument("--tta", choices=("both", "on", "off"), default="both",
                        help="mirroring TTA on, off, or both variants (default both)")
    parser.add_argument("--automedseg-work-dir", type=Path, default=None,
                        help="also time automedseg's trained ensemble in this work folder (for information)")
    parser.add_argument("--skip-nnunet", action="store_true",
                        help="time automedseg only; nnU-Net's rows (and ratios) come from the previous results JSON "
                             "when it has the same cases and folds, else they are left out")
    parser.add_argument("--engines", default="torch",
                        help="comma-separated: torch (the automedseg rows on the work folder), onnxruntime (export "
                             "the folds with --onnx, time ONNX Runtime and torch fp32 on that bundle); default torch")
    args = parser.parse_args(argv)
    if args.folds < 1 or (args.cases is not None and args.cases < 1):
        parser.error("--folds and --cases must be at least 1")
    try:
        args.engines = onnx_rows.parse_engines(args.engines)
    except ValueError as e:
        parser.error(str(e))
    return run(args)


def run(args: argparse.Namespace) -> int:

    os.environ.update(thread_env(BENCH_THREADS))  # before torch is imported (checkpoint creation)
    import torch

    from automedseg.device import cpu_supports_bf16

    torch.set_num_threads(BENCH_THREADS)
    msd_dir = args.dataset.resolve()
    work_root = args.work_root.resolve()
    scratch = work_root / "predict_speed"
    scratch.mkdir(parents=True, exist_ok=True)
    dataset_name = nnunet_dataset_name(msd_dir, args.dataset_id)
    pre = nnunet_paths(work_root)["nnUNet_preprocessed"] / dataset_name
    plans_path = pre / f"{PLANS_IDENTIFIER}.json"
    if plans_path.exists():
        nn_plan = nnunet_plan_summary(plans_path)
    elif args.skip_nnunet and (RESULTS_DIR / "predict_speed.json").is_file():
        # automedseg rows only: nnU-Net's network as the previous run recorded it (no nnU-Net install needed)
        nn_plan = json.loads((RESULTS_DIR / "predict_speed.json").read_text())["nnunet_plan"]
        print(f"nnU-Net's 3d_fullres network from the previous predict_speed.json ({plans_path} absent)", flush=True)
    else:
        raise SystemExit(f"{plans_path} not found: run benchmarks/plan_speed.py first (nnU-Net preprocessing)")

    inputs = scratch / "inputs"
    cases = prepare_inputs(msd_dir, inputs, args.cases)
    n = len(cases)
    print(f"{n} test cases, {args.folds} folds, TTA {args.tta}", flush=True)

    print("automedseg: plan (reference-gpu-24g) and untrained fold checkpoints ...", flush=True)
    a_work = scratch / "automedseg_work"
    a_models = make_automedseg_models(
        msd_dir, a_work, nn_plan, args.folds,
        [work_root / "automedseg_plan_speed" / "fingerprint.json"]
        + ([args.automedseg_work_dir / "fingerprint.json"] if args.automedseg_work_dir else []),
    )
    print(f"  features {a_models['features_per_stage']}, patch {a_models['patch_size']}, "
          f"{a_models['parameters']:,} parameters (plan matched nnU-Net: {a_models['planned_network_matches_nnunet']})",
          flush=True)

    bin_dir = None
    nn_models: dict = {}
    results_dir = scratch / "nnUNet_results"
    if not args.skip_nnunet:
        bin_dir = ensure_nnunet_venv(DEFAULT_VENV_DIR)
        print("nnU-Net: untrained nnUNetTrainer checkpoints ...", flush=True)
        nn_models = make_nnunet_models(bin_dir, work_root, results_dir, dataset_name, args.folds)
        print(f"  {nn_models['parameters']:,} parameters, mirror axes {nn_models['mirror_axes']}", flush=True)

    trained: list[int] = []
    trained_note = None
    if args.automedseg_work_dir is not None:
        trained = trained_folds(args.automedseg_work_dir.resolve(), args.folds)
        trained_note = (f"Trained ensemble: `{args.automedseg_work_dir}` ({CONFIGURATION}), folds {trained} "
                        f"of the {args.folds} asked for.")
        if len(trained) < args.folds:
            print(f"warning: {args.automedseg_work_dir} has trained folds {trained} only", flush=True)
        if not trained:
            trained_note += " None trained: not timed."
        else:
            from automedseg.plans import Plans

            tplan = Plans.load(args.automedseg_work_dir / CONFIGURATION / f"fold_{trained[0]}" / "plans.json"
                               ).configuration(CONFIGURATION)
            trained_note += (f" Its plan: features {list(tplan.network.features_per_stage)}, patch "
                             f"{list(tplan.patch_size)}.")

    variants = {"both": (True, False), "on": (True,), "off": (False,)}[args.tta]
    reused_note = None
    if args.skip_nnunet:
        previous_path = RESULTS_DIR / "predict_speed.json"
        previous = json.loads(previous_path.read_text()) if previous_path.is_file() else None
        reused, nn_models, reused_note = onnx_rows.previous_nnunet_runs(previous, cases, args.folds)
    runs: dict[str, dict | None] = {}
    logs = scratch / "logs"
    for tta in variants:
        suffix = "tta" if tta else "no_tta"
        if bin_dir is not None:
            runs[f"nnunet_{suffix}"] = time_nnunet(
                bin_dir, work_root=work_root, results_dir=results_dir, dataset_id=args.dataset_id, inputs=inputs,
                out=scratch / f"out_nnunet_{suffix}", folds=args.folds, tta=tta, n_cases=n,
                log_path=logs / f"nnunet_{suffix}.log")
        elif args.skip_nnunet and f"nnunet_{suffix}" in reused:
            runs[f"nnunet_{suffix}"] = reused[f"nnunet_{suffix}"]
        if "torch" not in args.engines:
            continue
        runs[f"automedseg_{suffix}"] = time_automedseg(
            work=a_work, inputs=inputs, out=scratch / f"out_automedseg_{suffix}", folds=list(range(args.folds)),
            tta=tta, n_cases=n, log_path=logs / f"automedseg_{suffix}.log",
            label="automedseg predict, nnU-Net's network")
    onnx_export = None
    if "onnxruntime" in args.engines:
        bundle = scratch / "automedseg_onnx_bundle.zip"
        onnx_export = onnx_rows.export_bundle(
            onnx_rows.export_command([sys.executable, "-c", AUTOMEDSEG_CLI], dataset=msd_dir, work=a_work,
                                     bundle=bundle, folds=args.folds, configuration=CONFIGURATION),
            env=_automedseg_env(), cwd=REPO_ROOT, bundle=bundle)
        runs.update(onnx_rows.onnx_runs(time_automedseg, bundle=bundle, variants=variants, scratch=scratch,
                                        logs=logs, inputs=inputs, folds=list(range(args.folds)), n_cases=n))
    if trained:
        for tta in variants:
            suffix = "tta" if tta else "no_tta"
            runs[f"automedseg_trained_{suffix}"] = time_automedseg(
                work=args.automedseg_work_dir.resolve(), inputs=inputs, out=scratch / f"out_trained_{suffix}",
                folds=trained, tta=tta, n_cases=n, log_path=logs / f"automedseg_trained_{suffix}.log",
                label="automedseg predict, trained ensemble (own plan, for information)")

    params_n = nn_models.get("parameters")
    figures: dict = {
        "benchmark": "predict_speed",
        "dataset": str(msd_dir),
        "cases": cases,
        "n_cases": n,
        "folds": args.folds,
        "configuration": CONFIGURATION,
        "threads": BENCH_THREADS,
        "machine": machine_info(DEFAULT_VENV_DIR),
        "nnunet_plan": nn_plan,
        "nnunet_models": nn_models,
        "nnunet_mirror_axes": nn_models.get("mirror_axes", a_models["mirror_axes"]),
        "automedseg_models": a_models,
        "automedseg_autocast": "bfloat16" if cpu_supports_bf16() else "float32",
        "automedseg_trained_work_dir": str(args.automedseg_work_dir) if args.automedseg_work_dir else None,
        "automedseg_trained_folds": trained,
        "trained_note": trained_note,
        "engines": list(args.engines),
        "onnx_export": onnx_export,
        "nnunet_reused_note": reused_note,
        "parameters": {
            "automedseg": a_models["parameters"],
            "nnunet": params_n,
            "match": None if params_n is None else params_n == a_models["parameters"],
        },
        "runs": runs,
    }
    figures["comparison"] = compare(runs)
    figures["engine_comparison"] = onnx_rows.compare_engines(runs)
    figures["target_ratio"] = TARGET_RATIO
    summary = build_summary(figures)
    json_path, md_path = write_results("predict_speed", figures, summary)
    print(summary)
    print(f"\nwrote {json_path} and {md_path}")
    failed = [k for k, r in runs.items() if r is not None and not r["ok"]]
    if failed:
        print(f"error: runs failed: {', '.join(failed)}", flush=True)
    if figures["parameters"]["match"] is False:
        print(f"error: parameter counts differ (automedseg {a_models['parameters']}, nnU-Net {params_n})", flush=True)
    disturbed = [k for k, r in runs.items() if r and r["foreign_cpu"]["foreign_cpu_fraction_of_one_core"] > 0.05]
    if disturbed:
        print(f"warning: other processes used CPU during {', '.join(disturbed)}: rerun on an idle machine", flush=True)
    return 1 if failed or figures["parameters"]["match"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
