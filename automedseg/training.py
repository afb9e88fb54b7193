"""Training one fold of a k-fold cross-validation from the plan and the preprocessed cache.

Composition, not a trainer class hierarchy: :func:`train_fold` wires a network (:mod:`network`), batches
(:mod:`augmentation`), a loss (:class:`DeepSupervisionLoss`), SGD or AdamW with poly decay, and
per-epoch checkpoints. Variants are plan fields or :class:`TrainOptions`, not subclasses.

Fold folder (``<work>/<configuration>/fold_K/``)::

    plans.json              the plan as trained (schedule and overrides actually used)
    checkpoint_latest.pt    every epoch, atomic; resume point
    checkpoint_best.pt      best EMA pseudo-Dice
    checkpoint_final.pt     after the last epoch
    log.jsonl               one JSON object per epoch
    progress.png            loss, pseudo-Dice, learning rate, epoch time
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
import torch.nn.functional as F

from automedseg.atomic import remove_stale_temp_files
from automedseg.augmentation import make_training_loader, make_validation_loader
from automedseg.device_batches import make_device_training_loader, use_device_augmentation
from automedseg.errors import InputError
from automedseg.inference import (
    LoadedFold,
    autocast_context,
    load_checkpoint,
    memory_format,
    needs_grad_scaler,
    precision_for,
    predict_probabilities_preprocessed,
    select_device,
)
from automedseg.io import atomic_save_figure, atomic_write, atomic_write_text
from automedseg.locks import folder_lock
from automedseg.network import build_network, output_strides
from automedseg.planning import END_WINDOW, budget_epochs, last_epoch_iterations, schedule_for_budget
from automedseg.plans import ConfigurationPlan, Plans
from automedseg.preprocessing import complete_cases
from automedseg.rng import capture_rng_state, restore_rng_state
from automedseg.splits import load_or_create_splits
from automedseg.workspace import Workspace

Log = Callable[[str], None]


# --- splits -----------------------------------------------------------------------------------------


# --- loss -------------------------------------------------------------------------------------------


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over foreground classes, computed over the whole batch (batch Dice)."""
    probs = torch.softmax(logits.float(), 1)
    onehot = torch.zeros_like(probs).scatter_(1, target.long(), 1.0)
    axes = (0, *range(2, probs.ndim))
    inter = (probs * onehot).sum(axes)[1:]
    denom = probs.sum(axes)[1:] + onehot.sum(axes)[1:]
    dice = (2 * inter + smooth) / (denom + smooth).clamp_min(1e-8)
    return 1 - dice.mean()


