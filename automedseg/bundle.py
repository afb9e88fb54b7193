"""Model bundles: one zip that holds everything inference needs, checked in full before anything is extracted.

``automedseg export`` (:mod:`automedseg.bundle_export`) writes the zip; this module reads it. A bundle is laid out
like a work folder, so an extracted bundle is itself a work folder that ``automedseg predict -d`` uses::

    manifest.json                      format, versions, the choice, labels, channels, SHA-256 + size of every member
    plans.json                         the work folder's plan, reduced to the exported configurations
    find_best.json                     the choice and the cross-validation figures of every candidate
    <C>/postprocessing.json            post-processing chosen on cross-validation (``postprocessing_<A+B>.json``)
    <C>/fold_<K>/plans.json            the plan copy the fold was trained with
    <C>/fold_<K>/checkpoint_final.pt   ``{"model": state_dict}`` only (loaded with ``weights_only=True``)
    <C>/fold_<K>/validation/summary.json, progress.png   the fold's validation figures
    <C>/fold_<K>/model.onnx, onnx.json the ONNX graph and its sidecar (``export --onnx``)

:func:`verify_bundle` refuses, before a single byte is written anywhere, a member whose name is absolute, holds a
``..``, ``.`` or empty component, a backslash or a drive letter; a symlink or any other non-regular entry; an
encrypted member; a duplicate name (also when only the letter case differs); a member over :data:`MAX_MEMBER_BYTES`
or a bundle over :data:`MAX_TOTAL_BYTES`; a member the manifest does not list or a listed one that is missing; and a
size or SHA-256 that differs from the manifest (every member is hashed while it is read, never extracted).
:func:`import_bundle` then extracts into a hidden sibling folder, hashing again, and renames it into place.

Example:
    >>> check_member_name("3d_fullres/fold_0/plans.json")
    >>> check_member_name("../evil")
    Traceback (most recent call last):
    ...
    automedseg.bundle.BundleError: ../evil: a '..' component (the name leaves the bundle folder)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from automedseg.errors import InputError
from automedseg.serialize import PlanError, from_jsonable

FORMAT_NAME = "automedseg-model"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: Largest member (a 3d_fullres checkpoint of nnU-Net's default network is ~120 MB, its ONNX graph as much).
MAX_MEMBER_BYTES = 4 * 1024**3
#: Largest bundle, all members together (5 folds of three configurations with ONNX graphs fit easily).
MAX_TOTAL_BYTES = 32 * 1024**3
MAX_MANIFEST_BYTES = 16 * 1024**2
MAX_MEMBERS = 10_000
_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Log = Callable[[str], None]


class BundleError(InputError):
    """A model bundle cannot be used; the message names the bundle (or member) and the problem."""


@dataclass(frozen=True)
class FileEntry:
    """A member as the manifest records it."""

    sha256: str
    size: int


@dataclass(frozen=True)
class OnnxInfo:
    """How the ONNX graphs of a bundle were made (``export --onnx``)."""

    opset: int
    exporter: str
    onnx_version: str
    graph: str = "model.onnx"
    sidecar: str = "onnx.json"


@dataclass(frozen=True)
class BundleManifest:
    """``manifest.json``: what the bundle holds and how to check it.

    Attributes:
        format: Always :data:`FORMAT_NAME`.
        format_version: :data:`FORMAT_VERSION` of the writer; a newer one is refused.
        automedseg_version: Version that wrote the bundle.
        torch_version: Torch version the checkpoints were saved with.
        created_utc: When the bundle was written (ISO 8601).
        dataset_name: The plan's dataset name.
        configuration: The configuration or ``+``-joined ensemble ``predict`` uses by default.
        members: Its configurations.
        folds: Configuration -> the exported fold ids (``"0"`` ... or ``"all"``).
        labels: Label name -> declared value, background included.
        channel_names: Input channels, in file order.
        checkpoints: ``<C>/fold_<K>`` -> the checkpoint of the work folder its weights come from.
        files: Member name -> SHA-256 and size, every member but the manifest itself.
        postprocessing: The member holding the default configuration's post-processing (``None``: none chosen).
        onnx: How the ONNX graphs were made (``None``: no graphs).
    """

    format: str
    format_version: int
    automedseg_version: str
    torch_version: str
    created_utc: str
    dataset_name: str
    configuration: str
    members: tuple[str, ...]
    folds: dict[str, tuple[str, ...]]
    labels: dict[str, int]
    channel_names: tuple[str, ...]
    checkpoints: dict[str, str]
    files: dict[str, FileEntry]
    postprocessing: str | None = None
    onnx: OnnxInfo | None = None

    def fold_dirs(self) -> list[str]:
        """``<C>/fold_<K>`` of every exported fold."""
        return [f"{c}/fold_{k}" for c in self.members for k in self.folds.get(c, ())]


def check_member_name(name: str) -> None:
    """Refuse a member name that is not a plain relative path inside the bundle.

    Raises:
        BundleError: The name is empty, absolute, has a drive letter, a backslash, a NUL, or a ``..``, ``.`` or
            empty component (the message names the member and says which).
    """
    why = None
    if not name:
        why = "an empty name"
    elif "\x00" in name:
        why = "a NUL character in the name"
    elif "\\" in name:
        why = "a backslash in the name (not a portable path)"
    elif name.startswith("/"):
        why = "an absolute path"
    elif re.match(r"^[A-Za-z]:", name):
        why = "a drive letter (an absolute Windows path)"
    elif name.endswith("/"):
        why = "a directory entry (a bundle holds files only)"
    else:
        parts = name.split("/")
        if ".." in parts:
            why = "a '..' component (the name leaves the bundle folder)"
        elif "." in parts or "" in parts:
            why = "an empty or '.' component"
    if why:
        raise BundleError(f"{name}: {why}")


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a zip entry is not a regular file a bundle may hold (``None``: it is one)."""
    if info.flag_bits & 0x1:
        return "an encrypted member"
    if info.is_dir():
        return "a directory entry"
    mode = info.external_attr >> 16
    if info.create_system == 3 and mode:  # made on Unix: the high bits hold st_mode
        if stat.S_ISLNK(mode):
            return "a symbolic link"
        if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
            return "not a regular file"
    if info.file_size > MAX_MEMBER_BYTES:
        return f"{info.file_size} bytes, over the limit of {MAX_MEMBER_BYTES} bytes per member"
    return None


