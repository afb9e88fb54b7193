"""Optuna refinement of a rule-based configuration: ``automedseg search`` (and ``plan --search N``).

The rule-based planner (:mod:`automedseg.planning`) picks one sensible configuration. The search tries
variants of it, each trained briefly on fold 0, and writes the best one into ``plans.json`` as a new
named configuration (``<configuration>_searched``) that ``automedseg train`` trains like any other.

What is searched (:func:`search_space`, derived from the rule-based configuration so the ranges suit any
dataset; the rule plan is always trial 0):

========================  ===========================================================================
``optimizer``             ``sgd`` (Nesterov, momentum 0.99) or ``adamw``
``lr_factor``             learning rate = factor x the optimizer's base rate (plan's rate for the plan's
                          optimizer, else SGD 1e-2 / AdamW 1e-3), log-uniform in [0.2, 5]
``batch_size``            batch size traded against patch size at constant memory: the patch volume
                          scales with ``rule batch / batch`` (clipped to the median image), so
                          ``batch x patch voxels`` and thus activation memory and FLOPs stay put
``base_features``         width of the first stage (half, rule, double); deeper stages double it
``depth_delta``           0, -1 or -2 resolution stages (the deepest ones are dropped)
``architecture``          ``plain_unet`` or ``residual_unet`` (residual encoder)
``aug_strength``          every augmentation probability multiplied by this factor (0 to 2, capped at 1)
``oversample_foreground`` fraction of each batch forced to contain foreground
``dice_fraction``         share of the Dice term in the loss (Dice + CE weights keep their sum)
========================  ===========================================================================

The training length is not a free parameter: for every variant it is fitted to the time it is given by
the planner's cost model (:func:`automedseg.planning.step_seconds`): a wider network or a bigger batch
gets fewer iterations in the same time, so the search compares what each variant reaches *in the
budget*. Trials train exactly ``TRIAL_EPOCHS`` epochs (the pruner's steps; ``fixed_epochs`` in the trial's
plan, so the trainer does not refit them) in their share of the budget (multi-fidelity: a fraction of a full
fold); the searched plan's schedule is fitted to the rule plan's full per-fold budget. Both schedules are the
planner's (:func:`automedseg.planning.schedule_for_budget`).

How a trial is judged: :func:`automedseg.training.train_fold` (the trainer of ``automedseg train``,
reading the same preprocessed cache) trains fold 0 of the variant; after every epoch the pseudo-Dice
(mean of the last ``SMOOTHING_EPOCHS`` epochs) is reported to Optuna, and a Hyperband (default) or
successive-halving pruner stops trials that lag; a pruned trial stops at once (no final validation).
The objective is the fold-0 sliding-window validation mean Dice (the best EMA pseudo-Dice when no
reference labels are available). Sampling is Optuna's TPE, seeded: every trial's random draws come
from ``(seed, trial number)``, so workers sharing a study do not repeat each other's random draws and a
resumed search does not repeat its first ones.

Budget: ``time_budget_s`` is the wall time of the whole search (one worker); each trial gets
``time_budget_s / n_trials`` (or ``trial_budget_s``), of which 85% is training and the rest start-up and
the final validation. Without either, a trial gets ``DEFAULT_FIDELITY`` of the rule plan's per-fold
budget. The first worker records the trial budget in the study; later workers use the study's.

Storage and resuming: by default an SQLite file ``<work>/search/search.db``; any Optuna RDB URL
(``postgresql://user:password@host/db``, ``mysql+pymysql://...``) lets workers on several machines
share one study. Trials report a heartbeat; a trial whose worker died (killed, machine lost) is marked
FAIL once its heartbeat is stale and re-queued with the same parameters; a trial stopped by Ctrl-C is
marked FAIL and re-queued the next time a worker starts. Each worker runs trials until the study holds
``n_trials`` finished (complete or pruned) trials, so running the same command again continues.

Several machines: copy the work folder (``plans.json``, ``splits.json``, ``preprocessed/``) to each,
then on each run the same command with the same ``--storage`` and ``--study-name``::

    automedseg search DATASET -c 3d_fullres --trials 40 --time-budget 8h \\
        --storage postgresql://user:pw@dbhost/optuna --study-name demo_3d

Outputs (``<work>/search/<study>/``): ``trial_<n>/`` (log.jsonl, progress.png, plans.json,
validation/summary.json of each trial; checkpoints are deleted), ``search_report.md``,
``search_history.png``, ``param_importances.png``; and ``plans.json`` gains ``<configuration>_searched``
(its ``notes`` record study, trial, value and budget). Inspect a study with Optuna's own tools, e.g.
``optuna trials --storage sqlite:///<work>/search/search.db --study-name <study>`` or
``optuna-dashboard sqlite:///<work>/search/search.db``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from automedseg.io import atomic_save_figure
from automedseg.plans import AugmentationPlan, ConfigurationPlan, NetworkPlan, Plans
from automedseg.workspace import Workspace

Log = Callable[[str], None]

SEARCHED_SUFFIX = "_searched"
TRIAL_EPOCHS = 20  # epochs of every trial: the pruner's resource axis (same for all variants)
DEFAULT_FIDELITY = 0.25  # trial budget as a fraction of the rule plan's fold budget when none is given
TRAIN_SHARE = 0.85  # share of a trial's budget given to training (the rest: start-up, final validation)
BASE_LR = {"sgd": 1e-2, "adamw": 1e-3}
BASE_WEIGHT_DECAY = {"sgd": 3e-5, "adamw": 1e-2}
LR_FACTOR_RANGE = (0.2, 5.0)
AUG_STRENGTH_RANGE = (0.0, 2.0)
DICE_FRACTION_RANGE = (0.1, 0.9)
PRUNERS = ("hyperband", "sha", "none")
DEFAULT_HEARTBEAT_S = 20
MAX_RETRY = 2
MAX_CONSECUTIVE_FAILURES = 3
SMOOTHING_EPOCHS = 3  # the pruner sees the mean pseudo-Dice of the last 3 epochs


class InfeasibleParams(ValueError):
    """A sampled variant cannot be trained on the planned device (memory); the trial is pruned at once."""


# --- the search space --------------------------------------------------------------------------------


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
                          in_channels=len(plans.channel_names), num_classes=plans.num_classes, device=plans.device)
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


def _summary_line(config: ConfigurationPlan, device_name: str) -> str:
    tr, net = config.training, config.network
    return (f"searched variant: {net.architecture}, width {net.features_per_stage[0]}, {net.n_stages} stages, "
            f"batch {config.batch_size}, patch {list(config.patch_size)}, {tr.optimizer} lr {tr.initial_lr:g}: "
            f"~{(tr.estimated_seconds_per_iteration or 0):.2f} s/iteration, {tr.epochs} x {tr.iterations_per_epoch} "
            f"iterations, ~{(tr.estimated_fold_seconds or 0) / 60:.0f} min per fold on {device_name}")


# --- optuna plumbing ---------------------------------------------------------------------------------


def default_storage_url(ws: Workspace) -> str:
    """``sqlite:///<work>/search/search.db`` (absolute path)."""
    path = (ws.root / "search" / "search.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def default_study_name(plans: Plans, configuration: str) -> str:
    """``<dataset>_<configuration>`` with anything but letters, digits, ``-`` and ``_`` replaced."""
    raw = f"{plans.dataset_name}_{configuration}"
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in raw)


