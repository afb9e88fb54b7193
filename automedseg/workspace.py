"""The work folder of a dataset: where every stage reads and writes.

Layout::

    <work>/
      fingerprint.json              dataset fingerprint (automedseg plan)
      plans.json                    the plan: every configuration (automedseg plan)
      preprocessed/<data_id>/       cache: <case>.npy, <case>_seg.npy, <case>_locs.npz, <case>.json
      splits.json                   the 5-fold cross-validation split (first automedseg train)
      <configuration>/fold_<K>/     checkpoints, log, plan copy, validation outputs (automedseg train)
      <configuration>/postprocessing.json   post-processing chosen on cross-validation (automedseg find-best)
      postprocessing_<A+B>.json     the same for an ensemble
      find_best.json                best configuration / ensemble (automedseg find-best)
      intensity_reference.json      training images' intensity landmarks (predict --match-intensities)
      adapt.json                    how the model was adapted from another (automedseg adapt)
      report/                       report.html, report.md, fig_*.png (automedseg report, automedseg demo)

Paths are passed explicitly as a :class:`Workspace`; only the CLI reads the ``AUTOMEDSEG_WORK_DIR``
environment variable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    """Paths inside one dataset's work folder."""

    root: Path

    @classmethod
    def for_dataset(cls, dataset: Path, work_dir: Path | None = None) -> Workspace:
        """The work folder given, or ``<dataset>/automedseg``."""
        return cls(Path(work_dir) if work_dir is not None else Path(dataset) / "automedseg")

    @property
    def fingerprint_path(self) -> Path:
        return self.root / "fingerprint.json"

    @property
    def plans_path(self) -> Path:
        return self.root / "plans.json"

    @property
    def splits_path(self) -> Path:
        return self.root / "splits.json"

    @property
    def preprocessed_root(self) -> Path:
        return self.root / "preprocessed"

    def preprocessed_dir(self, data_identifier: str) -> Path:
        return self.preprocessed_root / data_identifier

    def configuration_dir(self, configuration: str) -> Path:
        return self.root / configuration

    def fold_dir(self, configuration: str, fold: int | str) -> Path:
        return self.root / configuration / f"fold_{fold}"

    def postprocessing_path(self, configuration: str) -> Path:
        return self.root / configuration / "postprocessing.json"
