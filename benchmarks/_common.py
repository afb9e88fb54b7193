"""Shared helpers for the automedseg benchmark scripts.

The benchmarks compare automedseg against nnU-Net v2 on the same machine in one run. nnU-Net lives in
its own virtual environment (``benchmarks/.venv-nnunet``) so that its dependency pins never touch the
automedseg environment; everything it writes goes to ``benchmarks/work/`` (git-ignored).

Nothing here imports torch, nnU-Net or automedseg at module import time, so the helpers stay cheap to
import from any script.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
WORK_DIR = BENCH_DIR / "work"
DEFAULT_VENV_DIR = BENCH_DIR / ".venv-nnunet"
DEFAULT_MSD_DIR = (REPO_ROOT / ".." / "shared" / "data" / "msd_hippocampus").resolve()

#: torch version installed into the nnU-Net venv; a CPU wheel of exactly this version lies on local disk,
#: and installing it first (and keeping it pinned) stops pip from pulling a multi-GB CUDA build.
NNUNET_TORCH_VERSION = "2.13.0"
#: nnU-Net release the benchmarks are run against (works with torch 2.13 once torch stays pinned).
NNUNETV2_VERSION = "2.8.1"
#: Number of CPU threads / worker processes both tools are allowed (the benchmark machine has 2 cores).
BENCH_THREADS = 2

_READY_MARKER = ".automedseg-bench-ready.json"
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_MIB = 1024.0 * 1024.0


# --------------------------------------------------------------------------------------------------------
# machine description
# --------------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    from automedseg.machine import cpu_model_name

    return cpu_model_name()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024.0 / 1024.0, 2)
    except OSError:
        pass
    return None


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def venv_package_version(package: str, venv_dir: Path = DEFAULT_VENV_DIR) -> str | None:
    """Version of ``package`` installed in the venv at ``venv_dir``, or None if absent."""
    python = Path(venv_dir) / "bin" / "python"
    if not python.exists():
        return None
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def machine_info(venv_dir: Path = DEFAULT_VENV_DIR) -> dict:
    """Describe the machine and the software versions a benchmark ran with.

    Returns:
        Dict with cpu model, logical/usable cores, total memory, OS, python, numpy, torch, automedseg and
        (from the nnU-Net venv) nnunetv2 and its torch version. Missing packages are reported as None.
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        usable = os.cpu_count()
    automedseg_version = _dist_version("automedseg")
    if automedseg_version is None:
        with contextlib.suppress(Exception):
            import automedseg  # noqa: PLC0415

            automedseg_version = getattr(automedseg, "__version__", "importable (no __version__)")
    return {
        "cpu_model": _cpu_model(),
        "cpu_count_logical": os.cpu_count(),
        "cpu_count_usable": usable,
        "memory_total_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": _dist_version("numpy"),
        "torch": _dist_version("torch"),
        "automedseg": automedseg_version,
        "nnunetv2": venv_package_version("nnunetv2", venv_dir),
        "nnunet_venv_torch": venv_package_version("torch", venv_dir),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
    }


# --------------------------------------------------------------------------------------------------------
# nnU-Net virtual environment, environment variables and raw dataset
# --------------------------------------------------------------------------------------------------------


