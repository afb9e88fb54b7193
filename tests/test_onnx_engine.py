"""ONNX graphs of trained folds and ONNX Runtime as the prediction pipeline's network (automedseg.onnx_engine).

The ONNX engine must agree with the torch engine in float32: probabilities within 1e-3, masks on >= 99.9 % of the
voxels; on a tiny 2D model (planned on a PNG dataset, random weights) and a tiny 3D one (the trained demo).
"""

from __future__ import annotations

import json
import shutil
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
from automedseg.onnx_engine import GRAPH_NAME, export_onnx, load_onnx_fold, onnx_sidecar  # noqa: E402
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


@pytest.fixture(scope="module")
def folds_3d(trained_demo_best: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The trained demo's 3d_fullres fold 0 with its ONNX graph: (fold folder, test images)."""
    dataset, work = trained_demo_best
    source = work / "3d_fullres" / "fold_0"
    state = torch.load(source / "checkpoint_final.pt", weights_only=True)["model"]
    fold = _fold_with_graph(tmp_path_factory.mktemp("onnx3d") / "3d_fullres" / "fold_0",
                            Plans.load(source / "plans.json"), state)
    return fold, dataset / "imagesTs"


@pytest.mark.parametrize(("which", "mirror"), [("folds_2d", True), ("folds_3d", False)])
def test_onnxruntime_agrees_with_torch(request: pytest.FixtureRequest, which: str, mirror: bool) -> None:
    fold_dir, images = request.getfixturevalue(which)
    cpu = torch.device("cpu")
    torch_fold = load_fold(fold_dir, device=cpu)
    onnx_fold = load_onnx_fold(fold_dir, device=cpu)
    plans = torch_fold.plans
    case = discover_images(images, n_channels=len(plans.channel_names))[0]
    image, geometry = read_images(case, n_channels=len(plans.channel_names))
    with torch.inference_mode():
        p_torch = predict_case([torch_fold], image, geometry, device=cpu, mirror=mirror, amp=False)
        p_onnx = predict_case([onnx_fold], image, geometry, device=cpu, mirror=mirror, amp=False)
    assert p_onnx.shape == p_torch.shape == (plans.num_classes, *image.shape[1:])
    assert float(np.abs(p_onnx - p_torch).max()) < 1e-3
    assert float((p_onnx.argmax(0) == p_torch.argmax(0)).mean()) >= 0.999


def test_sidecar_says_how_to_use_the_graph(folds_3d: tuple[Path, Path]) -> None:
    fold_dir, _ = folds_3d
    plans = Plans.load(fold_dir / "plans.json")
    (config,) = plans.configurations.values()
    side = onnx_sidecar(plans, config, fold="0", info={"opset": 20, "exporter": "legacy", "onnx_version": "1"},
                        postprocessing=None)
    json.dumps(side, allow_nan=False)
    assert side["input"]["shape"] == ["batch", 1, "z", "y", "x"] and side["output"]["shape"][1] == 3
    assert side["label_values"] == [0, 1, 2] and side["labels"] == plans.labels
    assert side["sliding_window"]["patch_size"] == list(config.patch_size)
    assert side["sliding_window"]["mirror_axes"] == list(config.augmentation.mirror_axes)
    assert side["preprocessing"]["spacing_mm"] == list(config.spacing_mm)
    assert side["preprocessing"]["normalization"][0]["scheme"] == config.normalization[0].scheme


def test_cli_export_onnx_then_predict_with_onnxruntime(trained_demo_best: tuple[Path, Path], tmp_path: Path) -> None:
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
    assert manifest["onnx"]["exporter"] == "legacy" and side["postprocessing"]["keep_largest_labels"] is not None
    base = ["predict", "-i", str(dataset / "imagesTs"), "--model", str(zip_path), "--threads", "1", "--no-mirror"]
    for engine in ("onnxruntime", "torch"):
        r = runner.invoke(main, [*base, "-o", str(tmp_path / engine), "--engine", engine, "--no-amp"])
        assert r.exit_code == 0 and "2 written" in r.output, r.output
    for mask in sorted((tmp_path / "torch").glob("*.nii.gz")):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "onnxruntime" / mask.name)))
        assert float((a == b).mean()) >= 0.999
    r = runner.invoke(main, ["predict", "-i", str(dataset / "imagesTs"), "-o", str(tmp_path / "x"), "-d", str(work),
                             "--engine", "onnxruntime"])
    assert r.exit_code == 2 and "no model.onnx" in r.output and "--onnx" in r.output, r.output


@pytest.mark.slow
def test_dynamo_exporter(folds_3d: tuple[Path, Path], tmp_path: Path) -> None:
    """torch's default exporter (torch.export + onnxscript) gives the same graph numerics (slow: ~10 s per graph)."""
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    fold_dir, images = folds_3d
    fold = shutil.copytree(fold_dir, tmp_path / "fold_0")
    (fold / GRAPH_NAME).unlink()
    state = torch.load(fold / "checkpoint_final.pt", weights_only=True)["model"]
    _fold_with_graph(fold, Plans.load(fold / "plans.json"), state, exporter="dynamo")
    onnx_fold = load_onnx_fold(fold, device=torch.device("cpu"))
    x = torch.randn(1, 1, *onnx_fold.config.patch_size)
    assert onnx_fold.model(x).shape == (1, 3, *onnx_fold.config.patch_size)
