"""Tests for automedseg.imagefile: planted bad files fail before SimpleITK reads them, good files still read."""

from __future__ import annotations

import gzip
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

import automedseg.imagefile as imagefile
from automedseg.checks import check_dataset
from automedseg.imagefile import ImageFileError, NonFiniteValuesError, check_image_file, parse_nifti_header
from automedseg.io import read_image_file, read_label

SHAPE = (8, 24, 24)  # (z, y, x)
PAYLOAD_F4 = 8 * 24 * 24 * 4  # bytes of a float32 SHAPE volume


@pytest.fixture
def fx(write_volume, write_nifti, edit_nifti_header) -> SimpleNamespace:
    return SimpleNamespace(write_volume=write_volume, write_nifti=write_nifti, edit_nifti_header=edit_nifti_header)


def _volume(dtype: str = "f4", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(100, 30, SHAPE).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1000), min(info.max, 1000), SHAPE, endpoint=True).astype(dtype)


def _cut(path: Path, fraction: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _with(value: float, dtype: str) -> np.ndarray:
    a = _volume(dtype)
    a[3, 4, 5] = value
    return a


# --- bad files: (builder(tmp, fx) -> path, exception type, needles in the message) ------------------------


def truncated_gz(fraction: float) -> Callable[[Path, SimpleNamespace], Path]:
    return lambda d, fx: _cut(fx.write_volume(d / "t.nii.gz", _volume()), fraction)


def inflated(ending: str) -> Callable[[Path, SimpleNamespace], Path]:
    return lambda d, fx: fx.edit_nifti_header(fx.write_volume(d / f"big{ending}", _volume()),
                                              dims_xyz=(1000, 1000, 500))


def nonfinite(value: float, dtype: str, ending: str = ".nii.gz") -> Callable[[Path, SimpleNamespace], Path]:
    return lambda d, fx: fx.write_volume(d / f"nf{ending}", _with(value, dtype))


def pixdim(values: tuple[float, float, float], ending: str = ".nii.gz") -> Callable[[Path, SimpleNamespace], Path]:
    return lambda d, fx: fx.edit_nifti_header(fx.write_volume(d / f"sp{ending}", _volume()), pixdim_xyz=values)


def corrupt_crc(d: Path, fx: SimpleNamespace) -> Path:
    path = fx.write_volume(d / "crc.nii.gz", _volume())
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # inside the CRC32 of the gzip trailer
    path.write_bytes(bytes(data))
    return path


def metaimage(compressed: bool, edit: Callable[[bytes], bytes], ending: str = ".mha"):
    def build(d: Path, fx: SimpleNamespace) -> Path:
        path = d / f"m{ending}"
        sitk.WriteImage(sitk.GetImageFromArray(_volume()), str(path), useCompression=compressed)
        path.write_bytes(edit(path.read_bytes()))
        return path

    return build


def nrrd(compressed: bool, fraction: float):
    def build(d: Path, fx: SimpleNamespace) -> Path:
        path = d / "n.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(_volume()), str(path), useCompression=compressed)
        return _cut(path, fraction)

    return build


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _inflate_mha(data: bytes) -> bytes:
    return re.sub(rb"DimSize = [0-9 ]+", b"DimSize = 1000 1000 500", data, count=1)


BAD = [
    *[pytest.param(truncated_gz(f), ImageFileError, ["truncated file", "t.nii.gz"], id=f"truncated_gz_{f}")
      for f in (0.001, 0.02, 0.25, 0.5, 0.9, 0.999)],
    pytest.param(lambda d, fx: _cut(fx.write_volume(d / "t.nii", _volume()), 0.5), ImageFileError,
                 ["truncated or corrupt", f"{PAYLOAD_F4:,} bytes", f"{PAYLOAD_F4 // 2 - 176:,} bytes"],
                 id="truncated_nii"),
    pytest.param(lambda d, fx: _cut(fx.write_volume(d / "t.nii", _volume()), 0.01), OSError, ["cannot read"],
                 id="truncated_nii_inside_header"),
    *[pytest.param(inflated(e), ImageFileError,
                   ["1000 x 1000 x 500 voxels of float32", "claims 2,000,000,000 bytes", f"holds {PAYLOAD_F4:,} bytes"],
                   id=f"header_inflated{e}") for e in (".nii.gz", ".nii")],
    pytest.param(lambda d, fx: fx.edit_nifti_header(fx.write_volume(d / "small.nii.gz", _volume()),
                                                    dims_xyz=(24, 24, 4)),
                 ImageFileError, ["more data than the header describes"], id="header_deflated"),
    *[pytest.param(nonfinite(v, t), NonFiniteValuesError, [f"1 NaN or infinite value(s) in the {n} voxel data", c],
                   id=f"{label}_{n}")
      for v, label, c in ((np.nan, "nan", "(1 NaN, 0 +inf, 0 -inf)"), (np.inf, "pos_inf", "(0 NaN, 1 +inf, 0 -inf)"),
                          (-np.inf, "neg_inf", "(0 NaN, 0 +inf, 1 -inf)"))
      for t, n in (("f4", "float32"), ("f8", "float64"))],
    pytest.param(nonfinite(np.nan, "f4", ".nii"), NonFiniteValuesError, ["1 NaN"], id="nan_uncompressed_nii"),
    pytest.param(lambda d, fx: fx.write_nifti(d / "be.nii.gz", _with(np.nan, "f4"), byteorder=">"),
                 NonFiniteValuesError, ["1 NaN or infinite"], id="nan_big_endian"),
    pytest.param(lambda d, fx: fx.write_nifti(d / "n2.nii.gz", _with(np.inf, "f8"), version=2, byteorder=">"),
                 NonFiniteValuesError, ["1 NaN or infinite"], id="inf_nifti2_big_endian"),
    pytest.param(lambda d, fx: _cut(fx.write_nifti(d / "n2.nii", _volume(), version=2), 0.7), ImageFileError,
                 ["NIfTI-2", "truncated or corrupt"], id="truncated_nifti2"),
    pytest.param(pixdim((0.0, 1.0, 1.0)), ImageFileError, ["spacing 0 in header for the x axis"], id="pixdim_x_zero"),
    pytest.param(pixdim((1.0, 1.0, 0.0), ".nii"), ImageFileError, ["spacing 0 in header for the z axis"],
                 id="pixdim_z_zero_nii"),
    pytest.param(pixdim((1.0, -0.8, 1.0)), ImageFileError, ["spacing -0.8 in header for the y axis"],
                 id="pixdim_negative"),
    pytest.param(pixdim((1.0, float("nan"), 1.0)), ImageFileError, ["spacing nan in header"], id="pixdim_nan"),
    pytest.param(corrupt_crc, ImageFileError, ["corrupt compressed data", "incorrect data check"], id="gzip_crc"),
    pytest.param(metaimage(False, _half), ImageFileError, ["MetaImage", "truncated or corrupt"], id="mha_truncated"),
    pytest.param(metaimage(True, _half), ImageFileError, ["CompressedDataSize"], id="mha_compressed_truncated"),
    pytest.param(metaimage(False, _inflate_mha), ImageFileError, ["1000 x 1000 x 500", "claims"],
                 id="mha_header_inflated"),
    pytest.param(metaimage(True, _inflate_mha), ImageFileError, ["1000 x 1000 x 500", "claims"],
                 id="mha_compressed_header_inflated"),
    pytest.param(lambda d, fx: (metaimage(False, lambda b: b, ".mhd")(d, fx), _cut(d / "m.raw", 0.5))[0],
                 ImageFileError, ["m.raw", "truncated or corrupt"], id="mhd_raw_truncated"),
    pytest.param(lambda d, fx: (metaimage(False, lambda b: b, ".mhd")(d, fx), (d / "m.raw").unlink())[0],
                 FileNotFoundError, ["m.raw: file is missing"], id="mhd_raw_missing"),
    pytest.param(nrrd(False, 0.5), ImageFileError, ["NRRD", "truncated or corrupt"], id="nrrd_truncated"),
    pytest.param(nrrd(True, 0.5), ImageFileError, ["NRRD", "truncated file"], id="nrrd_gzip_truncated"),
    pytest.param(lambda d, fx: _cut(fx.write_volume(d / "t.png", _volume("u1")[0]), 0.5), OSError, ["cannot read"],
                 id="png_truncated"),
    pytest.param(lambda d, fx: d / "absent.nii.gz", FileNotFoundError, ["file is missing"], id="missing"),
    pytest.param(lambda d, fx: (d / "dir.nii.gz").mkdir() or d / "dir.nii.gz", ImageFileError,
                 ["not a regular file"], id="directory"),
]


@pytest.mark.parametrize("build,error,needles", BAD)
def test_bad_file_fails_before_simpleitk(tmp_path, fx, build, error, needles):
    path = build(tmp_path, fx)
    with pytest.raises(error) as info:
        read_image_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") or message.startswith(f"{path.with_suffix('.raw')}: "), message
    for needle in needles:
        assert needle in message, message


def test_header_inflated_fails_fast_without_allocating(tmp_path, fx, monkeypatch):
    path = inflated(".nii.gz")(tmp_path, fx)
    monkeypatch.setattr(sitk, "ReadImage", lambda *a, **k: pytest.fail("SimpleITK must not be reached"))
    t0 = time.perf_counter()
    with pytest.raises(ImageFileError, match="claims 2,000,000,000 bytes"):
        read_image_file(path)
    assert time.perf_counter() - t0 < 1.0


def test_simpleitk_hides_nifti_nan_so_the_raw_data_is_scanned(tmp_path, fx):
    """The reason for the NaN scan: SimpleITK reads NaN/inf of NIfTI as 0 (MetaImage keeps them)."""
    for ending, kept in ((".nii.gz", False), (".mha", True)):
        path = fx.write_volume(tmp_path / f"x{ending}", _with(np.nan, "f4"))
        assert bool(np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).any()) is kept


