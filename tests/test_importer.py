"""``automedseg import``: 2D layouts people have -> nnU-Net v2 raw datasets that ``check`` accepts."""

from __future__ import annotations

import doctest
import hashlib
import importlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from click.testing import CliRunner
from PIL import Image

from automedseg.checks import check_dataset
from automedseg.cli import main
from automedseg.errors import InputError
from automedseg.import_labels import fill_outlines, parse_colors
from automedseg.io import load_dataset_spec, read_images, read_label


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (and so the set of files)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_import(source: Path, output: Path, *args: str):  # noqa: ANN201 - click Result
    return CliRunner().invoke(main, ["import", str(source), "-o", str(output), *args])


def imported_labels(root: Path) -> dict[str, np.ndarray]:
    spec = load_dataset_spec(root)
    return {c.case_id: read_label(c.label, spacing_2d_mm=spec.spacing_2d_mm)[0][0] for c in spec.cases}


def assert_imported(result, output: Path, source: Path, before: dict[str, str]) -> dict:  # noqa: ANN001
    assert result.exit_code == 0, result.output
    assert check_dataset(output, jobs=1) == []
    assert tree_hashes(source) == before, "the source folder changed"
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".tmp-")], "temporary folder left behind"
    return json.loads((output / "dataset.json").read_text())


LAYOUTS = [
    # id, source templates and style, extra options, expected labels, class -> label
    ("binary255-flat", dict(mask="{i:02d}_mask.png", style="binary255"), [],
     {"background": 0, "foreground": 1}, {0: 0, 1: 1, 2: 1}),
    ("binary1-folders-same-names", dict(image="images/case{i}.png", mask="labels/case{i}.png", style="binary1"), [],
     {"background": 0, "foreground": 1}, {0: 0, 1: 1, 2: 1}),
    ("gif-manual1-suffix-rgb-images", dict(image="img/{i:02d}_training.tif", mask="gt/{i:02d}_manual1.gif",
                                           style="binary255", rgb=True), ["--image-dir", "img"],
     {"background": 0, "foreground": 1}, {0: 0, 1: 1, 2: 1}),
    ("jpeg-images-bmp-masks", dict(image="{i:02d}.jpg", mask="{i:02d}_gt.bmp", style="binary255"), [],
     {"background": 0, "foreground": 1}, {0: 0, 1: 1, 2: 1}),
    ("palette", dict(image="images/{i}.png", mask="masks/{i}_seg.png", style="palette"), [],
     {"background": 0, "index_1": 1, "index_2": 2}, {0: 0, 1: 1, 2: 2}),
    ("palette-given-by-colour", dict(image="images/{i}.png", mask="masks/{i}_seg.png", style="palette"),
     ["--colors", "0,0,0=background;0,255,0=b;255,0,0=a"], {"background": 0, "b": 1, "a": 2}, {0: 0, 1: 2, 2: 1}),
    ("grey-coded-given", dict(mask="{i:02d}_label.png", style="grey"), ["--colors", "0=bg;60=disc;120=spot"],
     {"bg": 0, "disc": 1, "spot": 2}, {0: 0, 1: 1, 2: 2}),
    ("rgb-inferred", dict(mask="{i:02d}_mask.png", style="rgb"), [],  # sorted by colour: green (0,255,0) first
     {"background": 0, "color_0_255_0": 1, "color_255_0_0": 2}, {0: 0, 1: 2, 2: 1}),
    ("rgb-given", dict(mask="{i:02d}_mask.png", style="rgb"), ["--colors", "0,0,0=background;255,0,0=lesion;0,255,0=x"],
     {"background": 0, "lesion": 1, "x": 2}, {0: 0, 1: 1, 2: 2}),
    ("rgb-file-of-grey", dict(mask="{i:02d}_Annotation.png", style="rgb_grey"), ["--colors", "0=background;255=head"],
     {"background": 0, "head": 1}, {0: 0, 1: 1, 2: 1}),
    ("white-background-given", dict(mask="{i:02d}_mask.png", style="binary255"), ["--colors", "255=cell;0=membrane"],
     {"cell": 0, "membrane": 1}, {0: 1, 1: 0, 2: 0}),
]


@pytest.mark.parametrize(("layout", "options", "labels", "mapping"), [row[1:] for row in LAYOUTS],
                         ids=[row[0] for row in LAYOUTS])
