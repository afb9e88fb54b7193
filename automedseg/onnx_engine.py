"""ONNX graphs of trained folds, and ONNX Runtime as the network of the prediction pipeline.

``automedseg export --onnx`` calls :func:`export_onnx` for each fold: the network (without deep supervision)
becomes one ONNX graph with a dynamic batch and dynamic spatial axes (each a multiple of the network's total
stride), checked with ``onnx.checker`` and run once through ONNX Runtime against torch before it is kept. Its
JSON sidecar (:func:`onnx_sidecar`) says what a program outside automedseg must do around the graph: crop,
axis order, normalisation, target spacing and resampling orders, patch, tile step and Gaussian blending, mirror
axes, label map and post-processing.

``automedseg predict --engine onnxruntime`` runs the same pipeline as the torch engine (preprocessing, sliding
window with test-time mirroring, resampling back, post-processing) with :class:`OnnxNetwork` in place of the
torch network: :func:`load_onnx_fold` returns a :class:`~automedseg.loaded_fold.LoadedFold` whose ``model`` is an
ONNX Runtime session wrapped as a callable on tensors. The ONNX engine computes in float32.

Two exporters: ``dynamo`` (``torch.onnx.export(..., dynamo=True)``, torch's default since 2.9; needs
``onnxscript``) and ``legacy`` (the TorchScript-based exporter, ``dynamo=False``: 10-20x faster to export, same
graph numerics). ``auto`` takes ``dynamo`` when ``onnxscript`` is installed, else ``legacy``.
"""

from __future__ import annotations

import importlib.util
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from automedseg.errors import InputError
from automedseg.loaded_fold import LoadedFold
from automedseg.network_cost import total_stride
from automedseg.plans import ConfigurationPlan, Plans, to_jsonable

GRAPH_NAME = "model.onnx"
SIDECAR_NAME = "onnx.json"
SIDECAR_FORMAT = "automedseg-onnx-sidecar"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
EXPORTERS = ("auto", "dynamo", "legacy")
#: Largest difference between the ONNX graph's and torch's logits accepted at export, relative to the logits' range.
EXPORT_TOLERANCE = 1e-3


def require_onnx(*, runtime: bool = True) -> None:
    """Refuse with the install command when ``onnx`` (and ``onnxruntime``) are missing.

    Raises:
        InputError: A package is missing (one line naming it and the extra to install).
    """
    needed = ["onnx", "onnxruntime"] if runtime else ["onnx"]
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"{', '.join(missing)} not installed; `pip install 'automedseg[export]'` "
                         "(onnx, onnxruntime, onnxscript) to export or run ONNX graphs")


def resolve_exporter(exporter: str) -> str:
    """``dynamo`` or ``legacy`` for ``auto``/``dynamo``/``legacy`` (``auto``: dynamo when onnxscript is installed)."""
    if exporter not in EXPORTERS:
        raise InputError(f"--onnx-exporter {exporter}: use one of {', '.join(EXPORTERS)}")
    has_script = importlib.util.find_spec("onnxscript") is not None
    if exporter == "auto":
        return "dynamo" if has_script else "legacy"
    if exporter == "dynamo" and not has_script:
        raise InputError("--onnx-exporter dynamo: onnxscript is not installed (`pip install onnxscript`); "
                         "use --onnx-exporter legacy")
    return exporter


def _axis_names(dims: int) -> list[str]:
    return ["batch", "channel", *(["z", "y", "x"] if dims == 3 else ["y", "x"])]


def _name_dynamic_axes(model: Any, dims: int) -> None:
    """Give the graph's dynamic input and output axes readable names (``batch``, ``z``, ``y``, ``x``)."""
    names = _axis_names(dims)
    for value in (*model.graph.input, *model.graph.output):
        for i, d in enumerate(value.type.tensor_type.shape.dim):
            if i != 1:  # channels and classes stay fixed
                d.dim_param = names[i]


def _torch_export(model: torch.nn.Module, example: torch.Tensor, path: Path, exporter: str, dims: int) -> None:
    spatial = {a + 2: n for a, n in enumerate(_axis_names(dims)[2:])}
    with warnings.catch_warnings():  # the trace warns about the stride check and the deprecated exporter
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dim = torch.export.Dim
            shapes = {"x": {0: dim("batch", min=1), **{a: dim.AUTO for a in spatial}}}
            torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=shapes,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], external_data=False,
                              verbose=False)
        else:
            axes = {0: "batch", **spatial}
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes})


