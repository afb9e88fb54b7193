"""Overlay tests: palette colours per label, the reference contour, the legend, the PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from automedseg.overlays import (
    PALETTE,
    REFERENCE_COLOUR,
    LegendEntry,
    add_legend,
    label_colours,
    label_order,
    legend_entries,
    overlay_slices,
    render_overlay,
    save_overlay,
)


def _two_squares() -> tuple[np.ndarray, np.ndarray]:
    """A black image (1, 12, 12) and a label map: label 1 at [2:6, 2:6], label 2 at [7:11, 7:11]."""
    image = np.zeros((1, 12, 12), np.float32)
    seg = np.zeros((1, 12, 12), np.uint8)
    seg[0, 2:6, 2:6] = 1
    seg[0, 7:11, 7:11] = 2
    return image, seg


@pytest.mark.parametrize("labels, colour_of_1, colour_of_2", [
    (None, PALETTE[0], PALETTE[1]),  # found values, sorted
    ([1, 2], PALETTE[0], PALETTE[1]),
    ([2, 1], PALETTE[1], PALETTE[0]),  # declared order fixes the colours
    ([5, 2], PALETTE[2], PALETTE[1]),  # declared 5 absent here keeps its colour; 1 appended after
])
def test_each_label_gets_its_palette_colour(labels: list[int] | None, colour_of_1: tuple[float, ...],
                                            colour_of_2: tuple[float, ...]) -> None:
    image, seg = _two_squares()
    rgb = overlay_slices(image, seg, labels=labels, fill_alpha=0.4)
    assert rgb.shape == (12, 12, 3)
    np.testing.assert_allclose(rgb[2, 2], colour_of_1)  # edges in the full colour
    np.testing.assert_allclose(rgb[5, 3], colour_of_1)
    np.testing.assert_allclose(rgb[7, 7], colour_of_2)
    np.testing.assert_allclose(rgb[3, 3], 0.4 * np.asarray(colour_of_1))  # fill blended over black
    np.testing.assert_allclose(rgb[8, 9], 0.4 * np.asarray(colour_of_2))
    np.testing.assert_allclose(rgb[0, 11], 0.0)  # background stays grey (black here)
    assert colour_of_1 != colour_of_2


def test_reference_contour_is_drawn_just_outside_the_reference() -> None:
    image, seg = _two_squares()
    reference = np.zeros_like(seg)
    reference[0, 2:6, 2:6] = 1  # label 2 has no reference here
    rgb = overlay_slices(image, seg, reference=reference)
    ring = [(1, 1), (1, 3), (6, 6), (3, 6), (6, 2)]
    for y, x in ring:
        np.testing.assert_allclose(rgb[y, x], REFERENCE_COLOUR, err_msg=str((y, x)))
    np.testing.assert_allclose(rgb[2, 2], PALETTE[0])  # the prediction's edge inside it stays visible
    np.testing.assert_allclose(rgb[7, 7], PALETTE[1])
    np.testing.assert_allclose(rgb[0, 0], 0.0)
    assert not np.allclose(rgb[8, 11], REFERENCE_COLOUR)  # no contour around label 2


def test_without_reference_no_white_contour() -> None:
    image, seg = _two_squares()
    rgb = overlay_slices(image, seg)
    assert not np.all(rgb == 1.0, axis=-1).any()


@pytest.mark.parametrize("n_labels, index_of_last", [(1, 0), (7, 6), (8, 0), (10, 2)])
def test_palette_cycles(n_labels: int, index_of_last: int) -> None:
    colours = label_colours(list(range(1, n_labels + 1)))
    assert colours[n_labels] == PALETTE[index_of_last]
    assert len(set(colours.values())) == min(n_labels, len(PALETTE))


def test_palette_colours_are_distinct_and_not_grey() -> None:
    assert len(set(PALETTE)) == len(PALETTE) == 7
    assert all(max(c) - min(c) > 0.2 for c in PALETTE)  # never mistaken for the grey image


@pytest.mark.parametrize("labels, seg_values, ref_values, expected", [
    (None, [0, 2, 1], None, [1, 2]),
    ([3, 1], [0, 1, 2], None, [3, 1, 2]),
    ([0, 1], [0], [0, 4], [1, 4]),  # background never listed; reference-only values appended
])
def test_label_order(labels: list[int] | None, seg_values: list[int], ref_values: list[int] | None,
                     expected: list[int]) -> None:
    ref = None if ref_values is None else np.array(ref_values)
    assert label_order(np.array(seg_values), reference=ref, labels=labels) == expected


@pytest.mark.parametrize("labels, names, reference, expected", [
    ([1, 2], {1: "liver", 2: "tumour"}, False, ["1: liver", "2: tumour"]),
    ([1, 2], None, False, ["label 1", "label 2"]),
    ([1, 2], {1: "liver"}, True, ["1: liver", "label 2", "reference contour"]),
    ([3], {3: "3"}, False, ["label 3"]),  # a name that is only the value
    ([], None, True, ["reference contour"]),
])
def test_legend_entries(labels: list[int], names: dict[int, str] | None, reference: bool,
                        expected: list[str]) -> None:
    entries = legend_entries(labels, label_names=names, reference=reference)
    assert [e.text for e in entries] == expected
    assert [e.colour for e in entries[:len(labels)]] == [PALETTE[i] for i in range(len(labels))]
    if reference:
        assert entries[-1].colour == REFERENCE_COLOUR


def test_add_legend_appends_a_strip_with_swatches_and_text() -> None:
    rgb = np.zeros((40, 300, 3))
    entries = [LegendEntry("1: liver", PALETTE[0]), LegendEntry("2: tumour", PALETTE[1])]
    out = add_legend(rgb, entries, font_px=13)
    assert out.shape[1] == 300 and out.shape[0] > 40
    np.testing.assert_array_equal(out[:40], rgb)
    strip = (out[40:] * 255).round().astype(int)
    for colour in (PALETTE[0], PALETTE[1]):
        assert np.all(strip == np.round(np.asarray(colour) * 255).astype(int), axis=-1).sum() >= 50
    blank = (add_legend(rgb, [LegendEntry("", e.colour) for e in entries])[40:] * 255).round()
    assert (strip.max(-1) < 100).sum() > (blank.max(-1) < 100).sum() + 30  # dark text pixels
    assert add_legend(rgb, []) is rgb


def test_add_legend_wraps_and_widens() -> None:
    rgb = np.zeros((20, 60, 3))
    one = add_legend(rgb, [LegendEntry("a", PALETTE[0])])
    three = add_legend(rgb, [LegendEntry("a", PALETTE[0]), LegendEntry("b", PALETTE[1]),
                             LegendEntry("c", PALETTE[2])])
    assert three.shape[0] > one.shape[0]  # wrapped into more rows
    wide = add_legend(rgb, [LegendEntry("a very long label name that does not fit", PALETTE[0])])
    assert wide.shape[1] > 60
    np.testing.assert_array_equal(wide[:20, 60:], 1.0)  # padded with white


def test_render_overlay_is_the_upscaled_slices_over_the_legend() -> None:
    image, seg = _two_squares()
    names = {1: "outer", 2: "core"}
    out = render_overlay(image, seg, reference=seg, label_names=names, scale=4, gap=0)
    top = np.repeat(np.repeat(overlay_slices(image, seg, reference=seg, labels=[1, 2]), 4, 0), 4, 1)
    assert out.shape[0] > 48
    np.testing.assert_array_equal(out[:48, :48], top)


def test_save_overlay_writes_a_png(tmp_path: Path) -> None:
    image, seg = _two_squares()
    path = tmp_path / "sub" / "case.png"
    save_overlay(image, seg, path, label_names={1: "outer"}, scale=2)
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size[1] > 24  # the legend below the 12 x 2 pixel slices
    assert [p.name for p in path.parent.iterdir()] == ["case.png"]


@pytest.mark.parametrize("gap, width", [(0, 3 * 10), (2, 3 * 10 + 2 * 2)])
def test_overlay_slices_gap(gap: int, width: int) -> None:
    image = np.random.default_rng(0).normal(size=(6, 8, 10)).astype(np.float32)
    seg = np.zeros((6, 8, 10), np.uint8)
    seg[1:5, 2:6, 2:7] = 1
    rgb = overlay_slices(image, seg, reference=seg, n_slices=3, gap=gap)
    assert rgb.shape == (8, width, 3)


def test_overlay_slices_accepts_2d_arrays() -> None:
    image, seg = _two_squares()
    rgb = overlay_slices(image[0], seg[0], reference=seg[0])
    assert rgb.shape == (12, 12, 3)
