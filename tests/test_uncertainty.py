"""Uncertainty maps and the least-certain list of ``predict --uncertainty`` (automedseg.uncertainty).

The models are planned from the tiny fixtures with random weights (two folds, so the folds disagree somewhere);
inference reads nothing else. Predictions run without test-time mirroring to stay quick.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner

import automedseg
from automedseg import uncertainty as U
from automedseg.cli import main
from automedseg.errors import InputError, LockedError
from automedseg.inference import SUMMARY_LOCK
from automedseg.locks import LOCK_NAME, folder_lock
from automedseg.network import build_network
from automedseg.plans import Plans

torch.set_num_threads(1)


def _second_fold(work: Path, configuration: str) -> None:
    """fold_1 beside the fixture's fold_0: the same plan, other random weights."""
    fold0 = work / configuration / "fold_0"
    fold1 = Path(shutil.copytree(fold0, fold0.with_name("fold_1")))
    plans = Plans.load(fold1 / "plans.json")
    config = plans.configurations[configuration]
    torch.manual_seed(1)
    model = build_network(config.network, in_channels=len(plans.channel_names), num_classes=plans.num_classes,
                          dims=config.dims)
    torch.save({"model": model.state_dict()}, fold1 / "checkpoint_final.pt")


def _same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()


def test_entropy_and_disagreement() -> None:
    probs = np.array([[1.0, 0.5, 1 / 3], [0.0, 0.5, 1 / 3], [0.0, 0.0, 1 / 3]], np.float32)
    np.testing.assert_allclose(U.normalized_entropy(probs), [0.0, np.log(2) / np.log(3), 1.0], atol=1e-6)
    assert U.normalized_entropy(probs).dtype == np.float32
    members = [np.array([0, 1, 2, 2]), np.array([0, 0, 2, 1]), np.array([1, 0, 2, 0])]
    np.testing.assert_allclose(U.fold_disagreement(members, np.array([0, 0, 2, 2])), [1 / 3, 1 / 3, 0.0, 2 / 3])
    with pytest.raises(ValueError, match="at least 2"):
        U.normalized_entropy(np.ones((1, 3)))


