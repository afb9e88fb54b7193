"""The sections of the report: each ``_section_*`` function builds one :class:`_Section` from a
:class:`~automedseg.report_state.WorkFolderState`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from automedseg.best_choice import CandidateScore
from automedseg.machine import machine_info
from automedseg.overlays import render_overlay
from automedseg.postprocessing import Postprocessing
from automedseg.report_render import (
    _Block,
    _Bullets,
    _compact,
    _dice_limits,
    _f,
    _Figure,
    _folds_text,
    _Heading,
    _label_title,
    _new_figure,
    _png,
    _rgb_png,
    _seconds,
    _Section,
    _slug,
    _Table,
    _Text,
)
from automedseg.report_state import (
    FIGURE_PREFIX,
    KEY_PLAN_FIELDS,
    ConfigurationRecord,
    FoldRecord,
    WorkFolderState,
    _case_dice,
    _cv_cases,
    _cv_summary,
    _finite_mean,
    _number,
    plan_fields,
)
from automedseg.workspace import Workspace

# --- sections -----------------------------------------------------------------------------------------


def _section_overview(state: WorkFolderState) -> _Section:
    blocks: list[_Block] = []
    plans = state.plans
    rows = [
        ["Dataset", state.dataset_name],
        ["Work folder", str(state.root)],
        ["Generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")],
    ]
    if plans is not None:
        rows.append(["Input channels", ", ".join(plans.channel_names) or "-"])
        rows.append(["Labels", ", ".join(_label_title(k, state) for k in state.labels) or "-"])
    rows.append(["Configurations", ", ".join(state.configurations) or "-"])
    for name, record in state.configurations.items():
        validated = [f for f in state.expected_folds if f in record.folds and record.folds[f].validated]
        started = [f for f in state.expected_folds if f in record.folds and record.folds[f].started]
        rows.append([name, f"{len(started)} of {len(state.expected_folds)} folds trained or training, "
                           f"{len(validated)} validated"])
    best = state.find_best.best if state.find_best else None
    if best and best.configuration:
        rows.append(["Best (find_best.json)", f"{best.configuration}: mean Dice {_f(best.mean_dice)}"
                     + (f", {_f(best.mean_dice_postprocessed)} post-processed"
                        if best.mean_dice_postprocessed is not None else "")])
    blocks.append(_Table(["", ""], rows))
    return _Section("Overview", blocks)


def _missing_lines(state: WorkFolderState) -> list[str]:
    """One line per gap: folds not trained, not finished or not validated, post-processing, find-best."""
    lines: list[str] = []
    if state.plans is None and not (state.root / "plans.json").is_file():  # an unreadable one is a problem below
        lines.append(f"plans.json: missing in {state.root} (run `automedseg plan`)")
    if not state.configurations:
        lines.append("no configuration planned or trained yet")
    newest_validation = 0.0
    for name, record in state.configurations.items():
        folds = [record.folds.get(f) for f in state.expected_folds]
        not_trained = [f for f, r in zip(state.expected_folds, folds) if r is None or not r.started]
        if not_trained:
            lines.append(f"{name}: {_folds_text(not_trained)} not trained")
        for r in folds:
            if r is None or not r.started:
                continue
            if not r.finished:
                done = len(r.history)
                planned = r.planned_epochs
                lines.append(f"{name}: fold {r.fold} not finished ({done} of {planned or '?'} epochs logged; "
                             "still training or interrupted)")
            elif r.validation is None:
                lines.append(f"{name}: fold {r.fold} not validated (no validation/summary.json)")
            elif not r.validated:
                lines.append(f"{name}: fold {r.fold} validation has no per-case metrics "
                             "(reference labels not found?)")
            else:
                summary = r.path / "validation" / "summary.json"
                newest_validation = max(newest_validation, summary.stat().st_mtime if summary.is_file() else 0.0)
    if state.find_best is None:
        lines.append("find_best.json: missing, no best configuration, ensemble or post-processing chosen yet "
                     "(run `automedseg find-best`)")
    else:
        best = state.find_best.best
        if state.find_best.complete is False:
            lines.append("find_best.json: chosen on an incomplete cross-validation (see its notes under 'Best "
                         "configuration and ensembles'); re-run `automedseg find-best` when every fold is validated")
        pp = best.postprocessing
        if best.configuration and (pp is None or not pp.chosen):
            why = f": {pp.error}" if pp is not None and pp.error else ""
            lines.append(f"find_best.json: no post-processing chosen for {best.configuration}{why}")
        fb_path = state.root / "find_best.json"
        if fb_path.is_file() and fb_path.stat().st_mtime < newest_validation:
            lines.append("find_best.json: older than the newest validation results; re-run `automedseg find-best`")
    lines += state.problems
    return lines


def _section_missing(state: WorkFolderState, extra: Sequence[str]) -> _Section:
    lines = _missing_lines(state) + list(extra)
    if not lines:
        return _Section("Missing", [_Text("Nothing: every fold is trained and validated, post-processing and "
                                          "the best configuration are chosen.")])
    return _Section("Missing", [_Text(f"{len(lines)} item(s) not available yet; the figures below cover what "
                                      "exists."), _Bullets(lines)])


def _chosen_name(state: WorkFolderState) -> str | None:
    return state.find_best.best.configuration if state.find_best else None


def _postprocessing_text(pp: Postprocessing) -> str:
    ops = pp.operations()
    what = "; ".join(ops) if ops else "none (no operation improved the Dice)"
    n = f" on {pp.n_cases} cases" if pp.n_cases else ""
    return f"Post-processing chosen{n}: {what}."


def _section_results(state: WorkFolderState) -> _Section:
    blocks: list[_Block] = [_Text(
        "Cross-validation figures pool the per-case metrics of every validated fold (each case counted once), "
        "as in each fold's validation/summary.json. Dice and NSD (tolerance 1 mm) are in [0, 1], HD95 in mm. "
        "Post-processed Dice comes from postprocessing.json where it was chosen.")]
    chosen = _chosen_name(state)
    overview_rows, marked = [], set()
    per_config: list[_Block] = []
    for name, record in state.configurations.items():
        summary = _cv_summary(record, state)
        validated = [f for f in state.expected_folds if f in record.folds and record.folds[f].validated]
        pp = record.postprocessing
        after = pp.dice_after if pp is not None else {}
        before = pp.dice_before if pp is not None else {}
        if summary is None:
            overview_rows.append([name, "0", "0", "-", "-", "-", "-"])
            continue
        fg = summary["foreground_mean"]
        if name == chosen:
            marked.add(len(overview_rows))
        overview_rows.append([name + (" (chosen)" if name == chosen else ""),
                              f"{len(validated)} of {len(state.expected_folds)}", str(summary["n_cases"]),
                              _f(fg.get("dice")), _f(fg.get("hd95"), 2), _f(fg.get("nsd")), _f(after.get("mean"))])
        header = ["Class", "Dice", "HD95 (mm)", "NSD", "Cases"]
        if after:
            header += ["Dice before PP", "Dice after PP"]
        rows = []
        for label in state.labels or sorted(int(k) for k in summary["per_label"] if int(k) > 0):
            m = summary["per_label"].get(label) or summary["per_label"].get(str(label)) or {}
            n = (summary["n_valid"].get(label) or {}).get("dice", 0)
            row = [_label_title(label, state), _f(m.get("dice")), _f(m.get("hd95"), 2), _f(m.get("nsd")), str(n)]
            if after:
                row += [_f(before.get(str(label))), _f(after.get(str(label)))]
            rows.append(row)
        mean_row = ["mean (foreground)", _f(fg.get("dice")), _f(fg.get("hd95"), 2), _f(fg.get("nsd")),
                    str(summary["n_cases"])]
        if after:
            mean_row += [_f(before.get("mean")), _f(after.get("mean"))]
        rows.append(mean_row)
        per_config.append(_Heading(f"{name}: {summary['n_cases']} cases from {_folds_text(validated)}"))
        per_config.append(_Table(header, rows))
        if pp is not None:
            per_config.append(_Text(_postprocessing_text(pp)))
    if not overview_rows:
        blocks.append(_Text("No configuration yet."))
        return _Section("Cross-validation results", blocks)
    blocks.append(_Table(["Configuration", "Folds validated", "Cases", "Mean Dice", "Mean HD95 (mm)", "Mean NSD",
                          "Dice after PP"], overview_rows, marked))
    blocks += per_config
    return _Section("Cross-validation results", blocks)


def _section_ensembles(state: WorkFolderState) -> _Section:
    fb = state.find_best
    if fb is None:
        return _Section("Best configuration and ensembles",
                        [_Text("find_best.json is missing: no configuration or ensemble has been compared yet "
                               "(run `automedseg find-best`).")])
    blocks: list[_Block] = []
    if fb.ranking_basis:
        blocks.append(_Text(f"Ranked by {fb.ranking_basis}."))
    candidates: tuple[CandidateScore, ...] = fb.candidates
    chosen = _chosen_name(state)
    labels = [str(k) for k in state.labels]
    common = any(c.mean_dice_common_cases is not None for c in candidates)
    header = ["Rank", "Candidate", "Cases", "Mean Dice"] + (["Mean Dice (shared cases)"] if common else [])
    header += [f"Dice {_label_title(int(k), state)}" for k in labels] + ["Complete", "Chosen"]
    rows, marked = [], set()
    for c in candidates:
        name = c.name
        row = [str(c.rank or ""), name, str(c.n_cases), _f(c.mean_dice)]
        if common:
            row.append(_f(c.mean_dice_common_cases))
        row += [_f(c.dice_per_class.get(k)) for k in labels]
        row += ["yes" if c.complete else "no", "chosen" if name == chosen else ""]
        if name == chosen:
            marked.add(len(rows))
        rows.append(row)
    if rows:
        blocks.append(_Table(header, rows, marked))
    best = fb.best
    pp = best.postprocessing
    if pp is not None and not pp.chosen:
        blocks.append(_Text(f"Post-processing of {chosen}: not chosen ({pp.error})."))
    elif pp is not None:
        before, after = pp.dice_before, pp.dice_after
        blocks.append(_Text(f"{_postprocessing_text(pp.as_postprocessing())} Mean Dice of {chosen} "
                            f"{_f(before.get('mean'))} before, {_f(after.get('mean'))} after post-processing."))
    if best.predict_command:
        blocks.append(_Text(f"Predict with: {best.predict_command}"))
    notes = [f"{k}: not evaluated ({v})" for k, v in fb.not_evaluated.items()]
    notes += [str(line) for line in fb.missing]
    if notes:
        blocks.append(_Text("find-best noted:"))
        blocks.append(_Bullets(notes))
    return _Section("Best configuration and ensembles", blocks)


def _section_boxplots(state: WorkFolderState) -> _Section:
    data = {name: _cv_cases(r, state.expected_folds) for name, r in state.configurations.items()}
    data = {k: v for k, v in data.items() if v}
    if not data or not state.labels:
        return _Section("Per-case Dice", [_Text("No validated case yet.")])
    counts = ", ".join(f"{n}: {len(v)} cases" for n, v in data.items())
    return _Section("Per-case Dice", [_Figure(f"{FIGURE_PREFIX}dice_boxplot.png", _png(_boxplot_figure(state, data)),
                                              f"Per-case Dice of the cross-validation cases ({counts}); "
                                              "boxes: quartiles, line: median, triangle: mean, dots: cases; "
                                              "each class's axis is scaled to its cases.")])


def _boxplot_figure(state: WorkFolderState, data: dict[str, list[tuple[str, dict[str, Any]]]]) -> Any:
    """One box plot per class of the per-case Dice of each configuration (``data``: its cases), the Dice axis
    scaled to the class's cases (:func:`_dice_limits`)."""
    labels = list(state.labels)
    fig = _new_figure(figsize=(max(4.0, 1.2 + 1.1 * len(data)) * len(labels), 3.8))
    axes = fig.subplots(1, len(labels), squeeze=False)[0]
    names = list(data)
    for ax, label in zip(axes, labels):
        series = [[_number((c["metrics"].get(str(label)) or {}).get("dice")) for _, c in data[n]] for n in names]
        series = [[v for v in s if math.isfinite(v)] for s in series]
        positions = [i + 1 for i, s in enumerate(series) if s]
        if positions:
            ax.boxplot([s for s in series if s], positions=positions, widths=0.6, showmeans=True)
            for p, s in zip(positions, [s for s in series if s]):
                jitter = np.linspace(-0.12, 0.12, len(s)) if len(s) > 1 else np.zeros(1)
                ax.scatter(p + jitter, s, s=9, alpha=0.5, color="tab:blue", zorder=3)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20)
        ax.set_xlim(0.4, len(names) + 0.6)
        ax.set_ylim(*_dice_limits(v for s in series for v in s))
        ax.set_title(f"class {_label_title(label, state)}")
        ax.set_ylabel("Dice")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _section_curves(state: WorkFolderState) -> _Section:
    blocks: list[_Block] = []
    for name, record in state.configurations.items():
        folds = [f for f in record.folds.values() if f.history]
        if not folds:
            continue
        fig = _new_figure(figsize=(11, 3.6))
        from matplotlib.ticker import MaxNLocator
        ax_loss, ax_dice = fig.subplots(1, 2)
        for i, f in enumerate(folds):
            colour = f"C{i % 10}"
            ep = [h.epoch + 1 for h in f.history]
            ax_loss.plot(ep, [_number(h.train_loss) for h in f.history], color=colour, marker=".",
                         label=f"fold {f.fold} train")
            ax_loss.plot(ep, [_number(h.val_loss) for h in f.history], color=colour, linestyle="--",
                         label=f"fold {f.fold} val CE")
            ax_dice.plot(ep, [_number(h.ema_pseudo_dice) for h in f.history], color=colour, marker=".",
                         label=f"fold {f.fold} EMA")
            ax_dice.plot(ep, [_number(h.mean_pseudo_dice) for h in f.history], color=colour, alpha=0.35, marker=".")
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("loss")
        ax_loss.legend(fontsize=7)
        ax_dice.set_xlabel("epoch")
        ax_dice.set_ylabel("pseudo-Dice")
        ax_dice.set_ylim(*_dice_limits(_number(v) for f in folds for h in f.history
                                       for v in (h.ema_pseudo_dice, h.mean_pseudo_dice)))
        ax_dice.legend(fontsize=7)
        for ax in (ax_loss, ax_dice):
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.suptitle(name)
        fig.tight_layout()
        blocks.append(_Figure(f"{FIGURE_PREFIX}curves_{_slug(name)}.png", _png(fig),
                              f"{name}: training loss (solid) and validation cross-entropy (dashed); EMA "
                              "pseudo-Dice (solid) and per-epoch pseudo-Dice on whole validation images (faint), "
                              "one colour per fold; the Dice axis is scaled to the data."))
    if not blocks:
        blocks.append(_Text("No fold has logged an epoch yet."))
    return _Section("Training curves", blocks)


