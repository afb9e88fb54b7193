"""ONNX graphs of trained folds and ONNX Runtime as the prediction pipeline's network (automedseg.onnx_engine).

The ONNX engine must agree with the torch engine in float32: probabilities within 1e-3, masks on >= 99.9 % of the
voxels; on a tiny 2D model (planned on a PNG dataset, random weights; library level, with mirroring) and a tiny 3D
one (the trained demo; exported and predicted through the CLI).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner

pytest.importorskip("onnx", reason="onnx is optional: pip install 'automedseg[export]'")
pytest.importorskip("onnxruntime", reason="onnxruntime is optional: pip install 'automedseg[export]'")

from automedseg.cli import main  # noqa: E402
from automedseg.inference import load_fold, predict_case  # noqa: E402
from automedseg.io import discover_images, read_images  # noqa: E402
from automedseg.network import build_network  # noqa: E402
from automedseg.onnx_engine import GRAPH_NAME, export_onnx, load_onnx_fold  # noqa: E402
from automedseg.plans import Plans  # noqa: E402


def _fold_with_graph(fold_dir: Path, plans: Plans, state: dict | None, exporter: str = "legacy") -> Path:
    """``fold_dir`` with the plan copy, weights (random when ``state`` is None) and the ONNX graph."""
    (name, config), = plans.configurations.items()
    model = build_network(config.network, in_channels=len(plans.channel_names), num_classes=plans.num_classes,
                          dims=config.dims)
    if state is not None:
        model.load_state_dict(state)
    fold_dir.mkdir(parents=True, exist_ok=True)
    plans.save(fold_dir / "plans.json")
    torch.save({"model": model.state_dict()}, fold_dir / "checkpoint_final.pt")
    graph, info = export_onnx(model, plans, config, exporter=exporter, where=str(fold_dir))
    (fold_dir / GRAPH_NAME).write_bytes(graph)
    assert info["max_abs_difference"] < 1e-3 and info["opset"] >= 17
    return fold_dir


@pytest.fixture(scope="module")
def folds_2d(tmp_path_factory: pytest.TempPathFactory, write_png_dataset) -> tuple[Path, Path]:
    """A 2D configuration planned on a grey PNG dataset, random weights: (fold folder, test images)."""
    root = tmp_path_factory.mktemp("onnx2d")
    ds = write_png_dataset(root / "Dataset_Gray", rgb=False)
    work = root / "work"
    r = CliRunner().invoke(main, ["plan", str(ds.root), "--work-dir", str(work), "-c", "2d", "-j", "1",
                                  "--device", "reference-cpu-2core", "--time-budget", "1m", "--no-preprocess"])
    assert r.exit_code == 0, r.output
    plans = Plans.load(work / "plans.json")
    assert list(plans.configurations) == ["2d"]
    torch.manual_seed(0)
    return _fold_with_graph(work / "2d" / "fold_0", plans, None), ds.root / "imagesTs"


def test_onnxruntime_agrees_with_torch_2d(folds_2d: tuple[Path, Path]) -> None:
    """Library level, test-time mirroring on: probabilities in float32 within 1e-3."""
    fold_dir, images = folds_2d
    cpu = torch.device("cpu")
    torch_fold = load_fold(fold_dir, device=cpu)
    onnx_fold = load_onnx_fold(fold_dir, device=cpu)
    plans = torch_fold.plans
    assert onnx_fold.config.augmentation.mirror_axes  # the comparison includes mirroring
    case = discover_images(images, n_channels=len(plans.channel_names))[0]
    image, geometry = read_images(case, n_channels=len(plans.channel_names))
    p_torch = predict_case([torch_fold], image, geometry, device=cpu, mirror=True, amp=False)
    p_onnx = predict_case([onnx_fold], image, geometry, device=cpu, mirror=True, amp=False)
    assert p_onnx.shape == p_torch.shape == (plans.num_classes, *image.shape[1:])
    assert float(np.abs(p_onnx - p_torch).max()) < 1e-3
    assert float((p_onnx.argmax(0) == p_torch.argmax(0)).mean()) >= 0.999


def test_cli_export_onnx_then_predict_with_onnxruntime_3d(trained_demo_best: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    """The trained 3D demo through the CLI: both engines on the bundle, probabilities (float16 files: one step
    is 4.9e-4 below 1) within 1e-3, masks on >= 99.9 % of the voxels; the sidecar says how to use the graph."""
    dataset, work = trained_demo_best
    zip_path = tmp_path / "model.zip"
    runner = CliRunner()
    r = runner.invoke(main, ["export", str(dataset), "--work-dir", str(work), "-o", str(zip_path), "--onnx",
                             "--onnx-exporter", "legacy"])
    assert r.exit_code == 0, r.output
    assert "model.onnx: opset" in r.output
    with zipfile.ZipFile(zip_path) as zf:
        side = json.loads(zf.read("3d_fullres/fold_0/onnx.json"))
        manifest = json.loads(zf.read("manifest.json"))
    plans = Plans.load(work / "3d_fullres" / "fold_0" / "plans.json")
    (config,) = plans.configurations.values()
    assert manifest["onnx"]["exporter"] == "legacy" and manifest["onnx"]["opset"] == side["opset"] >= 17
    assert side["input"]["shape"] == ["batch", 1, "z", "y", "x"] and side["output"]["shape"][:2] == ["batch", 3]
    assert side["label_values"] == [0, 1, 2] and side["labels"] == plans.labels
    assert side["sliding_window"]["patch_size"] == list(config.patch_size)
    assert side["sliding_window"]["mirror_axes"] == list(config.augmentation.mirror_axes)
    assert side["preprocessing"]["spacing_mm"] == list(config.spacing_mm)
    assert side["preprocessing"]["normalization"][0]["scheme"] == config.normalization[0].scheme
    assert side["postprocessing"]["keep_largest_labels"] is not None
    base = ["predict", "-i", str(dataset / "imagesTs"), "--model", str(zip_path), "--threads", "1", "--no-mirror",
            "--save-probabilities", "--no-amp"]
    for engine in ("onnxruntime", "torch"):
        r = runner.invoke(main, [*base, "-o", str(tmp_path / engine), "--engine", engine])
        assert r.exit_code == 0 and "2 written" in r.output, r.output
    for mask in sorted((tmp_path / "torch").glob("*.nii.gz")):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "onnxruntime" / mask.name)))
        assert float((a == b).mean()) >= 0.999
        name = mask.name.replace(".nii.gz", ".npz")
        pa = np.load(tmp_path / "torch" / name)["probabilities"].astype(np.float32)
        pb = np.load(tmp_path / "onnxruntime" / name)["probabilities"].astype(np.float32)
        assert float(np.abs(pa - pb).max()) < 1e-3
    r = runner.invoke(main, ["predict", "-i", str(dataset / "imagesTs"), "-o", str(tmp_path / "x"), "-d", str(work),
                             "--engine", "onnxruntime"])
    assert r.exit_code == 2 and "no model.onnx" in r.output and "--onnx" in r.output, r.output


@pytest.mark.slow
def test_dynamo_exporter(folds_2d: tuple[Path, Path], tmp_path: Path) -> None:
    """torch's default exporter (torch.export + onnxscript) gives the same graph numerics (slow: ~10 s a graph)."""
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    fold_dir, _ = folds_2d
    fold = tmp_path / "fold_0"
    state = torch.load(fold_dir / "checkpoint_final.pt", weights_only=True)["model"]
    _fold_with_graph(fold, Plans.load(fold_dir / "plans.json"), state, exporter="dynamo")
    onnx_fold = load_onnx_fold(fold, device=torch.device("cpu"))
    x = torch.randn(3, 1, *onnx_fold.config.patch_size)
    with torch.inference_mode():
        ref = load_fold(fold, device=torch.device("cpu")).model(x)
    assert float((onnx_fold.model(x) - ref).abs().max()) < 1e-3