@dataclass
class DeepSupervisionLoss:
    """Soft Dice + cross-entropy at every output, weighted 1, 1/2, 1/4 ... (lowest level dropped), normalised."""

    n_outputs: int
    dice_weight: float = 1.0
    ce_weight: float = 1.0

    def __post_init__(self) -> None:
        w = np.array([1 / 2**i for i in range(self.n_outputs)])
        if self.n_outputs > 1:
            w[-1] = 0
        self.weights = (w / w.sum()).tolist()

    def __call__(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out, tgt in zip(self.weights, outputs, targets):
            if w == 0:
                continue
            loss = self.dice_weight * soft_dice_loss(out, tgt)
            if self.ce_weight:
                loss = loss + self.ce_weight * F.cross_entropy(out.float(), tgt[:, 0].long())
            total = total + w * loss
        return total


# --- options and state --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainOptions:
    """Run-time choices that are not part of the plan (overrides are recorded in the fold's plan copy).

    Attributes:
        device: ``cpu``, ``cuda``, ``mps`` or ``None`` (what exists).
        epochs: Override the plan's number of epochs.
        iterations_per_epoch: Override the plan's iterations per epoch.
        time_budget_s: Wall-clock training budget; the number of epochs is refitted to it after every epoch
            (:func:`~automedseg.planning.budget_epochs`: shortened or extended so that the run, start-up and
            final validation included, ends in the last 5 % of the budget).
        restart: Ignore an existing checkpoint and start again.
        pretrained: Checkpoint to initialise from (matching layers only).
        early_stopping_patience: Stop after this many epochs without a new best EMA pseudo-Dice.
        threads: Torch CPU threads (default: the plan's device profile).
        num_workers: Override augmentation worker processes (0: in-process).
        amp: Mixed precision as :func:`~automedseg.inference.precision_for` decides (bf16 on CPUs with native
            bf16 and on CUDA GPUs of compute capability 8.0 or newer, fp16 with a gradient scaler on older
            GPUs, fp32 elsewhere); ``False``: fp32. The choice is recorded in the fold's plan copy.
        validate: Run the final sliding-window validation of the held-out cases.
        progress: Show a progress bar.
        output_dir: Write the fold here instead of ``<work>/<configuration>/fold_K`` (search trials).
        distributed: Join the process group set up by ``torchrun`` (DistributedDataParallel; gloo on CPU,
            NCCL on CUDA). The global batch is split over the ranks; only rank 0 writes files.
        augment_on_device: Augment batched on the training device, the CPU workers only reading windows
            (:mod:`automedseg.device_batches`); ``None``: the plan's ``augment_on_device``, else on CUDA only.
    """

    device: str | None = None
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    time_budget_s: float | None = None
    restart: bool = False
    pretrained: Path | None = None
    early_stopping_patience: int | None = None
    threads: int | None = None
    num_workers: int | None = None
    amp: bool = True
    validate: bool = True
    progress: bool = True
    output_dir: Path | None = None
    distributed: bool = False
    augment_on_device: bool | None = None


@dataclass
class FoldResult:
    """What a finished (or resumed-and-finished) fold reports."""

    fold_dir: Path
    epochs_run: int
    best_ema_dice: float
    train_seconds: float
    validation: dict[str, Any] | None


_rng_state = capture_rng_state  # names kept for callers; see automedseg.rng
_set_rng_state = restore_rng_state


def _atomic_torch_save(obj: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def apply_overrides(config: ConfigurationPlan, options: TrainOptions) -> ConfigurationPlan:
    """The configuration with the CLI's schedule overrides applied.

    An explicit ``epochs`` or ``iterations_per_epoch`` without an explicit budget drops the plan's budget,
    so the schedule is trained as given. A budget alone refits the schedule to it with the plan's step estimate
    by the planner's rule (:func:`~automedseg.planning.schedule_for_budget`), keeping the epochs of a plan
    with ``fixed_epochs`` (a search trial).
    """
    tr = config.training
    changes: dict[str, Any] = {}
    if options.epochs is not None:
        changes["epochs"] = int(options.epochs)
    if options.iterations_per_epoch is not None:
        changes["iterations_per_epoch"] = int(options.iterations_per_epoch)
    if options.time_budget_s is not None:
        changes["time_budget_s"] = float(options.time_budget_s)
        step_s = tr.estimated_seconds_per_iteration
        if options.iterations_per_epoch is None and options.epochs is None and step_s:
            # Another budget than the plan's: refit the schedule with the plan's step estimate (the trainer
            # then corrects it with measured epoch times).
            sched = schedule_for_budget(step_s, options.time_budget_s,
                                        fixed_epochs=tr.epochs if tr.fixed_epochs else None)
            changes.update(epochs=sched.epochs, iterations_per_epoch=sched.iterations_per_epoch,
                           val_iterations=sched.val_iterations)
    elif options.epochs is not None or options.iterations_per_epoch is not None:
        changes["time_budget_s"] = None  # an explicit schedule is trained as given, not cut to the plan's budget
    if options.num_workers is not None:
        changes["num_workers"] = int(options.num_workers)
    if not changes:
        return config
    return dataclasses.replace(config, training=dataclasses.replace(tr, **changes))


def load_pretrained(model: torch.nn.Module, path: Path) -> tuple[int, int]:
    """Copy the tensors of a checkpoint whose name and shape match; returns (loaded, skipped)."""
    state = load_checkpoint(path)["model"]
    own = model.state_dict()
    ok = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    own.update(ok)
    model.load_state_dict(own)
    return len(ok), len(own) - len(ok)


def _on_device(a: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch array (numpy from the CPU workers, or a tensor already augmented on the device) on ``device``."""
    return (a if isinstance(a, torch.Tensor) else torch.from_numpy(a)).to(device, non_blocking=True)


def train_step(model: torch.nn.Module, batch: dict[str, Any], *, optimizer: torch.optim.Optimizer,
               loss_fn: DeepSupervisionLoss, device: torch.device, scaler: torch.amp.GradScaler | None = None,
               amp: bool = True, grad_clip_norm: float = 12.0) -> float:
    """One optimisation step on a batch from the training loader; returns the loss.

    Mixed precision as :func:`~automedseg.inference.precision_for` decides (a ``scaler`` for fp16 only),
    channels-last inputs on CPU, gradient-norm clipping.
    """
    mf = memory_format(batch["data"].ndim - 2) if device.type == "cpu" else torch.contiguous_format
    x = _on_device(batch["data"], device).contiguous(memory_format=mf)
    targets = [_on_device(t, device) for t in batch["target"]]
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(device, amp):
        outputs = model(x)
    loss = loss_fn(outputs, targets)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimizer.step()
    return float(loss.detach())


def estimate_validation_seconds(cache: Path, case_ids: Sequence[str], patch_size: Sequence[int], *,
                                seconds_per_patch: float, step: float = 0.5, overhead: float = 1.5) -> float:
    """Wall time of the final sliding-window validation of ``case_ids``, from the cached image shapes.

    Tiles per case as :func:`~automedseg.inference.predict_preprocessed` lays them (step ``step`` of the
    patch), times the measured forward time of one patch, times ``overhead`` for resampling, writing and
    scoring.
    """
    tiles = 0
    dims = len(patch_size)
    for cid in case_ids:
        shape = np.load(Path(cache) / f"{cid}.npy", mmap_mode="r").shape[1:]
        n = math.prod(max(1, math.ceil((s - p) / (p * step)) + 1) for s, p in zip(shape[-dims:], patch_size))
        tiles += n * (shape[0] if dims == 2 else 1)
    return float(tiles * seconds_per_patch * overhead)


def _poly_lr(initial: float, epoch: int, total: int, exponent: float) -> float:
    return initial * (1 - min(epoch, total) / max(total, 1)) ** exponent


# --- the loop -----------------------------------------------------------------------------------------


@dataclass
class _Dist:
    """Rank bookkeeping; a single process is rank 0 of 1 and every collective is a no-op."""

    rank: int = 0
    world: int = 1

    @classmethod
    def start(cls, device: torch.device) -> _Dist:
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group("nccl" if device.type == "cuda" else "gloo")  # env:// set by torchrun
        return cls(td.get_rank(), td.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: np.ndarray) -> np.ndarray:
        if self.world == 1:
            return values
        import torch.distributed as td

        t = torch.tensor(values, dtype=torch.float64)
        td.all_reduce(t)
        return t.numpy()

    def min_int(self, value: int) -> int:
        if self.world == 1:
            return value
        import torch.distributed as td

        t = torch.tensor([value], dtype=torch.int64)
        td.all_reduce(t, op=td.ReduceOp.MIN)
        return int(t.item())

    def weights_identical(self, model: torch.nn.Module) -> tuple[bool, float]:
        """Whether every rank holds the same weights (a checksum compared across ranks)."""
        with torch.no_grad():
            s = float(sum(p.detach().double().sum() + (p.detach().double() ** 2).sum() for p in model.parameters()))
        if self.world == 1:
            return True, s
        import torch.distributed as td

        gathered: list[Any] = [None] * self.world
        td.all_gather_object(gathered, s)
        return all(g == gathered[0] for g in gathered), s

    def finish(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()
            td.destroy_process_group()



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
        train_ids, val_ids = splits[int(fold)]["train"], splits[int(fold)]["val"]
    device = select_device(options.device)
    dist = _Dist.start(device) if options.distributed else _Dist()
    # One trainer per fold folder (rank 0 of a distributed run holds it for all ranks).
    lock = folder_lock(fold_dir, purpose=f"train {configuration} fold {fold}") if dist.is_main else \
        contextlib.nullcontext()
    with lock:
        for folder in (fold_dir, fold_dir / "validation"):
            remove_stale_temp_files(folder)
        if options.restart and dist.is_main:
            for p in fold_dir.glob("checkpoint_*.pt"):
                p.unlink()
            (fold_dir / "log.jsonl").unlink(missing_ok=True)
        return _train_locked(ws, plans, config, configuration, fold, fold_dir=fold_dir, resume=resume, cache=cache,
                             train_ids=train_ids, val_ids=val_ids, device=device, dist=dist, options=options, log=log,
                             epoch_callback=epoch_callback, run_started=run_started)


def _train_locked(ws: Workspace, plans: Plans, config: ConfigurationPlan, configuration: str, fold: int | str, *,
                  fold_dir: Path, resume: bool, cache: Path, train_ids: Sequence[str], val_ids: Sequence[str],
                  device: torch.device, dist: _Dist, options: TrainOptions, log: Log,
                  epoch_callback: Callable[[int, float], bool] | None, run_started: float) -> FoldResult:
    """The body of :func:`train_fold` once the inputs are checked and the fold folder is locked."""
    latest = fold_dir / "checkpoint_latest.pt"
    final = fold_dir / "checkpoint_final.pt"
    tr = config.training
    threads = options.threads or (plans.device.cpu_threads if plans.device.kind == "cpu" else None)
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(tr.seed)
    np.random.seed(tr.seed % 2**32)
    random.seed(tr.seed)

    n_classes = plans.num_classes
    model = build_network(config.network, in_channels=len(plans.channel_names), num_classes=n_classes,
                          dims=config.dims).to(device)
    if device.type == "cpu":
        model = model.to(memory_format=memory_format(config.dims))
    net = model  # the bare network: state dicts, deep-supervision switch, evaluation
    if tr.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=tr.initial_lr, momentum=tr.momentum,
                                                           nesterov=True, weight_decay=tr.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=tr.initial_lr, weight_decay=tr.weight_decay)
    precision = precision_for(device, enabled=options.amp)
    on_device = use_device_augmentation(device, options.augment_on_device if options.augment_on_device is not None
                                        else config.training.augment_on_device)
    config = dataclasses.replace(config, training=dataclasses.replace(
        config.training, precision=precision, augment_on_device=on_device))
    scaler = torch.amp.GradScaler(device.type) if needs_grad_scaler(precision) else None
    strides = output_strides(config.network)
    loss_fn = DeepSupervisionLoss(len(strides), dice_weight=tr.dice_weight, ce_weight=tr.ce_weight)

    start_epoch, history, best, train_seconds = 0, [], -1.0, 0.0
    planned_epochs = tr.epochs
    if resume:
        ckpt = load_checkpoint(latest, device)
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = int(ckpt["epoch"]) + 1
        history = json.loads(ckpt["history"])
        best = float(ckpt["best"])
        train_seconds = float(ckpt["train_seconds"])
        # An explicit --epochs wins; otherwise keep the schedule as the budget had shortened it.
        planned_epochs = int(options.epochs) if options.epochs is not None else int(ckpt["planned_epochs"])
        _set_rng_state(ckpt["rng"])
        log(f"resuming {fold_dir} at epoch {start_epoch}")
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
        _save_plan_copy(plans, config, fold_dir, planned_epochs)

    if start_epoch >= planned_epochs and final.is_file():
        log(f"{fold_dir}: already trained ({planned_epochs} epochs)")
    else:
        best, train_seconds, planned_epochs, history = _run_epochs(
            model=model, net=net, dist=dist, optimizer=optimizer, scaler=scaler, loss_fn=loss_fn, config=config,
            plans=plans,
            device=device, cache=cache, train_ids=train_ids, val_ids=val_ids, strides=strides,
            fold_dir=fold_dir, start_epoch=start_epoch, planned_epochs=planned_epochs, history=history,
            best=best, train_seconds=train_seconds, options=options, log=log, epoch_callback=epoch_callback,
            run_started=run_started,
        )
        if dist.is_main:
            _save_plan_copy(plans, config, fold_dir, planned_epochs)
    if dist.world > 1:
        same, checksum = dist.weights_identical(net)
        log(f"rank {dist.rank}: weights {'identical' if same else 'DIFFER'} across {dist.world} ranks "
            f"(checksum {checksum:.6f})")
    validation = None
    if options.validate and fold != "all" and dist.is_main:
        validation = validate_fold(ws, plans, config, fold_dir, val_ids, model=net, device=device, log=log)
    dist.finish()
    return FoldResult(fold_dir, len(history), best, train_seconds, validation)


def _save_plan_copy(plans: Plans, config: ConfigurationPlan, fold_dir: Path, epochs: int) -> None:
    used = dataclasses.replace(config, training=dataclasses.replace(config.training, epochs=max(1, epochs)))
    copy = dataclasses.replace(plans, configurations={config.name: used})
    copy.save(fold_dir / "plans.json")


def _run_epochs(*, model, net, dist: _Dist, optimizer, scaler, loss_fn, config: ConfigurationPlan, plans: Plans, device,
                cache: Path, train_ids, val_ids, strides, fold_dir: Path, start_epoch: int, planned_epochs: int,
                history: list, best: float, train_seconds: float, options: TrainOptions, log: Log,
                epoch_callback, run_started: float) -> tuple[float, float, int, list]:
    tr = config.training
    seed = tr.seed + 1000 * start_epoch + 7919 * dist.rank  # resumed runs and other ranks draw fresh batches
    local = dataclasses.replace(config, batch_size=max(1, config.batch_size // dist.world))  # global batch split
    if tr.augment_on_device:  # the workers only read windows; spatial and intensity transforms on the device
        train_loader = make_device_training_loader(cache, train_ids, local, device=device,
                                                   deep_supervision_strides=strides, seed=seed,
                                                   worker_niceness=10 if device.type == "cpu" else 0)
    else:
        train_loader = make_training_loader(cache, train_ids, local, deep_supervision_strides=strides, seed=seed,
                                            worker_niceness=10 if device.type == "cpu" else 0)
    val_loader = make_validation_loader(cache, val_ids, local, deep_supervision_strides=strides[:1], seed=seed)
    mf = memory_format(config.dims) if device.type == "cpu" else torch.contiguous_format
    ema = history[-1]["ema_pseudo_dice"] if history else None
    no_improve = 0
    spent_before, validation_estimate = train_seconds, None
    epoch_walls: list[float] = []
    last_mark = time.perf_counter()
    bar = None
    try:
        epoch = start_epoch
        while epoch < planned_epochs:
            t_epoch = time.perf_counter()
            lr = _poly_lr(tr.initial_lr, epoch, planned_epochs, tr.poly_exponent)
            for g in optimizer.param_groups:
                g["lr"] = lr
            model.train()
            net.deep_supervision = True
            train_loader.reset_timing()
            losses = []
            if options.progress and dist.is_main:
                from tqdm import tqdm

                bar = tqdm(total=tr.iterations_per_epoch, desc=f"epoch {epoch + 1}/{planned_epochs}",
                           dynamic_ncols=True, leave=False)
            iterations = tr.iterations_per_epoch
            if tr.time_budget_s is not None and not tr.fixed_epochs and epoch == planned_epochs - 1 and epoch_walls:
                # The last epoch's length lands the run in the middle of the budget's last 5 %.
                iterations = last_epoch_iterations(
                    iterations_per_epoch=iterations, seconds_per_iteration=history[-1]["seconds_per_iteration"],
                    epoch_wall_s=float(np.mean(epoch_walls[-3:])),
                    left_s=tr.time_budget_s * (1 - END_WINDOW / 2) - (validation_estimate or 0.0)
                    - (spent_before + time.perf_counter() - run_started))
            for it in range(iterations):
                losses.append(train_step(model, next(train_loader), optimizer=optimizer, loss_fn=loss_fn,
                                         device=device, scaler=scaler, amp=options.amp,
                                         grad_clip_norm=tr.grad_clip_norm))
                if bar is not None:
                    el = time.perf_counter() - t_epoch
                    spi = el / (it + 1)
                    remaining = spi * (tr.iterations_per_epoch - it - 1 + tr.iterations_per_epoch
                                       * (planned_epochs - epoch - 1))
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", s_it=f"{spi:.2f}",
                                    eta=f"{remaining / 60:.1f}m",
                                    dice=f"{ema:.3f}" if ema is not None else "-")
                    bar.update()
            train_time = time.perf_counter() - t_epoch
            iterations = max(1, len(losses))
            wait = train_loader.wait_seconds
            val_loss, dice_per_class = _pseudo_dice(net, val_loader, tr.val_iterations, device, mf,
                                                    options.amp, plans.num_classes, dist)
            mean_dice = float(np.nanmean(dice_per_class)) if len(dice_per_class) else 0.0
            ema = mean_dice if ema is None else 0.9 * ema + 0.1 * mean_dice
            epoch_time = time.perf_counter() - t_epoch
            train_seconds += epoch_time
            entry = {
                "epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss,
                "pseudo_dice": dice_per_class, "mean_pseudo_dice": mean_dice, "ema_pseudo_dice": ema, "lr": lr,
                "epoch_seconds": epoch_time, "seconds_per_iteration": train_time / iterations,
                "data_wait_fraction": wait / max(train_time, 1e-9), "iterations": iterations,
                "planned_epochs": planned_epochs, "time": time.time(),
            }
            history.append(entry)
            improved = ema > best
            if improved:
                best = ema
                no_improve = 0
            else:
                no_improve += 1
            # Fit the rest of the schedule into the time budget, now that an epoch has been measured: the run
            # (start-up and final validation included) ends in the last 5 % of its budget.
            if tr.time_budget_s is not None:
                if validation_estimate is None and options.validate and val_ids is not train_ids:
                    per_patch = (epoch_time - train_time) / max(1, tr.val_iterations * local.batch_size)
                    validation_estimate = estimate_validation_seconds(cache, val_ids, config.patch_size,
                                                                      seconds_per_patch=per_patch)
                now = time.perf_counter()
                epoch_walls.append(now - last_mark)  # the epoch with its checkpoint and plot
                last_mark = now
                planned_epochs = dist.min_int(budget_epochs(
                    done=epoch + 1, ceiling=tr.epochs, epoch_seconds=epoch_walls,
                    budget_s=tr.time_budget_s, spent_s=spent_before + now - run_started,
                    fixed_epochs=tr.fixed_epochs, reserve_s=validation_estimate or 0.0))
            state = {
                "model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "planned_epochs": planned_epochs, "best": best, "train_seconds": train_seconds,
                "history": json.dumps(history), "rng": _rng_state(), "configuration": config.name,
            }
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            if dist.is_main:
                _atomic_torch_save(state, fold_dir / "checkpoint_latest.pt")
                if improved:
                    _atomic_torch_save({"model": net.state_dict(), "epoch": epoch, "ema_pseudo_dice": ema},
                                       fold_dir / "checkpoint_best.pt")
                atomic_write_text(fold_dir / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
                plot_progress(history, fold_dir / "progress.png")
            if bar is not None:
                bar.close()
                bar = None
            log(f"epoch {epoch + 1}/{planned_epochs}: loss {entry['train_loss']:.4f}, pseudo-Dice "
                f"{' '.join(f'{d:.3f}' for d in dice_per_class)} (EMA {ema:.3f}), {epoch_time:.1f} s, "
                f"{entry['seconds_per_iteration']:.3f} s/it, data wait {100 * entry['data_wait_fraction']:.0f}%")
            stop = False
            if epoch_callback is not None and epoch_callback(epoch, ema):
                log("stopped by the epoch callback (pruned)")
                stop = True
            if options.early_stopping_patience and no_improve >= options.early_stopping_patience:
                log(f"early stopping: no better EMA pseudo-Dice for {no_improve} epochs")
                stop = True
            epoch += 1
            if stop:
                planned_epochs = epoch
                break
        if dist.is_main:
            _atomic_torch_save({"model": net.state_dict(), "epoch": epoch - 1, "planned_epochs": planned_epochs},
                               fold_dir / "checkpoint_final.pt")
        if dist.is_main and (fold_dir / "checkpoint_latest.pt").is_file():
            ck = load_checkpoint(fold_dir / "checkpoint_latest.pt")
            ck["planned_epochs"] = planned_epochs
            _atomic_torch_save(ck, fold_dir / "checkpoint_latest.pt")
    finally:
        if bar is not None:
            bar.close()
        train_loader.close()
        val_loader.close()
    return best, train_seconds, planned_epochs, history


@torch.inference_mode()
def _pseudo_dice(model, loader, n_batches: int, device, mf, amp: bool, num_classes: int, dist: _Dist
                 ) -> tuple[float, list[float]]:
    """Validation loss and per-foreground-class Dice accumulated over ``n_batches`` patches (and all ranks)."""
    model.eval()
    model.deep_supervision = False
    tp = np.zeros(num_classes - 1)
    fp = np.zeros(num_classes - 1)
    fn = np.zeros(num_classes - 1)
    losses = []
    for _ in range(n_batches):
        batch = next(loader)
        x = torch.from_numpy(batch["data"]).to(device).contiguous(memory_format=mf)
        y = torch.from_numpy(batch["target"][0]).to(device).long()
        with autocast_context(device, amp):
            out = model(x)
        out = out.float()
        losses.append(float(F.cross_entropy(out, y[:, 0])))
        pred = out.argmax(1)
        for k in range(1, num_classes):
            p, t = pred == k, y[:, 0] == k
            tp[k - 1] += float((p & t).sum())
            fp[k - 1] += float((p & ~t).sum())
            fn[k - 1] += float((~p & t).sum())
    model.deep_supervision = True
    tp, fp, fn = np.split(dist.sum(np.concatenate([tp, fp, fn])), 3)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    return float(np.mean(losses)) if losses else float("nan"), [float(d) for d in dice]


def plot_progress(history: list[dict[str, Any]], path: Path) -> None:
    """Training curves (loss, pseudo-Dice, learning rate, epoch time) as one PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] + 1 for h in history]
    fig, axes = plt.subplots(4, 1, figsize=(8, 11), sharex=True)
    axes[0].plot(ep, [h["train_loss"] for h in history], label="train loss")
    axes[0].plot(ep, [h["val_loss"] for h in history], label="val CE")
    axes[0].legend()
    axes[0].set_ylabel("loss")
    axes[1].plot(ep, [h["mean_pseudo_dice"] for h in history], label="pseudo-Dice")
    axes[1].plot(ep, [h["ema_pseudo_dice"] for h in history], label="EMA")
    axes[1].set_ylabel("Dice")
    axes[1].legend()
    axes[2].plot(ep, [h["lr"] for h in history])
    axes[2].set_ylabel("learning rate")
    axes[3].plot(ep, [h["epoch_seconds"] for h in history])
    axes[3].set_ylabel("epoch time (s)")
    axes[3].set_xlabel("epoch")
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=80)


