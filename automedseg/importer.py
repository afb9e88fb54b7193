"""``automedseg import``: turn a folder of 2D images and masks into an nnU-Net v2 raw dataset.

The source is only read. Its layout is found by :mod:`automedseg.import_layout` (splits, folders, pairing
by name), files are read by :mod:`automedseg.import_rasters` and masks become labels 0..K-1 through
:mod:`automedseg.import_labels`. Everything that can be checked before writing is checked first (pairing,
sizes, page counts, mask values, spacing), and every problem is reported at once.

Output (built in a hidden sibling folder, then renamed into place, so a reader never sees half a dataset)::

    dataset.json         channel_names, labels, numTraining, numTest, file_ending[, spacing_2d_mm][, fov]
    imagesTr/CASE_0000.png   one RGB file for colour images (or _0000/_0001/_0002 as NIfTI)
    labelsTr/CASE.png        uint8 labels 0..K-1
    imagesTs/, labelsTs/     the test split (labels when its masks exist)
    fovTr/, fovTs/           field-of-view masks (uint8 0/1), same names as the labels
    import_report.json       what was inferred and where each case came from

Images are written as PNG (8- or 16-bit grey, RGB) unless they need NIfTI (``.nii.gz``, 2D, spacing in
the header): when the pixel spacing differs between images (PNG cannot carry it; a spacing shared by all
goes to ``dataset.json`` as ``spacing_2d_mm``) or the pixels are signed or floating point.

Example:
    >>> report = import_dataset(Path("DRIVE"), Path("Dataset_DRIVE"), mask_suffix="_manual1",
    ...                         fov_suffix="_mask")  # doctest: +SKIP
    >>> report["counts"]  # doctest: +SKIP
    {'training': 20, 'test': 20, 'test_with_labels': 20}
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from automedseg.errors import InputError
from automedseg.import_labels import (
    LabelTable,
    as_kind,
    combine_kinds,
    count_codes,
    given_table,
    infer_table,
    mask_kind,
    page_codes,
    parse_colors,
    unknown_message,
)
from automedseg.import_layout import Pair, SplitPairing, find_splits, pair_split, read_spacing_csv
from automedseg.import_rasters import RasterInfo, probe_raster, read_pages
from automedseg.import_writer import ImportCase, write_dataset
from automedseg.io import DatasetError

FORMATS = ("auto", "png", "nifti")


def check_paths(source: Path, output: Path, *, test_source: Path | None = None, overwrite: bool = False) -> None:
    """Refuse an output that is, contains or lies inside a source, and a non-empty output without ``overwrite``.

    Raises:
        InputError: Naming the folders.
    """
    out = output.resolve()
    for src in (source, test_source):
        if src is None:
            continue
        s = src.resolve()
        if out == s or s in out.parents:
            raise InputError(f"{output}: the output lies inside the source {src}; write it elsewhere "
                             "(the source is only read)")
        if out in s.parents:
            raise InputError(f"{output}: the output folder contains the source {src}; write it elsewhere")
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise InputError(f"{output}: exists and is not empty; pass --overwrite to replace it")


def import_dataset(source: Path, output: Path, *, test_source: Path | None = None, no_test: bool = False,
                   image_dir: str | None = None, mask_suffix: str | None = None, fov_suffix: str | None = None,
                   image_glob: str | None = None, mask_glob: str | None = None, skip_unmatched: bool = False,
                   colors: str | None = None, snap_colors: bool = False, fill_outlines: bool = False,
                   spacing_csv: Path | None = None, spacing_columns: tuple[str, ...] = (),
                   name_column: str | None = None, spacing_mm: tuple[float, float] | None = None,
                   channel_names: tuple[str, ...] = (), name: str | None = None, output_format: str = "auto",
                   overwrite: bool = False, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Import a 2D source folder as an nnU-Net v2 raw dataset (see the module docstring and the README).

    Args:
        source: Folder with the images and masks (read only).
        output: Dataset folder to create.
        test_source: Folder of the test split (default: a ``test``-like subfolder, if any).
        no_test: Import no test split.
        image_dir: Subfolder of each split holding the images (default: auto).
        mask_suffix: Mask name = image name (or its key) + this (default: auto-detected).
        fov_suffix: Field-of-view masks are named with this suffix (default: none).
        image_glob: Only images whose name or path matches.
        mask_glob: Only masks whose name or path matches.
        skip_unmatched: Import the complete pairs and report the rest instead of refusing.
        colors: Label table ``"0,0,0=background;255,0,0=lesion"`` (default: inferred).
        snap_colors: Map mask values not in ``colors`` to the nearest listed value.
        fill_outlines: Masks are closed outlines: fill them.
        spacing_csv: CSV with the pixel spacing of each image.
        spacing_columns: Its spacing column (or y and x columns).
        name_column: Its file name column.
        spacing_mm: Pixel spacing (y, x) of every image.
        channel_names: Channel names for ``dataset.json`` (default ``image``, or ``R``, ``G``, ``B``).
        name: Dataset name (default: the output folder's name).
        output_format: ``auto``, ``png`` or ``nifti``.
        overwrite: Replace a non-empty output folder.
        log: Receives the lines describing what was inferred.

    Returns:
        The report, also written to ``import_report.json``.

    Raises:
        InputError: A path or option is wrong, or the layout is ambiguous.
        DatasetError: Problems in the source files (all listed, one per line).
    """
    source, output = Path(source), Path(output)
    if output_format not in FORMATS:
        raise InputError(f"--format: {output_format!r} is not one of {', '.join(FORMATS)}")
    if snap_colors and not colors:
        raise InputError("--snap-colors needs --colors (the values to snap to)")
    if spacing_csv is not None and spacing_mm is not None:
        raise InputError("--spacing-csv and --spacing-mm exclude each other")
    table_given = parse_colors(colors) if colors else None
    check_paths(source, output, test_source=test_source, overwrite=overwrite)
    train_dir, test_dir = find_splits(source, test_source=test_source, no_test=no_test)
    exclude = (test_dir,) if test_dir is not None and train_dir.resolve() in test_dir.resolve().parents else ()
    kw = {"image_glob": image_glob, "mask_glob": mask_glob}
    train = pair_split(train_dir, image_dir=image_dir, mask_suffix=mask_suffix, fov_suffix=fov_suffix,
                       exclude=exclude, **kw)
    test = None
    if test_dir is not None:
        rel = train.image_dir.relative_to(train_dir).as_posix() if train.image_dir != train_dir else None
        test_image_dir = image_dir or (rel if rel and (test_dir / rel).is_dir() else None)
        test = pair_split(test_dir, image_dir=test_image_dir, mask_hint=train.mask_scheme, fov_hint=train.fov_scheme,
                          need_masks=False, ids_from_stem=train.ids_from_stem, **kw)
    unmatched = train.unmatched + (test.unmatched if test else [])
    if unmatched and not skip_unmatched:
        raise DatasetError([*unmatched, "(--skip-unmatched imports the complete pairs and lists the rest)"])

    cases, problems = _probe_cases(train, test)
    spacing_note, spacings = _spacings(cases, spacing_csv, spacing_columns, name_column, spacing_mm)
    cases = [replace(c, spacing_yx=spacings.get(c.image.path)) for c in cases]
    table, mask_problems = _label_table(cases, table_given, snap_colors, str(train_dir))
    problems += mask_problems
    if problems:
        raise DatasetError(problems)
    n_channels = 3 if any(_is_colour(c.image) for c in cases) else 1
    names = _channel_names(channel_names, n_channels, eight_bit=all(c.image.dtype == "uint8" for c in cases))
    ending, format_note = _choose_format(cases, output_format, spacings)

    summary = _summary(source, train, test, cases, table, names, ending, spacing_note, format_note, fill_outlines)
    for line in summary:
        log(line)

    report = {
        "source": str(source.resolve()),
        "training_folder": str(train_dir), "test_folder": str(test_dir) if test_dir else None,
        "pairing": {key: _pairing_json(split) for key, split in (("training", train), ("test", test)) if split},
        "skipped": unmatched,
        "mask_kind": table.kind, "label_table_source": table.source, "snap_colors": table.snap,
        "labels": table.to_json(), "fill_outlines": fill_outlines,
        "channels": list(names), "file_ending": ending, "format_reason": format_note,
        "spacing": spacing_note,
        "counts": {"training": sum(c.split == "training" for c in cases),
                   "test": sum(c.split == "test" for c in cases),
                   "test_with_labels": sum(c.split == "test" and c.mask is not None for c in cases)},
        "summary": summary,
    }
    write_dataset(output, cases, table=table, channel_names=names, ending=ending, fill=fill_outlines,
                  name=name or output.name, source=source, report=report, overwrite=overwrite)
    log(f"wrote {output}: {report['counts']['training']} training, {report['counts']['test']} test case(s)"
        f" ({report['counts']['test_with_labels']} with labels); report: {output / 'import_report.json'}")
    return report


