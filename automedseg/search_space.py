"""The search space of :mod:`automedseg.search`: the parameters around a rule-based configuration, how a
sampled variant is made from them (:func:`apply_params`) and how its training is fitted to a time budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from automedseg.plans import AugmentationPlan, ConfigurationPlan, NetworkPlan, Plans

SEARCHED_SUFFIX = "_searched"
BASE_LR = {"sgd": 1e-2, "adamw": 1e-3}
BASE_WEIGHT_DECAY = {"sgd": 3e-5, "adamw": 1e-2}
LR_FACTOR_RANGE = (0.2, 5.0)
AUG_STRENGTH_RANGE = (0.0, 2.0)
DICE_FRACTION_RANGE = (0.1, 0.9)


class InfeasibleParams(ValueError):
    """A sampled variant cannot be trained on the planned device (memory); the trial is pruned at once."""



@dataclass(frozen=True)
class SearchParam:
    """One searched parameter.

    Attributes:
        name: Optuna parameter name.
        kind: ``float``, ``log_float`` or ``categorical``.
        default: The rule-based plan's value (trial 0).
        low: Lower bound (floats).
        high: Upper bound (floats).
        choices: Options (categorical).
        help: What the parameter changes.
    """

    name: str
    kind: str
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    help: str = ""

    def suggest(self, trial: Any) -> Any:
        """Draw the value for an Optuna trial."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.kind == "log_float")

    def describe(self) -> str:
        """The range as text, for the report."""
        if self.kind == "categorical":
            return ", ".join(str(c) for c in self.choices)
        return f"[{self.low:g}, {self.high:g}]" + (" (log)" if self.kind == "log_float" else "")


def _spatial(config: ConfigurationPlan) -> tuple[list[float], list[int]]:
    """Spacing and median shape on the network's axes (the last two for 2D)."""
    sp = [float(v) for v in config.spacing_mm]
    med = [int(v) for v in config.median_shape]
    return (sp, med) if config.dims == 3 else (sp[1:], med[1:])