def test_layouts_import_and_pass_check(tmp_path: Path, write_2d_source, layout: dict, options: list[str],
                                       labels: dict[str, int], mapping: dict[int, int]) -> None:
    src = tmp_path / "src"
    truth = write_2d_source(src, **layout)
    before = tree_hashes(src)
    out = tmp_path / "out" / "Dataset_X"
    result = run_import(src, out, *options)
    meta = assert_imported(result, out, src, before)
    assert meta["labels"] == labels
    assert meta["numTraining"] == len(truth)
    got = imported_labels(out)
    assert len(got) == len(truth)
    for case, stem in zip(sorted(got), sorted(truth)):  # case ids are the stems less a shared suffix
        np.testing.assert_array_equal(got[case], np.vectorize(mapping.get)(truth[stem]))
    report = json.loads((out / "import_report.json").read_text())
    assert report["counts"]["training"] == len(truth)
    assert [row["name"] for row in report["labels"]] == list(labels)


def test_rgb_images_are_one_rgb_png_and_16_bit_grey_is_kept(tmp_path: Path, write_2d_source, case_image) -> None:
    for name, kw in (("rgb", dict(rgb=True)), ("u16", dict(dtype=np.uint16))):
        src = tmp_path / f"src_{name}"
        truth = write_2d_source(src, **kw)
        out = tmp_path / f"out_{name}"
        assert_imported(run_import(src, out), out, src, tree_hashes(src))
        spec = load_dataset_spec(out)
        first = sorted(truth)[0]
        image, _ = read_images(spec.cases[0], n_channels=len(spec.channel_names))
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(spec.cases[0].images[0]))
        reader.ReadImageInformation()
        if name == "rgb":
            assert spec.channel_names == ("R", "G", "B") and len(spec.cases[0].images) == 1
            assert reader.GetNumberOfComponents() == 3
        else:
            assert reader.GetPixelID() == sitk.sitkUInt16
            assert image.max() > 255
        expected = case_image(0, truth[first], rgb=name == "rgb", dtype=np.uint8 if name == "rgb" else np.uint16)
        np.testing.assert_array_equal(image[:, 0].transpose(1, 2, 0).squeeze(), expected)


def test_fill_outlines_fills_closed_outlines(tmp_path: Path, write_2d_source) -> None:
    src = tmp_path / "src"
    truth = write_2d_source(src, style="outline", classes=1)
    out = tmp_path / "out"
    assert_imported(run_import(src, out, "--fill-outlines"), out, src, tree_hashes(src))
    got = imported_labels(out)
    for stem, classes in truth.items():
        np.testing.assert_array_equal(got[stem.split("_")[0]], classes)


@pytest.mark.parametrize(("style", "message"), [
    ("open_outline", "is not closed (filling adds nothing)"),
    ("binary255", "hold filled regions, not outlines"),
])
def test_fill_outlines_refuses_open_or_filled_masks(tmp_path: Path, write_2d_source, style: str, message: str) -> None:
    src = tmp_path / "src"
    write_2d_source(src, style=style, classes=1)
    out = tmp_path / "out"
    result = run_import(src, out, "--fill-outlines")
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_fill_outlines_per_connected_outline() -> None:
    labels = np.zeros((12, 20), np.uint8)
    labels[1:6, 1:6] = 1
    labels[2:5, 2:5] = 0  # closed ring
    labels[8, 10:18] = 1  # open stroke
    filled, open_outlines = fill_outlines(labels)
    assert filled[3, 3] == 1 and filled[2:5, 2:5].all()
    assert [(o.y, o.solid) for o in open_outlines] == [(8, False)]


