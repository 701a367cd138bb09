"""Reading real MRI for AGI-Net: case discovery (NIfTI, DICOM, datalists), checked loading, rigid
registration, intensity normalization, 2D slice datasets, splits and misalignment transforms.

A bundle typically calls::

    train = build_slice_dataset(datalist, ["T1", "T2"], "PD", (256, 256), split="training", cache_dir=cache,
                                transform=RandShiftChanneld("image", magnitude_px=(0.0, 3.0)))
    infer = build_inference_dataset(folder, ["T1", "T2"], (256, 256))
    # a slice-wise inferer over infer[i]["image"], then:
    restore = restore_geometry_transforms(infer.transform, "pred", output_dir, output_postfix="PD")

The pieces (``discover_cases``, ``preprocessing_transforms``, ``build_volume_dataset``, ``SliceDataset``)
can be wired separately in a config.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

# Names are imported from their submodules on first use (PEP 562): the engines and the networks import
# agi_monai.data.errors and .files, and must not need SimpleITK, pydicom or nibabel, which the readers
# and registration import (a GPU training image may hold only torch, MONAI and Ignite).
_SUBMODULES: dict[str, tuple[str, ...]] = {
    "contrasts": (
        "CONTRAST_ALIASES",
        "CONTRASTS",
        "LABELS",
        "canonical_contrast",
        "choose_reference",
        "parse_filename",
        "patient_id",
    ),
    "datasets": (
        "SliceDataset",
        "build_inference_dataset",
        "build_slice_dataset",
        "build_volume_dataset",
        "slice_dataset",
    ),
    "dicom": (
        "DICOM_CONTRAST_RULES",
        "DicomSeries",
        "convert_dicom_to_nifti",
        "find_dicom_series",
        "match_series_to_contrasts",
        "write_dicom_series",
    ),
    "discovery": (
        "Discovery",
        "discover_cases",
    ),
    "errors": (
        "DataError",
        "Failure",
        "MissingFileError",
        "failure_reason",
        "format_failures",
    ),
    "files": (
        "AtomicNibabelWriter",
        "CaseOutputLayout",
        "atomic_output",
        "check_output_folder",
        "case_id_of_output",
        "check_report_path",
        "is_bids_derivative",
        "nifti_is_complete",
        "refuse_foreign_outputs",
        "stopping_cleanly_on_sigterm",
        "synthesis_output_paths",
        "write_json",
    ),
    "foreground": (
        "foreground_mask",
    ),
    "patches": (
        "PatchDataset",
        "patch_dataset",
    ),
    "registration": (
        "RigidRegistration",
        "field_of_view_overlap",
        "normalized_mutual_information",
        "register_rigid",
        "resample_to_reference",
        "same_grid",
        "same_voxel_centres",
    ),
    "splits": (
        "SPLIT_NAMES",
        "datalist_patients",
        "preparation_summary",
        "prepare_datalist",
        "split_cases",
        "write_datalist",
    ),
    "transforms": (
        "AddForegroundMaskd",
        "AlignToReferenced",
        "CheckStackedContrastsd",
        "LoadVolumed",
        "NameAfterCased",
        "RandRigidMisalignChanneld",
        "RandShiftChanneld",
        "ScaleIntensityToPercentiled",
        "is_synthetic_nifti",
        "network_grid_transforms",
        "preprocessing_transforms",
        "restore_geometry_transforms",
        "spacing_mismatch",
        "stacked_input_transforms",
        "synthetic_description",
    ),
    "volumes": (
        "check_volume",
        "echo_frames",
        "load_volume",
        "metatensor_to_sitk",
        "sitk_to_metatensor",
    ),
}
_SUBMODULE_OF = {name: module for module, names in _SUBMODULES.items() for name in names}
__all__ = sorted(_SUBMODULE_OF)


# Every submodule, also as an attribute (agi_monai.data.dicom.X after a plain `import agi_monai.data`).
_MODULES = frozenset(info.name for info in pkgutil.iter_modules(__path__))


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"agi_monai.data.{name}")  # (the import system sets the attribute)
    module = _SUBMODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'agi_monai.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"agi_monai.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _MODULES)
