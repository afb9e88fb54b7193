"""Training one fold of a k-fold cross-validation from the plan and the preprocessed cache.

Composition, not a trainer class hierarchy: :func:`train_fold` wires a network (:mod:`network`), batches
(:mod:`augmentation`), a loss (:class:`~automedseg.losses.DeepSupervisionLoss`), SGD or AdamW with poly decay (one
step: :func:`automedseg.training_step.train_step`, which the calibration times too), and
per-epoch checkpoints. Variants are plan fields or :class:`~automedseg.training_options.TrainOptions`, not
subclasses. The per-epoch pseudo-Dice that steers the best checkpoint is scored on whole validation images
(:mod:`automedseg.full_image_dice`; the patch figure of :mod:`automedseg.validation` is logged beside it), the final
sliding-window validation is :mod:`automedseg.validation`, the rank bookkeeping :mod:`automedseg.distributed`. On a
CPU the epochs run with the plan's ``worker_placement`` (:mod:`automedseg.thread_placement`); torch's threads and
the process's affinity are restored after them and after the fold.

Fold folder (``<work>/<configuration>/fold_K/``)::

    plans.json              the plan as trained (schedule and overrides actually used)
    checkpoint_latest.pt    every epoch, atomic; resume point
    checkpoint_best.pt      best EMA pseudo-Dice (whole validation images)
    checkpoint_final.pt     after the last epoch
    log.jsonl               one JSON object per epoch
    progress.png            loss, pseudo-Dice, learning rate, epoch time (:mod:`automedseg.progress_plot`)
    events.out.tfevents.*   TensorBoard, when installed (automedseg.tracking)
    validation/             per-case probabilities (.npz), segmentations, summary.json (per-case Dice)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from automedseg.allocator import retain_freed_memory
from automedseg.atomic import remove_stale_temp_files
from automedseg.augmentation import make_training_loader, make_validation_loader
from automedseg.class_sampling import class_weights_for, update_class_weights
from automedseg.cost_model import step_ratio_note
from automedseg.device import memory_format, needs_grad_scaler, precision_for, select_device
from automedseg.device_batches import make_device_training_loader, use_device_augmentation
from automedseg.distributed import Dist
from automedseg.errors import InputError
from automedseg.full_image_dice import ImageRotation, score_images
from automedseg.inference import load_checkpoint
from automedseg.io import atomic_write
from automedseg.locks import folder_lock
from automedseg.losses import DeepSupervisionLoss, soft_dice_loss  # noqa: F401 - soft_dice_loss: re-exported
from automedseg.network import build_network
from automedseg.network_cost import output_strides
from automedseg.planning import END_WINDOW, budget_epochs, last_epoch_iterations
from automedseg.plans import ConfigurationPlan, Plans
from automedseg.preprocessing import complete_cases
from automedseg.progress_plot import plot_progress, progress_title
from automedseg.rng import capture_rng_state, restore_rng_state
from automedseg.splits import load_or_create_splits
from automedseg.thread_placement import PlacementLayout, placed, torch_threads, training_layout
from automedseg.tracking import RunInfo, TrackerSet, open_trackers
from automedseg.training_log import EMA_DECAY, write_training_log
from automedseg.training_options import FoldResult, TrainOptions, apply_overrides
from automedseg.training_step import make_optimizer, train_step
from automedseg.validation import (
    ValidationEstimate,
    final_validation_axes,
    pseudo_dice,
    validate_fold,
    validation_tiles,
)
from automedseg.workspace import Workspace

Log = Callable[[str], None]


_rng_state = capture_rng_state  # names kept for callers; see automedseg.rng
_set_rng_state = restore_rng_state


def _atomic_torch_save(obj: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_pretrained(model: torch.nn.Module, path: Path) -> tuple[int, int]:
    """Copy the tensors of a checkpoint whose name and shape match; returns (loaded, skipped)."""
    state = load_checkpoint(path)["model"]
    own = model.state_dict()
    ok = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    own.update(ok)
    model.load_state_dict(own)
    return len(ok), len(own) - len(ok)


def _poly_lr(initial: float, epoch: int, total: int, exponent: float) -> float:
    return initial * (1 - min(epoch, total) / max(total, 1)) ** exponent


# --- the loop -----------------------------------------------------------------------------------------


def train_fold(ws: Workspace, configuration: str, fold: int | str, *, options: TrainOptions | None = None,
               plans: Plans | None = None, log: Log = print,
               epoch_callback: Callable[[int, float], bool] | None = None) -> FoldResult:
    """Train (or resume) one fold; ``fold`` is 0..4 or ``"all"``.

    Args:
        ws: Work folder with plans.json and the preprocessed cache.
        configuration: Configuration name in the plan.
        fold: Fold index or ``"all"`` (train on every case).
        options: Run-time options and overrides.
        plans: Use this plan instead of ``ws.plans_path`` (the search passes trial variants).
        log: Where messages go.
        epoch_callback: Called as ``callback(epoch, ema_pseudo_dice)`` after each epoch; returning
            ``True`` stops training (used by the search's pruner).
    """
    run_started = time.perf_counter()
    options = options or TrainOptions()
    plans = plans or Plans.load(ws.plans_path)
    base_config = plans.configuration(configuration)
    fold_dir = Path(options.output_dir) if options.output_dir else ws.fold_dir(configuration, fold)
    if not options.restart:  # a checkpoint is never resumed, or called trained, under another plan
        from automedseg.trained import check_fold_matches

        check_fold_matches(plans, configuration, fold_dir)
    resume = (fold_dir / "checkpoint_latest.pt").is_file() and not options.restart
    if resume and (fold_dir / "plans.json").is_file():
        config = Plans.load(fold_dir / "plans.json").configuration(configuration)
        config = apply_overrides(config, options)
    else:
        config = apply_overrides(base_config, options)
    # Everything is checked before the fold folder is made or touched.
    cache = ws.preprocessed_dir(config.data_identifier)
    all_cases = complete_cases(cache, plans, config)
    if fold == "all":
        train_ids, val_ids = all_cases, all_cases
    else:
        splits = load_or_create_splits(ws, all_cases)
        if not str(fold).isdigit() or int(fold) >= len(splits):
            raise InputError(f"fold {fold}: {ws.splits_path} has folds 0-{len(splits) - 1} (or use 'all')")
        train_ids, val_ids = list(splits[int(fold)].train), list(splits[int(fold)].val)
    device = select_device(options.device)
    if device.type == "cpu":
        retain_freed_memory()  # large activations reused, not page-faulted in anew each step
    dist = Dist.start(device) if options.distributed else Dist()
    threads = options.threads or (plans.device.cpu_threads if plans.device.kind == "cpu" else None)
    layout = training_layout(config.training.worker_placement, device_type=device.type, threads=threads,
                             num_workers=config.training.num_workers, world=dist.world)
    # One trainer per fold folder (rank 0 of a distributed run holds it for all ranks).
    lock = folder_lock(fold_dir, purpose=f"train {configuration} fold {fold}") if dist.is_main else \
        contextlib.nullcontext()
    run_info = RunInfo(plans=plans, config=config, fold=fold, fold_dir=fold_dir, log=log)
    with lock, open_trackers(options.trackers, run_info, active=dist.is_main) as trackers, torch_threads(threads):
        for folder in (fold_dir, fold_dir / "validation"):
            remove_stale_temp_files(folder)
        if options.restart and dist.is_main:
            for p in fold_dir.glob("checkpoint_*.pt"):
                p.unlink()
            (fold_dir / "log.jsonl").unlink(missing_ok=True)
        return _train_locked(ws, plans, config, configuration, fold, fold_dir=fold_dir, resume=resume, cache=cache,
                             train_ids=train_ids, val_ids=val_ids, device=device, dist=dist, options=options, log=log,
                             epoch_callback=epoch_callback, run_started=run_started, trackers=trackers,
                             placement=layout)


def _train_locked(ws: Workspace, plans: Plans, config: ConfigurationPlan, configuration: str, fold: int | str, *,
                  fold_dir: Path, resume: bool, cache: Path, train_ids: Sequence[str], val_ids: Sequence[str],
                  device: torch.device, dist: Dist, options: TrainOptions, log: Log,
                  epoch_callback: Callable[[int, float], bool] | None, run_started: float,
                  trackers: TrackerSet, placement: PlacementLayout) -> FoldResult:
    """The body of :func:`train_fold` once the inputs are checked and the fold folder is locked."""
    latest = fold_dir / "checkpoint_latest.pt"
    final = fold_dir / "checkpoint_final.pt"
    tr = config.training
    torch.manual_seed(tr.seed)
    np.random.seed(tr.seed % 2**32)
    random.seed(tr.seed)

    n_classes = plans.num_classes
    model = build_network(config.network, in_channels=len(plans.channel_names), num_classes=n_classes,
                          dims=config.dims).to(device)
    if device.type == "cpu":
        model = model.to(memory_format=memory_format(config.dims))
    net = model  # the bare network: state dicts, deep-supervision switch, evaluation
    optimizer = make_optimizer(model.parameters(), tr)
    precision = precision_for(device, enabled=options.amp)
    on_device = use_device_augmentation(device, options.augment_on_device if options.augment_on_device is not None
                                        else config.training.augment_on_device)
    config = dataclasses.replace(config, training=dataclasses.replace(
        config.training, precision=precision, augment_on_device=on_device))
    scaler = torch.amp.GradScaler(device.type) if needs_grad_scaler(precision) else None
    strides = output_strides(config.network)
    loss_fn = DeepSupervisionLoss(len(strides), dice_weight=tr.dice_weight, ce_weight=tr.ce_weight,
                                  track_classes=True)

    progress = _Progress(epoch=0, planned_epochs=tr.epochs)
    if resume:
        ckpt = load_checkpoint(latest, device)
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        # An explicit --epochs wins; otherwise keep the schedule as the budget had shortened it.
        progress = _Progress(
            epoch=int(ckpt["epoch"]) + 1, history=json.loads(ckpt["history"]), best=float(ckpt["best"]),
            train_seconds=float(ckpt["train_seconds"]),
            planned_epochs=int(options.epochs) if options.epochs is not None else int(ckpt["planned_epochs"]))
        _set_rng_state(ckpt["rng"])
        log(f"resuming {fold_dir} at epoch {progress.epoch}")
    elif options.pretrained is not None:
        loaded, skipped = load_pretrained(model, options.pretrained)
        log(f"pretrained: {loaded} tensors loaded from {options.pretrained}, {skipped} left as initialised")
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # The lowest deep-supervision head has loss weight 0 (nnU-Net's scheme), so its parameters get no
        # gradient: DDP must be told to expect unused parameters.
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=True)
        log(f"rank {dist.rank}/{dist.world}: DistributedDataParallel on {device}")
    if dist.is_main:
        _save_plan_copy(plans, config, fold_dir, progress.planned_epochs)

    if progress.epoch >= progress.planned_epochs and final.is_file():
        log(f"{fold_dir}: already trained ({progress.planned_epochs} epochs)")
    else:
        run = _FoldRun(fold=fold, model=model, net=net, dist=dist, optimizer=optimizer, scaler=scaler, loss_fn=loss_fn,
                       config=config, plans=plans, device=device, cache=cache, train_ids=train_ids, val_ids=val_ids,
                       strides=strides, fold_dir=fold_dir, options=options, log=log, epoch_callback=epoch_callback,
                       run_started=run_started, trackers=trackers, placement=placement)
        if placement.placement == "own_core" or placement.note:  # (the plan asked for own_core)
            log(placement.describe())
        with trackers.stage("training", epochs_done=progress.epoch, epochs=progress.planned_epochs), placed(placement):
            _run_epochs(run, progress)  # (the process's threads and affinity are restored after the epochs)
        if dist.is_main:
            _save_plan_copy(plans, config, fold_dir, progress.planned_epochs)
    if dist.world > 1:
        same, checksum = dist.weights_identical(net)
        log(f"rank {dist.rank}: weights {'identical' if same else 'DIFFER'} across {dist.world} ranks "
            f"(checksum {checksum:.6f})")
    validation = None
    if options.validate and fold != "all" and dist.is_main:
        with trackers.stage("validation") as end:
            validation = validate_fold(ws, plans, config, fold_dir, val_ids, model=net, device=device, log=log,
                                       mirror_axes=_final_validation_axes(config, progress, len(val_ids)))
            end.update(mean_dice=validation["mean_dice"], dice_per_class=validation["dice_per_class"])
    dist.finish()
    return FoldResult(fold_dir, len(progress.history), progress.best, progress.train_seconds, validation)


def _save_plan_copy(plans: Plans, config: ConfigurationPlan, fold_dir: Path, epochs: int) -> None:
    used = dataclasses.replace(config, training=dataclasses.replace(config.training, epochs=max(1, epochs)))
    copy = dataclasses.replace(plans, configurations={config.name: used})
    copy.save(fold_dir / "plans.json")


@dataclass
class _FoldRun:
    """The fixed parts of one training run: what the epochs train, with what, on which cases, and where to."""

    fold: int | str
    model: torch.nn.Module  # what is trained (DistributedDataParallel around ``net`` in a distributed run)
    net: torch.nn.Module  # the bare network: state dicts, deep-supervision switch, evaluation
    dist: Dist
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    loss_fn: DeepSupervisionLoss
    config: ConfigurationPlan
    plans: Plans
    device: torch.device
    cache: Path
    train_ids: Sequence[str]
    val_ids: Sequence[str]
    strides: Sequence[Sequence[int]]
    fold_dir: Path
    options: TrainOptions
    log: Log
    epoch_callback: Callable[[int, float], bool] | None
    run_started: float
    trackers: TrackerSet  # what the epochs are reported to (automedseg.tracking)
    placement: PlacementLayout  # where the training threads and the augmentation worker run (thread_placement)


@dataclass
class _Progress:
    """Where a run stands: the next epoch, the planned count, the per-epoch history, best EMA and time spent."""

    epoch: int
    planned_epochs: int
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    best: float = -1.0
    train_seconds: float = 0.0
    validation: ValidationEstimate | None = None  # the final validation's estimate (this process)

    @property
    def validation_single_s(self) -> float | None:
        """Estimated final validation without mirroring (``None``: not estimated in this process)."""
        return None if self.validation is None else self.validation.seconds()


def _case_finish_seconds(run: _FoldRun, config: ConfigurationPlan) -> float:
    """:func:`~automedseg.validation.time_case_finish` on the first validation case (0.0 when it fails: the
    estimate then counts the network alone, as a run without the probe would)."""
    from automedseg.validation import time_case_finish

    try:
        return time_case_finish(run.cache, run.plans, config, run.val_ids[0], scratch=run.fold_dir)
    except (OSError, ValueError, MemoryError, InputError, AssertionError, AttributeError) as e:
        run.log(f"final-validation estimate: timing a case's restore/write/score failed ({e}); counting the "
                "network's time only")
        return 0.0


def _final_validation_axes(config: ConfigurationPlan, p: _Progress, n_val: int) -> tuple[int, ...]:
    return final_validation_axes(config, single_pass_s=p.validation_single_s, history=p.history,
                                 train_seconds=p.train_seconds, n_val=n_val,
                                 fixed_s=0.0 if p.validation is None else p.validation.fixed_s)


def _run_epochs(run: _FoldRun, p: _Progress) -> None:
    """Train epochs ``p.epoch`` .. ``p.planned_epochs - 1`` (the count refitted to the budget after every epoch),
    checkpointing each; ``p`` is updated as the epochs go (the history in place)."""
    model, net, dist, config, device, options = run.model, run.net, run.dist, run.config, run.device, run.options
    optimizer, scaler, cache, train_ids, val_ids, strides = (run.optimizer, run.scaler, run.cache, run.train_ids,
                                                             run.val_ids, run.strides)
    fold_dir, log, history = run.fold_dir, run.log, p.history
    tr = config.training
    seed = tr.seed + 1000 * p.epoch + 7919 * dist.rank  # resumed runs and other ranks draw fresh batches
    local = dataclasses.replace(config, batch_size=max(1, config.batch_size // dist.world))  # global batch split
    weights = class_weights_for(tr.class_sampling, run.plans.num_classes, history)
    if tr.augment_on_device:  # the workers only read windows; spatial and intensity transforms on the device
        train_loader = make_device_training_loader(cache, train_ids, local, device=device,
                                                   deep_supervision_strides=strides, seed=seed, class_weights=weights,
                                                   worker_niceness=10 if device.type == "cpu" else 0,
                                                   worker_cpus=run.placement.worker_cpus)
    else:
        train_loader = make_training_loader(cache, train_ids, local, deep_supervision_strides=strides, seed=seed,
                                            worker_niceness=10 if device.type == "cpu" else 0, class_weights=weights,
                                            worker_cpus=run.placement.worker_cpus)
    val_loader = make_validation_loader(cache, val_ids, local, deep_supervision_strides=strides[:1], seed=seed)
    # Whole validation images, about as many tiles an epoch as the patch pseudo-Dice has patches (all ranks).
    rotation = ImageRotation.from_cache(cache, val_ids, config, seed=tr.seed,
                                        tiles_per_epoch=tr.val_iterations * local.batch_size * dist.world)
    mf = memory_format(config.dims) if device.type == "cpu" else torch.contiguous_format
    ema = history[-1]["ema_pseudo_dice"] if history else None
    no_improve = 0
    spent_before, validation_estimate = p.train_seconds, None
    epoch_walls: list[float] = []
    last_mark = time.perf_counter()
    bar, planned_s = None, tr.estimated_seconds_per_iteration
    try:
        while p.epoch < p.planned_epochs:
            epoch = p.epoch
            t_epoch = time.perf_counter()
            if options.epoch_hook is not None:  # e.g. freezing parameters for part of the schedule (adapt)
                options.epoch_hook(epoch, p.planned_epochs, net)
            lr = _poly_lr(tr.initial_lr, epoch, p.planned_epochs, tr.poly_exponent) if options.lr_schedule is None \
                else options.lr_schedule(epoch, p.planned_epochs, tr.initial_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            model.train()
            net.deep_supervision = True
            train_loader.reset_timing()
            losses = []
            if options.progress and dist.is_main:
                from tqdm import tqdm

                bar = tqdm(total=tr.iterations_per_epoch, desc=f"epoch {epoch + 1}/{p.planned_epochs}",
                           dynamic_ncols=True, leave=False)
            iterations = tr.iterations_per_epoch
            if tr.time_budget_s is not None and not tr.fixed_epochs and epoch == p.planned_epochs - 1 and epoch_walls:
                # The last epoch's length lands the run in the middle of the budget's last 5 %.
                iterations = last_epoch_iterations(
                    iterations_per_epoch=iterations, seconds_per_iteration=history[-1]["seconds_per_iteration"],
                    epoch_wall_s=float(np.mean(epoch_walls[-3:])),
                    left_s=tr.time_budget_s * (1 - END_WINDOW / 2) - (validation_estimate or 0.0)
                    - (spent_before + time.perf_counter() - run.run_started))
            for it in range(iterations):
                losses.append(train_step(model, next(train_loader), optimizer=optimizer, loss_fn=run.loss_fn,
                                         device=device, scaler=scaler, amp=options.amp,
                                         grad_clip_norm=tr.grad_clip_norm))
                if bar is not None:
                    el = time.perf_counter() - t_epoch
                    spi = el / (it + 1)
                    remaining = spi * (tr.iterations_per_epoch - it - 1 + tr.iterations_per_epoch
                                       * (p.planned_epochs - epoch - 1))
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", s_it=f"{spi:.2f}",
                                    eta=f"{remaining / 60:.1f}m",
                                    dice=f"{ema:.3f}" if ema is not None else "-")
                    bar.update()
            train_time = time.perf_counter() - t_epoch
            iterations = max(1, len(losses))
            class_dice, sampling = update_class_weights(weights, run.loss_fn.take_class_dice())
            wait = train_loader.wait_seconds
            val_loss, patch_dice = pseudo_dice(net, val_loader, tr.val_iterations, device, mf,
                                               options.amp, run.plans.num_classes, dist)
            patch_seconds = time.perf_counter() - t_epoch - train_time
            images = rotation.for_epoch(epoch)
            full = score_images(net, cache, images, local, num_classes=run.plans.num_classes,
                                device=device, amp=options.amp, dist=dist)
            mean_dice = full.mean  # whole images steer the EMA (best checkpoint, early stop); None: none scored
            if mean_dice is not None:
                ema = mean_dice if ema is None else EMA_DECAY * ema + (1 - EMA_DECAY) * mean_dice
            epoch_time = time.perf_counter() - t_epoch
            p.train_seconds += epoch_time
            entry = {
                "epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss,
                "pseudo_dice": full.dice, "mean_pseudo_dice": mean_dice, "ema_pseudo_dice": ema, "lr": lr,
                "patch_pseudo_dice": patch_dice, "pseudo_dice_images": full.images,
                "mean_patch_pseudo_dice": float(np.nanmean(patch_dice)) if len(patch_dice) else 0.0,
                "pseudo_dice_seconds": full.seconds, "train_soft_dice": class_dice, "class_weights": sampling,
                "epoch_seconds": epoch_time, "seconds_per_iteration": train_time / iterations,
                "data_wait_fraction": wait / max(train_time, 1e-9), "iterations": iterations,
                "planned_epochs": p.planned_epochs, "time": time.time(),
                "planned_seconds_per_iteration": tr.estimated_seconds_per_iteration,
            }
            history.append(entry)
            improved = ema is not None and ema > p.best
            if improved:
                p.best = ema
                no_improve = 0
            else:
                no_improve += 1
            # Fit the rest of the schedule into the time budget, now that an epoch has been measured: the run
            # (start-up and final validation included) ends in the last 5 % of its budget.
            if options.validate and val_ids is not train_ids and val_ids:
                if p.validation is None:
                    t_probe = time.perf_counter()
                    p.validation = ValidationEstimate(
                        tiles=validation_tiles(cache, val_ids, config.patch_size), cases=len(val_ids),
                        finish_s_per_case=_case_finish_seconds(run, config) if dist.is_main else 0.0)
                    last_mark += time.perf_counter() - t_probe  # not part of the epoch's time
                p.validation.observe_patches(patch_seconds / max(1, tr.val_iterations * local.batch_size))
                scored = images[dist.rank::dist.world]
                p.validation.observe_whole_images(full.seconds, sum(max(1, i.tiles) for i in scored))
            if tr.time_budget_s is not None:
                if p.validation is not None:
                    # the forward passes multiply with the mirrors, not the resampling, writing and scoring
                    validation_estimate = p.validation.seconds(2 ** len(_final_validation_axes(config, p,
                                                                                               len(val_ids))))
                now = time.perf_counter()
                epoch_walls.append(now - last_mark)  # the epoch with its checkpoint and plot
                last_mark = now
                p.planned_epochs = dist.min_int(budget_epochs(
                    done=epoch + 1, ceiling=tr.epochs, epoch_seconds=epoch_walls,
                    budget_s=tr.time_budget_s, spent_s=spent_before + now - run.run_started,
                    fixed_epochs=tr.fixed_epochs, reserve_s=validation_estimate or 0.0))
            state = {
                "model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "planned_epochs": p.planned_epochs, "best": p.best, "train_seconds": p.train_seconds,
                "history": json.dumps(history), "rng": _rng_state(), "configuration": config.name,
            }
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            if dist.is_main:
                _atomic_torch_save(state, fold_dir / "checkpoint_latest.pt")
                if improved:
                    _atomic_torch_save({"model": net.state_dict(), "epoch": epoch, "ema_pseudo_dice": ema},
                                       fold_dir / "checkpoint_best.pt")
                write_training_log(fold_dir / "log.jsonl", history)
                plot_progress(history, fold_dir / "progress.png", title=progress_title(
                    dataset=run.plans.dataset_name, configuration=config.name, fold=run.fold))
            run.trackers.on_epoch(entry)
            if bar is not None:
                bar.close()
                bar = None
            log(f"epoch {epoch + 1}/{p.planned_epochs}: loss {entry['train_loss']:.4f}, pseudo-Dice {full.describe()} "
                f"(EMA {'-' if ema is None else f'{ema:.3f}'}; patches {entry['mean_patch_pseudo_dice']:.3f}), "
                f"{epoch_time:.1f} s, {entry['seconds_per_iteration']:.3f} s/it, data wait "
                f"{100 * entry['data_wait_fraction']:.0f}%{step_ratio_note(planned_s, entry['seconds_per_iteration'])}")
            planned_s = None  # the planned step beside the measured one: in the first epoch's line only
            stop = False
            if run.epoch_callback is not None and run.epoch_callback(epoch, math.nan if ema is None else ema):
                log("stopped by the epoch callback (pruned)")
                stop = True
            if options.early_stopping_patience and no_improve >= options.early_stopping_patience:
                log(f"early stopping: no better EMA pseudo-Dice for {no_improve} epochs")
                stop = True
            p.epoch = epoch = epoch + 1
            if stop:
                p.planned_epochs = epoch
                break
        if dist.is_main:
            _atomic_torch_save({"model": net.state_dict(), "epoch": p.epoch - 1, "planned_epochs": p.planned_epochs},
                               fold_dir / "checkpoint_final.pt")
        if dist.is_main and (fold_dir / "checkpoint_latest.pt").is_file():
            ck = load_checkpoint(fold_dir / "checkpoint_latest.pt")
            ck["planned_epochs"] = p.planned_epochs
            _atomic_torch_save(ck, fold_dir / "checkpoint_latest.pt")
    finally:
        if bar is not None:
            bar.close()
        train_loader.close()
        val_loader.close()