def test_nan_in_float_label_is_reported(tmp_path, fx):
    label = np.zeros(SHAPE, np.float32)
    label[2, 2, 2] = np.nan
    path = fx.write_volume(tmp_path / "lab.nii.gz", label)
    with pytest.raises(NonFiniteValuesError) as info:
        read_label(path)
    assert info.value.count == 1 and str(info.value).startswith(f"{path}: 1 NaN")


# --- good files: must read exactly as before (no false positives) ------------------------------------------


GOOD_DTYPES = ["u1", "i1", "i2", "u2", "i4", "u4", "f4", "f8"]


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".mha", ".nrrd"])
@pytest.mark.parametrize("dtype", GOOD_DTYPES)
def test_simpleitk_written_files_read_fine(tmp_path, write_volume, dtype, ending):
    array = _volume(dtype)
    path = write_volume(tmp_path / f"ok{ending}", array, spacing_zyx=(3.0, 0.7, 0.8))
    check_image_file(path)
    arr, geom = read_image_file(path)
    np.testing.assert_array_equal(arr[0], array)
    assert geom.spacing_zyx == pytest.approx((3.0, 0.7, 0.8))


def _join4d(vol: np.ndarray) -> sitk.Image:
    return sitk.JoinSeries([sitk.GetImageFromArray(v) for v in vol])


