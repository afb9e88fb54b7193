"""Model bundles are checked in full before anything is extracted (automedseg.bundle).

The bundles here are synthetic (members with arbitrary bytes and a manifest that lists them): verification
never parses a member, so a hostile zip needs no trained model. Every refusal must leave the target folder,
and everything around it, exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import stat
import warnings
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from automedseg import bundle
from automedseg.bundle import BundleError, check_member_name, import_bundle, verify_bundle, verify_folder
from automedseg.cli import main

FILES = {
    "plans.json": b'{"dataset_name": "x"}\n',
    "find_best.json": b"{}\n",
    "3d_fullres/fold_0/plans.json": b'{"dataset_name": "x"}\n',
    "3d_fullres/fold_0/checkpoint_final.pt": b"weights" * 100,
}


def _manifest(files: dict[str, bytes]) -> dict:
    return {
        "format": "automedseg-model", "format_version": 1, "automedseg_version": "0.1.0", "torch_version": "2.13.0",
        "created_utc": "2026-01-01T00:00:00Z", "dataset_name": "x", "configuration": "3d_fullres",
        "members": ["3d_fullres"], "folds": {"3d_fullres": ["0"]}, "labels": {"background": 0, "a": 1},
        "channel_names": ["CT"], "checkpoints": {"3d_fullres/fold_0": "checkpoint_final.pt"},
        "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()},
    }


def _info(name: str, mode: int = stat.S_IFREG | 0o644) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.create_system = 3
    info.external_attr = mode << 16
    return info


def write_bundle(path: Path, *, listed: dict[str, bytes] | None = None, stored: dict[str, bytes] | None = None,
                 extra: list[tuple[zipfile.ZipInfo, bytes]] = (), manifest: dict | None = None) -> Path:
    """A zip with ``stored`` members (default: ``listed``), ``extra`` entries and a manifest listing ``listed``."""
    listed = dict(FILES if listed is None else listed)
    stored = dict(listed if stored is None else stored)
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        warnings.simplefilter("ignore")  # duplicate names
        for name, data in stored.items():
            zf.writestr(_info(name), data)
        for info, data in extra:
            zf.writestr(info, data)
        zf.writestr(_info("manifest.json"), json.dumps(manifest or _manifest(listed)))
    return path


def _tampered(kind: str, path: Path) -> Path:
    """A bundle with one thing wrong: what ``kind`` names (see HOSTILE)."""
    evil = b"pwned"
    if kind in ("parent", "absolute", "drive", "backslash", "dot"):
        name = {"parent": "../evil", "absolute": "/tmp/evil_abs", "drive": "C:/evil", "backslash": "a\\..\\evil",
                "dot": "./evil"}[kind]
        return write_bundle(path, listed={**FILES, name: evil})
    if kind == "symlink":
        return write_bundle(path, listed={**FILES, "link": b"/etc/passwd"}, stored=FILES,
                            extra=[(_info("link", stat.S_IFLNK | 0o777), b"/etc/passwd")])
    if kind == "device":
        return write_bundle(path, listed={**FILES, "dev": b""}, stored=FILES, extra=[(_info("dev", stat.S_IFCHR), b"")])
    if kind == "directory":
        return write_bundle(path, extra=[(_info("3d_fullres/", stat.S_IFDIR | 0o755), b"")])
    if kind == "duplicate":
        return write_bundle(path, extra=[(_info("plans.json"), b'{"dataset_name": "y"}\n')])
    if kind == "case_duplicate":
        return write_bundle(path, listed={**FILES, "Plans.json": evil})
    if kind == "hash":
        return write_bundle(path, stored={**FILES, "3d_fullres/fold_0/checkpoint_final.pt": b"Weights" * 100})
    if kind == "size":
        return write_bundle(path, stored={**FILES, "plans.json": FILES["plans.json"] + b" "})
    if kind == "unlisted":
        return write_bundle(path, stored={**FILES, "evil.sh": evil})
    if kind == "missing":
        return write_bundle(path, stored={k: v for k, v in FILES.items() if k != "find_best.json"})
    if kind == "no_manifest":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(_info("plans.json"), b"{}")
        return path
    if kind == "not_zip":
        path.write_bytes(b"PK\x03\x04 not really a zip")
        return path
    if kind == "manifest_json":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(_info("manifest.json"), b"{not json")
        return path
    if kind == "newer_format":
        return write_bundle(path, manifest={**_manifest(FILES), "format_version": 99})
    raise ValueError(kind)


HOSTILE = [  # kind, what the one-line refusal says
    ("parent", "'..' component"),
    ("absolute", "an absolute path"),
    ("drive", "a drive letter"),
    ("backslash", "a backslash"),
    ("dot", "'.' component"),
    ("symlink", "a symbolic link"),
    ("device", "not a regular file"),
    ("directory", "a directory entry"),
    ("duplicate", "duplicate name"),
    ("case_duplicate", "duplicate name"),
    ("hash", "SHA-256 or size differs from the manifest"),
    ("size", "the manifest says"),
    ("unlisted", "evil.sh is not listed in the manifest"),
    ("missing", "find_best.json is listed in the manifest but missing"),
    ("no_manifest", "no manifest.json"),
    ("not_zip", "not a zip archive"),
    ("manifest_json", "manifest.json is not valid JSON"),
    ("newer_format", "format version 99 is newer"),
]


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(("kind", "message"), HOSTILE)
def test_hostile_bundles_are_refused_before_anything_is_written(tmp_path: Path, kind: str, message: str) -> None:
    area = tmp_path / "area"
    target = area / "models" / "m"
    target.mkdir(parents=True)  # an empty target folder must stay (empty) as it is
    zip_path = _tampered(kind, tmp_path / "bad.zip")
    before = _tree(tmp_path)
    r = CliRunner().invoke(main, ["import-model", str(zip_path), "--into", str(target)])
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert _tree(tmp_path) == before  # nothing extracted, no staging folder left, no evil file anywhere
    assert not Path("/tmp/evil_abs").exists()


@pytest.mark.parametrize("kind", ["parent", "symlink", "hash"])
def test_predict_refuses_a_hostile_bundle_before_writing(tmp_path: Path, kind: str) -> None:
    zip_path = _tampered(kind, tmp_path / "bad.zip")
    (tmp_path / "in").mkdir()
    r = CliRunner().invoke(main, ["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                                  "--model", str(zip_path)])
    assert r.exit_code == 2 and "nothing was extracted" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_a_good_bundle_is_imported_whole(tmp_path: Path) -> None:
    zip_path = write_bundle(tmp_path / "ok.zip")
    manifest = verify_bundle(zip_path)
    assert manifest.fold_dirs() == ["3d_fullres/fold_0"]
    target = tmp_path / "m"
    import_bundle(zip_path, target)
    assert {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()} == {*FILES, "manifest.json"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the staging folder was renamed
    assert verify_folder(target) == manifest
    with pytest.raises(BundleError, match="exists and is not an empty folder"):
        import_bundle(zip_path, target)
    (target / "3d_fullres" / "fold_0" / "checkpoint_final.pt").write_bytes(b"other weights")
    with pytest.raises(BundleError, match="altered since import"):
        verify_folder(target)
    assert verify_folder(tmp_path) is None  # not a bundle folder


def test_size_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zip_path = write_bundle(tmp_path / "ok.zip")
    monkeypatch.setattr(bundle, "MAX_MEMBER_BYTES", 100)
    with pytest.raises(BundleError, match="checkpoint_final.pt: 700 bytes, over the limit of 100 bytes"):
        verify_bundle(zip_path)
    monkeypatch.setattr(bundle, "MAX_MEMBER_BYTES", 10**6)
    monkeypatch.setattr(bundle, "MAX_TOTAL_BYTES", 500)
    with pytest.raises(BundleError, match="over the limit of 500"):
        verify_bundle(zip_path)


@pytest.mark.parametrize(("name", "ok"), [
    ("3d_fullres/fold_0/plans.json", True), ("a/b..c", True), ("..", False), ("a/../b", False), ("/a", False),
    ("a//b", False), ("a/./b", False), ("", False), ("c:x", False), ("a\x00b", False),
])
def test_member_names(name: str, ok: bool) -> None:
    if ok:
        check_member_name(name)
    else:
        with pytest.raises(BundleError):
            check_member_name(name)
