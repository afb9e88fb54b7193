"""``automedseg export`` -> ``import-model`` -> ``predict`` gives the work folder's masks, byte for byte."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from automedseg.cli import main

PREDICT = ["--device", "cpu", "--threads", "1", "--no-mirror"]


@pytest.fixture(scope="module")
def exported(trained_demo_best: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, Path, Path]:
    """(dataset, work folder, model.zip) of the trained demo, exported with find-best's choice."""
    dataset, work = trained_demo_best
    zip_path = tmp_path_factory.mktemp("export") / "model.zip"
    r = CliRunner().invoke(main, ["export", str(dataset), "--work-dir", str(work), "-o", str(zip_path)])
    assert r.exit_code == 0, r.output
    assert f"automedseg predict -i INPUT -o OUTPUT --model {zip_path}" in r.output
    return dataset, work, zip_path


def _light_copy(work: Path, to: Path) -> Path:
    """The work folder without its cache and with only the final checkpoints."""
    shutil.copytree(work, to, ignore=shutil.ignore_patterns("checkpoint_*.pt", "preprocessed", "*.npz"))
    shutil.copy(work / "3d_fullres/fold_0/checkpoint_final.pt", to / "3d_fullres/fold_0")
    return to


def _masks(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.nii.gz"))}


def test_export_import_predict_gives_identical_masks(exported: tuple[Path, Path, Path], tmp_path: Path) -> None:
    dataset, work, zip_path = exported
    runner = CliRunner()
    r = runner.invoke(main, ["import-model", str(zip_path), "--into", str(tmp_path / "model")])
    assert r.exit_code == 0, r.output
    assert "files verified against the manifest" in r.output and "3d_fullres folds 0" in r.output
    images = str(dataset / "imagesTs")
    for name, source in [("work", ["-d", str(work)]), ("imported", ["-d", str(tmp_path / "model")]),
                         ("zip", ["--model", str(zip_path)])]:
        r = runner.invoke(main, ["predict", "-i", images, "-o", str(tmp_path / name), *source, *PREDICT])
        assert r.exit_code == 0, r.output
        assert "2 written" in r.output and "post-processing from" in r.output
    reference = _masks(tmp_path / "work")
    assert len(reference) == 2
    assert _masks(tmp_path / "imported") == reference
    assert _masks(tmp_path / "zip") == reference
    assert not list(tmp_path.glob("automedseg-model-*"))  # the zip's temporary folder is gone


def test_the_bundle_holds_what_inference_needs(exported: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, work, zip_path = exported
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("manifest.json"))
        for name, entry in manifest["files"].items():
            data = zf.read(name)
            assert (hashlib.sha256(data).hexdigest(), len(data)) == (entry["sha256"], entry["size"])
        zf.extract("3d_fullres/fold_0/checkpoint_final.pt", tmp_path)
        best = json.loads(zf.read("find_best.json"))["best"]
    assert names == {"manifest.json", *manifest["files"]}
    assert {"plans.json", "find_best.json", "3d_fullres/postprocessing.json", "3d_fullres/fold_0/plans.json",
            "3d_fullres/fold_0/checkpoint_final.pt", "3d_fullres/fold_0/validation/summary.json",
            "3d_fullres/fold_0/progress.png"} <= names
    assert manifest["configuration"] == "3d_fullres" and manifest["folds"] == {"3d_fullres": ["0"]}
    assert manifest["labels"] == {"background": 0, "outer": 1, "core": 2} and manifest["channel_names"] == ["MRI"]
    assert manifest["torch_version"] == torch.__version__ and manifest["automedseg_version"]
    assert manifest["postprocessing"] == "3d_fullres/postprocessing.json" and manifest["onnx"] is None
    ckpt = torch.load(tmp_path / "3d_fullres/fold_0/checkpoint_final.pt", weights_only=True)
    original = torch.load(work / "3d_fullres/fold_0/checkpoint_final.pt", weights_only=True)["model"]
    assert list(ckpt) == ["model"] and all(torch.equal(ckpt["model"][k], v) for k, v in original.items())
    assert best["configuration"] == "3d_fullres" and best["mean_dice"] is not None
    assert best["predict_command"].endswith("--model MODEL.zip")


@pytest.mark.parametrize(("args", "message"), [
    (["-c", "2d"], "no trained folds"),
    (["-f", "3"], "fold_3: no trained checkpoint"),
    (["-c", "../x"], "is not a configuration name"),
    (["--existing"], "exists; pass --overwrite"),
    (["--no-find-best"], "find_best.json: missing"),
    (["--tar"], "a model bundle is a .zip file"),
])
def test_export_refusals(trained_demo_best: tuple[Path, Path], tmp_path: Path, args: list[str], message: str) -> None:
    dataset, work = trained_demo_best
    output = tmp_path / ("model.tar" if args == ["--tar"] else "model.zip")
    if args == ["--existing"]:
        output.write_bytes(b"keep me")
    if args == ["--no-find-best"]:
        work = _light_copy(work, tmp_path / "work")
        (work / "find_best.json").unlink()
    options = [a for a in args if not a.startswith("--")]
    r = CliRunner().invoke(main, ["export", str(dataset), "--work-dir", str(work), "-o", str(output), *options])
    assert r.exit_code == 2 and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert (output.read_bytes() == b"keep me") if args == ["--existing"] else not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_export_another_configuration_than_find_best(trained_demo_best: tuple[Path, Path], tmp_path: Path) -> None:
    """-c overrides find-best's choice: the bundle's find_best.json says so and keeps the CV figures."""
    dataset, work = trained_demo_best
    work = _light_copy(work, tmp_path / "work")
    fb = json.loads((work / "find_best.json").read_text())
    fb["best"]["configuration"], fb["best"]["members"] = "2d", ["2d"]
    (work / "find_best.json").write_text(json.dumps(fb))
    zip_path = tmp_path / "m.zip"
    r = CliRunner().invoke(main, ["export", str(dataset), "--work-dir", str(work), "-o", str(zip_path),
                                  "-c", "3d_fullres", "-f", "0"])
    assert r.exit_code == 0, r.output
    with zipfile.ZipFile(zip_path) as zf:
        bundled = json.loads(zf.read("find_best.json"))
    assert bundled["best"]["configuration"] == "3d_fullres"
    assert bundled["best"]["mean_dice"] == fb["candidates"][0]["mean_dice"]
    assert "find-best chose 2d" in bundled["ranking_basis"] and bundled["candidates"] == fb["candidates"]
