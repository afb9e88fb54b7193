"""A trained configuration is never silently replaced, and a fold never meets a plan it was not trained with.

Each fold folder keeps a copy of the plan it was trained with (``<work>/<configuration>/fold_K/plans.json``).

* ``plan`` (:func:`keep_trained`): a configuration of which any fold has a checkpoint keeps the plan it was
  trained with (taken from the existing ``plans.json``, which the folds' copies must match, or restored from
  a fold's copy when ``plans.json`` no longer does), and says so. A fresh plan for it goes in only with
  ``plan --replan CONFIG``, which first moves ``<work>/<CONFIG>`` aside to ``<work>/<CONFIG>.replaced-<time>``
  (nothing is deleted).
* ``train`` and ``predict`` (:func:`check_fold_matches`): a fold with a checkpoint whose copy differs from
  the work folder's ``plans.json`` in what the model is (:data:`MODEL_FIELDS`: labels, channels, axis order,
  network, patch, spacing, normalisation, resampling) is refused with one line naming the field.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from automedseg.errors import InputError
from automedseg.plans import ConfigurationPlan, PlanError, Plans, to_jsonable
from automedseg.workspace import Workspace

Log = Callable[[str], None]

#: Plan-wide fields a trained model depends on.
PLANS_FIELDS = ("labels", "channel_names", "transpose_forward")
#: Configuration fields a trained model depends on (the schedule, batch and augmentation may differ).
MODEL_FIELDS = ("dims", "network", "patch_size", "spacing_mm", "normalization", "image_order", "label_order",
                "separate_z", "out_of_plane_order")


class FoldMismatchError(InputError):
    """A fold's checkpoint was trained with another plan than the one it is asked to be used with."""


def _quiet(_: str) -> None:
    pass


def trained_folds(ws: Workspace, configuration: str) -> list[Path]:
    """Fold folders of a configuration that hold a checkpoint, sorted."""
    folder = ws.configuration_dir(configuration)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("fold_*") if p.is_dir() and any(p.glob("checkpoint_*.pt")))


def _first_difference(a: Any, b: Any, where: str) -> tuple[str, Any, Any] | None:
    """The first path at which two JSON values differ, with both values there."""
    if isinstance(a, dict) and isinstance(b, dict) and list(a) == list(b):
        for k in a:
            d = _first_difference(a[k], b[k], f"{where}.{k}" if where else str(k))
            if d is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and any(
            isinstance(v, (dict, list)) for v in a):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{where}[{i}]")
            if d is not None:
                return d
        return None
    return None if a == b else (where, a, b)


def model_difference(trained: Plans, trained_config: ConfigurationPlan, current: Plans,
                     current_config: ConfigurationPlan, *, fields: Sequence[str] = MODEL_FIELDS
                     ) -> tuple[str, Any, Any] | None:
    """The first field a model trained with ``trained_config`` depends on that ``current_config`` changes.

    Returns:
        ``(field path, trained value, current value)`` as JSON values, or ``None`` when the model fits.
    """
    for name in PLANS_FIELDS:
        d = _first_difference(to_jsonable(getattr(trained, name)), to_jsonable(getattr(current, name)), name)
        if d is not None:
            return d
    for name in fields:
        d = _first_difference(to_jsonable(getattr(trained_config, name)), to_jsonable(getattr(current_config, name)),
                              name)
        if d is not None:
            return d
    return None


def _short(value: Any) -> str:
    text = json.dumps(value, separators=(", ", ": "))
    return text if len(text) <= 60 else text[:57] + "..."


def describe_difference(diff: tuple[str, Any, Any], *, was: str = "trained", now: str = "plans.json now") -> str:
    """``patch_size: trained [14, 32, 32], plans.json now [14, 40, 32]``."""
    return f"{diff[0]}: {was} {_short(diff[1])}, {now} {_short(diff[2])}"


def _fold_copy(fold_dir: Path, configuration: str) -> tuple[Plans, ConfigurationPlan] | None:
    """The plan copy of a fold and its configuration (``None`` when the fold has no copy)."""
    path = Path(fold_dir) / "plans.json"
    if not path.is_file():
        return None
    copy = Plans.load(path)
    if configuration in copy.configurations:
        return copy, copy.configurations[configuration]
    if len(copy.configurations) == 1:
        return copy, next(iter(copy.configurations.values()))
    raise PlanError(f"{path}: holds no configuration {configuration!r}")