def _probe(path: Path, problems: list[str]) -> RasterInfo | None:
    try:
        return probe_raster(path)
    except InputError as e:
        problems.append(str(e))
        return None


def _probe_cases(train: SplitPairing, test: SplitPairing | None) -> tuple[list[ImportCase], list[str]]:
    problems: list[str] = []
    cases: list[ImportCase] = []
    for split, pairing in (("training", train), ("test", test)):
        for pair in pairing.pairs if pairing is not None else []:
            cases += _expand(split, pair, problems)
    return cases, problems


def _expand(split: str, pair: Pair, problems: list[str]) -> list[ImportCase]:
    image = _probe(pair.image, problems)
    mask = _probe(pair.mask, problems) if pair.mask else None
    fov = _probe(pair.fov, problems) if pair.fov else None
    if image is None or (pair.mask and mask is None) or (pair.fov and fov is None):
        return []
    bad = False
    for other, what in ((mask, "mask"), (fov, "field-of-view mask")):
        if other is None:
            continue
        if other.shape_yx != image.shape_yx:
            problems.append(f"{other.path}: {what} is {other.shape_yx[1]}x{other.shape_yx[0]} pixels, its image "
                            f"{image.path.name} is {image.shape_yx[1]}x{image.shape_yx[0]}")
            bad = True
        elif other.n_pages != image.n_pages:
            problems.append(f"{other.path}: {what} has {other.n_pages} page(s), its image {image.path.name} "
                            f"has {image.n_pages}")
            bad = True
    if bad:
        return []
    if image.n_pages == 1:
        return [ImportCase(pair.case_id, split, image, mask, fov, None)]
    width = max(3, len(str(image.n_pages - 1)))
    return [ImportCase(f"{pair.case_id}_z{p:0{width}d}", split, image, mask, fov, p) for p in range(image.n_pages)]


