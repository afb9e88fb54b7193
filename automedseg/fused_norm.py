"""Instance norm + LeakyReLU fused into one CPU kernel that keeps channels-last tensors channels-last.

PyTorch's CPU ``instance_norm`` runs as a batch norm over a ``[1, N*C, ...]`` view: a channels-last input is copied
to the contiguous layout, and the next convolution copies the contiguous result back. On 2 cores those copies,
plus the separate norm, activation and their backward passes, were 41 % of nnU-Net's hippocampus training step
(``benchmarks/profile_step.py --width 32 --batch 7``: ``copy_`` alone 29.6 %). The kernel here
(``fused_norm.c``) reads a channels-last tensor as the row-major ``[N, S, C]`` array it is: the forward pass
reads it twice (statistics, then normalise + activate) and writes once; the backward pass reads input and
gradient twice and writes once, recomputing the activation's sign instead of storing the output.

The C source is compiled once per machine with the system's C compiler (``cc``, about a second) into a cache
folder (``$AUTOMEDSEG_KERNEL_CACHE``, else ``~/.cache/automedseg/kernels``), written atomically and named by the
hash of source, compiler and CPU. Without a compiler, with ``AUTOMEDSEG_FUSED_NORM=0``, or for any tensor the
kernel does not cover (not on the CPU, not fp32/bf16, not channels-last, while tracing or exporting)
:func:`instance_norm_act` computes the same function with PyTorch's own operators.

Example:
    >>> import torch
    >>> x = torch.randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d)
    >>> w, b = torch.ones(3), torch.zeros(3)
    >>> y = instance_norm_act(x, w, b, eps=1e-5, negative_slope=0.01)
    >>> ref = torch.nn.functional.leaky_relu(torch.nn.functional.instance_norm(x, weight=w, bias=b, eps=1e-5), 0.01)
    >>> bool(torch.allclose(y, ref, atol=1e-4))
    True
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("fused_norm.c")
#: Compiler flags; ``-march=native`` is why the cache name includes the CPU.
CFLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-pthread")
_COMPILE_TIMEOUT_S = 120
_build_lock = threading.Lock()
_P = ctypes.c_void_p
_I64 = ctypes.c_int64


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: ``$AUTOMEDSEG_KERNEL_CACHE``, else ``~/.cache/automedseg/kernels``."""
    env = os.environ.get("AUTOMEDSEG_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "automedseg" / "kernels"


def _cpu_signature() -> str:
    """The CPU as ``-march=native`` sees it: model and feature flags (one line of /proc/cpuinfo each)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(keep)) + platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _compile(compiler: str, target: Path) -> bool:
    """Compile :data:`SOURCE` into ``target`` atomically; False (nothing written) when the compiler or the folder
    fails."""
    from automedseg.atomic import remove_stale_temp_files

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(target.parent)  # of a build that was killed
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError:
        return False
    try:
        done = subprocess.run([compiler, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True,
                              timeout=_COMPILE_TIMEOUT_S, check=False)
        if done.returncode != 0:
            return False
        os.replace(tmp, target)
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i, f = ctypes.c_int, ctypes.c_float
    lib.amseg_stats.argtypes = [_P, i, _I64, _I64, _I64, _P, _P, _P, i]
    lib.amseg_apply.argtypes = [_P, _P, i, _I64, _I64, _I64, _P, _P, f, i]
    lib.amseg_grad_sums.argtypes = [_P, _P, i, _I64, _I64, _I64, _P, _P, _P, f, _P, _P, i]
    lib.amseg_grad_input.argtypes = [_P, _P, _P, i, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, f, i]
    for fn in (lib.amseg_stats, lib.amseg_apply, lib.amseg_grad_sums, lib.amseg_grad_input):
        fn.restype = i
    return lib


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("AUTOMEDSEG_FUSED_NORM", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(CFLAGS), _cpu_signature()]).encode())
        target = kernel_cache_dir() / f"fused_norm-{key.hexdigest()[:16]}.so"
        with _build_lock:
            if not target.exists() and not _compile(compiler, target):
                return None
    except (OSError, subprocess.SubprocessError):  # no compiler to ask, no source, no cache folder: PyTorch's norm
        return None
    try:
        return _declare(ctypes.CDLL(str(target)))
    except OSError:
        return None


def fused_available() -> bool:
    """Whether the compiled kernel is usable on this machine (compiling it on first call)."""
    return _library() is not None


def _rows_view(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as its ``[N, S, C]`` channels-last storage (a view), or None when it is not laid out that way."""
    if x.dim() not in (4, 5):
        return None
    xp = x.permute(0, *range(2, x.dim()), 1)
    return xp if xp.is_contiguous() else None


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _check(rc: int) -> None:
    if rc != 0:
        raise MemoryError("fused_norm kernel: out of memory for its partial sums")


class _InstanceNormAct(torch.autograd.Function):
    """Autograd of the fused kernel (first derivatives only)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, slope: float):  # type: ignore[override]
        lib = _library()
        n, c = x.shape[:2]
        s = math.prod(x.shape[2:])
        bf16 = int(x.dtype == torch.bfloat16)
        threads = torch.get_num_threads()
        shift = x[(slice(None), slice(None)) + (0,) * (x.dim() - 2)].float().contiguous()  # the first voxel
        sum0 = torch.zeros(n, c, dtype=torch.float64)
        sum1 = torch.zeros(n, c, dtype=torch.float64)
        _check(lib.amseg_stats(_ptr(x), bf16, n, s, c, _ptr(shift), _ptr(sum0), _ptr(sum1), threads))
        d_mean = sum0 / s
        var = (sum1 / s - d_mean * d_mean).clamp_min(0.0)
        mean = (shift.double() + d_mean).float().contiguous()
        rstd = torch.rsqrt(var + eps).float()
        a = (rstd * weight.detach().float()).contiguous()
        b = (bias.detach().float() - mean * a).contiguous()
        y = torch.empty_like(x)
        _check(lib.amseg_apply(_ptr(x), _ptr(y), bf16, n, s, c, _ptr(a), _ptr(b), slope, threads))
        ctx.save_for_backward(x, weight, mean, rstd, a, b)
        ctx.slope = slope
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        lib = _library()
        x, weight, mean, rstd, a, b = ctx.saved_tensors
        n, c = x.shape[:2]
        s = math.prod(x.shape[2:])
        bf16 = int(x.dtype == torch.bfloat16)
        threads = torch.get_num_threads()
        dy = dy.to(x.dtype)
        if _rows_view(dy) is None:
            dy = dy.contiguous(memory_format=_channels_last(x.dim()))
        sum_d = torch.zeros(n, c, dtype=torch.float64)
        sum_dx = torch.zeros(n, c, dtype=torch.float64)
        _check(lib.amseg_grad_sums(_ptr(x), _ptr(dy), bf16, n, s, c, _ptr(mean), _ptr(a), _ptr(b), ctx.slope,
                                   _ptr(sum_d), _ptr(sum_dx), threads))
        r = rstd.double()
        w = weight.detach().double()
        kd = (r * w).float().contiguous()
        k0 = (-r * w * sum_d / s).float().contiguous()
        kx = (-(r**3) * w * sum_dx / s).float().contiguous()
        dx = torch.empty_like(x)
        _check(lib.amseg_grad_input(_ptr(x), _ptr(dy), _ptr(dx), bf16, n, s, c, _ptr(mean), _ptr(a), _ptr(b),
                                    _ptr(kd), _ptr(k0), _ptr(kx), ctx.slope, threads))
        d_weight = (r * sum_dx).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        d_bias = sum_d.sum(0).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return dx, d_weight, d_bias, None, None


def _channels_last(ndim: int) -> torch.memory_format:
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # (torch >= 2.3)
    return bool(is_compiling()) if is_compiling is not None else False


def fusable(x: torch.Tensor) -> bool:
    """Whether :func:`instance_norm_act` runs ``x`` through the fused kernel."""
    if torch.jit.is_tracing() or torch.jit.is_scripting() or _compiling():
        return False  # graphs (ONNX export, torch.compile) record PyTorch's own operators
    if torch.onnx.is_in_onnx_export():
        return False
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or _rows_view(x) is None:
        return False
    return x.numel() > 0 and math.prod(x.shape[2:]) > 1 and fused_available()


def instance_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float,
                      negative_slope: float | None) -> torch.Tensor:
    """Affine instance norm of ``x`` followed by LeakyReLU (``negative_slope``; None: no activation).

    Args:
        x: ``[N, C, *spatial]`` in 2D or 3D.
        weight: Per-channel scale ``[C]``.
        bias: Per-channel shift ``[C]``.
        eps: Added to the variance.
        negative_slope: LeakyReLU's slope for negative inputs; None for the norm alone.

    Returns:
        A tensor of ``x``'s shape, dtype and layout (fused kernel) or PyTorch's result (elsewhere).
    """
    slope = 1.0 if negative_slope is None else float(negative_slope)
    if fusable(x):
        return _InstanceNormAct.apply(x, weight, bias, float(eps), slope)
    y = F.instance_norm(x, weight=weight, bias=bias, eps=eps)
    return y if negative_slope is None else F.leaky_relu(y, negative_slope)
