"""Precision-recall curves and average precision (automedseg.pr_curves) against scikit-learn on random data, and
their way through ``evaluate --probabilities`` into ``metrics_summary.json`` and the report."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from sklearn.metrics import average_precision_score, precision_recall_curve

from automedseg import metrics as M
from automedseg import pr_curves as P
from automedseg.api import evaluate
from automedseg.cli import main
from automedseg.errors import InputError


def _random(rng: np.random.Generator, n: int, *, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    truth = rng.random(n) < rng.uniform(0.05, 0.6)
    scores = np.clip(rng.normal(0.3 + 0.3 * truth, 0.2), 0, 1)  # informative but overlapping
    return (np.round(scores, 2) if ties else scores), truth


@pytest.mark.parametrize("seed", range(6))
def test_average_precision_is_scikit_learns(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores, truth = _random(rng, int(rng.integers(2, 4000)), ties=seed % 2 == 0)
    truth[0] = True  # at least one positive
    assert P.average_precision(scores, truth) == pytest.approx(average_precision_score(truth, scores), abs=1e-12)
    precision, recall, thresholds = P.precision_recall(scores, truth)
    sk_p, sk_r, sk_t = precision_recall_curve(truth, scores)  # increasing thresholds, then the point (1, 0)
    np.testing.assert_allclose(precision, sk_p[:-1][::-1], atol=1e-12)
    np.testing.assert_allclose(recall, sk_r[:-1][::-1], atol=1e-12)
    np.testing.assert_array_equal(thresholds, sk_t[::-1])


@pytest.mark.parametrize("seed", range(4))
def test_summed_float16_counts_give_scikit_learns_curve_of_all_voxels(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    cases = [_random(rng, int(rng.integers(1, 3000)), ties=seed % 2 == 1) for _ in range(3)]
    cases = [(s.astype(np.float16), t) for s, t in cases]
    total: dict[int, np.ndarray] = {}
    for scores, truth in cases:
        P.add_counts(total, {1: P.score_counts(scores, truth)})
    scores = np.concatenate([s for s, _ in cases]).astype(np.float64)
    truth = np.concatenate([t for _, t in cases])
    curve = P.curve_from_counts(total[1], max_points=None)
    assert curve.average_precision == pytest.approx(average_precision_score(truth, scores), abs=1e-12)
    assert (curve.positives, curve.negatives) == (int(truth.sum()), int((~truth).sum()))
    sk_p, sk_r, sk_t = precision_recall_curve(truth, scores)
    np.testing.assert_allclose(curve.precision, sk_p[:-1][::-1], atol=1e-12)
    np.testing.assert_allclose(curve.recall, sk_r[:-1][::-1], atol=1e-12)
    np.testing.assert_array_equal(curve.threshold, sk_t[::-1])
    # a thinned curve keeps the AP, its ends and at most MAX_CURVE_POINTS points
    thin = P.curve_from_counts(total[1])
    assert thin.average_precision == curve.average_precision
    assert 2 <= thin.points <= min(P.MAX_CURVE_POINTS, curve.points)
    assert thin.threshold[0] == curve.threshold[0] and thin.threshold[-1] == curve.threshold[-1]
    assert np.all(np.diff(thin.threshold) < 0) and np.all(np.diff(thin.recall) >= 0)


def test_a_million_voxels_are_counted_quickly_and_exactly() -> None:
    rng = np.random.default_rng(7)
    truth = rng.random(1_000_000) < 0.1
    scores = np.clip(rng.normal(0.2 + 0.5 * truth, 0.2), 0, 1).astype(np.float16)
    curve = P.curve_from_counts(P.score_counts(scores, truth))
    assert curve.average_precision == pytest.approx(average_precision_score(truth, scores.astype(np.float32)),
                                                    abs=1e-12)
    assert curve.points <= P.MAX_CURVE_POINTS


def test_edge_cases() -> None:
    none = P.curve_from_counts(P.score_counts(np.array([0.2, 0.7]), np.array([False, False])))
    assert none.average_precision is None and none.negatives == 2 and none.points == 0
    assert np.isnan(P.average_precision(np.array([0.5]), np.array([0])))
    perfect = P.curve_from_counts(P.score_counts(np.array([-0.0, 1.0]), np.array([False, True])))
    assert perfect.average_precision == 1.0 and perfect.threshold == (1.0, 0.0)  # -0.0 counts as 0
    with pytest.raises(ValueError, match=r"finite probabilities in \[0, 1\]"):
        P.score_counts(np.array([0.5, 1.5]), np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        P.precision_recall(np.array([np.nan, 0.5]), np.array([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        P.score_counts(np.zeros(3), np.zeros(4))


# --- evaluate --probabilities ------------------------------------------------------------------------------


def _write_case(ref_dir: Path, prob_dir: Path, case: str, rng: np.random.Generator, *, values: tuple[int, ...],
                store_values: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A reference (labels ``values``) and noisy float16 probabilities ``(K, Z, Y, X)``; both returned."""
    shape = (3, 10, 12)
    index = rng.integers(0, len(values), shape)
    logits = rng.normal(0, 1, (len(values), *shape)) + 2.0 * (np.arange(len(values))[:, None, None, None] == index)
    probs = (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float16)
    ref = np.asarray(values)[index]
    image = sitk.GetImageFromArray(ref.astype(np.uint8))
    image.SetSpacing((0.8, 0.8, 3.0))
    sitk.WriteImage(image, str(ref_dir / f"{case}.nii.gz"))
    extra = {"label_values": np.asarray(values)} if store_values else {}
    np.savez_compressed(prob_dir / f"{case}.npz", probabilities=probs, **extra)
    return ref, probs


