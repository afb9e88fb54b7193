"""Experiment tracking: what a training run reports besides ``log.jsonl`` and ``progress.png``.

The trainer holds a :class:`TrackerSet` (composition, no trainer subclass) of :class:`Tracker` objects and calls
:meth:`Tracker.on_epoch` with each epoch's :class:`~automedseg.training_log.EpochRecord` (what it writes to
``log.jsonl``), :meth:`Tracker.on_stage` when a stage starts or ends, and :meth:`Tracker.close` at the end.
Trackers are built per fold by factories (:data:`TrackerFactory`, given in
:attr:`~automedseg.training_options.TrainOptions.trackers`) from a :class:`RunInfo`; a factory returns ``None``
when its tracker cannot run here. Only rank 0 of a distributed run tracks.

Stages the trainer reports (``status`` is ``start``, ``end`` or ``failed``, the last with ``error``):

- ``training``: ``start`` with ``epochs_done`` (epochs already trained: 0, or where a resumed run continues)
  and ``epochs`` (planned); not reported when the fold is already trained.
- ``validation``: ``end`` with ``mean_dice`` and ``dice_per_class`` (declared label value -> Dice).

Trackers here:

- :class:`TensorBoardTracker` (:func:`tensorboard_tracker`, on by default when the ``tensorboard`` package is
  installed): event files in the fold folder; ``tensorboard --logdir WORK`` shows every fold.
- :class:`MLflowTracker` (:func:`mlflow_tracker`, ``train --mlflow URI``): one MLflow run per fold.
- :class:`~automedseg.progress_events.JsonProgressTracker` (``--progress json``): JSON lines on stdout.

A tracker that fails during the run is reported once and switched off; it never stops the training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from automedseg.errors import InputError

if TYPE_CHECKING:
    from automedseg.plans import ConfigurationPlan, Plans
    from automedseg.training_log import EpochRecord

Log = Callable[[str], None]


@runtime_checkable
class Tracker(Protocol):
    """What the epoch loop reports to (see the module docstring for the stages)."""

    def on_epoch(self, record: EpochRecord) -> None:
        """One finished epoch, as written to ``log.jsonl``."""

    def on_stage(self, stage: str, status: str, **info: Any) -> None:
        """A stage (``training``, ``validation``) started, ended or failed; ``info`` as the module lists."""

    def close(self) -> None:
        """The run is over (also after a failure): flush and release."""


@dataclass(frozen=True)
class RunInfo:
    """The fold a tracker follows.

    Attributes:
        plans: The plan.
        config: The configuration as trained (the run's overrides applied).
        fold: Fold index or ``"all"``.
        fold_dir: The fold folder.
        log: Where the trainer's messages go.
    """

    plans: Plans
    config: ConfigurationPlan
    fold: int | str
    fold_dir: Path
    log: Log = print

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the foreground classes in training-index order (the order of ``pseudo_dice``)."""
        return tuple(self.label_name(v) for v in sorted({int(v) for v in self.plans.labels.values()}) if v != 0)

    def label_name(self, value: int | str) -> str:
        """The declared name(s) of a label value, ``+``-joined when several names share it."""
        names = [n for n, v in self.plans.labels.items() if int(v) == int(value)]
        return "+".join(names) if names else str(value)

    def per_class(self, dice: Sequence[float | None] | Mapping[str, float | None]) -> dict[str, float | None]:
        """Dice by class name, from a training-index sequence or a mapping keyed by declared label value."""
        if isinstance(dice, Mapping):
            return {self.label_name(k): v for k, v in dice.items()}
        return dict(zip(self.class_names, dice))

    def plan_json(self) -> str:
        """The plan of this configuration alone, as JSON text (what the fold's ``plans.json`` holds)."""
        return dataclasses.replace(self.plans, configurations={self.config.name: self.config}).to_json()

    def params(self) -> dict[str, str]:
        """The plan's main choices as flat strings (configuration, patch, batch, width, schedule)."""
        c, tr = self.config, self.config.training
        values: dict[str, Any] = {
            "dataset": self.plans.dataset_name, "configuration": c.name, "fold": self.fold, "dims": c.dims,
            "patch_size": "x".join(str(s) for s in c.patch_size), "batch_size": c.batch_size,
            "spacing_mm": "x".join(f"{s:g}" for s in c.spacing_mm), "architecture": c.network.architecture,
            "width": c.network.features_per_stage[0], "features_per_stage": list(c.network.features_per_stage),
            "stages": len(c.network.features_per_stage), "epochs": tr.epochs,
            "iterations_per_epoch": tr.iterations_per_epoch, "val_iterations": tr.val_iterations,
            "optimizer": tr.optimizer, "initial_lr": tr.initial_lr, "weight_decay": tr.weight_decay,
            "poly_exponent": tr.poly_exponent, "time_budget_s": tr.time_budget_s, "seed": tr.seed,
            "num_classes": len(self.class_names) + 1, "labels": dict(self.plans.labels),
        }
        return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in values.items()
                if v is not None}


