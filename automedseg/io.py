"""Reading and writing images, dataset discovery, and atomic file writes (re-exported).

Two raw layouts are read in place:

* **nnU-Net v2**: ``dataset.json`` with ``channel_names``, ``labels`` (name -> int), ``numTraining`` and
  ``file_ending``; images ``imagesTr/CASE_XXXX<ending>`` (one file per channel), labels
  ``labelsTr/CASE<ending>``, optional ``imagesTs/``.
* **Medical Segmentation Decathlon**: ``dataset.json`` with ``modality``, ``labels`` (id -> name) and a
  ``training`` list of ``{"image", "label"}`` paths; several channels are stored as one 4D NIfTI.

Every image becomes a float32 array ``(C, Z, Y, X)`` in SimpleITK array order; 2D images (PNG, TIFF,
JPEG, BMP) become ``(C, 1, Y, X)``. The :class:`Geometry` of each file (size, spacing, origin, direction)
is kept so predictions can be written back with exactly the input's geometry.

Example:
    >>> spec = load_dataset_spec(Path("Task04_Hippocampus"))  # doctest: +SKIP
    >>> image, label, geometry = read_case(spec.cases[0])     # doctest: +SKIP
    >>> image.shape, geometry.spacing_zyx                      # doctest: +SKIP
    ((1, 36, 50, 35), (1.0, 1.0, 1.0))

The images and their geometry are :mod:`automedseg.images`, the dataset layouts :mod:`automedseg.layouts`, the atomic
writes :mod:`automedseg.atomic`; this module re-exports their names for the callers that know them from here.
"""

from __future__ import annotations

from automedseg.atomic import (  # noqa: F401  (re-exported: the writers callers know from here)
    _temp_path,
    atomic_save_figure,
    atomic_save_npy,
    atomic_save_npz,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from automedseg.case_files import CaseFiles  # noqa: F401  (re-exported)
from automedseg.errors import DatasetError  # noqa: F401  (re-exported)
from automedseg.geometry import Geometry  # noqa: F401  (re-exported)
from automedseg.images import (  # noqa: F401  (re-exported)
    IMAGE_ENDINGS,
    IMAGE_ENDINGS_2D,
    IMAGE_ENDINGS_3D,
    discover_images,
    file_ending,
    label_dtype,
    read_image_file,
    read_images,
    read_label,
    write_array,
    write_segmentation,
)
from automedseg.layouts import DatasetSpec, load_dataset_spec  # noqa: F401  (re-exported)
