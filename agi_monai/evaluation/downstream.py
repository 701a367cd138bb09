"""Segmentation downstream evaluation: a synthesized contrast is as good as the tumour segmentation it allows
(BraSyn's criterion; METHOD §4 "Downstream").

A segmentation network trained on four real contrasts (``bundles/brats_segmentation``: MONAI SegResNet, the
model zoo's ``brats_mri_segmentation`` recipe, channels T1Gd, T1, T2, FLAIR) segments each labelled test case
under four **conditions** of the contrast under test (the *missing* contrast, e.g. T1Gd):

- ``"real"``: all four acquired contrasts;
- ``"synthesized"``: the missing contrast replaced by a synthesized one, either made here from the case's other
  contrasts by a synthesis bundle's generator through the bundle's own inferer, a 2D bundle's slice by slice, a 3D
  bundle's by sliding window (:class:`VolumeSynthesizer`, :func:`load_synthesizer`), or read from NIfTI files a
  synthesis bundle's ``inference.json`` already wrote (``<case_id>_<contrast>.nii.gz``, :class:`AttachSynthesizedd`);
- ``"zero_imputed"``: the missing contrast set to 0 everywhere;
- ``"mean_imputed"``: the missing contrast set, inside the case's brain mask, to one value, by default the mean of the
  real contrast over that mask (in the [0, 1]-normalised scale; 0 outside the mask). This per-case value is an
  oracle scalar taken from the contrast said to be missing; ``mean_value`` sets a fixed value instead (e.g. the
  training set's mean), which is what a deployment without the contrast could use.

Dice of the three BraTS regions, tumour core (TC), whole tumour (WT) and enhancing tumour (ET), on the network's
raw sigmoid channels, each thresholded on its own at >= 0.5 (MONAI ``Activations``/``AsDiscrete``, ``DiceMetric``;
the segmentation bundle's ``inference.json`` writes instead a nested label map, :func:`regions_to_label`, whose TC
and WT also hold the ET, and TC, predicted outside them, so that the Dice of a written map can differ):

- **3D**: per volume. A region absent from both the label and the prediction scores 1, absent from the label
  but predicted 0 (the BraTS convention; ``DiceMetric(ignore_empty=False)``).
- **2D**: per axial slice (last axis of the RAS volume), then the mean over the slices where the region is in
  the label *or* in the prediction: slices empty in both (most of a volume) are left out rather than counted as
  1, slices with a false-positive region only count 0. A case where no slice qualifies (region absent from both
  everywhere) scores 1, as in 3D. The number of slices averaged is reported per region (``slices2d_<region>``).

Every case is preprocessed by the synthesis bundles' chain (:func:`agi_monai.data.preprocessing_transforms`:
each contrast divided by its 99.5th percentile and clipped to [0, 1], all on the grid of the reference contrast
T2, RAS, padded/cropped in-plane to 240x240), so a synthesized contrast, which the synthesis bundles produce in
that scale, can be swapped in unchanged. The brain mask is the chain's ``"mask"`` (foreground of the mean of the
four real contrasts; the same in every condition).

Outputs (:func:`write_downstream`, each written atomically): ``downstream_per_case.csv`` (one row per case and
condition), ``downstream_summary.json`` (statistics per condition and metric, the differences to ``"real"``,
the protocol in words), ``downstream_summary.md`` (the table) and, from ``scripts/downstream_dice.py``,
``downstream_dice.png``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.config import KeysCollection
from monai.data import Dataset, MetaTensor
from monai.inferers import Inferer
from monai.metrics import DiceMetric
from monai.transforms import (
    Activations,
    AsDiscrete,
    Compose,
    ConvertToMultiChannelBasedOnBratsClasses,
    DeleteItemsd,
    MapLabelValue,
    MapTransform,
)
from monai.utils import convert_to_tensor

from agi_monai.bundle.registry import read_bundle
from agi_monai.data import (
    DataError,
    Failure,
    atomic_output,
    build_volume_dataset,
    canonical_contrast,
    choose_reference,
    load_volume,
    metatensor_to_sitk,
    preprocessing_transforms,
    same_grid,
    synthesis_output_paths,
    write_json,
)
from agi_monai.engines.checkpoint import expected_bundle_weights, load_weights
from agi_monai.engines.inference import infer_case
from agi_monai.evaluation.evaluator import CaseEvaluator
from agi_monai.evaluation.tables import statistics, write_csv, write_text

__all__ = [
    "CONDITIONS",
    "DOWNSTREAM_CSV",
    "DOWNSTREAM_JSON",
    "DOWNSTREAM_MD",
    "DOWNSTREAM_PNG",
    "LABEL_CONVENTIONS",
    "METRICS",
    "REGIONS",
    "SEGMENTATION_CONTRASTS",
    "AttachSynthesizedd",
    "BratsRegionsd",
    "DownstreamEvaluator",
    "LabelConvention",
    "VolumeSynthesizer",
    "condition_image",
    "downstream_bar_chart",
    "downstream_dataset",
    "downstream_markdown",
    "load_synthesizer",
    "network_record",
    "overrides_as_given",
    "region_dice",
    "regions_to_label",
    "segmentation_preprocessing",
    "summarize_downstream",
    "write_downstream",
]

_logger = logging.getLogger(__name__)

#: The model zoo's ``brats_mri_segmentation`` channel order.
SEGMENTATION_CONTRASTS = ("T1Gd", "T1", "T2", "FLAIR")
#: The output channels: tumour core, whole tumour, enhancing tumour.
REGIONS = ("TC", "WT", "ET")
#: What the missing contrast is replaced by (see the module docstring).
CONDITIONS = ("real", "synthesized", "zero_imputed", "mean_imputed")
#: Per-case columns, in order, after ``case_id`` and ``condition``.
METRICS = tuple(f"dice{dims}_{region}" for dims in ("3d", "2d") for region in REGIONS)
DOWNSTREAM_CSV = "downstream_per_case.csv"
DOWNSTREAM_JSON = "downstream_summary.json"
DOWNSTREAM_MD = "downstream_summary.md"
DOWNSTREAM_PNG = "downstream_dice.png"
#: The item key of a synthesized contrast read from a file (:class:`AttachSynthesizedd`).
SYNTHESIZED_KEY = "synthesized"

DICE_POLICY = (
    "sigmoid >= 0.5 per region channel (a logit of 0 counts), the raw TC, WT, ET channels each on its own (not "
    "the nested label map inference.json writes, whose TC and WT also take ET, and TC, predicted outside them); "
    "3D: Dice per volume, a region absent from label and prediction scores 1, "
    "absent from the label but predicted 0 (BraTS); 2D: Dice per axial slice, mean over the slices where the "
    "region is in the label or the prediction (slices empty in both left out, false-positive-only slices 0), "
    "1 when no slice qualifies"
)


# ------------------------------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelConvention:
    """The label values of one BraTS edition and how they make the TC/WT/ET regions.

    Attributes:
        name: the key in :data:`LABEL_CONVENTIONS`.
        labels: every value a label map of that edition may hold.
        et_label: the enhancing-tumour value (TC = NCR + ET, WT = TC + oedema).
        remap: values mapped before the regions are made (BRATS 2015's non-enhancing core 3 -> 1, in TC).
        description: the values in words.
    """

    name: str
    labels: tuple[int, ...]
    et_label: int
    remap: dict[int, int]
    description: str


LABEL_CONVENTIONS: dict[str, LabelConvention] = {
    c.name: c
    for c in (
        LabelConvention("brats2023", (0, 1, 2, 3), 3, {}, "BraTS 2023: 1 necrotic core, 2 oedema (SNFH), 3 enhancing"),
        LabelConvention(
            "brats2018", (0, 1, 2, 4), 4, {},
            "BraTS 2017-2022 (and BraTS-Toolkit fusions such as the shipped TCGA mav): 1 necrotic/non-enhancing "
            "core, 2 oedema, 4 enhancing",
        ),
        LabelConvention(
            "brats2015", (0, 1, 2, 3, 4), 4, {3: 1},
            "BRATS 2012-2016: 1 necrosis, 2 oedema, 3 non-enhancing core (counted in TC), 4 enhancing",
        ),
    )
}


def _convention(name: str) -> LabelConvention:
    if name not in LABEL_CONVENTIONS:
        raise ValueError(f"label_convention {name!r}: expected one of {sorted(LABEL_CONVENTIONS)}")
    return LABEL_CONVENTIONS[name]


class BratsRegionsd(MapTransform):
    """A BraTS label map -> three 0/1 channels TC, WT, ET (MONAI ``ConvertToMultiChannelBasedOnBratsClasses``,
    after ``MapLabelValue`` for BRATS 2015), written to ``output_key``.

    The label values are checked against the convention first: a BraTS 2023 map (ET = 3) read as BraTS 2018
    (ET = 4) would otherwise lose its enhancing tumour silently. Read as BRATS 2015, whose values it fits, it is
    warned about (label 3 without any 4).

    Args:
        keys: the label map key (one), (1, H, W, D).
        label_convention: a key of :data:`LABEL_CONVENTIONS`.
        output_key: where the (3, H, W, D) float32 regions go.

    Raises:
        DataError: the map holds a value outside the convention (naming the file and the values).
    """

    def __init__(self, keys: KeysCollection, label_convention: str = "brats2023", output_key: str = "label") -> None:
        super().__init__(keys)
        self.convention = _convention(label_convention)
        self.output_key = output_key
        remap = self.convention.remap
        self.remap = MapLabelValue(list(remap), list(remap.values())) if remap else None
        self.convert = ConvertToMultiChannelBasedOnBratsClasses(et_label=self.convention.et_label)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        item = dict(data)
        key = self.first_key(item)
        label = item[key]
        values = torch.unique(torch.as_tensor(label)).tolist()
        unexpected = [v for v in values if v not in self.convention.labels]
        if unexpected:
            source = label.meta.get("filename_or_obj", key) if isinstance(label, MetaTensor) else key
            others = [c.name for c in LABEL_CONVENTIONS.values() if set(values) <= set(c.labels)]
            raise DataError(
                source,
                f"holds label values {[_number(v) for v in unexpected]} outside the {self.convention.name} convention",
                f"values {list(self.convention.labels)} ({self.convention.description})"
                + (f"; these labels fit label_convention {' or '.join(others)}" if others else ""),
            )
        if self.convention.name == "brats2015" and 3 in values and 4 not in values:
            # the values cannot tell the two apart: a BraTS 2023 map (3 = enhancing) fits brats2015 (3 = non-enhancing
            # core), and read so its enhancing tumour is lost; a BRATS 2015 case without enhancement is legitimate
            source = label.meta.get("filename_or_obj", key) if isinstance(label, MetaTensor) else key
            _logger.warning(
                "%s: label 3 but no 4 under label_convention brats2015: 3 is counted as non-enhancing core, so ET is "
                "empty; if this is a BraTS 2023 map (3 = enhancing tumour), use label_convention brats2023", source,
            )
        plain = torch.as_tensor(label).round().to(torch.int16)
        if self.remap is not None:
            plain = torch.as_tensor(self.remap(plain))
        regions = torch.as_tensor(self.convert(plain)).to(torch.float32)
        if isinstance(label, MetaTensor):
            regions = MetaTensor(regions, meta=dict(label.meta), applied_operations=list(label.applied_operations))
        item[self.output_key] = regions
        return item


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def regions_to_label(regions: torch.Tensor, label_convention: str = "brats2023") -> torch.Tensor:
    """Three 0/1 channels TC, WT, ET (3, ...) -> a BraTS label map (1, ...) of ``label_convention``: ET -> its
    enhancing value, TC outside ET -> 1, WT outside TC -> 2 (the model zoo's inference output, any edition).

    The map nests the regions (ET in TC in WT); a network's channels need not: read back, the map's TC is TC or ET
    and its WT is WT, TC or ET, so its Dice can differ from that of the channels, which is what
    :class:`DownstreamEvaluator` and the bundle's validation measure."""
    regions = torch.as_tensor(regions) > 0
    if regions.shape[0] != 3:
        raise ValueError(f"regions have {regions.shape[0]} channels; expected 3 (TC, WT, ET)")
    tc, wt, et = regions[0], regions[1], regions[2]
    et_label = _convention(label_convention).et_label
    label = torch.where(et, et_label, torch.where(tc, 1, torch.where(wt, 2, 0)))
    return label[None].to(torch.uint8)


# ------------------------------------------------------------------------------------------ preprocessing


def segmentation_preprocessing(
    inputs: Sequence[str] = SEGMENTATION_CONTRASTS,
    spatial_size: Sequence[int] = (240, 240),
    label_key: str | None = "seg",
    label_convention: str = "brats2023",
    extra_keys: Sequence[str] = (),
    **preprocessing_options: Any,
) -> Compose:
    """The segmentation bundle's deterministic chain, shared by its training, evaluation and inference and by
    :class:`DownstreamEvaluator`: :func:`agi_monai.data.preprocessing_transforms` of the four contrasts (the
    synthesis bundles' [0, 1] scale, T2 grid, RAS, ``spatial_size`` in-plane), then the label map ``label_key``
    as TC/WT/ET channels ``"label"`` (:class:`BratsRegionsd`).

    Items: ``"image"`` (4, H, W, D) in the order of ``inputs``, ``"mask"`` (1, H, W, D), ``"label"`` (3, H, W, D)
    when ``label_key`` is given, each of ``extra_keys`` read as is (e.g. a synthesized contrast, already [0, 1]).

    Args:
        inputs: the contrasts in channel order (the model zoo's: T1Gd, T1, T2, FLAIR).
        spatial_size: in-plane size (240x240 for BraTS).
        label_key: the label map of the datalist items (``"seg"``); None for inference.
        label_convention: a key of :data:`LABEL_CONVENTIONS`.
        extra_keys: further volumes carried along without intensity normalisation (nearest-neighbour when
            resampled).
        preprocessing_options: further arguments of :func:`agi_monai.data.preprocessing_transforms`.
    """
    carried = ([label_key] if label_key else []) + list(extra_keys)
    chain = [preprocessing_transforms(inputs, None, spatial_size, labels=carried, **preprocessing_options)]
    if label_key:
        chain += [BratsRegionsd(label_key, label_convention, "label"), DeleteItemsd(label_key)]
    return Compose(chain)


class AttachSynthesizedd(MapTransform):
    """Add the synthesized file of a case to its datalist item: ``<folder>/<case_id>_<contrast>.nii.gz``, the
    name a synthesis bundle's ``inference.json`` writes, under ``"synthesized"``.

    The file must lie on the grid of the case's ``reference`` contrast (same shape, spacing, origin and
    direction), as the synthesis bundles write it: it is read as is (no intensity normalisation, no resampling).

    Args:
        folder: the synthesis bundle's ``output_dir``.
        contrast: the synthesized contrast (the file name's suffix).
        reference: the contrast whose grid the file must share (the preprocessing's reference, T2).

    Raises:
        DataError: the file is missing, unreadable, or on another grid.
    """

    def __init__(self, folder: str | Path, contrast: str, reference: str = "T2") -> None:
        self.reference = canonical_contrast(reference)
        super().__init__(self.reference)  # the key read besides the file: the reference contrast's path
        self.folder = Path(folder)
        self.contrast = canonical_contrast(contrast)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        item = dict(data)
        path = synthesis_output_paths(str(item["case_id"]), self.contrast, self.folder)[0]
        if not path.is_file():
            raise DataError(path, "not found", f"the synthesized {self.contrast} of case {item['case_id']}, as the "
                            f"synthesis bundle's inference.json names it (<case_id>_{self.contrast}.nii.gz, or its "
                            "BIDS name in a BIDS derivative)")
        synthesized, reference = load_volume(path), load_volume(item[self.reference])
        if not same_grid(metatensor_to_sitk(synthesized), metatensor_to_sitk(reference)):
            raise DataError(
                path, f"shape {tuple(synthesized.shape[1:])} is not on the grid of the case's {self.reference} "
                f"(shape {tuple(reference.shape[1:])})", f"the grid of {self.reference} (same shape, spacing, "
                "origin, direction), as a synthesis bundle's inference.json writes it",
            )
        item[SYNTHESIZED_KEY] = str(path)
        return item


def downstream_dataset(
    data: Sequence[Mapping[str, Any]],
    inputs: Sequence[str] = SEGMENTATION_CONTRASTS,
    spatial_size: Sequence[int] = (240, 240),
    label_convention: str = "brats2023",
    synthesized_dir: str | Path | None = None,
    missing_contrast: str | None = None,
    label_key: str = "seg",
    **preprocessing_options: Any,
) -> Dataset:
    """Preprocessed labelled cases for :class:`DownstreamEvaluator` (no cache: each case is read once).

    Args:
        data: datalist items with the four contrasts and ``label_key`` (:func:`agi_monai.data.discover_cases`).
        inputs, spatial_size, label_convention, label_key: as for :func:`segmentation_preprocessing`.
        synthesized_dir: a folder of synthesized ``<case_id>_<missing_contrast>.nii.gz`` (condition
            ``"synthesized"`` from files); None when a :class:`VolumeSynthesizer` makes them.
        missing_contrast: the synthesized contrast (needed with ``synthesized_dir``).
        preprocessing_options: further arguments of :func:`agi_monai.data.preprocessing_transforms`.
    """
    preprocessing = segmentation_preprocessing(
        inputs, spatial_size, label_key, label_convention, [SYNTHESIZED_KEY] if synthesized_dir else [],
        **preprocessing_options,
    )
    if synthesized_dir:
        if not missing_contrast:
            raise ValueError("synthesized_dir needs missing_contrast: the contrast its files hold")
        reference = preprocessing_options.get("reference") or choose_reference(list(inputs))
        preprocessing = Compose([AttachSynthesizedd(synthesized_dir, missing_contrast, reference), preprocessing])
    return build_volume_dataset(data, preprocessing)


# ------------------------------------------------------------------------------- training (the segmenter's)


# ----------------------------------------------------------------------------------------------- synthesis


class VolumeSynthesizer:
    """A synthesis bundle's generator applied to a case's input volume through the bundle's own ``inferer`` (its
    ``inference.json``'s: a 2D bundle's ``SliceInferer`` over whole axial slices, a 3D bundle's
    ``SlidingWindowInferer`` over ``patch_size`` patches), clipped to [0, 1] as that ``inference.json`` writes it.

    Called with the inputs stacked in :attr:`inputs` order, (C, H, W, D) in [0, 1], it returns the synthesized
    :attr:`target` (1, H, W, D).

    Args:
        network: the generator, weights loaded.
        inputs: its input contrasts in channel order.
        target: the contrast it synthesizes.
        inferer: the bundle's inferer, called with a batch of one (1, C, H, W, D).
        device: where the generator runs.
        amp: autocast on CUDA.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        inputs: Sequence[str],
        target: str,
        inferer: Inferer,
        device: str | torch.device = "cpu",
        amp: bool = False,
    ) -> None:
        self.network = network
        self.inputs = tuple(canonical_contrast(c) for c in inputs)
        self.target = canonical_contrast(target)
        self.inferer = inferer
        self.device = torch.device(device)
        self.amp = amp and self.device.type == "cuda"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = torch.as_tensor(image)
        if image.ndim != 4 or image.shape[0] != len(self.inputs):
            expected = f"({len(self.inputs)}, H, W, D): {', '.join(self.inputs)}"
            raise ValueError(f"inputs of shape {tuple(image.shape)}; expected {expected}")
        return infer_case(self.network, self.inferer, image, self.device, self.amp).clamp(0.0, 1.0)


def overrides_as_given(overrides: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """``--synthesis_overrides`` as a dict: JSON text (how ``scripts/downstream_dice.py`` passes them, see
    :func:`load_synthesizer`) decoded, a mapping copied; what :func:`load_synthesizer` applies and the summary's
    ``description`` records. ``downstream_dice.py`` writes each ``#`` of the text as the JSON escape ``\\u0023``:
    MONAI's config parser rewrites ``#`` to its other id separator ``::`` in every string of a config, so that
    ``network_def#channels`` was recorded as ``network_def::channels``."""
    if isinstance(overrides, str):
        return dict(json.loads(overrides)) if overrides.strip() else {}
    return dict(overrides or {})


def load_synthesizer(
    bundle: str | Path,
    checkpoint: str | Path | None = None,
    overrides: Mapping[str, Any] | str | None = None,
    device: str | torch.device = "cpu",
    amp: bool = False,
) -> VolumeSynthesizer:
    """The generator of a synthesis bundle (its ``inference.json``'s ``network_def``, ``inputs``, ``target``) with
    trained weights, as a :class:`VolumeSynthesizer` through the bundle's own ``inferer``: slice by slice for a 2D
    bundle, patch by patch for a 3D one (before, a 3D generator was wrapped in the 2D slice loop too, and every case
    failed on a channel error).

    Args:
        bundle: the synthesis bundle's folder (e.g. ``bundles/brats_t1_t2_flair_to_t1gd``).
        checkpoint: the generator's state dict; default the bundle's ``models/model.pt``.
        overrides: config overrides, e.g. ``{"network_def#channels": [8, 16, 16, 32]}`` (they must match the
            checkpoint), or the same as JSON text: how ``scripts/downstream_dice.py`` passes them through the
            segmentation bundle's config, whose parser would otherwise build a nested ``"_target_"`` (a whole
            ``network_def``) into an object before it reached here.
        device: where the generator runs.
        amp: autocast on CUDA.

    Raises:
        agi_monai.data.MissingFileError: no checkpoint (a ``FileNotFoundError``; no weights are shipped: train the
            bundle, or pass ``checkpoint``).
        agi_monai.data.DataError: the checkpoint cannot be read or does not fit the bundle's network with
            ``overrides`` (:func:`agi_monai.engines.load_weights`: the file and the differing tensors named).
    """
    info = read_bundle(bundle)
    overrides = overrides_as_given(overrides)
    checkpoint = Path(checkpoint) if checkpoint else info.weights
    parser = ConfigParser()
    parser.read_config(str(info.config_dir / "inference.json"))
    parser.update(dict(overrides or {}))
    expected = expected_bundle_weights(info.name, "--synthesis_overrides", overrides) + (
        "; none are shipped: train the bundle, or pass --synthesis_checkpoint"
    )
    network = load_weights(parser.get_parsed_content("network_def"), checkpoint, "cpu", expected)
    _logger.info("synthesis: %s (%s -> %s) with %s", info.name, ", ".join(info.inputs), info.target, checkpoint)
    return VolumeSynthesizer(
        network.to(device), info.inputs, info.target, parser.get_parsed_content("inferer"), device, amp
    )


def network_record(network: torch.nn.Module) -> dict[str, Any]:
    """What the summary's ``description`` records of the segmenter: its class, parameter count and the constructor
    arguments it keeps as attributes (SegResNet: ``spatial_dims``, ``init_filters``, ``in_channels``, ``blocks_down``,
    ``blocks_up``, ``dropout_prob``, ``norm``, ``act``...), i.e. the ``network_def`` as built, overrides included
    (a config's raw ``network_def`` cannot be recorded: the parser builds it into the network)."""
    import inspect

    record: dict[str, Any] = {
        "class": f"{type(network).__module__}.{type(network).__qualname__}",
        "parameters": sum(parameter.numel() for parameter in network.parameters()),
    }
    try:
        names = [name for name in inspect.signature(type(network).__init__).parameters if name != "self"]
    except (TypeError, ValueError):
        names = []
    for name in names:
        value = getattr(network, name, None)
        if value is None or isinstance(value, (torch.nn.Module, torch.Tensor)) or callable(value):
            continue
        record[name] = json.loads(json.dumps(value, default=str))
    return record


# ------------------------------------------------------------------------------------------ conditions, Dice


def condition_image(
    image: torch.Tensor,
    condition: str,
    channel: int,
    mask: torch.Tensor | None = None,
    synthesized: torch.Tensor | None = None,
    mean_value: float | None = None,
) -> tuple[torch.Tensor, float | None]:
    """The segmentation input under ``condition``: ``image`` (C, H, W, D) with channel ``channel`` kept
    (``"real"``), replaced by ``synthesized`` (1, H, W, D), by 0 (``"zero_imputed"``), or, inside ``mask``, by
    ``mean_value`` or else the mean of the real channel over ``mask`` (0 outside; ``"mean_imputed"``).

    Returns:
        the image (a copy unless ``"real"``) and the value imputed (``"mean_imputed"``; else None).
    """
    if condition == "real":
        return image, None
    output = image.clone()
    if condition == "zero_imputed":
        output[channel] = 0.0
        return output, None
    if condition == "synthesized":
        if synthesized is None:
            raise ValueError(
                "condition 'synthesized' needs a synthesized contrast (a synthesizer or synthesized files)"
            )
        synthesized = torch.as_tensor(synthesized).reshape(output.shape[1:])
        output[channel] = synthesized.to(output.dtype)
        return output, None
    if condition == "mean_imputed":
        if mask is None:
            raise ValueError("condition 'mean_imputed' needs the brain mask (the item's 'mask')")
        inside = torch.as_tensor(mask).reshape(output.shape[1:]) > 0
        if not inside.any():
            raise ValueError("the brain mask is empty; the mean imputation needs brain voxels")
        value = float(image[channel][inside].double().mean()) if mean_value is None else float(mean_value)
        output[channel] = inside.to(output.dtype) * value
        return output, value
    raise ValueError(f"condition {condition!r}: expected one of {list(CONDITIONS)}")


def region_dice(prediction: torch.Tensor, label: torch.Tensor) -> dict[str, float | int]:
    """Dice of each region channel between a binary ``prediction`` and ``label``, both (3, H, W, D): 3D per
    volume and 2D per axial slice (last axis), with the empty-region policy of the module docstring.

    Returns:
        ``dice3d_<region>``, ``dice2d_<region>`` and ``slices2d_<region>`` (slices averaged) per region.
    """
    prediction = torch.as_tensor(prediction).float()
    label = torch.as_tensor(label).float()
    if prediction.shape != label.shape or prediction.ndim != 4 or prediction.shape[0] != len(REGIONS):
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)}: expected equal shapes (3, H, W, D)"
        )
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    volume = dice(y_pred=prediction[None], y=label[None])[0]
    # axial slices as a batch of 2D images: (D, 3, H, W); both-empty slices score 1 here and are dropped below
    per_slice = dice(y_pred=prediction.permute(3, 0, 1, 2), y=label.permute(3, 0, 1, 2))
    present = (prediction.sum(dim=(1, 2)) + label.sum(dim=(1, 2))).T > 0  # (D, 3)
    row: dict[str, float | int] = {}
    for index, region in enumerate(REGIONS):
        kept = per_slice[present[:, index], index]
        row[f"dice3d_{region}"] = float(volume[index])
        row[f"dice2d_{region}"] = float(kept.mean()) if kept.numel() else 1.0
        row[f"slices2d_{region}"] = int(kept.numel())
    return row


