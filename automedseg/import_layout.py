"""Finding the images, masks and field-of-view masks of a 2D source folder for ``automedseg import``.

**Splits.** A source with a ``training``/``train``/``training_set`` subfolder reads its training cases there
and its test cases from a ``test``/``testing``/``test_set`` sibling; otherwise the source itself is the
training folder (and a ``test`` subfolder of it, if any, the test split).

**Folders of a split.** Images lie in the split folder itself (*flat*: masks beside them, told apart by a
suffix) or in an ``images``/``image``/``imgs`` subfolder (``--image-dir``), masks then in a sibling folder.

**Pairing.** A file's *key* is its stem without a suffix. The images' suffix is the one all image stems
share after a ``_``/``-`` (``21_training``, ``22_training`` -> ``21``, ``22``); a mask's suffix is
``--mask-suffix`` or, tried in turn, each of :data:`MASK_SUFFIXES`, none (same stem in another folder) and
the suffix all stems of a folder share. A mask pairs with the image whose stem or key equals the mask's key
(``603_HC_Annotation`` -> ``603_HC``; ``21_manual1`` -> ``21``, the key of ``21_training``). The (folder,
suffix) that pairs the most images wins; two that pair as many with different files are ambiguous and
refused. Field-of-view masks pair the same way with ``--fov-suffix``.

Example:
    >>> common_suffix(["21_training", "22_training", "40_training"])
    '_training'
    >>> common_suffix(["603_HC", "102_2HC"]), common_suffix(["00_img", "01_img", "05_maks"])
    ('', '_img')
"""

from __future__ import annotations

import csv
import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

from automedseg.errors import InputError
from automedseg.import_rasters import is_raster
from automedseg.io import DatasetError

TRAIN_DIRS = ("training", "train", "training_set", "trainingset", "training_data", "tr")
TEST_DIRS = ("test", "testing", "test_set", "testset", "testing_set", "test_data", "ts")
IMAGE_DIRS = ("images", "image", "imgs", "img", "input", "inputs", "raw")
MASK_SUFFIXES = ("_mask", "_masks", "_manual1", "_annotation", "_seg", "_segmentation", "_label", "_labels",
                 "_gt", "_lbl", "-mask", "-seg", "-label")
_SEPARATORS = "_- ."


@dataclass(frozen=True)
class Pair:
    """One source case: its id (the image key), image file and, when found, mask and field-of-view files."""

    case_id: str
    image: Path
    mask: Path | None = None
    fov: Path | None = None


@dataclass(frozen=True)
class Scheme:
    """Where a kind of mask lies: a folder (relative to the split folder, ``.`` = beside the images), a suffix."""

    folder: str
    suffix: str

    def describe(self) -> str:
        if self.folder == ".":
            return f"*{self.suffix}.* beside the images"
        return f"{self.folder}/*{self.suffix}.*" if self.suffix else f"{self.folder}/ (same names as the images)"


@dataclass
class SplitPairing:
    """The pairing of one split folder."""

    split_dir: Path
    image_dir: Path
    image_suffix: str
    pairs: list[Pair]
    mask_scheme: Scheme | None = None
    fov_scheme: Scheme | None = None
    unmatched: list[str] = field(default_factory=list)  # one line per image without mask or file without image
    ignored: dict[str, int] = field(default_factory=dict)  # folder -> raster files not used
    ids_from_stem: bool = False  # case ids are whole stems (masks named after them), not keys


def _key(stem: str, suffix: str) -> str | None:
    """``stem`` without ``suffix`` (case-insensitive), or None when it does not end with it."""
    if not suffix:
        return stem
    if len(stem) > len(suffix) and stem.lower().endswith(suffix.lower()):
        return stem[: -len(suffix)]
    return None


def stem_of(path: Path) -> str:
    """The file name without its (raster) ending: ``a.b.png`` -> ``a.b``."""
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def common_suffix(stems: list[str]) -> str:
    """The longest suffix, starting at a separator, that more than half of ``stems`` (at least 2) end with.

    A stray file (``05_maks`` among ``*_img``) does not hide the suffix the others share.
    """
    counts: dict[str, int] = {}
    for stem in stems:
        for i, ch in enumerate(stem):
            if ch in _SEPARATORS and i > 0:
                counts[stem[i:]] = counts.get(stem[i:], 0) + 1
    shared = [t for t, n in counts.items() if n >= 2 and 2 * n > len(stems)]
    return max(shared, key=len, default="")


def _matches(path: Path, base: Path, pattern: str | None) -> bool:
    if pattern is None:
        return True
    rel = path.relative_to(base).as_posix()
    return fnmatch.fnmatch(path.name, pattern) or fnmatch.fnmatch(rel, pattern)


def _rasters(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_raster(p))


