"""The layout-keeping instance norm: PyTorch's function and gradients, in the input's memory format."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from automedseg.instance_norm import instance_norm, keep_layout_norms

torch.set_num_threads(1)

SHAPES = [  # (shape, memory format)
    ((2, 3, 5, 6, 4), torch.channels_last_3d),
    ((2, 3, 5, 6, 4), torch.contiguous_format),
    ((3, 4, 7, 5), torch.channels_last),
    ((1, 2, 9, 8), torch.contiguous_format),
]


@pytest.mark.parametrize(("shape", "fmt"), SHAPES)
def test_instance_norm_matches_pytorch_forward_and_backward(shape: tuple[int, ...],
                                                            fmt: torch.memory_format) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1).to(memory_format=fmt)
    w = torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    outs = []
    for fn in (lambda *a: nn.functional.instance_norm(a[0], weight=a[1], bias=a[2], eps=1e-5),
               lambda *a: instance_norm(*a, eps=1e-5)):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
        y = fn(*leaves)
        y.backward(grad)
        outs.append((y.detach(), *(t.grad for t in leaves)))
    for ref, got in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert outs[1][0].is_contiguous(memory_format=fmt) and outs[1][1].is_contiguous(memory_format=fmt)
    assert torch.autograd.gradcheck(lambda *a: instance_norm(*a, eps=1e-5),
                                    tuple(t.clone().requires_grad_(True) for t in (x, w, b)))


def test_bf16_input_keeps_dtype_and_layout_with_float32_statistics() -> None:
    x = (torch.randn(2, 4, 6, 6, 6) * 50 + 200).to(memory_format=torch.channels_last_3d)
    w, b = torch.ones(4), torch.zeros(4)
    y = instance_norm(x.bfloat16(), w, b, eps=1e-5)
    ref = nn.functional.instance_norm(x.bfloat16().float(), weight=w, bias=b, eps=1e-5)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y.float(), ref, rtol=0.02, atol=0.02)


def test_keep_layout_norms_swaps_in_place_and_trains_alike() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.LeakyReLU(0.01),
                        nn.Sequential(nn.Conv3d(4, 2, 1), nn.InstanceNorm3d(2, affine=True)),
                        nn.InstanceNorm3d(2))  # no affine: left alone
    twin = keep_layout_norms(__import__("copy").deepcopy(net))
    assert [type(m).__name__ for m in twin.modules() if "Norm" in type(m).__name__] == [
        "LayoutKeepingInstanceNorm3d", "LayoutKeepingInstanceNorm3d", "InstanceNorm3d"]
    assert twin.state_dict().keys() == net.state_dict().keys()
    x = torch.randn(2, 1, 6, 6, 6).to(memory_format=torch.channels_last_3d)
    for model in (net, twin):
        model.to(memory_format=torch.channels_last_3d)
        model(x).square().mean().backward()
    for (name, p), q in zip(net.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
