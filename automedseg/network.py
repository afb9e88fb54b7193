"""Dynamic U-Net built from a :class:`~automedseg.plans.NetworkPlan`, plus an analytic cost model.

Two architectures share one decoder:

* ``plain_unet``: every encoder stage is a stack of conv -> InstanceNorm -> LeakyReLU blocks; the
  first conv of a stage carries the stage's stride (strided-convolution downsampling).
* ``residual_unet``: a stem conv, then stages of basic residual blocks (two convs; the skip gets a
  1x1, possibly strided, projection when the shape or width changes).

The decoder upsamples with a transposed convolution (kernel = stride = the encoder stage's stride)
to the skip's width, concatenates the skip, applies ``n_conv_per_stage_decoder`` conv blocks and
has a 1x1 segmentation head at every level. With deep supervision the forward pass returns one
logit map per decoder level, highest resolution first; without, only the full-resolution logits.

Indexing convention: ``n_conv_per_stage_decoder[i]`` is the decoder stage whose output has the
resolution of encoder stage ``i`` (shallowest first, like ``features_per_stage``).

The strides, output shapes and the analytic cost model (:func:`estimate_training_flops`,
:func:`estimate_activation_elements`) are pure Python, in :mod:`automedseg.network_cost`, which walks the same
topology as the modules here (``test_flop_estimate_matches_the_model`` checks it); their names are importable
from here too.

Example:
    >>> model = build_network(plan.network, in_channels=1, num_classes=3, dims=3)  # doctest: +SKIP
    >>> model.deep_supervision = False  # inference: a single tensor  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from automedseg.network_cost import (  # noqa: F401  (re-exported: callers know them from here)
    BACKWARD_FORWARD_RATIO,
    ELEMENTWISE_FLOPS_PER_ELEMENT,
    check_dims,
    cumulative_strides,
    deep_supervision_scales,
    estimate_activation_elements,
    estimate_forward_flops,
    estimate_training_flops,
    output_shapes,
    output_strides,
    total_stride,
)
from automedseg.plans import NetworkPlan

NORM_EPS = 1e-5
NEGATIVE_SLOPE = 1e-2


def _ops(dims: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    """Return (Conv, InstanceNorm, ConvTranspose) classes for ``dims`` spatial dimensions."""
    if dims == 2:
        return nn.Conv2d, nn.InstanceNorm2d, nn.ConvTranspose2d
    if dims == 3:
        return nn.Conv3d, nn.InstanceNorm3d, nn.ConvTranspose3d
    raise ValueError(f"dims must be 2 or 3, got {dims}")


def _padding(kernel: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(k) // 2 for k in kernel)


class ConvNormAct(nn.Sequential):
    """conv -> InstanceNorm(affine) -> LeakyReLU, with "same" padding (``kernel // 2``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Sequence[int],
        stride: Sequence[int],
        *,
        dims: int,
        activation: bool = True,
    ) -> None:
        conv_cls, norm_cls, _ = _ops(dims)
        layers: list[nn.Module] = [
            conv_cls(
                in_channels,
                out_channels,
                kernel_size=tuple(kernel),
                stride=tuple(stride),
                padding=_padding(kernel),
                bias=True,
            ),
            norm_cls(out_channels, eps=NORM_EPS, affine=True),
        ]
        if activation:
            layers.append(nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True))
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """Basic residual block: two conv-norm layers, identity or 1x1 projection skip, LeakyReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Sequence[int],
        stride: Sequence[int],
        *,
        dims: int,
    ) -> None:
        super().__init__()
        ones = (1,) * dims
        self.conv1 = ConvNormAct(in_channels, out_channels, kernel, stride, dims=dims)
        self.conv2 = ConvNormAct(out_channels, out_channels, kernel, ones, dims=dims, activation=False)
        if in_channels != out_channels or any(int(s) != 1 for s in stride):
            self.skip: nn.Module = ConvNormAct(
                in_channels, out_channels, ones, stride, dims=dims, activation=False
            )
        else:
            self.skip = nn.Identity()
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.skip(x)
        return self.act(self.conv2(self.conv1(x)) + residual)


def _plain_stage(
    in_channels: int, out_channels: int, n: int, kernel: Sequence[int], stride: Sequence[int], dims: int
) -> nn.Sequential:
    ones = (1,) * dims
    blocks = [
        ConvNormAct(
            in_channels if i == 0 else out_channels,
            out_channels,
            kernel,
            stride if i == 0 else ones,
            dims=dims,
        )
        for i in range(n)
    ]
    return nn.Sequential(*blocks)


def _residual_stage(
    in_channels: int, out_channels: int, n: int, kernel: Sequence[int], stride: Sequence[int], dims: int
) -> nn.Sequential:
    ones = (1,) * dims
    blocks = [
        ResidualBlock(
            in_channels if i == 0 else out_channels,
            out_channels,
            kernel,
            stride if i == 0 else ones,
            dims=dims,
        )
        for i in range(n)
    ]
    return nn.Sequential(*blocks)


class Encoder(nn.Module):
    """Encoder: optional stem, then one stage per resolution; returns every stage's output."""

    def __init__(self, stem: nn.Module | None, stages: Sequence[nn.Module]) -> None:
        super().__init__()
        self.stem = stem if stem is not None else nn.Identity()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class Decoder(nn.Module):
    """U-Net decoder with transposed-conv upsampling, skip concatenation and a head per level."""

    def __init__(self, net: NetworkPlan, *, num_classes: int, dims: int) -> None:
        super().__init__()
        conv_cls, _, transp_cls = _ops(dims)
        ones = (1,) * dims
        feats = net.features_per_stage
        ups, stages, heads = [], [], []
        # Built deepest level first; index j corresponds to encoder resolution n_stages - 2 - j.
        for s in range(net.n_stages - 1, 0, -1):
            stride = tuple(int(v) for v in net.strides[s])
            ups.append(transp_cls(feats[s], feats[s - 1], kernel_size=stride, stride=stride, bias=True))
            n_conv = net.n_conv_per_stage_decoder[s - 1]
            convs = [
                ConvNormAct(
                    2 * feats[s - 1] if i == 0 else feats[s - 1],
                    feats[s - 1],
                    net.kernel_sizes[s - 1],
                    ones,
                    dims=dims,
                )
                for i in range(n_conv)
            ]
            stages.append(nn.Sequential(*convs))
            heads.append(conv_cls(feats[s - 1], num_classes, kernel_size=1, bias=True))
        self.ups = nn.ModuleList(ups)
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)

    def forward(self, skips: list[torch.Tensor], deep_supervision: bool) -> list[torch.Tensor]:
        """Return logits deepest level first (all levels with deep supervision, else only the last)."""
        x = skips[-1]
        outputs = []
        n = len(self.stages)
        for j in range(n):
            x = self.ups[j](x)
            x = torch.cat((x, skips[-(j + 2)]), dim=1)
            x = self.stages[j](x)
            if deep_supervision or j == n - 1:
                outputs.append(self.heads[j](x))
        return outputs


