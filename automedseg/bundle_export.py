"""``automedseg export``: a trained model as one self-contained zip (layout and checks: :mod:`automedseg.bundle`).

The bundle takes what ``automedseg predict`` would use from the work folder: the configuration (or ensemble)
``find_best.json`` chose unless ``-c`` names one, every trained fold of it unless ``-f`` names some, the
checkpoint :func:`automedseg.inference.load_fold` would load (final, else best, else latest) re-saved as its
weights alone, each fold's plan copy, the post-processing chosen on cross-validation and the cross-validation
figures (``find_best.json``, each fold's ``validation/summary.json`` and ``progress.png``). Predicting from the
bundle therefore gives the same masks, byte for byte, as predicting from the work folder.

The zip is written member by member to a temporary file beside the output and renamed into place when complete
(members are stored with a fixed date, so the same model gives the same bytes apart from ``created_utc``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from automedseg.atomic import atomic_write, jsonable
from automedseg.bundle import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    BundleError,
    BundleManifest,
    FileEntry,
    OnnxInfo,
    check_member_name,
)
from automedseg.errors import InputError
from automedseg.plans import Plans, to_jsonable
from automedseg.workspace import Workspace

Log = Callable[[str], None]
_DATE = (1980, 1, 1, 0, 0, 0)


def _quiet(_: str) -> None:
    pass


class _ZipWriter:
    """Adds members to an open zip and records each one's SHA-256 and size for the manifest."""

    def __init__(self, zf: zipfile.ZipFile) -> None:
        self.zf = zf
        self.files: dict[str, FileEntry] = {}

    def add(self, name: str, data: bytes) -> None:
        check_member_name(name)
        if name in self.files or name == MANIFEST_NAME:
            raise BundleError(f"{name}: added twice to the bundle")  # pragma: no cover - a bug
        info = zipfile.ZipInfo(name, date_time=_DATE)
        info.compress_type = zipfile.ZIP_DEFLATED
        info.create_system = 3
        info.external_attr = 0o100644 << 16  # a regular file, rw-r--r--
        self.zf.writestr(info, data)
        self.files[name] = FileEntry(hashlib.sha256(data).hexdigest(), len(data))

    def add_json(self, name: str, obj: Any) -> None:
        self.add(name, (json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n").encode("utf-8"))


def _checkpoint_state(fold_dir: Path, log: Log) -> tuple[dict[str, torch.Tensor], str]:
    """The weights the torch engine would load from ``fold_dir`` and the checkpoint they come from."""
    from automedseg.inference import CHECKPOINT_PREFERENCE, CheckpointError, load_checkpoint

    damaged = []
    for name in CHECKPOINT_PREFERENCE:
        path = fold_dir / name
        if not path.is_file():
            continue
        try:
            ckpt = load_checkpoint(path, "cpu")
        except CheckpointError as e:
            damaged.append(str(e))
            continue
        if damaged:
            log(f"warning: {damaged[0]}; exporting {name} instead")
        state = ckpt["model"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputError(f"{path}: its model weights are not a tensor dictionary")
        return {k: v.detach().clone().contiguous() for k, v in state.items()}, name
    raise InputError("; ".join(damaged) or f"{fold_dir}: no checkpoint")


def _network(plans: Plans, fold_dir: Path, state: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    from automedseg.network import build_network

    (name,) = plans.configurations
    config = plans.configurations[name]
    model = build_network(config.network, in_channels=len(plans.channel_names), num_classes=plans.num_classes,
                          dims=config.dims)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"{fold_dir / source}: weights do not fit the network of {fold_dir / 'plans.json'} "
                         f"({str(e).strip().splitlines()[0][:120]})") from None
    model.deep_supervision = False
    return model.eval()


def _postprocessing(path: Path) -> Any:
    """The post-processing saved at ``path`` (validated), ``None`` when there is none."""
    from automedseg.postprocessing import load_postprocessing

    return load_postprocessing(path) if path.is_file() else None


def _find_best(ws: Workspace, configuration: str, members: Sequence[str], pp_member: str | None) -> dict[str, Any]:
    """The bundle's ``find_best.json``: the work folder's figures, with ``best`` the exported choice."""
    from automedseg.best_choice import BestChoice, FindBest, find_best_path, read_find_best

    path = find_best_path(ws)
    original = read_find_best(path) if path.is_file() else None
    if original is not None and original.best.configuration == configuration:
        best = original.best
        basis = original.ranking_basis
    else:
        scores = next((c for c in (original.candidates if original else ()) if c.name == configuration), None)
        best = BestChoice(configuration=configuration, members=tuple(members),
                          mean_dice=scores.mean_dice if scores else None,
                          dice_per_class=dict(scores.dice_per_class) if scores else {},
                          n_cases=scores.n_cases if scores else 0, complete=scores.complete if scores else None)
        chosen = f"find-best chose {original.best.configuration}" if original else "find-best had not run"
        basis = f"chosen with `automedseg export -c {configuration}` ({chosen}); " + (
            (original.ranking_basis if original else None) or "no ranking")
    pp = best.postprocessing
    if pp is not None and pp.file is not None:
        pp = dataclasses.replace(pp, file=pp_member)
    best = dataclasses.replace(best, predict_command="automedseg predict -i INPUT -o OUTPUT --model MODEL.zip",
                               postprocessing=pp)
    if original is None:
        return to_jsonable(FindBest(best=best, ranking_basis=basis))
    configurations = {m: original.configurations[m] for m in members if m in original.configurations}
    return to_jsonable(dataclasses.replace(original, best=best, ranking_basis=basis, configurations=configurations))


def export_model(ws: Workspace, output: Path, *, configuration: str | None = None,
                 folds: Sequence[int | str] | None = None, onnx: bool = False, onnx_exporter: str = "auto",
                 overwrite: bool = False, log: Log = _quiet) -> BundleManifest:
    """Write a trained model of ``ws`` as a self-contained zip.

    Args:
        ws: The work folder.
        output: The zip to write (refused when it exists, unless ``overwrite``).
        configuration: A configuration or ``+``-joined ensemble (default: ``find_best.json``'s choice).
        folds: The folds to export (default: every trained fold of each configuration).
        onnx: Add one ONNX graph and JSON sidecar per fold (:mod:`automedseg.onnx_engine`).
        onnx_exporter: ``auto``, ``dynamo`` or ``legacy``.
        overwrite: Replace an existing ``output``.
        log: Progress messages.

    Returns:
        The manifest written into the bundle.

    Raises:
        InputError: No ``find_best.json`` and no ``configuration``, a fold without a checkpoint or trained with
            another plan, a damaged checkpoint or plan, an existing output, or (``onnx``) onnx missing.
    """
    from automedseg.inference import find_folds
    from automedseg.prediction import best_configuration, postprocessing_path
    from automedseg.trained import check_folds_match
    from automedseg.version import __version__

    output = Path(output)
    if output.exists() and not overwrite:
        raise InputError(f"{output}: exists; pass --overwrite to replace it")
    if output.suffix.lower() != ".zip":
        raise InputError(f"{output}: a model bundle is a .zip file; name it {output.name}.zip")
    if onnx:
        from automedseg.onnx_engine import require_onnx, resolve_exporter

        require_onnx()
        onnx_exporter = resolve_exporter(onnx_exporter)
    configuration = configuration or best_configuration(ws)
    members = configuration.split("+")
    for m in members:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", m) or m in (".", ".."):
            raise InputError(f"-c {configuration}: {m!r} is not a configuration name")
    groups = [find_folds(ws.configuration_dir(m), list(folds) if folds else None) for m in members]
    for m, group in zip(members, groups):
        check_folds_match(ws, m, group)
    copies = {d: Plans.load(d / "plans.json") for g in groups for d in g if (d / "plans.json").is_file()}
    for d in (d for g in groups for d in g if d not in copies):
        raise InputError(f"{d}: no plans.json (a fold trained by an older automedseg); it cannot be exported")
    first = copies[groups[0][0]]
    plans = Plans.load(ws.plans_path) if ws.plans_path.is_file() else first
    configs = {}
    for m, group in zip(members, groups):
        configs[m] = plans.configurations.get(m) or next(iter(copies[group[0]].configurations.values()))
    plans = dataclasses.replace(plans, configurations=configs)
    pp_path = postprocessing_path(ws, configuration)
    pp_member = pp_path.relative_to(ws.root).as_posix() if pp_path.is_file() else None
    pp_default = _postprocessing(pp_path)
    onnx_info: dict[str, Any] | None = None
    checkpoints: dict[str, str] = {}

    def write(tmp: Path) -> None:
        nonlocal onnx_info
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            out = _ZipWriter(zf)
            out.add("plans.json", plans.to_json().encode("utf-8"))
            out.add_json("find_best.json", _find_best(ws, configuration, members, pp_member))
            pp_files = {pp_path} | {ws.postprocessing_path(m) for m in members}
            for p in sorted(p for p in pp_files if p.is_file()):
                _postprocessing(p)  # validated, then taken as it is
                out.add(p.relative_to(ws.root).as_posix(), p.read_bytes())
            for m, group in zip(members, groups):
                for d in group:
                    key = f"{m}/{d.name}"
                    log(f"export: {key}")
                    out.add(f"{key}/plans.json", (d / "plans.json").read_bytes())
                    state, source = _checkpoint_state(d, log)
                    model = _network(copies[d], d, state, source)  # the weights must fit the fold's network
                    buf = io.BytesIO()
                    torch.save({"model": state}, buf)
                    out.add(f"{key}/checkpoint_final.pt", buf.getvalue())
                    checkpoints[key] = source
                    for extra in ("validation/summary.json", "progress.png"):
                        if (d / extra).is_file():
                            out.add(f"{key}/{extra}", (d / extra).read_bytes())
                    if onnx:
                        from automedseg.onnx_engine import GRAPH_NAME, SIDECAR_NAME, export_onnx, onnx_sidecar

                        fold_plans = copies[d]
                        (cfg,) = fold_plans.configurations.values()
                        graph, info = export_onnx(model, fold_plans, cfg, exporter=onnx_exporter, where=str(d))
                        out.add(f"{key}/{GRAPH_NAME}", graph)
                        out.add_json(f"{key}/{SIDECAR_NAME}", onnx_sidecar(
                            fold_plans, cfg, fold=d.name.removeprefix("fold_"), info=info,
                            postprocessing=pp_default.to_dict() if pp_default is not None else None))
                        onnx_info = info
                        log(f"export: {key}/{GRAPH_NAME}: opset {info['opset']}, {info['exporter']} exporter, "
                            f"max |ONNX - torch| {info['max_abs_difference']:.2g}")
            manifest = _manifest(plans, configuration, members, groups, checkpoints, out.files, pp_member,
                                 onnx_info, __version__)
            info = zipfile.ZipInfo(MANIFEST_NAME, date_time=_DATE)
            info.compress_type, info.create_system, info.external_attr = zipfile.ZIP_DEFLATED, 3, 0o100644 << 16
            zf.writestr(info, json.dumps(to_jsonable(manifest), indent=2) + "\n")

    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, write)
    from automedseg.bundle import verify_bundle

    manifest = verify_bundle(output)  # what a reader will check, checked once here
    log(f"export: {output}: {configuration}, folds {', '.join(f'{m}: {list(manifest.folds[m])}' for m in members)}, "
        f"{len(manifest.files) + 1} members, {output.stat().st_size / 1e6:.1f} MB")
    return manifest


def _manifest(plans: Plans, configuration: str, members: Sequence[str], groups: Sequence[Sequence[Path]],
              checkpoints: dict[str, str], files: dict[str, FileEntry], pp_member: str | None,
              onnx_info: dict[str, Any] | None, version: str) -> BundleManifest:
    return BundleManifest(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        automedseg_version=version,
        torch_version=torch.__version__,
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        dataset_name=plans.dataset_name,
        configuration=configuration,
        members=tuple(members),
        folds={m: tuple(d.name.removeprefix("fold_") for d in g) for m, g in zip(members, groups)},
        labels=dict(plans.labels),
        channel_names=tuple(plans.channel_names),
        checkpoints=dict(checkpoints),
        files=dict(files),
        postprocessing=pp_member,
        onnx=OnnxInfo(opset=onnx_info["opset"], exporter=onnx_info["exporter"],
                      onnx_version=onnx_info["onnx_version"]) if onnx_info else None,
    )