def _fold_status(f: FoldRecord) -> str:
    if not f.started:
        return "not started"
    if not f.finished:
        return "not finished"
    if f.validated:
        return "validated"
    return "trained, not validated"


def _section_timing(state: WorkFolderState) -> _Section:
    header = ["Configuration", "Fold", "Status", "Epochs", "Iterations/epoch", "Training time", "Time/epoch",
              "Time/iteration", "Data wait", "Inference/case", "Best EMA pseudo-Dice", "Validation Dice",
              "Last epoch (UTC)"]
    rows = []
    for name, record in state.configurations.items():
        for f in record.folds.values():
            h = f.history
            epochs = f"{len(h)} of {f.planned_epochs}" if f.planned_epochs else str(len(h))
            ipe = h[-1].iterations if h else (f.plan.training.iterations_per_epoch if f.plan else None)
            per_epoch = f.train_seconds / len(h) if h else math.nan
            spi = _finite_mean(e.seconds_per_iteration for e in h)
            wait = _finite_mean(e.data_wait_fraction for e in h)
            val = f.validation
            n_val = (len(val.cases) if val else 0) or len(f.per_case())
            infer = _number(val.seconds if val else None) / n_val if n_val else math.nan
            ema = max((v for e in h if math.isfinite(v := _number(e.ema_pseudo_dice))), default=math.nan)
            last = h[-1].time if h else None
            last_text = (datetime.fromtimestamp(float(last), timezone.utc).strftime("%Y-%m-%d %H:%M")
                         if isinstance(last, (int, float)) else "-")
            rows.append([name, f.fold, _fold_status(f), epochs, _compact(ipe), _seconds(f.train_seconds if h else None),
                         _seconds(per_epoch), f"{spi:.3f} s" if math.isfinite(spi) else "-",
                         f"{100 * wait:.0f}%" if math.isfinite(wait) else "-", _seconds(infer), _f(ema),
                         _f(val.mean_dice if val else None), last_text])
    if not rows:
        return _Section("Time", [_Text("No fold folder yet.")])
    return _Section("Time", [
        _Text("Training time is the sum of the logged epoch times (training iterations plus the per-epoch "
              "pseudo-Dice on patches and whole images); inference per case is the fold's final sliding-window "
              "validation time divided by its cases."),
        _Table(header, rows),
    ])


