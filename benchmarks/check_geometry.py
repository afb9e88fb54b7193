"""Check that every predicted mask has exactly its input image's geometry.

    python benchmarks/check_geometry.py INPUT_DIR PREDICTION_DIR

Compares size, spacing, origin and direction (SimpleITK header values, no tolerance) of each prediction
with its input (nnU-Net ``CASE_0000`` files or one, possibly 4D, file per case) and exits 1 on any
mismatch or missing prediction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import SimpleITK as sitk

from automedseg.io import discover_images, file_ending


def _geometry(path: Path) -> tuple:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size, spacing, origin = reader.GetSize(), reader.GetSpacing(), reader.GetOrigin()
    direction = reader.GetDirection()
    n = 3 if len(size) >= 3 else len(size)
    if len(size) == 4:  # MSD 4D input: compare the spatial part
        direction = tuple(direction[r * 4 + c] for r in range(3) for c in range(3))
    return size[:n], spacing[:n], origin[:n], direction


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input_dir", type=Path)
    parser.add_argument("prediction_dir", type=Path)
    parser.add_argument("--channels", type=int, default=1, help="Channels per case (nnU-Net layout).")
    args = parser.parse_args()
    cases = discover_images(args.input_dir, n_channels=args.channels)
    bad = 0
    for case in cases:
        ending = file_ending(case.images[0])
        pred = args.prediction_dir / f"{case.case_id}{ending}"
        if not pred.is_file():
            print(f"{pred}: missing")
            bad += 1
            continue
        want, got = _geometry(case.images[0]), _geometry(pred)
        for name, w, g in zip(("size", "spacing", "origin", "direction"), want, got):
            if tuple(w) != tuple(g):
                print(f"{pred}: {name} {g} != input {w}")
                bad += 1
    print(f"{len(cases)} cases checked, {bad} problem(s): size, spacing, origin and direction "
          f"{'all identical to the inputs' if not bad else 'differ'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
