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

from agi_monai.data.contrasts import (
    CONTRAST_ALIASES,
    CONTRASTS,
    LABELS,
    canonical_contrast,
    choose_reference,
    parse_filename,
    patient_id,
)
from agi_monai.data.datasets import (
    SliceDataset,
    build_inference_dataset,
    build_slice_dataset,
    build_volume_dataset,
    slice_dataset,
)
from agi_monai.data.dicom import (
    DICOM_CONTRAST_RULES,
    DicomSeries,
    convert_dicom_to_nifti,
    find_dicom_series,
    match_series_to_contrasts,
    write_dicom_series,
)
from agi_monai.data.discovery import Discovery, discover_cases
from agi_monai.data.errors import DataError, Failure, MissingFileError, failure_reason, format_failures
from agi_monai.data.files import (
    AtomicNibabelWriter,
    atomic_output,
    check_output_folder,
    check_report_path,
    stopping_cleanly_on_sigterm,
    write_json,
)
from agi_monai.data.foreground import foreground_mask
from agi_monai.data.patches import PatchDataset, patch_dataset
from agi_monai.data.registration import (
    RigidRegistration,
    field_of_view_overlap,
    normalized_mutual_information,
    register_rigid,
    resample_to_reference,
    same_grid,
)
from agi_monai.data.splits import SPLIT_NAMES, preparation_summary, prepare_datalist, split_cases, write_datalist
from agi_monai.data.transforms import (
    AddForegroundMaskd,
    AlignToReferenced,
    CheckStackedContrastsd,
    LoadVolumed,
    NameAfterCased,
    RandRigidMisalignChanneld,
    RandShiftChanneld,
    ScaleIntensityToPercentiled,
    is_synthetic_nifti,
    preprocessing_transforms,
    restore_geometry_transforms,
    spacing_mismatch,
    synthetic_description,
)
from agi_monai.data.volumes import check_volume, load_volume, metatensor_to_sitk, sitk_to_metatensor
