"""Tests for automedseg.network_cost: strides, output shapes and the analytic cost model, without torch.

That the cost model counts what the modules compute is checked against a built model in test_network.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from automedseg.network_cost import (
    check_dims,
    cumulative_strides,
    deep_supervision_scales,
    estimate_activation_elements,
    estimate_training_flops,
    output_shapes,
    output_strides,
    total_stride,
)
from automedseg.plans import NetworkPlan

ARCHS = ("plain_unet", "residual_unet")


def test_strides_helpers(small_network_plan: Callable[..., NetworkPlan]) -> None:
    net = small_network_plan("plain_unet", 3, widths=(4, 8, 8, 8))
    assert cumulative_strides(net) == ((1, 1, 1), (1, 2, 2), (2, 4, 4), (4, 8, 8))
    assert total_stride(net) == (4, 8, 8)
    assert output_strides(net) == ((1, 1, 1), (1, 2, 2), (2, 4, 4))
    assert deep_supervision_scales(net)[1] == (1.0, 0.5, 0.5)
    assert output_shapes(net, (8, 16, 16)) == ((8, 16, 16), (8, 8, 8), (4, 4, 4))


@pytest.mark.parametrize(("dims", "kernel_dims", "message"), [
    (4, 3, "dims must be 2 or 3"),
    (2, 3, "need 2 entries"),
])
def test_check_dims(small_network_plan: Callable[..., NetworkPlan], dims: int, kernel_dims: int,
                    message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_dims(small_network_plan("plain_unet", kernel_dims), dims)


@pytest.mark.parametrize("arch", ARCHS)
def test_flop_estimate_scaling(arch: str, small_network_plan: Callable[..., NetworkPlan]) -> None:
    kw = {"in_channels": 1, "num_classes": 3, "dims": 3}
    net = small_network_plan(arch, 3, widths=(32, 64, 128, 256))
    base = estimate_training_flops(net, patch_size=(16, 64, 64), **kw)
    assert base > 0
    bigger = estimate_training_flops(net, patch_size=(32, 64, 128), **kw)
    assert bigger / base == pytest.approx(4.0, rel=0.05)
    wide = small_network_plan(arch, 3, widths=(64, 128, 256, 512))
    ratio = estimate_training_flops(wide, patch_size=(16, 64, 64), **kw) / base
    assert 3.5 < ratio < 4.05
    mem = estimate_activation_elements(net, patch_size=(16, 64, 64), **kw)
    assert 0 < mem
    assert estimate_activation_elements(net, patch_size=(32, 64, 128), **kw) / mem == pytest.approx(
        4.0, rel=0.05
    )


def test_flop_estimate_is_cheap(small_network_plan: Callable[..., NetworkPlan]) -> None:
    net = small_network_plan("residual_unet", 3, widths=(32, 64, 128, 256, 320, 320))
    start = time.perf_counter()
    for _ in range(200):
        estimate_training_flops(net, in_channels=1, num_classes=3, patch_size=(64, 128, 128), dims=3)
    assert time.perf_counter() - start < 1.0


def test_the_cost_model_does_not_import_torch() -> None:
    code = "import sys, automedseg.network_cost; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
