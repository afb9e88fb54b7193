"""A small synthetic 3D dataset in nnU-Net v2 layout, for the quick start and for tests.

Each case is an anisotropic MRI-like volume (3 mm slices, 1 mm in-plane) with two touching ellipsoids
(label 1 "outer", label 2 "core"), Rician-like noise and a smooth multiplicative intensity
inhomogeneity, so it is easy but not trivial.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

DEMO_SPACING_XYZ = (1.0, 1.0, 3.0)


def _case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    z, y, x = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    zf = z * DEMO_SPACING_XYZ[2]  # physical mm
    centre = np.array([s / 2 for s in shape]) + rng.uniform(-0.15, 0.15, 3) * np.array(shape)
    c_mm = centre * np.array([DEMO_SPACING_XYZ[2], 1.0, 1.0])
    radii = rng.uniform(8, 13, 3)
    d = ((zf - c_mm[0]) / radii[0]) ** 2 + ((y - c_mm[1]) / radii[1]) ** 2 + ((x - c_mm[2]) / radii[2]) ** 2
    label = np.zeros(shape, dtype=np.uint8)
    label[d <= 1.0] = 1
    core_offset = rng.uniform(-0.3, 0.3, 3) * radii
    dc = (
        ((zf - c_mm[0] - core_offset[0]) / (radii[0] * 0.5)) ** 2
        + ((y - c_mm[1] - core_offset[1]) / (radii[1] * 0.5)) ** 2
        + ((x - c_mm[2] - core_offset[2]) / (radii[2] * 0.5)) ** 2
    )
    label[(dc <= 1.0) & (d <= 1.0)] = 2
    image = np.full(shape, 100.0, dtype=np.float32)
    image += ndimage.gaussian_filter(rng.normal(0, 25, shape), 2).astype(np.float32)  # texture
    image[label == 1] += 60
    image[label == 2] += 120
    bias = np.exp(ndimage.gaussian_filter(rng.normal(0, 1, shape), 8) * 6).astype(np.float32)
    image *= bias / bias.mean()
    image = np.abs(image + rng.normal(0, 12, shape) + 1j * rng.normal(0, 12, shape)).astype(np.float32)
    return image, label


def make_demo_dataset(root: Path, *, n_cases: int = 24, n_test: int = 4, seed: int = 0) -> Path:
    """Write the demo dataset to ``root`` (nnU-Net v2 layout) and return ``root``.

    Test cases go to ``imagesTs`` with their labels in ``labelsTs`` so predictions can be scored.

    Example:
        >>> make_demo_dataset(Path("/tmp/demo"), n_cases=2, n_test=0)  # doctest: +SKIP
        PosixPath('/tmp/demo')
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_cases + n_test):
        shape = (int(rng.integers(12, 17)), int(rng.integers(40, 57)), int(rng.integers(40, 57)))
        image, label = _case(rng, shape)
        name = f"demo_{i:03d}"
        img = sitk.GetImageFromArray(image)
        img.SetSpacing(DEMO_SPACING_XYZ)
        img.SetOrigin((float(rng.uniform(-50, 50)), float(rng.uniform(-50, 50)), 0.0))
        folder = "imagesTr" if i < n_cases else "imagesTs"
        sitk.WriteImage(img, str(root / folder / f"{name}_0000.nii.gz"))
        lab = sitk.GetImageFromArray(label)
        lab.CopyInformation(img)
        sitk.WriteImage(lab, str(root / ("labelsTr" if i < n_cases else "labelsTs") / f"{name}.nii.gz"))
    meta = {
        "name": "Demo",
        "description": "automedseg synthetic demo: two nested ellipsoids, anisotropic 3 mm slices",
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "outer": 1, "core": 2},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return root
