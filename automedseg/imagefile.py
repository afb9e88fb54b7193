"""Check an image file against its own header before SimpleITK reads it.

SimpleITK trusts headers: it zero-fills a truncated NIfTI, allocates whatever a header claims (4 GB from a
26 KB file) before it notices the data is short, reads NaN and infinite floats in NIfTI as 0, and silently
replaces a zero ``pixdim`` by 1 mm. :func:`check_image_file` reads the header itself and streams the voxel
data once, in chunks (memory stays bounded by the chunk size), so such files fail fast with a message that
names the file. It is called by :func:`automedseg.io.read_image_file` before every read.

What is checked, per format:

* Every file: it exists, is a regular file, and can be opened ("permission denied" when it exists but
  cannot be read, rather than "missing").
* NIfTI-1 and NIfTI-2 (``.nii``, ``.nii.gz``; either byte order; gzip recognised by its magic bytes, as ITK
  does): ``dim``, ``datatype``, ``vox_offset``; the spacing (``pixdim``) of every spatial axis must be a
  positive finite number; the voxel data after ``vox_offset`` must be exactly prod(dim) x bytes per voxel
  (``.nii``: from the file size, before reading any data; gzip: the stream is decompressed to its end,
  which also verifies the end-of-stream marker and the CRC); float32/float64 (and complex) data must hold
  no NaN or infinite value, counted while streaming.
* MetaImage (``.mha``, ``.mhd`` with ``LOCAL`` or one detached data file): the data must hold at least
  DimSize x channels x element size bytes (compressed data: decompressed in a stream and counted; a
  ``CompressedDataSize`` larger than the bytes present fails at once). Spacing is left to SimpleITK, which
  refuses a zero spacing in MetaImage, and NaN/inf are left to the caller (SimpleITK keeps them).
* NRRD (``.nrrd``, attached data, ``raw`` or ``gzip`` encoding): the same size check. Other encodings and
  detached data files are left to SimpleITK (teem raises on short data, after allocating).
* Anything else (PNG, TIFF, JPEG, BMP, headers this module does not recognise): left to SimpleITK, which
  raises on truncated raster files.

Example:
    >>> check_image_file(Path("imagesTr/case_000_0000.nii.gz"))  # doctest: +SKIP
    Traceback (most recent call last):
    ImageFileError: imagesTr/case_000_0000.nii.gz: truncated or corrupt: the header (512 x 512 x 100 voxels ...
"""

from __future__ import annotations

import math
import os
import re
import stat
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

_CHUNK = 1 << 20  # bytes read from the file at a time
_OUT_CHUNK = 4 << 20  # most decompressed bytes produced at a time
_GZIP_MAGIC = b"\x1f\x8b"

# NIfTI datatype code -> (name, bytes per voxel, float component dtype for the NaN/inf scan or None)
_NIFTI_TYPES: dict[int, tuple[str, int, str | None]] = {
    2: ("uint8", 1, None), 4: ("int16", 2, None), 8: ("int32", 4, None), 16: ("float32", 4, "f4"),
    32: ("complex64", 8, "f4"), 64: ("float64", 8, "f8"), 128: ("RGB24", 3, None), 256: ("int8", 1, None),
    512: ("uint16", 2, None), 768: ("uint32", 4, None), 1024: ("int64", 8, None), 1280: ("uint64", 8, None),
    1536: ("float128", 16, None), 1792: ("complex128", 16, "f8"), 2048: ("complex256", 32, None),
    2304: ("RGBA32", 4, None),
}
_MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}
_NRRD_SIZES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
                     "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int",
                     "int64", "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64",
                     "uint64_t", "double"), 8),
}


class ImageFileError(OSError):
    """An image file that contradicts its own header: truncated, inflated, corrupt, or with invalid fields."""


class NonFiniteValuesError(ImageFileError):
    """Float voxel data with NaN or infinite values (which SimpleITK would read from NIfTI as 0).

    Attributes:
        count: Number of NaN or infinite values.
    """

    def __init__(self, message: str, count: int) -> None:
        super().__init__(message)
        self.count = count