def _section_plans(state: WorkFolderState) -> _Section:
    columns: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for name, record in state.configurations.items():
        base = plan_fields(record.plan) if record.plan else None
        if base is not None:
            columns[name] = base
        copies: dict[str, list[str]] = {}
        flat_copies: dict[str, dict[str, Any]] = {}
        for f in record.folds.values():
            if f.plan is None:
                continue
            flat = plan_fields(f.plan)
            if flat == base:
                continue
            key = json.dumps(flat, sort_keys=True, default=str)
            copies.setdefault(key, []).append(f.fold)
            flat_copies[key] = flat
        for key, folds in copies.items():
            columns[f"{name} {_folds_text(folds)} (as trained)"] = flat_copies[key]
        if record.plan is not None:
            notes += [f"{name}: {n}" for n in record.plan.notes]
    if not columns:
        return _Section("Plans", [_Text("No plan yet (plans.json is missing and no fold holds a plan copy).")])
    keys = list(dict.fromkeys(k for flat in columns.values() for k in flat))
    ordered = [k for k in KEY_PLAN_FIELDS if k in keys] + [k for k in keys if k not in KEY_PLAN_FIELDS]
    names = list(columns)
    differ = [k for k in ordered if len({_compact(columns[c].get(k)) for c in names}) > 1]
    blocks: list[_Block] = []
    if len(names) > 1 and differ:
        blocks.append(_Text(f"Fields that differ between the configurations of plans.json and the plan copies the "
                            f"folds were trained with ({len(differ)} of {len(keys)} fields):"))
        rows = [[k] + [_compact(columns[c].get(k)) for c in names] for k in differ]
    else:
        blocks.append(_Text("Only one plan (or no difference): its key settings." if len(names) == 1 else
                            "The plans do not differ; their key settings:"))
        rows = [[k] + [_compact(columns[c].get(k)) for c in names] for k in KEY_PLAN_FIELDS if k in keys]
    blocks.append(_Table(["Field"] + names, rows))
    if notes:
        blocks.append(_Heading("Planner notes"))
        blocks.append(_Bullets(notes))
    return _Section("Plans", blocks)