def redact_url(url: str) -> str:
    """The storage URL with any password hidden (for logs, reports and notes)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL sqlalchemy cannot parse is shown without its credentials part
        return url.split("@")[-1]


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message=".*SQLite.*")
        try:
            yield
        finally:
            optuna.logging.set_verbosity(level)


def make_storage(url: str, *, heartbeat_interval_s: int = DEFAULT_HEARTBEAT_S, max_retry: int = MAX_RETRY) -> Any:
    """An Optuna RDB storage with heartbeats: stale trials are failed and re-queued up to ``max_retry`` times."""
    import optuna

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 120}}
    else:
        kwargs = {"pool_pre_ping": True}
    import time

    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(5):
        try:
            with _quiet_optuna():
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=kwargs, heartbeat_interval=int(heartbeat_interval_s),
                    grace_period=int(3 * heartbeat_interval_s),
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=max_retry),
                )
        except SQLAlchemyError:
            # Workers starting together on an empty database race to create Optuna's tables: the loser
            # fails on a duplicate table; a moment later the tables exist and connecting succeeds.
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def make_pruner(kind: str, *, trial_epochs: int) -> Any:
    """Hyperband (default), successive halving (``sha``) or none, on the epoch axis of a trial.

    The first rung is a quarter of the trial's epochs: earlier, most learning curves are still at a pseudo-Dice
    of 0 (on Hippocampus the 5-minute trial of the rule plan stayed at 0 for its first 5 of 16 epochs), so
    comparing them there would prune at random.
    """
    import optuna

    min_r = max(1, trial_epochs // 4)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_r, max_resource=max(trial_epochs, min_r),
                                              reduction_factor=3)
    if kind == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_r, reduction_factor=3)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"pruner {kind!r} is not one of {PRUNERS}")


def make_sampler(seed: int, *, n_trials: int) -> Any:
    """TPE whose random draws are seeded per trial from ``(seed, trial number)``."""
    from optuna.samplers import TPESampler

    class _PerTrialSeededTPE(TPESampler):
        def before_trial(self, study: Any, trial: Any) -> None:
            s = (int(seed) * 1_000_003 + int(trial.number) * 7919 + 17) % (2**32 - 1)
            for obj in (self, getattr(self, "_random_sampler", None)):
                rng = getattr(getattr(obj, "_rng", None), "rng", None)
                if rng is not None:
                    rng.seed(s)
            super().before_trial(study, trial)

    with _quiet_optuna():
        return _PerTrialSeededTPE(seed=seed, n_startup_trials=max(3, min(10, n_trials // 3)))


def _retry_interrupted(study: Any, max_retry: int) -> int:
    """Re-queue trials that failed because their worker was interrupted (Ctrl-C); returns how many."""
    import optuna
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    n = 0
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried:
            before = len(study.get_trials(deepcopy=False))
            callback(study, t)
            n += len(study.get_trials(deepcopy=False)) - before
    return n


def trial_counts(study: Any) -> dict[str, int]:
    """Trials per state (``complete``, ``pruned``, ``fail``, ``running``, ``waiting``) and ``finished``."""
    from optuna.trial import TrialState

    out = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] += 1
    out["finished"] = out["complete"] + out["pruned"]
    return out


def best_trial(study: Any) -> Any | None:
    """The complete trial with the highest value (the earliest of equals), or ``None``."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def _plan_sha1(config: ConfigurationPlan) -> str:
    return hashlib.sha1(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _plans_lock(ws: Workspace) -> Iterator[None]:
    """An exclusive lock around read-modify-write of plans.json (workers on one machine)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    ws.root.mkdir(parents=True, exist_ok=True)
    with open(ws.root / ".plans.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- running the search ------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """What :func:`run_search` did.

    Attributes:
        study_name: Optuna study name.
        storage: Storage URL, password hidden.
        counts: Trials per state (``complete``, ``pruned``, ``fail``, ``running``, ``waiting``, ``finished``).
        best_trial: Number of the best trial (``None`` when none completed).
        best_value: Its fold-0 validation Dice.
        best_params: Its parameters.
        searched_configuration: Name of the configuration added to plans.json (``None``: nothing completed).
        report_path: The Markdown report.
        trial_budget_s: Wall time of one trial.
    """

    study_name: str
    storage: str
    counts: dict[str, int]
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any]
    searched_configuration: str | None
    report_path: Path
    trial_budget_s: float


def trial_budget(base: ConfigurationPlan, *, n_trials: int, time_budget_s: float | None,
                 trial_budget_s: float | None) -> float:
    """Wall time of one trial: given, or the search budget over the trials, or a fraction of a fold."""
    if trial_budget_s is not None:
        return float(trial_budget_s)
    if time_budget_s is not None:
        return float(time_budget_s) / max(1, n_trials)
    fold = base.training.time_budget_s or base.training.estimated_fold_seconds
    if not fold:
        raise ValueError("no search budget: pass time_budget_s (--time-budget) or trial_budget_s (--trial-budget)")
    return DEFAULT_FIDELITY * float(fold)


def run_search(ws: Workspace, configuration: str, *, n_trials: int, time_budget_s: float | None = None,
               storage: str | None = None, study_name: str | None = None, seed: int = 12345,
               trial_budget_s: float | None = None, pruner: str = "hyperband", device: str | None = None,
               threads: int | None = None, heartbeat_interval_s: int = DEFAULT_HEARTBEAT_S, max_retry: int = MAX_RETRY,
               keep_trial_files: bool = False, trial_options: Mapping[str, Any] | None = None,
               log: Log = print) -> SearchResult:
    """Run (or continue, or join) an Optuna search around one configuration and write the searched plan.

    Every worker calls this with the same ``storage`` and ``study_name``; each runs trials until the
    study holds ``n_trials`` finished trials (or its ``time_budget_s`` is spent), then writes
    ``<configuration>_searched`` into its ``plans.json`` and the report.

    Args:
        ws: Work folder with plans.json and the preprocessed cache.
        configuration: The rule-based configuration to refine (e.g. ``3d_fullres``).
        n_trials: Finished (complete + pruned) trials the study should hold.
        time_budget_s: Wall time of this worker's search; also sets the trial budget (divided by ``n_trials``).
        storage: Optuna RDB URL (default :func:`default_storage_url`).
        study_name: Default :func:`default_study_name`.
        seed: Sampler seed.
        trial_budget_s: Wall time of one trial (overrides the division above).
        pruner: ``hyperband``, ``sha`` or ``none``.
        device: Training device (``cpu``, ``cuda``, ``mps``; default what exists).
        threads: Torch CPU threads per trial.
        heartbeat_interval_s: Trial heartbeat; a trial silent for 3 intervals counts as dead.
        max_retry: How often a dead or interrupted trial is re-queued.
        keep_trial_files: Keep checkpoints and validation probabilities of every trial.
        trial_options: Tests and experts: ``epochs``, ``iterations_per_epoch`` and ``val_iterations``
            set the trial schedule; other keys are :class:`~automedseg.training.TrainOptions` fields.
        log: Where messages go.
    """
    import optuna

    plans = Plans.load(ws.plans_path)
    if configuration.endswith(SEARCHED_SUFFIX):
        raise ValueError(f"{configuration!r} is already a searched configuration; search its rule-based origin")
    base = plans.configuration(configuration)
    if n_trials < 0:
        raise ValueError("n_trials must be at least 0")
    study_name = study_name or default_study_name(plans, configuration)
    url = storage or default_storage_url(ws)
    opts = dict(trial_options or {})
    sched = {k: opts.pop(k) for k in ("epochs", "iterations_per_epoch", "val_iterations") if k in opts}
    from automedseg.training import TrainOptions

    unknown = sorted(set(opts) - {f.name for f in dataclasses.fields(TrainOptions)})
    if unknown:
        raise ValueError(f"trial_options: unknown TrainOptions field(s) {unknown}")
    storage_obj = make_storage(url, heartbeat_interval_s=heartbeat_interval_s, max_retry=max_retry)
    with _quiet_optuna():
        study = _open_study(storage_obj, study_name)
    attrs = dict(study.user_attrs)
    if attrs.get("configuration", configuration) != configuration:
        raise ValueError(f"study {study_name!r} searches {attrs['configuration']!r}, not {configuration!r}; "
                         "pass another --study-name")
    wanted = {
        "configuration": configuration,
        "trial_budget_s": trial_budget(base, n_trials=n_trials, time_budget_s=time_budget_s,
                                       trial_budget_s=trial_budget_s),
        "trial_epochs": int(sched.get("epochs", TRIAL_EPOCHS)),
        "pruner": pruner,
        "seed": int(seed),
        "n_trials": int(n_trials),
        "total_budget_s": time_budget_s,
        "rule_plan_sha1": _plan_sha1(base),
        "rule_defaults": default_params(base),
    }
    for key, value in wanted.items():
        if key not in attrs:
            study.set_user_attr(key, value)
            attrs[key] = value
        elif key in ("trial_budget_s", "trial_epochs", "pruner") and attrs[key] != value:
            log(f"search: the study's {key} is {attrs[key]} (set by its first worker); using it, not {value}")
    if attrs["rule_plan_sha1"] != wanted["rule_plan_sha1"]:
        log(f"search: warning: {configuration} in {ws.plans_path} differs from the plan the study started with")
    per_trial = float(attrs["trial_budget_s"])
    epochs = int(attrs["trial_epochs"])
    study.pruner = make_pruner(str(attrs["pruner"]), trial_epochs=epochs)
    study.sampler = make_sampler(int(attrs["seed"]), n_trials=int(attrs["n_trials"]))
    out_root = ws.root / "search" / study_name
    out_root.mkdir(parents=True, exist_ok=True)
    space = search_space(base)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    log(f"search: study {study_name!r} in {redact_url(url)}; {configuration}, {n_trials} trials of "
        f"~{per_trial / 60:.1f} min ({epochs} epochs each), pruner {attrs['pruner']}, worker {worker}")

    if not study.get_trials(deepcopy=False):
        study.enqueue_trial(default_params(base), user_attrs={"rule_defaults": True}, skip_if_exists=True)

    def objective(trial: optuna.Trial) -> float:
        return _run_trial(trial, ws=ws, plans=plans, base=base, space=space, budget_s=per_trial, epochs=epochs,
                          sched=sched, opts=opts, device=device, threads=threads, out_root=out_root,
                          keep_files=keep_trial_files, worker=worker, log=log)

    t0 = time.monotonic()
    failures = 0
    while True:
        with _quiet_optuna():
            optuna.storages.fail_stale_trials(study)
            retried = _retry_interrupted(study, max_retry)
        if retried:
            log(f"search: re-queued {retried} interrupted trial(s)")
        c = trial_counts(study)
        if c["finished"] >= n_trials:
            break
        if time_budget_s is not None and time.monotonic() - t0 + 0.5 * per_trial > time_budget_s:
            log(f"search: time budget spent after {(time.monotonic() - t0) / 60:.1f} min")
            break
        if c["waiting"] == 0 and c["finished"] + c["running"] >= n_trials:
            # The last trials run elsewhere; wait in case their worker dies and they come back re-queued.
            time.sleep(max(1.0, min(float(heartbeat_interval_s), 10.0)))
            continue
        n_before = {t.number for t in study.get_trials(deepcopy=False)}
        with _quiet_optuna():
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
        mine = [t for t in study.get_trials(deepcopy=False) if t.number not in n_before
                and t.user_attrs.get("worker") == worker]
        if mine and mine[-1].state.name == "FAIL":
            failures += 1
            log(f"search: trial {mine[-1].number} failed: {mine[-1].user_attrs.get('error', '?')}")
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise RuntimeError(f"{failures} trials in a row failed; last error: "
                                   f"{mine[-1].user_attrs.get('error', '?')}")
        elif mine:
            failures = 0
    return finalize_search(ws, configuration, study, storage_url=url, log=log)


def _open_study(storage: Any, study_name: str) -> Any:
    import optuna

    for attempt in range(5):
        try:
            return optuna.create_study(storage=storage, study_name=study_name, direction="maximize",
                                       load_if_exists=True, pruner=optuna.pruners.NopPruner())
        except Exception as e:  # noqa: BLE001 - concurrent table/study creation: retry shortly
            if attempt == 4 or "locked" not in str(e).lower() and "unique" not in str(e).lower():
                raise
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _run_trial(trial: Any, *, ws: Workspace, plans: Plans, base: ConfigurationPlan, space: Sequence[SearchParam],
               budget_s: float, epochs: int, sched: Mapping[str, Any], opts: Mapping[str, Any], device: str | None,
               threads: int | None, out_root: Path, keep_files: bool, worker: str, log: Log) -> float:
    import optuna

    from automedseg.training import TrainOptions, train_fold

    trial.set_user_attr("worker", worker)
    trial.set_user_attr("interrupted", False)
    params = {p.name: p.suggest(trial) for p in space}
    name = f"{base.name}_trial{trial.number}"
    tlog: Log = lambda m: log(f"[trial {trial.number}] {m}")  # noqa: E731
    try:
        variant = apply_params(plans, base, params, name=name)
    except InfeasibleParams as e:
        trial.set_user_attr("infeasible", str(e))
        tlog(f"pruned before training: {e}")
        raise optuna.TrialPruned(str(e)) from None
    variant = fit_schedule(plans, variant, TRAIN_SHARE * budget_s, trial_epochs=epochs)
    if sched:
        tr = dataclasses.replace(variant.training, **{k: int(v) for k, v in sched.items()})
        variant = dataclasses.replace(variant, training=tr)
    tr = variant.training
    trial.set_user_attr("plan", {
        "batch_size": variant.batch_size, "patch_size": list(variant.patch_size),
        "features_per_stage": list(variant.network.features_per_stage), "n_stages": variant.network.n_stages,
        "architecture": variant.network.architecture, "optimizer": tr.optimizer, "initial_lr": tr.initial_lr,
        "epochs": tr.epochs, "iterations_per_epoch": tr.iterations_per_epoch,
    })
    tlog(f"{json.dumps(params, default=str)} -> batch {variant.batch_size}, patch {list(variant.patch_size)}, "
         f"{tr.epochs} x {tr.iterations_per_epoch} iterations")
    out_dir = out_root / f"trial_{trial.number}"
    curve: list[float] = []

    def on_epoch(epoch: int, ema: float) -> bool:
        # The trainer's EMA (factor 0.9) lags by ~10 epochs, half a trial: report a short running mean
        # of the epoch's pseudo-Dice instead (read from the fold log, which is written before this call).
        raw = _epoch_pseudo_dice(out_dir / "log.jsonl", epoch)
        curve.append(float(ema) if raw is None else raw)
        score = float(np.mean(curve[-SMOOTHING_EPOCHS:]))
        trial.report(score, epoch + 1)
        if trial.should_prune():
            trial.set_user_attr("pruned_at_epoch", epoch + 1)
            tlog(f"pruned after epoch {epoch + 1} (pseudo-Dice {score:.4f})")
            # Raised, not returned: a pruned trial skips the final validation.
            raise optuna.TrialPruned(f"pseudo-Dice {score:.4f} after epoch {epoch + 1}")
        return False

    # No time_budget_s option: the trial's plan holds its budget and its fixed epochs, which the trainer keeps.
    options = TrainOptions(**{
        "device": device, "threads": threads, "output_dir": out_dir, "progress": False, "validate": True,
        "restart": True, **opts,
    })
    try:
        result = train_fold(ws, name, 0, plans=plans.with_configuration(variant), options=options, log=tlog,
                            epoch_callback=on_epoch)
    except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)
        raise
    except optuna.TrialPruned:
        raise
    except Exception as e:
        trial.set_user_attr("error", repr(e)[:500])
        raise
    finally:
        if not keep_files:
            _clean_trial_dir(out_dir)
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    val = (result.validation or {}).get("mean_dice")
    value = float(val) if val is not None and math.isfinite(val) else float(result.best_ema_dice)
    if not math.isfinite(value):
        value = 0.0
    trial.set_user_attr("best_ema_pseudo_dice", float(result.best_ema_dice))
    trial.set_user_attr("validation_mean_dice", None if val is None else float(val))
    trial.set_user_attr("epochs_run", int(result.epochs_run))
    trial.set_user_attr("train_seconds", float(result.train_seconds))
    tlog(f"value {value:.4f} ({'validation Dice' if val is not None else 'best EMA pseudo-Dice'}), "
         f"{result.epochs_run} epochs in {result.train_seconds:.0f} s")
    return value


def _epoch_pseudo_dice(log_path: Path, epoch: int) -> float | None:
    """Mean pseudo-Dice of ``epoch`` from a fold's log.jsonl (``None`` if absent or not finite)."""
    try:
        lines = log_path.read_text().splitlines()
        entry = json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return None
    value = entry.get("mean_pseudo_dice") if entry.get("epoch") == epoch else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _clean_trial_dir(out_dir: Path) -> None:
    """Drop a trial's checkpoints and validation volumes; keep log, curves, plan and validation summary."""
    if not out_dir.is_dir():
        return
    for p in out_dir.glob("*.pt"):
        p.unlink(missing_ok=True)
    val = out_dir / "validation"
    if val.is_dir():
        for p in val.iterdir():
            if p.name != "summary.json":
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


# --- the result: searched plan and report ---------------------------------------------------------------


def searched_configuration(plans: Plans, configuration: str, params: Mapping[str, Any], *, study_name: str,
                           trial_number: int, value: float, trial_budget_s: float, n_finished: int,
                           total_budget_s: float | None = None) -> ConfigurationPlan:
    """The best parameters merged into ``<configuration>_searched``, scheduled for a full fold, with provenance.

    The full-fold schedule uses the rule plan's per-fold budget (``training.time_budget_s``); without one
    (GPU plans) the rule plan's epochs and iterations are kept.
    """
    base = plans.configuration(configuration)
    name = configuration + SEARCHED_SUFFIX
    variant = apply_params(plans, base, params, name=name)
    variant = fit_schedule(plans, variant, base.training.time_budget_s)
    notes = (
        f"derived from the rule-based {configuration!r} by automedseg search",
        f"searched: study={study_name}, trial={trial_number}, value={value:.4f}, budget_s={trial_budget_s:.0f} "
        f"per trial, trials={n_finished}" + (f", total_budget_s={total_budget_s:.0f}" if total_budget_s else ""),
        "search params: " + json.dumps(dict(params), sort_keys=True, default=str),
        _summary_line(variant, plans.device.name),
    )
    return dataclasses.replace(variant, notes=notes)


def finalize_search(ws: Workspace, configuration: str, study: Any, *, storage_url: str = "", log: Log = print
                    ) -> SearchResult:
    """Write ``<configuration>_searched`` (best trial so far) into plans.json and the report; safe to repeat."""
    attrs = study.user_attrs
    per_trial = float(attrs.get("trial_budget_s", 0.0))
    counts = trial_counts(study)
    best = best_trial(study)
    written = None
    if best is not None:
        with _plans_lock(ws):
            plans = Plans.load(ws.plans_path)
            config = searched_configuration(plans, configuration, best.params, study_name=study.study_name,
                                            trial_number=best.number, value=float(best.value),
                                            trial_budget_s=per_trial, n_finished=counts["finished"],
                                            total_budget_s=attrs.get("total_budget_s"))
            plans.with_configuration(config).save(ws.plans_path)
        written = config.name
        log(f"search: best trial {best.number}, fold-0 Dice {best.value:.4f} -> {written} in {ws.plans_path}")
    else:
        log("search: no trial completed yet; plans.json unchanged")
    report = write_search_report(ws, configuration, study, storage_url=storage_url)
    log(f"search: report {report}")
    return SearchResult(
        study_name=study.study_name, storage=redact_url(storage_url) if storage_url else "", counts=counts,
        best_trial=None if best is None else best.number, best_value=None if best is None else float(best.value),
        best_params={} if best is None else dict(best.params), searched_configuration=written,
        report_path=report, trial_budget_s=per_trial,
    )


def _savefig(fig: Any, path: Path) -> None:
    atomic_save_figure(fig, path, dpi=90)


def _plot_history(trials: Sequence[Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(8, 8))
    done = [t for t in trials if t.state.name == "COMPLETE"]
    pruned = [t for t in trials if t.state.name == "PRUNED" and t.intermediate_values]
    if done:
        ax0.scatter([t.number for t in done], [t.value for t in done], label="complete (fold-0 Dice)", zorder=3)
        order = sorted(done, key=lambda t: t.number)
        best = np.maximum.accumulate([t.value for t in order])
        ax0.step([t.number for t in order], best, where="post", color="C3", label="best so far")
    if pruned:
        ax0.scatter([t.number for t in pruned], [t.intermediate_values[t.last_step] for t in pruned], marker="x",
                    color="grey", label="pruned (last pseudo-Dice)")
    from matplotlib.ticker import MaxNLocator

    ax0.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax0.set_xlabel("trial")
    ax0.set_ylabel("objective")
    ax0.set_title("optimisation history")
    ax0.legend(loc="best", fontsize=8)  # "best" keeps clear of the points (a fixed corner hid a pruned trial)
    for t in trials:
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        style = {"color": "grey", "ls": "--", "lw": 0.8} if t.state.name == "PRUNED" else {"lw": 1.2}
        ax1.plot(steps, [t.intermediate_values[s] for s in steps], **style)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel(f"pseudo-Dice (mean of {SMOOTHING_EPOCHS} epochs)")
    ax1.set_title("learning curves (dashed: pruned)")
    fig.tight_layout()
    _savefig(fig, path)


def _plot_importances(importances: Mapping[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.2))
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (fANOVA, Optuna)")
    fig.tight_layout()
    _savefig(fig, path)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def write_search_report(ws: Workspace, configuration: str, study: Any, *, storage_url: str = "") -> Path:
    """``search_report.md``, ``search_history.png`` and (2+ complete trials) ``param_importances.png``."""
    from optuna.trial import TrialState

    out = ws.root / "search" / study.study_name
    out.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    attrs = study.user_attrs
    counts = trial_counts(study)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = best_trial(study)
    _plot_history(trials, out / "search_history.png")
    importances: dict[str, float] = {}
    imp_note = "needs at least 2 complete trials"
    if len(complete) >= 2:
        import optuna

        try:
            with _quiet_optuna(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importances = dict(optuna.importance.get_param_importances(
                    study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)))
            if importances:
                _plot_importances(importances, out / "param_importances.png")
        except Exception as e:  # noqa: BLE001 - importances are informative only
            imp_note = f"not available: {e}"
    defaults = attrs.get("rule_defaults", {})
    lines = [
        f"# Search report: `{study.study_name}`",
        "",
        f"- configuration: `{configuration}` -> `{configuration}{SEARCHED_SUFFIX}`",
        f"- storage: `{redact_url(storage_url)}`" if storage_url else "- storage: (not given)",
        f"- trials: {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed, "
        f"{counts['running']} running, {counts['waiting']} waiting (target {attrs.get('n_trials', '?')} finished)",
        f"- budget: ~{float(attrs.get('trial_budget_s', 0)) / 60:.1f} min per trial, "
        f"{attrs.get('trial_epochs', '?')} epochs each" + (
            f"; search budget {float(attrs['total_budget_s']) / 60:.0f} min" if attrs.get("total_budget_s") else ""),
        f"- pruner: {attrs.get('pruner', '?')}; sampler: TPE, seed {attrs.get('seed', '?')}",
        "- objective: fold-0 sliding-window validation mean Dice at the end of the trial",
        "",
    ]
    if best is not None:
        lines += [f"## Best trial: {best.number} (value {best.value:.4f})", "",
                  "| parameter | rule default | best |", "|---|---|---|"]
        for k in best.params:
            mark = "" if defaults.get(k) == best.params[k] else " *"
            lines.append(f"| {k} | {_fmt(defaults.get(k))} | {_fmt(best.params[k])}{mark} |")
        plan = best.user_attrs.get("plan", {})
        if plan:
            lines += ["", "Trial plan: " + ", ".join(f"{k} {v}" for k, v in plan.items()), ""]
        lines += [f"Train it on all folds: `automedseg train DATASET -c {configuration}{SEARCHED_SUFFIX} -f 0` "
                  "(... `-f 4`).", ""]
    else:
        lines += ["No trial has completed yet.", ""]
    lines += ["## Parameter importances", ""]
    if importances:
        lines += ["| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in importances.items()]
        lines += ["", "![importances](param_importances.png)", ""]
        if len(complete) < 10:
            lines += [f"(from {len(complete)} complete trials only: indicative at best)", ""]
    else:
        lines += [f"({imp_note})", ""]
    lines += ["## History", "", "![history](search_history.png)", "", "## Trials", "",
              "| trial | state | value | epochs | worker | parameters |", "|---|---|---|---|---|---|"]
    for t in trials:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
        epochs = t.last_step if t.last_step is not None else "-"
        lines.append(f"| {t.number} | {t.state.name.lower()} | {_fmt(t.value)} | {epochs} | "
                     f"{t.user_attrs.get('worker', '-')} | {params} |")
    lines += ["", "## Search space", "", "| parameter | range | rule default | what it changes |", "|---|---|---|---|"]
    plans = Plans.load(ws.plans_path)
    for p in search_space(plans.configuration(configuration)):
        lines.append(f"| {p.name} | {p.describe()} | {_fmt(p.default)} | {p.help} |")
    from automedseg.io import atomic_write_text

    path = out / "search_report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
