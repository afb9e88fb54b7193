"""Reading the 2D raster files ``automedseg import`` meets: PNG, GIF, JPEG, BMP and (multi-page) TIFF.

Every file is *probed* first (header only: pages, size, pixel kind) so pairing problems are found before a
single pixel is decoded, then read one page at a time. TIFF files are read with tifffile, which keeps 16-bit
RGB and float pages exact; when a page needs a codec tifffile lacks (LZW, JPEG without ``imagecodecs``)
Pillow decodes it instead, and a page Pillow would truncate (more than 8 bits per colour sample) is refused.
Other formats are read with Pillow; a palette file keeps its palette indices when read as a mask.

Kinds: ``grey`` (one value per pixel: ``uint8``, ``uint16``, ``int32`` or ``float32``), ``rgb`` (three 8- or
16-bit samples; alpha and CMYK are converted away) and ``palette`` (indices into a colour table).

Example:
    >>> import tempfile
    >>> from PIL import Image
    >>> path = Path(tempfile.mkdtemp()) / "a.png"
    >>> Image.fromarray(np.full((2, 3), 7, np.uint8)).save(path)
    >>> info = probe_raster(path)
    >>> info.kind, info.dtype, info.shape_yx, info.n_pages
    ('grey', 'uint8', (2, 3), 1)
    >>> next(read_pages(info)).tolist()
    [[7, 7, 7], [7, 7, 7]]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from automedseg.errors import InputError

RASTER_ENDINGS = (".png", ".gif", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TIFF_ENDINGS = (".tif", ".tiff")

# Pillow mode -> (kind, dtype of the array read)
_PIL_MODES = {
    "1": ("grey", "uint8"), "L": ("grey", "uint8"), "LA": ("grey", "uint8"),
    "I;16": ("grey", "uint16"), "I;16L": ("grey", "uint16"), "I;16B": ("grey", "uint16"),
    "I;16N": ("grey", "uint16"), "I": ("grey", "int32"), "F": ("grey", "float32"),
    "P": ("palette", "uint8"), "PA": ("palette", "uint8"),
    "RGB": ("rgb", "uint8"), "RGBA": ("rgb", "uint8"), "RGBX": ("rgb", "uint8"), "RGBa": ("rgb", "uint8"),
    "CMYK": ("rgb", "uint8"), "YCbCr": ("rgb", "uint8"), "LAB": ("rgb", "uint8"), "HSV": ("rgb", "uint8"),
}


@dataclass(frozen=True)
class RasterInfo:
    """What a raster file's header says.

    Attributes:
        path: The file.
        n_pages: Pages (TIFF) or frames (GIF); each becomes one case.
        shape_yx: Height and width in pixels.
        kind: ``grey``, ``rgb`` or ``palette``.
        dtype: NumPy dtype name of the values read (``uint8``, ``uint16``, ``int32``, ``float32``).
        reader: ``pil`` or ``tifffile``.
        grey_palette: For ``palette`` files: every palette colour is a grey (the file reads as grey).
    """

    path: Path
    n_pages: int
    shape_yx: tuple[int, int]
    kind: str
    dtype: str
    reader: str
    grey_palette: bool = False


def is_raster(path: Path) -> bool:
    """Whether ``path`` names a raster file this module reads (by its ending, case-insensitive).

    Example:
        >>> is_raster(Path("a/21_training.TIF")), is_raster(Path("notes.csv"))
        (True, False)
    """
    return path.name.lower().endswith(RASTER_ENDINGS)


def probe_raster(path: Path) -> RasterInfo:
    """Read the header of a raster file.

    Raises:
        InputError: The file cannot be read as an image, or its pages differ in size or kind.
    """
    path = Path(path)
    if path.name.lower().endswith(TIFF_ENDINGS):
        try:
            return _probe_tiff(path)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - not a TIFF tifffile understands: let Pillow try
            tiff_error = e
        try:
            return _probe_pil(path)
        except InputError as e:
            raise InputError(f"{path}: cannot read as TIFF ({_first_line(tiff_error)}) nor with Pillow "
                             f"({str(e).split(': ', 1)[-1]})") from None
    return _probe_pil(path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _probe_pil(path: Path) -> RasterInfo:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode, (width, height) = im.mode, im.size
            n_pages = int(getattr(im, "n_frames", 1))
            palette = im.getpalette() if mode in ("P", "PA") else None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read as an image ({_first_line(e)})") from None
    if mode not in _PIL_MODES:
        raise InputError(f"{path}: unsupported pixel mode {mode!r}")
    kind, dtype = _PIL_MODES[mode]
    grey_palette = bool(palette) and all(palette[i] == palette[i + 1] == palette[i + 2]
                                         for i in range(0, len(palette) - 2, 3))
    return RasterInfo(path, n_pages, (height, width), kind, dtype, "pil", grey_palette)


def _tiff_pages(tif) -> list:  # noqa: ANN001 - tifffile.TiffFile
    return [p for p in tif.pages if not getattr(p, "is_reduced", False)]  # thumbnails and pyramid levels


def _tiff_page_kind(page) -> tuple[tuple[int, int], str, str]:  # noqa: ANN001 - tifffile.TiffPage
    photometric = getattr(page.photometric, "name", str(page.photometric))
    samples = int(page.samplesperpixel)
    shape = tuple(int(v) for v in page.shape)
    if photometric == "PALETTE":
        kind = "palette"
    elif samples >= 3 or photometric in ("RGB", "YCBCR", "SEPARATED", "CIELAB"):
        kind = "rgb"
    elif samples == 1 or photometric in ("MINISBLACK", "MINISWHITE"):
        kind = "grey"
    else:
        raise InputError(f"{page.parent.filehandle.path}: {samples} samples per pixel ({photometric}) "
                         "is neither grey nor RGB")
    yx = shape[-3:-1] if kind == "rgb" and shape[-1] == samples else shape[-2:]
    dtype = np.dtype(page.dtype)
    if dtype.kind == "b" or (dtype.kind == "u" and dtype.itemsize == 1):
        name = "uint8"
    elif dtype.kind == "u" and dtype.itemsize == 2:
        name = "uint16"
    elif dtype.kind in "iu" and dtype.itemsize <= (4 if dtype.kind == "i" else 2):
        name = "int32"
    else:
        name = "float32" if dtype.kind == "f" and dtype.itemsize <= 4 else "float64"
    return (int(yx[0]), int(yx[1])), kind, name


def _probe_tiff(path: Path) -> RasterInfo:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        pages = _tiff_pages(tif)
        if not pages:
            raise InputError(f"{path}: TIFF without image pages")
        described = [_tiff_page_kind(p) for p in pages]
        colormap = pages[0].colormap if described[0][1] == "palette" else None
    if len(set(described)) > 1:
        first, other = described[0], next(d for d in described if d != described[0])
        raise InputError(f"{path}: TIFF pages differ ({first[0]} {first[1]} {first[2]} vs "
                         f"{other[0]} {other[1]} {other[2]}); split the stack first")
    (yx, kind, dtype) = described[0]
    grey_palette = colormap is not None and bool((np.ptp(np.asarray(colormap), axis=0) == 0).all())
    return RasterInfo(path, len(pages), yx, kind, dtype, "tifffile", grey_palette)


def read_pages(info: RasterInfo, *, palette_indices: bool = False) -> Iterator[np.ndarray]:
    """Yield the pages of a probed file as arrays: ``(Y, X)`` for grey and palette, ``(Y, X, 3)`` for RGB.

    Args:
        info: From :func:`probe_raster`.
        palette_indices: Keep palette indices (masks); otherwise palette pages are read as RGB, or as grey
            when every palette colour is grey.

    Raises:
        InputError: A page cannot be decoded, or is not the size or kind the header promised.
    """
    reader = _read_tiff_pages if info.reader == "tifffile" else _read_pil_pages
    for i, page in enumerate(reader(info, palette_indices=palette_indices)):
        if page.shape[:2] != info.shape_yx:
            raise InputError(f"{info.path}: page {i} is {page.shape[1]}x{page.shape[0]} pixels, "
                             f"page 0 is {info.shape_yx[1]}x{info.shape_yx[0]}")
        yield page


def _pil_page_array(im, info: RasterInfo, *, palette_indices: bool) -> np.ndarray:  # noqa: ANN001
    mode = im.mode
    if mode in ("P", "PA"):
        if palette_indices:
            return np.asarray(im.convert("P") if mode == "PA" else im, dtype=np.uint8)
        return np.asarray(im.convert("L" if info.grey_palette else "RGB"))
    if mode in ("1", "LA"):
        return np.asarray(im.convert("L"))
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":
        return np.asarray(im, dtype=np.int32)
    if mode == "F":
        return np.asarray(im, dtype=np.float32)
    if mode == "L":
        return np.asarray(im)
    if mode in _PIL_MODES:
        return np.asarray(im.convert("RGB"))
    raise InputError(f"{info.path}: unsupported pixel mode {mode!r}")


def _read_pil_pages(info: RasterInfo, *, palette_indices: bool, expect: tuple | None = None) -> Iterator[np.ndarray]:
    from PIL import Image

    try:
        with Image.open(info.path) as im:
            for i in range(info.n_pages):
                im.seek(i)
                if expect is not None and im.mode not in ("P", "PA") and _PIL_MODES.get(im.mode, ("", ""))[1] != \
                        expect[1]:
                    raise InputError(f"{info.path}: page {i} is {expect[1]} {expect[0]}, which Pillow would read as "
                                     f"{im.mode}; install imagecodecs (pip install imagecodecs) to read it exactly")
                yield _pil_page_array(im, info, palette_indices=palette_indices)
    except (OSError, ValueError, EOFError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{info.path}: cannot decode ({_first_line(e)})") from None


def _read_tiff_pages(info: RasterInfo, *, palette_indices: bool) -> Iterator[np.ndarray]:
    import tifffile

    with tifffile.TiffFile(info.path) as tif:
        for i, page in enumerate(_tiff_pages(tif)):
            try:
                arr = page.asarray()
            except ValueError as e:  # a codec tifffile lacks: Pillow decodes the remaining pages
                if "imagecodecs" not in str(e):
                    raise InputError(f"{info.path}: cannot decode page {i} ({_first_line(e)})") from None
                yield from list(_read_pil_pages(info, palette_indices=palette_indices,
                                                expect=(info.kind, info.dtype)))[i:]
                return
            yield _tiff_array(arr, page, info, palette_indices=palette_indices)


def _tiff_array(arr: np.ndarray, page, info: RasterInfo, *, palette_indices: bool) -> np.ndarray:  # noqa: ANN001
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if info.kind == "rgb":
        if arr.ndim == 3 and arr.shape[-1] != page.samplesperpixel and arr.shape[0] == page.samplesperpixel:
            arr = np.moveaxis(arr, 0, -1)  # planar (separate) samples
        arr = arr[..., :3]
    elif info.kind == "palette" and not palette_indices:
        colormap = np.asarray(page.colormap)  # (3, 2**bits), 16-bit
        rgb = (colormap[:, arr].transpose(1, 2, 0) // 257).astype(np.uint8)
        return rgb[..., 0] if info.grey_palette else rgb
    elif getattr(page.photometric, "name", "") == "MINISWHITE":
        arr = (np.iinfo(arr.dtype).max - arr) if np.issubdtype(arr.dtype, np.integer) else arr.max() - arr
    return arr.astype(info.dtype, copy=False)
