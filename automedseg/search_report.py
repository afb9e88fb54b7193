"""The report of a search: ``search_report.md``, ``search_history.png`` and ``param_importances.png``."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from automedseg.io import atomic_save_figure
from automedseg.plans import Plans
from automedseg.search_confirm import Confirmation, runs_table
from automedseg.search_space import SEARCHED_SUFFIX, search_space
from automedseg.search_study import best_trial, quiet_optuna, redact_url, trial_counts
from automedseg.search_trial import SMOOTHING_EPOCHS
from automedseg.workspace import Workspace


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


#: A rule-plan trial that scores at most this learned nothing in its budget (openkbp_hn_ct, 3d_fullres, 75-second
#: trials: 0.000, while the same plan reaches 0.49 in 5 minutes): the trials then rank noise.
NOTHING_LEARNED_DICE = 0.01


def fidelity_warning(study: Any) -> str | None:
    """A warning when the rule plan's own trial learned nothing in its short budget (``None``: it did, or the
    trials are full folds, or it has not finished).

    Example:
        >>> import optuna
        >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
        >>> study = optuna.create_study(direction="maximize")
        >>> study.enqueue_trial({"x": 0.0}, user_attrs={"rule_defaults": True})
        >>> study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        >>> fidelity_warning(study).startswith("the rule plan's own trial (0) scored 0.000")
        True
    """
    from optuna.trial import TrialState

    if study.user_attrs.get("fidelity") == "full":
        return None
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.user_attrs.get("rule_defaults") and t.value is not None:
            if t.value > NOTHING_LEARNED_DICE:
                return None
            minutes = float(study.user_attrs.get("trial_budget_s", 0)) / 60
            return (f"the rule plan's own trial ({t.number}) scored {t.value:.3f} in its ~{minutes:.1f} min: the "
                    "trials are too short to learn anything on this dataset, so their ranking is noise; give each "
                    "trial more time (a larger --time-budget or fewer --trials) or use --fidelity full")
    return None


def write_search_report(ws: Workspace, configuration: str, study: Any, *, storage_url: str = "",
                        confirmation: Confirmation | None = None) -> Path:
    """``search_report.md``, ``search_history.png`` and (2+ complete trials) ``param_importances.png``.

    ``confirmation``: the verdict of :func:`automedseg.search_confirm.confirm_candidates` (``None``: unconfirmed).
    """
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
            with quiet_optuna(), warnings.catch_warnings():
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
        f"- fidelity: {attrs.get('fidelity', 'short')}: {attrs.get('fidelity_note', '')}",
        *([f"- **warning**: {w}"] if (w := fidelity_warning(study)) else []),
        f"- pruner: {attrs.get('pruner', '?')}; sampler: TPE, seed {attrs.get('seed', '?')}",
        "- objective: fold-0 sliding-window validation mean Dice at the end of the trial",
        "",
        "## Confirmation at the full fold budget",
        "",
    ]
    if confirmation is None or confirmation.winner is None:
        lines += ["Not confirmed (`--confirm 0`, or another worker confirms): a searched configuration written by "
                  "this study was chosen on its trials only.", ""]
    else:
        verdict = "adopted" if confirmation.adopted else "not adopted: plans.json keeps the rule plan"
        lines += [f"{confirmation.summary()}; `{configuration}{SEARCHED_SUFFIX}` {verdict}.", "",
                  *runs_table(confirmation), ""]
    if best is not None:
        lines += [f"## Best trial: {best.number} (value {best.value:.4f})", "",
                  "| parameter | rule default | best |", "|---|---|---|"]
        for k in best.params:
            mark = "" if defaults.get(k) == best.params[k] else " *"
            lines.append(f"| {k} | {_fmt(defaults.get(k))} | {_fmt(best.params[k])}{mark} |")
        plan = best.user_attrs.get("plan", {})
        if plan:
            lines += ["", "Trial plan: " + ", ".join(f"{k} {v}" for k, v in plan.items()), ""]
        if confirmation is not None and confirmation.winner is not None and not confirmation.adopted:
            lines += [f"The confirmation kept the rule plan: train `{configuration}`.", ""]
        else:
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
    searched = set(attrs.get("space", ())) or None
    for p in search_space(plans.configuration(configuration)):
        if searched is not None and p.name not in searched:
            continue
        lines.append(f"| {p.name} | {p.describe()} | {_fmt(p.default)} | {p.help} |")
    from automedseg.io import atomic_write_text

    path = out / "search_report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