TrackerFactory = Callable[[RunInfo], "Tracker | None"]


class TrackerSet:
    """The trackers of one run, called together; a tracker that raises is reported once and dropped.

    Example:
        >>> class Printer:
        ...     def on_epoch(self, record): print("epoch", record.epoch)
        ...     def on_stage(self, stage, status, **info): print(stage, status, info)
        ...     def close(self): print("closed")
        >>> with TrackerSet([Printer()]) as trackers:
        ...     with trackers.stage("training", epochs=2):
        ...         trackers.on_epoch({"epoch": 0, "train_loss": 1.0})
        training start {'epochs': 2}
        epoch 0
        training end {}
        closed
    """

    def __init__(self, trackers: Sequence[Tracker] = (), *, log: Log = print) -> None:
        self.trackers = list(trackers)
        self.log = log
        self._failed = False

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - tracking never stops a training
                self.trackers.remove(t)
                self.log(f"tracking: {type(t).__name__} failed ({type(e).__name__}: {e}); switched off for this run")

    def on_epoch(self, record: EpochRecord | Mapping[str, Any]) -> None:
        """Report an epoch (a record, or the trainer's mapping of the same fields)."""
        if not self.trackers:
            return
        from automedseg.atomic import jsonable
        from automedseg.serialize import from_jsonable
        from automedseg.training_log import EpochRecord

        if not isinstance(record, EpochRecord):
            record = from_jsonable(EpochRecord, jsonable(dict(record)), "epoch record")
        self._each("on_epoch", record)

    def on_stage(self, stage: str, status: str, **info: Any) -> None:
        """Report a stage's start, end or failure."""
        self._each("on_stage", stage, status, **info)

    @contextlib.contextmanager
    def stage(self, name: str, **info: Any) -> Iterator[dict[str, Any]]:
        """Report ``name`` started, then ended with what the body put in the yielded dict (or failed)."""
        end: dict[str, Any] = {}
        self.on_stage(name, "start", **info)
        try:
            yield end
        except BaseException as e:
            self._fail(name, e)
            raise
        self.on_stage(name, "end", **end)

    def _fail(self, stage: str, e: BaseException) -> None:
        if not self._failed:
            self._failed = True
            self.on_stage(stage, "failed", error=f"{type(e).__name__}: {e}".rstrip(": "))

    def close(self) -> None:
        """Close every tracker."""
        self._each("close")
        self.trackers.clear()

    def __enter__(self) -> TrackerSet:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self._fail("run", exc)
        self.close()


def open_trackers(factories: Sequence[TrackerFactory] | None, run: RunInfo, *, active: bool = True) -> TrackerSet:
    """Build the run's trackers (``None``: :func:`default_trackers`; ``active=False``: none, as on rank > 0)."""
    if not active:
        return TrackerSet(log=run.log)
    built = [f(run) for f in (default_trackers() if factories is None else factories)]
    return TrackerSet([t for t in built if t is not None], log=run.log)


class _HasTracker(Protocol):
    """What gives a tracker per run (the JSON progress stream); a protocol, so this module needs not import it."""

    def tracker(self, run: RunInfo) -> Tracker: ...


def default_trackers() -> tuple[TrackerFactory, ...]:
    """What every training run reports to unless told otherwise: TensorBoard, when installed."""
    return (tensorboard_tracker,)


def training_trackers(*, mlflow_uri: str | None = None, progress: _HasTracker | None = None,
                      ) -> tuple[TrackerFactory, ...]:
    """The defaults plus MLflow (when ``mlflow_uri`` is given) and a JSON progress stream (``progress``: the
    :class:`~automedseg.progress_events.ProgressEvents` of ``--progress json``, whose ``tracker`` it adds)."""
    extra: list[TrackerFactory] = []
    if mlflow_uri:
        extra.append(mlflow_tracker(mlflow_uri))
    if progress is not None:
        extra.append(progress.tracker)
    return (*default_trackers(), *extra)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _tag(name: str) -> str:
    """A class name usable in TensorBoard tags and MLflow metric keys."""
    return re.sub(r"[^\w\-. :]", "_", name) or "_"


# --- TensorBoard ---------------------------------------------------------------------------------------