def _subfolders(folder: Path, exclude: set[Path]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and p.resolve() not in exclude)


def find_splits(source: Path, *, test_source: Path | None = None, no_test: bool = False) -> tuple[Path, Path | None]:
    """The training and test folders of a source (see the module docstring).

    Raises:
        InputError: The source (or ``test_source``) is not a folder.
    """
    if not source.is_dir():
        raise InputError(f"{source}: source folder does not exist")
    subs = {p.name.lower(): p for p in _subfolders(source, set())}
    train = next((subs[n] for n in TRAIN_DIRS if n in subs), source)
    if no_test:
        return train, None
    if test_source is not None:
        if not test_source.is_dir():
            raise InputError(f"{test_source}: --test-source folder does not exist")
        return train, test_source
    test = next((subs[n] for n in TEST_DIRS if n in subs), None)
    if test is None and train != source:
        inner = {p.name.lower(): p for p in _subfolders(train, set())}
        test = next((inner[n] for n in TEST_DIRS if n in inner), None)
    return train, test


def _image_dir(split_dir: Path, image_dir: str | None, exclude: set[Path]) -> Path:
    if image_dir is not None:
        folder = split_dir / image_dir
        if not folder.is_dir():
            raise InputError(f"{folder}: --image-dir folder does not exist")
        return folder
    if _rasters(split_dir):
        return split_dir
    subs = {p.name.lower(): p for p in _subfolders(split_dir, exclude)}
    found = next((subs[n] for n in IMAGE_DIRS if n in subs), None)
    if found is None:
        raise InputError(f"{split_dir}: no image files here and no image folder ({', '.join(IMAGE_DIRS[:4])}, ...); "
                         "name it with --image-dir")
    return found


@dataclass
class _Candidate:
    scheme: Scheme
    files: dict[str, Path]  # key -> file
    images: list[Path]
    matched: dict[Path, Path]  # image -> file
    duplicates: list[str]
    by_stem: int = 0  # images matched by their whole stem (not by their key)


def _evaluate(folder: Path, split_dir: Path, suffix: str, image_dir: Path, images_all: list[Path],
              claimed: set[Path], glob: str | None) -> _Candidate:
    files: dict[str, Path] = {}
    duplicates: list[str] = []
    for p in _rasters(folder):
        key = _key(stem_of(p), suffix)
        if key is None or p in claimed or not _matches(p, split_dir, glob):
            continue
        if key in files:
            duplicates.append(f"{p}: same name as {files[key].name} (one mask per image)")
        files.setdefault(key, p)
    same = folder == image_dir
    images = [p for p in images_all if not (same and p in files.values()) and p not in claimed]
    stems = {stem_of(p): p for p in images}
    isuffix = common_suffix(list(stems))
    keys = {_key(s, isuffix) or s: p for s, p in stems.items()}
    matched: dict[Path, Path] = {}
    by_stem = 0
    for key, f in files.items():
        image = stems.get(key) or keys.get(key)
        if image is not None and image not in matched:
            matched[image] = f
            by_stem += key in stems
    rel = "." if same else folder.relative_to(split_dir).as_posix()
    if suffix and files:  # the suffix as the files spell it (matching ignores case)
        suffix = stem_of(next(iter(files.values())))[-len(suffix):]
    return _Candidate(Scheme(rel, suffix), files, images, matched, duplicates, by_stem)


def _best(candidates: list[_Candidate], what: str, option: str, split_dir: Path) -> _Candidate | None:
    top = max((len(c.matched) for c in candidates), default=0)
    if top == 0:
        return None
    best: dict[tuple[str, frozenset], _Candidate] = {}
    for c in candidates:
        if len(c.matched) == top:
            best.setdefault((c.scheme.folder, frozenset(c.matched.values())), c)
    if len(best) > 1:
        shown = " and ".join(f"{c.scheme.describe()} ({top} pairs)" for c in best.values())
        raise InputError(f"{split_dir}: {what} are ambiguous: {shown}; choose with {option} "
                         "(and name field-of-view masks with --fov-suffix)")
    return next(iter(best.values()))


