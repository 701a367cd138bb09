"""MONAI dictionary transforms shared by training and inference, and the chain that turns a case
(a dictionary of contrast -> file) into network-ready, geometry-restorable items.

The chain (:func:`preprocessing_transforms`), in order:

1. :class:`LoadVolumed` - read and check each contrast (NIfTI or DICOM series).
2. :class:`ScaleIntensityToPercentiled` - per volume, [0, max = 99.5th percentile] -> [0, 1], clipped.
3. :class:`AlignToReferenced` - resample every contrast onto the reference contrast's grid, with a rigid
   registration when the grids differ; where a resampled contrast has no data (outside its field of view) is
   kept as a coverage mask (``"coverage"``).
4. ``ConcatItemsd`` - inputs stacked as channels in scenario order (``"image"``); the target as ``"target"``.
5. :class:`AddForegroundMaskd` - the foreground of the inputs (``"mask"``).
6. ``Orientationd`` (RAS: axial slices along the last axis), then to the in-plane size: ``ResizeWithPadOrCropd``
   for training and evaluation (the paper's fixed slice size), or, for inference (``crop=False``), ``SpatialPadd``
   to at least that size and ``DivisiblePadd`` to a multiple of 8, so that no part of a larger slice is lost.
   These are the only spatial changes after step 3, and ``Invertd`` undoes them
   (:func:`restore_geometry_transforms`), putting a prediction back on the reference contrast's grid.
7. :class:`RestrictToCoveraged` - the mask cut down to what every contrast covers (training: whole slices;
   evaluation: voxels), or, for inference, a warning for an input that covers too little; ``"coverage"`` is removed.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import (
    Affine,
    Compose,
    ConcatItemsd,
    DeleteItemsd,
    DivisiblePadd,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandomizableTransform,
    ResizeWithPadOrCropd,
    SaveImaged,
    ScaleIntensityRange,
    SpatialPadd,
    SplitDimd,
)
from monai.transforms.utils_pytorch_numpy_unification import percentile

from agi_monai.data.contrasts import choose_reference
from agi_monai.data.errors import DataError
from agi_monai.data.files import FORM_KEYS, AtomicNibabelWriter, CaseOutputLayout
from agi_monai.data.foreground import inputs_foreground
from agi_monai.data.registration import (
    coverage_mask,
    register_rigid,
    resample_to_reference,
    same_grid,
    same_voxel_centres,
)
from agi_monai.data.volumes import load_volume, metatensor_to_sitk, sitk_to_metatensor

__all__ = [
    "LoadVolumed",
    "ScaleIntensityToPercentiled",
    "AlignToReferenced",
    "CheckStackedContrastsd",
    "AddForegroundMaskd",
    "RestrictToCoveraged",
    "NameAfterCased",
    "RandShiftChanneld",
    "RandRigidMisalignChanneld",
    "network_grid_transforms",
    "preprocessing_transforms",
    "restore_geometry_transforms",
    "stacked_input_transforms",
    "spacing_mismatch",
    "is_synthetic_nifti",
    "synthetic_description",
    "synthetic_series_descriptions",
]

#: The version of what :func:`preprocessing_transforms` makes of the same files and settings, recorded with every
#: cache entry (agi_monai/data/datasets.py): an entry of another version is built again. Raise it when the output
#: changes. 2: slices and voxels outside a contrast's field of view leave the mask (:class:`RestrictToCoveraged`).
#: 3: a label map that does not cover the brain is refused (an entry made with one would still be served), and a
#: contrast stored in another axis order on the same voxel centres is reordered, not registered.
PREPROCESSING_VERSION = 3

REGISTRATION_KEY = "registration"
"""Item key holding, per contrast, the 4x4 RAS matrix mapping reference world points to that contrast's."""

COVERAGE_KEY = "coverage"
"""Item key holding, between :class:`AlignToReferenced` and :class:`RestrictToCoveraged`, one 0/1 channel per
resampled contrast: where it has data on the reference grid (its names in the tensor's ``meta["contrasts"]``)."""

_logger = logging.getLogger(__name__)


def _labels_its_faces(label: Any) -> bool:
    """Whether a label map (C, H, W, D) holds a nonzero label on any of the six faces of its own grid."""
    values = torch.as_tensor(label)[0] != 0
    return any(bool(values.select(axis, index).any()) for axis in range(3) for index in (0, -1))


def _labelled_volume(image: sitk.Image) -> float:
    """mm³ of the nonzero voxels of a label map."""
    return float(np.count_nonzero(sitk.GetArrayViewFromImage(image))) * float(np.prod(image.GetSpacing()))


def _check_labels_kept(label: sitk.Image, resampled: sitk.Image, source: str, reference: str) -> None:
    """Refuses a label map most of whose labels fall outside the reference grid once resampled onto it: a map whose
    header places it elsewhere (an identity affine written by a tool) was resampled to an empty map and scored as a
    case without tumour. (Nearest-neighbour resampling onto another spacing moves the volume by a few per cent.)"""
    before, after = _labelled_volume(label), _labelled_volume(resampled)
    if before > 0 and after < 0.5 * before:
        raise DataError(
            source, f"labels {before:.0f} mm³, of which {after:.0f} mm³ fall on the grid of {reference}: its header "
                    "places most of them outside the case's images",
            "a label map on its case's images (the header geometry of the images it was drawn on)",
        )


def _source(volume: Any, key: Hashable) -> str:
    return volume.meta.get("filename_or_obj", str(key)) if isinstance(volume, MetaTensor) else str(key)