def _load_overlay_inputs(state: WorkFolderState, record: ConfigurationRecord, fold: str, case: str
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(image of the first channel, prediction, reference or None) on the original grid, (Z, Y, X) each."""
    from automedseg.io import read_image_file, read_label
    from automedseg.preprocessing import case_meta_path, read_case_meta

    ident = record.data_identifier
    folder = Workspace(state.root).preprocessed_dir(str(ident))
    meta_path = case_meta_path(folder, case)
    if not ident or not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing (the raw image path is recorded there)")
    meta = read_case_meta(folder, case)
    if not meta.image_files:
        raise FileNotFoundError(f"{meta_path}: no image_files")
    image, _ = read_image_file(Path(meta.image_files[0]))
    pred, _ = read_label(record.folds[fold].path / "validation" / f"{case}.nii.gz")
    ref = None
    if meta.label_file and Path(meta.label_file).is_file():
        ref, _ = read_label(Path(meta.label_file))
    img = image[0].astype(np.float32)
    if img.shape != pred.shape or (ref is not None and ref.shape != pred.shape):
        raise ValueError(f"shapes differ: image {img.shape}, prediction {pred.shape}, "
                         f"reference {None if ref is None else ref.shape}")
    return img, pred, ref


def _pick_cases(cases: list[tuple[str, dict[str, Any]]], labels: Sequence[int]
                ) -> list[tuple[str, str, str, float]]:
    """(rank name, fold, case, Dice) of the best, median and worst case (each case once)."""
    scored = [(d, f, c["case"]) for f, c in cases if math.isfinite(d := _case_dice(c, labels))]
    if not scored:
        return []
    scored.sort(key=lambda t: (-t[0], t[2]))
    picks = [("best", scored[0]), ("worst", scored[-1]), ("median", scored[len(scored) // 2])]
    out, seen = [], set()
    for rank, (d, f, c) in picks:
        if (f, c) not in seen:
            seen.add((f, c))
            out.append((rank, f, c, d))
    order = {"best": 0, "median": 1, "worst": 2}
    return sorted(out, key=lambda t: order[t[0]])


def _section_overlays(state: WorkFolderState, notes: list[str], *, n_slices: int = 3) -> _Section:
    blocks: list[_Block] = [_Text("Best, median and worst cross-validation case of each configuration (mean "
                                  f"foreground Dice), {n_slices} axial slices through the foreground: the "
                                  "prediction filled, one colour per label (legend below each figure), the "
                                  "reference as a white contour.")]
    labels = list(state.labels)
    any_figure = False
    for name, record in state.configurations.items():
        for rank, fold, case, dice in _pick_cases(_cv_cases(record, state.expected_folds), labels):
            try:
                img, pred, ref = _load_overlay_inputs(state, record, fold, case)
            except (OSError, ValueError, KeyError) as e:
                notes.append(f"{name}: overlay of {case} (fold {fold}) skipped: {e}")
                continue
            scale = int(max(1, min(4, 256 // max(1, img.shape[-2]))))
            rgb = render_overlay(img, pred, reference=ref, label_names=state.labels, n_slices=n_slices, gap=2,
                                 scale=scale)
            blocks.append(_Figure(f"{FIGURE_PREFIX}overlay_{_slug(name)}_{rank}.png", _rgb_png(rgb),
                                  f"{name}, {rank} case: {case} (fold {fold}), mean Dice {dice:.4f}"
                                  + ("" if ref is not None else " (reference not found: prediction only)")))
            any_figure = True
    if not any_figure:
        blocks.append(_Text("No validated case to show yet."))
    return _Section("Validation overlays", blocks)


def _section_machine(state: WorkFolderState) -> _Section:
    blocks: list[_Block] = [_Text("The machine that wrote this report:"),
                            _Table(["", ""], [[k, v] for k, v in machine_info().items()])]
    device = state.plans.device if state.plans is not None else None
    if device is not None:
        gflops = ", ".join(f"width {w}: {g:g}" for w, g in device.gflops_by_width)
        rows = [["Kind", device.kind], ["Name", device.name], ["CPU threads", str(device.cpu_threads)],
                ["Memory", f"{device.memory_gib:.1f} GiB"], ["Training GFLOP/s by width", gflops or "-"],
                ["Measured", "yes (on the planning machine)" if device.measured else "no (nominal profile)"]]
        blocks += [_Text("The device profile plans.json was fitted to:"), _Table(["", ""], rows)]
    else:
        blocks.append(_Text("No device profile: plans.json is missing."))
    return _Section("Machine", blocks)
