"""The U-Net of a :class:`~automedseg.plans.NetworkPlan` without building it: strides, output shapes, costs.

Pure Python (no torch): the planner calls the cost model thousands of times while it searches patch sizes and
widths, and the ONNX and inference code need the strides without a model. :func:`_layers` walks the same
topology as the modules of :mod:`automedseg.network` (which re-exports these names), layer by layer.

Example:
    >>> from automedseg.plans import NetworkPlan
    >>> net = NetworkPlan(architecture="plain_unet", features_per_stage=(4, 8), kernel_sizes=((3, 3), (3, 3)),
    ...                   strides=((1, 1), (2, 2)), n_conv_per_stage_encoder=(1, 1), n_conv_per_stage_decoder=(1,),
    ...                   deep_supervision=True)
    >>> total_stride(net), output_shapes(net, (16, 16))
    ((2, 2), ((16, 16),))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from automedseg.plans import NetworkPlan

#: FLOP-equivalents charged per output element of a norm + activation pair (forward) in the cost
#: model. Their arithmetic is ~10 FLOPs, but they are memory bound: on CPUs and GPUs one element costs
#: about as much time as tens to hundreds of conv FLOPs. Override per call to calibrate.
ELEMENTWISE_FLOPS_PER_ELEMENT = 50.0
#: Backward pass cost as a multiple of the forward pass.
BACKWARD_FORWARD_RATIO = 2.0


def check_dims(net: NetworkPlan, dims: int) -> None:
    """Check that ``dims`` is 2 or 3 and that every kernel and stride of ``net`` has ``dims`` entries.

    Raises:
        ValueError: It is not so (the message says which).
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    if any(len(k) != dims for k in net.kernel_sizes) or any(len(s) != dims for s in net.strides):
        raise ValueError(f"kernel_sizes and strides need {dims} entries each for dims={dims}")


# --- strides and shapes ------------------------------------------------------------------------


def cumulative_strides(net: NetworkPlan) -> tuple[tuple[int, ...], ...]:
    """Cumulative stride of every encoder stage's output, shallowest first (stage 0 is all ones)."""
    out = []
    cur = [1] * len(net.strides[0])
    for stride in net.strides:
        cur = [c * int(s) for c, s in zip(cur, stride, strict=True)]
        out.append(tuple(cur))
    return tuple(out)


def total_stride(net: NetworkPlan) -> tuple[int, ...]:
    """Product of all strides per axis: input sizes must be divisible by this."""
    return cumulative_strides(net)[-1]


def output_strides(net: NetworkPlan) -> tuple[tuple[int, ...], ...]:
    """Cumulative stride of every decoder output, highest resolution first (matches forward's list).

    Only the first entry (all ones) exists without deep supervision.
    """
    strides = cumulative_strides(net)[: net.n_stages - 1]
    return strides if net.deep_supervision else strides[:1]


def deep_supervision_scales(net: NetworkPlan) -> tuple[tuple[float, ...], ...]:
    """Per-output scale factors (``1 / stride``) for downsampling targets, highest resolution first."""
    return tuple(tuple(1.0 / s for s in st) for st in output_strides(net))


