"""A model in memory (automedseg.predictor): NumPy arrays and SimpleITK images in, masks as ``predict`` makes them out.

The 3D model is the session's briefly trained demo (shared, never changed); 2D and multi-channel models are planned
from the tiny fixtures with random weights (inference reads nothing else). Every prediction runs without test-time
mirroring to stay quick.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from automedseg.errors import InputError
from automedseg.predictor import Predictor, load_predictor
from automedseg.workspace import Workspace

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def demo(trained_demo_validated: tuple[Path, Path]) -> tuple[Path, Predictor]:
    """(dataset, its model loaded on the CPU) of the session's trained demo."""
    dataset, work = trained_demo_validated
    return dataset, load_predictor(Workspace(work), configuration="3d_fullres", device="cpu")


def _test_image(dataset: Path) -> sitk.Image:
    return sitk.ReadImage(str(sorted((dataset / "imagesTs").glob("*_0000.nii.gz"))[0]))


def test_an_array_with_its_spacing_gives_the_mask_of_the_image(demo: tuple[Path, Predictor]) -> None:
    dataset, model = demo
    image = _test_image(dataset)
    mask = model.predict(image, mirror=False)
    assert isinstance(mask, sitk.Image)
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(mask, get)() == getattr(image, get)()
    assert mask.GetPixelID() == sitk.sitkUInt8
    array = sitk.GetArrayFromImage(image)
    labels = model.predict(array, spacing_mm=image.GetSpacing()[::-1], mirror=False)
    assert isinstance(labels, np.ndarray) and labels.shape == array.shape
    assert np.array_equal(labels, sitk.GetArrayFromImage(mask))
    assert set(np.unique(labels)) <= set(model.labels.values())
    assert np.array_equal(model.predict(array[None], spacing_mm=image.GetSpacing()[::-1], mirror=False), labels)


def test_what_the_model_is(demo: tuple[Path, Predictor]) -> None:
    _, model = demo
    assert model.configuration == "3d_fullres" and model.channel_names == ("MRI",)
    assert model.labels == {"background": 0, "outer": 1, "core": 2} and model.device == "cpu"
    assert [[d.name for d in g] for g in model.fold_dirs] == [["fold_0"]] and model.postprocessing == ()
    assert repr(model) == "Predictor('3d_fullres': 3d_fullres fold_0; labels {'background': 0, 'outer': 1, " \
                          "'core': 2}; device 'cpu')"


@pytest.mark.parametrize("image,kwargs,message", [
    (np.zeros((20, 20), np.float32), {}, "a 2D image, but the model was trained on 3D volumes"),
    (np.zeros((2, 4, 20, 20), np.float32), {}, r"shape \(2, 4, 20, 20\); the model takes \(Z, Y, X\) or \(Y, X\)"),
    (np.zeros((1, 1, 4, 20, 20), np.float32), {}, r"shape \(1, 1, 4, 20, 20\); the model takes \(Z, Y, X\)"),
    (np.zeros((4, 20, 20), np.float32), {"spacing_mm": (1.0, 1.0)}, "give 3 positive numbers"),
    (np.zeros((4, 20, 20), np.float32), {"spacing_mm": (1.0, 0.0, 1.0)}, "give 3 positive numbers"),
    (np.zeros((4, 20, 20), np.float32), {"step": 2.0}, "--step 2: the tile step must be in"),
    (sitk.Image(20, 20, 4, sitk.sitkFloat32), {"spacing_mm": (1.0, 1.0, 1.0)}, "carries its own spacing"),
    ([[1.0]], {}, "a NumPy array or a SimpleITK image, not list"),
])
def test_images_the_model_does_not_take_are_refused(demo: tuple[Path, Predictor], image: object, kwargs: dict,
                                                    message: str) -> None:
    with pytest.raises(InputError, match=message):
        demo[1].predict(image, mirror=False, **kwargs)


def test_non_finite_intensities_are_refused(demo: tuple[Path, Predictor]) -> None:
    volume = np.zeros((4, 20, 20), np.float32)
    volume[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="image: NaN or infinite intensities"):
        demo[1].predict(volume)


def test_a_folder_in_memory(demo: tuple[Path, Predictor], tmp_path: Path) -> None:
    dataset, model = demo
    masks = model.predict_folder(dataset / "imagesTs", mirror=False)
    assert sorted(masks) == sorted(p.name[: -len("_0000.nii.gz")] for p in (dataset / "imagesTs").iterdir())
    first = sorted(masks)[0]
    assert np.array_equal(masks[first], model.predict(sitk.GetArrayFromImage(_test_image(dataset)),
                                                      spacing_mm=_test_image(dataset).GetSpacing()[::-1],
                                                      mirror=False))
    shutil.copy(dataset / "imagesTs" / f"{first}_0000.nii.gz", tmp_path / "x_0000.nii.gz")
    (tmp_path / "x_0001.nii.gz").write_bytes(b"")  # a second channel file for a one-channel model
    with pytest.raises(InputError, match="channel 1 beside x_0000.nii.gz, but the model takes 1 channel"):
        model.predict_folder(tmp_path)


def test_two_d_images(png_gray, untrained_model, tmp_path: Path) -> None:  # noqa: ANN001
    work = untrained_model(png_gray.root, tmp_path / "work", "2d")
    model = load_predictor(Workspace(work), configuration="2d", device="cpu")
    image = sitk.ReadImage(str(png_gray.root / "imagesTs" / f"{png_gray.test_ids[0]}_0000.png"))
    mask = model.predict(image, mirror=False)
    assert mask.GetDimension() == 2 and mask.GetSize() == image.GetSize()
    labels = model.predict(sitk.GetArrayFromImage(image), mirror=False)
    assert labels.shape == image.GetSize()[::-1] and np.array_equal(labels, sitk.GetArrayFromImage(mask))
    with pytest.raises(InputError, match="a 3D volume, but the model was trained on 2D images"):
        model.predict(np.zeros((3, 20, 24), np.float32))


def test_several_channels_come_first(nnunet_2ch, untrained_model, tmp_path: Path) -> None:  # noqa: ANN001
    work = untrained_model(nnunet_2ch.root, tmp_path / "work", "3d_fullres")
    model = load_predictor(Workspace(work), configuration="3d_fullres", device="cpu")
    assert model.channel_names == ("T1", "T2")
    volume = np.random.default_rng(0).normal(100, 10, (2, *nnunet_2ch.shape_zyx)).astype(np.float32)
    labels = model.predict(volume, spacing_mm=nnunet_2ch.spacing_zyx, mirror=False)
    assert labels.shape == nnunet_2ch.shape_zyx
    with pytest.raises(InputError, match=r"image: shape \(8, 24, 24\); the model takes \(2, Z, Y, X\) or \(2, Y, X\), "
                                         r"channels first \(T1, T2\)"):
        model.predict(volume[0])
    channels = [sitk.GetImageFromArray(v) for v in volume]
    vector = sitk.Compose(channels)  # a vector image holds the channels
    vector.SetSpacing(nnunet_2ch.spacing_zyx[::-1])
    assert np.array_equal(sitk.GetArrayFromImage(model.predict(vector, mirror=False)), labels)
    with pytest.raises(InputError, match=r"image: has 1 channel\(s\), the model takes 2 \(T1, T2\)"):
        model.predict(channels[0])