def _spacings(cases: list[ImportCase], spacing_csv: Path | None, columns: tuple[str, ...], name_column: str | None,
              spacing_mm: tuple[float, float] | None) -> tuple[str, dict[Path, tuple[float, float]]]:
    images = sorted({c.image.path for c in cases})
    if spacing_csv is not None:
        table, where = read_spacing_csv(Path(spacing_csv), images, name_column=name_column, spacing_columns=columns)
        return f"from {where}", table
    if spacing_mm is not None:
        if not all(v > 0 for v in spacing_mm):
            raise InputError(f"--spacing-mm must be positive, got {spacing_mm}")
        return "--spacing-mm", {p: (float(spacing_mm[0]), float(spacing_mm[-1])) for p in images}
    return "none given (1 mm pixels)", {}


def _label_table(cases: list[ImportCase], given: LabelTable | None, snap: bool,
                 where: str) -> tuple[LabelTable, list[str]]:
    """Read every mask page once: the dataset's mask kind, value counts and, with ``given``, unknown values."""
    problems: list[str] = []
    per_file: dict[Path, dict[str, Counter]] = {}  # path -> page kind -> code counts
    by_index = given is None  # a given table names palette masks' colours; an inferred one follows indices
    for info in dict.fromkeys(c.mask for c in cases if c.mask is not None):
        by_kind: dict[str, Counter] = {}
        try:
            for page in read_pages(info, palette_indices=by_index):
                codes, kind = page_codes(page, mask_kind(info.kind, by_index=by_index))
                by_kind.setdefault(kind, Counter()).update(count_codes(codes))
        except (InputError, ValueError) as e:
            problems.append(str(e) if str(info.path) in str(e) else f"{info.path}: {e}")
            continue
        per_file[info.path] = by_kind
    if problems:
        return LabelTable("grey", ()), problems
    kind = combine_kinds(Counter(k for by_kind in per_file.values() for k in by_kind))
    merged: dict[Path, dict[int, int]] = {}
    for path, by_kind in per_file.items():
        merged[path] = {}
        for k, counts in by_kind.items():
            if kind == "rgb" and k != "rgb" and max(counts, default=0) > 255:
                problems.append(f"{path}: grey values above 255 among colour masks")
            for code, n in as_kind(dict(counts), k, kind).items():
                merged[path][code] = merged[path].get(code, 0) + n
    if problems:
        return LabelTable(kind, ()), problems
    total: Counter = Counter()
    for counts in merged.values():
        total.update(counts)
    if given is None:
        return infer_table(total, kind, where=where), []
    table = given_table(replace(given, snap=snap), kind, total)
    if not snap:
        known = {e.code for e in table.entries}
        for path, counts in merged.items():
            unknown = {c: n for c, n in counts.items() if c not in known}
            if unknown:
                problems.append(unknown_message(str(path), unknown, kind))
    return table, problems