def check_fold_matches(plans: Plans, configuration: str, fold_dir: Path) -> None:
    """Refuse a fold whose checkpoint was trained with another plan of ``configuration`` than ``plans``.

    A fold without a checkpoint, or without a plan copy (made by an older automedseg), is not checked.

    Raises:
        FoldMismatchError: One line: the fold, the first differing field, and what to do.
        PlanError: The fold's plan copy cannot be read.
    """
    fold_dir = Path(fold_dir)
    if not any(fold_dir.glob("checkpoint_*.pt")):
        return
    found = _fold_copy(fold_dir, configuration)
    if found is None:
        return
    diff = model_difference(*found, plans, plans.configuration(configuration))
    if diff is None:
        return
    fold = fold_dir.name.removeprefix("fold_")
    raise FoldMismatchError(
        f"{fold_dir}: its checkpoint was trained with another {configuration} plan than the work folder's plans.json "
        f"({describe_difference(diff)}); run `automedseg plan DATASET --replan {configuration}` to move the trained "
        f"folds aside and plan it afresh, or `automedseg train DATASET -c {configuration} -f {fold} --restart` to "
        "retrain this fold on the current plan")


def check_folds_match(ws: Workspace, configuration: str, fold_dirs: Sequence[Path]) -> None:
    """:func:`check_fold_matches` for folds of ``ws`` when its ``plans.json`` has the configuration.

    Inference needs only fold folders: without a ``plans.json`` (or without the configuration in it) there is
    nothing to compare with.
    """
    if not ws.plans_path.is_file():
        return
    plans = Plans.load(ws.plans_path)
    if configuration not in plans.configurations:
        return
    for fold_dir in fold_dirs:
        check_fold_matches(plans, configuration, fold_dir)


# --- plan: keep what is trained ----------------------------------------------------------------------------


def move_aside(ws: Workspace, configuration: str, *, log: Log = _quiet) -> Path | None:
    """Rename ``<work>/<configuration>`` to ``<work>/<configuration>.replaced-<YYYYmmdd-HHMMSS>``.

    Every fold folder is locked first, so a fold being trained is never moved from under its trainer.

    Returns:
        The new path, or ``None`` when there was nothing to move.

    Raises:
        LockedError: A fold of the configuration is being trained.
    """
    from automedseg.atomic import fsync_path
    from automedseg.locks import folder_lock

    src = ws.configuration_dir(configuration)
    if not src.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dst = src.with_name(f"{configuration}.replaced-{stamp}")
    n = 1
    while dst.exists():
        dst = src.with_name(f"{configuration}.replaced-{stamp}-{n}")
        n += 1
    with contextlib.ExitStack() as stack:
        for fold_dir in sorted(p for p in src.glob("fold_*") if p.is_dir()):
            stack.enter_context(folder_lock(fold_dir, purpose=f"plan --replan {configuration}"))
        os.rename(src, dst)
    fsync_path(ws.root)
    log(f"plans: --replan {configuration}: moved {src} to {dst} (nothing deleted)")
    return dst


def _previous_plans(ws: Workspace, log: Log) -> Plans | None:
    if not ws.plans_path.is_file():
        return None
    try:
        return Plans.load(ws.plans_path)
    except PlanError as e:
        log(f"warning: {e}; the trained folds' own plan copies are used instead")
        return None