_told_no_tensorboard = False


def tensorboard_tracker(run: RunInfo) -> TensorBoardTracker | None:
    """A :class:`TensorBoardTracker` for the fold, or ``None`` (one log line per process) without tensorboard."""
    global _told_no_tensorboard
    writer = None
    if _installed("tensorboard"):
        try:
            from torch.utils.tensorboard import SummaryWriter as writer
        except ImportError:
            writer = None
    if writer is None:
        if not _told_no_tensorboard:
            _told_no_tensorboard = True
            run.log("tensorboard is not installed: no event files (pip install 'automedseg[tensorboard]')")
        return None
    return TensorBoardTracker(run, writer_class=writer)


class TensorBoardTracker:
    """TensorBoard event files in the fold folder, one step per epoch (the 0-based epoch of ``log.jsonl``).

    Scalars: ``loss/train``, ``loss/validation`` (cross-entropy on validation patches), ``pseudo_dice/<class>``
    (whole validation images, by label name), ``pseudo_dice/mean``, ``pseudo_dice/ema``,
    ``pseudo_dice/mean_patches``, ``learning_rate``, ``time/epoch_seconds``, ``time/seconds_per_iteration``,
    ``time/data_wait_fraction``, and after the final validation ``validation/dice/<class>`` and
    ``validation/mean_dice``. Text: ``plan`` (the configuration's plan as JSON). A resumed run hides the events a
    crashed run wrote after its last checkpoint (TensorBoard's ``purge_step``); a restarted run hides all.
    """

    def __init__(self, run: RunInfo, *, writer_class: Any) -> None:
        self.run = run
        self._writer_class = writer_class
        self._writer: Any = None
        self._step: int | None = None

    def _open(self, purge_step: int | None = None) -> Any:
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.run.fold_dir), purge_step=purge_step)
            text = "\n".join("    " + line for line in self.run.plan_json().splitlines())  # markdown code block
            self._writer.add_text("plan", text, global_step=purge_step or 0)
        return self._writer

    def _scalars(self, values: Mapping[str, float | None], step: int) -> None:
        w = self._open()
        for tag, v in values.items():
            if v is not None:
                w.add_scalar(tag, float(v), global_step=step)
        w.flush()

    def on_epoch(self, record: EpochRecord) -> None:
        """Write the epoch's scalars."""
        self._step = record.epoch
        values = {
            "loss/train": record.train_loss, "loss/validation": record.val_loss,
            **{f"pseudo_dice/{_tag(n)}": d for n, d in self.run.per_class(record.pseudo_dice).items()},
            "pseudo_dice/mean": record.mean_pseudo_dice, "pseudo_dice/ema": record.ema_pseudo_dice,
            "pseudo_dice/mean_patches": record.mean_patch_pseudo_dice, "learning_rate": record.lr,
            "time/epoch_seconds": record.epoch_seconds, "time/seconds_per_iteration": record.seconds_per_iteration,
            "time/data_wait_fraction": record.data_wait_fraction,
        }
        self._scalars(values, record.epoch)

    def on_stage(self, stage: str, status: str, **info: Any) -> None:
        """Open the writer when training starts; write the final validation Dice."""
        if stage == "training" and status == "start":
            self._open(purge_step=int(info.get("epochs_done") or 0))
        elif stage == "validation" and status == "end":
            step = self._step if self._step is not None else max(0, self.run.config.training.epochs - 1)
            dice = {f"validation/dice/{_tag(n)}": d for n, d in
                    self.run.per_class(info.get("dice_per_class") or {}).items()}
            self._scalars({**dice, "validation/mean_dice": info.get("mean_dice")}, step)

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# --- MLflow --------------------------------------------------------------------------------------------


def mlflow_tracker(uri: str, *, experiment: str | None = None) -> TrackerFactory:
    """A factory of :class:`MLflowTracker` logging to ``uri`` (checked here: MLflow must be installed).

    Args:
        uri: Tracking URI: ``http(s)://`` server, ``sqlite:///mlflow.db``, or a local folder
            (``file:///abs/mlruns`` or a path).
        experiment: Experiment name (default: the dataset name).

    Raises:
        InputError: MLflow is not installed.
    """
    if not _installed("mlflow"):
        raise InputError(f"--mlflow {uri}: MLflow is not installed; pip install 'automedseg[mlflow]' "
                         "(or mlflow-skinny)")

    def factory(run: RunInfo) -> MLflowTracker:
        return MLflowTracker(uri, run, experiment=experiment)

    return factory