def test_drive_like_layout_with_fov_and_test_split(tmp_path: Path, write_2d_source) -> None:
    src = tmp_path / "DRIVE"
    for split in ("training", "test"):
        write_2d_source(src / split, n=5, image="images/{i:02d}_" + split + ".tif",
                        mask="1st_manual/{i:02d}_manual1.gif", fov="mask/{i:02d}_" + split + "_mask.gif", rgb=True)
        write_2d_source(src / split, n=5 if split == "test" else 0, image="2nd_manual/{i:02d}_manual2.gif", mask=None)
    before = tree_hashes(src)
    out = tmp_path / "Dataset_DRIVE"
    ambiguous = run_import(src, out)
    assert ambiguous.exit_code == 2
    assert "ambiguous" in ambiguous.output and "--mask-suffix" in ambiguous.output
    result = run_import(src, out, "--mask-suffix", "_manual1", "--fov-suffix", "_mask",
                        "--colors", "0=background;255=vessel")
    meta = assert_imported(result, out, src, before)
    assert meta["fov"] is True and meta["numTest"] == 5 and meta["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    for folder in ("imagesTr", "labelsTr", "fovTr", "imagesTs", "labelsTs", "fovTs"):
        assert len(list((out / folder).iterdir())) == 5, folder
    fov = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "fovTr" / "00.png")))
    assert set(np.unique(fov)) == {0, 1} and fov[1:-1, 1:-1].all()
    assert "1st_manual/*_manual1.*" in result.output and "ignored: 2nd_manual/" in result.output
    report = json.loads((out / "import_report.json").read_text())
    assert report["cases"]["test/00"]["fov"] == "test/mask/00_test_mask.gif"


@pytest.mark.parametrize(("args", "n_test", "fov"), [
    (["--mask-glob", "1st_manual/*"], 5, False),
    (["--mask-suffix", "_manual1", "--no-test"], 0, False),
])
def test_drive_like_layout_other_choices(tmp_path: Path, write_2d_source, args: list[str], n_test: int,
                                         fov: bool) -> None:
    src = tmp_path / "DRIVE"
    for split in ("training", "test"):
        write_2d_source(src / split, image="images/{i:02d}_" + split + ".tif", mask="1st_manual/{i:02d}_manual1.gif",
                        fov="mask/{i:02d}_" + split + "_mask.gif", rgb=True)
    out = tmp_path / "out"
    meta = assert_imported(run_import(src, out, *args), out, src, tree_hashes(src))
    assert meta["numTest"] == n_test and ("fov" in meta) == fov
    assert (out / "labelsTs").is_dir() == (n_test > 0)


def test_test_source_with_masks_goes_to_labels_ts(tmp_path: Path, write_2d_source) -> None:
    write_2d_source(tmp_path / "train")
    write_2d_source(tmp_path / "holdout", n=2, image="{i:02d}_img.png", mask="{i:02d}_mask.png")
    out = tmp_path / "out"
    meta = assert_imported(run_import(tmp_path / "train", out, "--test-source", str(tmp_path / "holdout")), out,
                           tmp_path / "holdout", tree_hashes(tmp_path / "holdout"))
    assert meta["numTest"] == 2
    assert sorted(p.name for p in (out / "labelsTs").iterdir()) == ["00.png", "01.png"]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["00_0000.png", "01_0000.png"]


def test_tiff_codecs_lzw_and_16_bit_rgb(tmp_path: Path, write_2d_source, case_image) -> None:
    """LZW (decoded by Pillow when tifffile lacks imagecodecs) and 16-bit RGB (tifffile, exact)."""
    truth = write_2d_source(tmp_path / "a")
    (tmp_path / "b").mkdir()
    for stem, classes in truth.items():
        i = int(stem[:2])
        Image.fromarray(case_image(i, classes, rgb=True)).save(tmp_path / "a" / f"{stem}.tif", compression="tiff_lzw")
        (tmp_path / "a" / f"{stem}.png").unlink()
        tifffile.imwrite(tmp_path / "b" / f"{stem}.tif", case_image(i, classes, rgb=True, dtype=np.uint16),
                         photometric="rgb")
        (tmp_path / "b" / f"{i:02d}_mask.png").write_bytes((tmp_path / "a" / f"{i:02d}_mask.png").read_bytes())
    for name, dtype, channels in (("a", np.uint8, ("R", "G", "B")), ("b", np.uint16, ("R16", "G16", "B16"))):
        out = tmp_path / f"out_{name}"
        assert_imported(run_import(tmp_path / name, out), out, tmp_path / name, tree_hashes(tmp_path / name))
        spec = load_dataset_spec(out)
        assert spec.channel_names == channels
        image, _ = read_images(spec.cases[1], n_channels=3)
        expected = case_image(1, truth["01_img"], rgb=True, dtype=dtype)
        np.testing.assert_array_equal(image[:, 0].transpose(1, 2, 0), expected)


