"""The search space of :mod:`automedseg.search`: the parameters around a rule-based configuration, how a
sampled variant is made from them (:func:`apply_params`) and how its training is fitted to a time budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from automedseg.network_cost import aspp_rates_for
from automedseg.plans import (
    ARCHITECTURES,
    AugmentationPlan,
    ChannelNormalization,
    ConfigurationPlan,
    NetworkPlan,
    Plans,
    TrainingPlan,
)

SEARCHED_SUFFIX = "_searched"
BASE_LR = {"sgd": 1e-2, "adamw": 1e-3}
BASE_WEIGHT_DECAY = {"sgd": 3e-5, "adamw": 1e-2}
LR_FACTOR_RANGE = (0.2, 5.0)
AUG_STRENGTH_RANGE = (0.0, 2.0)
DICE_FRACTION_RANGE = (0.1, 0.9)
CONTEXT_FACTORS = (0.5, 1.0, 2.0)  # patch volume x factor, width chosen for the same step time
WIDTH_STEP = 4  # widths of the context trade are multiples of this, at least MIN_WIDTH
MIN_WIDTH = 8
#: Normalisations that can replace a channel's rule scheme: CT and RGB channels may be z-scored per image
#: instead (MR-like channels are z-scored already; a dataset-wide scheme needs statistics the plan lacks).
NORMALIZATION_ALTERNATIVES = {"ct": "zscore", "rgb_to_01": "zscore"}


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


def search_space(config: ConfigurationPlan, *, normalization: bool = True) -> tuple[SearchParam, ...]:
    """The search space around a rule-based configuration; parameters with one option are left out.

    Args:
        config: The rule-based configuration.
        normalization: Include the normalisation scheme where the rule's has an alternative (a variant with
            another scheme needs its own preprocessed cache, so the search needs the dataset folder).

    Mirroring is searched per axis among the rule plan's mirror axes only: an axis the planner left out
    (mirroring it would swap lateralised labels, see :mod:`automedseg.lateral`) is never offered.

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
    _, med = _spatial(config)
    contexts = tuple(c for c in CONTEXT_FACTORS if c <= 1.0 or any(p < m for p, m in zip(config.patch_size, med)))
    norm = rule_normalization(config)
    norms = (norm, "zscore") if normalization and norm != normalization_key(_alternative(config)) else (norm,)
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
        SearchParam("architecture", "categorical", net.architecture, choices=ARCHITECTURES,
                    help="network family: plain or residual encoder, attention-gated skips, ASPP bottleneck, "
                         "SegNet decoder"),
        SearchParam("aug_strength", "float", 1.0, *AUG_STRENGTH_RANGE,
                    help="multiplier of every augmentation probability"),
        SearchParam("oversample_foreground", "float", float(tr.oversample_foreground),
                    min(0.0, tr.oversample_foreground), max(1.0, tr.oversample_foreground),
                    help="fraction of each batch forced to contain foreground"),
        SearchParam("dice_fraction", "float", float(f0), min(DICE_FRACTION_RANGE[0], f0),
                    max(DICE_FRACTION_RANGE[1], f0), help="share of soft Dice in Dice + CE"),
        SearchParam("context", "categorical", 1.0, choices=contexts,
                    help="patch volume x this factor, width chosen for the same step time (context vs capacity)"),
        *(SearchParam(f"mirror_axis_{a}", "categorical", True, choices=(True, False),
                      help=f"mirroring along patch axis {a} (training and test time)")
          for a in config.augmentation.mirror_axes),
        SearchParam("normalization", "categorical", norm, choices=norms,
                    help="intensity normalisation (zscore: per image); another scheme has its own cache"),
    )
    return tuple(p for p in params if p.kind != "categorical" or len(p.choices) > 1)


def default_params(config: ConfigurationPlan) -> dict[str, Any]:
    """The rule-based configuration as a point of :func:`search_space` (it maps back to the same plan)."""
    return {p.name: p.default for p in search_space(config)}


