"""The Python API (automedseg.api): the README's notebook example runs as written, each function does what its
command does, the package imports it lazily, and the API reference builds from the docstrings without warnings.

Models are the session's briefly trained demo (shared: copied before anything changes in it); predictions run
without test-time mirroring where the example does not prescribe it, to stay quick.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import automedseg
from automedseg import calibration_step, planning
from automedseg.errors import InputError
from automedseg.inference import FolderReport
from automedseg.metrics import EvaluationSummary
from automedseg.plans import Plans
from automedseg.predictor import Predictor
from automedseg.training_options import FoldResult

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TABLE = ((8, 210.0), (16, 610.0), (32, 1000.0), (64, 1400.0))  # a calibration, so no test times this machine
WIDTHS = ((8, 100.0), (16, 220.0), (32, 300.0))
STEPS = calibration_step.CalibratedSteps(WIDTHS, WIDTHS, ((2, "w32 128x128 b2", 120.0),))  # the timed training steps
FAST = dict(epochs=1, iterations_per_epoch=2, workers=0, threads=1, device="cpu")  # as the session's demo fold


def readme_example() -> str:
    """The fenced Python block after the ``api-example`` marker of README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.count("<!-- api-example") == 1
    return text.split("<!-- api-example", 1)[1].split("```python\n", 1)[1].split("\n```", 1)[0] + "\n"


def _set(code: str, prefix: str, line: str) -> str:
    """``code`` with its one line starting with ``prefix`` replaced by ``line``."""
    lines = code.splitlines()
    hits = [i for i, text in enumerate(lines) if text.startswith(prefix)]
    assert len(hits) == 1, (prefix, code)
    lines[hits[0]] = line
    return "\n".join(lines) + "\n"


