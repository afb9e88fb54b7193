"""ONNX Runtime rows of ``predict_speed.py`` (issue #16): the same untrained ensemble, both engines, fp32.

``--engines ...,onnxruntime`` exports the benchmark's work folder (``automedseg_work``, configuration
3d_fullres, folds 0..n-1, no find-best needed: ``-c``/``-f`` name them) to a bundle with ``automedseg export
--onnx --onnx-exporter legacy``, then times, per TTA variant, on that bundle:

- ``automedseg predict --model BUNDLE --no-amp`` (torch, float32), and
- ``automedseg predict --model BUNDLE --engine onnxruntime`` (ONNX Runtime, always float32),

so fp32 is compared with fp32 on the same graphs' weights. ``--skip-nnunet`` keeps nnU-Net's rows of the
previous results JSON when they were measured on the same cases and folds (see :func:`previous_nnunet_runs`).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

ENGINES = ("torch", "onnxruntime")
ONNX_EXPORTER = "legacy"
LABEL_TORCH_FP32 = "automedseg predict --model, torch fp32 (--no-amp)"
LABEL_ORT = "automedseg predict --model, ONNX Runtime (fp32)"


def parse_engines(text: str) -> tuple[str, ...]:
    """``"torch,onnxruntime"`` -> ``("torch", "onnxruntime")``; unknown or no names raise ``ValueError``."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in ENGINES]
    if unknown or not names:
        raise ValueError(f"--engines {text!r}: choose from {', '.join(ENGINES)} (comma-separated)")
    return names


def export_command(cli: list[str], *, dataset: Path, work: Path, bundle: Path, folds: int,
                   configuration: str) -> list[str]:
    """``automedseg export`` of folds 0..folds-1 of ``work`` with ONNX graphs (``cli``: python -c ...)."""
    return [*cli, "export", str(dataset), "--work-dir", str(work), "-o", str(bundle), "-c", configuration,
            *[a for f in range(folds) for a in ("-f", str(f))], "--onnx", "--onnx-exporter", ONNX_EXPORTER,
            "--overwrite"]


def export_bundle(cmd: list[str], *, env: dict, cwd: Path, bundle: Path) -> dict:
    """Run the export; its wall time and the bundle size, or a RuntimeError with the output's tail."""
    print(f"automedseg: export --onnx ({ONNX_EXPORTER}) -> {bundle} ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not bundle.is_file():
        raise RuntimeError(f"automedseg export failed (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    diffs = [ln.strip() for ln in proc.stdout.splitlines() if "max |ONNX - torch|" in ln]
    print(f"  {wall:.1f} s, {bundle.stat().st_size / 1e6:.1f} MB", flush=True)
    return {"bundle": str(bundle), "exporter": ONNX_EXPORTER, "wall_s": round(wall, 3),
            "size_mb": round(bundle.stat().st_size / 1e6, 2), "onnx_vs_torch": diffs}


def onnx_runs(time_fn: Callable[..., dict], *, bundle: Path, variants: tuple[bool, ...], scratch: Path,
              logs: Path, **common: object) -> dict[str, dict]:
    """Per TTA variant, torch fp32 and ONNX Runtime on ``bundle``, timed by ``time_fn`` (``time_automedseg``).

    ``common`` goes to every call (inputs, folds, n_cases); ``time_fn`` gets ``source`` (``--model BUNDLE``),
    ``extra`` (the engine arguments), ``tta``, ``out``, ``log_path`` and ``label`` besides.
    """
    runs: dict[str, dict] = {}
    for tta in variants:
        suffix = "tta" if tta else "no_tta"
        for key, extra, label in (("torch_fp32", ["--no-amp"], LABEL_TORCH_FP32),
                                  ("onnxruntime", ["--engine", "onnxruntime"], LABEL_ORT)):
            name = f"automedseg_{key}_{suffix}"
            runs[name] = time_fn(source=["--model", str(bundle)], extra=extra, tta=tta, label=label,
                                 out=scratch / f"out_{key}_{suffix}", log_path=logs / f"{name}.log", **common)
    return runs


def compare_engines(runs: dict) -> dict:
    """ONNX Runtime vs torch fp32 per TTA variant: ``factor`` = slower s/case / faster s/case, and which won."""
    out: dict = {}
    for suffix in ("tta", "no_tta"):
        t, o = runs.get(f"automedseg_torch_fp32_{suffix}"), runs.get(f"automedseg_onnxruntime_{suffix}")
        if not (t and o and t["ok"] and o["ok"]):
            continue
        entry = {}
        for basis in ("seconds_per_case_wall", "seconds_per_case_excl_startup"):
            ts, os_ = t[basis], o[basis]
            if not ts or not os_:
                continue
            faster = "onnxruntime" if os_ < ts else "torch"
            entry[basis] = {"torch_fp32": ts, "onnxruntime": os_, "faster": faster,
                            "factor": round(max(ts, os_) / min(ts, os_), 3)}
        if entry:
            out[suffix] = entry
    return out


def engine_lines(comparison: dict, cpu_model: str) -> list[str]:
    """Markdown lines stating which engine is faster on this CPU, by what factor."""
    lines = []
    for suffix, entry in comparison.items():
        name = "with TTA" if suffix == "tta" else "without TTA"
        parts = []
        for basis, what in (("seconds_per_case_excl_startup", "excl. start-up"),
                            ("seconds_per_case_wall", "whole wall")):
            c = entry.get(basis)
            if c:
                engine = "ONNX Runtime" if c["faster"] == "onnxruntime" else "torch fp32"
                parts.append(f"{engine} is faster by {c['factor']:.2f}x {what} ({c['onnxruntime']:.3f} s/case "
                             f"ONNX Runtime vs {c['torch_fp32']:.3f} s/case torch fp32)")
        if parts:
            lines.append(f"- Engines on this CPU ({cpu_model}), {name}: " + "; ".join(parts) + ".")
    return lines


def previous_nnunet_runs(previous: dict | None, cases: list[str], folds: int) -> tuple[dict, dict, str | None]:
    """nnU-Net's runs and models of an earlier results JSON, if measured on the same cases and folds.

    Returns:
        (runs, nnunet_models, note); empty and ``None`` when there is nothing reusable.
    """
    if not previous or previous.get("cases") != cases or previous.get("folds") != folds:
        return {}, {}, None
    runs = {k: r for k, r in (previous.get("runs") or {}).items() if k.startswith("nnunet_") and r}
    if not runs:
        return {}, {}, None
    for r in runs.values():
        r["reused_from"] = previous.get("created_utc")
        if not r["label"].endswith("[earlier run]"):
            r["label"] = f"{r['label']} [earlier run]"
    note = (f"nnU-Net's rows ({', '.join(runs)}) are from the run of {previous.get('created_utc', 'unknown')} "
            "(same cases and folds); this run used --skip-nnunet.")
    return runs, previous.get("nnunet_models") or {}, note