def export_onnx(model: torch.nn.Module, plans: Plans, config: ConfigurationPlan, *, exporter: str = "auto",
                where: str = "") -> tuple[bytes, dict[str, Any]]:
    """One fold's network as an ONNX graph, checked with ``onnx.checker`` and against torch.

    Args:
        model: The network with its trained weights (InstanceNorm, as built by :func:`build_network`).
        plans: The fold's plan (channels, classes).
        config: The fold's configuration (patch, dims).
        exporter: ``auto``, ``dynamo`` or ``legacy`` (:func:`resolve_exporter`).
        where: The fold, named in errors.

    Returns:
        The serialised graph and ``{"opset", "exporter", "onnx_version", "max_abs_difference"}``.

    Raises:
        InputError: onnx is missing, or the exported graph disagrees with torch.
    """
    require_onnx()
    import onnx

    exporter = resolve_exporter(exporter)
    model = model.cpu().eval()
    model.deep_supervision = False
    gen = torch.Generator().manual_seed(0)
    example = torch.randn((2, len(plans.channel_names), *config.patch_size), generator=gen)
    with tempfile.TemporaryDirectory(prefix="automedseg-onnx-") as tmp:
        path = Path(tmp) / GRAPH_NAME
        _torch_export(model, example, path, exporter, config.dims)
        proto = onnx.load(str(path))
    _name_dynamic_axes(proto, config.dims)
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    # A second input shape (batch 1, spatial axes of another size) checks that the axes are really dynamic.
    other = torch.randn((1, len(plans.channel_names),
                         *[p + s for p, s in zip(config.patch_size, total_stride(config.network))]), generator=gen)
    diff = 0.0
    session = _session(data, threads=torch.get_num_threads())
    with torch.inference_mode():
        for x in (example, other):
            ref = model(x).float().numpy()
            got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
            if got.shape != ref.shape:
                raise InputError(f"{where}: the ONNX graph gives shape {got.shape} for input {tuple(x.shape)}, "
                                 f"torch {ref.shape}")
            diff = max(diff, float(np.abs(got - ref).max()))
            if diff > EXPORT_TOLERANCE * max(1.0, float(np.abs(ref).max())):
                hint = "; try --onnx-exporter legacy" if exporter == "dynamo" else ""
                raise InputError(f"{where}: the ONNX graph ({exporter} exporter) differs from torch by {diff:.3g}"
                                 + hint)
    return data, {"opset": int(opset), "exporter": exporter, "onnx_version": onnx.__version__,
                  "max_abs_difference": diff}


def onnx_sidecar(plans: Plans, config: ConfigurationPlan, *, fold: str, info: dict[str, Any],
                 postprocessing: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON that says how to use a fold's graph without automedseg (``onnx.json``)."""
    dims = config.dims
    spatial = _axis_names(dims)[2:]
    return {
        "format": SIDECAR_FORMAT,
        "format_version": 1,
        "configuration": config.name,
        "fold": fold,
        "graph": GRAPH_NAME,
        "opset": info["opset"],
        "exporter": info["exporter"],
        "torch_version": torch.__version__,
        "onnx_version": info["onnx_version"],
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", len(plans.channel_names), *spatial],
                  "spatial_multiple_of": list(total_stride(config.network)),
                  "channels": list(plans.channel_names)},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", plans.num_classes, *spatial],
                   "meaning": "logits of the training indices 0..K-1 (softmax over axis 1); index k is the k-th "
                              "value of label_values"},
        "preprocessing": {
            "steps": ["crop to the bounding box of voxels nonzero in any channel",
                      "transpose (z, y, x) array axes by transpose_forward",
                      "normalise each channel (normalization)",
                      "resample to spacing_mm (image_order; separate_z: out_of_plane_order along the "
                      "out-of-plane axis)"],
            "transpose_forward": list(plans.transpose_forward),
            "spacing_mm": list(config.spacing_mm),
            "normalization": to_jsonable(config.normalization),
            "image_order": config.image_order,
            "label_order": config.label_order,
            "separate_z": config.separate_z,
            "out_of_plane_order": config.out_of_plane_order,
            "dims": dims,
            "note": "dims 2: each z-slice (after transposition) is one sample of shape (channels, y, x)",
        },
        "sliding_window": {"patch_size": list(config.patch_size), "step": 0.5, "blending": "gaussian",
                           "gaussian_sigma_scale": 0.125,
                           "mirror_axes": list(config.augmentation.mirror_axes),
                           "mirror_note": "test-time mirroring averages the logits over every subset of these "
                                          "patch axes (0 = first spatial axis of a patch)"},
        "labels": dict(plans.labels),
        "label_values": list(plans.label_values),
        "postprocessing": postprocessing,
    }


def _session(model: bytes | str, *, threads: int | None = None, providers: list[str] | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=options, providers=providers or ["CPUExecutionProvider"])


class OnnxNetwork:
    """An ONNX Runtime session called like the torch network: ``(N, C, *spatial)`` tensor in, logits out."""

    def __init__(self, session: Any, *, where: str = "") -> None:
        self.session = session
        self.where = where
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K, *spatial)`` as a float32 CPU tensor."""
        data = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        out = self.session.run([self.output_name], {self.input_name: data})[0]
        return torch.from_numpy(out)


def load_onnx_fold(fold_dir: Path, *, device: torch.device | None = None,
                   warn: Callable[[str], None] = print) -> Any:
    """A :class:`~automedseg.loaded_fold.LoadedFold` whose network is the fold's ONNX graph run by ONNX Runtime.

    Args:
        fold_dir: A fold folder of an exported bundle (``plans.json``, ``model.onnx``).
        device: ``cuda`` uses ONNX Runtime's CUDA provider when it is installed; anything else the CPU.
        warn: Unused (the torch loader's signature).

    Raises:
        InputError: onnxruntime is missing, or the fold has no ONNX graph (made with ``export --onnx``).
    """
    require_onnx()
    import onnxruntime as ort

    fold_dir = Path(fold_dir)
    plans = Plans.load(fold_dir / "plans.json")
    (name,) = plans.configurations
    graph = fold_dir / GRAPH_NAME
    if not graph.is_file():
        raise InputError(f"{fold_dir}: no {GRAPH_NAME}; `automedseg export ... --onnx` writes one per fold "
                         "(or predict with --engine torch)")
    providers = ["CPUExecutionProvider"]
    if device is not None and device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InputError("--engine onnxruntime --device cuda: this onnxruntime has no CUDA provider "
                             "(install onnxruntime-gpu)")
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = _session(str(graph), threads=torch.get_num_threads(), providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise InputError(f"{graph}: not a usable ONNX graph ({str(e).strip().splitlines()[0][:160]})") from None
    return LoadedFold(plans, plans.configurations[name], OnnxNetwork(session, where=str(graph)), graph)