class _Truncated(Exception):
    """The compressed stream ends before its end-of-stream marker."""


@dataclass(frozen=True)
class NiftiHeader:
    """The fields of a NIfTI-1 or NIfTI-2 header that decide the size and validity of the voxel data.

    Attributes:
        version: 1 or 2.
        byteorder: ``"<"`` (little endian) or ``">"``.
        dims: Voxels per axis, ``dim[1..dim[0]]`` (values below 1 beyond the first axis count as 1, as in
            nifticlib).
        datatype: NIfTI datatype code.
        pixdim: ``pixdim[1..dim[0]]``.
        vox_offset: Byte offset of the voxel data in the (decompressed) file.
    """

    version: int
    byteorder: str
    dims: tuple[int, ...]
    datatype: int
    pixdim: tuple[float, ...]
    vox_offset: int

    @property
    def type_name(self) -> str:
        return _NIFTI_TYPES[self.datatype][0] if self.datatype in _NIFTI_TYPES else f"datatype {self.datatype}"

    @property
    def payload_bytes(self) -> int | None:
        """Bytes of voxel data the header describes (None for a datatype this module does not know)."""
        if self.datatype not in _NIFTI_TYPES:
            return None
        return math.prod(self.dims) * _NIFTI_TYPES[self.datatype][1]

    @property
    def float_dtype(self) -> np.dtype | None:
        """NumPy dtype of the float components to scan for NaN/inf (None for integer data)."""
        kind = _NIFTI_TYPES.get(self.datatype, ("", 0, None))[2]
        return np.dtype(self.byteorder + kind) if kind else None


def parse_nifti_header(head: bytes, path: Path) -> NiftiHeader | None:
    """Parse the first bytes of a NIfTI-1 (348-byte) or NIfTI-2 (540-byte) single-file header.

    Args:
        head: At least the first 348 (NIfTI-1) or 540 (NIfTI-2) bytes of the decompressed file.
        path: The file, for messages.

    Returns:
        The header, or None when ``head`` is not a single-file NIfTI header (left to SimpleITK).

    Raises:
        ImageFileError: A NIfTI header with an invalid dimension count, size or spacing.
    """
    for bo in "<>":
        size = struct.unpack(bo + "i", head[:4])[0] if len(head) >= 4 else 0
        if size == 348 and len(head) >= 348 and head[344:347] == b"n+1":
            dim = struct.unpack(bo + "8h", head[40:56])
            datatype = struct.unpack(bo + "h", head[70:72])[0]
            pixdim = struct.unpack(bo + "8f", head[76:108])
            offset = struct.unpack(bo + "f", head[108:112])[0]
            version, min_offset = 1, 348
            break
        if size == 540 and len(head) >= 540 and head[4:7] == b"n+2":
            datatype = struct.unpack(bo + "h", head[12:14])[0]
            dim = struct.unpack(bo + "8q", head[16:80])
            pixdim = struct.unpack(bo + "8d", head[104:168])
            offset = struct.unpack(bo + "q", head[168:176])[0]
            version, min_offset = 2, 540
            break
    else:
        return None
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise ImageFileError(f"{path}: invalid NIfTI header: dim[0] = {ndim} (the number of axes must be 1 to 7)")
    if dim[1] < 1:
        raise ImageFileError(f"{path}: invalid NIfTI header: dim[1] = {dim[1]} (an axis needs at least 1 voxel)")
    for i in range(1, min(ndim, 3) + 1):
        v = pixdim[i]
        if not (math.isfinite(v) and v > 0):
            raise ImageFileError(
                f"{path}: spacing {v:g} in header for the {'xyz'[i - 1]} axis (pixdim[{i}]); a voxel spacing must "
                "be a positive number (SimpleITK would silently use 1 mm)"
            )
    if not math.isfinite(offset):
        raise ImageFileError(f"{path}: invalid NIfTI header: vox_offset = {offset}")
    return NiftiHeader(
        version=version,
        byteorder=bo,
        dims=tuple(max(1, int(d)) for d in dim[1 : ndim + 1]),
        datatype=int(datatype),
        pixdim=tuple(float(v) for v in pixdim[1 : ndim + 1]),
        vox_offset=max(min_offset, int(offset)),  # nifticlib reads a smaller offset as the header's end
    )