def _is_colour(info: RasterInfo) -> bool:
    return info.kind == "rgb" or (info.kind == "palette" and not info.grey_palette)


def _channel_names(given: tuple[str, ...], n_channels: int, *, eight_bit: bool) -> tuple[str, ...]:
    """Default names: ``R, G, B`` (normalised by / 255) for 8-bit colour, ``R16, G16, B16`` (z-score) for 16-bit."""
    if not given:
        return (("R", "G", "B") if eight_bit else ("R16", "G16", "B16")) if n_channels == 3 else ("image",)
    if len(given) != n_channels:
        raise InputError(f"--channel-names: {len(given)} name(s) given, the images have {n_channels} channel(s)")
    return tuple(given)


def _choose_format(cases: list[ImportCase], output_format: str,
                   spacings: dict[Path, tuple[float, float]]) -> tuple[str, str]:
    distinct = set(spacings.values())
    dtypes = {c.image.dtype for c in cases}
    reasons = []
    if len(distinct) > 1:
        reasons.append(f"the pixel spacing differs between images ({len(distinct)} values) and PNG cannot carry it")
    if dtypes - {"uint8", "uint16"}:
        reasons.append(f"{'/'.join(sorted(dtypes - {'uint8', 'uint16'}))} pixels do not fit PNG")
    if output_format == "png" and reasons:
        raise InputError(f"--format png: {'; '.join(reasons)}; use --format nifti (or auto)")
    if output_format == "nifti" or reasons:
        return ".nii.gz", "2D NIfTI: " + ("; ".join(reasons) if reasons else "--format nifti")
    return ".png", "PNG" + (f" (spacing {next(iter(distinct))} mm in dataset.json spacing_2d_mm)" if distinct else "")


def _pairing_json(split: SplitPairing) -> dict[str, Any]:
    return {
        "folder": str(split.split_dir), "images": str(split.image_dir), "image_suffix": split.image_suffix,
        "masks": split.mask_scheme.describe() if split.mask_scheme else None,
        "fov": split.fov_scheme.describe() if split.fov_scheme else None,
        "pairs": len(split.pairs), "ignored_files": split.ignored,
    }


def _summary(source: Path, train: SplitPairing, test: SplitPairing | None, cases: list[ImportCase],
             table: LabelTable, names: tuple[str, ...], ending: str, spacing_note: str, format_note: str,
             fill: bool) -> list[str]:
    lines = []
    for split, pairing in (("training", train), ("test", test)):
        if pairing is None:
            lines.append(f"{split}: none")
            continue
        n = sum(c.split == split for c in cases)
        rel = pairing.image_dir.relative_to(source) if source in pairing.image_dir.parents else pairing.image_dir
        pages = f" ({n} pages)" if n != len(pairing.pairs) else ""
        key = f", case name = file name without {pairing.image_suffix!r}" if pairing.image_suffix else ""
        lines.append(f"{split}: {len(pairing.pairs)} image(s){pages} in {rel}/{key}")
        if pairing.mask_scheme:
            n_masks = sum(p.mask is not None for p in pairing.pairs)
            lines.append(f"  masks: {pairing.mask_scheme.describe()} ({n_masks})")
        else:
            lines.append("  masks: none")
        if pairing.fov_scheme:
            lines.append(f"  field of view: {pairing.fov_scheme.describe()}")
        for folder, count in pairing.ignored.items():
            lines.append(f"  ignored: {folder}/ ({count} file(s) not paired)")
    kind = {"grey": "grey values", "palette": "palette indices", "rgb": "RGB colours"}[table.kind]
    lines.append(f"labels ({kind}, {'given by --colors' if table.source != 'inferred' else 'inferred'}"
                 f"{', nearest value for others' if table.snap else ''}{', outlines filled' if fill else ''}):")
    lines += [f"  {line}" for line in table.describe()]
    dtypes = "/".join(sorted({c.image.dtype for c in cases}))
    lines.append(f"images: {len(names)} channel(s) {', '.join(names)} ({dtypes}) -> {format_note}")
    lines.append(f"spacing: {spacing_note}")
    return lines