def search_space(config: ConfigurationPlan) -> tuple[SearchParam, ...]:
    """The search space around a rule-based configuration; parameters with one option are left out.

    Example:
        >>> [p.name for p in search_space(plans.configuration("3d_fullres"))]  # doctest: +SKIP
        ['optimizer', 'lr_factor', 'batch_size', 'base_features', 'depth_delta', 'architecture', ...]
    """
    tr, net = config.training, config.network
    b0, w0, n0 = config.batch_size, net.features_per_stage[0], net.n_stages
    batches = sorted({max(min(b0, 2), b) for b in (b0 // 2, b0, 2 * b0, 4 * b0)})
    widths = sorted({max(8, w0 // 2), w0, min(64, 2 * w0)} | {w0})
    depths = tuple(d for d in (0, -1, -2) if n0 + d >= min(3, n0))
    total = tr.dice_weight + tr.ce_weight
    f0 = tr.dice_weight / total if total > 0 else 0.5
    params = (
        SearchParam("optimizer", "categorical", tr.optimizer, choices=("sgd", "adamw"),
                    help="SGD with Nesterov momentum or AdamW"),
        SearchParam("lr_factor", "log_float", 1.0, *LR_FACTOR_RANGE,
                    help="learning rate as a multiple of the optimizer's base rate"),
        SearchParam("batch_size", "categorical", b0, choices=tuple(batches),
                    help="batch size; the patch volume scales inversely (constant memory)"),
        SearchParam("base_features", "categorical", w0, choices=tuple(widths), help="first-stage width"),
        SearchParam("depth_delta", "categorical", 0, choices=tuple(sorted(depths)),
                    help="resolution stages removed from the bottom of the U-Net"),
        SearchParam("architecture", "categorical", net.architecture, choices=("plain_unet", "residual_unet"),
                    help="plain or residual encoder"),
        SearchParam("aug_strength", "float", 1.0, *AUG_STRENGTH_RANGE,
                    help="multiplier of every augmentation probability"),
        SearchParam("oversample_foreground", "float", float(tr.oversample_foreground),
                    min(0.0, tr.oversample_foreground), max(1.0, tr.oversample_foreground),
                    help="fraction of each batch forced to contain foreground"),
        SearchParam("dice_fraction", "float", float(f0), min(DICE_FRACTION_RANGE[0], f0),
                    max(DICE_FRACTION_RANGE[1], f0), help="share of soft Dice in Dice + CE"),
    )
    return tuple(p for p in params if p.kind != "categorical" or len(p.choices) > 1)


def default_params(config: ConfigurationPlan) -> dict[str, Any]:
    """The rule-based configuration as a point of :func:`search_space` (it maps back to the same plan)."""
    return {p.name: p.default for p in search_space(config)}


def _memory_limit_bytes(plans: Plans, base: ConfigurationPlan) -> float:
    from automedseg.planning import activation_bytes

    dev = plans.device
    limit = dev.memory_gib * 2**30 * (0.85 if dev.kind != "cpu" else 0.5)
    # A rule plan that is already over the limit (smallest-network fallback) may keep its size.
    return max(limit, 1.25 * activation_bytes(base.network, base.patch_size, batch=base.batch_size))


def apply_params(plans: Plans, base: ConfigurationPlan, params: Mapping[str, Any], *, name: str | None = None
                 ) -> ConfigurationPlan:
    """The configuration ``base`` with search parameters applied (missing ones keep the rule value).

    The schedule (epochs, iterations) is left as it is; fit it with :func:`fit_schedule`.

    Raises:
        InfeasibleParams: The variant's activations exceed the planned device's memory.
    """
    from automedseg.planning import (
        BASE_FEATURES,
        MAX_FEATURES,
        MIN_FEATURE_MAP,
        activation_bytes,
        network_for,
    )

    p = {**default_params(base), **dict(params)}
    tr, net0, dims = base.training, base.network, base.dims
    batch = int(p.get("batch_size", base.batch_size))
    width = int(p.get("base_features", net0.features_per_stage[0]))
    arch = str(p.get("architecture", net0.architecture))
    sp, med = _spatial(base)
    if batch != base.batch_size:
        f = (base.batch_size / batch) ** (1.0 / dims)
        patch = [int(np.clip(round(v * f), min(v, 2 * MIN_FEATURE_MAP), max(v, m)))
                 for v, m in zip(base.patch_size, med)]
        net, patch = network_for(sp, patch, dims=dims, base=width, architecture=arch)
    else:  # same patch: keep the rule topology, change only width and blocks
        patch = list(base.patch_size)
        n = net0.n_stages
        feats = tuple(min(width * 2**s, MAX_FEATURES[dims] * width // BASE_FEATURES) for s in range(n))
        enc = net0.n_conv_per_stage_encoder
        if arch != net0.architecture:
            enc = tuple(2 for _ in range(n)) if arch == "plain_unet" else tuple(min(1 + s, 6) for s in range(n))
        net = dataclasses.replace(net0, architecture=arch, features_per_stage=feats, n_conv_per_stage_encoder=enc)
    drop = -int(p.get("depth_delta", 0))
    keep = max(min(3, net.n_stages), net.n_stages - drop)
    if keep < net.n_stages:
        net = NetworkPlan(
            architecture=net.architecture, features_per_stage=net.features_per_stage[:keep],
            kernel_sizes=net.kernel_sizes[:keep], strides=net.strides[:keep],
            n_conv_per_stage_encoder=net.n_conv_per_stage_encoder[:keep],
            n_conv_per_stage_decoder=net.n_conv_per_stage_decoder[:keep - 1], deep_supervision=net.deep_supervision,
        )
    need = activation_bytes(net, patch, batch=batch)
    limit = _memory_limit_bytes(plans, base)
    if need > limit:
        raise InfeasibleParams(f"batch {batch}, patch {patch}, width {width}: ~{need / 2**30:.1f} GiB of "
                               f"activations exceed the {limit / 2**30:.1f} GiB allowed on {plans.device.name}")
    strength = float(p.get("aug_strength", 1.0))
    aug_changes: dict[str, Any] = {
        f.name: min(1.0, getattr(base.augmentation, f.name) * strength)
        for f in dataclasses.fields(AugmentationPlan) if f.name.endswith("_p")
    }
    if list(patch) != list(base.patch_size):
        aug_changes["do_dummy_2d"] = bool(dims == 3 and max(patch) / patch[0] > 3.0)
    aug = dataclasses.replace(base.augmentation, **aug_changes)
    opt = str(p.get("optimizer", tr.optimizer))
    base_lr = tr.initial_lr if opt == tr.optimizer else BASE_LR[opt]
    wd = tr.weight_decay if opt == tr.optimizer else BASE_WEIGHT_DECAY[opt]
    total = tr.dice_weight + tr.ce_weight
    frac = float(p.get("dice_fraction", tr.dice_weight / total if total > 0 else 0.5))
    training = dataclasses.replace(
        tr, optimizer=opt, initial_lr=float(f"{base_lr * float(p.get('lr_factor', 1.0)):.4g}"), weight_decay=wd,
        oversample_foreground=float(p.get("oversample_foreground", tr.oversample_foreground)),
        dice_weight=float(f"{frac * total:.4g}"), ce_weight=float(f"{(1 - frac) * total:.4g}"),
    )
    return dataclasses.replace(base, name=name or base.name, patch_size=tuple(int(v) for v in patch),
                               batch_size=batch, network=net, augmentation=aug, training=training)


def fit_schedule(plans: Plans, config: ConfigurationPlan, budget_s: float | None, *, trial_epochs: int | None = None
                 ) -> ConfigurationPlan:
    """Fit epochs and iterations of ``config`` into ``budget_s`` of training with the planner's cost model.

    Args:
        plans: The plan (device profile, channels, classes).
        config: A configuration, e.g. from :func:`apply_params`.
        budget_s: Training wall time; ``None`` keeps the configuration's schedule.
        trial_epochs: For search trials: exactly this many epochs (the pruner's steps), iterations per
            epoch filling the budget, and the trainer keeps them (``fixed_epochs``). ``None``: a full fold.

    The schedule is the planner's (:func:`automedseg.planning.schedule_for_budget`).
    """
    from automedseg.planning import schedule_for_budget, step_seconds

    if budget_s is None:
        return config
    step_s = step_seconds(config.network, config.patch_size, batch=config.batch_size, dims=config.dims,
                          in_channels=len(plans.channel_names), num_classes=plans.num_classes, device=plans.device,
                          workers=config.training.num_workers, augment_on_device=config.training.augment_on_device,
                          augmentation=config.augmentation)
    if trial_epochs is not None:
        epochs, ipe, val = schedule_for_budget(step_s, budget_s, fixed_epochs=trial_epochs,
                                               max_val_iterations=config.training.val_iterations)
    else:
        epochs, ipe, val = schedule_for_budget(step_s, budget_s)
    training = dataclasses.replace(
        config.training, epochs=epochs, iterations_per_epoch=ipe, val_iterations=val,
        fixed_epochs=trial_epochs is not None, time_budget_s=float(budget_s),
        estimated_seconds_per_iteration=round(step_s, 4), estimated_fold_seconds=round(step_s * epochs * ipe, 1),
    )
    return dataclasses.replace(config, training=training)


def summary_line(config: ConfigurationPlan, device_name: str) -> str:
    tr, net = config.training, config.network
    return (f"searched variant: {net.architecture}, width {net.features_per_stage[0]}, {net.n_stages} stages, "
            f"batch {config.batch_size}, patch {list(config.patch_size)}, {tr.optimizer} lr {tr.initial_lr:g}: "
            f"~{(tr.estimated_seconds_per_iteration or 0):.2f} s/iteration, {tr.epochs} x {tr.iterations_per_epoch} "
            f"iterations, ~{(tr.estimated_fold_seconds or 0) / 60:.0f} min per fold on {device_name}")