def _pip(bin_dir: Path, *args: str) -> None:
    cmd = [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def ensure_nnunet_venv(venv_dir: Path = DEFAULT_VENV_DIR) -> Path:
    """Create the nnU-Net virtual environment if needed and return its ``bin`` directory.

    torch is installed first with the exact pinned version (a local CPU wheel), then nnunetv2 is installed
    together with the same torch pin, so that the resolver picks a matching torchvision (needed by timm via
    dynamic_network_architectures) instead of upgrading torch to a CUDA build. Idempotent: a marker file
    records a finished install, and the torch version is checked again every call.

    Args:
        venv_dir: where the venv lives (default ``benchmarks/.venv-nnunet``).

    Returns:
        Path of the venv's ``bin`` directory (holds ``python`` and the ``nnUNetv2_*`` entry points).

    Raises:
        RuntimeError: if after installing, the venv does not hold the pinned torch and nnunetv2.
    """
    venv_dir = Path(venv_dir)
    bin_dir = venv_dir / "bin"
    marker = venv_dir / _READY_MARKER
    wanted = {"torch": NNUNET_TORCH_VERSION, "nnunetv2": NNUNETV2_VERSION}

    def _installed_ok() -> bool:
        if not (bin_dir / "nnUNetv2_plan_and_preprocess").exists():
            return False
        torch_v = venv_package_version("torch", venv_dir) or ""
        nnunet_v = venv_package_version("nnunetv2", venv_dir) or ""
        return torch_v.split("+")[0] == NNUNET_TORCH_VERSION and nnunet_v == NNUNETV2_VERSION

    if marker.exists():
        try:
            if json.loads(marker.read_text()) == wanted and _installed_ok():
                return bin_dir
        except (OSError, ValueError):
            pass

    if not (bin_dir / "python").exists():
        print(f"creating nnU-Net venv in {venv_dir}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv_dir)], check=True)
    torch_pin = f"torch=={NNUNET_TORCH_VERSION}"
    _pip(bin_dir, torch_pin)
    _pip(bin_dir, f"nnunetv2=={NNUNETV2_VERSION}", torch_pin)
    if not _installed_ok():
        raise RuntimeError(
            f"nnU-Net venv {venv_dir} does not hold torch {NNUNET_TORCH_VERSION} and nnunetv2 "
            f"{NNUNETV2_VERSION} after installing (torch={venv_package_version('torch', venv_dir)}, "
            f"nnunetv2={venv_package_version('nnunetv2', venv_dir)})"
        )
    marker.write_text(json.dumps(wanted))
    return bin_dir


def thread_env(threads: int = BENCH_THREADS) -> dict[str, str]:
    """Environment variables that limit BLAS/OpenMP/torch thread pools to ``threads``."""
    n = str(threads)
    return {
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "NUMEXPR_NUM_THREADS": n,
        "VECLIB_MAXIMUM_THREADS": n,
    }


def nnunet_paths(work_dir: Path = WORK_DIR) -> dict[str, Path]:
    """nnU-Net's three data folders inside the benchmark work folder."""
    work_dir = Path(work_dir)
    return {
        "nnUNet_raw": work_dir / "nnUNet_raw",
        "nnUNet_preprocessed": work_dir / "nnUNet_preprocessed",
        "nnUNet_results": work_dir / "nnUNet_results",
    }


def nnunet_env(
    work_dir: Path = WORK_DIR,
    *,
    venv_dir: Path = DEFAULT_VENV_DIR,
    threads: int = BENCH_THREADS,
    overrides: dict[str, str] | None = None,
) -> dict[str, str]:
    """Full process environment for running nnU-Net commands from the venv.

    Sets nnUNet_raw / nnUNet_preprocessed / nnUNet_results into ``work_dir`` (created), limits thread
    pools, sets nnUNet_n_proc_DA (data augmentation workers for training) and nnUNet_def_n_proc (the
    default pool size of conversion/fingerprint helpers) to ``threads``, and puts the venv first on PATH.
    """
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(thread_env(threads))
    for key, path in nnunet_paths(work_dir).items():
        path.mkdir(parents=True, exist_ok=True)
        env[key] = str(path)
    env["nnUNet_n_proc_DA"] = str(threads)
    env["nnUNet_def_n_proc"] = str(threads)
    env["VIRTUAL_ENV"] = str(venv_dir)
    env["PATH"] = f"{Path(venv_dir) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    if overrides:
        env.update(overrides)
    return env


def nnunet_dataset_name(msd_dir: Path, dataset_id: int = 4) -> str:
    """nnU-Net dataset folder name (e.g. ``Dataset004_Hippocampus``) for an MSD folder."""
    meta = json.loads((Path(msd_dir) / "dataset.json").read_text())
    name = str(meta.get("name", Path(msd_dir).name)).replace(" ", "")
    return f"Dataset{dataset_id:03d}_{name}"


def prepare_nnunet_raw(
    msd_dir: Path,
    raw_root: Path,
    dataset_id: int = 4,
    *,
    venv_dir: Path = DEFAULT_VENV_DIR,
) -> Path:
    """Make an nnU-Net raw dataset from an MSD task folder with ``nnUNetv2_convert_MSD_dataset``.

    The converter infers the task from a ``TaskXX_Name`` folder name and checks that the target id is
    free in all three nnU-Net folders, so it is run on a symlinked ``Task{id}_{Name}`` view of the
    (read-only) MSD folder, with nnUNet_preprocessed/nnUNet_results pointed at an empty scratch folder.
    Idempotent: an existing, complete conversion is kept.

    Args:
        msd_dir: MSD-layout folder (imagesTr, labelsTr, imagesTs, dataset.json).
        raw_root: the nnUNet_raw folder to write into.
        dataset_id: nnU-Net dataset id.
        venv_dir: the nnU-Net venv (must exist; see ensure_nnunet_venv).

    Returns:
        The dataset folder, e.g. ``raw_root/Dataset004_Hippocampus``.
    """
    msd_dir = Path(msd_dir).resolve()
    raw_root = Path(raw_root).resolve()
    meta = json.loads((msd_dir / "dataset.json").read_text())
    target = raw_root / nnunet_dataset_name(msd_dir, dataset_id)
    n_train = int(meta.get("numTraining", len(meta.get("training", []))))
    if (target / "dataset.json").exists():
        n_images = len(list((target / "imagesTr").glob("*.nii.gz")))
        n_labels = len(list((target / "labelsTr").glob("*.nii.gz")))
        if n_labels == n_train and n_images >= n_train:
            return target
    if target.exists():
        shutil.rmtree(target)
    raw_root.mkdir(parents=True, exist_ok=True)

    name = target.name.split("_", 1)[1]
    with tempfile.TemporaryDirectory(prefix="msd_view_", dir=raw_root.parent) as tmp:
        view = Path(tmp) / f"Task{dataset_id:02d}_{name}"
        view.mkdir()
        for entry in ("imagesTr", "labelsTr", "imagesTs", "dataset.json"):
            (view / entry).symlink_to(msd_dir / entry)
        scratch = Path(tmp) / "scratch"
        env = nnunet_env(
            raw_root.parent,
            venv_dir=venv_dir,
            overrides={
                "nnUNet_raw": str(raw_root),
                "nnUNet_preprocessed": str(scratch),
                "nnUNet_results": str(scratch),
            },
        )
        scratch.mkdir()
        cmd = [
            str(Path(venv_dir) / "bin" / "nnUNetv2_convert_MSD_dataset"),
            "-i",
            str(view),
            "-overwrite_id",
            str(dataset_id),
            "-np",
            str(BENCH_THREADS),
        ]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, env=env, check=True)
    if not (target / "dataset.json").exists():
        raise RuntimeError(f"nnU-Net MSD conversion did not produce {target / 'dataset.json'}")
    return target


# --------------------------------------------------------------------------------------------------------
# measuring a command: wall time and peak summed RSS of the whole process tree
# --------------------------------------------------------------------------------------------------------


_PF_FORKNOEXEC = 0x40  # kernel task flag: forked but has not called exec yet
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class ProcSample(NamedTuple):
    """One process as read from ``/proc/<pid>/stat``."""

    ppid: int
    sid: int
    rss_pages: int
    fork_no_exec: bool
    start_s: float  # start time, seconds since boot


def _read_stat(pid: int) -> ProcSample | None:
    """Parse ``/proc/<pid>/stat``, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        # fields[0] is stat field 3 (state): ppid=4, session=6, flags=9, starttime=22, rss=24
        return ProcSample(
            ppid=int(fields[1]),
            sid=int(fields[3]),
            rss_pages=int(fields[21]),
            fork_no_exec=bool(int(fields[6]) & _PF_FORKNOEXEC),
            start_s=int(fields[19]) / _CLK_TCK,
        )
    except (IndexError, ValueError):
        return None


def _cmdline(pid: int, max_chars: int = 160) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode("utf-8", errors="replace").strip()[:max_chars]
    except OSError:
        return "?"


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def process_tree(root_pid: int) -> dict[int, ProcSample]:
    """Processes that descend from ``root_pid`` (included) or share its session.

    Reads every ``/proc/<pid>/stat`` once. Processes started in the root's session (run_measured starts
    the root as a session leader) are counted even if they were re-parented after their parent exited.
    """
    stats: dict[int, ProcSample] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _read_stat(int(name))
            if st is not None:
                stats[int(name)] = st
    if root_pid not in stats:
        return {}
    root_sid = stats[root_pid].sid
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(st.ppid, []).append(pid)
    tree: dict[int, ProcSample] = {}
    stack = [root_pid]
    while stack:
        pid = stack.pop()
        if pid in tree:
            continue
        tree[pid] = stats[pid]
        stack.extend(children.get(pid, ()))
    if root_sid == root_pid:
        for pid, st in stats.items():
            if st.sid == root_sid:
                tree.setdefault(pid, st)
    return tree


def _uss_kib(pid: int) -> int | None:
    """Private (unshared) resident memory of a process in KiB, from smaps_rollup; None if unreadable."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith((b"Private_Clean:", b"Private_Dirty:")):
                    total += int(line.split()[1])
    except (OSError, ValueError):
        return None
    return total


