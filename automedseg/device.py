"""Device choice, precision and memory layout: shared by planning, training, calibration and inference.

:func:`select_device` picks CUDA, MPS or the CPU; :func:`precision_for` the precision training and inference
compute in there (bf16, fp16 with a gradient scaler, or fp32); :func:`autocast_context` enters it;
:func:`memory_format` and :func:`channels_last_norms` give the channels-last layout.

Example:
    >>> needs_grad_scaler("fp16"), needs_grad_scaler("bf16")
    (True, False)
    >>> memory_format(3) is torch.channels_last_3d
    True
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch


def select_device(name: str | None = None) -> torch.device:
    """``cpu``, ``cuda`` or ``mps``; default: CUDA if present, then MPS, then CPU."""
    if name:
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA device is available here")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


#: Autocast dtype of each precision (``fp32``: no autocast).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def precision_for(device: torch.device, *, enabled: bool = True) -> str:
    """The precision training and inference use on ``device``: ``bf16``, ``fp16`` or ``fp32``.

    CUDA GPUs with native bf16 (compute capability 8.0 or newer: Ampere, Hopper ...) use bf16 autocast, which
    needs no gradient scaler; older GPUs fp16 autocast with a gradient scaler (:func:`needs_grad_scaler`).
    CPUs with native bf16 arithmetic (:func:`cpu_supports_bf16`) use bf16, other CPUs and MPS fp32.

    Args:
        device: The device computations run on.
        enabled: ``False`` forces fp32 (``train --no-amp``).
    """
    if not enabled:
        return "fp32"
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return "bf16" if major >= 8 else "fp16"
    if device.type == "cpu" and cpu_supports_bf16():
        return "bf16"
    return "fp32"


def needs_grad_scaler(precision: str) -> bool:
    """Whether training in ``precision`` needs a gradient scaler (fp16 only: bf16 has fp32's exponent range)."""
    return precision == "fp16"


def autocast_context(device: torch.device, enabled: bool = True, *, precision: str | None = None):
    """Autocast to ``precision`` (default: :func:`precision_for` the device), nothing for fp32."""
    precision = precision or precision_for(device, enabled=enabled)
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])
    return torch.autocast(device.type, enabled=False)


#: CPU feature flags (``/proc/cpuinfo``) of native bf16 arithmetic: x86 AVX-512 BF16 / AMX, Arm BF16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def _cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (``None`` where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip().lower()
        if key in ("flags", "features"):
            return frozenset(line.split(":", 1)[1].split())
    return None


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when the CPU computes in bf16 natively (AVX-512 BF16 / AMX on x86, BF16 on Arm).

    oneDNN also reports bf16 support on AVX-512 CPUs *without* BF16 instructions, where it emulates
    bf16: there a bf16 convolution is about 5x slower than fp32 (measured on a 2-core AVX-512 Xeon
    without BF16: 64 vs 340 GFLOP/s forward+backward), so such CPUs train and predict in fp32.
    """
    flags = _cpu_flags()
    if flags is not None and not flags & NATIVE_BF16_FLAGS:
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def memory_format(dims: int) -> torch.memory_format:
    return torch.channels_last_3d if dims == 3 else torch.channels_last


def channels_last_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every affine InstanceNorm by the equivalent per-channel GroupNorm, in place, for CPU inference.

    Same function and parameters, but PyTorch's CPU GroupNorm keeps channels-last tensors channels-last while
    InstanceNorm converts them around every convolution: inference with nnU-Net's hippocampus network went
    from 0.81 to 0.49 s per batch of 8 on 2 cores (bf16), outputs equal to 1e-5. (Training keeps InstanceNorm:
    GroupNorm's backward is slower there. Where :mod:`automedseg.fused_norm`'s kernel builds, inference uses it
    instead: as fast in 3D, 1.3x faster in 2D.)
    """
    for name, child in list(model.named_children()):
        if isinstance(child, torch.nn.modules.instancenorm._InstanceNorm) and child.affine:
            gn = torch.nn.GroupNorm(child.num_features, child.num_features, eps=child.eps, affine=True)
            with torch.no_grad():
                gn.weight.copy_(child.weight)
                gn.bias.copy_(child.bias)
            setattr(model, name, gn.to(child.weight.device))
        else:
            channels_last_norms(child)
    return model