def normalization_key(schemes: tuple[ChannelNormalization, ...]) -> str:
    """The schemes of the channels joined by ``+`` (``ct``, ``zscore+zscore`` ...): a normalisation's name."""
    return "+".join(n.scheme for n in schemes)


def rule_normalization(config: ConfigurationPlan) -> str:
    """The rule plan's normalisation as a search value (:func:`normalization_key`)."""
    return normalization_key(config.normalization)


def _alternative(config: ConfigurationPlan) -> tuple[ChannelNormalization, ...]:
    return tuple(ChannelNormalization(NORMALIZATION_ALTERNATIVES[n.scheme]) if n.scheme in NORMALIZATION_ALTERNATIVES
                 else n for n in config.normalization)


def _normalization_for(base: ConfigurationPlan, value: str) -> tuple[ChannelNormalization, ...]:
    if value == rule_normalization(base):
        return base.normalization
    if value == "zscore":
        return _alternative(base)
    raise ValueError(f"normalization {value!r} is neither the rule's {rule_normalization(base)!r} nor 'zscore'")


def _scale_patch(patch: list[int], med: list[int], factor: float, floor: int) -> list[int]:
    """``patch`` with its volume scaled by ``factor``, each axis kept within [floor, median image]; an axis that
    reaches a bound leaves the rest of the change to the others."""
    lo = [min(v, floor) for v in patch]
    hi = [max(v, m) for v, m in zip(patch, med)]
    out = [float(v) for v in patch]
    target = float(np.prod(patch)) * factor
    for _ in range(len(out)):
        free = [i for i in range(len(out)) if (out[i] < hi[i] if factor > 1 else out[i] > lo[i])]
        if not free or abs(np.log(target / float(np.prod(out)))) < 1e-6:
            break
        f = (target / float(np.prod(out))) ** (1.0 / len(free))
        for i in free:
            out[i] = float(np.clip(out[i] * f, lo[i], hi[i]))
    return [int(round(v)) for v in out]


def _width_for_step(plans: Plans, net_of: Callable[[int], tuple[NetworkPlan, list[int]]], batch: int, dims: int,
                    step_s: float, training: TrainingPlan) -> int:
    """The width (a multiple of :data:`WIDTH_STEP`) whose network ``net_of(width)`` steps closest to ``step_s``.

    The step is the cost model's, data pipeline included (``training``'s workers and augmentation placement).
    Where no width matches (narrow convolutions run far below a device's peak rate, so halving the width of a
    CPU network saves little), the closest is taken and the trial's time budget absorbs the rest: a costlier
    step buys fewer iterations. Widths whose steps tie (a data-bound GPU: the step is the data time whatever
    the width) go to the widest: the device would otherwise idle.
    """
    from automedseg.planning import step_seconds

    def cost(w: int) -> float:
        net, rounded = net_of(w)
        return step_seconds(net, rounded, batch=batch, dims=dims, in_channels=len(plans.channel_names),
                            num_classes=plans.num_classes, device=plans.device, workers=training.num_workers,
                            augment_on_device=training.augment_on_device)

    widths = range(MIN_WIDTH, 128 + 1, WIDTH_STEP)
    return min(widths, key=lambda w: (abs(np.log(cost(w) / step_s)), -w))


def _memory_limit_bytes(plans: Plans, base: ConfigurationPlan) -> float:
    from automedseg.planning import activation_bytes

    dev = plans.device
    limit = dev.memory_gib * 2**30 * (0.85 if dev.kind != "cpu" else 0.5)
    # A rule plan that is already over the limit (smallest-network fallback) may keep its size.
    return max(limit, 1.25 * activation_bytes(base.network, base.patch_size, batch=base.batch_size))