def _trained_configuration(ws: Workspace, name: str, folds: list[Path], previous: Plans | None,
                           log: Log) -> tuple[Plans, ConfigurationPlan, str]:
    """The plan the folds of ``name`` were trained with: ``(plans, configuration, where it was taken from)``."""
    copies: dict[Path, tuple[Plans, ConfigurationPlan]] = {}
    for fold_dir in folds:
        try:
            found = _fold_copy(fold_dir, name)
        except PlanError as e:
            log(f"warning: {e}; this fold's plan is not known")
            continue
        if found is not None:
            copies[fold_dir] = found
    reference: tuple[Plans, ConfigurationPlan, str] | None = None
    if previous is not None and name in previous.configurations:
        candidate = (previous, previous.configurations[name], str(ws.plans_path))
        if not copies or any(model_difference(*c, *candidate[:2]) is None for c in copies.values()):
            reference = candidate
    if reference is None and copies:
        first = next(iter(copies))
        reference = (*copies[first], str(first / "plans.json"))
        log(f"plans: {name}: restoring the plan its folds were trained with from {reference[2]} "
            f"({ws.plans_path} no longer held it)")
    if reference is None:
        raise InputError(f"{ws.configuration_dir(name)}: has trained folds but neither {ws.plans_path} nor the folds "
                         f"say which plan they were trained with; `automedseg plan DATASET --replan {name}` moves them "
                         "aside and plans it afresh")
    for fold_dir, copy in copies.items():
        diff = model_difference(*copy, *reference[:2])
        if diff is not None:
            log(f"warning: {fold_dir} was trained with another {name} plan "
                f"({describe_difference(diff, now='kept plan')}); train and predict refuse it: retrain it with "
                f"`automedseg train DATASET -c {name} -f {fold_dir.name.removeprefix('fold_')} --restart`")
    return reference


def _separate_caches(plans: Plans, kept: set[str]) -> Plans:
    """A fresh configuration that would share a cache folder with a kept one preprocessed otherwise gets its own."""
    import dataclasses

    from automedseg.preprocessing import preprocessing_key

    for name, cfg in list(plans.configurations.items()):
        if name in kept:
            continue
        key = preprocessing_key(plans, cfg)
        clash = [k for k in kept if plans.configurations[k].data_identifier == cfg.data_identifier
                 and preprocessing_key(plans, plans.configurations[k]) != key]
        if clash:
            plans = plans.with_configuration(
                dataclasses.replace(cfg, data_identifier=f"{cfg.data_identifier}_{key[:8]}"))
    return plans


def keep_trained(plans: Plans, ws: Workspace, *, replan: Sequence[str] = (), log: Log = _quiet) -> Plans:
    """Put back every trained configuration as it was trained, unless it is named in ``replan``.

    Args:
        plans: The freshly derived plans (``_searched`` configurations already carried over).
        ws: The work folder, with the previous ``plans.json`` and the fold folders.
        replan: Configurations to plan afresh: their folder is moved aside first (:func:`move_aside`).
        log: Where messages go.

    Returns:
        ``plans`` with the trained configurations as trained (and configurations that are trained but were not
        planned this time carried over).

    Raises:
        InputError: A ``replan`` name that is not planned, a trained configuration whose plan is unknown, or a
            dataset whose labels, channels or axis order changed under a trained configuration.
    """
    for name in replan:
        if name not in plans.configurations:
            raise InputError(f"--replan {name}: {name} is not among the configurations planned now "
                             f"({', '.join(plans.configurations) or 'none'}); plan it with `-c {name}`")
    for name in dict.fromkeys(replan):
        move_aside(ws, name, log=log)
    previous = _previous_plans(ws, log)
    names = list(plans.configurations)
    if previous is not None:
        names += [n for n in previous.configurations if n not in plans.configurations]
    kept: set[str] = set()
    for name in names:
        folds = trained_folds(ws, name)
        if not folds or name in replan:
            continue
        trained_plans, config, _ = _trained_configuration(ws, name, folds, previous, log)
        for field in PLANS_FIELDS:
            was, now = to_jsonable(getattr(trained_plans, field)), to_jsonable(getattr(plans, field))
            if was != now:
                raise InputError(
                    f"{ws.configuration_dir(name)}: trained with {field} {_short(was)}, the dataset now gives "
                    f"{_short(now)}; `automedseg plan DATASET --replan {name}` moves the trained folds aside and "
                    "plans it afresh")
        fresh = plans.configurations.get(name)
        if fresh is None:
            note = "not planned this time"
        else:
            diff = _first_difference(to_jsonable(config), to_jsonable(fresh), "")
            note = "a fresh plan is the same" if diff is None else \
                f"a fresh plan would differ: {describe_difference(diff, was='kept', now='fresh')}"
        log(f"plans: keeping {name} as trained (checkpoints in {', '.join(f.name for f in folds)}; {note}); "
            f"`automedseg plan --replan {name}` plans it afresh")
        plans = plans.with_configuration(config)
        kept.add(name)
    return _separate_caches(plans, kept) if kept else plans