class _NonFiniteCounter:
    """Counts NaN, +inf and -inf in a byte stream of float values fed in arbitrary pieces."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.carry = b""
        self.nan = self.pos_inf = self.neg_inf = 0

    def feed(self, data: bytes | memoryview) -> None:
        if self.carry:
            data = self.carry + bytes(data)
        n = len(data) // self.dtype.itemsize
        values = np.frombuffer(data, dtype=self.dtype, count=n)
        self.carry = bytes(data[n * self.dtype.itemsize :])
        finite = np.isfinite(values)
        if not finite.all():
            bad = values[~finite]
            nan = int(np.isnan(bad).sum())
            pos = int((bad > 0).sum())  # NaN compares False
            self.nan += nan
            self.pos_inf += pos
            self.neg_inf += len(bad) - nan - pos

    @property
    def count(self) -> int:
        return self.nan + self.pos_inf + self.neg_inf


def _gunzip(f: BinaryIO) -> Iterator[bytes]:
    """Decompress a gzip stream (several members allowed) in bounded pieces.

    Trailing bytes after a complete member that do not start another member are ignored, as zlib's gzread
    (used by ITK) does.

    Raises:
        _Truncated: The stream ends before an end-of-stream marker.
        zlib.error: Corrupt data or a CRC / length mismatch.
    """
    d = zlib.decompressobj(wbits=31)
    pending = b""
    while True:
        data = d.unconsumed_tail or pending or f.read(_CHUNK)
        pending = b""
        if not data:
            rest = d.flush()
            if rest:
                yield rest
            if not d.eof:
                raise _Truncated
            return
        out = d.decompress(data, _OUT_CHUNK)
        if out:
            yield out
        if d.eof:
            tail = d.unused_data or f.read(2)
            if len(tail) == 1:
                tail += f.read(1)
            if tail[:2] != _GZIP_MAGIC:
                return
            d, pending = zlib.decompressobj(wbits=31), tail


def _inflate(f: BinaryIO, *, wbits: int) -> Iterator[bytes]:
    """Decompress one zlib (``wbits=15``) or gzip (``31``) stream in bounded pieces; like :func:`_gunzip`."""
    d = zlib.decompressobj(wbits=wbits)
    while not d.eof:
        data = d.unconsumed_tail or f.read(_CHUNK)
        if not data:
            rest = d.flush()
            if rest:
                yield rest
            if not d.eof:
                raise _Truncated
            return
        out = d.decompress(data, _OUT_CHUNK)
        if out:
            yield out


def _human(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n:,} bytes ({n / scale:.1f} {unit})"
    return f"{n:,} bytes"


def _size_problem(path: Path, what: str, expected: int, actual: int, *, exact: bool = True) -> None:
    if actual < expected or (exact and actual != expected):
        verdict = "truncated or corrupt" if actual < expected else "corrupt (more data than the header describes)"
        raise ImageFileError(f"{path}: {verdict}: the header ({what}) claims {_human(expected)} of voxel data, "
                             f"the file holds {_human(actual)}")


def _open(path: Path) -> BinaryIO:
    """Open for reading; missing, inaccessible and non-regular files get distinct messages."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{path}: file is missing") from None
    except PermissionError:
        raise PermissionError(f"{path}: permission denied (its folder cannot be accessed)") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageFileError(f"{path}: not a regular file")
    try:
        return open(path, "rb")  # the caller closes it
    except PermissionError:
        raise PermissionError(f"{path}: permission denied (the file exists but cannot be read)") from None


# --- NIfTI --------------------------------------------------------------------------------------------


