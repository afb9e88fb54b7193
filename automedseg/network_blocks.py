"""The building blocks that :mod:`automedseg.network` composes into a U-Net of any architecture family.

* :class:`ConvNormAct`: conv -> norm -> LeakyReLU (-> dropout); the norm is the plan's ``norm`` (``instance``,
  ``batch`` or ``group``), the dropout its ``dropout``.
* :class:`ResidualBlock`: two conv-norm layers with an identity or 1x1 projection skip (``residual_unet``).
* :class:`AttentionGate`: the additive attention gate of Oktay et al. (2018) on a skip (``attention_unet``).
* :class:`ASPP`: atrous spatial pyramid pooling, DeepLab v3's bottleneck (``aspp_unet``).
* :class:`MaxPoolIndices` and :class:`UnpoolUp`: SegNet's max pooling whose indices drive the decoder's
  max-unpooling (``segnet_unet``).

Every block works in 2D and 3D (``dims``) and keeps its parameters' names whatever the options (dropout and the
activation hold none), so the state dicts of plans that differ only in ``dropout`` are interchangeable.

Example:
    >>> import torch
    >>> block = ConvNormAct(1, 4, (3, 3), (2, 2), settings=BlockSettings(dims=2, norm="group"))
    >>> tuple(block(torch.zeros(1, 1, 8, 8)).shape), type(block[1]).__name__
    ((1, 4, 4, 4), 'GroupNorm')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from automedseg.fused_norm import fusable, instance_norm_act

NORM_EPS = 1e-5
NEGATIVE_SLOPE = 1e-2
#: Most groups of a ``group`` norm: the largest divisor of the width up to this (Wu & He's 32 is too many for
#: nnU-Net's narrow first stages).
MAX_NORM_GROUPS = 8


def conv_ops(dims: int) -> tuple[type[nn.Module], type[nn.Module]]:
    """(Conv, ConvTranspose) classes for ``dims`` spatial dimensions.

    Example:
        >>> conv_ops(2)
        (<class 'torch.nn.modules.conv.Conv2d'>, <class 'torch.nn.modules.conv.ConvTranspose2d'>)
    """
    if dims == 2:
        return nn.Conv2d, nn.ConvTranspose2d
    if dims == 3:
        return nn.Conv3d, nn.ConvTranspose3d
    raise ValueError(f"dims must be 2 or 3, got {dims}")


def norm_groups(channels: int) -> int:
    """Groups of a ``group`` norm over ``channels``: the largest divisor of ``channels`` up to :data:`MAX_NORM_GROUPS`.

    Example:
        >>> norm_groups(32), norm_groups(12), norm_groups(5)
        (8, 6, 5)
    """
    return max(g for g in range(1, MAX_NORM_GROUPS + 1) if channels % g == 0)


@dataclass(frozen=True)
class BlockSettings:
    """What every convolution block of one network shares.

    Attributes:
        dims: 2 or 3 spatial dimensions.
        norm: ``instance`` (affine InstanceNorm, nnU-Net's), ``batch`` (BatchNorm) or ``group`` (GroupNorm with
            :func:`norm_groups` groups).
        dropout: Probability of the element-wise dropout after each block's activation (0: no dropout module).
    """

    dims: int
    norm: str = "instance"
    dropout: float = 0.0

    def make_norm(self, channels: int) -> nn.Module:
        """A norm layer over ``channels`` (affine, eps :data:`NORM_EPS`)."""
        if self.norm == "instance":
            cls = nn.InstanceNorm2d if self.dims == 2 else nn.InstanceNorm3d
            return cls(channels, eps=NORM_EPS, affine=True)
        if self.norm == "batch":
            return (nn.BatchNorm2d if self.dims == 2 else nn.BatchNorm3d)(channels, eps=NORM_EPS, affine=True)
        if self.norm == "group":
            return nn.GroupNorm(norm_groups(channels), channels, eps=NORM_EPS, affine=True)
        raise ValueError(f"norm must be instance, batch or group, got {self.norm!r}")


def _padding(kernel: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(d) * (int(k) // 2) for k, d in zip(kernel, dilation, strict=True))


class ConvNormAct(nn.Sequential):
    """conv -> norm -> LeakyReLU (-> dropout), with "same" padding (``dilation * (kernel // 2)``).

    Module indices: 0 conv, 1 norm, 2 activation, 3 dropout (only when ``activation`` and ``settings.dropout``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Sequence[int],
        stride: Sequence[int],
        *,
        settings: BlockSettings,
        activation: bool = True,
        dilation: Sequence[int] | None = None,
    ) -> None:
        conv_cls, _ = conv_ops(settings.dims)
        dilation = tuple(dilation) if dilation is not None else (1,) * settings.dims
        layers: list[nn.Module] = [
            conv_cls(
                in_channels,
                out_channels,
                kernel_size=tuple(kernel),
                stride=tuple(stride),
                padding=_padding(kernel, dilation),
                dilation=dilation,
                bias=True,
            ),
            settings.make_norm(out_channels),
        ]
        if activation:
            layers.append(nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True))
            if settings.dropout > 0:
                layers.append(nn.Dropout(settings.dropout))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layers in order; an affine InstanceNorm and its activation as one kernel where
        :func:`automedseg.fused_norm.fusable` says the tensor allows (CPU, channels-last), same function."""
        layers = list(self)
        norm, act = layers[1], layers[2] if len(layers) > 2 else None
        y = layers[0](x)
        if isinstance(norm, nn.modules.instancenorm._InstanceNorm) and norm.affine and \
                not norm.track_running_stats and fusable(y):
            y = instance_norm_act(y, norm.weight, norm.bias, eps=norm.eps,
                                  negative_slope=None if act is None else act.negative_slope)
            rest = layers[3:]  # the dropout, if any
        else:
            rest = layers[1:]
        for layer in rest:
            y = layer(y)
        return y


class ResidualBlock(nn.Module):
    """Basic residual block: two conv-norm layers, identity or 1x1 projection skip, LeakyReLU (-> dropout)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Sequence[int],
        stride: Sequence[int],
        *,
        settings: BlockSettings,
    ) -> None:
        super().__init__()
        ones = (1,) * settings.dims
        plain = BlockSettings(settings.dims, settings.norm)  # the dropout follows the block, not its first conv
        self.conv1 = ConvNormAct(in_channels, out_channels, kernel, stride, settings=plain)
        self.conv2 = ConvNormAct(out_channels, out_channels, kernel, ones, settings=plain, activation=False)
        if in_channels != out_channels or any(int(s) != 1 for s in stride):
            self.skip: nn.Module = ConvNormAct(
                in_channels, out_channels, ones, stride, settings=plain, activation=False
            )
        else:
            self.skip = nn.Identity()
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.skip(x)
        return self.dropout(self.act(self.conv2(self.conv1(x)) + residual))


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al., "Attention U-Net", 2018) on one skip connection.

    The gating signal ``g`` is the decoder's feature map one level coarser than the skip ``x``. At ``g``'s
    resolution: ``alpha = sigmoid(psi(relu(theta(x) + phi(g))))``, where ``theta`` is a strided conv without
    bias (kernel = stride = the level's stride) that brings ``x`` to ``g``'s grid, and ``phi``, ``psi`` are 1x1
    convs (``psi`` to one channel). ``alpha`` is resampled (linear interpolation) to ``x``'s size and scales it:
    the gate returns ``x * alpha``, which the decoder concatenates as usual. No norm in the gate (a norm over a
    one-channel map would remove the attention itself).

    Example:
        >>> import torch
        >>> gate = AttentionGate(4, 8, (2, 2), dims=2)
        >>> tuple(gate(torch.ones(1, 4, 8, 8), torch.ones(1, 8, 4, 4)).shape)
        (1, 4, 8, 8)
    """

    def __init__(self, skip_channels: int, gate_channels: int, stride: Sequence[int], *, dims: int) -> None:
        super().__init__()
        conv_cls, _ = conv_ops(dims)
        inter = max(1, skip_channels // 2)
        stride = tuple(int(s) for s in stride)
        self.theta = conv_cls(skip_channels, inter, kernel_size=stride, stride=stride, bias=False)
        self.phi = conv_cls(gate_channels, inter, kernel_size=1, bias=True)
        self.psi = conv_cls(inter, 1, kernel_size=1, bias=True)
        self.mode = "bilinear" if dims == 2 else "trilinear"

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        phi = self.phi(g)
        # theta(x) has g's size already (inputs are divisible by the strides); saying so by resampling it to g's
        # size (a copy) spares torch.export a shape equation it cannot prove, so the gate exports to ONNX.
        theta = F.interpolate(self.theta(x), size=phi.shape[2:], mode="nearest")
        alpha = torch.sigmoid(self.psi(torch.relu(theta + phi)))
        alpha = F.interpolate(alpha, size=x.shape[2:], mode=self.mode, align_corners=False)
        return x * alpha


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al., DeepLab v3) at the U-Net's bottleneck.

    Parallel branches on the bottleneck's ``channels``-wide map: a 1x1 conv, one conv of the bottleneck's kernel
    per dilation (rates per axis, see :func:`automedseg.network_cost.aspp_rates_for`), and image pooling (the
    spatial mean, a 1x1 conv with bias and LeakyReLU, broadcast back: no norm on one voxel). Each branch is
    ``channels`` wide; their concatenation is projected back to ``channels`` by a 1x1 conv-norm-act, so the
    decoder sees the width it would without the ASPP.

    Example:
        >>> import torch
        >>> aspp = ASPP(8, (3, 3), ((1, 1), (2, 2)), settings=BlockSettings(dims=2))
        >>> tuple(aspp(torch.randn(2, 8, 5, 7)).shape)
        (2, 8, 5, 7)
    """

    def __init__(self, channels: int, kernel: Sequence[int], dilations: Sequence[Sequence[int]], *,
                 settings: BlockSettings) -> None:
        super().__init__()
        conv_cls, _ = conv_ops(settings.dims)
        ones = (1,) * settings.dims
        branches = [ConvNormAct(channels, channels, ones, ones, settings=settings)]
        branches += [ConvNormAct(channels, channels, kernel, ones, settings=settings, dilation=d) for d in dilations]
        self.branches = nn.ModuleList(branches)
        self.pool_conv = conv_cls(channels, channels, kernel_size=1, bias=True)
        self.pool_act = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)
        self.project = ConvNormAct((len(branches) + 1) * channels, channels, ones, ones, settings=settings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = self.pool_act(self.pool_conv(x.mean(dim=tuple(range(2, x.dim())), keepdim=True)))
        outs.append(pooled.expand(-1, -1, *x.shape[2:]))
        return self.project(torch.cat(outs, dim=1))


class MaxPoolIndices(nn.Module):
    """Max pooling with kernel = stride that also returns the argmax indices (SegNet's encoder)."""

    def __init__(self, stride: Sequence[int], *, dims: int) -> None:
        super().__init__()
        stride = tuple(int(s) for s in stride)
        cls = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
        self.pool = cls(kernel_size=stride, stride=stride, return_indices=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool(x)


class UnpoolUp(nn.Module):
    """SegNet's up-sampling: a 1x1 conv (with bias) to the finer level's width, then max-unpooling with the
    indices of the encoder's pooling at that level (zeros everywhere but the remembered maxima).

    The output is ``stride`` times the input (the inputs of a U-Net are divisible by its strides, so that is the
    pooled map's size). The unpooling is ``nn.MaxUnpool``'s, written as a scatter of the values to their flat
    indices: torch's own module does not trace for the legacy ONNX exporter.

    Example:
        >>> import torch
        >>> pool, up = MaxPoolIndices((2, 2), dims=2), UnpoolUp(4, 4, (2, 2), dims=2)
        >>> y, idx = pool(torch.randn(1, 4, 6, 10))
        >>> tuple(up(y, idx).shape)
        (1, 4, 6, 10)
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int], *, dims: int) -> None:
        super().__init__()
        conv_cls, _ = conv_ops(dims)
        stride = tuple(int(s) for s in stride)
        self.proj = conv_cls(in_channels, out_channels, kernel_size=1, bias=True)
        self.stride = stride

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        n, c = y.shape[:2]
        size = [v * s for v, s in zip(y.shape[2:], self.stride, strict=True)]  # no int(): traced for ONNX
        flat = y.new_zeros((n, c, math.prod(size)))
        return flat.scatter(2, indices.flatten(2), y.flatten(2)).view(n, c, *size)
