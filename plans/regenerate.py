"""Regenerate the example plans in this folder (run after changing planning rules).

    python plans/regenerate.py [--hippocampus ../shared/data/msd_hippocampus]

Plans are made with the nominal device profiles so they are byte-identical on every machine:
``reference-cpu-2core`` (a 2-core AVX-512 CPU) and ``reference-gpu-24g`` (one 24 GiB GPU).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from automedseg.demo import make_demo_dataset
from automedseg.fingerprint import compute_fingerprint
from automedseg.io import load_dataset_spec
from automedseg.planning import NOMINAL_PROFILES, plan_dataset

HERE = Path(__file__).resolve().parent
DEMO_BUDGET_S = 120.0


def demo_plan() -> str:
    """The demo dataset's plan for the nominal 2-core CPU with the demo's 2-minute budget."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = load_dataset_spec(make_demo_dataset(Path(tmp) / "Dataset_Demo"))
        fp = compute_fingerprint(spec, jobs=1)
    plans = plan_dataset(fp, device=NOMINAL_PROFILES["reference-cpu-2core"], time_budget_s=DEMO_BUDGET_S)
    return plans.to_json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hippocampus", type=Path, default=HERE.parent.parent / "shared/data/msd_hippocampus")
    args = parser.parse_args()
    (HERE / "demo_cpu.json").write_text(demo_plan())
    if (args.hippocampus / "dataset.json").is_file():
        fp = compute_fingerprint(load_dataset_spec(args.hippocampus), jobs=2)
        cpu = plan_dataset(fp, device=NOMINAL_PROFILES["reference-cpu-2core"], time_budget_s=20 * 60.0)
        (HERE / "hippocampus_cpu_20min.json").write_text(cpu.to_json())
        gpu = plan_dataset(fp, device=NOMINAL_PROFILES["reference-gpu-24g"])
        (HERE / "hippocampus_gpu.json").write_text(gpu.to_json())
    else:
        print(f"{args.hippocampus}: not found, hippocampus plans left as they are")


if __name__ == "__main__":
    main()
