"""Inference: folds loaded and ensembled, exact output geometry (3D oblique/anisotropic, 2D PNG), precision.

The sliding window itself is tested in ``test_sliding_window.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from automedseg.errors import LockedError
from automedseg.inference import (
    FolderReport,
    LoadedFold,
    load_fold,
    output_lock,
    predict_folder,
    predict_probabilities_preprocessed,
)
from automedseg.network import build_network
from automedseg.pipeline import run_plan
from automedseg.plans import Plans
from automedseg.workspace import Workspace

torch.set_num_threads(1)


def _write(path: Path, array: np.ndarray, *, spacing: tuple, origin: tuple, direction: tuple | None = None) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def _oblique(angle: float) -> tuple[float, ...]:
    c, s = np.cos(angle), np.sin(angle)
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def _make_dataset(root: Path, *, two_d: bool, n: int = 5) -> Path:
    rng = np.random.default_rng(0)
    ending = ".png" if two_d else ".nii.gz"
    for i in range(n + 2):
        shape = (int(rng.integers(30, 40)), int(rng.integers(30, 40))) if two_d else \
            (int(rng.integers(8, 12)), int(rng.integers(20, 28)), int(rng.integers(20, 28)))
        label = np.zeros(shape, np.uint8)
        sl = tuple(slice(s // 4, s // 4 + s // 2) for s in shape)
        label[sl] = 1
        image = (rng.normal(60, 10, shape) + 100 * label).clip(0, 255).astype(np.uint8)
        folder = "imagesTr" if i < n else "imagesTs"
        kw = {} if two_d else dict(spacing=(0.8, 0.9, 3.0), origin=(10.0, -5.0, 2.0), direction=_oblique(0.3 * i))
        if two_d:
            for sub in (folder, "labelsTr"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(sitk.GetImageFromArray(image), str(root / folder / f"c{i:02d}_0000{ending}"))
            if i < n:
                sitk.WriteImage(sitk.GetImageFromArray(label), str(root / "labelsTr" / f"c{i:02d}{ending}"))
        else:
            _write(root / folder / f"c{i:02d}_0000{ending}", image, **kw)
            if i < n:
                _write(root / "labelsTr" / f"c{i:02d}{ending}", label, **kw)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "thing": 1}, "numTraining": n,
        "file_ending": ending}))
    return root


def _untrained_fold(ws: Workspace, configuration: str, name: str = "fold_0", seed: int = 0) -> Path:
    """A fold folder holding the plan and random weights: inference only needs these two files."""
    plans = Plans.load(ws.plans_path)
    config = plans.configuration(configuration)
    torch.manual_seed(seed)
    model = build_network(config.network, in_channels=1, num_classes=plans.num_classes, dims=config.dims)
    fold_dir = ws.fold_dir(configuration, name.removeprefix("fold_"))
    fold_dir.mkdir(parents=True, exist_ok=True)
    Plans(**{**plans.__dict__, "configurations": {configuration: config}}).save(fold_dir / "plans.json")
    torch.save({"model": model.state_dict()}, fold_dir / "checkpoint_final.pt")
    return fold_dir


@pytest.mark.parametrize("two_d,configuration", [(False, "3d_fullres"), (True, "2d")])
def test_predictions_have_exactly_the_input_geometry(tmp_path: Path, two_d: bool, configuration: str) -> None:
    dataset = _make_dataset(tmp_path / "ds", two_d=two_d)
    ws = Workspace(tmp_path / "work")
    run_plan(dataset, ws, configurations=[configuration], jobs=1, device="reference-cpu-2core", time_budget_s=60)
    fold = _untrained_fold(ws, configuration)
    out = tmp_path / "pred"
    report = predict_folder(dataset / "imagesTs", out, [[fold]], device="cpu", mirror=True, log=lambda s: None)
    assert len(report.written) == 2 and not report.failed
    for cid in report.written:
        ending = ".png" if two_d else ".nii.gz"
        src = sitk.ReadImage(str(dataset / "imagesTs" / f"{cid}_0000{ending}"))
        dst = sitk.ReadImage(str(out / f"{cid}{ending}"))
        assert dst.GetSize() == src.GetSize()
        assert dst.GetSpacing() == src.GetSpacing()
        assert dst.GetOrigin() == src.GetOrigin()
        assert dst.GetDirection() == src.GetDirection()
    # Existing outputs are kept unless overwrite; a broken input is reported, the others still predicted.
    (dataset / "imagesTs" / f"zz_broken_0000{'.png' if two_d else '.nii.gz'}").write_bytes(b"not an image")
    again = predict_folder(dataset / "imagesTs", out, [[fold]], device="cpu", log=lambda s: None)
    assert sorted(again.skipped_existing) == sorted(report.written)
    assert list(again.failed) == ["zz_broken"]


def test_fold_ensemble_averages_probabilities(tmp_path: Path) -> None:
    dataset = _make_dataset(tmp_path / "ds", two_d=False)
    ws = Workspace(tmp_path / "work")
    run_plan(dataset, ws, configurations=["3d_fullres"], jobs=1, device="reference-cpu-2core", time_budget_s=60)
    folds = [load_fold(_untrained_fold(ws, "3d_fullres", f"fold_{k}", seed=k), device=torch.device("cpu"))
             for k in range(2)]
    data = np.load(next((ws.preprocessed_dir("fullres")).glob("*[0-9].npy")))
    kw = dict(device=torch.device("cpu"), mirror=False, amp=False)
    single = [predict_probabilities_preprocessed([f], data, **kw) for f in folds]
    both = predict_probabilities_preprocessed(folds, data, **kw)
    assert np.allclose(both, (single[0] + single[1]) / 2, atol=1e-5)
    assert np.allclose(both.sum(0), 1, atol=1e-5)
    assert isinstance(folds[0], LoadedFold) and folds[0].model.deep_supervision is False


def test_channels_last_norms_keep_the_function(tmp_path: Path) -> None:
    from automedseg.device import channels_last_norms
    from automedseg.planning import network_for

    net, patch = network_for([1.0, 1.0, 1.0], [16, 16, 16], dims=3, base=4)
    model = build_network(net, in_channels=1, num_classes=3, dims=3).eval()
    model.deep_supervision = False
    for m in model.modules():  # non-trivial affine parameters
        if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 1, *patch)
    with torch.inference_mode():
        before = model(x)
        converted = channels_last_norms(model)
        after = converted(x)
    assert not any(isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) for m in converted.modules())
    assert torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize(("flags", "oneDNN", "expected"), [
    (frozenset({"avx2", "avx512f", "avx512bw"}), True, False),  # AVX-512 without BF16: oneDNN would emulate
    (frozenset({"avx512f", "avx512_bf16"}), True, True),
    (frozenset({"avx512f", "amx_bf16", "amx_tile"}), True, True),
    (frozenset({"fp", "asimd", "bf16"}), True, True),  # Arm "Features" line
    (frozenset({"avx512f", "avx512_bf16"}), False, False),  # flag present but this torch cannot use it
    (None, True, True),  # no /proc/cpuinfo: trust oneDNN
    (None, False, False),
])
def test_bf16_autocast_only_with_native_bf16(monkeypatch: pytest.MonkeyPatch, flags: frozenset[str] | None,
                                             oneDNN: bool, expected: bool) -> None:
    import automedseg.device as inf

    monkeypatch.setattr(inf, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: oneDNN, raising=False)
    inf.cpu_supports_bf16.cache_clear()
    try:
        assert inf.cpu_supports_bf16() is expected
        ctx = inf.autocast_context(torch.device("cpu"))
        with ctx:
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        assert (dtype == torch.bfloat16) is expected
    finally:
        inf.cpu_supports_bf16.cache_clear()


def test_cpu_flags_are_read_from_proc_cpuinfo() -> None:
    import automedseg.device as inf

    path = Path("/proc/cpuinfo")
    lines = path.read_text().splitlines() if path.is_file() else []
    first = next((ln for ln in lines if ln.split(":", 1)[0].strip().lower() in ("flags", "features")), None)
    if first is None:
        assert inf._cpu_flags() is None
    else:
        assert inf._cpu_flags() == frozenset(first.split(":", 1)[1].split())


@pytest.mark.parametrize(("device", "capability", "cpu_bf16", "amp", "precision", "scaler"), [
    ("cuda", (7, 0), False, True, "fp16", True),  # Volta: no native bf16, fp16 + gradient scaler
    ("cuda", (7, 5), True, True, "fp16", True),  # Turing
    ("cuda", (8, 0), False, True, "bf16", False),  # Ampere
    ("cuda", (9, 0), False, True, "bf16", False),  # Hopper (H100, H200)
    ("cuda", (9, 0), False, False, "fp32", False),  # --no-amp
    ("cpu", None, True, True, "bf16", False),  # CPU with native bf16
    ("cpu", None, False, True, "fp32", False),  # CPU without: oneDNN would emulate bf16
    ("cpu", None, True, False, "fp32", False),
    ("mps", None, True, True, "fp32", False),
])
def test_precision_for_device(monkeypatch: pytest.MonkeyPatch, device: str, capability: tuple[int, int] | None,
                              cpu_bf16: bool, amp: bool, precision: str, scaler: bool) -> None:
    import automedseg.device as inf

    def capability_of(dev: torch.device | None = None) -> tuple[int, int]:
        assert capability is not None, "asked a CUDA capability for a non-CUDA device"
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
    monkeypatch.setattr(inf, "cpu_supports_bf16", lambda: cpu_bf16)
    got = inf.precision_for(torch.device(device), enabled=amp)
    assert got == precision
    assert inf.needs_grad_scaler(got) is scaler


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", None)])
def test_autocast_context_follows_the_precision(precision: str, dtype: torch.dtype | None) -> None:
    import automedseg.device as inf

    with inf.autocast_context(torch.device("cpu"), precision=precision):
        got = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    assert got == dtype


def test_folder_report_summary_is_the_line_predict_and_demo_print() -> None:
    report = FolderReport(written=[], skipped_existing=["a", "b", "c", "d"], failed={"e": "unreadable"},
                          seconds_per_case=0.123)
    assert report.summary() == "0 written, 4 kept (exist), 1 failed; 0.12 s per case"


def test_the_sliding_window_names_stay_importable_from_inference() -> None:
    from automedseg import inference, sliding_window

    for name in ("FORWARD_VOXELS_2D", "MAX_FORWARD_BATCH", "_mirror_sets", "forward_batch_size", "gaussian_importance",
                 "predict_preprocessed", "tile_starts"):
        assert getattr(inference, name) is getattr(sliding_window, name)


def test_parts_predict_at_once_but_never_beside_a_whole_folder_run(tmp_path: Path) -> None:
    with output_lock(tmp_path, num_parts=2, part_id=0):
        with output_lock(tmp_path, num_parts=2, part_id=1):
            pass  # the other part runs meanwhile
        for again in ({"num_parts": 2, "part_id": 0}, {}):  # the same part twice; a whole-folder run
            with pytest.raises(LockedError), output_lock(tmp_path, **again):
                pass
    with output_lock(tmp_path):
        with pytest.raises(LockedError), output_lock(tmp_path, num_parts=2, part_id=1):
            pass
    with output_lock(tmp_path, num_parts=2, part_id=1):  # all released
        with pytest.raises(LockedError, match="--num-parts 2"), output_lock(tmp_path, num_parts=3, part_id=2):
            pass  # another split would write some cases twice
    with output_lock(tmp_path, num_parts=3, part_id=2):  # once the 2-part split has finished
        pass
