"""Command-line interface: parses arguments and calls library functions.

Heavy imports (torch, SimpleITK, scipy) happen inside the commands so ``automedseg --help`` is instant.
This is the only module that reads environment variables (``AUTOMEDSEG_WORK_DIR``).
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import click

DEFAULT_CONFIGS = ("2d", "3d_fullres", "3d_lowres")


def parse_duration(text: str | None) -> float | None:
    """Parse ``90s``, ``30m``, ``2h``, ``1h30m`` or plain seconds into seconds.

    Example:
        >>> parse_duration("1h30m"), parse_duration("45"), parse_duration(None)
        (5400.0, 45.0, None)
    """
    if text is None:
        return None
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", t)
    if not parts or "".join(a + b for a, b in parts) != t.replace(" ", ""):
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 30m, 2h or 1h30m")
    return float(sum(float(v) * {"h": 3600, "m": 60, "s": 1}[u] for v, u in parts))


def _workspace(dataset: Path, work_dir: Path | None):
    from automedseg.workspace import Workspace

    env = os.environ.get("AUTOMEDSEG_WORK_DIR")
    if work_dir is None and env:
        work_dir = Path(env) / Path(dataset).resolve().name
    return Workspace.for_dataset(dataset, work_dir)


def _fail(problems: list[str]) -> None:
    for p in problems:
        click.echo(p, err=True)
    click.echo(f"{len(problems)} problem(s) found.", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="automedseg")
def main() -> None:
    """Self-configuring medical image segmentation: plan, train, predict, evaluate."""


@main.command()
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("-j", "--jobs", default=2, show_default=True, help="Parallel processes.")
def check(dataset: Path, jobs: int) -> None:
    """Check a raw dataset folder and list every problem (exit 2 if any)."""
    from automedseg.checks import check_dataset

    problems = check_dataset(dataset, jobs=jobs, progress=sys.stderr.isatty())
    if problems:
        _fail(problems)
    click.echo(f"{dataset}: no problems found.")


@main.command()
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Work folder (default: DATASET/automedseg, or $AUTOMEDSEG_WORK_DIR/<name>).")
@click.option("-c", "--configurations", multiple=True, type=click.Choice(DEFAULT_CONFIGS),
              help="Configurations to plan and preprocess (default: all that apply).")
@click.option("-j", "--jobs", default=2, show_default=True, help="Parallel processes.")
@click.option("--device", default="auto", show_default=True,
              help="Plan for: auto, cpu, cuda, mps, or a nominal profile (reference-cpu-2core, reference-gpu-24g).")
@click.option("--time-budget", default=None, help="Training wall-clock budget per fold, e.g. 30m or 2h.")
@click.option("--architecture", type=click.Choice(["plain_unet", "residual_unet"]), default="plain_unet",
              show_default=True)
@click.option("--seed", default=12345, show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads for training (default: all cores).")
@click.option("--overwrite", is_flag=True, help="Recompute the fingerprint and every cached case.")
@click.option("--no-preprocess", is_flag=True, help="Stop after writing plans.json.")
def plan(dataset: Path, work_dir: Path | None, configurations: tuple[str, ...], jobs: int, device: str,
         time_budget: str | None, architecture: str, seed: int, threads: int | None, overwrite: bool,
         no_preprocess: bool) -> None:
    """Check, fingerprint, plan and preprocess a raw dataset."""
    from automedseg.pipeline import run_plan

    budget = parse_duration(time_budget)
    ws = _workspace(dataset, work_dir)
    t0 = time.perf_counter()
    from automedseg.io import DatasetError

    try:
        plans = run_plan(dataset, ws, configurations=configurations or None, jobs=jobs, device=device,
                         time_budget_s=budget, architecture=architecture, seed=seed, threads=threads,
                         overwrite=overwrite, preprocess=not no_preprocess, progress=True, log=click.echo)
    except DatasetError as e:
        _fail(e.problems)
        return
    click.echo(f"plans: {ws.plans_path}")
    for name, cfg in plans.configurations.items():
        click.echo(f"  {name}: {cfg.notes[-1] if cfg.notes else ''}")
    click.echo(f"done in {time.perf_counter() - t0:.1f} s; work folder {ws.root}")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo_data"), show_default=True,
              help="Where to write the demo dataset and its work folder.")
@click.option("--cases", default=24, show_default=True, help="Number of training cases.")
@click.option("--time-budget", default="3m", show_default=True, help="Training budget of the demo fold.")
def demo(out: Path, cases: int, time_budget: str) -> None:
    """Generate the synthetic demo dataset and run the whole pipeline on it."""
    from automedseg.pipeline import run_demo

    run_demo(out, n_cases=cases, time_budget_s=parse_duration(time_budget), log=click.echo)


if __name__ == "__main__":  # pragma: no cover
    main()