class DynamicUNet(nn.Module):
    """U-Net assembled from a plan; subclasses differ only in the encoder.

    Attributes:
        deep_supervision: Read by :meth:`forward`. True: return a list of logits, one per decoder
            level, highest resolution first. False: return only the full-resolution logits tensor.
        total_stride: Product of all strides per axis; input spatial sizes must be divisible by it.
    """

    def __init__(self, net: NetworkPlan, encoder: Encoder, *, num_classes: int, dims: int) -> None:
        super().__init__()
        if net.n_stages < 2:
            raise ValueError("a U-Net needs at least two stages")
        self.dims = dims
        self.num_classes = num_classes
        self.deep_supervision = bool(net.deep_supervision)
        self.total_stride = total_stride(net)
        self.encoder = encoder
        self.decoder = Decoder(net, num_classes=num_classes, dims=dims)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        spatial = tuple(x.shape[2:])
        if len(spatial) != self.dims:
            raise ValueError(f"expected a {self.dims}D input (N, C, *spatial), got shape {tuple(x.shape)}")
        if any(n % s for n, s in zip(spatial, self.total_stride, strict=True)):
            raise ValueError(
                f"input spatial shape {spatial} is not divisible by the network stride {self.total_stride}"
            )
        outputs = self.decoder(self.encoder(x), self.deep_supervision)
        if self.deep_supervision:
            return outputs[::-1]
        return outputs[-1]


class PlainUNet(DynamicUNet):
    """U-Net with plain conv stacks in the encoder (nnU-Net's PlainConvUNet, functionally)."""

    def __init__(self, net: NetworkPlan, *, in_channels: int, num_classes: int, dims: int) -> None:
        stages = []
        prev = in_channels
        for s in range(net.n_stages):
            stages.append(
                _plain_stage(
                    prev,
                    net.features_per_stage[s],
                    net.n_conv_per_stage_encoder[s],
                    net.kernel_sizes[s],
                    net.strides[s],
                    dims,
                )
            )
            prev = net.features_per_stage[s]
        super().__init__(net, Encoder(None, stages), num_classes=num_classes, dims=dims)


class ResidualUNet(DynamicUNet):
    """U-Net with a residual encoder (nnU-Net's ResidualEncoderUNet, functionally)."""

    def __init__(self, net: NetworkPlan, *, in_channels: int, num_classes: int, dims: int) -> None:
        ones = (1,) * dims
        stem = ConvNormAct(in_channels, net.features_per_stage[0], net.kernel_sizes[0], ones, dims=dims)
        stages = []
        prev = net.features_per_stage[0]
        for s in range(net.n_stages):
            stages.append(
                _residual_stage(
                    prev,
                    net.features_per_stage[s],
                    net.n_conv_per_stage_encoder[s],
                    net.kernel_sizes[s],
                    net.strides[s],
                    dims,
                )
            )
            prev = net.features_per_stage[s]
        super().__init__(net, Encoder(stem, stages), num_classes=num_classes, dims=dims)


ArchitectureFactory = Callable[..., DynamicUNet]

#: Architecture name (``NetworkPlan.architecture``) -> model class.
ARCHITECTURE_REGISTRY: dict[str, ArchitectureFactory] = {
    "plain_unet": PlainUNet,
    "residual_unet": ResidualUNet,
}


def get_architecture(name: str) -> ArchitectureFactory:
    """Return the model class registered under ``name``; raises ``ValueError`` listing the known ones."""
    try:
        return ARCHITECTURE_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURE_REGISTRY)}") from None


def build_network(net: NetworkPlan, *, in_channels: int, num_classes: int, dims: int) -> DynamicUNet:
    """Build the U-Net described by ``net``.

    Args:
        net: Network plan; ``net.architecture`` is resolved through :data:`ARCHITECTURE_REGISTRY`.
        in_channels: Input image channels.
        num_classes: Output classes, background included.
        dims: 2 or 3 spatial dimensions.

    Returns:
        A freshly initialised model; its ``deep_supervision`` attribute starts at
        ``net.deep_supervision``.
    """
    factory = get_architecture(net.architecture)
    check_dims(net, dims)
    return factory(net, in_channels=in_channels, num_classes=num_classes, dims=dims)


def init_weights(module: nn.Module) -> None:
    """nnU-Net initialisation: kaiming-normal (a=0.01) conv weights, zero conv biases."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=NEGATIVE_SLOPE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
