"""automedseg: self-configuring medical image segmentation that plans for the machine and time it is given.

The Python API (:mod:`automedseg.api`), importable from here:

- `plan(dataset, work_dir=..., time_budget=...)` -> `Plans`: check, fingerprint, plan and preprocess a dataset.
- `train(work_dir, configuration=..., fold=...)` -> `FoldResult`: train (or resume) one fold.
- `load_model(work_dir_or_bundle)` -> `Predictor`: a trained model in memory; `Predictor.predict` segments a
  NumPy array (with its spacing) or a SimpleITK image.
- `predict(images, model=..., output_dir=...)`: a folder of images into mask files, or images in memory.
- `evaluate(reference_dir, prediction_dir)` -> `EvaluationSummary`: Dice, HD95, NSD ... of masks.

Nothing heavy is imported until one of them is used (``automedseg --help`` stays instant).

Example:
    >>> import automedseg
    >>> automedseg.duration_seconds("1h30m")
    5400.0
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from automedseg.version import __version__

if TYPE_CHECKING:
    from automedseg.api import duration_seconds, evaluate, load_model, plan, predict, train
    from automedseg.inference import FolderReport
    from automedseg.metrics import CaseMetrics, EvaluationSummary
    from automedseg.plans import Plans
    from automedseg.predictor import Predictor
    from automedseg.training_options import FoldResult

#: Public name -> the module that defines it (imported on first use).
_EXPORTS = {
    "plan": "automedseg.api", "train": "automedseg.api", "predict": "automedseg.api", "evaluate": "automedseg.api",
    "load_model": "automedseg.api", "duration_seconds": "automedseg.api", "EvaluationSummary": "automedseg.metrics",
    "CaseMetrics": "automedseg.metrics", "Predictor": "automedseg.predictor", "Plans": "automedseg.plans",
    "FoldResult": "automedseg.training_options", "FolderReport": "automedseg.inference",
}

__all__ = ["plan", "train", "load_model", "predict", "evaluate", "Predictor", "Plans", "FoldResult", "FolderReport",
           "EvaluationSummary", "CaseMetrics", "duration_seconds", "__version__"]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'automedseg' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