@pytest.fixture
def evaluated(tmp_path: Path) -> tuple[Path, Path, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """References with labels 0, 1, 200 (not consecutive) as predictions too, and probabilities beside them."""
    folder = tmp_path / "cases"
    folder.mkdir()
    rng = np.random.default_rng(3)
    cases = [_write_case(folder, folder, f"c{i}", rng, values=(0, 1, 200)) for i in range(3)]
    ref = np.concatenate([r.ravel() for r, _ in cases])
    pooled = {label: (ref == label, np.concatenate([p[k].ravel() for _, p in cases]).astype(np.float64))
              for k, label in enumerate((0, 1, 200))}
    return folder, tmp_path / "out", pooled


def test_evaluate_with_probabilities_stores_each_labels_curve(evaluated) -> None:  # noqa: ANN001
    folder, out, pooled = evaluated
    summary = evaluate(folder, folder, output_dir=out, probabilities=folder)
    assert sorted(summary.pr_curves) == [1, 200]
    for label, curve in summary.pr_curves.items():
        truth, scores = pooled[label]
        assert curve.average_precision == pytest.approx(average_precision_score(truth, scores), abs=1e-12)
        assert curve.positives == int(truth.sum()) and 2 <= curve.points <= P.MAX_CURVE_POINTS
    assert summary.mean_average_precision == pytest.approx(
        np.mean([c.average_precision for c in summary.pr_curves.values()]))
    written = M.read_metrics_summary(out / M.METRICS_SUMMARY_FILE)  # the typed reader
    assert written.pr_curves == {str(k): c for k, c in summary.pr_curves.items()}
    assert written.average_precision_per_label() == {"1": summary.pr_curves[1].average_precision,
                                                     "200": summary.pr_curves[200].average_precision}
    assert M.EvaluationSummary.from_dict(summary.to_dict(), output_dir=out) == summary
    plain = evaluate(folder, folder, output_dir=out)  # without probabilities: no curves, none in the file
    assert plain.pr_curves == {} and "pr_curves" not in json.loads((out / M.METRICS_SUMMARY_FILE).read_text())
    assert M.read_metrics_summary(out / M.METRICS_SUMMARY_FILE).pr_curves is None


def test_probabilities_without_label_values_are_labels_0_to_k(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    ref, probs = _write_case(tmp_path, tmp_path, "a", rng, values=(0, 1, 2), store_values=False)
    summary = evaluate(tmp_path, tmp_path, labels=[2], output_dir=tmp_path / "out", probabilities=tmp_path)
    assert summary.pr_curves[2].average_precision == pytest.approx(
        average_precision_score(ref.ravel() == 2, probs[2].ravel().astype(np.float64)), abs=1e-12)
    with pytest.raises(InputError, match=r"a\.npz: no probability channel for label 7"):
        evaluate(tmp_path, tmp_path, labels=[7], output_dir=tmp_path / "out", probabilities=tmp_path)


def test_bad_probabilities_are_named(tmp_path: Path) -> None:
    folder, probs_dir = tmp_path / "cases", tmp_path / "probs"
    folder.mkdir()
    probs_dir.mkdir()
    rng = np.random.default_rng(5)
    _write_case(folder, probs_dir, "a", rng, values=(0, 1))
    _write_case(folder, tmp_path, "b", rng, values=(0, 1))  # its probabilities are elsewhere
    with pytest.raises(InputError, match=r"probs/b\.npz: missing"):
        evaluate(folder, folder, output_dir=tmp_path / "out", probabilities=probs_dir)
    np.savez(probs_dir / "b.npz", probabilities=np.zeros((2, 3, 10, 11), np.float16))
    with pytest.raises(InputError, match=r"b\.npz: probabilities of shape \(2, 3, 10, 11\); expected \(K, 3, 10, 12\)"):
        evaluate(folder, folder, output_dir=tmp_path / "out", probabilities=probs_dir)
    np.savez(probs_dir / "b.npz", probabilities=np.full((2, 3, 10, 12), 2.0, np.float16))
    with pytest.raises(InputError, match=r"b\.npz: scores must be finite probabilities"):
        evaluate(folder, folder, output_dir=tmp_path / "out", probabilities=probs_dir)
    (probs_dir / "b.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match=r"b\.npz: not a readable \.npz"):
        evaluate(folder, folder, output_dir=tmp_path / "out", probabilities=probs_dir)


def test_cli_evaluate_and_report_show_the_curves(evaluated, tmp_path: Path) -> None:  # noqa: ANN001
    folder, out, _ = evaluated
    runner = CliRunner()
    r = runner.invoke(main, ["evaluate", str(folder), str(folder), "-o", str(out), "--probabilities", str(folder)])
    assert r.exit_code == 0, r.output
    assert "label 1: Dice 1.0000" in r.output and "  AP 0." in r.output
    r = runner.invoke(main, ["evaluate", str(folder), str(folder), "--probabilities", str(tmp_path / "nx")])
    assert r.exit_code == 2 and f"{tmp_path / 'nx'}: probabilities folder does not exist" in r.output
    (folder / "c1.npz").unlink()
    r = runner.invoke(main, ["evaluate", str(folder), str(folder), "-o", str(out), "--probabilities", str(folder)])
    assert r.exit_code == 2 and f"{folder / 'c1.npz'}: missing" in r.output
    work = tmp_path / "work"
    work.mkdir()  # an empty work folder: the report lists what is missing and shows the evaluation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = runner.invoke(main, ["report", str(work), "--work-dir", str(work), "--evaluation", str(out)])
    assert r.exit_code == 0, r.output
    md = (work / "report" / "report.md").read_text()
    assert "## Precision-recall" in md and "| 200 | 0." in md
    assert len(list((work / "report").glob("fig_pr_0_*.png"))) == 1
    r = runner.invoke(main, ["report", str(work), "--work-dir", str(work), "--evaluation", str(folder)])
    assert r.exit_code == 2 and f"{folder / 'metrics_summary.json'}: missing" in r.output