LAYOUTS = {  # name -> (image, array automedseg returns (C, Z, Y, X))
    "2d": lambda a: (sitk.GetImageFromArray(a[0]), a[:1]),
    "2d_rgb": lambda a: (sitk.GetImageFromArray(np.moveaxis(a[:3], 0, -1), isVector=True), a[:3, None]),
    "3d_vector": lambda a: (sitk.GetImageFromArray(np.stack([a, a + 1], -1), isVector=True), np.stack([a, a + 1])),
    "4d": lambda a: (_join4d(a[:3, None].repeat(2, 1)), a[:3, None].repeat(2, 1)),
}


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".mha", ".nrrd"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_2d_vector_and_4d_files_read_fine(tmp_path, layout, ending):
    image, expected = LAYOUTS[layout](_volume("u1"))
    path = tmp_path / f"v{ending}"
    sitk.WriteImage(image, str(path))
    np.testing.assert_array_equal(read_image_file(path)[0].reshape(expected.shape), expected)


@pytest.mark.parametrize("ending", [".mha", ".nrrd", ".mhd"])
def test_compressed_metaimage_and_nrrd_read_fine(tmp_path, ending):
    array = _volume("f4")
    path = tmp_path / f"ok{ending}"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), useCompression=True)
    np.testing.assert_array_equal(read_image_file(path)[0][0], array)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("dtype", ["u1", "i2", "u2", "i4", "f4", "f8"])
