"""Instance normalisation that keeps channels-last tensors channels-last, forward and backward, for CPU training.

PyTorch's ``InstanceNorm`` views its input as one batch-norm over ``N*C`` channels, which needs a contiguous
(channels-first) tensor: on a channels-last network every norm converts its input to channels-first and its
output back, in both passes (15 % of a 3D training step's time on 2 cores, ``benchmarks/results/profile_step.md``).
GroupNorm keeps the layout but its CPU backward is slower than the copies it saves. :func:`instance_norm`
computes the same function with reductions over the spatial axes and one fused multiply-add, all of which keep
the input's memory format, and a hand-written backward of the same shape (two reductions, two fused passes).

Statistics are computed in float32 whatever the input's precision (bf16 under autocast), as PyTorch's norms do.

Example:
    >>> import torch
    >>> x = torch.randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d)
    >>> w, b = torch.rand(3) + 0.5, torch.randn(3)
    >>> ref = torch.nn.functional.instance_norm(x, weight=w, bias=b, eps=1e-5)
    >>> y = instance_norm(x, w, b, eps=1e-5)
    >>> bool(torch.allclose(y, ref, atol=1e-5)), y.is_contiguous(memory_format=torch.channels_last_3d)
    (True, True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32 (bf16/fp16 up-cast; float32/float64 as they are)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, channel) mean and 1/std over the spatial axes, at least float32, shaped ``(N, C, 1, ...)``."""
    var, mean = torch.var_mean(_wide(x), dim=tuple(range(2, x.dim())), keepdim=True, correction=0)
    return mean, torch.rsqrt(var + eps)


class _InstanceNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,  # type: ignore[override]
                eps: float) -> torch.Tensor:
        mean, rstd = _stats(x, eps)
        scale = rstd * _wide(weight).view(1, -1, *([1] * (x.dim() - 2)))
        shift = _wide(bias).view_as(scale[:1]) - mean * scale
        ctx.save_for_backward(x, weight, mean, rstd)
        # y = x * scale + shift, in the input's dtype and memory format
        return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean, rstd = ctx.saved_tensors
        dims = tuple(range(2, x.dim()))
        count = x[0, 0].numel()
        w = _wide(weight).view_as(mean[:1])
        g = _wide(grad)
        sum_g = g.sum(dim=dims, keepdim=True)  # (N, C, 1, ...)
        sum_gx = (g * _wide(x)).sum(dim=dims, keepdim=True)
        sum_gxhat = (sum_gx - mean * sum_g) * rstd  # sum of grad * xhat
        grad_weight = sum_gxhat.sum(0).flatten() if ctx.needs_input_grad[1] else None
        grad_bias = sum_g.sum(0).flatten() if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            # dx = w*rstd * (g - mean(g) - xhat * mean(g*xhat)) = a*g + b*x + c per (sample, channel)
            a = w * rstd
            b = -a * rstd * sum_gxhat / count
            c = -a * sum_g / count - b * mean
            grad_x = torch.addcmul(c.to(x.dtype), grad.to(x.dtype), a.to(x.dtype)).addcmul_(x, b.to(x.dtype))
        return grad_x, grad_weight.to(weight.dtype) if grad_weight is not None else None, \
            grad_bias.to(weight.dtype) if grad_bias is not None else None, None


def instance_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float) -> torch.Tensor:
    """Affine instance norm of ``x`` (``N, C, *spatial``) that keeps its memory format."""
    return _InstanceNorm.apply(x, weight, bias, eps)


class _KeepLayout:
    """``forward`` of an affine InstanceNorm by :func:`instance_norm` (mixed into PyTorch's own classes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x``; PyTorch's own norm for what :func:`instance_norm` does not cover."""
        if not self.affine or self.track_running_stats or x.dim() != self._get_no_batch_dim() + 1:
            return super().forward(x)  # type: ignore[misc]
        with torch.autocast(x.device.type, enabled=False):
            return instance_norm(x, self.weight, self.bias, eps=self.eps)


class LayoutKeepingInstanceNorm2d(_KeepLayout, nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` (same parameters and state dict) that keeps channels-last tensors channels-last."""


class LayoutKeepingInstanceNorm3d(_KeepLayout, nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` (same parameters and state dict) that keeps channels-last tensors channels-last."""


def keep_layout_norms(model: nn.Module) -> nn.Module:
    """Replace every affine 2D/3D InstanceNorm (no running statistics) by its layout-keeping twin, in place.

    Parameters are shared, not copied, so an optimizer built before or after sees the same tensors and the
    state dict keeps its keys.

    Example:
        >>> net = nn.Sequential(nn.Conv3d(1, 4, 3), nn.InstanceNorm3d(4, affine=True))
        >>> type(keep_layout_norms(net)[1]).__name__, list(net.state_dict())[2:]
        ('LayoutKeepingInstanceNorm3d', ['1.weight', '1.bias'])
    """
    for name, child in list(model.named_children()):
        twin = {nn.InstanceNorm2d: LayoutKeepingInstanceNorm2d, nn.InstanceNorm3d: LayoutKeepingInstanceNorm3d}.get(
            type(child))
        if twin is not None and child.affine and not child.track_running_stats:
            new = twin(child.num_features, eps=child.eps, affine=True)
            new.weight, new.bias = child.weight, child.bias
            new.train(child.training)
            setattr(model, name, new)
        else:
            keep_layout_norms(child)
    return model
