"""benchmarks/predict_speed.py: the ONNX Runtime rows' arguments, commands, rows and verdict (nothing predicted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SCRIPT_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(SCRIPT_DIR))
    import predict_speed

    yield predict_speed
    for name in ("predict_speed", "predict_speed_onnx"):
        sys.modules.pop(name, None)


def _run(label: str, tta: bool, per_case: float, *, tool: str = "automedseg", ok: bool = True) -> dict:
    return {"tool": tool, "label": label, "tta": tta, "folds": 5, "n_cases": 2, "n_outputs": 2 if ok else 0,
            "ok": ok, "wall_s": 2 * per_case + 3.0, "seconds_per_case_wall": per_case + 1.5,
            "seconds_per_case_excl_startup": per_case, "seconds_per_case_steady": None, "startup_s": 3.0,
            "foreign_cpu": {"foreign_cpu_fraction_of_one_core": 0.0},
            "cmd": [sys.executable, "-c", "X", "predict", "-i", "IN", "-o", "OUT"]}


def test_engines_argument(bench, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(bench, "run", lambda args: seen.append(args) or 0)
    assert bench.main(["--cases", "2", "--engines", "torch, onnxruntime,torch", "--skip-nnunet"]) == 0
    assert seen[0].engines == ("torch", "onnxruntime") and seen[0].skip_nnunet
    assert bench.main([]) == 0 and seen[1].engines == ("torch",)  # the default keeps the existing rows only
    for bad in ("tensorrt", ","):
        with pytest.raises(SystemExit) as e:
            bench.main(["--engines", bad])
        assert e.value.code == 2


def test_export_and_onnx_runs_commands(bench, tmp_path: Path) -> None:
    rows = bench.onnx_rows
    cmd = rows.export_command(["py", "-c", "X"], dataset=Path("DS"), work=Path("W"), bundle=Path("b.zip"), folds=3,
                              configuration="3d_fullres")
    assert cmd == ["py", "-c", "X", "export", "DS", "--work-dir", "W", "-o", "b.zip", "-c", "3d_fullres",
                   "-f", "0", "-f", "1", "-f", "2", "--onnx", "--onnx-exporter", "legacy", "--overwrite"]
    calls = []

    def fake_time(**kw):
        calls.append(kw)
        return {"label": kw["label"]}

    runs = rows.onnx_runs(fake_time, bundle=Path("b.zip"), variants=(True, False), scratch=tmp_path,
                          logs=tmp_path / "logs", inputs=Path("IN"), folds=[0, 1], n_cases=2)
    assert list(runs) == ["automedseg_torch_fp32_tta", "automedseg_onnxruntime_tta",
                          "automedseg_torch_fp32_no_tta", "automedseg_onnxruntime_no_tta"]
    assert [c["extra"] for c in calls] == [["--no-amp"], ["--engine", "onnxruntime"]] * 2
    assert [c["tta"] for c in calls] == [True, True, False, False]
    assert all(c["source"] == ["--model", "b.zip"] and c["folds"] == [0, 1] and c["n_cases"] == 2 for c in calls)
    assert len({c["out"] for c in calls}) == 4


def test_time_automedseg_on_a_bundle(bench, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return {"cmd": cmd, "wall_s": 10.0, "returncode": 0, "log": "x",
                "foreign_cpu": {"foreign_cpu_fraction_of_one_core": 0.0},
                "lines": [(9.0, "2 written, 0 kept (exist), 0 failed; 4.000 s per case")]}

    monkeypatch.setattr(bench, "run_timestamped", fake_run)
    res = bench.time_automedseg(inputs=Path("IN"), out=tmp_path / "out", folds=[0, 1], tta=False, n_cases=2,
                                log_path=tmp_path / "log", label="L", source=["--model", "b.zip"],
                                extra=["--engine", "onnxruntime"])
    assert seen["cmd"][3:] == ["predict", "-i", "IN", "-o", str(tmp_path / "out"), "--model", "b.zip",
                               "--threads", str(bench.BENCH_THREADS), "--engine", "onnxruntime", "--no-mirror"]
    assert res["seconds_per_case_excl_startup"] == 4.0 and res["startup_s"] == 2.0 and not res["ok"]  # no outputs


def test_engine_comparison_and_summary_rows(bench) -> None:
    rows = bench.onnx_rows
    runs = {
        "nnunet_tta": _run("nnUNetv2_predict (fp32)", True, 13.0, tool="nnunet"),
        "automedseg_tta": _run("automedseg predict, nnU-Net's network", True, 3.0),
        "automedseg_torch_fp32_tta": _run(rows.LABEL_TORCH_FP32, True, 4.0),
        "automedseg_onnxruntime_tta": _run(rows.LABEL_ORT, True, 2.0),
        "automedseg_torch_fp32_no_tta": _run(rows.LABEL_TORCH_FP32, False, 0.5),
        "automedseg_onnxruntime_no_tta": _run(rows.LABEL_ORT, False, 0.6, ok=False),
    }
    comparison = rows.compare_engines(runs)
    assert list(comparison) == ["tta"]  # a failed run gives no verdict
    c = comparison["tta"]["seconds_per_case_excl_startup"]
    assert c == {"torch_fp32": 4.0, "onnxruntime": 2.0, "faster": "onnxruntime", "factor": 2.0}
    assert comparison["tta"]["seconds_per_case_wall"]["factor"] == round(5.5 / 3.5, 3)
    runs["automedseg_onnxruntime_no_tta"] = _run(rows.LABEL_ORT, False, 1.0)
    comparison = rows.compare_engines(runs)
    assert comparison["no_tta"]["seconds_per_case_excl_startup"]["faster"] == "torch"
    lines = rows.engine_lines(comparison, "CPU X")
    assert lines[0].startswith("- Engines on this CPU (CPU X), with TTA: ONNX Runtime is faster by 2.00x excl.")
    assert "torch fp32 is faster by 2.00x excl. start-up" in lines[1]

    figures = {
        "machine": {"cpu_model": "CPU X", "cpu_count_usable": 2, "memory_total_gib": 8, "python": "3", "torch": "2",
                    "automedseg": "0", "nnunetv2": "2", "nnunet_venv_torch": "2"},
        "nnunet_plan": {"network_class": "PlainConvUNet", "features_per_stage": [32], "n_stages": 4,
                        "patch_size": [40, 56, 40]},
        "parameters": {"automedseg": 5, "nnunet": 5, "match": True},
        "automedseg_models": {"planned_network_matches_nnunet": True, "planned_patch_matches_nnunet": True},
        "n_cases": 2, "dataset": "D", "folds": 5, "nnunet_mirror_axes": [0, 1, 2], "automedseg_autocast": "bfloat16",
        "runs": runs, "comparison": bench.compare(runs), "engine_comparison": comparison,
        "onnx_export": {"exporter": "legacy", "wall_s": 12.0, "size_mb": 110.0},
        "nnunet_reused_note": "nnU-Net's rows are from an earlier run.",
    }
    md = bench.build_summary(figures)
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert sum(rows.LABEL_ORT in ln for ln in table) == 2 and sum(rows.LABEL_TORCH_FP32 in ln for ln in table) == 2
    assert "| automedseg <= 1/3 of nnU-Net s/case, with TTA, whole wall | 0.310x | PASS |" in md  # 4.5 / 14.5
    assert "--onnx --onnx-exporter legacy` (12.0 s, 110.0 MB)" in md
    assert "ONNX Runtime is faster by 2.00x" in md and "from an earlier run" in md


def test_previous_nnunet_rows_reused_only_for_the_same_cases(bench) -> None:
    prev = {"cases": ["a", "b"], "folds": 5, "created_utc": "T", "nnunet_models": {"parameters": 5},
            "runs": {"nnunet_tta": _run("nnUNetv2_predict (fp32)", True, 13.0, tool="nnunet"),
                     "automedseg_tta": _run("automedseg", True, 3.0), "nnunet_no_tta": None}}
    runs, models, note = bench.onnx_rows.previous_nnunet_runs(prev, ["a", "b"], 5)
    assert list(runs) == ["nnunet_tta"] and models == {"parameters": 5} and "run of T" in note
    assert runs["nnunet_tta"]["label"] == "nnUNetv2_predict (fp32) [earlier run]"
    for cases, folds in ((["a"], 5), (["a", "b"], 3)):
        assert bench.onnx_rows.previous_nnunet_runs(prev, cases, folds) == ({}, {}, None)
    assert bench.onnx_rows.previous_nnunet_runs(None, ["a"], 5) == ({}, {}, None)