def run_measured(
    cmd: list[str],
    *,
    env: dict | None = None,
    cwd: str | Path | None = None,
    interval_s: float = 0.05,
    pss_interval_s: float | None = 0.5,
    log_path: Path | None = None,
    tail_chars: int = 4000,
) -> dict:
    """Run ``cmd`` and measure its wall time and the peak summed RSS of its whole process tree.

    Every ``interval_s`` seconds the RSS of the command and all its descendants (worker processes
    included) is read from /proc and summed; the peak sum is reported.

    Two artefacts of summed RSS are handled or reported:

    * A forked child shares all its parent's pages copy-on-write, yet its RSS counts them all again. This
      hits every worker start (``subprocess``, multiprocessing ``spawn``: fork, then exec; in between the
      child shows the parent's whole RSS, ~250 MiB for a process holding torch) and every ``fork`` worker
      (which never execs). So a child that has not exec'd (kernel flag PF_FORKNOEXEC) and whose parent
      is in the tree is counted by its private pages only (Private_Clean + Private_Dirty from
      smaps_rollup, i.e. what it allocated or modified since the fork). That is ``peak_rss_mib``;
      ``peak_rss_raw_mib`` is the literal sum of RSS.
    * Other shared pages (libraries) still count once per process; the peak summed PSS (proportional
      set size: shared pages split between their users) is also sampled every ``pss_interval_s``
      seconds (None disables it).

    Args:
        cmd: the command and its arguments.
        env: full environment for the command (default: inherit).
        cwd: working directory.
        interval_s: RSS sampling period.
        pss_interval_s: PSS sampling period (slower, since smaps_rollup walks page tables) or None.
        log_path: if given, stdout+stderr are also kept in this file.
        tail_chars: how many trailing characters of combined stdout+stderr to return.

    Returns:
        Dict with cmd, wall_s, peak_rss_mib, peak_rss_raw_mib, peak_pss_mib (or None), peak_processes,
        peak_tree_mib (``[rss_mib, cmdline]`` of each counted process at the peak_rss_mib sample),
        n_samples, returncode and stdout_tail.
    """
    cmd = [str(c) for c in cmd]
    peak_kib = 0
    peak_raw_pages = 0
    peak_pss_kib = 0
    peak_procs = 0
    peak_tree: list[tuple[float, str]] = []
    n_samples = 0
    with contextlib.ExitStack() as stack:
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            out = stack.enter_context(open(log_path, "w+b"))
        else:
            out = stack.enter_context(tempfile.TemporaryFile())
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        next_pss = t0
        while True:
            tree = process_tree(proc.pid)
            n_samples += 1
            if tree:
                counted_kib = {pid: st.rss_pages * _PAGE_SIZE // 1024 for pid, st in tree.items()}
                for pid, st in tree.items():
                    if st.fork_no_exec and st.ppid in tree:
                        uss = _uss_kib(pid)
                        counted_kib[pid] = counted_kib[pid] if uss is None else uss
                peak_raw_pages = max(peak_raw_pages, sum(st.rss_pages for st in tree.values()))
                total = sum(counted_kib.values())
                if total > peak_kib:
                    peak_kib = total
                    peak_tree = sorted(
                        ((round(kib / 1024.0, 1), _cmdline(pid)) for pid, kib in counted_kib.items()),
                        reverse=True,
                    )
                peak_procs = max(peak_procs, len(tree))
                now = time.perf_counter()
                if pss_interval_s is not None and now >= next_pss:
                    peak_pss_kib = max(peak_pss_kib, sum(_pss_kib(pid) for pid in tree))
                    next_pss = now + pss_interval_s
            try:
                proc.wait(timeout=interval_s)
                break
            except subprocess.TimeoutExpired:
                continue
        wall_s = time.perf_counter() - t0
        out.flush()
        out.seek(0, os.SEEK_END)
        size = out.tell()
        out.seek(max(0, size - 4 * tail_chars))
        tail = out.read().decode("utf-8", errors="replace")[-tail_chars:]
    return {
        "cmd": cmd,
        "wall_s": round(wall_s, 3),
        "peak_rss_mib": round(peak_kib / 1024.0, 1),
        "peak_rss_raw_mib": round(peak_raw_pages * _PAGE_SIZE / _MIB, 1),
        "peak_pss_mib": round(peak_pss_kib / 1024.0, 1) if pss_interval_s is not None else None,
        "peak_processes": peak_procs,
        "peak_tree_mib": peak_tree,
        "n_samples": n_samples,
        "returncode": proc.returncode,
        "stdout_tail": tail,
    }


class _Heartbeat:
    """Prints a line every ``period_s`` seconds while a long command runs (keeps logs alive)."""

    def __init__(self, label: str, period_s: float = 60.0) -> None:
        self.label, self.period_s = label, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.wait(self.period_s):
            print(f"  ... {self.label}: {time.perf_counter() - t0:.0f} s", flush=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


def heartbeat(label: str, period_s: float = 60.0) -> _Heartbeat:
    """Context manager printing progress every ``period_s`` seconds."""
    return _Heartbeat(label, period_s)


# --------------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------------


def _atomic_write_text(path: Path, text: str) -> None:
    from automedseg.io import atomic_write_text

    atomic_write_text(path, text)


def write_results(name: str, figures: dict, summary_md: str, *,
                  results_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``benchmarks/results/<name>.json`` and ``<name>.md`` atomically.

    ``figures`` is written as JSON; a ``machine`` entry (machine_info()) and a ``created_utc`` timestamp
    are added unless already present. ``results_dir`` (created if needed) replaces ``benchmarks/results``,
    e.g. for smoke runs whose figures must not be committed.

    Returns:
        The paths of the JSON and Markdown files.
    """
    data = dict(figures)
    data.setdefault("benchmark", name)
    data.setdefault("created_utc", datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    data.setdefault("machine", machine_info())
    out_dir = RESULTS_DIR if results_dir is None else Path(results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    md_path = out_dir / f"{name}.md"
    _atomic_write_text(json_path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    kept = "".join(f"\n{m.group(0)}\n" for m in _SECTION.finditer(md_path.read_text())) if md_path.is_file() else ""
    _atomic_write_text(md_path, summary_md.rstrip("\n") + "\n" + kept)
    return json_path, md_path


_SECTION = re.compile(r"<!-- section:(?P<key>[\w.-]+) -->\n.*?<!-- /section:(?P=key) -->", re.S)


def write_section(md_path: Path, key: str, text: str) -> None:
    r"""Put ``text`` into ``md_path`` as the section ``key``, replacing that section or appending it.

    Another script's results file can so carry this script's figures (e.g. the 2D prediction speed inside
    ``predict_speed.md``); :func:`write_results` keeps such sections when it rewrites the file.

    Example:
        >>> import tempfile
        >>> md = Path(tempfile.mkdtemp()) / "r.md"
        >>> _ = md.write_text("# main\n")
        >>> write_section(md, "2d", "two"); write_section(md, "2d", "three")
        >>> print(md.read_text())
        # main
        <BLANKLINE>
        <!-- section:2d -->
        three
        <!-- /section:2d -->
        <BLANKLINE>
    """
    if not re.fullmatch(r"[\w.-]+", key):
        raise ValueError(f"section key {key!r}: use letters, digits, '_', '.' or '-'")
    block = f"<!-- section:{key} -->\n{text.strip()}\n<!-- /section:{key} -->"
    old = md_path.read_text() if md_path.is_file() else ""
    found = [m for m in _SECTION.finditer(old) if m.group("key") == key]
    new = (old[:found[0].start()] + block + old[found[0].end():] if found
           else (old.rstrip("\n") + "\n\n" if old.strip() else "") + block + "\n")
    _atomic_write_text(md_path, new)


def md_table(header: list[str], rows: list[list[object]]) -> str:
    """A small Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


AUTOMEDSEG_CLI = "import sys; from automedseg.cli import main; sys.exit(main(prog_name='automedseg'))"


def automedseg_env(threads: int = BENCH_THREADS) -> dict[str, str]:
    """This environment with ``threads`` thread pools, this checkout first on ``PYTHONPATH`` and unbuffered output."""
    env = dict(os.environ)
    env.update(thread_env(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_automedseg(args: list, *, logs: Path, label: str, env: dict[str, str] | None = None,
                   tail_lines: int = 20) -> dict:
    """Run ``automedseg ARGS`` from this checkout with a heartbeat, its output time-stamped into
    ``logs/<label>.log`` and the CPU other processes used meanwhile (``predict_speed.run_timestamped``).

    Returns:
        ``wall_s``, ``returncode`` (0), ``foreign_cpu``, ``log`` and ``lines`` (the output's text lines).

    Raises:
        RuntimeError: The command failed (its last ``tail_lines`` lines are printed first).
    """
    from predict_speed import run_timestamped

    args = [str(a) for a in args]
    print(f"[{label}] automedseg {' '.join(args)}", flush=True)
    logs.mkdir(parents=True, exist_ok=True)
    with heartbeat(label):
        res = run_timestamped([sys.executable, "-c", AUTOMEDSEG_CLI, *args], env=env or automedseg_env(),
                              cwd=REPO_ROOT, log_path=logs / f"{label.replace(' ', '_').replace('/', '_')}.log")
    res["lines"] = [text for _, text in res["lines"]]
    print(f"  -> rc={res['returncode']} wall={res['wall_s']} s", flush=True)
    if res["returncode"] != 0:
        print("\n".join(res["lines"][-tail_lines:]), flush=True)
        raise RuntimeError(f"{label} failed (rc={res['returncode']}); log: {res['log']}")
    return res
