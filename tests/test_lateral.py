"""Lateralised labels: detected from the training labels, left out of the plan's mirroring (2D and 3D)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from automedseg.fingerprint import compute_fingerprint
from automedseg.io import load_dataset_spec
from automedseg.lateral import centroid_rel, mirror_confusions
from automedseg.planning import NOMINAL_PROFILES, plan_dataset


@pytest.mark.parametrize(("centres", "expected_axes"), [
    ({"L": [[0.5, 0.5, 0.3]], "R": [[0.5, 0.5, 0.7]]}, {2}),  # a left/right pair along x
    ({"L": [[0.5, 0.2, 0.5]], "R": [[0.5, 0.8, 0.5]]}, {1}),  # ... along y
    ({"L": [[0.5, 0.5, 0.3]], "R": [[0.5, 0.9, 0.7]]}, set()),  # mirrored onto empty space: no confusion
    ({"A": [[0.5, 0.5, 0.5]], "B": [[0.5, 0.5, 0.52]]}, set()),  # central classes
    ({"A": [[0.5, 0.5, 0.3]]}, set()),  # one off-centre class alone
    ({"L": [[0.5, 0.5, 0.3], [0.5, 0.5, 0.7]], "R": [[0.5, 0.5, 0.7], [0.5, 0.5, 0.3]]}, set()),  # sides vary
    ({"heart": [[0.5, 0.5, 0.6]], "lung L": [[0.5, 0.5, 0.4]]}, {2}),  # onto where another class lies
])
def test_mirror_confusions_table(centres: dict, expected_axes: set[int]) -> None:
    got = mirror_confusions({k: np.array(v) for k, v in centres.items()})
    assert set(got) == expected_axes
    for reason in got.values():
        assert "maps" in reason and "onto" in reason


def test_centroid_of_empty_mask_is_none() -> None:
    assert centroid_rel(np.zeros((2, 3, 4), bool)) is None


def _lateral_dataset(root: Path, write_volume, *, lateral: bool, dims: int, n_cases: int = 5) -> Path:
    rng = np.random.default_rng(7)
    shape = (24, 32) if dims == 2 else (10, 24, 32)
    ending = ".png" if dims == 2 else ".nii.gz"
    for i in range(n_cases):
        image = rng.integers(10, 40, shape).astype(np.uint8)
        label = np.zeros(shape, np.uint8)
        sl = (slice(6 + i % 2, 16),) if dims == 2 else (slice(2, 8), slice(6 + i % 2, 16))
        if lateral:  # class 1 on the left, class 2 on the right, at the same height
            label[(*sl, slice(3, 10))] = 1
            label[(*sl, slice(22, 29))] = 2
        else:  # one class on both sides, one in the middle
            label[(*sl, slice(3, 10))] = 1
            label[(*sl, slice(22, 29))] = 1
            label[(*sl, slice(13, 19))] = 2
        image[label > 0] = 200
        write_volume(root / "imagesTr" / f"c{i:03d}_0000{ending}", image)
        write_volume(root / "labelsTr" / f"c{i:03d}{ending}", label)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "gray"}, "labels": {"background": 0, "left": 1, "right": 2},
        "numTraining": n_cases, "file_ending": ending}))
    return root


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("lateral", [True, False])
def test_plan_leaves_the_lateral_axis_out_of_mirroring(tmp_path: Path, write_volume, dims: int,
                                                       lateral: bool) -> None:
    root = _lateral_dataset(tmp_path / "Dataset_LR", write_volume, lateral=lateral, dims=dims)
    fingerprint = compute_fingerprint(load_dataset_spec(root), jobs=1)
    plans = plan_dataset(fingerprint, device=NOMINAL_PROFILES["reference-cpu-2core"], time_budget_s=60.0)
    for name, config in plans.configurations.items():
        x_axis = config.dims - 1  # the patch's last axis is the image's x (no transposition of x here)
        if lateral:
            assert x_axis not in config.augmentation.mirror_axes, name
            assert any("onto" in n and "left out of mirroring" in n for n in config.notes), config.notes
        else:
            assert config.augmentation.mirror_axes == tuple(range(config.dims)), name
