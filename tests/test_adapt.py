"""``automedseg adapt``: fine-tuning to a new site (encoder frozen first) and intensity matching without labels.

One tiny source model is trained per module (5 planted cases, a (8, 16, 32) network, 60 iterations); the new site
inverts the contrast inside the body, which a model trained on the source fails on and a short fine-tune fixes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from automedseg.adapt import FreezeSchedule, adapt, read_adapt_record, source_checkpoint
from automedseg.plans import Plans
from automedseg.training_options import TrainOptions
from automedseg.workspace import Workspace

torch.set_num_threads(1)

CONFIG = "3d_fullres"
SPACING = (1.0, 1.0, 1.0)


def _quiet(_: str) -> None:
    pass


def _new_site(image: np.ndarray) -> np.ndarray:
    """The other site: contrast inverted inside the body (outer 60 -> 200, body 100 -> 160, inner 150 -> 110)."""
    out = image.copy()
    body = out != 0
    out[body] = 260.0 - out[body]
    return out


def _cases(seed: int, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from conftest import planted_case

    rng = np.random.default_rng(seed)
    return [planted_case(rng) for _ in range(n)]


def _write_target(root: Path, cases: list[tuple[np.ndarray, np.ndarray]], *,
                  labels: dict[str, int] | None = None) -> Path:
    from conftest import _write_json, _write_volume

    for i, (image, label) in enumerate(cases):
        _write_volume(root / "imagesTr" / f"site_{i:03d}_0000.nii.gz", image, spacing_zyx=SPACING)
        _write_volume(root / "labelsTr" / f"site_{i:03d}.nii.gz", label, spacing_zyx=SPACING)
    _write_json(root, {"name": "Site", "channel_names": {"0": "T2"}, "numTraining": len(cases),
                       "labels": labels or {"background": 0, "outer": 1, "inner": 2}, "file_ending": ".nii.gz"})
    return root


def _dice(model: Any, cases: list[tuple[np.ndarray, np.ndarray]]) -> float:
    scores = []
    for image, label in cases:
        seg = model.predict(image, spacing_mm=SPACING, mirror=False)
        for k in (1, 2):
            p, r = seg == k, label == k
            scores.append(2.0 * (p & r).sum() / max(1, p.sum() + r.sum()))
    return float(np.mean(scores))


def _model(work: Path, fold: str) -> Any:
    import automedseg

    return automedseg.load_model(work, configuration=CONFIG, folds=[fold], device="cpu", log=None)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """Fold 0 of a tiny model trained on 5 planted cases (4 in fold 0), unshifted."""
    from conftest import _nnunet_dataset

    from automedseg.pipeline import run_plan
    from automedseg.training import train_fold

    root = tmp_path_factory.mktemp("adapt_source")
    dataset = _nnunet_dataset(root / "Dataset_Src", n_cases=5, n_test=0, oblique_every=0, spacing_zyx=SPACING)
    ws = Workspace(root / "work")
    plans = run_plan(dataset.root, ws, configurations=[CONFIG], jobs=1, device="reference-cpu-2core",
                     time_budget_s=60.0, log=_quiet)
    config = plans.configuration(CONFIG)
    tiny = dataclasses.replace(
        config, network=dataclasses.replace(config.network, features_per_stage=(8, 16, 32)),
        training=dataclasses.replace(config.training, val_iterations=2, num_workers=0))
    dataclasses.replace(plans, configurations={CONFIG: tiny}).save(ws.plans_path)  # same cache key
    train_fold(ws, CONFIG, 0, options=TrainOptions(device="cpu", epochs=3, iterations_per_epoch=20, threads=1,
                                                   validate=False, progress=False, trackers=()), log=_quiet)
    return ws


def test_adapt_improves_dice_on_the_new_site(source: Workspace, tmp_path: Path) -> None:
    test_cases = _cases(12, 3)
    shifted = [(_new_site(image), label) for image, label in test_cases]
    before_model = _model(source.root, "0")
    assert _dice(before_model, test_cases) > 0.8  # the source model works on its own site ...
    before = _dice(before_model, shifted)
    assert before < 0.5  # ... and fails on the other one
    target = _write_target(tmp_path / "Dataset_Site", [(_new_site(i), lab) for i, lab in _cases(11, 5)])
    result = adapt(source, target, tmp_path / "adapted", folds=["all"], source_fold=0, time_budget_s=None,
                   epochs=5, iterations_per_epoch=20, device="cpu", threads=1, workers=0, jobs=1, validate=False,
                   trackers=(), log=_quiet)
    after = _dice(_model(result.work_dir, "all"), shifted)
    assert after > before + 0.3 and after > 0.7, (before, after)
    record = read_adapt_record(tmp_path / "adapted" / "adapt.json")
    assert record.target_cases == 5 and record.freeze_fraction == 0.3 and record.lr_factor == 0.1
    assert record.folds["all"].source_checkpoint == str(source_checkpoint(source.fold_dir(CONFIG, 0)).resolve())
    adapted = Plans.load(tmp_path / "adapted" / "plans.json").configuration(CONFIG)
    assert "encoder frozen" in adapted.notes[-1]
    assert adapted.network == Plans.load(source.plans_path).configuration(CONFIG).network  # the source plan, frozen
    history = [json.loads(line) for line in (result.work_dir / CONFIG / "fold_all" / "log.jsonl").read_text()
               .splitlines()]
    lr0 = Plans.load(source.plans_path).configuration(CONFIG).training.initial_lr
    frozen = FreezeSchedule(fraction=0.3, lr_factor=0.1).frozen_epochs(5)
    assert frozen == 2 and len(history) == 5
    assert [h["lr"] for h in history[:frozen + 1]] == pytest.approx([lr0, lr0, 0.1 * lr0])


def test_encoder_is_frozen_first_then_every_layer_trains(source: Workspace, tmp_path: Path) -> None:
    from automedseg.training import train_fold

    schedule = FreezeSchedule(fraction=0.34, lr_factor=0.5)
    seen: list[tuple[dict[str, torch.Tensor], bool]] = []

    def hook(epoch: int, planned: int, net: torch.nn.Module) -> None:
        schedule.before_epoch(epoch, planned, net)
        encoder_grad = all(p.requires_grad for n, p in net.named_parameters() if n.startswith("encoder."))
        seen.append(({k: v.detach().clone() for k, v in net.state_dict().items()}, encoder_grad))

    out = tmp_path / "frozen"
    train_fold(source, CONFIG, 1, options=TrainOptions(
        device="cpu", epochs=3, iterations_per_epoch=3, threads=1, validate=False, progress=False, trackers=(),
        output_dir=out, pretrained=source_checkpoint(source.fold_dir(CONFIG, 0)), lr_schedule=schedule.lr,
        epoch_hook=hook), log=_quiet)
    final = torch.load(out / "checkpoint_final.pt", map_location="cpu", weights_only=True)["model"]
    start, after_frozen = seen[0][0], seen[1][0]
    assert [grad for _, grad in seen] == [False, True, True]
    encoder = [k for k in start if k.startswith("encoder.")]
    decoder = [k for k in start if k.startswith("decoder.")]
    assert encoder and decoder
    assert all(torch.equal(start[k], after_frozen[k]) for k in encoder)  # epoch 0: not one encoder value moved
    assert any(not torch.equal(start[k], after_frozen[k]) for k in decoder)  # ... while the decoder trained
    assert any(not torch.equal(after_frozen[k], final[k]) for k in encoder)  # then the encoder trains too
    lrs = [json.loads(line)["lr"] for line in (out / "log.jsonl").read_text().splitlines()]
    initial = Plans.load(source.plans_path).configuration(CONFIG).training.initial_lr
    assert lrs[0] == pytest.approx(initial) and lrs[1] == pytest.approx(0.5 * initial) and lrs[2] < lrs[1]


def test_freeze_schedule_stays_unfrozen_when_the_epochs_are_refitted() -> None:
    s = FreezeSchedule(fraction=0.5, lr_factor=0.1)
    net = torch.nn.Module()
    net.encoder = torch.nn.Linear(2, 2)
    net.decoder = torch.nn.Linear(2, 2)
    s.before_epoch(0, 4, net)
    assert not net.encoder.weight.requires_grad and net.decoder.weight.requires_grad
    s.before_epoch(2, 4, net)
    assert net.encoder.weight.requires_grad
    s.before_epoch(3, 20, net)  # the budget refit made the run longer: the encoder is not frozen again
    assert net.encoder.weight.requires_grad and s.lr(3, 20, 1.0) <= 0.1
    with pytest.raises(ValueError, match="freeze-fraction"):
        FreezeSchedule(fraction=1.0, lr_factor=0.1)


@pytest.mark.parametrize(("labels", "channels", "field"), [
    ({"background": 0, "outer": 1, "core": 2}, ("T2",), "labels"),
    (None, ("T1", "T2"), "channel_names"),
])
def test_mismatched_target_is_refused_with_the_file_named(source: Workspace, tmp_path: Path,
                                                          labels: dict[str, int] | None, channels: tuple[str, ...],
                                                          field: str) -> None:
    from conftest import _nnunet_dataset

    from automedseg.cli import main

    target = _nnunet_dataset(tmp_path / "Dataset_Bad", n_test=0, labels=labels, channel_names=channels)
    r = CliRunner().invoke(main, ["adapt", str(source.root), str(target.root), "--work-dir", str(tmp_path / "w")])
    assert r.exit_code == 2, r.output
    assert str(target.root / "dataset.json") in r.output and f": {field} " in r.output
    assert not (tmp_path / "w").exists()  # refused before anything is written


def test_adapt_needs_something_to_do(source: Workspace, tmp_path: Path) -> None:
    from automedseg.cli import main

    r = CliRunner().invoke(main, ["adapt", str(source.root), "--work-dir", str(tmp_path / "w")])
    assert r.exit_code == 2 and "nothing to do" in r.output


def test_unlabelled_site_matching_in_the_plan_equals_predict_match_intensities(
        source: Workspace, tmp_path: Path, write_volume: Callable[..., Path]) -> None:
    from automedseg.cli import main

    images = tmp_path / "site_images"
    for i, (image, _) in enumerate(_cases(13, 2)):
        gamma = image.copy()
        gamma[gamma != 0] = 0.05 * gamma[gamma != 0] ** 1.6  # a monotone site change
        write_volume(images / f"site_{i:03d}_0000.nii.gz", gamma, spacing_zyx=SPACING)
    runner = CliRunner()
    work = tmp_path / "matched"
    r = runner.invoke(main, ["adapt", str(source.root), "--work-dir", str(work), "-f", "0", "--match-intensities"])
    assert r.exit_code == 0, r.output
    config = Plans.load(work / "plans.json").configuration(CONFIG)
    assert all(n.landmarks is not None and len(n.landmarks) == 7 for n in config.normalization)
    assert (work / CONFIG / "fold_0" / source_checkpoint(source.fold_dir(CONFIG, 0)).name).is_file()
    assert read_adapt_record(work / "adapt.json").folds["0"].fine_tuned is False
    r = runner.invoke(main, ["predict", "-i", str(images), "-o", str(tmp_path / "by_plan"), "-d", str(work),
                             "-c", CONFIG, "--device", "cpu", "--no-mirror"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["predict", "-i", str(images), "-o", str(tmp_path / "by_flag"), "-d", str(source.root),
                             "-c", CONFIG, "-f", "0", "--device", "cpu", "--no-mirror", "--match-intensities"])
    assert r.exit_code == 0, r.output
    assert (source.root / "intensity_reference.json").is_file()
    import SimpleITK as sitk

    for i in range(2):
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / d / f"site_{i:03d}.nii.gz")))
                for d in ("by_plan", "by_flag"))
        assert np.array_equal(a, b) and (a > 0).any()