def pair_split(split_dir: Path, *, image_dir: str | None = None, mask_suffix: str | None = None,
               fov_suffix: str | None = None, image_glob: str | None = None, mask_glob: str | None = None,
               mask_hint: Scheme | None = None, fov_hint: Scheme | None = None, need_masks: bool = True,
               exclude: tuple[Path, ...] = (), ids_from_stem: bool | None = None) -> SplitPairing:
    """Pair the images of one split folder with their masks and field-of-view masks.

    Args:
        split_dir: The split folder.
        image_dir: Subfolder holding the images (default: the split folder if it holds images, else an
            ``images``-like subfolder).
        mask_suffix: Mask suffix; default: auto-detected.
        fov_suffix: Field-of-view mask suffix; none: no field-of-view masks.
        image_glob: Only images whose name (or path under the split folder) matches.
        mask_glob: Only masks whose name (or path under the split folder) matches.
        mask_hint: The training split's mask scheme, for a test split (no search).
        fov_hint: The training split's field-of-view scheme, for a test split.
        need_masks: Refuse a split without masks (training).
        exclude: Folders that are not part of this split (the test folder inside a training folder).
        ids_from_stem: Case ids are whole image stems (True) or keys (False); default: whole stems when
            every mask is named after a whole image stem (``603_HC_Annotation``), else keys (``21``).

    Raises:
        InputError: No images, no masks where needed, or ambiguous masks.
    """
    excluded = {p.resolve() for p in exclude}
    idir = _image_dir(split_dir, image_dir, excluded)
    images_all = [p for p in _rasters(idir) if _matches(p, split_dir, image_glob)]
    if not images_all:
        raise InputError(f"{idir}: no image files" + (f" matching --image-glob {image_glob!r}" if image_glob else ""))
    folders = [idir] + [p for p in ([split_dir] if idir != split_dir else []) + _subfolders(split_dir, excluded)
                        if p != idir]

    def folder_of(hint: Scheme) -> Path | None:
        path = idir if hint.folder == "." else split_dir / hint.folder
        return path if path.is_dir() else None

    fov: _Candidate | None = None
    claimed: set[Path] = set()
    if fov_suffix or fov_hint:
        if fov_hint is not None:
            where = folder_of(fov_hint)
            fcands = [] if where is None else [_evaluate(where, split_dir, fov_hint.suffix, idir, images_all,
                                                         set(), None)]
        else:
            fcands = [_evaluate(f, split_dir, str(fov_suffix), idir, images_all, set(), None) for f in folders]
        fov = _best(fcands, "field-of-view masks", "--fov-suffix", split_dir)
        if fov is None and fov_hint is None:
            raise InputError(f"{split_dir}: no field-of-view masks named *{fov_suffix}.* pair with the images")
        claimed = set(fov.files.values()) if fov else set()

    if mask_hint is not None:
        where = folder_of(mask_hint)
        cands = [] if where is None else [_evaluate(where, split_dir, mask_hint.suffix, idir, images_all, claimed,
                                                    mask_glob)]
    else:
        cands = []
        for f in folders:
            if mask_suffix is not None:
                suffixes = [mask_suffix]
            elif f == idir:  # beside the images: only the usual mask suffixes (the shared one is the images')
                suffixes = list(MASK_SUFFIXES)
            else:
                shared = common_suffix([stem_of(p) for p in _rasters(f) if p not in claimed])
                suffixes = list(dict.fromkeys([*MASK_SUFFIXES, "", shared]))
            cands += [_evaluate(f, split_dir, s, idir, images_all, claimed, mask_glob)
                      for s in suffixes if s or f != idir]
    mask = _best(cands, "masks", "--mask-suffix or --mask-glob", split_dir)
    if mask is None and need_masks:
        tried = f"*{mask_suffix}.*" if mask_suffix is not None else f"suffixes {', '.join(MASK_SUFFIXES[:6])}, ..."
        raise InputError(f"{split_dir}: no masks pair with the images in {idir.name}/ (tried {tried} in "
                         f"{', '.join(f.name + '/' for f in folders)}); name them with --mask-suffix")
    if ids_from_stem is None:
        ids_from_stem = mask is not None and mask.by_stem == len(mask.matched)
    return _pairing(split_dir, idir, images_all, mask, fov, claimed, excluded, orphans=image_glob is None,
                    ids_from_stem=ids_from_stem)


