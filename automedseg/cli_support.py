"""What the CLI commands share: parsing option values (durations, folds, number lists), finding the work folder
and the calibration cache from the arguments and the environment, and turning errors into messages and exit codes.

With :mod:`automedseg.cli`, the only module that reads environment variables (``AUTOMEDSEG_WORK_DIR``,
``AUTOMEDSEG_CALIBRATION``, ``XDG_CACHE_HOME``, ``AUTOMEDSEG_DEBUG``); :mod:`automedseg.api` finds work folders and
the calibration cache with the functions here, as the commands do. Imports nothing heavy (``--help`` stays instant).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from automedseg.workspace import Workspace


def parse_duration(text: str | None) -> float | None:
    """Parse ``90s``, ``30m``, ``2h``, ``1h30m`` or plain seconds into seconds.

    Example:
        >>> parse_duration("1h30m"), parse_duration("45"), parse_duration(None)
        (5400.0, 45.0, None)
    """
    from automedseg.durations import duration_seconds
    from automedseg.errors import InputError

    try:
        return duration_seconds(text)
    except InputError as e:
        raise click.BadParameter(str(e), param_hint="'--time-budget'") from None


def workspace_for(dataset: Path, work_dir: Path | None):
    from automedseg.workspace import Workspace

    env = os.environ.get("AUTOMEDSEG_WORK_DIR")
    if work_dir is None and env:
        work_dir = Path(env) / Path(dataset).resolve().name
    return Workspace.for_dataset(dataset, work_dir)


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (imports torch: call it only when about to train)."""
    import torch

    return torch.cuda.is_available()


def calibration_cache_path() -> Path:
    """The machine's calibration cache: ``$AUTOMEDSEG_CALIBRATION``, else under ``$XDG_CACHE_HOME`` or ~/.cache.

    Example:
        >>> calibration_cache_path().name  # doctest: +SKIP
        'calibration.json'
    """
    explicit = os.environ.get("AUTOMEDSEG_CALIBRATION")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "automedseg" / "calibration.json"


def fail(problems: list[str]) -> None:
    for p in problems:
        click.echo(p, err=True)
    if len(problems) > 1:
        click.echo(f"{len(problems)} problem(s) found.", err=True)
    sys.exit(2)


class CommandGroup(click.Group):
    """Commands whose input errors end as one line per problem and exit status 2, never a traceback.

    ``InputError`` (and its kinds: ``DatasetError``, ``PlanError``, ``LockedError``), ``OSError`` and
    ``ValueError`` name the file or option in their message; a truncated file read by a library that raises
    ``EOFError`` is reported the same way. Anything else is a bug: one line and status 1, with the traceback
    only when ``AUTOMEDSEG_DEBUG`` is set.
    """

    def invoke(self, ctx: click.Context):  # noqa: ANN201
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - the one place that turns errors into exit codes
            if os.environ.get("AUTOMEDSEG_DEBUG"):
                raise
            report_exception(e)


def report_exception(e: BaseException) -> None:
    from automedseg.errors import InputError

    problems = getattr(e, "problems", None)
    if isinstance(e, (InputError, OSError, ValueError, EOFError)):
        if isinstance(problems, list) and len(problems) > 1:
            fail(problems)
        text = str(e).strip() or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
            text = f"{e.filename}: {e.strerror or text}"
        click.echo(text.splitlines()[0], err=True)
        sys.exit(2)
    click.echo(f"error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} "
               "(set AUTOMEDSEG_DEBUG=1 for the traceback)", err=True)
    sys.exit(1)


def parse_numbers(text: str | None, option: str, count: int) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if not 1 <= len(values) <= count:
        raise click.BadParameter(f"{text!r}: give 1 to {count} comma-separated numbers", param_hint=f"'{option}'")
    return values


def parse_fold(value: str) -> int | str:
    if value.strip() == "all":
        return "all"
    try:
        fold = int(value)
    except ValueError:
        fold = -1
    if not 0 <= fold < 5:
        raise click.BadParameter(f"{value!r}: use a fold 0-4 or 'all'", param_hint="'-f' / '--fold'")
    return fold


def resolve_workspace(target: Path, work_dir: Path | None):
    """A work folder given directly (it holds plans.json) or derived from a dataset folder."""
    from automedseg.workspace import Workspace

    if work_dir is None and (Path(target) / "plans.json").is_file():
        return Workspace(Path(target))
    return workspace_for(target, work_dir)


def require_folder(path: Path, what: str, *, hint: str = "") -> None:
    """Exit with status 2 and one line naming ``path`` when it is not an existing folder.

    Commands call it before their heavy imports, so a mistyped path is answered at once.

    Args:
        path: The folder an argument names.
        what: What it should be, e.g. ``"dataset folder"``.
        hint: What to do instead, appended after ``"; "``.

    Example:
        >>> require_folder(Path("/"), "dataset folder")  # exists: returns
    """
    path = Path(path)
    if path.is_dir():
        return
    problem = f"{what} does not exist" if not path.exists() else f"is not a {what} (it is a file)"
    fail([f"{path}: {problem}" + (f"; {hint}" if hint else "")])


def existing_workspace(target: Path, work_dir: Path | None, *, hint: str) -> Workspace:
    """:func:`resolve_workspace` for the commands that read a work folder (predict, find-best, export, report).

    When the work folder is not there, exits with status 2 and says first which argument names no folder:
    ``--work-dir``, then ``TARGET`` (a dataset or work folder), else that ``TARGET`` has no work folder yet.

    Args:
        target: The dataset folder, a work folder or an imported model folder.
        work_dir: ``--work-dir``, if given.
        hint: What to do when ``TARGET`` exists but has no work folder, e.g. ``"train a model first"``.
    """
    if work_dir is not None:
        require_folder(work_dir, "work folder")
    ws = resolve_workspace(target, work_dir)
    if ws.root.is_dir():
        return ws
    require_folder(target, "dataset or work folder")
    fail([f"{target}: no work folder at {ws.root}; {hint} (or pass --work-dir)"])
    return ws


def planned_workspace(dataset: Path, work_dir: Path | None) -> Workspace:
    """The work folder of train and search, which must hold ``plans.json``; exits with status 2 otherwise.

    A missing ``--work-dir`` or dataset folder is named first, then a work folder without a plan.
    """
    ws = workspace_for(dataset, work_dir)
    if ws.plans_path.is_file():
        return ws
    if work_dir is not None:
        require_folder(work_dir, "work folder", hint=f"run `automedseg plan {dataset} --work-dir {work_dir}` first")
    else:
        require_folder(dataset, "dataset folder")
    fail([f"{ws.plans_path}: no plan yet; run `automedseg plan {dataset}` first"])
    return ws