def test_predict_with_uncertainty(write_nnunet_dataset, untrained_model, tmp_path: Path) -> None:  # noqa: ANN001
    ds = write_nnunet_dataset(tmp_path / "Dataset003_U", n_test=2, oblique_every=2)  # test case 5: oblique
    work = untrained_model(ds.root, tmp_path / "work", "3d_fullres")
    _second_fold(work, "3d_fullres")
    images, out, plain = ds.root / "imagesTs", tmp_path / "pred", tmp_path / "plain"
    r = CliRunner().invoke(main, ["predict", "-i", str(images), "-o", str(out), "-d", str(work), "-c", "3d_fullres",
                                  "--no-mirror", "--device", "cpu", "--uncertainty", "--save-probabilities"])
    assert r.exit_code == 0, r.output
    assert "uncertainty of 2 case(s); least certain first: " in r.output and str(out / U.SUMMARY_FILE) in r.output
    automedseg.predict(images, model=work, output_dir=plain, configuration="3d_fullres", mirror=False,
                       device="cpu", save_probabilities=True, log=None)
    for case in ds.test_ids:
        source = sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))
        mask = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        # the mask and probabilities are those of predict without --uncertainty
        assert np.array_equal(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(
            sitk.ReadImage(str(plain / f"{case}.nii.gz"))))
        with np.load(out / f"{case}.npz") as a, np.load(plain / f"{case}.npz") as b:
            assert np.array_equal(a["probabilities"], b["probabilities"])
            assert a["label_values"].tolist() == [0, 1, 2]
        record = U.read_artifact(U.CaseUncertainty, out / U.UNCERTAINTY_DIR / f"{case}.json")
        assert record.members == 2 and record.entropy_map == f"{case}_entropy.nii.gz"
        fg = sitk.GetArrayFromImage(mask) != 0
        for name in (record.entropy_map, record.disagreement_map):
            image = sitk.ReadImage(str(out / U.UNCERTAINTY_DIR / name))
            _same_geometry(image, source)
            assert image.GetPixelID() == sitk.sitkFloat32
            values = sitk.GetArrayFromImage(image)
            assert values.min() >= 0 and values.max() <= 1
            if name == record.disagreement_map:
                assert set(np.unique(values).tolist()) <= {0.0, 0.5, 1.0}
                assert record.mean_disagreement == pytest.approx(values.mean(), abs=1e-6)
            elif fg.any():
                assert record.mean_entropy_foreground == pytest.approx(values[fg].mean(), abs=1e-5)
    summary = U.read_uncertainty_summary(out)
    assert sorted(c.case for c in summary.cases) == sorted(ds.test_ids) and summary.without_maps == ()
    assert summary.cases == tuple(U.least_certain_first(summary.cases))
    assert all(c.mean_disagreement > 0 for c in summary.cases)  # the two random folds disagree somewhere
    # kept masks without maps are listed; the report lists the least certain cases
    again = automedseg.predict(images, model=work, output_dir=plain, configuration="3d_fullres", mirror=False,
                               device="cpu", uncertainty=True, log=None)
    assert sorted(again.skipped_existing) == sorted(ds.test_ids)
    assert U.read_uncertainty_summary(plain / U.SUMMARY_FILE).without_maps == tuple(ds.test_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = CliRunner().invoke(main, ["report", str(work), "--predictions", str(out), "-o", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Uncertainty" in md and f"| 1 | {summary.cases[0].case} |" in md


def test_two_d_maps_are_tiff_with_the_image_size(png_gray, untrained_model, tmp_path: Path) -> None:  # noqa: ANN001
    work = untrained_model(png_gray.root, tmp_path / "work", "2d")
    out = tmp_path / "pred"
    automedseg.predict(png_gray.root / "imagesTs", model=work, output_dir=out, configuration="2d", mirror=False,
                       device="cpu", uncertainty=True, log=None)
    case = png_gray.test_ids[0]
    source = sitk.ReadImage(str(png_gray.root / "imagesTs" / f"{case}_0000.png"))
    entropy = sitk.ReadImage(str(out / U.UNCERTAINTY_DIR / f"{case}_entropy.tif"))
    assert entropy.GetSize() == source.GetSize() and entropy.GetPixelID() == sitk.sitkFloat32
    assert U.read_uncertainty_summary(out).cases[0].members == 1
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(out / U.UNCERTAINTY_DIR / f"{case}_disagreement.tif"))).any()


def test_bad_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="uncertainty: only with output_dir"):
        automedseg.predict(np.zeros((4, 8, 8), np.float32), model=tmp_path, uncertainty=True)
    with pytest.raises(InputError, match=f"{tmp_path / U.SUMMARY_FILE}: missing"):
        U.read_uncertainty_summary(tmp_path)
    folder = tmp_path / U.UNCERTAINTY_DIR
    folder.mkdir()
    (folder / "a.json").write_text('{"case": "a"}')
    with pytest.raises(InputError, match=r"uncertainty/a\.json: missing field"):
        U.write_uncertainty_summary(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    r = CliRunner().invoke(main, ["report", str(work), "--work-dir", str(work), "--predictions", str(tmp_path)])
    assert r.exit_code == 2 and f"{tmp_path / U.SUMMARY_FILE}: missing" in r.output
    summary = U.UncertaintySummary(cases=(dataclasses.replace(
        U.case_uncertainty("b", entropy=np.zeros(2), disagreement=np.zeros(2), segmentation=np.zeros(2), members=1)),))
    assert summary.describe() == "uncertainty of 1 case(s); least certain first: b (no foreground)"


def test_parts_predicted_into_one_folder_leave_one_summary_of_all(write_nnunet_dataset, untrained_model,  # noqa: ANN001
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ds = write_nnunet_dataset(tmp_path / "Dataset004_Parts", n_test=2)
    work = untrained_model(ds.root, tmp_path / "work", "3d_fullres")
    out = tmp_path / "pred"
    write, locked = U.write_uncertainty_summary, []

    def while_locked(output_dir: Path, **kwargs: object) -> U.UncertaintySummary:
        for name in (SUMMARY_LOCK, LOCK_NAME):  # the part writing the summary holds the summary and its part
            with pytest.raises(LockedError), folder_lock(output_dir, purpose="another run", name=name):
                pass
        locked.append(Path(output_dir))
        return write(output_dir, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(U, "write_uncertainty_summary", while_locked)
    done: list[str] = []
    for part in (0, 1):
        report = automedseg.predict(ds.root / "imagesTs", model=work, output_dir=out, configuration="3d_fullres",
                                    mirror=False, device="cpu", uncertainty=True, num_parts=2, part_id=part, log=None)
        assert len(report.written) == 1 and report.written[0] not in done
        done += report.written
        summary = U.read_uncertainty_summary(out)
        assert sorted(c.case for c in summary.cases) == sorted(done) and summary.without_maps == ()
    assert sorted(done) == sorted(ds.test_ids) and locked == [out, out]
    assert summary.cases == tuple(U.least_certain_first(summary.cases))


def test_the_summary_keeps_every_part_s_cases_without_maps(tmp_path: Path) -> None:
    def record(case: str) -> None:
        U.write_artifact(tmp_path / U.UNCERTAINTY_DIR / f"{case}.json", U.case_uncertainty(
            case, entropy=np.array([0.2]), disagreement=np.array([0.0]), segmentation=np.array([1]), members=1))

    record("a")
    assert U.write_uncertainty_summary(tmp_path, cases=["a", "x"]).without_maps == ("x",)
    record("b")
    both = U.write_uncertainty_summary(tmp_path, cases=["b", "y"])
    assert [c.case for c in both.cases] == ["a", "b"] and both.without_maps == ("x", "y")
    record("x")  # predicted again with --overwrite --uncertainty: it has maps now
    assert U.write_uncertainty_summary(tmp_path).without_maps == ("y",)
    (tmp_path / U.SUMMARY_FILE).write_text("{oops")  # a damaged summary is rebuilt from the records
    rebuilt = U.write_uncertainty_summary(tmp_path, cases=["z"])
    assert [c.case for c in rebuilt.cases] == ["a", "b", "x"] and rebuilt.without_maps == ("z",)