def _pairing(split_dir: Path, idir: Path, images_all: list[Path], mask: _Candidate | None,
             fov: _Candidate | None, claimed: set[Path], excluded: set[Path], *, orphans: bool,
             ids_from_stem: bool) -> SplitPairing:
    """The pairs; ``orphans``: masks without an image are problems (not when --image-glob left images out)."""
    images = mask.images if mask else [p for p in images_all if p not in claimed]
    isuffix = "" if ids_from_stem else common_suffix([stem_of(p) for p in images])
    unmatched: list[str] = list(mask.duplicates) if mask else []
    problems: list[str] = []
    ids: dict[str, Path] = {}
    pairs = []
    for image in images:
        key = _key(stem_of(image), isuffix) or stem_of(image)
        case_id = re.sub(r"[^A-Za-z0-9_-]+", "_", key).strip("_") or "case"
        if case_id in ids:
            problems.append(f"{image}: case name {case_id!r} is also that of {ids[case_id].name}; rename one")
        ids[case_id] = image
        if mask is not None and image not in mask.matched:
            unmatched.append(f"{image}: no mask ({mask.scheme.describe()})")
            continue
        m = mask.matched[image] if mask else None
        f = fov.matched.get(image) if fov else None
        if fov is not None and f is None:
            unmatched.append(f"{image}: no field-of-view mask ({fov.scheme.describe()})")
            continue
        pairs.append(Pair(case_id, image, m, f))
    for cand, what in ((mask, "mask"), (fov, "field-of-view mask")):
        if cand is not None and orphans:
            unmatched += [f"{p}: {what} without an image" for p in sorted(set(cand.files.values())
                                                                             - set(cand.matched.values()))]
    if problems:
        raise DatasetError(problems)
    used = {p.image for p in pairs} | {p.mask for p in pairs} | {p.fov for p in pairs} | set(images)
    used |= set(mask.files.values()) if mask else set()
    used |= set(fov.files.values()) if fov else set()
    ignored: dict[str, int] = {}
    for folder in [split_dir, *_subfolders(split_dir, excluded)]:
        if folder.is_dir():
            n = sum(1 for p in _rasters(folder) if p not in used)
            if n:
                ignored[folder.relative_to(split_dir).as_posix()] = n
    return SplitPairing(split_dir, idir, isuffix, pairs, mask.scheme if mask else None,
                        fov.scheme if fov else None, unmatched, ignored, ids_from_stem)


def read_spacing_csv(path: Path, images: list[Path], *, name_column: str | None = None,
                     spacing_columns: tuple[str, ...] = ()) -> tuple[dict[Path, tuple[float, float]], str]:
    """Pixel spacing (y, x) in mm per image from a CSV file.

    Args:
        path: The CSV (``,``, ``;`` or tab separated, with a header row).
        images: The image files to find; a row names one by file name or by stem.
        name_column: Column with the file names; default: the column naming the most images.
        spacing_columns: One column (isotropic pixels) or two (y, then x); default: the one column whose
            header says spacing or pixel size.

    Returns:
        Spacing per image and a description of where it came from.

    Raises:
        DatasetError: Unknown columns, unreadable values, images without a row (all listed).
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the spacing CSV ({e})") from None
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    rows = list(csv.reader(text.splitlines(), dialect))
    if len(rows) < 2:
        raise InputError(f"{path}: the spacing CSV needs a header row and one row per image")
    header = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in header]

    def column(name: str, option: str) -> int:
        if name.strip().lower() not in lower:
            raise InputError(f"{path}: no column {name!r} ({option}); columns: {', '.join(header)}")
        return lower.index(name.strip().lower())

    by_name = {p.name.lower(): p for p in images} | {stem_of(p).lower(): p for p in images}
    if name_column is not None:
        icol = column(name_column, "--name-column")
    else:
        hits = [sum(1 for r in rows[1:] if len(r) > i and r[i].strip().lower() in by_name) for i in range(len(header))]
        if max(hits, default=0) == 0:
            raise InputError(f"{path}: no column names the images; give it with --name-column")
        icol = hits.index(max(hits))
    if spacing_columns:
        if len(spacing_columns) > 2:
            raise InputError("--spacing-column: give one column (square pixels) or two (y, then x)")
        scols = [column(c, "--spacing-column") for c in spacing_columns]
    else:
        for pattern in (r"spacing", r"pixel.?size|pixel.?spacing|resolution", r"\bmm\b|\(mm\)"):
            found = [i for i, h in enumerate(lower) if i != icol and re.search(pattern, h)]
            if len(found) == 1:
                scols = found
                break
            if len(found) > 1:
                names = ", ".join(header[i] for i in found)
                raise InputError(f"{path}: columns {names} could each hold the spacing; choose with --spacing-column")
        else:
            raise InputError(f"{path}: no spacing column found; give it with --spacing-column")
    problems: list[str] = []
    table: dict[Path, tuple[float, float]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) <= max(icol, *scols) or not row[icol].strip():
            continue
        image = by_name.get(row[icol].strip().lower())
        if image is None:
            continue
        try:
            values = [float(row[c]) for c in scols]
        except ValueError:
            problems.append(f"{path}:{line}: spacing {', '.join(row[c] for c in scols)!r} is not a number")
            continue
        if not all(v > 0 and v < float("inf") for v in values):
            problems.append(f"{path}:{line}: spacing must be positive, got {', '.join(row[c] for c in scols)}")
            continue
        table[image] = (values[0], values[-1])
    problems += [f"{p}: no row in {path.name} (column {header[icol]!r})" for p in images if p not in table]
    if problems:
        raise DatasetError(problems)
    what = " and ".join(repr(header[c]) for c in scols)
    return table, f"{path} column {what} by {header[icol]!r}"
