"""The fused channels-last instance norm + LeakyReLU kernel: same function and gradients as PyTorch's, its build
cache, and the fallback wherever the kernel does not apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from automedseg import fused_norm
from automedseg.fused_norm import fusable, instance_norm_act

pytestmark = pytest.mark.skipif(not fused_norm.fused_available(), reason="no C compiler for the fused kernel")


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.to(memory_format=torch.channels_last_3d if t.dim() == 5 else torch.channels_last)


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, slope: float | None) -> torch.Tensor:
    y = F.instance_norm(x, weight=w, bias=b, eps=1e-5)
    return y if slope is None else F.leaky_relu(y, slope)


def _run(fn, x0: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, g: torch.Tensor, slope: float | None):
    x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
    y = fn(x, w, b, slope)
    y.backward(g)
    return y.detach().double(), x.grad.double(), w.grad.double(), b.grad.double(), y, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [
    (2, 5, 7, 6, 3), (3, 4, 9, 11), (1, 17, 33, 2), (2, 33, 5, 7),  # one thread (small); widths off the vector
    (2, 24, 40, 40), (3, 8, 16, 24, 24),  # split over threads (>= 65,536 elements), samples across the split
])
@pytest.mark.parametrize("slope", [0.01, None])
def test_matches_pytorch_in_value_and_gradient(dtype: torch.dtype, shape: tuple[int, ...],
                                               slope: float | None) -> None:
    gen = torch.Generator().manual_seed(0)
    # an offset mean (the statistics must not cancel) and mixed signs (both branches of the activation)
    x0 = _channels_last((torch.randn(*shape, generator=gen) * 3 + 5).to(dtype))
    w0, b0 = torch.rand(shape[1], generator=gen) + 0.5, torch.randn(shape[1], generator=gen)
    g = _channels_last(torch.randn(*shape, generator=gen).to(dtype))
    exact = _run(_reference, x0.double(), w0.double(), b0.double(), g.double(), slope)
    # PyTorch's own result in the same dtype, on contiguous tensors: its channels-last backward is wrong for a
    # batch of one (torch 2.13: input gradient off by O(1) for (1, 17, 33, 2) channels-last x and gradient)
    native = _run(_reference, x0.contiguous(), w0, b0, g.contiguous(), slope)
    fused = _run(lambda x, w, b, s: instance_norm_act(x, w, b, eps=1e-5, negative_slope=s), x0, w0, b0, g, slope)
    for i, name in enumerate(("output", "input gradient", "weight gradient", "bias gradient")):
        scale = exact[i].abs().max()
        err_native = float((native[i] - exact[i]).abs().max() / scale)
        err_fused = float((fused[i] - exact[i]).abs().max() / scale)
        # never worse than PyTorch's own result in the same dtype (bf16 rounds outputs to 2^-8)
        assert err_fused <= max(2 * err_native, 1e-5), (name, err_fused, err_native)
    y, dx = fused[4], fused[5]
    assert y.dtype == dtype and dx.dtype == dtype
    assert _channels_last(y).data_ptr() == y.data_ptr() and y.is_contiguous(
        memory_format=torch.channels_last_3d if len(shape) == 5 else torch.channels_last)
    assert dx.is_contiguous(memory_format=torch.channels_last_3d if len(shape) == 5 else torch.channels_last)


def test_gradient_of_a_contiguous_upstream_gradient() -> None:
    x = _channels_last(torch.randn(2, 3, 4, 5, 6)).requires_grad_()
    w, b = torch.ones(3), torch.zeros(3)
    g = torch.randn(2, 3, 4, 5, 6)  # contiguous, not channels-last
    instance_norm_act(x, w, b, eps=1e-5, negative_slope=0.01).backward(g)
    ref_x = x.detach().clone().requires_grad_()
    _reference(ref_x, w, b, 0.01).backward(g)
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-5)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: _channels_last(torch.randn(2, 3, 4, 5, 6)), True),
        (lambda: _channels_last(torch.randn(2, 3, 4, 5)), True),
        (lambda: torch.randn(2, 3, 4, 5, 6), False),  # contiguous layout: PyTorch's own norm is right there
        (lambda: _channels_last(torch.randn(2, 3, 4, 5, 6).double()), False),
        (lambda: _channels_last(torch.randn(2, 3, 4, 5, 6).half()), False),
        (lambda: torch.randn(2, 3, 1, 1), False),  # one voxel: nothing to normalise over
        (lambda: torch.randn(2, 3, 7), False),  # 1D
    ],
)
def test_fusable(make, expected: bool) -> None:
    assert fusable(make()) is expected


def test_falls_back_to_pytorch_when_not_fusable() -> None:
    x = torch.randn(2, 3, 4, 5, 6)  # contiguous
    w, b = torch.rand(3), torch.randn(3)
    assert torch.equal(instance_norm_act(x, w, b, eps=1e-5, negative_slope=0.01), _reference(x, w, b, 0.01))


class _NormAct(torch.nn.Module):
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return instance_norm_act(t, torch.ones(2), torch.zeros(2), eps=1e-5, negative_slope=0.01)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("graph", ["export", "trace"])  # the ONNX exporters' two ways in
def test_graphs_record_pytorchs_operators(graph: str) -> None:
    x = _channels_last(torch.randn(1, 2, 3, 4, 5))
    if graph == "export":
        text = str(torch.export.export(_NormAct(), (x,)).graph)
    else:
        text = str(torch.jit.trace(_NormAct(), (x,)).graph)
    assert "instance_norm" in text and "permute" not in text


@pytest.fixture
def fresh_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The kernel built anew into ``tmp_path`` (the process-wide build is restored afterwards)."""
    monkeypatch.setenv("AUTOMEDSEG_KERNEL_CACHE", str(tmp_path))
    fused_norm._library.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    fused_norm._library.cache_clear()


def test_builds_once_into_the_cache(fresh_library: Path) -> None:
    assert fused_norm._library() is not None
    built = list(fresh_library.glob("fused_norm-*.so"))
    assert len(built) == 1 and not list(fresh_library.glob("*.tmp*"))
    stamp = built[0].stat().st_mtime_ns
    fused_norm._library.cache_clear()
    assert fused_norm._library() is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


@pytest.mark.parametrize(
    ("env", "value"),
    [("CC", "false"), ("AUTOMEDSEG_FUSED_NORM", "0")],  # a compiler that fails; switched off
)
def test_without_kernel_pytorch_computes_it(fresh_library: Path, monkeypatch: pytest.MonkeyPatch, env: str,
                                            value: str) -> None:
    monkeypatch.setenv(env, value)
    assert not fused_norm.fused_available()
    assert list(fresh_library.iterdir()) == []  # a failed build leaves nothing behind
    x = _channels_last(torch.randn(2, 3, 4, 5, 6))
    w, b = torch.rand(3), torch.randn(3)
    assert not fusable(x)
    assert torch.equal(instance_norm_act(x, w, b, eps=1e-5, negative_slope=0.01), _reference(x, w, b, 0.01))