def apply_params(plans: Plans, base: ConfigurationPlan, params: Mapping[str, Any], *, name: str | None = None
                 ) -> ConfigurationPlan:
    """The configuration ``base`` with search parameters applied (missing ones keep the rule value).

    The schedule (epochs, iterations) is left as it is; fit it with :func:`fit_schedule`. A variant with another
    normalisation gets its own ``data_identifier`` (``<rule's>_<scheme>``): its cache differs.

    Raises:
        InfeasibleParams: The variant's activations exceed the planned device's memory.
    """
    from automedseg.planning import (
        BASE_FEATURES,
        MAX_FEATURES,
        MIN_FEATURE_MAP,
        activation_bytes,
        network_for,
        step_seconds,
    )

    p = {**default_params(base), **dict(params)}
    tr, net0, dims = base.training, base.network, base.dims
    batch = int(p.get("batch_size", base.batch_size))
    width = int(p.get("base_features", net0.features_per_stage[0]))
    arch = str(p.get("architecture", net0.architecture))
    context = float(p.get("context", 1.0))
    sp, med = _spatial(base)
    if batch != base.batch_size:
        patch = _scale_patch(list(base.patch_size), med, base.batch_size / batch, 2 * MIN_FEATURE_MAP)
        net, patch = network_for(sp, patch, dims=dims, base=width, architecture=arch)
    else:  # same patch: keep the rule topology, change only width and blocks
        patch = list(base.patch_size)
        n = net0.n_stages
        feats = tuple(min(width * 2**s, MAX_FEATURES[dims] * width // BASE_FEATURES) for s in range(n))
        enc = net0.n_conv_per_stage_encoder
        if (arch == "residual_unet") != (net0.architecture == "residual_unet"):  # residual blocks or conv pairs
            enc = tuple(min(1 + s, 6) for s in range(n)) if arch == "residual_unet" else tuple(2 for _ in range(n))
        net = dataclasses.replace(net0, architecture=arch, features_per_stage=feats, n_conv_per_stage_encoder=enc)
    if context != 1.0:  # more (less) context for less (more) capacity: the step time of the variant above
        ref_s = step_seconds(net, patch, batch=batch, dims=dims, in_channels=len(plans.channel_names),
                             num_classes=plans.num_classes, device=plans.device, workers=tr.num_workers,
                             augment_on_device=tr.augment_on_device)
        # The topology rounds the patch up to divisibility: aim for the factor after rounding.
        target = float(np.prod(patch)) * context
        tries = [network_for(sp, _scale_patch(list(patch), med, context * f, 2 * MIN_FEATURE_MAP), dims=dims,
                             base=width, architecture=arch)[1] for f in (0.55, 0.65, 0.75, 0.85, 1.0)]
        scaled = min(tries, key=lambda q: abs(np.log(float(np.prod(q)) / target)))

        def net_of(w: int) -> tuple[NetworkPlan, list[int]]:
            return network_for(sp, scaled, dims=dims, base=w, architecture=arch)

        width = _width_for_step(plans, net_of, batch, dims, ref_s, tr)
        net, patch = net_of(width)
    drop = -int(p.get("depth_delta", 0))
    keep = max(min(3, net.n_stages), net.n_stages - drop)
    if keep < net.n_stages:
        net = dataclasses.replace(
            net, features_per_stage=net.features_per_stage[:keep], kernel_sizes=net.kernel_sizes[:keep],
            strides=net.strides[:keep], n_conv_per_stage_encoder=net.n_conv_per_stage_encoder[:keep],
            n_conv_per_stage_decoder=net.n_conv_per_stage_decoder[:keep - 1],
        )
    # the rule's norm and dropout stay; ASPP rates for the (possibly new) bottleneck
    net = aspp_rates_for(dataclasses.replace(net, norm=net0.norm, dropout=net0.dropout), patch)
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
    # Only the rule plan's mirror axes can be switched off; an axis the planner left out is never switched on.
    aug_changes["mirror_axes"] = tuple(a for a in base.augmentation.mirror_axes if p.get(f"mirror_axis_{a}", True))
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
    normalization = _normalization_for(base, str(p.get("normalization", rule_normalization(base))))
    data_identifier = base.data_identifier
    if normalization != base.normalization:
        data_identifier = f"{base.data_identifier}_{normalization_key(normalization).replace('+', '_')}"
    return dataclasses.replace(base, name=name or base.name, patch_size=tuple(int(v) for v in patch),
                               batch_size=batch, network=net, augmentation=aug, training=training,
                               normalization=normalization, data_identifier=data_identifier)


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