def test_crafted_nifti1_both_byte_orders_read_fine(tmp_path, write_nifti, dtype, byteorder, ending):
    array = _volume(dtype)
    path = write_nifti(tmp_path / f"c{ending}", array, byteorder=byteorder, spacing_zyx=(2.5, 0.5, 0.75))
    arr, geom = read_image_file(path)
    np.testing.assert_array_equal(arr[0], array)
    assert geom.spacing_zyx == pytest.approx((2.5, 0.5, 0.75))


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("dtype", ["u1", "i2", "f4", "f8"])
def test_crafted_nifti2_passes_the_check(tmp_path, write_nifti, dtype, byteorder, ending):
    """SimpleITK's NIfTI reader here is NIfTI-1 only; the check must still parse NIfTI-2 correctly."""
    path = write_nifti(tmp_path / f"c2{ending}", _volume(dtype), version=2, byteorder=byteorder,
                       spacing_zyx=(2.5, 0.5, 0.75))
    check_image_file(path)
    raw = path.read_bytes()
    header = parse_nifti_header(gzip.decompress(raw) if ending == ".nii.gz" else raw, path)
    assert header is not None and header.version == 2 and header.byteorder == byteorder
    assert header.dims == (24, 24, 8) and header.pixdim[:3] == (0.75, 0.5, 2.5) and header.vox_offset == 544


def test_4d_with_zero_time_pixdim_extension_and_multi_member_gzip_read_fine(tmp_path, write_nifti):
    channels = np.stack([_volume("f4", 1), _volume("f4", 2)])
    ext = (32).to_bytes(4, "little") + (6).to_bytes(4, "little") + b"comment".ljust(24, b"\0")
    path = write_nifti(tmp_path / "msd.nii.gz", channels, extension=ext)  # pixdim[4] = 0, vox_offset 384
    arr, geom = read_image_file(path)
    np.testing.assert_array_equal(arr, channels)
    assert geom.n_components == 2
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]) + b"\0" * 8)  # 2 members + padding
    np.testing.assert_array_equal(read_image_file(path)[0], channels)


def test_large_file_streams_in_chunks(tmp_path, write_volume, monkeypatch):
    monkeypatch.setattr(imagefile, "_CHUNK", 4096)
    monkeypatch.setattr(imagefile, "_OUT_CHUNK", 3001)  # odd: float values straddle chunk borders
    array = _volume("f8")
    array[7, 23, 23] = np.inf  # the very last value
    path = write_volume(tmp_path / "big.nii.gz", array)
    with pytest.raises(NonFiniteValuesError, match=r"\(0 NaN, 1 \+inf, 0 -inf\)"):
        check_image_file(path)
    array[7, 23, 23] = 1.0
    check_image_file(write_volume(tmp_path / "big.nii.gz", array))


# --- permissions ------------------------------------------------------------------------------------------


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_permission_denied_not_missing(tmp_path, write_volume):
    path = write_volume(tmp_path / "locked.nii.gz", _volume())
    path.chmod(0)
    try:
        with pytest.raises(PermissionError, match="permission denied"):
            read_image_file(path)
    finally:
        path.chmod(0o644)


def test_permission_denied_simulated(tmp_path, write_volume, monkeypatch):
    """Same as above, runs as root too: ``open`` of the image module raises what the OS raises for mode 000."""
    path = write_volume(tmp_path / "locked.nii.gz", _volume())

    def deny(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(imagefile, "open", deny, raising=False)
    with pytest.raises(PermissionError) as info:
        read_image_file(path)
    assert str(info.value) == f"{path}: permission denied (the file exists but cannot be read)"
    assert "missing" not in str(info.value)


def test_permission_denied_is_a_check_problem(nnunet_3d, monkeypatch):
    locked = nnunet_3d.root / "labelsTr" / f"{nnunet_3d.case_ids[1]}.nii.gz"

    def deny(file, *args, **kwargs):
        if Path(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(imagefile, "open", deny, raising=False)
    problems = check_dataset(nnunet_3d.root, jobs=1)
    assert problems == [f"{locked}: permission denied (the file exists but cannot be read)"]
