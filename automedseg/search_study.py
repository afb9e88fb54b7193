"""Optuna plumbing of :mod:`automedseg.search`: storage (heartbeats, retries), pruner, sampler, trial counts,
re-queuing interrupted trials, and the lock around plans.json shared by the workers of one machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import time
import warnings
from collections.abc import Iterator
from typing import Any

from automedseg.plans import ConfigurationPlan, Plans
from automedseg.workspace import Workspace

PRUNERS = ("hyperband", "sha", "none")
DEFAULT_HEARTBEAT_S = 20
MAX_RETRY = 2


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
def quiet_optuna() -> Iterator[None]:
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
            with quiet_optuna():
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


def make_pruner(kind: str, *, trial_epochs: int, min_resource: int | None = None) -> Any:
    """Hyperband (default), successive halving (``sha``) or none, on the epoch axis of a trial.

    The first rung is a quarter of the trial's epochs (or ``min_resource``): earlier, most learning curves are
    still at a pseudo-Dice of 0 (on Hippocampus the 5-minute trial of the rule plan stayed at 0 for its first 5 of
    16 epochs), so comparing them there would prune at random.
    """
    import optuna

    min_r = int(min_resource) if min_resource is not None else max(1, trial_epochs // 4)
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

    with quiet_optuna():
        return _PerTrialSeededTPE(seed=seed, n_startup_trials=max(3, min(10, n_trials // 3)))


def retry_interrupted(study: Any, max_retry: int) -> int:
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


def fail_orphaned_trials(study: Any, *, grace_s: float, now: datetime.datetime | None = None) -> int:
    """Fail (as interrupted, so :func:`retry_interrupted` re-queues them) the RUNNING trials that no worker started.

    A worker killed between taking a trial and its first heartbeat leaves the trial RUNNING with no heartbeat,
    which Optuna's stale-trial check passes over: every other worker would wait for it for ever. A trial counts as
    started once :func:`automedseg.search_trial.run_trial` has marked it (user attribute ``started``: its own
    number; a re-queued trial's copy of its predecessor's mark names the predecessor). Returns how many were failed.

    Args:
        study: The study.
        grace_s: Seconds a trial may run unmarked (its start as the storage recorded it).
        now: The time to judge by (default: now, the clock trials are stamped with).
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    now = now or datetime.datetime.now()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("started") == t.number or t.datetime_start is None:
            continue
        if (now - t.datetime_start).total_seconds() > grace_s:
            try:
                study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:  # another worker failed it first (or it just finished)
                continue
            n += 1
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


def plan_sha1(config: ConfigurationPlan) -> str:
    return hashlib.sha1(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode()).hexdigest()[:12]


@contextlib.contextmanager
def plans_lock(ws: Workspace) -> Iterator[None]:
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


def open_study(storage: Any, study_name: str) -> Any:
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
