"""The U-Net of a :class:`~automedseg.plans.NetworkPlan` without building it: strides, output shapes, costs.

Pure Python (no torch): the planner calls the cost model thousands of times while it searches patch sizes and
widths, and the ONNX and inference code need the strides without a model. :func:`_layers` walks the same
topology as the modules of :mod:`automedseg.network` (which re-exports these names), layer by layer, for every
architecture family of :data:`ARCHITECTURE_FAMILIES` (the recipe both sides compose the network from).

Example:
    >>> from automedseg.plans import NetworkPlan
    >>> net = NetworkPlan(architecture="plain_unet", features_per_stage=(4, 8), kernel_sizes=((3, 3), (3, 3)),
    ...                   strides=((1, 1), (2, 2)), n_conv_per_stage_encoder=(1, 1), n_conv_per_stage_decoder=(1,),
    ...                   deep_supervision=True)
    >>> total_stride(net), output_shapes(net, (16, 16))
    ((2, 2), ((16, 16),))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from automedseg.plans import NetworkPlan

#: FLOP-equivalents charged per output element of a norm + activation pair (forward) in the cost
#: model. Their arithmetic is ~10 FLOPs, but they are memory bound: on CPUs and GPUs one element costs
#: about as much time as tens to hundreds of conv FLOPs. Override per call to calibrate.
ELEMENTWISE_FLOPS_PER_ELEMENT = 50.0
#: Backward pass cost as a multiple of the forward pass.
BACKWARD_FORWARD_RATIO = 2.0
#: Atrous rates of an ASPP whose plan sets none (``aspp_dilations: null``), on every axis the bottleneck's kernel
#: spans; the planner sets rates from the bottleneck's size instead (:func:`aspp_rates_for`).
DEFAULT_ASPP_RATES = (1, 2, 3)
#: Fractions of the bottleneck's size that the planner's atrous rates reach, as DeepLab's 6, 12, 18 on a
#: 33-voxel map (output stride 16 of a 513 crop): about 1/6, 1/3 and 1/2.
ASPP_RATE_FRACTIONS = (1 / 6, 1 / 3, 1 / 2)


@dataclass(frozen=True)
class Family:
    """How a network family is composed from the shared parts (encoder, skips, bottleneck, up-sampling).

    Attributes:
        encoder: ``plain`` (conv-norm-act stacks) or ``residual`` (a stem, then basic residual blocks).
        pooling: ``strided_conv`` (the first conv of a stage carries the stride; transposed-conv up-sampling) or
            ``max_pool`` (max pooling with indices; the decoder max-unpools with them after a 1x1 conv).
        skip: ``concat`` (the skip is concatenated), ``attention`` (gated by an additive attention gate, then
            concatenated) or ``none`` (no skip features, only the pooling indices).
        bottleneck: ``none`` or ``aspp`` (atrous spatial pyramid pooling after the last encoder stage).
    """

    encoder: str = "plain"
    pooling: str = "strided_conv"
    skip: str = "concat"
    bottleneck: str = "none"


#: Architecture name (``NetworkPlan.architecture``) -> its composition; keys are :data:`automedseg.plans.ARCHITECTURES`.
ARCHITECTURE_FAMILIES: dict[str, Family] = {
    "plain_unet": Family(),
    "residual_unet": Family(encoder="residual"),
    "attention_unet": Family(skip="attention"),
    "aspp_unet": Family(bottleneck="aspp"),
    "segnet_unet": Family(pooling="max_pool", skip="none"),
}


def family_of(net: NetworkPlan) -> Family:
    """The composition of ``net``'s architecture; raises ``ValueError`` listing the known ones."""
    try:
        return ARCHITECTURE_FAMILIES[net.architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {net.architecture!r}; known: {sorted(ARCHITECTURE_FAMILIES)}") from None


def check_dims(net: NetworkPlan, dims: int) -> None:
    """Check that ``dims`` is 2 or 3 and that every kernel and stride of ``net`` has ``dims`` entries.

    Raises:
        ValueError: It is not so (the message says which).
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    if any(len(k) != dims for k in net.kernel_sizes) or any(len(s) != dims for s in net.strides):
        raise ValueError(f"kernel_sizes and strides need {dims} entries each for dims={dims}")
    if any(len(d) != dims for d in net.aspp_dilations or ()):
        raise ValueError(f"aspp_dilations need {dims} entries each for dims={dims}")


# --- ASPP rates ---------------------------------------------------------------------------------


def aspp_dilations(net: NetworkPlan) -> tuple[tuple[int, ...], ...]:
    """The dilation of each atrous ASPP branch, one int per axis: the plan's, else :data:`DEFAULT_ASPP_RATES`
    on the axes the bottleneck's kernel spans (1 on the others).

    Example:
        >>> net = NetworkPlan("aspp_unet", (4, 8), ((1, 3, 3), (1, 3, 3)), ((1, 1, 1), (1, 2, 2)), (1, 1), (1,))
        >>> aspp_dilations(net)
        ((1, 1, 1), (1, 2, 2), (1, 3, 3))
    """
    if net.aspp_dilations is not None:
        return net.aspp_dilations
    kernel = net.kernel_sizes[-1]
    return tuple(tuple(r if int(k) > 1 else 1 for k in kernel) for r in DEFAULT_ASPP_RATES)


def aspp_rates_for(net: NetworkPlan, patch_size: Sequence[int]) -> NetworkPlan:
    """``net`` with ASPP rates suited to its bottleneck for ``patch_size`` (other families: without rates).

    Per axis of bottleneck size ``b`` (the patch over the total stride) whose kernel spans it, the ``j``-th
    branch's rate is ``round(b * ASPP_RATE_FRACTIONS[j])``, at least ``j + 1`` and at most ``b - 1`` (a tap
    farther away than that reads only padding); 1 where the kernel is 1. Small maps repeat rates.

    Example:
        >>> net = NetworkPlan("aspp_unet", (4, 8), ((3, 3), (3, 3)), ((1, 1), (2, 2)), (1, 1), (1,))
        >>> aspp_rates_for(net, (48, 12)).aspp_dilations
        ((4, 1), (8, 2), (12, 3))
    """
    if family_of(net).bottleneck != "aspp":
        return net if net.aspp_dilations is None else dataclasses.replace(net, aspp_dilations=None)
    bottleneck = [int(p) // s for p, s in zip(patch_size, total_stride(net), strict=True)]
    rates = tuple(
        tuple(max(1, min(max(j + 1, round(b * f)), b - 1)) if int(k) > 1 else 1
              for b, k in zip(bottleneck, net.kernel_sizes[-1], strict=True))
        for j, f in enumerate(ASPP_RATE_FRACTIONS)
    )
    return dataclasses.replace(net, aspp_dilations=rates)


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
    normed: bool  # followed by a norm (2 * cout affine parameters) + activation
    extra_saved: int = 0  # further elements kept for backward (concatenations, pooling, gating)
    bias: bool = True
    elementwise: int = 0  # further elements of memory-bound ops charged like a norm (attention gates, pooling)

    @property
    def parameters(self) -> int:
        return self.cin * self.cout * math.prod(self.kernel) + self.cout * (int(self.bias) + 2 * int(self.normed))


def _conv_out(shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int], pad: bool = True) -> tuple[int, ...]:
    return tuple(
        (n + 2 * (int(k) // 2) * int(pad) - int(k)) // int(s) + 1
        for n, k, s in zip(shape, kernel, stride, strict=True)
    )


def _layers(
    net: NetworkPlan, *, in_channels: int, num_classes: int, patch_size: Sequence[int], dims: int
) -> list[_Layer]:
    """Enumerate the weighted layers of the network in forward order (mirrors the modules)."""
    check_dims(net, dims)
    if len(patch_size) != dims:
        raise ValueError(f"patch_size {tuple(patch_size)} needs {dims} entries")
    family = family_of(net)
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
        pad: bool = True,
        **kw: int | bool,
    ) -> tuple[int, ...]:
        out = _conv_out(shape, kernel, stride, pad)
        vox = math.prod(out)
        layers.append(_Layer(cin, cout, tuple(int(k) for k in kernel), vox, cout * vox, normed, extra_saved, **kw))
        return out

    def weightless(saved: int, elementwise: int) -> None:
        """An op without weights (pooling, unpooling): memory and memory-bound time only."""
        layers.append(_Layer(0, 0, ones, 0, 0, False, saved, bias=False, elementwise=elementwise))

    feats = net.features_per_stage
    shape = tuple(int(p) for p in patch_size)
    prev = in_channels
    residual = family.encoder == "residual"
    pooled = family.pooling == "max_pool"
    if residual:
        shape = conv(in_channels, feats[0], net.kernel_sizes[0], ones, shape)
        prev = feats[0]
    skip_shapes = []
    for s in range(net.n_stages):
        if pooled and s > 0:  # max pooling: the stage's convs run at the pooled size; output and int64 indices kept
            shape = tuple(n // int(v) for n, v in zip(shape, net.strides[s], strict=True))
            weightless(saved=3 * prev * math.prod(shape), elementwise=prev * math.prod(shape))
        for i in range(net.n_conv_per_stage_encoder[s]):
            stride = net.strides[s] if i == 0 and not pooled else ones
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
    if family.bottleneck == "aspp":
        shape = _aspp_layers(net, conv, shape, dims)
    for s in range(net.n_stages - 1, 0, -1):
        stride = tuple(int(v) for v in net.strides[s])
        in_vox = math.prod(shape)
        skip_elements = feats[s - 1] * math.prod(skip_shapes[s - 1])
        if family.skip == "attention":  # theta (strided, no bias) on the skip, phi on the gate, psi to one map
            coarse = conv(feats[s - 1], max(1, feats[s - 1] // 2), stride, stride, skip_shapes[s - 1],
                          normed=False, pad=False, bias=False)
            conv(feats[s], max(1, feats[s - 1] // 2), ones, ones, coarse, normed=False,
                 elementwise=max(1, feats[s - 1] // 2) * math.prod(coarse))
            conv(max(1, feats[s - 1] // 2), 1, ones, ones, coarse, normed=False,
                 extra_saved=math.prod(skip_shapes[s - 1]) + skip_elements, elementwise=2 * skip_elements)
        if pooled:  # 1x1 conv to the skip's width, then max-unpooling with the encoder's indices
            conv(feats[s], feats[s - 1], ones, ones, shape, normed=False)
            weightless(saved=skip_elements, elementwise=skip_elements)
        else:
            layers.append(_Layer(feats[s], feats[s - 1], stride, in_vox, skip_elements, False))
        shape = skip_shapes[s - 1]
        concat = family.skip != "none"
        for i in range(net.n_conv_per_stage_decoder[s - 1]):
            cin = 2 * feats[s - 1] if i == 0 and concat else feats[s - 1]
            saved = cin * math.prod(shape) if i == 0 and concat else 0
            shape = conv(cin, feats[s - 1], net.kernel_sizes[s - 1], ones, shape, extra_saved=saved)
        if net.deep_supervision or s == 1:
            conv(feats[s - 1], num_classes, ones, ones, shape, normed=False)
    return layers


def _aspp_layers(net: NetworkPlan, conv: Callable[..., tuple[int, ...]], shape: tuple[int, ...],
                 dims: int) -> tuple[int, ...]:
    """The ASPP's layers: a 1x1 branch, one dilated branch per rate, the image-pooling branch, the projection."""
    c, ones, vox = net.features_per_stage[-1], (1,) * dims, math.prod(shape)
    rates = aspp_dilations(net)
    conv(c, c, ones, ones, shape)
    for _ in rates:  # "same" padding of dilation * (k // 2): the output keeps the bottleneck's shape
        conv(c, c, net.kernel_sizes[-1], ones, shape)
    conv(c, c, ones, ones, ones, normed=False, elementwise=c * vox)  # on the pooled 1-voxel map, broadcast back
    branches = len(rates) + 2
    return conv(branches * c, c, ones, ones, shape, extra_saved=branches * c * vox)


def estimate_parameters(net: NetworkPlan, *, in_channels: int, num_classes: int, dims: int) -> int:
    """Trainable parameters of the network (weights, biases, affine norm parameters), without building it.

    Example:
        >>> net = NetworkPlan("plain_unet", (4, 8), ((3, 3), (3, 3)), ((1, 1), (2, 2)), (1, 1), (1,))
        >>> estimate_parameters(net, in_channels=1, num_classes=2, dims=2)
        802
    """
    patch = total_stride(net)  # the smallest valid input (the count does not depend on it)
    layers = _layers(net, in_channels=in_channels, num_classes=num_classes, patch_size=patch, dims=dims)
    return sum(layer.parameters for layer in layers)


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
        total += elementwise_flops * (layer.out_elements * int(layer.normed) + layer.elementwise)
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