@pytest.mark.parametrize(("spacings", "ending"), [((0.1, 0.2, 0.15, 0.3, 0.12), ".nii.gz"), ((0.25,) * 5, ".png")])
def test_spacing_csv(tmp_path: Path, write_2d_source, spacings: tuple[float, ...], ending: str) -> None:
    src = tmp_path / "hc"
    write_2d_source(src / "training_set", image="{i:03d}_HC.png", mask="{i:03d}_HC_Annotation.png", style="rgb_grey")
    csv_path = src / "pixel_size.csv"
    rows = [f"{i:03d}_HC.png,{s},{40 + i}" for i, s in enumerate(spacings)] + ["999_HC.png,0.5,10"]
    csv_path.write_text("filename,pixel size(mm),head circumference (mm)\n" + "\n".join(rows) + "\n")
    out = tmp_path / "Dataset_HC"
    meta = assert_imported(run_import(src, out, "--spacing-csv", str(csv_path)), out, src, tree_hashes(src))
    assert meta["file_ending"] == ending
    spec = load_dataset_spec(out)
    for case, s in zip(spec.cases, spacings):
        _, geometry = read_images(case, n_channels=1, spacing_2d_mm=spec.spacing_2d_mm)
        assert geometry.spacing == pytest.approx((s, s), rel=1e-6)
        _, label_geometry = read_label(case.label, spacing_2d_mm=spec.spacing_2d_mm)
        assert label_geometry.spacing == pytest.approx((s, s), rel=1e-6)
    if ending == ".png":
        assert meta["spacing_2d_mm"] == [0.25, 0.25]


def test_spacing_csv_missing_row_is_named(tmp_path: Path, write_2d_source) -> None:
    write_2d_source(tmp_path / "src")
    csv_path = tmp_path / "sp.csv"
    csv_path.write_text("name;spacing\n00_img.png;0.1\n01_img.png;0.1\n02_img;0.1\n03_img.png;0.1\n")
    result = run_import(tmp_path / "src", tmp_path / "out", "--spacing-csv", str(csv_path))
    assert result.exit_code == 2
    assert "04_img.png: no row in sp.csv" in result.output and "Traceback" not in result.output


def test_multipage_tiff_stacks_become_one_case_per_page(tmp_path: Path, two_discs) -> None:
    src = tmp_path / "em"
    for name in ("volume_a", "volume_b"):
        classes = np.stack([two_discs(i, classes=1) for i in range(3)])
        images = (40 + 100 * classes).astype(np.uint8)
        (src / "images").mkdir(parents=True, exist_ok=True)
        (src / "labels").mkdir(exist_ok=True)
        tifffile.imwrite(src / "images" / f"{name}.tif", images, photometric="minisblack")
        tifffile.imwrite(src / "labels" / f"{name}.tif", (classes * 255).astype(np.uint8), photometric="minisblack")
    out = tmp_path / "Dataset_EM"
    meta = assert_imported(run_import(src, out), out, src, tree_hashes(src))
    assert meta["numTraining"] == 6
    got = imported_labels(out)
    assert sorted(got) == [f"volume_{v}_z{p:03d}" for v in "ab" for p in range(3)]
    np.testing.assert_array_equal(got["volume_b_z002"], two_discs(2, classes=1))


def test_mismatched_names_exit_2_one_line_each(tmp_path: Path, write_2d_source) -> None:
    src = tmp_path / "src"
    write_2d_source(src, n=7)
    (src / "05_mask.png").rename(src / "05_maks.png")
    (src / "06_mask.png").unlink()
    out = tmp_path / "out"
    result = run_import(src, out)
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines[:3] == [f"{src / name}: no mask (*_mask.* beside the images)"
                         for name in ("05_img.png", "05_maks.png", "06_img.png")]
    assert not out.exists()
    skipped = run_import(src, out, "--skip-unmatched", "--image-glob", "0[0-6]_img.png")
    meta = assert_imported(skipped, out, src, tree_hashes(src))
    assert meta["numTraining"] == 5
    assert len(json.loads((out / "import_report.json").read_text())["skipped"]) == 2