@contextlib.contextmanager
def _file_store_allowed(uri: str) -> Iterator[None]:
    """MLflow 3 refuses a local file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set; naming a folder as the
    tracking URI is that choice, so it is made for the duration of MLflow's calls (the setting is restored)."""
    scheme = re.match(r"^([a-zA-Z][\w+.-]*):", uri)
    local = scheme is None or scheme.group(1).lower() == "file" or len(scheme.group(1)) == 1  # C:\ on Windows
    key = "MLFLOW_ALLOW_FILE_STORE"
    old = os.environ.get(key)
    if local and old is None:
        os.environ[key] = "true"
    try:
        yield
    finally:
        if local and old is None:
            os.environ.pop(key, None)


class MLflowTracker:
    """One MLflow run per fold (experiment: the dataset name; run name: ``<configuration> fold <k>``).

    Params: :meth:`RunInfo.params`. Metrics, step = 0-based epoch: ``train_loss``, ``val_loss``,
    ``pseudo_dice_mean``, ``pseudo_dice_ema``, ``pseudo_dice_patches``, ``pseudo_dice/<class>``,
    ``learning_rate``, ``epoch_seconds``, ``seconds_per_iteration``, ``data_wait_fraction``; after the final
    validation ``validation_mean_dice`` and ``validation_dice/<class>``. Artifact: the fold's ``plans.json``
    (as trained). The run ends ``FINISHED``, or ``FAILED`` when the training raised.
    """

    def __init__(self, uri: str, run: RunInfo, *, experiment: str | None = None) -> None:
        try:
            from mlflow.entities import Param
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise InputError(f"--mlflow {uri}: MLflow cannot be imported ({e})") from None
        self.uri, self.run = uri, run
        self._status = "FINISHED"
        self._step: int | None = None
        name = experiment or run.plans.dataset_name
        try:
            with _file_store_allowed(uri):
                self.client = MlflowClient(tracking_uri=uri)
                self.experiment_id = self._experiment(name)
                created = self.client.create_run(
                    self.experiment_id, run_name=f"{run.config.name} fold {run.fold}",
                    tags={"automedseg.fold_dir": str(run.fold_dir), "automedseg.configuration": run.config.name,
                          "automedseg.fold": str(run.fold)})
                self.run_id = created.info.run_id
                self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in run.params().items()])
        except MlflowException as e:
            raise InputError(f"--mlflow {uri}: {str(e).splitlines()[0]}") from None

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another fold created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _metrics(self, values: Mapping[str, float | None], step: int, when: float | None = None) -> None:
        import math

        from mlflow.entities import Metric

        ms = int(1000 * (when if when is not None else time.time()))
        batch = [Metric(k, float(v), ms, step) for k, v in values.items() if v is not None and math.isfinite(v)]
        if batch:
            with _file_store_allowed(self.uri):
                self.client.log_batch(self.run_id, metrics=batch)

    def on_epoch(self, record: EpochRecord) -> None:
        """Log the epoch's metrics."""
        self._step = record.epoch
        self._metrics({
            "train_loss": record.train_loss, "val_loss": record.val_loss,
            "pseudo_dice_mean": record.mean_pseudo_dice, "pseudo_dice_ema": record.ema_pseudo_dice,
            "pseudo_dice_patches": record.mean_patch_pseudo_dice, "learning_rate": record.lr,
            **{f"pseudo_dice/{_tag(n)}": d for n, d in self.run.per_class(record.pseudo_dice).items()},
            "epoch_seconds": record.epoch_seconds, "seconds_per_iteration": record.seconds_per_iteration,
            "data_wait_fraction": record.data_wait_fraction,
        }, record.epoch, record.time)

    def on_stage(self, stage: str, status: str, **info: Any) -> None:
        """Log the final validation Dice; note a failure."""
        if status == "failed":
            self._status = "KILLED" if "KeyboardInterrupt" in str(info.get("error", "")) else "FAILED"
        elif stage == "validation" and status == "end":
            step = self._step if self._step is not None else max(0, self.run.config.training.epochs - 1)
            dice = {f"validation_dice/{_tag(n)}": d for n, d in
                    self.run.per_class(info.get("dice_per_class") or {}).items()}
            self._metrics({**dice, "validation_mean_dice": info.get("mean_dice")}, step)

    def close(self) -> None:
        """Upload the fold's plans.json and end the run."""
        with _file_store_allowed(self.uri):
            plan = self.run.fold_dir / "plans.json"
            try:
                if plan.is_file():
                    self.client.log_artifact(self.run_id, str(plan))
            finally:
                self.client.set_terminated(self.run_id, status=self._status)