def _check_nifti(f: BinaryIO, path: Path) -> None:
    gzipped = f.read(2) == _GZIP_MAGIC
    f.seek(0)
    if not gzipped:
        head = f.read(540)
        header = parse_nifti_header(head, path)
        if header is None or header.payload_bytes is None:
            return
        expected = header.payload_bytes
        actual = max(0, os.fstat(f.fileno()).st_size - header.vox_offset)
        _size_problem(path, _nifti_what(header), expected, actual)  # before reading any voxel
        if header.float_dtype is not None:
            f.seek(header.vox_offset)
            counter = _NonFiniteCounter(header.float_dtype)
            while block := f.read(_CHUNK):
                counter.feed(block)
            _nonfinite_problem(path, header, counter)
        return
    chunks = _gunzip(f)
    head = b""
    total = 0
    try:
        for chunk in chunks:
            head += chunk
            if len(head) >= 540:
                break
        header = parse_nifti_header(head, path)
        if header is None or header.payload_bytes is None:
            return
        expected = header.payload_bytes
        start, end = header.vox_offset, header.vox_offset + expected
        counter = _NonFiniteCounter(header.float_dtype) if header.float_dtype is not None else None
        for chunk in _chain(head, chunks):
            lo, hi = max(start, total), min(end, total + len(chunk))
            if counter is not None and lo < hi:
                counter.feed(memoryview(chunk)[lo - total : hi - total])
            total += len(chunk)
    except _Truncated:
        if len(head) < 348:
            raise ImageFileError(f"{path}: truncated file: the compressed stream ends inside the header") from None
        header = parse_nifti_header(head, path)
        what = ""
        if header is not None and header.payload_bytes is not None:
            found = max(0, total, len(head)) - header.vox_offset
            what = (f": the header ({_nifti_what(header)}) claims {_human(header.payload_bytes)} of voxel data, "
                    f"the stream holds {_human(max(0, found))} before it breaks off")
        raise ImageFileError(f"{path}: truncated file: the compressed stream ends early, without its "
                             f"end-of-stream marker{what}") from None
    except zlib.error as e:
        raise ImageFileError(f"{path}: corrupt compressed data ({e})") from None
    _size_problem(path, _nifti_what(header), expected, max(0, total - header.vox_offset))
    if counter is not None:
        _nonfinite_problem(path, header, counter)


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def _nifti_what(header: NiftiHeader) -> str:
    return f"NIfTI-{header.version}, {' x '.join(map(str, header.dims))} voxels of {header.type_name}"


def _nonfinite_problem(path: Path, header: NiftiHeader, counter: _NonFiniteCounter) -> None:
    if counter.count:
        raise NonFiniteValuesError(
            f"{path}: {counter.count} NaN or infinite value(s) in the {header.type_name} voxel data "
            f"({counter.nan} NaN, {counter.pos_inf} +inf, {counter.neg_inf} -inf)", counter.count)


# --- MetaImage and NRRD ----------------------------------------------------------------------------


def _text_header(f: BinaryIO, end: re.Pattern[bytes]) -> tuple[dict[str, str], int] | None:
    """Key/value lines up to the match of ``end`` (within the first 64 KiB); None when not found."""
    head = f.read(1 << 16)
    m = end.search(head)
    if m is None:
        return None
    fields: dict[str, str] = {}
    for line in head[: m.end()].decode("latin-1").splitlines():
        key, sep, value = line.partition("=" if "=" in line.split(":", 1)[0] else ":")
        if sep:
            fields[key.strip().lower()] = value.strip()
    return fields, m.end()


def _ints(text: str) -> list[int] | None:
    try:
        return [int(v) for v in text.split()]
    except ValueError:
        return None


def _check_stream_size(f: BinaryIO, path: Path, what: str, expected: int, *, wbits: int | None) -> None:
    """Compare the bytes left in ``f`` (decompressed when ``wbits`` is given) with ``expected``."""
    if wbits is None:
        here = f.tell()
        _size_problem(path, what, expected, os.fstat(f.fileno()).st_size - here, exact=False)
        return
    total = 0
    try:
        for chunk in _inflate(f, wbits=wbits):
            total += len(chunk)
    except _Truncated:
        raise ImageFileError(f"{path}: truncated file: the compressed data ends early ({what} claims "
                             f"{_human(expected)} of voxel data, {_human(total)} found)") from None
    except zlib.error as e:
        raise ImageFileError(f"{path}: corrupt compressed data ({e})") from None
    _size_problem(path, what, expected, total, exact=False)


