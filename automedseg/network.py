"""Dynamic U-Net built from a :class:`~automedseg.plans.NetworkPlan`: the assembler of the architecture families.

Each family (``NetworkPlan.architecture``) is a composition (:data:`ARCHITECTURE_REGISTRY`, the
:class:`~automedseg.network_cost.Family` recipes) of one encoder, one kind of skip, one bottleneck and one kind of
up-sampling, all from :mod:`automedseg.network_blocks`; one module class, :class:`DynamicUNet`, assembles them:

* ``plain_unet``: every encoder stage is a stack of conv -> norm -> LeakyReLU blocks; the first conv of a stage
  carries the stage's stride (strided-convolution downsampling).
* ``residual_unet``: a stem conv, then stages of basic residual blocks (two convs; the skip gets a 1x1, possibly
  strided, projection when the shape or width changes).
* ``attention_unet``: the plain U-Net whose skips pass an additive attention gate (Oktay et al.), gated by the
  decoder's feature map one level coarser, before they are concatenated.
* ``aspp_unet``: the plain U-Net with atrous spatial pyramid pooling (DeepLab v3) after the bottleneck stage.
* ``segnet_unet``: SegNet's decoder on the plain encoder: max pooling (kernel = stride) instead of strided
  convolutions; the decoder up-samples by a 1x1 conv and max-unpooling with the pooling's indices. Skip
  features are NOT concatenated (SegNet passes only the indices): each decoder stage sees the unpooled map alone,
  its first conv taking ``features_per_stage[s]`` channels instead of twice that. The deep-supervision heads stay.

The decoder of the others up-samples with a transposed convolution (kernel = stride = the encoder stage's
stride) to the skip's width, concatenates the (gated) skip, applies ``n_conv_per_stage_decoder`` conv blocks
and has a 1x1 segmentation head at every level. With deep supervision the forward pass returns one logit map
per decoder level, highest resolution first; without, only the full-resolution logits. The norm (``instance``,
``batch``, ``group``) and the dropout after each block's activation are the plan's ``norm`` and ``dropout``.

Indexing convention: ``n_conv_per_stage_decoder[i]`` is the decoder stage whose output has the
resolution of encoder stage ``i`` (shallowest first, like ``features_per_stage``).

The strides, output shapes and the analytic cost model (:func:`estimate_training_flops`,
:func:`estimate_activation_elements`, :func:`estimate_parameters`) are pure Python, in
:mod:`automedseg.network_cost`, which walks the same topology as the modules here
(``test_flop_estimate_matches_the_model`` checks it); their names are importable from here too.

Example:
    >>> from automedseg.plans import NetworkPlan
    >>> net = NetworkPlan("attention_unet", (4, 8), ((3, 3), (3, 3)), ((1, 1), (2, 2)), (1, 1), (1,))
    >>> model = build_network(net, in_channels=1, num_classes=3, dims=2)
    >>> [tuple(o.shape) for o in model(torch.zeros(2, 1, 12, 20))]
    [(2, 3, 12, 20)]
    >>> count_parameters(model) == estimate_parameters(net, in_channels=1, num_classes=3, dims=2)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from automedseg.network_blocks import (  # noqa: F401  (NORM_EPS, NEGATIVE_SLOPE re-exported)
    ASPP,
    NEGATIVE_SLOPE,
    NORM_EPS,
    AttentionGate,
    BlockSettings,
    ConvNormAct,
    MaxPoolIndices,
    ResidualBlock,
    UnpoolUp,
    conv_ops,
)
from automedseg.network_cost import (  # noqa: F401  (re-exported: callers know them from here)
    ARCHITECTURE_FAMILIES,
    BACKWARD_FORWARD_RATIO,
    ELEMENTWISE_FLOPS_PER_ELEMENT,
    Family,
    aspp_dilations,
    check_dims,
    cumulative_strides,
    deep_supervision_scales,
    estimate_activation_elements,
    estimate_forward_flops,
    estimate_parameters,
    estimate_training_flops,
    output_shapes,
    output_strides,
    total_stride,
)
from automedseg.plans import NetworkPlan


def _encoder(net: NetworkPlan, family: Family, *, in_channels: int, settings: BlockSettings) -> Encoder:
    """The encoder of ``family``: its stages, the stem (residual), the pools (SegNet) and the ASPP."""
    dims, ones = settings.dims, (1,) * settings.dims
    residual = family.encoder == "residual"
    pooled = family.pooling == "max_pool"
    stem = None
    prev = in_channels
    if residual:
        stem = ConvNormAct(in_channels, net.features_per_stage[0], net.kernel_sizes[0], ones, settings=settings)
        prev = net.features_per_stage[0]
    stages = []
    for s in range(net.n_stages):
        out, stride = net.features_per_stage[s], ones if pooled else net.strides[s]
        blocks = [
            (ResidualBlock if residual else ConvNormAct)(
                prev if i == 0 else out, out, net.kernel_sizes[s], stride if i == 0 else ones, settings=settings
            )
            for i in range(net.n_conv_per_stage_encoder[s])
        ]
        stages.append(nn.Sequential(*blocks))
        prev = out
    pools = [MaxPoolIndices(net.strides[s], dims=dims) for s in range(1, net.n_stages)] if pooled else None
    bottleneck = None
    if family.bottleneck == "aspp":
        bottleneck = ASPP(net.features_per_stage[-1], net.kernel_sizes[-1], aspp_dilations(net), settings=settings)
    return Encoder(stem, stages, pools=pools, bottleneck=bottleneck)


class Encoder(nn.Module):
    """Encoder: optional stem, then one stage per resolution; returns every stage's output.

    With ``pools`` (SegNet) the ``s``-th stage is preceded by ``pools[s - 1]``, whose indices are returned too;
    with a ``bottleneck`` (ASPP) the last stage's output passes it.
    """

    def __init__(self, stem: nn.Module | None, stages: Sequence[nn.Module], *,
                 pools: Sequence[nn.Module] | None = None, bottleneck: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = stem if stem is not None else nn.Identity()
        self.stages = nn.ModuleList(stages)
        self.pools = nn.ModuleList(pools) if pools is not None else None
        self.bottleneck = bottleneck

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Return the stages' outputs (shallowest first) and the pooling indices (empty without pools)."""
        x = self.stem(x)
        skips, indices = [], []
        for s, stage in enumerate(self.stages):
            if self.pools is not None and s > 0:
                x, idx = self.pools[s - 1](x)
                indices.append(idx)
            x = stage(x)
            skips.append(x)
        if self.bottleneck is not None:
            skips[-1] = self.bottleneck(skips[-1])
        return skips, indices


