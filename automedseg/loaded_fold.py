"""A fold's network ready for inference with the plan it was trained with (torch or ONNX Runtime alike).

Its own module so that :mod:`automedseg.inference` (the torch loader) and :mod:`automedseg.onnx_engine` (the
ONNX Runtime loader) both build it without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from automedseg.plans import ConfigurationPlan, Plans


@dataclass
class LoadedFold:
    """A network ready for inference and the plan it was trained with."""

    plans: Plans
    config: ConfigurationPlan
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor]  # or an ONNX Runtime session (onnx_engine)
    path: Path