def _check_metaimage(f: BinaryIO, path: Path) -> None:
    parsed = _text_header(f, re.compile(rb"^\s*ElementDataFile\s*=[^\n]*\n?", re.M))
    if parsed is None:
        return
    fields, header_end = parsed
    dims = _ints(fields.get("dimsize", ""))
    size = _MET_SIZES.get(fields.get("elementtype", ""))
    channels = _ints(fields.get("elementnumberofchannels", "1")) or [1]
    if not dims or size is None or fields.get("binarydata", "true").lower() == "false":
        return
    expected = math.prod(dims) * channels[0] * size
    what = f"MetaImage, {' x '.join(map(str, dims))} voxels of {fields['elementtype']}"
    compressed = fields.get("compresseddata", "false").lower() == "true"
    data_file = fields.get("elementdatafile", "")
    if data_file.upper() == "LOCAL":
        f.seek(header_end)
        _check_meta_data(f, path, what, expected, compressed, fields)
        return
    if " " in data_file or "%" in data_file or data_file.upper() == "LIST" or fields.get("headersize", "0") != "0":
        return  # file lists, patterns and skipped headers are left to SimpleITK
    data_path = path.parent / data_file
    with _open(data_path) as g:
        _check_meta_data(g, data_path, what, expected, compressed, fields)


def _check_meta_data(f: BinaryIO, path: Path, what: str, expected: int, compressed: bool,
                     fields: dict[str, str]) -> None:
    if not compressed:
        _check_stream_size(f, path, what, expected, wbits=None)
        return
    claimed = _ints(fields.get("compresseddatasize", ""))
    if claimed:
        left = os.fstat(f.fileno()).st_size - f.tell()
        if left < claimed[0]:
            raise ImageFileError(f"{path}: truncated file: CompressedDataSize is {_human(claimed[0])}, the file "
                                 f"holds {_human(left)} of compressed data")
    _check_stream_size(f, path, what, expected, wbits=15 + 32)  # zlib or gzip


def _check_nrrd(f: BinaryIO, path: Path) -> None:
    if not f.read(4) == b"NRRD":
        return
    f.seek(0)
    parsed = _text_header(f, re.compile(rb"\r?\n\r?\n"))
    if parsed is None:
        return
    fields, header_end = parsed
    dims = _ints(fields.get("sizes", ""))
    size = _NRRD_SIZES.get(fields.get("type", "").lower())
    encoding = fields.get("encoding", "").lower()
    detached = "data file" in fields or "datafile" in fields
    skips = fields.get("line skip", fields.get("lineskip", "0")), fields.get("byte skip", fields.get("byteskip", "0"))
    if not dims or size is None or detached or encoding not in ("raw", "gzip", "gz") or skips != ("0", "0"):
        return
    f.seek(header_end)
    what = f"NRRD, {' x '.join(map(str, dims))} voxels of {fields['type']}"
    _check_stream_size(f, path, what, math.prod(dims) * size, wbits=None if encoding == "raw" else 31)


def check_image_file(path: Path) -> None:
    """Check that ``path`` exists, can be read, and agrees with its own header (see the module docstring).

    Args:
        path: An image file of any format SimpleITK reads.

    Raises:
        FileNotFoundError: The file does not exist.
        PermissionError: The file exists but cannot be read.
        NonFiniteValuesError: NaN or infinite values in float NIfTI voxel data.
        ImageFileError: Not a regular file, truncated or inflated data, or an invalid header field.
    """
    path = Path(path)
    name = path.name.lower()
    with _open(path) as f:
        if name.endswith((".nii", ".nii.gz")):
            _check_nifti(f, path)
        elif name.endswith((".mha", ".mhd")):
            _check_metaimage(f, path)
        elif name.endswith(".nrrd"):
            _check_nrrd(f, path)