def output_shapes(net: NetworkPlan, patch_size: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Spatial shape of every output of the forward pass for an input of ``patch_size``."""
    return tuple(
        tuple(int(p) // s for p, s in zip(patch_size, st, strict=True)) for st in output_strides(net)
    )


# --- analytic cost model -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    """One weighted layer of the cost model: FLOPs ``2 * cin * cout * prod(kernel) * macs_voxels``."""

    cin: int
    cout: int
    kernel: tuple[int, ...]
    macs_voxels: int  # voxels the kernel is applied at (output voxels; input voxels for transposed convs)
    out_elements: int  # output activation elements (cout * prod(output shape))
    normed: bool  # followed by a norm (+ activation)
    extra_saved: int = 0  # further elements kept for backward (the decoder concatenation)


def _conv_out(shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    return tuple(
        (n + 2 * (int(k) // 2) - int(k)) // int(s) + 1 for n, k, s in zip(shape, kernel, stride, strict=True)
    )


def _layers(
    net: NetworkPlan, *, in_channels: int, num_classes: int, patch_size: Sequence[int], dims: int
) -> list[_Layer]:
    """Enumerate the weighted layers of the network in forward order (mirrors the modules)."""
    check_dims(net, dims)
    if len(patch_size) != dims:
        raise ValueError(f"patch_size {tuple(patch_size)} needs {dims} entries")
    ones = (1,) * dims
    layers: list[_Layer] = []

    def conv(
        cin: int,
        cout: int,
        kernel: Sequence[int],
        stride: Sequence[int],
        shape: tuple[int, ...],
        normed: bool = True,
        extra_saved: int = 0,
    ) -> tuple[int, ...]:
        out = _conv_out(shape, kernel, stride)
        vox = math.prod(out)
        layers.append(_Layer(cin, cout, tuple(int(k) for k in kernel), vox, cout * vox, normed, extra_saved))
        return out

    feats = net.features_per_stage
    shape = tuple(int(p) for p in patch_size)
    prev = in_channels
    residual = net.architecture == "residual_unet"
    if residual:
        shape = conv(in_channels, feats[0], net.kernel_sizes[0], ones, shape)
        prev = feats[0]
    skip_shapes = []
    for s in range(net.n_stages):
        for i in range(net.n_conv_per_stage_encoder[s]):
            stride = net.strides[s] if i == 0 else ones
            cin = prev if i == 0 else feats[s]
            if residual:
                in_shape = shape
                shape = conv(cin, feats[s], net.kernel_sizes[s], stride, in_shape)
                shape = conv(feats[s], feats[s], net.kernel_sizes[s], ones, shape)
                if cin != feats[s] or any(int(v) != 1 for v in stride):
                    conv(cin, feats[s], ones, stride, in_shape)
            else:
                shape = conv(cin, feats[s], net.kernel_sizes[s], stride, shape)
        prev = feats[s]
        skip_shapes.append(shape)
    for s in range(net.n_stages - 1, 0, -1):
        stride = tuple(int(v) for v in net.strides[s])
        in_vox = math.prod(shape)
        shape = skip_shapes[s - 1]
        layers.append(_Layer(feats[s], feats[s - 1], stride, in_vox, feats[s - 1] * math.prod(shape), False))
        for i in range(net.n_conv_per_stage_decoder[s - 1]):
            cin = 2 * feats[s - 1] if i == 0 else feats[s - 1]
            concat = cin * math.prod(shape) if i == 0 else 0
            shape = conv(cin, feats[s - 1], net.kernel_sizes[s - 1], ones, shape, extra_saved=concat)
        if net.deep_supervision or s == 1:
            conv(feats[s - 1], num_classes, ones, ones, shape, normed=False)
    return layers


def estimate_forward_flops(
    net: NetworkPlan,
    *,
    in_channels: int,
    num_classes: int,
    patch_size: Sequence[int],
    dims: int,
    elementwise_flops: float = ELEMENTWISE_FLOPS_PER_ELEMENT,
) -> float:
    """Analytic FLOPs of one forward pass for one sample (convs, transposed convs, heads, norms).

    ``elementwise_flops`` is charged per output element of every norm (+ activation); 0 counts
    weighted layers only.
    """
    total = 0.0
    layers = _layers(net, in_channels=in_channels, num_classes=num_classes, patch_size=patch_size, dims=dims)
    for layer in layers:
        total += 2.0 * layer.cin * layer.cout * math.prod(layer.kernel) * layer.macs_voxels
        if layer.normed:
            total += elementwise_flops * layer.out_elements
    return total


def estimate_training_flops(
    net: NetworkPlan,
    *,
    in_channels: int,
    num_classes: int,
    patch_size: Sequence[int],
    dims: int,
    elementwise_flops: float = ELEMENTWISE_FLOPS_PER_ELEMENT,
) -> float:
    """Analytic FLOPs of one forward + backward pass for ONE sample.

    Forward conv FLOPs are ``2 * Cin * Cout * prod(kernel) * prod(output_size)`` (transposed convs:
    times the input size); each norm + activation adds ``elementwise_flops`` (default
    :data:`ELEMENTWISE_FLOPS_PER_ELEMENT`) per element; the backward pass costs
    :data:`BACKWARD_FORWARD_RATIO` times the forward pass. Pure Python, no model is built. Multiply
    by the batch size for one training iteration.
    """
    fwd = estimate_forward_flops(
        net,
        in_channels=in_channels,
        num_classes=num_classes,
        patch_size=patch_size,
        dims=dims,
        elementwise_flops=elementwise_flops,
    )
    return fwd * (1.0 + BACKWARD_FORWARD_RATIO)


def estimate_activation_elements(
    net: NetworkPlan, *, in_channels: int, num_classes: int, patch_size: Sequence[int], dims: int
) -> int:
    """Rough count of activation elements kept for backward, for ONE sample.

    Counts every conv / transposed-conv output, plus the norm output where a norm follows (the
    in-place activation reuses it) and the decoder concatenations. Multiply by the bytes per element
    and the batch size for a memory estimate.
    """
    total = 0
    layers = _layers(net, in_channels=in_channels, num_classes=num_classes, patch_size=patch_size, dims=dims)
    for layer in layers:
        total += layer.out_elements * (2 if layer.normed else 1) + layer.extra_saved
    return total
