"""The files of one case (:class:`CaseFiles`), without reading any image.

Shared by the readers of image files (:mod:`automedseg.images`), of DICOM series (:mod:`automedseg.dicom`) and
of dataset layouts (:mod:`automedseg.layouts`), none of which needs the others to name a case.

Example:
    >>> c = CaseFiles("case_001", (Path("imagesTr/case_001_0000.nii.gz"),), Path("labelsTr/case_001.nii.gz"))
    >>> c.case_id, c.label.name
    ('case_001', 'case_001.nii.gz')
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case.

    Attributes:
        case_id: Case identifier (file name without channel suffix and ending).
        images: One path per channel file (nnU-Net layout), or a single (possibly 4D) path (MSD), or the folder
            of a DICOM series.
        label: Label file, ``None`` for test cases.
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None