@pytest.mark.parametrize(("style", "args", "message"), [
    ("antialiased", [], "--snap-colors"),
    ("binary255", ["--colors", "0=background;128=x"], "values not in --colors: 255"),
    ("binary255", ["--snap-colors"], "--snap-colors needs --colors"),
    ("empty", [], "nothing to segment"),
])
def test_ambiguous_masks_are_refused(tmp_path: Path, write_2d_source, save_raster, style: str, args: list[str],
                                     message: str) -> None:
    src = tmp_path / "src"
    write_2d_source(src)
    for i in range(5):
        mask = np.asarray(Image.open(src / f"{i:02d}_mask.png"))
        if style == "antialiased":
            mask = (np.linspace(0, 255, mask.size).reshape(mask.shape)).astype(np.uint8)
        elif style == "empty":
            mask = np.zeros_like(mask)
        save_raster(src / f"{i:02d}_mask.png", mask)
    result = run_import(src, tmp_path / "out", *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_snap_colors_maps_blends_to_nearest(tmp_path: Path, write_2d_source, save_raster) -> None:
    src = tmp_path / "src"
    truth = write_2d_source(src, classes=1)
    for i in range(5):
        mask = np.asarray(Image.open(src / f"{i:02d}_mask.png")).copy()
        mask[0, :4] = [20, 100, 160, 240]  # edge blends
        save_raster(src / f"{i:02d}_mask.png", mask)
    out = tmp_path / "out"
    assert_imported(run_import(src, out, "--colors", "0=background;255=disc", "--snap-colors"), out, src,
                    tree_hashes(src))
    got = imported_labels(out)["00"]
    assert got[0, :4].tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(got[1:], truth["00_img"][1:])


@pytest.mark.parametrize("where", ["inside", "parent", "same", "nonempty"])
def test_output_placement_is_refused(tmp_path: Path, write_2d_source, where: str) -> None:
    src = tmp_path / "data" / "src"
    write_2d_source(src)
    out = {"inside": src / "out", "parent": tmp_path / "data", "same": src, "nonempty": tmp_path / "full"}[where]
    if where == "nonempty":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    before = tree_hashes(tmp_path)
    result = run_import(src, out)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert ("--overwrite" in result.output) == (where == "nonempty")
    assert tree_hashes(tmp_path) == before


def test_overwrite_replaces_whole_folder_and_stale_builds_are_removed(tmp_path: Path, write_2d_source) -> None:
    src = tmp_path / "src"
    write_2d_source(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".tmp-{dead.pid}-0000-import-out"  # left by a killed import
    (stale / "imagesTr").mkdir(parents=True)
    meta = assert_imported(run_import(src, out, "--overwrite", "--name", "Dataset_New"), out, src, tree_hashes(src))
    assert meta["name"] == "Dataset_New" and not (out / "old.txt").exists() and not stale.exists()


@pytest.mark.parametrize(("change", "message"), [
    ("size", "mask is 23x20 pixels, its image 00_img.tif is 24x20"),
    ("pages", "mask has 2 page(s), its image 00_img.tif has 1"),
])
def test_mask_that_does_not_fit_its_image_is_named(tmp_path: Path, write_2d_source, change: str,
                                                   message: str) -> None:
    src = tmp_path / "src"
    write_2d_source(src, image="{i:02d}_img.tif", mask="{i:02d}_mask.tif")
    mask = np.asarray(Image.open(src / "00_mask.tif"))
    if change == "size":
        Image.fromarray(mask[:, :-1]).save(src / "00_mask.tif")
    else:
        tifffile.imwrite(src / "00_mask.tif", np.stack([mask, mask]), photometric="minisblack")
    result = run_import(src, tmp_path / "out")
    assert result.exit_code == 2 and result.output.strip() == f"{src / '00_mask.tif'}: {message}"


@pytest.mark.parametrize(("text", "message"), [
    ("0=background", "at least two entries"),
    ("0=a;0=b", "value 0 given twice"),
    ("0=a;1=a", "name a given twice"),
    ("red=lesion;0=bg", "cannot read 'red=lesion'"),
    ("0,0,0=bg;300,0,0=x", "above 255"),
])
def test_parse_colors_errors(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_colors(text)


@pytest.mark.parametrize("module", ["import_rasters", "import_labels", "import_layout", "importer", "import_writer"])
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(f"automedseg.{module}"))
    assert result.failed == 0
