"""benchmarks/site_shift.py: the simulated site shift is fixed and deterministic; the held-back split, the runs."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def bench(benchmark_module):
    return benchmark_module("site_shift")


def _image(seed: int, shape: tuple[int, int, int] = (10, 16, 12)) -> np.ndarray:
    image = np.zeros(shape, np.float32)
    image[1:-1, 2:-2, 2:-2] = np.random.default_rng(seed).uniform(5, 300, (shape[0] - 2, shape[1] - 4, shape[2] - 4))
    return image


def test_doctests(bench) -> None:
    assert doctest.testmod(bench, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


def test_shift_is_deterministic_and_fixed(bench) -> None:
    shift = bench.SiteShift()
    image = _image(0)
    a, b = bench.apply_site_shift(image, shift), bench.apply_site_shift(image.copy(), shift)
    assert np.array_equal(a, b) and a.dtype == np.float32
    assert np.all(a[image == 0] == 0) and np.all(a[image != 0] > 0)
    assert not np.allclose(a, image)
    other = bench.apply_site_shift(image, bench.SiteShift(seed=shift.seed + 1))
    assert not np.array_equal(a, other)  # the seed picks the field
    # the same field (in normalised coordinates) on every image: its log is bounded and smooth
    field = bench.bias_field((20, 30, 24), amplitude=0.4, seed=shift.seed)
    assert np.isclose(np.abs(np.log(field)).max(), 0.4)
    assert np.abs(np.diff(np.log(field), axis=1)).max() < 0.2
    coarse = bench.bias_field((10, 15, 12), amplitude=0.4, seed=shift.seed)
    assert np.abs(np.log(field[::2, ::2, ::2]) - np.log(coarse)).max() < 0.15


def test_gamma_is_a_monotone_non_linearity(bench) -> None:
    image = _image(1)
    out = bench.apply_site_shift(image, bench.SiteShift(gamma=2.0, bias_amplitude=0.0))
    fg = image != 0
    order = np.argsort(image[fg])
    assert np.all(np.diff(out[fg][order]) >= 0)
    ratio = out[fg] / image[fg]
    assert ratio.max() / ratio.min() > 5  # not a mere scaling, which the per-image z-score would undo


def test_hold_back_is_deterministic_and_disjoint(bench) -> None:
    ids = [f"hippocampus_{i:03d}" for i in range(60)]
    first = bench.hold_back(ids, n_test=10, n_target=20)
    assert first == bench.hold_back(list(reversed(ids)), n_test=10, n_target=20)
    source, pool, test = first
    assert not (set(source) & set(pool) or set(source) & set(test) or set(pool) & set(test))
    assert len(source) == 30
    with pytest.raises(ValueError, match="too few"):
        bench.hold_back(ids[:10], n_test=5, n_target=5)


def test_dry_run_lists_the_runs(bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    msd = tmp_path / "hippo"
    (msd / "labelsTr").mkdir(parents=True)
    for i in range(80):
        (msd / "labelsTr" / f"hippocampus_{i:03d}.nii.gz").write_bytes(b"")
    (msd / "dataset.json").write_text(json.dumps({"modality": {"0": "MRI"},
                                                  "labels": {"0": "background", "1": "Anterior", "2": "Posterior"}}))
    assert bench.main(["--dataset", str(msd), "--work-root", str(tmp_path / "w"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "20 source, 20 target pool, 40 test cases" in out
    assert "adapt 5" in out and "adapt 20" in out and "--match-intensities" in out
    assert "estimated CPU time" in out
    assert not (tmp_path / "w").exists()  # a dry run writes nothing
    assert bench._dataset_json(msd, 3)["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