def _read_limited(stream: IO[bytes], limit: int, sink: Callable[[bytes], None] | None = None) -> tuple[str, int]:
    """SHA-256 and length of a stream, reading at most ``limit + 1`` bytes (a lying size header stops there)."""
    digest, n = hashlib.sha256(), 0
    while True:
        chunk = stream.read(min(_CHUNK, limit + 1 - n))
        if not chunk:
            break
        n += len(chunk)
        digest.update(chunk)
        if sink is not None:
            sink(chunk)
        if n > limit:
            break
    return digest.hexdigest(), n


def _open_zip(path: Path) -> zipfile.ZipFile:
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: model bundle does not exist" if not path.exists() else
                          f"{path}: not a file (a model bundle is a .zip written by `automedseg export`)")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise BundleError(f"{path}: not a zip archive ({e}); a model bundle is written by `automedseg export`") \
            from None


def _read_manifest(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> tuple[BundleManifest, bytes]:
    if info.file_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{where}: {MANIFEST_NAME} is {info.file_size} bytes, over {MAX_MANIFEST_BYTES}")
    with zf.open(info) as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{where}: {MANIFEST_NAME} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise BundleError(f"{where}: {MANIFEST_NAME} is not an automedseg model manifest (format "
                          f"{data.get('format') if isinstance(data, dict) else None!r})")
    version = data.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise BundleError(f"{where}: bundle format version {version} is newer than this automedseg reads "
                          f"({FORMAT_VERSION}); update automedseg")
    try:
        manifest = from_jsonable(BundleManifest, data, f"{where}: {MANIFEST_NAME}")
    except PlanError as e:
        raise BundleError(str(e)) from None
    _check_manifest(manifest, where)
    return manifest, raw


def _check_manifest(m: BundleManifest, where: str) -> None:
    for name, entry in m.files.items():
        check_member_name(name)
        if not _SHA256.match(entry.sha256) or not 0 <= entry.size <= MAX_MEMBER_BYTES:
            raise BundleError(f"{where}: {MANIFEST_NAME}: {name}: malformed entry (sha256 {entry.sha256!r}, "
                              f"size {entry.size})")
    if "+".join(m.members) != m.configuration or not m.members:
        raise BundleError(f"{where}: {MANIFEST_NAME}: configuration {m.configuration!r} does not match its members "
                          f"{list(m.members)}")
    for c in m.members:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", c) or c in (".", "..") or not m.folds.get(c):
            raise BundleError(f"{where}: {MANIFEST_NAME}: configuration {c!r} has no folds or an unusable name")
        for k in m.folds[c]:
            if not re.fullmatch(r"[0-9]+|all", k):
                raise BundleError(f"{where}: {MANIFEST_NAME}: {c}: fold {k!r} is not a fold id")


def verify_bundle(path: Path) -> BundleManifest:
    """Check a bundle completely without extracting anything; see the module docstring for what is refused.

    Every member is read (decompressed in memory, in chunks) and hashed; nothing is written.

    Raises:
        BundleError: One line naming the bundle, the member and the problem.
    """
    path = Path(path)
    with _open_zip(path) as zf:
        return _verify_open(zf, path)[0]


def _verify_open(zf: zipfile.ZipFile, path: Path) -> tuple[BundleManifest, bytes]:
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise BundleError(f"{path}: {len(infos)} members, over the limit of {MAX_MEMBERS}")
    seen: dict[str, str] = {}
    total = 0
    for info in infos:
        try:
            check_member_name(info.filename)
        except BundleError as e:
            raise BundleError(f"{path}: member {e}; refused, nothing was extracted") from None
        problem = _member_problem(info)
        if problem:
            raise BundleError(f"{path}: member {info.filename}: {problem}; refused, nothing was extracted")
        key = info.filename.casefold()
        if key in seen:
            raise BundleError(f"{path}: member {info.filename}: duplicate name (also {seen[key]}); refused, nothing "
                              "was extracted")
        seen[key] = info.filename
        total += info.file_size
    if total > MAX_TOTAL_BYTES:
        raise BundleError(f"{path}: {total} bytes uncompressed, over the limit of {MAX_TOTAL_BYTES}")
    by_name = {i.filename: i for i in infos}
    if MANIFEST_NAME not in by_name:
        raise BundleError(f"{path}: no {MANIFEST_NAME}; not a model bundle written by `automedseg export`")
    manifest, raw = _read_manifest(zf, by_name.pop(MANIFEST_NAME), str(path))
    extra = sorted(set(by_name) - set(manifest.files))
    if extra:
        raise BundleError(f"{path}: member {extra[0]} is not listed in the manifest; refused, nothing was extracted")
    missing = sorted(set(manifest.files) - set(by_name))
    if missing:
        raise BundleError(f"{path}: {missing[0]} is listed in the manifest but missing from the bundle")
    for fold in manifest.fold_dirs():
        for needed in ("plans.json", "checkpoint_final.pt"):
            if f"{fold}/{needed}" not in manifest.files:
                raise BundleError(f"{path}: {fold}/{needed} is missing; the bundle cannot predict")
    for name, entry in manifest.files.items():
        info = by_name[name]
        if info.file_size != entry.size:
            raise BundleError(f"{path}: member {name}: {info.file_size} bytes, the manifest says {entry.size}; "
                              "refused, nothing was extracted")
        try:
            with zf.open(info) as f:
                digest, n = _read_limited(f, entry.size)
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as e:  # zlib.error is an Exception
            raise BundleError(f"{path}: member {name}: cannot be read ({e})") from None
        if n != entry.size or digest != entry.sha256:
            raise BundleError(f"{path}: member {name}: SHA-256 or size differs from the manifest (damaged or "
                              "altered); refused, nothing was extracted")
    return manifest, raw


def _extract(zf: zipfile.ZipFile, manifest: BundleManifest, raw_manifest: bytes, dest: Path) -> None:
    """Write the verified members under ``dest``, hashing again as they are written (the zip may have changed)."""
    from automedseg.atomic import fsync_path

    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    for name, entry in sorted(manifest.files.items()):
        target = dest.joinpath(*name.split("/"))
        if root not in target.resolve().parents:  # names were checked; this guards against a planted symlink
            raise BundleError(f"{name}: would be written outside {dest}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(name) as src, open(target, "xb") as out:
            digest, n = _read_limited(src, entry.size, out.write)
            out.flush()
            os.fsync(out.fileno())
        if n != entry.size or digest != entry.sha256:
            raise BundleError(f"{name}: changed while it was extracted (SHA-256 differs from the manifest)")
    with open(dest / MANIFEST_NAME, "xb") as out:  # the manifest as verified, not as the zip holds it now
        out.write(raw_manifest)
        out.flush()
        os.fsync(out.fileno())
    fsync_path(dest)


def import_bundle(path: Path, into: Path, *, log: Log | None = None) -> BundleManifest:
    """Verify a bundle, then extract it into the folder ``into`` (created; it must not exist or be empty).

    The bundle is extracted into a hidden sibling folder first and renamed to ``into`` when complete, so
    ``into`` never holds half a model. Nothing is written when the bundle is refused.

    Raises:
        BundleError: The bundle is refused (:func:`verify_bundle`), or ``into`` exists and is not an empty folder.
    """
    path, into = Path(path), Path(into)
    with _open_zip(path) as zf:
        manifest, raw = _verify_open(zf, path)
        if into.exists() and (not into.is_dir() or any(into.iterdir())):
            raise BundleError(f"{into}: exists and is not an empty folder; choose a new folder for the model")
        into.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{into.name}.import-", dir=into.parent))
        try:
            _extract(zf, manifest, raw, staging)
            if into.is_dir():
                into.rmdir()  # empty (checked above); an entry that appeared since makes this fail
            os.rename(staging, into)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    from automedseg.atomic import fsync_path

    fsync_path(into.parent)
    if log is not None:
        log(f"{into}: {len(manifest.files)} files verified against the manifest (SHA-256)")
    return manifest


@contextlib.contextmanager
def extracted_bundle(path: Path) -> Iterator[tuple[Path, BundleManifest]]:
    """Verify a bundle and extract it into a temporary folder (``$TMPDIR``) for the ``with`` block.

    Yields:
        The folder (a work folder :func:`automedseg.prediction.run_predict` reads) and the manifest.
    """
    path = Path(path)
    with _open_zip(path) as zf:
        manifest, raw = _verify_open(zf, path)
        folder = Path(tempfile.mkdtemp(prefix="automedseg-model-"))
        try:
            _extract(zf, manifest, raw, folder / "model")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    try:
        yield folder / "model", manifest
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def read_folder_manifest(folder: Path) -> BundleManifest | None:
    """The manifest of an imported bundle folder (``None`` when ``folder`` is an ordinary work folder)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        return None
    try:
        manifest = from_jsonable(BundleManifest, data, str(path))
    except PlanError as e:
        raise BundleError(str(e)) from None
    _check_manifest(manifest, str(path))
    return manifest


def verify_folder(folder: Path) -> BundleManifest | None:
    """Check every file of an imported bundle folder against its manifest (``None``: not a bundle folder).

    Raises:
        BundleError: A listed file is missing, or its size or SHA-256 differs (the message names it).
    """
    folder = Path(folder)
    manifest = read_folder_manifest(folder)
    if manifest is None:
        return None
    for name, entry in manifest.files.items():
        p = folder.joinpath(*name.split("/"))
        if p.is_symlink() or not p.is_file():
            raise BundleError(f"{p}: listed in {folder / MANIFEST_NAME} but missing (or not a regular file)")
        with open(p, "rb") as f:
            digest, n = _read_limited(f, entry.size)
        if n != entry.size or digest != entry.sha256:
            raise BundleError(f"{p}: SHA-256 or size differs from {folder / MANIFEST_NAME} (altered since import)")
    return manifest
