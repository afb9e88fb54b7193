"""benchmarks/predict_speed_2d.py: the copy of the per-slice window, the plan, the summary and the arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def bench(benchmark_module):
    return benchmark_module("predict_speed_2d")


def test_drive_plan_is_the_shared_datasets_one(bench) -> None:
    config = bench.drive_config()
    assert config.dims == 2 and tuple(config.patch_size) == (192, 256)
    assert config.network.features_per_stage == (8, 16, 32, 64, 128, 128)
    assert bench.drive_config(width=12).network.features_per_stage == (12, 24, 48, 96, 192, 192)


@pytest.mark.parametrize("mirror", [None, (0, 1)])
def test_the_old_window_and_the_batched_one_agree(bench, configuration_plan: Any,
                                                  mirror: tuple[int, ...] | None) -> None:
    from automedseg.inference import predict_preprocessed
    from automedseg.network import build_network

    config = configuration_plan((8, 12))
    torch.manual_seed(0)
    model = build_network(config.network, in_channels=2, num_classes=3, dims=2).eval()
    model.deep_supervision = False
    data = np.random.default_rng(0).normal(size=(2, 3, 14, 17)).astype(np.float32)
    kw = dict(device=torch.device("cpu"), num_classes=3, mirror_axes=mirror, amp=False)
    old = bench.predict_per_slice(model, data, config, **kw)
    new = predict_preprocessed(model, data, config, **kw)
    np.testing.assert_allclose(new, old, rtol=1e-4, atol=1e-5)


def test_summary_table(bench) -> None:
    def variant(wall: float, cpu: float, speedup: float) -> dict:
        return {"median_s": wall, "seconds_per_slice": wall / 48, "speedup_vs_per_slice": speedup,
                "median_cpu_s": cpu, "cpu_speedup_vs_per_slice": speedup, "max_abs_diff_vs_per_slice": 1e-6,
                "foreign_cpu": {"foreign_cpu_fraction_of_one_core": 1.5}}

    figures = {"machine": {"cpu_model": "CPU X"}, "threads": 1, "autocast": "bfloat16",
               "features_per_stage": [8, 16], "parameters": 1234, "patch_size": [192, 256],
               "default_forward_batch": 42, "forward_voxels_2d": 2**21, "max_forward_batch": 64,
               "images": {"stack": {"shape": [3, 48, 192, 160],
                                    "variants": {"per-slice": variant(20.0, 19.0, 1.0),
                                                 "batched (42)": variant(10.0, 9.5, 2.0)}}}}
    md = bench.build_summary(figures)
    assert "CPU X, 1 torch thread(s)" in md and "default forward batch 42 (2,097,152 voxels" in md
    assert "| stack | 3x48x192x160 | batched (42) | 10.000 | 0.2083 | 2.00x | 9.500 | 2.00x | 1.0e-06 | 1.50 |" in md


def test_arguments(bench, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    monkeypatch.setattr(bench, "measure", lambda **kw: seen.update(kw) or {})
    monkeypatch.setattr(bench, "build_summary", lambda figures: "summary")
    monkeypatch.setattr(bench, "write_results", lambda *a, **k: (Path("j"), Path("m")))
    monkeypatch.setattr(bench, "write_section", lambda *a, **k: None)
    assert bench.main(["--images", "stack", "--batches", "8,16", "--reps", "2", "--no-amp"]) == 0
    assert seen["image_names"] == ["stack"] and seen["batches"] == (8, 16) and seen["reps"] == 2
    assert seen["amp"] is False and seen["threads"] == 1 and seen["slices"] == 48
    for bad in (["--images", "hc18"], ["--batches", "a,b"]):
        with pytest.raises(SystemExit) as e:
            bench.main(bad)
        assert e.value.code == 2


def test_the_2d_figures_are_a_section_of_predict_speed_md_that_its_rewrite_keeps(benchmark_module,
                                                                                 tmp_path: Path) -> None:
    common = benchmark_module("_common")
    common.write_results("predict_speed", {"machine": {}}, "# 3D\nold table", results_dir=tmp_path)
    common.write_section(tmp_path / "predict_speed.md", "predict_speed_2d", "## 2D\nfirst")
    common.write_section(tmp_path / "predict_speed.md", "predict_speed_2d", "## 2D\nsecond")
    common.write_results("predict_speed", {"machine": {}}, "# 3D\nnew table", results_dir=tmp_path)
    text = (tmp_path / "predict_speed.md").read_text()
    assert text.startswith("# 3D\nnew table\n") and text.count("## 2D") == 1 and "second" in text
    assert "first" not in text and "old table" not in text