def test_the_readme_example_runs(write_nnunet_dataset, tmp_path: Path,  # noqa: ANN001
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    code = readme_example()
    assert len(code.splitlines()) <= 15
    # A tiny dataset (8 x 24 x 24 volumes) whose test case has the name of the demo's first one.
    dataset = write_nnunet_dataset(tmp_path / "Dataset_Demo", prefix="demo").root
    (dataset / "imagesTs" / "demo_005_0000.nii.gz").rename(dataset / "imagesTs" / "demo_024_0000.nii.gz")
    test_image = sitk.ReadImage(str(dataset / "imagesTs" / "demo_024_0000.nii.gz"))
    # Only the data and the length of the fold differ from the README: these two lines are set here.
    code = _set(code, "dataset, work = ", f"dataset, work = {str(dataset)!r}, {str(tmp_path / 'work')!r}")
    code = _set(code, "quick = ", f"quick = dict(validate=False, **{FAST!r})")
    monkeypatch.setattr(planning, "calibrate_conv_gflops", lambda **_: TABLE)
    monkeypatch.setattr(calibration_step, "calibrate_steps", lambda **_: STEPS)
    monkeypatch.setattr(calibration_step, "calibrate_placement", lambda **_: ("shared", (("shared", 0.3),)))
    monkeypatch.setenv("AUTOMEDSEG_CALIBRATION", str(tmp_path / "calibration.json"))
    namespace: dict = {}
    exec(compile(code, "README.md (api-example)", "exec"), namespace)  # noqa: S102 - the README's own example
    assert isinstance(namespace["plans"], Plans) and isinstance(namespace["fold"], FoldResult)
    assert isinstance(namespace["model"], Predictor) and namespace["fold"].epochs_run == 1
    mask, labels = namespace["mask"], namespace["labels"]
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(mask, get)() == getattr(test_image, get)()
    assert labels.shape == (8, 24, 24) and np.array_equal(labels, sitk.GetArrayFromImage(mask))


def test_plan_returns_the_plan_it_writes(nnunet_3d, tmp_path: Path) -> None:  # noqa: ANN001
    lines: list[str] = []
    plans = automedseg.plan(nnunet_3d.root, work_dir=tmp_path / "work", time_budget="10m", configurations=["2d"],
                            device="reference-cpu-2core", jobs=1, preprocess=False, calibration_cache=False,
                            log=lines.append)
    assert plans == Plans.load(tmp_path / "work" / "plans.json") and list(plans.configurations) == ["2d"]
    assert plans.configurations["2d"].training.time_budget_s == 600.0
    assert any(line.startswith("fingerprint: 5 cases") for line in lines)
    assert not (tmp_path / "work" / "preprocessed").exists()
    with pytest.raises(InputError, match="dataset folder does not exist"):
        automedseg.plan(tmp_path / "nx", work_dir=tmp_path / "w2")
    with pytest.raises(InputError, match="'soon' is not a duration like 90s"):
        automedseg.plan(nnunet_3d.root, work_dir=tmp_path / "w2", time_budget="soon")
    with pytest.raises(InputError, match="must be longer than 0"):
        automedseg.plan(nnunet_3d.root, work_dir=tmp_path / "w2", time_budget=0)
    assert not (tmp_path / "w2").exists()


def test_train_finds_the_work_folder_and_returns_the_fold(trained_demo_validated: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    dataset, shared = trained_demo_validated
    work = Path(shutil.copytree(shared, tmp_path / "work"))
    lines: list[str] = []
    result = automedseg.train(dataset, work_dir=work, validate=False, log=lines.append, **FAST)  # dataset + work
    assert isinstance(result, FoldResult) and result.fold_dir == work / "3d_fullres" / "fold_0"
    assert result.epochs_run == 1 and result.validation is None
    assert any("already trained" in line for line in lines)
    again = automedseg.train(work, configuration="3d_fullres", fold=0, validate=False, log=None, **FAST)
    assert again.fold_dir == result.fold_dir and again.best_ema_dice == result.best_ema_dice  # the work folder
    with pytest.raises(InputError, match="no plan yet"):
        automedseg.train(tmp_path / "empty")
    with pytest.raises(InputError, match="augment_on 'gpu': use auto, device or workers"):
        automedseg.train(work, augment_on="gpu")
    with pytest.raises(InputError, match="not a duration"):
        automedseg.train(work, time_budget="later")


def _same_image(a: sitk.Image, b: sitk.Image) -> bool:
    return all(getattr(a, g)() == getattr(b, g)() for g in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection")) \
        and np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


def test_load_model_predicts_the_masks_predict_writes(trained_demo_best: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, work = trained_demo_best
    images = dataset / "imagesTs"
    report = automedseg.predict(images, model=work, output_dir=tmp_path / "masks", mirror=False, log=None)
    assert isinstance(report, FolderReport) and len(report.written) == 2 and not report.failed
    notes: list[str] = []
    model = automedseg.load_model(work, device="cpu", log=notes.append)  # find_best.json's choice
    post = json.loads((work / "3d_fullres" / "postprocessing.json").read_text())
    assert model.configuration == "3d_fullres" and notes == [
        f"post-processing from {work / '3d_fullres' / 'postprocessing.json'}: "
        f"{'; '.join(model.postprocessing) or 'none'}"] and isinstance(post, dict)
    case = sorted(report.written)[0]
    image = sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))
    assert _same_image(model.predict(image, mirror=False), sitk.ReadImage(str(tmp_path / "masks" / f"{case}.nii.gz")))
    # the same in memory through predict, with the model loaded or named by its dataset folder
    masks = automedseg.predict(images, model=model, mirror=False)
    assert sorted(masks) == sorted(report.written)
    for name, labels in masks.items():
        written = sitk.ReadImage(str(tmp_path / "masks" / f"{name}.nii.gz"))
        assert np.array_equal(labels, sitk.GetArrayFromImage(written))
    array = sitk.GetArrayFromImage(image)
    (listed,) = automedseg.predict([array], model=work, spacing_mm=image.GetSpacing()[::-1], mirror=False, log=None)
    assert np.array_equal(listed, masks[case])


def test_load_model_from_a_bundle(trained_demo_best: tuple[Path, Path], tmp_path: Path) -> None:
    from automedseg.bundle_export import export_model
    from automedseg.workspace import Workspace

    dataset, work = trained_demo_best
    bundle = tmp_path / "model.zip"
    export_model(Workspace(work), bundle)
    from_bundle = automedseg.load_model(bundle, device="cpu", log=None)
    from_work = automedseg.load_model(work, device="cpu", log=None)
    assert from_bundle.configuration == from_work.configuration and from_bundle.labels == from_work.labels
    image = sitk.ReadImage(str(sorted((dataset / "imagesTs").iterdir())[0]))
    assert _same_image(from_bundle.predict(image, mirror=False), from_work.predict(image, mirror=False))


def test_what_load_model_and_predict_refuse(trained_demo_validated: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, work = trained_demo_validated
    with pytest.raises(InputError, match="no such work folder, dataset folder or model bundle"):
        automedseg.load_model(tmp_path / "nx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a model: no plans.json"):
        automedseg.load_model(tmp_path / "empty")
    with pytest.raises(InputError, match="find_best.json: missing; pass -c CONFIGURATION"):
        automedseg.load_model(work)  # no find-best yet: name the configuration
    with pytest.raises(FileNotFoundError, match="fold_3: no trained checkpoint"):
        automedseg.load_model(work, configuration="3d_fullres", folds=[3])
    model = automedseg.load_model(work, configuration="3d_fullres", device="cpu", log=None)
    volume = np.zeros((4, 20, 20), np.float32)
    with pytest.raises(InputError, match="output_dir: files are written for a folder of images"):
        automedseg.predict(volume, model=work, output_dir=tmp_path / "out")
    with pytest.raises(InputError, match="output_dir: pass the model as a path"):
        automedseg.predict(dataset / "imagesTs", model=model, output_dir=tmp_path / "out")
    with pytest.raises(InputError, match="overlays, num_parts: only with output_dir"):
        automedseg.predict(volume, model=model, overlays=True, num_parts=2)
    with pytest.raises(InputError, match="configuration: set when the model is loaded"):
        automedseg.predict(volume, model=model, configuration="2d")
    with pytest.raises(InputError, match="spacing_mm: image files carry their own spacing"):
        automedseg.predict(dataset / "imagesTs", model=model, spacing_mm=(1, 1, 1))
    with pytest.raises(InputError, match="input folder does not exist"):
        automedseg.predict(tmp_path / "nx", model=work, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_evaluate_returns_a_typed_summary(nnunet_3d, tmp_path: Path) -> None:  # noqa: ANN001
    masks = Path(shutil.copytree(nnunet_3d.root / "labelsTr", tmp_path / "masks"))
    (masks / f"{nnunet_3d.case_ids[-1]}.nii.gz").unlink()
    summary = automedseg.evaluate(nnunet_3d.root / "labelsTr", masks, output_dir=tmp_path / "scores")
    assert isinstance(summary, EvaluationSummary)
    assert summary.labels == (1, 2) and summary.n_cases == len(nnunet_3d.case_ids) - 1 and summary.mean_dice == 1.0
    assert summary.per_label[2]["hd95"] == 0.0 and summary.missing_predictions == (f"{nnunet_3d.case_ids[-1]}.nii.gz",)
    assert [c.case for c in summary.per_case] == nnunet_3d.case_ids[:-1] and summary.output_dir == tmp_path / "scores"
    written = json.loads((tmp_path / "scores" / "metrics_summary.json").read_text())
    assert written["per_label"]["1"]["dice"] == 1.0 and written["missing_predictions"] == list(
        summary.missing_predictions)
    assert EvaluationSummary.from_dict(summary.to_dict(), output_dir=summary.output_dir) == summary
    only = automedseg.evaluate(nnunet_3d.root / "labelsTr", masks, labels=[2], tolerance_mm=2.0)
    assert only.labels == (2,) and only.tolerance_mm == 2.0 and only.output_dir == masks
    with pytest.raises(InputError, match="prediction folder does not exist"):
        automedseg.evaluate(nnunet_3d.root / "labelsTr", tmp_path / "nx")


def test_the_package_imports_the_api_lazily() -> None:
    code = ("import sys, automedseg; heavy = lambda: sorted(m for m in ('torch', 'numpy', 'SimpleITK') if m in "
            "sys.modules); print(heavy()); assert 'load_model' in dir(automedseg); "
            "assert automedseg.duration_seconds('2m') == 120.0; print(heavy()); "
            "import automedseg.api as api; assert automedseg.plan is api.plan and automedseg.predict is api.predict")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.split() == ["[]", "[]"], r.stdout + r.stderr
    assert automedseg.Predictor is Predictor and automedseg.FoldResult is FoldResult and automedseg.Plans is Plans
    assert set(automedseg.__all__) <= set(dir(automedseg))
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        automedseg.nothing  # noqa: B018


def test_the_type_hints_and_the_kernel_source_are_shipped() -> None:
    tomllib = pytest.importorskip("tomllib")  # (Python >= 3.11)
    shipped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for name in ("py.typed", "fused_norm.c"):  # the fused norm is compiled from its source on the user's machine
        assert (ROOT / "automedseg" / name).is_file() and name in shipped["automedseg"]


def test_the_api_reference_builds_without_warnings(tmp_path: Path) -> None:
    pytest.importorskip("pdoc")
    import pdoc
    import pdoc.render

    pdoc.render.configure(docformat="google")  # as `python -m pdoc -d google -o docs/api automedseg`
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pdoc.pdoc("automedseg", output_directory=tmp_path)
    finally:
        pdoc.render.configure()
    assert [str(w.message) for w in caught if "pdoc" in w.filename] == []
    page = (tmp_path / "automedseg.html").read_text(encoding="utf-8")
    for name in automedseg.__all__:
        if name != "__version__":
            assert f'id="{name}"' in page, name
    assert 'id="Predictor.predict"' in page and "spacing_mm" in page