# ---------------------------------------------------------------------------------------------- evaluator


class DownstreamEvaluator(CaseEvaluator):
    """Segment each labelled case under each condition and measure Dice of TC, WT, ET in 3D and 2D.

    A MONAI ``Evaluator`` (an Ignite engine); one iteration is one case: its four preprocessed contrasts
    (:func:`downstream_dataset`), then per condition :func:`condition_image`, ``inferer`` with ``network``
    (e.g. ``SlidingWindowInferer`` and a 3D SegResNet), sigmoid, threshold, :func:`region_dice`. A case that
    fails (unreadable file, missing synthesized file, out of memory...) is logged and listed; the others go
    on. At the end of the epoch the CSV, JSON and markdown are written (:func:`write_downstream`) and the means
    go into ``engine.state.metrics`` as ``<condition>_<metric>`` (for ``StatsHandler``).

    ``bundles/brats_segmentation/configs/evaluate.json`` wires it::

        "evaluator": {"_target_": "agi_monai.evaluation.downstream.DownstreamEvaluator", "device": "@device",
            "dataset": "@evaluate#dataset", "network": "@network", "inferer": "@validate#inferer",
            "output_dir": "@output_dir", "conditions": "@conditions", "missing_contrast": "@missing_contrast",
            "synthesizer": "@synthesizer", "val_handlers": "@evaluate#handlers"}

    Args:
        device: where the segmentation network runs.
        dataset: preprocessed cases with ``"image"``, ``"label"``, ``"mask"``, ``"case_id"`` (and
            ``"synthesized"`` when synthesized files are used).
        network: the segmentation network (weights loaded, e.g. by a ``CheckpointLoader`` in ``val_handlers``),
            logits of the three regions.
        inferer: maps (1, 4, H, W, D) to (1, 3, H, W, D) logits.
        output_dir: where the CSV, JSON and markdown go.
        conditions: any of :data:`CONDITIONS`, in table order.
        missing_contrast: the contrast under test; needed by every condition but ``"real"``.
        inputs: the network's channels in order.
        synthesizer: makes the ``"synthesized"`` condition's contrast from the others (:class:`VolumeSynthesizer`);
            None to read it from the item's ``"synthesized"``
            (:class:`AttachSynthesizedd`).
            With the ``"synthesized"`` condition one of the two must be there: it is refused here otherwise (before,
            every case failed at run time and the run ended with status 0 and a summary of NaN).
        mean_value: the ``"mean_imputed"`` condition's value; None for each case's mean over its brain mask.
        threshold: on the sigmoid of each region's logit.
        description: written at the top of the summary (segmenter, synthesis bundle, data...).
        val_handlers: Ignite/MONAI handlers, attached after the evaluator's own writer.
        amp: autocast on CUDA.
        num_workers: processes preprocessing cases ahead of the network.
        skipped: cases left out before the dataset was built (:func:`agi_monai.bundle.discover_split`'s ``failures``: no label map,
            a missing contrast...), listed among the failed cases of the summary with their reasons.

    Raises:
        ValueError: conditions, ``missing_contrast`` or a synthesizer that do not fit, or no case to evaluate
            (naming the skipped ones).
    """

    def __init__(
        self,
        device: str | torch.device,
        dataset: Dataset,
        network: torch.nn.Module,
        inferer: Inferer,
        output_dir: str | Path,
        conditions: Sequence[str] = CONDITIONS,
        missing_contrast: str | None = None,
        inputs: Sequence[str] = SEGMENTATION_CONTRASTS,
        synthesizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mean_value: float | None = None,
        threshold: float = 0.5,
        description: Mapping[str, Any] | None = None,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        num_workers: int = 0,
        skipped: Sequence[Failure] = (),
    ) -> None:
        conditions = list(conditions)
        self.skipped = list(skipped)
        if len(dataset) == 0 and self.skipped:
            raise ValueError(
                f"no case to evaluate: the {len(self.skipped)} cases found were skipped "
                f"({'; '.join(map(str, self.skipped))})"
            )
        if not conditions or any(c not in CONDITIONS for c in conditions) or len(set(conditions)) < len(conditions):
            raise ValueError(f"conditions {conditions}: expected distinct names among {list(CONDITIONS)}")
        self.inputs = tuple(canonical_contrast(c) for c in inputs)
        self.missing_contrast = canonical_contrast(missing_contrast) if missing_contrast else None
        if conditions != ["real"] and self.missing_contrast not in self.inputs:
            raise ValueError(
                f"missing_contrast {missing_contrast!r}: conditions {conditions} replace one of the network's "
                f"inputs {list(self.inputs)}; name it"
            )
        if "synthesized" in conditions and synthesizer is None and not _reads_synthesized_files(dataset):
            raise ValueError(
                "condition 'synthesized' needs the synthesized contrast: a synthesizer (a synthesis bundle's "
                "generator: evaluate.json's synthesis_bundle, scripts/downstream_dice.py's --synthesis_bundle) or "
                "synthesized files (synthesized_dir, --synthesized_dir); neither was given"
            )
        if synthesizer is not None:
            synthesis_inputs = tuple(getattr(synthesizer, "inputs", ()))
            synthesis_target = getattr(synthesizer, "target", None)
            others = [c for c in self.inputs if c != self.missing_contrast]
            fits = bool(synthesis_inputs) and set(synthesis_inputs) <= set(others)
            if synthesis_target != self.missing_contrast or not fits:
                raise ValueError(
                    f"the synthesizer makes {synthesis_target} from {list(synthesis_inputs)}; expected "
                    f"{self.missing_contrast} from contrasts among {others}"
                )
        super().__init__(device, dataset, output_dir, description, val_handlers, amp, num_workers)
        self.network = network
        self.inferer = inferer
        self.conditions = conditions
        self.synthesizer = synthesizer
        self.mean_value = mean_value
        self.threshold = threshold
        self.post = Compose([Activations(sigmoid=True), AsDiscrete(threshold=threshold)])

    def _reset(self, engine: Engine) -> None:
        super()._reset(engine)
        self.failures = list(self.skipped)  # logged by discovery already

    def record(self, case_id: str, measured: list[dict[str, Any]]) -> dict[str, Any]:
        for row in measured:
            _logger.info("%s %s: %s", case_id, row["condition"], " ".join(f"{m} {row[m]:.3f}" for m in METRICS))
        self.rows += [{"case_id": case_id, **row} for row in measured]
        return {"rows": measured}

    def evaluate_case(self, item: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One row per condition (``condition``, the :data:`METRICS`, slices per region, the imputed value)."""
        image = convert_to_tensor(item["image"], track_meta=False).float()
        label = convert_to_tensor(item["label"], track_meta=False)
        channel = self.inputs.index(self.missing_contrast) if self.missing_contrast else -1
        synthesized = None
        if "synthesized" in self.conditions:
            synthesized = self._synthesized(item, image)
        rows = []
        for condition in self.conditions:
            mask = convert_to_tensor(item["mask"], track_meta=False) if "mask" in item else None
            conditioned, value = condition_image(image, condition, channel, mask, synthesized, self.mean_value)
            prediction = self._segment(conditioned)
            rows.append({"condition": condition, **region_dice(prediction, label), "imputed_value": value})
        return rows

    def _synthesized(self, item: Mapping[str, Any], image: torch.Tensor) -> torch.Tensor:
        if self.synthesizer is None:
            if SYNTHESIZED_KEY not in item:
                raise ValueError(
                    "condition 'synthesized' needs a synthesizer (a synthesis bundle's generator) or synthesized "
                    "files (synthesized_dir); neither was given"
                )
            return convert_to_tensor(item[SYNTHESIZED_KEY], track_meta=False).float()
        indices = [self.inputs.index(c) for c in self.synthesizer.inputs]  # type: ignore[attr-defined]
        return self.synthesizer(image[indices])

    def _segment(self, image: torch.Tensor) -> torch.Tensor:
        return self.post(infer_case(self.network, self.inferer, image, self.state.device, self.amp))

    def write(self, engine: Engine) -> None:
        paths = write_downstream(self.rows, self.output_dir, self.conditions, self.failures, self.description)
        summary = summarize_downstream(self.rows, self.conditions, self.failures, self.description)
        for condition, metrics in summary["conditions"].items():
            for metric, stats in metrics.items():
                engine.state.metrics[f"{condition}_{metric}"] = stats["mean"]
        self._print_summary(len({row["case_id"] for row in self.rows}), paths["cases"])


def _reads_synthesized_files(dataset: Dataset) -> bool:
    """Whether the items of ``dataset`` carry a synthesized contrast: its transform attaches the files
    (:class:`AttachSynthesizedd`, :func:`downstream_dataset` with ``synthesized_dir``), or its items hold
    ``"synthesized"`` already."""
    pending = [getattr(dataset, "transform", None)]
    while pending:
        current = pending.pop()
        if isinstance(current, AttachSynthesizedd):
            return True
        pending.extend(getattr(current, "transforms", ()))
    items = getattr(dataset, "data", ())
    return bool(len(items)) and all(isinstance(item, Mapping) and SYNTHESIZED_KEY in item for item in items)


# ------------------------------------------------------------------------------------------------ outputs


def summarize_downstream(
    rows: Sequence[Mapping[str, Any]],
    conditions: Sequence[str] = CONDITIONS,
    failures: Sequence[Failure] = (),
    description: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary JSON's content: per condition, :func:`agi_monai.evaluation.tables.statistics` of each metric
    over cases; per condition, the mean over cases of (condition - real) when ``"real"`` was run; the protocol
    in words; the failed cases."""
    by_condition = {c: [row for row in rows if row["condition"] == c] for c in conditions}
    summary: dict[str, Any] = {
        "description": dict(description or {}),
        "cases": len({row["case_id"] for row in rows}),
        "case_ids": list(dict.fromkeys(str(row["case_id"]) for row in rows)),
        "failed": [{"case_id": f.case_id, "reason": f.reason} for f in failures],
        "protocol": {
            "dice": DICE_POLICY,
            "conditions": {
                "real": "all acquired contrasts",
                "synthesized": "the missing contrast replaced by the synthesized one ([0, 1] scale)",
                "zero_imputed": "the missing contrast set to 0",
                "mean_imputed": "the missing contrast set to one value inside the brain mask (the imputed_value "
                "column: the real contrast's mean over the mask unless fixed), 0 outside",
            },
            "preprocessing": (
                "each contrast / its 99.5th percentile, clipped to [0, 1]; T2 grid; RAS; in-plane pad/crop"
            ),
        },
        "statistics": "over cases: mean, std (population, ddof 0), median, min, max",
        "conditions": {
            c: {m: statistics(float(row[m]) for row in selected) for m in METRICS}
            for c, selected in by_condition.items()
        },
    }
    if "real" in by_condition:
        real = {row["case_id"]: row for row in by_condition["real"]}
        summary["difference_to_real"] = {
            c: {
                m: statistics(float(r[m]) - float(real[r["case_id"]][m]) for r in selected if r["case_id"] in real)
                for m in METRICS
            }
            for c, selected in by_condition.items()
            if c != "real"
        }
    return summary


def downstream_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as a markdown table: one row per condition, Dice of TC, WT, ET in 3D and 2D as
    ``mean ± std`` over cases, and the mean 3D change against ``"real"``; the protocol below."""
    lines = ["## Segmentation downstream Dice", ""]
    if summary.get("description"):
        lines += ["; ".join(f"{k}: {v}" for k, v in summary["description"].items()), ""]
    header = ["condition", *(f"{m[4:6].upper()} {m[7:]}" for m in METRICS), "3D change vs real (TC/WT/ET)", "cases"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    differences = summary.get("difference_to_real", {})
    for condition, metrics in summary["conditions"].items():
        cells = [_mean_std(metrics[m]) for m in METRICS]
        change = differences.get(condition)
        change_text = " / ".join(_signed(change[f"dice3d_{r}"]["mean"]) for r in REGIONS) if change else "-"
        lines.append("| " + " | ".join([condition, *cells, change_text, str(metrics[METRICS[0]]["n"])]) + " |")
    protocol = summary["protocol"]
    lines += ["", "Dice: mean ± standard deviation over cases, 0-1.", f"- Dice: {protocol['dice']}."]
    lines += [f"- `{name}`: {text}." for name, text in protocol["conditions"].items() if name in summary["conditions"]]
    lines.append(f"- Preprocessing: {protocol['preprocessing']}.")
    if summary.get("failed"):
        lines += ["", f"Failed cases ({len(summary['failed'])}):"]
        lines += [f"- {f['case_id']}: {f['reason']}" for f in summary["failed"]]
    return "\n".join(lines) + "\n"


def _mean_std(stats: Mapping[str, float]) -> str:
    if not stats.get("n"):
        return "-"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def _signed(value: float) -> str:
    return f"{value:+.3f}" if math.isfinite(value) else str(value)


def write_downstream(
    rows: Sequence[Mapping[str, Any]],
    output_dir: str | Path,
    conditions: Sequence[str] = CONDITIONS,
    failures: Sequence[Failure] = (),
    description: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the per-case CSV, the summary JSON and the markdown table into ``output_dir``, each atomically;
    returns ``{"cases": ..., "summary": ..., "markdown": ...}``."""
    output_dir = Path(output_dir)
    summary = summarize_downstream(rows, conditions, failures, description)
    columns = ["case_id", "condition", *METRICS, *(f"slices2d_{r}" for r in REGIONS), "imputed_value"]
    return {
        "cases": write_csv(rows, output_dir / DOWNSTREAM_CSV, columns),
        "summary": write_json(summary, output_dir / DOWNSTREAM_JSON),
        "markdown": write_text(downstream_markdown(summary), output_dir / DOWNSTREAM_MD),
    }


def downstream_bar_chart(summary: Mapping[str, Any], path: str | Path) -> Path:
    """A bar chart of the summary: mean Dice per region (3D, solid; 2D, hatched) for each condition, the
    standard deviation over cases as error bars; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = list(summary["conditions"])
    width = 0.8 / len(conditions)
    figure, axes = plt.subplots(figsize=(7, 3.6), dpi=120)
    positions = np.arange(len(REGIONS) * 2, dtype=float)
    for index, condition in enumerate(conditions):
        metrics = summary["conditions"][condition]
        means = [metrics[m]["mean"] for m in METRICS]
        errors = [metrics[m]["std"] for m in METRICS]
        bars = axes.bar(positions + (index - (len(conditions) - 1) / 2) * width, means, width, yerr=errors,
                        capsize=2, label=condition)
        for bar in bars[len(REGIONS):]:
            bar.set_hatch("//")
    axes.set_xticks(positions, [f"{m[4:6].upper()} {m[7:]}" for m in METRICS])
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("Dice")
    axes.set_title(f"Segmentation downstream, {summary['cases']} case(s)")
    axes.legend(fontsize=8, ncols=len(conditions), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    figure.tight_layout()
    path = Path(path)
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)
    return path