class LoadVolumed(MapTransform):
    """Load each key's NIfTI file or DICOM series as a checked channel-first float32 ``MetaTensor``.

    See :func:`agi_monai.data.load_volume`: a bad file raises a :class:`DataError` naming it.

    Args:
        keys: the contrast keys to load.
        allow_missing_keys: skip keys absent from the item.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        item = dict(data)
        for key in self.key_iterator(item):
            item[key] = load_volume(item[key])
        return item


class CheckStackedContrastsd(MapTransform):
    """Refuses a loaded image that is not the contrasts stacked along its last axis (MONAI Label's one-file input,
    the bundles' ``pre_transforms``): MONAI's ``SplitDimd`` would otherwise fail on a plain 3D volume with
    "count of splits must match output_postfixes, 2 != 155", naming neither the file nor the layout.

    Args:
        keys: the stacked image's key (``"image"``), as ``LoadImaged`` gives it (channel last).
        contrasts: the contrasts expected along the last axis, in order.
        allow_missing_keys: skip keys absent from the item.
    """

    def __init__(self, keys: KeysCollection, contrasts: Sequence[str], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.contrasts = list(contrasts)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        item = dict(data)
        for key in self.key_iterator(item):
            shape = tuple(item[key].shape)
            if len(shape) != 4 or shape[-1] != len(self.contrasts):
                raise DataError(
                    _source(item[key], key),
                    f"has shape {shape}",
                    f"a 4D image (X, Y, Z, {len(self.contrasts)}): the contrasts {', '.join(self.contrasts)} of one "
                    "case on one grid, stacked along the last axis in this order",
                )
        return item


class ScaleIntensityToPercentiled(MapTransform):
    """Per volume, map [0, p] to [0, 1] and clip, p being the volume's ``upper_percentile`` (the paper: 99.5).
    With ``clip=False`` the values above p stay above 1 (an evaluation's ground truth: see
    :func:`agi_monai.evaluation.volume_dataset`).

    MONAI's ``ScaleIntensityRangePercentiles`` takes the lower bound from a percentile too (the volume's
    minimum at 0); the paper fixes it at intensity 0, which differs for data with negative values.
    The percentile is kept in the item's metadata as ``"intensity_percentile_value"``.

    Args:
        keys: the contrast keys to normalize.
        upper_percentile: percentile of the whole volume mapped to 1.
        clip: clip to [0, 1] (the paper's normalisation).
        allow_missing_keys: skip keys absent from the item.
    """

    def __init__(
        self, keys: KeysCollection, upper_percentile: float = 99.5, clip: bool = True, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.upper_percentile = upper_percentile
        self.clip = clip

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        item = dict(data)
        for key in self.key_iterator(item):
            volume = item[key]
            upper = float(percentile(volume, self.upper_percentile))
            if upper <= 0:
                raise DataError(
                    _source(volume, key),
                    f"has its {self.upper_percentile:g}th intensity percentile at {upper:g}",
                    "a positive upper percentile (an MR magnitude image)",
                )
            item[key] = ScaleIntensityRange(a_min=0.0, a_max=upper, b_min=0.0, b_max=1.0, clip=self.clip)(volume)
            if isinstance(item[key], MetaTensor):
                item[key].meta["intensity_percentile_value"] = upper
        return item


#: :class:`AlignToReferenced`'s ``registration`` choices.
REGISTRATION_MODES = ("rigid", "rigid_all", "header")


class AlignToReferenced(MapTransform):
    """Put every key on the grid of ``reference_key``; images on another grid are rigidly registered first.

    A key already on the reference grid is left untouched (``registration="rigid"``). Otherwise the image is registered
    to the reference (``"rigid"``, :func:`agi_monai.data.register_rigid`) or aligned by its header only
    (``"header"``), then resampled (linear; nearest for ``label_keys``, which are never registered themselves).
    ``"rigid_all"`` registers the contrasts on the reference's grid too: acquisitions planned on one slice
    prescription share a header grid, but the head may have moved between them (the shipped native TCGA T1 and
    T1Gd: 9.6 degrees), which a header cannot show; what is already aligned (BraTS' co-registered contrasts) gains
    nothing but a registration's time and sub-voxel error. The resampled volume takes the reference's metadata (grid, applied operations), keeping
    its own file name, so later spatial transforms and their inversion treat all contrasts alike.
    The transform of each key is kept in ``item["registration"][key]`` (4x4, RAS world, reference ->
    that contrast; identity when no resampling was needed).

    A resampled contrast is 0 where the reference grid lies outside its field of view. Which voxels those are is
    kept in ``item[coverage_key]``: a (K, H, W, D) uint8 ``MetaTensor`` on the reference grid, one channel per
    resampled contrast or label map, 1 where it has data (:func:`agi_monai.data.registration.coverage_mask`:
    from the geometry, as the intensities have zeros inside a field of view too), its contrasts named in
    ``meta["contrasts"]`` (the label keys among them also in ``meta["labels"]``). Absent when nothing was resampled
    (every contrast covers the whole grid).
    :class:`RestrictToCoveraged` uses it and removes it.

    Args:
        keys: the contrast (and label) keys to align, the reference included.
        reference_key: the contrast whose grid the others take.
        registration: ``"rigid"``, ``"rigid_all"`` or ``"header"``.
        label_keys: keys holding label maps.
        registration_options: keyword arguments for :func:`agi_monai.data.register_rigid`.
        allow_missing_keys: skip keys absent from the item.
        coverage_key: where to put the coverage; None to keep none.
    """

    def __init__(
        self,
        keys: KeysCollection,
        reference_key: str,
        registration: str = "rigid",
        label_keys: Sequence[str] = (),
        registration_options: Mapping[str, Any] | None = None,
        allow_missing_keys: bool = False,
        coverage_key: str | None = COVERAGE_KEY,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if registration not in REGISTRATION_MODES:
            raise ValueError(f"registration must be one of {', '.join(map(repr, REGISTRATION_MODES))}, got "
                             f"{registration!r}.")
        self.reference_key = reference_key
        self.registration = registration
        self.label_keys = tuple(label_keys)
        self.registration_options = dict(registration_options or {})
        self.coverage_key = coverage_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        item = dict(data)
        reference = item[self.reference_key]
        reference_image = metatensor_to_sitk(reference)
        matrices = dict(item.get(REGISTRATION_KEY, {}))
        covered: dict[str, np.ndarray] = {}
        cut_labels: list[str] = []  # label maps labelling the faces of their own grid
        for key in self.key_iterator(item):
            matrices[key] = np.eye(4)
            if key == self.reference_key:
                continue
            moving = item[key]
            moving_image = metatensor_to_sitk(moving)
            register = self.registration in ("rigid", "rigid_all") and key not in self.label_keys
            if same_grid(moving_image, reference_image) and not (register and self.registration == "rigid_all"):
                # the reference's sform/qform and their codes too (which space the shared affine maps to; a qform that
                # differs from it): the outputs, on the reference's grid, take them from the first input's metadata
                codes = {k: reference.meta[k] for k in FORM_KEYS if k in reference.meta}
                if any(not np.array_equal(np.asarray(moving.meta.get(k)), np.asarray(v)) for k, v in codes.items()):
                    meta = {**copy.deepcopy(moving.meta), **codes}
                    item[key] = MetaTensor(moving.as_tensor(), meta=meta, applied_operations=moving.applied_operations)
                continue
            # the same grid stored in another axis order (RAS and LPS, axial and sagittal): the contrasts were saved
            # co-registered, as on one grid; registering them would only add a sub-millimetre error and blur
            reordered = same_voxel_centres(moving_image, reference_image)
            transform = None
            if register and (not reordered or self.registration == "rigid_all"):
                result = register_rigid(
                    reference_image, moving_image, moving_name=_source(moving, key), **self.registration_options
                )
                transform, matrices[key] = result.transform, result.matrix_ras
            interpolation = "nearest" if key in self.label_keys else "linear"
            resampled = resample_to_reference(moving_image, reference_image, transform, interpolation)
            if key in self.label_keys:
                _check_labels_kept(moving_image, resampled, _source(moving, key), _source(reference, self.reference_key))
            if self.coverage_key is not None and not (reordered and transform is None):
                # SimpleITK arrays are (z, y, x), the MetaTensors (x, y, z)
                coverage = coverage_mask(moving_image, reference_image, transform)
                covered[str(key)] = sitk.GetArrayFromImage(coverage).transpose(2, 1, 0)
                if key in self.label_keys and _labels_its_faces(moving):
                    cut_labels.append(str(key))
            aligned = sitk_to_metatensor(resampled)
            meta = copy.deepcopy(reference.meta)
            meta.update(
                {k: moving.meta[k] for k in ("filename_or_obj", "intensity_percentile_value") if k in moving.meta}
            )
            item[key] = MetaTensor(
                aligned.as_tensor(), meta=meta, applied_operations=copy.deepcopy(reference.applied_operations)
            )
        item[REGISTRATION_KEY] = matrices
        if covered:
            meta = copy.deepcopy(reference.meta)
            meta["contrasts"] = list(covered)
            # a label map drawn on a smaller grid is whole if it labels nothing on that grid's faces (a grid cropped to
            # the brain); one labelling its faces was cut where the structure goes on (the faces of a slab)
            meta["labels"] = [str(key) for key in self.label_keys if str(key) in covered]
            meta["labels_cut"] = [key for key in meta["labels"] if key in cut_labels]
            item[self.coverage_key] = MetaTensor(
                torch.from_numpy(np.ascontiguousarray(np.stack(list(covered.values())))),
                meta=meta,
                applied_operations=copy.deepcopy(reference.applied_operations),
            )
        return item


class AddForegroundMaskd(MapTransform):
    """Add the foreground (head; brain for skull-stripped data) of ``key`` as a 0/1 channel ``mask_key``.

    The mask is the foreground of the channel mean of ``key`` (the inputs, so that training and inference see the
    same mask): :func:`agi_monai.data.foreground.inputs_foreground`.

    Args:
        keys: the key of the stacked inputs (one key).
        mask_key: where to put the mask.
        threshold: fraction of the 99th percentile above which a voxel is foreground.
    """

    def __init__(self, keys: KeysCollection, mask_key: str = "mask", threshold: float = 0.05) -> None:
        super().__init__(keys)
        self.mask_key = mask_key
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        item = dict(data)
        key = self.first_key(item)
        image = item[key]
        mask_tensor = torch.from_numpy(inputs_foreground(image, self.threshold)[None].astype(np.float32))
        if isinstance(image, MetaTensor):
            mask_tensor = MetaTensor(
                mask_tensor, meta=copy.deepcopy(image.meta), applied_operations=copy.deepcopy(image.applied_operations)
            )
        item[self.mask_key] = mask_tensor
        return item


class RestrictToCoveraged(MapTransform):
    """What to do about contrasts that do not cover the whole reference grid (a FLAIR slab of 40 slices on a
    64-slice T2 grid, an input cropped in plane): :class:`AlignToReferenced` zero-filled them there, and its
    ``"coverage"`` says where. Takes that key out of the item, after the spatial transforms (so that it is cut,
    padded and oriented like the mask, slices along the last axis), and:

    - ``"slices"`` (training, validation): clears the mask of every axial slice whose foreground some contrast
      (an input or the target) leaves uncovered by more than ``1 - min_slice_coverage``, and of every voxel outside
      the common coverage. :class:`agi_monai.data.SliceDataset` then drops those slices (they hold brain in the
      inputs and zeros in the target, or the reverse: a generator trained on them learns to output black); the
      3D patch sampler draws patch centres only inside the mask's bounding box. One warning per case counts them
      and names the contrasts.
    - ``"voxels"`` (evaluation): clears the mask outside the voxels every contrast covers, so that metrics
      measure no zero-filled voxel; one warning per case counts the voxels left out and names the contrasts.
    - ``"warn"`` (inference: the mask is left as it is): warns, naming the case and the input, when an input
      covers less than ``min_input_coverage`` of the foreground: the synthesis there is extrapolation.

    A label map (``meta["labels"]`` of the coverage) covering less than ``min_slice_coverage`` of the foreground and
    labelling the faces of its own grid (``meta["labels_cut"]``: cut through what it labels) is a :class:`DataError`
    naming its file, in every mode. An item without ``"coverage"`` (every contrast on the
    reference grid, e.g. BraTS) is returned unchanged.

    Args:
        keys: the coverage key (one).
        mask_key: the foreground mask (1, H, W, D).
        mode: ``"slices"``, ``"voxels"`` or ``"warn"``.
        target: the target contrast (named as such in the warnings), if any.
        min_slice_coverage: ``"slices"``: the share of a slice's foreground every contrast must cover.
        min_input_coverage: ``"warn"``: the share of the foreground an input must cover not to be warned about.
    """

    modes = ("slices", "voxels", "warn")

    def __init__(
        self,
        keys: KeysCollection = COVERAGE_KEY,
        mask_key: str = "mask",
        mode: str = "slices",
        target: str | None = None,
        min_slice_coverage: float = 0.99,
        min_input_coverage: float = 0.9,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        if mode not in self.modes:
            raise ValueError(f"RestrictToCoveraged: mode {mode!r} (expected one of {', '.join(self.modes)})")
        self.mask_key = mask_key
        self.mode = mode
        self.target = target
        self.min_slice_coverage = min_slice_coverage
        self.min_input_coverage = min_input_coverage

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        item = dict(data)
        key = self.keys[0]
        if key not in item:  # nothing was resampled: every contrast covers the whole grid
            return item
        coverage = item.pop(key)
        meta = coverage.meta if isinstance(coverage, MetaTensor) else {}
        names = list(meta.get("contrasts", []))
        covered = torch.as_tensor(coverage).bool()  # (K, H, W, D)
        if len(names) != covered.shape[0]:
            raise ValueError(f"RestrictToCoveraged: {key!r} has {covered.shape[0]} channels, names {names}")
        mask = item[self.mask_key]
        foreground = torch.as_tensor(mask)[0] > 0
        total = int(foreground.sum())
        if not total:
            return item
        shares = {name: int((foreground & inside).sum()) / total for name, inside in zip(names, covered)}
        self._refuse_cut_label_maps(item, shares, set(meta.get("labels_cut", [])))
        # the images' coverage, not the label maps', decides what the mask keeps
        labels = set(meta.get("labels", []))
        images = {name: inside for name, inside in zip(names, covered) if name not in labels}
        if not images:
            return item
        shares = {name: shares[name] for name in images}
        case = str(item.get("case_id") or _source(item.get("image"), "case"))
        if self.mode == "warn":
            self._warn_of_partial_inputs(case, shares)
            return item
        keep = torch.stack(list(images.values())).all(dim=0)
        if self.mode == "slices":
            keep[..., self._slices_lacking_coverage(case, foreground, images, shares)] = False
        else:
            self._warn_of_voxels_left_out(case, int((foreground & ~keep).sum()), total, shares)
        item[self.mask_key] = mask * keep[None].to(torch.as_tensor(mask).dtype)
        return item

    def _refuse_cut_label_maps(self, item: Mapping[Hashable, Any], shares: Mapping[str, float], cut: set[str]) -> None:
        """A label map is ground truth: where a cut one does not reach, "no tumour" would be scored as if it had
        been drawn. No mode can make up for it, so the case is refused. (One labelling nothing on its grid's
        faces, e.g. drawn on a grid cropped to the brain, holds all it labels.)"""
        for name, share in shares.items():
            if name in cut and share < self.min_slice_coverage:
                raise DataError(
                    _source(item.get(name), name),
                    f"the label map covers only {100 * share:.0f}% of the head/brain on the images' grid, and labels "
                    "the edge of its own field of view (it was cut where the labelled structure goes on)",
                    f"a label map covering at least {100 * self.min_slice_coverage:.0f}% of it, or labelling nothing "
                    "on the faces of its own grid (drawn on the images' grid, or on one holding all it labels)",
                )

    def _warn_of_partial_inputs(self, case: str, shares: Mapping[str, float]) -> None:
        """Mode ``"warn"``: one warning per input covering less than ``min_input_coverage`` of the foreground."""
        for name, share in shares.items():
            if share < self.min_input_coverage:
                _logger.warning(
                    "%s: %s covers only %.0f%% of the head/brain on the reference grid (expected at least %.0f%%):"
                    " the synthesis outside its field of view is extrapolation from the other inputs",
                    case, name, 100 * share, 100 * self.min_input_coverage,
                )

    def _slices_lacking_coverage(
        self, case: str, foreground: torch.Tensor, covered: Mapping[str, torch.Tensor], shares: Mapping[str, float]
    ) -> torch.Tensor:
        """Mode ``"slices"``: the axial slices (a (D,) bool) holding foreground that some contrast leaves uncovered
        by more than ``1 - min_slice_coverage``; one warning counts them and names the contrasts."""
        per_slice = foreground.sum(dim=(0, 1))
        lacking = {
            name: (foreground & ~inside).sum(dim=(0, 1)) > (1.0 - self.min_slice_coverage) * per_slice
            for name, inside in covered.items()
        }
        dropped = torch.stack(list(lacking.values())).any(dim=0) & (per_slice > 0)
        if bool(dropped.any()):
            _logger.warning(
                "%s: %d of the %d slices holding foreground dropped for lack of coverage (mask cleared, so no "
                "training or validation slice is taken from them): %s",
                case, int(dropped.sum()), int((per_slice > 0).sum()),
                "; ".join(
                    f"{self._named(name)} does not cover the foreground of {int(slices.sum())} of them "
                    f"(it covers {100 * shares[name]:.0f}% of the case's foreground)"
                    for name, slices in lacking.items() if bool(slices.any())
                ),
            )
        return dropped

    def _warn_of_voxels_left_out(self, case: str, outside: int, total: int, shares: Mapping[str, float]) -> None:
        """Mode ``"voxels"``: one warning counting the ``outside`` of the ``total`` foreground voxels some contrast
        does not cover, naming those contrasts."""
        if outside:
            _logger.warning(
                "%s: the mask keeps the %d of its %d voxels covered by every contrast, %d left out (outside the field "
                "of view of %s): metrics measure no zero-filled voxel",
                case, total - outside, total, outside,
                ", ".join(f"{self._named(name)}, which covers {100 * share:.0f}%"
                          for name, share in shares.items() if share < 1.0),
            )

    def _named(self, contrast: str) -> str:
        return f"{contrast} (the target)" if contrast == self.target else contrast


class NameAfterCased(MapTransform):
    """Set each key's file name in its metadata to the item's ``"case_id"``, so that MONAI's savers name
    outputs after the case (input file names such as ``t1.nii.gz`` repeat across cases)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        item = dict(data)
        if "case_id" not in item:
            return item
        for key in self.key_iterator(item):
            if isinstance(item[key], MetaTensor):
                item[key].meta["filename_or_obj"] = f"{item['case_id']}.nii.gz"
        return item


class RandShiftChanneld(RandomizableTransform, MapTransform):
    """Translate one input channel by a random sub-pixel vector of a given length (2D or 3D, pixels).

    Simulates residual misalignment of one contrast: for training augmentation (a length drawn from a
    range) and for the robustness test (a fixed level of 0, 0.5, ..., 3 px: ``magnitude_px=(level, level)``).
    The direction is uniform; the channel is shifted with bilinear interpolation (MONAI ``Affine``) and
    zeros enter at the border. :attr:`shift`, the last draw, is ``Affine``'s ``translate_params`` (array axes):
    the image content moves by **minus** that vector (:mod:`agi_monai.evaluation.robustness` records the true
    displacement).

    Args:
        keys: keys of channel-first images (e.g. ``"image"``, the stacked inputs).
        magnitude_px: (min, max) length of the shift vector, in pixels.
        channel: the channel to shift; None picks one at random per call.
        prob: probability of shifting at all.
        in_plane: for (C, H, W, D) volumes, shift within the axial plane only (the same 2D shift for every
            slice, as the 2D robustness test applies to each slice).
    """

    def __init__(
        self,
        keys: KeysCollection,
        magnitude_px: tuple[float, float] = (0.0, 3.0),
        channel: int | None = None,
        prob: float = 1.0,
        in_plane: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.magnitude_px = magnitude_px
        self.channel = channel
        self.in_plane = in_plane
        self.shift: np.ndarray | None = None
        self.shifted_channel = 0

    def randomize(self, spatial_dims: int, channels: int) -> None:  # type: ignore[override]
        super().randomize(None)
        direction = self.R.normal(size=spatial_dims)
        if self.in_plane:
            direction[2:] = 0.0
        direction /= max(np.linalg.norm(direction), 1e-12)
        self.shift = direction * self.R.uniform(*self.magnitude_px)
        self.shifted_channel = self.channel if self.channel is not None else int(self.R.randint(channels))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        item = dict(data)
        first = item[self.first_key(item)]
        self.randomize(first.ndim - 1, first.shape[0])
        if not self._do_transform:
            return item
        for key in self.key_iterator(item):
            item[key] = _warp_channel(
                item[key],
                self.shifted_channel,
                Affine(translate_params=self.shift.tolist(), padding_mode="zeros", image_only=True),
            )
        return item


class RandRigidMisalignChanneld(RandomizableTransform, MapTransform):
    """Move one input channel of a 3D volume rigidly: a rotation of a given angle about a random axis
    through the volume centre, then a translation of a given length in a random direction (mm).

    The 3D counterpart of :class:`RandShiftChanneld`, in physical units: the voxel spacing comes from the
    ``MetaTensor``'s affine (1 mm when absent), so anisotropic volumes rotate correctly.

    Args:
        keys: keys of channel-first 3D images.
        rotation_deg: (min, max) rotation angle in degrees.
        translation_mm: (min, max) translation length in mm.
        channel: the channel to move; None picks one at random per call.
        prob: probability of moving at all.
    """

    def __init__(
        self,
        keys: KeysCollection,
        rotation_deg: tuple[float, float] = (0.0, 3.0),
        translation_mm: tuple[float, float] = (0.0, 3.0),
        channel: int | None = None,
        prob: float = 1.0,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.rotation_deg = rotation_deg
        self.translation_mm = translation_mm
        self.channel = channel
        # the last draws: the unit axis and the angle (degrees) of the rotation, its matrix, the translation (mm)
        self.axis = np.array([0.0, 0.0, 1.0])
        self.angle_deg = 0.0
        self.rotation = np.eye(3)
        self.translation = np.zeros(3)
        self.moved_channel = 0

    def randomize(self, channels: int) -> None:  # type: ignore[override]
        super().randomize(None)
        axis, direction = self.R.normal(size=3), self.R.normal(size=3)
        self.axis = axis / max(np.linalg.norm(axis), 1e-12)
        direction /= max(np.linalg.norm(direction), 1e-12)
        self.angle_deg = float(self.R.uniform(*self.rotation_deg))
        self.rotation = _rotation_matrix(self.axis, math.radians(self.angle_deg))
        self.translation = direction * self.R.uniform(*self.translation_mm)
        self.moved_channel = self.channel if self.channel is not None else int(self.R.randint(channels))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        item = dict(data)
        first = item[self.first_key(item)]
        if first.ndim != 4:
            raise ValueError(f"RandRigidMisalignChanneld needs (C, X, Y, Z) volumes, got shape {tuple(first.shape)}.")
        self.randomize(first.shape[0])
        if not self._do_transform:
            return item
        for key in self.key_iterator(item):
            spacing = _spacing(item[key])
            # the physical motion x -> R x + t, expressed on voxel coordinates (Affine works in voxels)
            to_mm, to_voxels = np.diag(spacing), np.diag(1.0 / spacing)
            motion = np.eye(4)
            motion[:3, :3] = to_voxels @ self.rotation @ to_mm
            motion[:3, 3] = to_voxels @ self.translation
            # MONAI's Affine maps output coordinates to input ones: moving content by ``motion`` needs its inverse
            warp = Affine(affine=torch.as_tensor(np.linalg.inv(motion)), padding_mode="zeros", image_only=True)
            item[key] = _warp_channel(item[key], self.moved_channel, warp)
        return item


def _warp_channel(image: torch.Tensor, channel: int, warp: Affine) -> torch.Tensor:
    plane = image[channel : channel + 1]
    plane = plane.as_tensor() if isinstance(plane, MetaTensor) else torch.as_tensor(plane)
    warped = warp(plane.float())
    output = image.clone()
    output[channel : channel + 1] = (warped.as_tensor() if isinstance(warped, MetaTensor) else warped).to(output.dtype)
    return output


def _spacing(image: Any) -> np.ndarray:
    """The voxel spacing (mm) of a ``MetaTensor``; 1 mm for an array without an affine."""
    if isinstance(image, MetaTensor):
        return affine_to_spacing(np.asarray(image.affine, dtype=np.float64), suppress_zeros=False)
    return np.ones(3)


def _rotation_matrix(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues' formula: rotation by ``angle`` (radians) about the unit vector ``axis``."""
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def preprocessing_transforms(
    inputs: Sequence[str],
    target: str | None = None,
    spatial_size: Sequence[int] = (256, 256),
    reference: str | None = None,
    registration: str = "rigid",
    labels: Sequence[str] = (),
    upper_percentile: float = 99.5,
    mask_threshold: float = 0.05,
    registration_options: Mapping[str, Any] | None = None,
    crop: bool = True,
    size_multiple: int = 8,
    clip_target: bool = True,
    coverage: str | None = None,
    min_slice_coverage: float = 0.99,
    min_input_coverage: float = 0.9,
) -> Compose:
    """The deterministic chain from a case (contrast -> file) to network-ready volumes, shared by training
    and inference.

    The output item holds ``"image"`` (inputs as channels in the order of ``inputs``, (C, H, W, D),
    values in [0, 1]), ``"target"`` (1, H, W, D) when ``target`` is given, ``"mask"`` (1, H, W, D, 0/1),
    each label key (1, H, W, D), and ``"registration"`` (see :class:`AlignToReferenced`). H, W is
    ``spatial_size`` (with ``crop=False``: at least that, a multiple of ``size_multiple``); D the number of
    axial slices of the reference grid in RAS orientation.

    Args:
        inputs: input contrasts in scenario order, e.g. ``("T1", "T2")``.
        target: the contrast to synthesize; None for inference without ground truth.
        spatial_size: in-plane size after padding/cropping: (256, 256) IXI, (240, 240) BraTS.
        reference: the contrast whose grid all take; default :func:`agi_monai.data.choose_reference` of
            ``inputs`` (it must be an input, so that inference finds it).
        registration: ``"rigid"`` (register contrasts on other grids), ``"rigid_all"`` (also those on the
            reference's grid: separate acquisitions of one slice prescription) or ``"header"`` (resample only).
        labels: label keys to carry along (e.g. ``("seg",)``), resampled with nearest neighbour.
        upper_percentile: intensity percentile mapped to 1 (the paper: 99.5).
        mask_threshold: see :func:`agi_monai.data.foreground_mask`.
        registration_options: keyword arguments for :func:`agi_monai.data.register_rigid`.
        crop: True (training, evaluation): pad or crop each slice to ``spatial_size``, centred. False
            (inference): pad only, to at least ``spatial_size`` and to a multiple of ``size_multiple``: a slice
            larger than ``spatial_size`` (a 256-row native scan for a 240x240 bundle, a 0.5 mm grid) is kept
            whole, where a crop would leave its border rows as zeros in the synthesized volume.
        size_multiple: ``crop=False``: what each in-plane size is padded to a multiple of (the networks' 8).
        clip_target: clip the target to [0, 1] like the inputs (training). False keeps its values above its
            99.5th percentile (above 1): what BraSyn's evaluation normalises by its own percentiles.
        coverage: what to do where a contrast resampled onto the reference grid does not cover it
            (:class:`RestrictToCoveraged`): ``"slices"`` (training; the default with a ``target``) clears the mask
            of the slices whose foreground some contrast leaves uncovered, so that slice datasets drop them;
            ``"voxels"`` (evaluation: :func:`agi_monai.evaluation.volume_dataset`) clears the mask outside the
            voxels every contrast covers; ``"warn"`` (the default without a ``target``: inference) only warns
            about an input covering less than ``min_input_coverage`` of the foreground.
        min_slice_coverage: ``coverage="slices"``: the share of a slice's foreground each contrast must cover.
        min_input_coverage: ``coverage="warn"``: the share of the foreground below which an input is warned about.
    """
    inputs = list(inputs)
    if target is not None and target in inputs:
        raise ValueError(f"target {target!r} is one of the inputs {inputs} (expected a contrast other than the inputs)")
    reference = reference or choose_reference(inputs)
    if reference not in inputs:
        raise ValueError(
            f"reference {reference!r} must be one of the inputs {inputs} (the target is missing at inference)."
        )
    images = inputs + ([target] if target else [])
    labels = list(labels)
    coverage = coverage or ("slices" if target else "warn")
    if coverage not in RestrictToCoveraged.modes:
        raise ValueError(f"coverage={coverage!r}; expected one of {', '.join(RestrictToCoveraged.modes)}")
    outputs = ["image"] + (["target"] if target else []) + ["mask"] + labels

    def spatial(keys: list[str], allow_missing_keys: bool = False) -> list[Any]:
        return network_grid_transforms(keys, spatial_size, crop, size_multiple, allow_missing_keys)

    stacking = [ConcatItemsd(inputs, "image")] + ([ConcatItemsd([target], "target")] if target else [])
    return Compose(
        [
            LoadVolumed(images + labels),
            ScaleIntensityToPercentiled(inputs, upper_percentile),
            *([ScaleIntensityToPercentiled([target], upper_percentile, clip=clip_target)] if target else []),
            AlignToReferenced(images + labels, reference, registration, labels, registration_options),
            *stacking,
            DeleteItemsd(images),
            AddForegroundMaskd("image", "mask", mask_threshold),
            *spatial(outputs),
            # the coverage (present only when a contrast was resampled) is cut and oriented like the mask, in
            # transforms of its own so that a missing key is never skipped silently among the others
            *spatial([COVERAGE_KEY], allow_missing_keys=True),
            RestrictToCoveraged(COVERAGE_KEY, "mask", coverage, target, min_slice_coverage, min_input_coverage),
        ]
    )


def network_grid_transforms(
    keys: list[str], spatial_size: Sequence[int], crop: bool = True, size_multiple: int = 8,
    allow_missing_keys: bool = False,
) -> list[Any]:
    """The volumes' geometry for the networks: RAS, then each slice cropped or padded to ``spatial_size``, centred
    (``crop``), or padded to at least ``spatial_size`` and to a multiple of ``size_multiple`` (inference: a larger
    slice is kept whole). One place for :func:`preprocessing_transforms` and :func:`stacked_input_transforms`, whose
    inverses (``Invertd``) restore the input's grid."""
    if crop:
        fit = [ResizeWithPadOrCropd(keys, spatial_size=(*spatial_size, -1), allow_missing_keys=allow_missing_keys)]
    else:
        fit = [
            SpatialPadd(keys, spatial_size=(*spatial_size, -1), allow_missing_keys=allow_missing_keys),
            DivisiblePadd(keys, k=(size_multiple, size_multiple, 1), allow_missing_keys=allow_missing_keys),
        ]
    return [Orientationd(keys, axcodes="RAS", labels=None, allow_missing_keys=allow_missing_keys), *fit]


def stacked_input_transforms(
    inputs: Sequence[str], spatial_size: Sequence[int], upper_percentile: float = 99.5, size_multiple: int = 8
) -> Compose:
    """``inference.json``'s ``pre_transforms`` (MONAI Label's): one file of the ``inputs`` stacked along its last axis
    (checked: :class:`CheckStackedContrastsd`) -> ``"image"`` (C, H, W, D), each contrast scaled to its
    ``upper_percentile`` as :func:`preprocessing_transforms` scales it, on the inference grid
    (:func:`network_grid_transforms` with ``crop=False``). Registration and the brain mask are left out: the contrasts
    of one file share one grid."""
    channels = [f"image_{contrast}" for contrast in inputs]
    return Compose([
        LoadImaged("image", image_only=True, dtype=np.float32),
        CheckStackedContrastsd("image", inputs),
        EnsureChannelFirstd("image", channel_dim=-1),
        SplitDimd("image", output_postfixes=list(inputs), keepdim=True),
        ScaleIntensityToPercentiled(channels, upper_percentile),
        ConcatItemsd(channels, "image"),
        DeleteItemsd(channels),
        *network_grid_transforms(["image"], spatial_size, crop=False, size_multiple=size_multiple),
    ])


def restore_geometry_transforms(
    preprocessing: Compose,
    keys: KeysCollection = "pred",
    output_dir: str | Path | None = None,
    output_postfix: str = "synth",
    orig_key: str = "image",
    description: str = "",
) -> Compose:
    """Postprocessing that puts predictions made on preprocessed items back on the reference contrast's
    original grid (``Invertd`` of the orientation and pad/crop), and writes them as NIfTI when
    ``output_dir`` is given (``<case_id>_<output_postfix>.nii.gz``, or a BIDS name in a BIDS derivative folder:
    :func:`agi_monai.data.synthesis_output_paths`).

    Args:
        preprocessing: the chain the items came from (:func:`preprocessing_transforms`).
        keys: prediction keys, each (C, H, W, D) like ``orig_key``.
        output_dir: where to write (atomically); None to only restore the geometry.
        output_postfix: what the output names say after the case: the synthesized contrast.
        orig_key: the preprocessed key whose history is inverted.
        description: the written files' NIfTI header description (:class:`AtomicNibabelWriter`), e.g.
            :func:`synthetic_description`'s.
    """
    steps: list[Any] = [
        Invertd(keys, transform=preprocessing, orig_keys=orig_key, nearest_interp=False, to_tensor=True)
    ]
    if output_dir is not None:
        steps.append(NameAfterCased(keys))
        save = SaveImaged(
            keys,
            resample=False,
            print_log=False,
            writer=AtomicNibabelWriter,
            folder_layout=CaseOutputLayout(output_dir, output_postfix),
        )
        save.set_options(init_kwargs={"description": description})
        steps.append(save)
    return Compose(steps)


def spacing_mismatch(image: Any, training_spacing: Sequence[float] | None, tolerance: float = 0.25) -> str | None:
    """What to warn about when a preprocessed image's spacing is not the training data's: the networks work on the
    acquired grid (no resampling, as in the paper), so a 0.5 mm scan shows them anatomy at twice the scale they
    learned. A 2D bundle's ``training_spacing`` has two entries and only the in-plane axes are compared (it works
    slice by slice); a 3D bundle's has three, and the through-plane axis is compared too (its kernels span slices:
    5.5 mm clinical slices are not the 1 mm isotropic volumes it learned from). None when within ``tolerance``
    (relative) on every compared axis, or without a training spacing.

    Args:
        image: the preprocessed ``"image"`` (C, H, W, D), a ``MetaTensor`` in RAS.
        training_spacing: the bundle's ``training_spacing`` (mm: H, W for 2D bundles; H, W, D for 3D ones), or None.
        tolerance: the relative difference tolerated.
    """
    if training_spacing is None or not isinstance(image, MetaTensor):
        return None
    expected = np.asarray(training_spacing, dtype=np.float64).ravel()
    if expected.size not in (2, 3) or np.any(expected <= 0):
        raise ValueError(
            f"training_spacing {list(training_spacing)}: expected two positive spacings in mm (H, W: a 2D bundle) "
            "or three (H, W, D: a 3D bundle)"
        )
    spacing = _spacing(image)[: expected.size]
    if np.all(np.abs(spacing - expected) <= tolerance * expected):
        return None
    axes = "in-plane spacing" if expected.size == 2 else "spacing"
    shown, trained = (" x ".join(f"{value:.3g}" for value in values) for values in (spacing, expected))
    return (
        f"{axes} {shown} mm, the bundle's training data {trained} mm: the network sees the anatomy at another scale "
        "than it learned (expect a poorer synthesis; resample the inputs to the training spacing first)"
    )


def synthetic_description(target: str, inputs: Sequence[str], source: str) -> str:
    """The NIfTI header description of a synthesized volume, e.g. "SYNTHETIC T1Gd from T1,T2,FLAIR by
    brats_t1_t2_flair_to_t1gd", cut to the header's 80 characters.

    Args:
        target: the synthesized contrast.
        inputs: the contrasts it was made from.
        source: what made it (the bundle's name).
    """
    return f"SYNTHETIC {target} from {','.join(inputs)} by {source}"[:80]


def synthetic_series_descriptions(
    target: str, inputs: Sequence[str], source: str, reference: str, application: str | None = None
) -> tuple[str, str]:
    """The SeriesDescription and DerivationDescription of a synthesized DICOM series, e.g. "SYNTHETIC FLAIR
    brats_t1_t2_to_flair" (cut to the tag's 64 characters) and "Synthetic FLAIR made by AGI-Net bundle
    brats_t1_t2_to_flair (agi-monai 0.1.0) from T1, T2 on the T2 grid; research use only, not for diagnosis".

    Args:
        target: the synthesized contrast.
        inputs: the contrasts it was made from.
        source: what made it (the bundle's name).
        reference: the input contrast whose grid it is on.
        application: what ran the bundle when not the ``agi-monai`` command, e.g. ``"MONAI Deploy app"``; named after
            the version.
    """
    from agi_monai import __version__

    made_with = f"agi-monai {__version__}" + (f", {application}" if application else "")
    return (
        f"SYNTHETIC {target} {source}"[:64],
        f"Synthetic {target} made by AGI-Net bundle {source} ({made_with}) from {', '.join(inputs)} on the "
        f"{reference} grid; research use only, not for diagnosis",
    )


def is_synthetic_nifti(path: str | Path) -> bool:
    """Whether ``path`` is a NIfTI file whose header description is :func:`synthetic_description`'s mark (what
    every synthesis route writes); False for any other file, or one that cannot be read as NIfTI."""
    import nibabel as nib

    try:
        description = np.asarray(nib.load(str(path)).header["descrip"]).item()
    except Exception:  # not NIfTI, truncated, unreadable: not a synthesized volume either way
        return False
    return isinstance(description, bytes) and description.startswith(b"SYNTHETIC ")