# --- final validation -----------------------------------------------------------------------------------


def validate_fold(ws: Workspace, plans: Plans, config: ConfigurationPlan, fold_dir: Path, val_ids: Sequence[str],
                  *, model: torch.nn.Module, device: torch.device, log: Log = print,
                  step: float = 0.5, mirror: bool = False) -> dict[str, Any]:
    """Sliding-window prediction of the held-out cases at original resolution.

    Writes ``validation/<case>.npz`` (float16 probabilities, compressed; channel ``k`` is training index
    ``k``, i.e. the ``k``-th smallest declared label value), ``validation/<case>.nii.gz`` (the argmax
    mapped back to the declared label values) and ``validation/summary.json`` (per-case, per-class Dice
    and the mean, keyed by declared value), which the post-processing and ensemble choices read.
    """
    from automedseg.io import Geometry, atomic_save_npz, read_label, write_segmentation
    from automedseg.metrics import compute_case_metrics, summarize
    from automedseg.preprocessing import load_case_properties, restore_probabilities
    from automedseg.validation_summary import write_validation_summary

    out_dir = fold_dir / "validation"
    out_dir.mkdir(exist_ok=True)
    model.eval()
    model.deep_supervision = False
    fold = LoadedFold(plans, config, model, fold_dir)
    cache = ws.preprocessed_dir(config.data_identifier)
    labels = sorted(v for v in plans.labels.values() if v > 0)
    per_case = []
    t0 = time.perf_counter()
    for cid in val_ids:
        props = load_case_properties(cache, cid)
        data = np.load(cache / f"{cid}.npy", mmap_mode="r")
        probs = predict_probabilities_preprocessed([fold], np.asarray(data), device=device, step=step,
                                                   mirror=mirror)
        probs = restore_probabilities(probs, props, plans, config)
        seg = plans.to_values(probs.argmax(0))  # training indices -> declared label values
        atomic_save_npz(out_dir / f"{cid}.npz", compressed=True, probabilities=probs.astype(np.float16))
        write_segmentation(seg, props.geometry, out_dir / f"{cid}.nii.gz")
        meta = json.loads((cache / f"{cid}.json").read_text())
        ref_path = meta.get("label_file")
        if ref_path and Path(ref_path).is_file():
            ref, _ = read_label(Path(ref_path))
        else:  # fall back to the cached label mapped back (exact when no resampling happened)
            ref = None
        if ref is None:
            continue
        geom = Geometry.from_dict(meta["geometry"])
        m = compute_case_metrics(ref, seg, labels=labels, spacing_mm=geom.spacing_zyx)
        per_case.append({"case": cid, "metrics": {str(k): v for k, v in m.items()}})
    summary = summarize([c["metrics"] for c in per_case]) if per_case else {}
    dice = {str(k): summary["per_label"][k]["dice"] for k in summary.get("per_label", {})} if summary else {}
    result = {
        "configuration": config.name,
        "fold": fold_dir.name,
        "cases": list(val_ids),
        "mean_dice": float(np.mean(list(dice.values()))) if dice else None,
        "dice_per_class": dice,
        "summary": _jsonable(summary),
        "per_case": _jsonable(per_case),
        "seconds": time.perf_counter() - t0,
    }
    write_validation_summary(out_dir / "summary.json", result)
    if result["mean_dice"] is not None:
        log(f"validation {fold_dir}: mean Dice {result['mean_dice']:.4f} "
            f"({', '.join(f'{k}: {v:.4f}' for k, v in dice.items())}) on {len(per_case)} cases")
    return result


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (np.floating, np.integer)):
        return _jsonable(obj.item())
    return obj
