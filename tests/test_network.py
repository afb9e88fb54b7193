"""Tests for automedseg.network: shapes, gradients, registry, the cost model against the modules, bf16 and memory
formats (the cost model alone: test_network_cost.py)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from automedseg.network import (
    ARCHITECTURE_REGISTRY,
    DynamicUNet,
    build_network,
    count_parameters,
    estimate_forward_flops,
    estimate_training_flops,
    get_architecture,
    output_shapes,
    output_strides,
)
from automedseg.plans import ARCHITECTURES, NetworkPlan

torch.set_num_threads(1)

ARCHS = ARCHITECTURES


def patch_for(dims: int) -> tuple[int, ...]:
    return (8, 16, 16) if dims == 3 else (16, 16)


CASES = [(a, d) for a in ARCHS for d in (2, 3)]


@pytest.mark.parametrize(("arch", "dims"), CASES)
def test_deep_supervision_output_shapes(arch: str, dims: int, small_network_plan: Callable[..., NetworkPlan]) -> None:
    net = small_network_plan(arch, dims)
    model = build_network(net, in_channels=2, num_classes=3, dims=dims)
    patch = patch_for(dims)
    outs = model(torch.randn(2, 2, *patch))
    assert isinstance(outs, list)
    assert len(outs) == net.n_stages - 1
    expected = output_shapes(net, patch)
    assert [tuple(o.shape) for o in outs] == [(2, 3, *s) for s in expected]
    assert expected[0] == patch  # highest resolution first
    # the strides helper agrees with the real downsampling
    for o, st in zip(outs, output_strides(net), strict=True):
        assert tuple(p // s for p, s in zip(patch, st, strict=True)) == tuple(o.shape[2:])


@pytest.mark.parametrize(("arch", "dims"), CASES)
def test_gradients_reach_every_used_parameter(arch: str, dims: int,
                                              small_network_plan: Callable[..., NetworkPlan]) -> None:
    net = small_network_plan(arch, dims)
    model = build_network(net, in_channels=1, num_classes=2, dims=dims)
    x = torch.randn(2, 1, *patch_for(dims), requires_grad=True)
    loss = sum(o.square().mean() for o in model(x))
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    first_conv = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    assert first_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("arch", "dims"), CASES)
def test_deep_supervision_off_returns_tensor(arch: str, dims: int,
                                             small_network_plan: Callable[..., NetworkPlan]) -> None:
    net = small_network_plan(arch, dims)
    model = build_network(net, in_channels=1, num_classes=3, dims=dims).eval()
    x = torch.randn(1, 1, *patch_for(dims))
    with torch.no_grad():
        full = model(x)[0]
        model.deep_supervision = False
        single = model(x)
    assert isinstance(single, torch.Tensor)
    assert single.shape == (1, 3, *patch_for(dims))
    torch.testing.assert_close(single, full)


def test_plan_without_deep_supervision_has_same_state_dict_keys(small_network_plan: Callable[..., NetworkPlan]) -> None:
    on = build_network(small_network_plan("plain_unet", 3), in_channels=1, num_classes=2, dims=3)
    off = build_network(
        small_network_plan("plain_unet", 3, deep_supervision=False), in_channels=1, num_classes=2, dims=3
    )
    assert off.deep_supervision is False
    assert set(on.state_dict()) == set(off.state_dict())
    off.load_state_dict(on.state_dict())
    assert isinstance(off(torch.randn(1, 1, 8, 16, 16)), torch.Tensor)
    assert output_strides(small_network_plan("plain_unet", 3, deep_supervision=False)) == ((1, 1, 1),)


def test_registry_rejects_unknown_names(small_network_plan: Callable[..., NetworkPlan]) -> None:
    assert set(ARCHITECTURE_REGISTRY) == set(ARCHITECTURES)
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        get_architecture("nope")
    net = small_network_plan("plain_unet", 3)
    object.__setattr__(net, "architecture", "transformer")  # bypass the plan's own validation
    with pytest.raises(ValueError, match="transformer"):
        build_network(net, in_channels=1, num_classes=2, dims=3)


def test_registry_dispatches_on_architecture(small_network_plan: Callable[..., NetworkPlan]) -> None:
    plain = build_network(small_network_plan("plain_unet", 2), in_channels=1, num_classes=2, dims=2)
    res = build_network(small_network_plan("residual_unet", 2), in_channels=1, num_classes=2, dims=2)
    assert plain.family is ARCHITECTURE_REGISTRY["plain_unet"]
    assert res.family is ARCHITECTURE_REGISTRY["residual_unet"]
    assert isinstance(plain, DynamicUNet) and isinstance(res, DynamicUNet)
    assert count_parameters(res) > count_parameters(plain)


@pytest.mark.parametrize(
    ("dims", "kernel_dims", "patch"),
    [(2, 3, (16, 16)), (3, 2, (8, 16, 16))],
)
def test_dimension_mismatch_is_rejected(dims: int, kernel_dims: int, patch: tuple[int, ...],
                                        small_network_plan: Callable[..., NetworkPlan]) -> None:
    net = small_network_plan("plain_unet", kernel_dims)
    with pytest.raises(ValueError, match="entries"):
        build_network(net, in_channels=1, num_classes=2, dims=dims)
    with pytest.raises(ValueError):
        estimate_training_flops(net, in_channels=1, num_classes=2, patch_size=patch, dims=dims)


def test_indivisible_input_is_rejected(small_network_plan: Callable[..., NetworkPlan]) -> None:
    model = build_network(small_network_plan("plain_unet", 3), in_channels=1, num_classes=2, dims=3)
    assert model.total_stride == (2, 4, 4)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 1, 8, 18, 16))


def test_weight_init_and_parameter_count(small_network_plan: Callable[..., NetworkPlan]) -> None:
    model = build_network(small_network_plan("residual_unet", 3), in_channels=1, num_classes=2, dims=3)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    assert convs and all(float(m.bias.detach().abs().sum()) == 0.0 for m in convs)
    norms = [m for m in model.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert norms and all(m.affine and m.eps == 1e-5 for m in norms)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


# --- cost model ---------------------------------------------------------------------------------


def _measured_forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    """Conv FLOPs counted with hooks on the real model (transposed convs: per input voxel)."""
    total = [0.0]

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        k = math.prod(mod.kernel_size)
        if isinstance(mod, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
            vox = math.prod(inp[0].shape[2:])
        else:
            vox = math.prod(out.shape[2:])
        total[0] += 2.0 * mod.in_channels * mod.out_channels * k * vox

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(x)
    return total[0]


@pytest.mark.parametrize(("arch", "dims"), CASES)
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_flop_estimate_matches_the_model(arch: str, dims: int, deep_supervision: bool,
                                         small_network_plan: Callable[..., NetworkPlan]) -> None:
    net = small_network_plan(arch, dims, deep_supervision=deep_supervision)
    patch = patch_for(dims)
    model = build_network(net, in_channels=2, num_classes=3, dims=dims)
    measured = _measured_forward_flops(model, torch.randn(1, 2, *patch))
    analytic = estimate_forward_flops(
        net, in_channels=2, num_classes=3, patch_size=patch, dims=dims, elementwise_flops=0.0
    )
    assert analytic == pytest.approx(measured)
    train = estimate_training_flops(
        net, in_channels=2, num_classes=3, patch_size=patch, dims=dims, elementwise_flops=0.0
    )
    assert train == pytest.approx(3.0 * measured)


# --- precision and memory formats ---------------------------------------------------------------


@pytest.mark.parametrize(("arch", "dims"), CASES)
def test_bf16_autocast_forward_backward(arch: str, dims: int, small_network_plan: Callable[..., NetworkPlan]) -> None:
    model = build_network(small_network_plan(arch, dims), in_channels=1, num_classes=2, dims=dims)
    x = torch.randn(2, 1, *patch_for(dims))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = model(x)
        loss = sum(o.float().square().mean() for o in outs)
    assert outs[0].shape == (2, 2, *patch_for(dims))
    assert all(torch.isfinite(o.float()).all() for o in outs)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(("arch", "dims"), CASES)
def test_channels_last(arch: str, dims: int, small_network_plan: Callable[..., NetworkPlan]) -> None:
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    model = build_network(small_network_plan(arch, dims), in_channels=1, num_classes=2, dims=dims)
    x = torch.randn(2, 1, *patch_for(dims))
    with torch.no_grad():
        ref = model(x)
    model = model.to(memory_format=fmt)
    with torch.no_grad():
        out = model(x.contiguous(memory_format=fmt))
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sum(o.float().mean() for o in model(x.contiguous(memory_format=fmt)))
    loss.backward()