class Decoder(nn.Module):
    """U-Net decoder: up-sampling, skip merging (concatenated, gated or none), conv blocks, a head per level."""

    def __init__(self, net: NetworkPlan, family: Family, *, num_classes: int, settings: BlockSettings) -> None:
        super().__init__()
        dims, ones = settings.dims, (1,) * settings.dims
        conv_cls, transp_cls = conv_ops(dims)
        feats = net.features_per_stage
        self.concat = family.skip != "none"
        ups, gates, stages, heads = [], [], [], []
        # Built deepest level first; index j corresponds to encoder resolution n_stages - 2 - j.
        for s in range(net.n_stages - 1, 0, -1):
            stride = tuple(int(v) for v in net.strides[s])
            if family.pooling == "max_pool":
                ups.append(UnpoolUp(feats[s], feats[s - 1], stride, dims=dims))
            else:
                ups.append(transp_cls(feats[s], feats[s - 1], kernel_size=stride, stride=stride, bias=True))
            if family.skip == "attention":
                gates.append(AttentionGate(feats[s - 1], feats[s], stride, dims=dims))
            first = 2 * feats[s - 1] if self.concat else feats[s - 1]
            convs = [
                ConvNormAct(first if i == 0 else feats[s - 1], feats[s - 1], net.kernel_sizes[s - 1], ones,
                            settings=settings)
                for i in range(net.n_conv_per_stage_decoder[s - 1])
            ]
            stages.append(nn.Sequential(*convs))
            heads.append(conv_cls(feats[s - 1], num_classes, kernel_size=1, bias=True))
        self.ups = nn.ModuleList(ups)
        self.gates = nn.ModuleList(gates) if gates else None
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)

    def forward(self, skips: list[torch.Tensor], deep_supervision: bool,
                indices: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
        """Return logits deepest level first (all levels with deep supervision, else only the last)."""
        x = skips[-1]
        outputs = []
        n = len(self.stages)
        for j in range(n):
            skip = skips[-(j + 2)]
            up = self.ups[j](x, indices[-(j + 1)]) if indices else self.ups[j](x)
            if self.gates is not None:
                skip = self.gates[j](skip, x)
            x = torch.cat((up, skip), dim=1) if self.concat else up
            x = self.stages[j](x)
            if deep_supervision or j == n - 1:
                outputs.append(self.heads[j](x))
        return outputs


class DynamicUNet(nn.Module):
    """U-Net assembled from a plan: the encoder, skips, bottleneck and up-sampling of its family.

    Attributes:
        family: The composition (:data:`ARCHITECTURE_REGISTRY` entry of ``net.architecture``).
        deep_supervision: Read by :meth:`forward`. True: return a list of logits, one per decoder
            level, highest resolution first. False: return only the full-resolution logits tensor.
        total_stride: Product of all strides per axis; input spatial sizes must be divisible by it.
    """

    def __init__(self, net: NetworkPlan, *, in_channels: int, num_classes: int, dims: int) -> None:
        super().__init__()
        if net.n_stages < 2:
            raise ValueError("a U-Net needs at least two stages")
        settings = BlockSettings(dims=dims, norm=net.norm, dropout=net.dropout)
        self.family = get_architecture(net.architecture)
        self.dims = dims
        self.num_classes = num_classes
        self.deep_supervision = bool(net.deep_supervision)
        self.total_stride = total_stride(net)
        self.encoder = _encoder(net, self.family, in_channels=in_channels, settings=settings)
        self.decoder = Decoder(net, self.family, num_classes=num_classes, settings=settings)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        spatial = tuple(x.shape[2:])
        if len(spatial) != self.dims:
            raise ValueError(f"expected a {self.dims}D input (N, C, *spatial), got shape {tuple(x.shape)}")
        if any(n % s for n, s in zip(spatial, self.total_stride, strict=True)):
            raise ValueError(
                f"input spatial shape {spatial} is not divisible by the network stride {self.total_stride}"
            )
        skips, indices = self.encoder(x)
        outputs = self.decoder(skips, self.deep_supervision, indices)
        if self.deep_supervision:
            return outputs[::-1]
        return outputs[-1]


#: Architecture name (``NetworkPlan.architecture``) -> its composition (the cost model's table, shared).
ARCHITECTURE_REGISTRY: dict[str, Family] = ARCHITECTURE_FAMILIES


def get_architecture(name: str) -> Family:
    """Return the composition registered under ``name``; raises ``ValueError`` listing the known ones."""
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
    get_architecture(net.architecture)
    check_dims(net, dims)
    return DynamicUNet(net, in_channels=in_channels, num_classes=num_classes, dims=dims)


def init_weights(module: nn.Module) -> None:
    """nnU-Net initialisation: kaiming-normal (a=0.01) conv weights, zero conv biases."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=NEGATIVE_SLOPE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
