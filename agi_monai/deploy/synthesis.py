"""The synthesis step of a scenario bundle, in memory and without MONAI Deploy: load an exported bundle (a
TorchScript ``model.ts`` from ``agi-monai export``, or a bundle folder with ``models/model.pt``), turn one case
into a float32 volume on its reference input's grid, and write that volume as NIfTI and as a derived DICOM
series.

The Deploy operators (:mod:`agi_monai.deploy.operators`) are thin wrappers around these, so the logic is tested
whether or not the SDK is installed.

Every step is the bundle's own: its ``preprocessing`` and ``inferer`` entries (parsed from the ``inference.json``
stored in the TorchScript file, or from the folder's configs), :func:`agi_monai.engines.clip_prediction` and
:func:`agi_monai.data.restore_geometry_transforms` (MONAI ``Invertd``), as in ``FolderSynthesis``. Unlike MONAI
Deploy's stock ``MonaiBundleInferenceOperator``, which casts every image output to ``uint8`` (right for a label
map, destructive for a synthesized MR image in [0, 1]), the prediction stays float32 end to end.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose

import agi_monai  # noqa: F401  (registers torch.ops.agi_monai.group_roll before a default export is loaded)
from agi_monai.bundle.registry import BundleError
from agi_monai.data import (
    AtomicNibabelWriter,
    DataError,
    Failure,
    canonical_contrast,
    choose_reference,
    metatensor_to_sitk,
    restore_geometry_transforms,
    spacing_mismatch,
    synthetic_description,
)
from agi_monai.data.dicom import is_dicom_source, write_derived_series
from agi_monai.data.errors import error_line
from agi_monai.data.files import EarlierCaseOutputs, refuse_foreign_outputs, synthesis_output_paths
from agi_monai.data.transforms import synthetic_series_descriptions
from agi_monai.engines import clip_prediction, expected_bundle_weights, load_weights
from agi_monai.engines.inference import infer_case

__all__ = ["BundleSynthesizer", "SynthesisOutputs", "refuse_existing_outputs", "write_synthesis_outputs"]

#: The config stored in a TorchScript file by ``agi-monai export`` (MONAI ``ckpt_export``'s extra file name).
INFERENCE_CONFIG = "inference.json"
_logger = logging.getLogger(__name__)


class BundleSynthesizer:
    """One scenario bundle's generator with its preprocessing and inferer: ``synthesizer(case)`` returns the
    synthesized target as a float32 ``MetaTensor`` (1, X, Y, Z) on the grid of the case's reference input.

    Args:
        model: a TorchScript file written by ``agi-monai export`` (its ``inference.json`` is read from the file),
            a bundle folder (``configs/inference.json`` with ``models/model.pt``, else ``models/model.ts``), or a
            folder holding one such file as ``model.ts`` or ``<name>/model.ts`` (a MONAI Application Package's
            models folder, ``HOLOSCAN_MODEL_PATH``).
        device: torch device; default ``cuda:0`` when available, else ``cpu``.
        overrides: config id -> value overrides of ``inference.json`` (e.g. ``{"network_def#channels": [8, 16, 16, 32]}``
            for a bundle folder whose weights are narrower than the paper's; ``{"slices_per_batch": 4}``).

    Raises:
        BundleError: ``model`` is neither; the file is not a TorchScript export with an ``inference.json``; the
            weights do not load into the bundle's network (:func:`agi_monai.engines.load_weights`' message, the
            expected weights named with the ``--override`` they need). The message names the file and what was
            expected.
    """

    def __init__(
        self, model: str | Path, device: str | torch.device | None = None, overrides: Mapping[str, Any] | None = None
    ) -> None:
        self.model_path = Path(model).resolve()
        self.device = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
        if self.model_path.is_dir() and not (self.model_path / "configs" / INFERENCE_CONFIG).is_file():
            self.model_path = _the_model_in(self.model_path)
        if self.model_path.is_dir():
            self.parser, self.network, self.name = self._from_folder(self.model_path, dict(overrides or {}))
        elif self.model_path.is_file():
            self.parser, self.network, self.name = self._from_torchscript(self.model_path, dict(overrides or {}))
        else:
            raise BundleError(f"{model}: does not exist (expected a TorchScript file from 'agi-monai export' or a bundle folder)")
        self.network.eval()
        self.inputs: list[str] = [canonical_contrast(c) for c in self.parser.get_parsed_content("inputs")]
        self.target: str = canonical_contrast(self.parser.get_parsed_content("target"))
        self.reference: str = choose_reference(self.inputs)
        self.preprocessing: Compose = self.parser.get_parsed_content("preprocessing")
        self.inferer = self.parser.get_parsed_content("inferer")
        # the bundle's postprocessing without its writer: clip to [0, 1], then back onto the reference grid (Invertd
        # of this very preprocessing instance: MONAI matches the recorded transforms by identity)
        self.postprocessing = Compose(
            [clip_prediction("pred"), restore_geometry_transforms(self.preprocessing, "pred")]
        )

    def __call__(self, case: Mapping[str, Any]) -> MetaTensor:
        """The synthesized target of ``case`` (a datalist item: contrast -> NIfTI file or DICOM series files).

        Raises:
            Exception: whatever the preprocessing raises for a bad case (MONAI wraps an
                :class:`agi_monai.data.DataError` in a ``RuntimeError``; :func:`agi_monai.data.failure_reason`
                finds it).
        """
        item = self.preprocessing(dict(case))
        mismatch = spacing_mismatch(item["image"], self.parser.get("training_spacing"))
        if mismatch:
            _logger.warning("%s: %s", case.get("case_id", "case"), mismatch)
        item["pred"] = MetaTensor(infer_case(self.network, self.inferer, item["image"], self.device))
        return self.postprocessing(item)["pred"]

    def _from_folder(self, folder: Path, overrides: dict[str, Any]) -> tuple[ConfigParser, torch.nn.Module, str]:
        config = folder / "configs" / INFERENCE_CONFIG
        parser = ConfigParser()
        parser.read_config(str(config))
        parser.update({"bundle_root": str(folder), "device": f"$torch.device({str(self.device)!r})", **overrides})
        weights, scripted = folder / "models" / "model.pt", folder / "models" / "model.ts"
        if weights.is_file():
            expected = expected_bundle_weights(folder.name, "--override", overrides)
            try:
                network = load_weights(parser.get_parsed_content("network_def"), weights, self.device, expected)
            except DataError as error:  # a wrong scenario's or widths' weights, a truncated file: a model it cannot use
                raise BundleError(str(error)) from error
            return parser, network.to(self.device), folder.name
        if scripted.is_file():
            return self._from_torchscript(scripted, overrides, parser)
        raise BundleError(f"{folder}: has neither models/model.pt nor models/model.ts (expected trained weights)")

    def _from_torchscript(
        self, path: Path, overrides: dict[str, Any], parser: ConfigParser | None = None
    ) -> tuple[ConfigParser, torch.nn.Module, str]:
        # torch.jit.load itself, not MONAI's load_net_with_metadata: that one fails with a JSONDecodeError on a
        # TorchScript file without metadata, which then read as "cannot be loaded"
        extra = {INFERENCE_CONFIG: ""}
        try:
            network = torch.jit.load(str(path), map_location=self.device, _extra_files=extra)
        except Exception as error:  # torch.jit.load raises RuntimeError/ValueError for a file that is not TorchScript
            raise BundleError(
                f"{path}: cannot be loaded as TorchScript ({error_line(error, limit=400)}); expected a "
                f"file written by 'agi-monai export'"
            ) from None
        embedded = json.loads(extra[INFERENCE_CONFIG]) if extra[INFERENCE_CONFIG] else None
        if parser is None:
            if embedded is None:
                raise BundleError(f"{path}: holds no {INFERENCE_CONFIG}; expected a file written by 'agi-monai export'")
            parser = ConfigParser(embedded)
            parser.update({"bundle_root": str(path.parent), "device": f"$torch.device({str(self.device)!r})", **overrides})
        elif embedded is not None:  # a bundle folder's models/model.ts: it must be this bundle's network
            made_for = {key: embedded.get(key) for key in ("inputs", "target")}
            expected = {key: parser.get(key) for key in ("inputs", "target")}
            if made_for != expected:
                raise BundleError(
                    f"{path}: was exported from a bundle for inputs {made_for['inputs']} -> {made_for['target']} "
                    f"({embedded.get('bundle_name', 'unnamed')}); expected this bundle's {expected['inputs']} -> "
                    f"{expected['target']} ({path.parent.parent.name})"
                )
        # the bundle's name as its inference.json states it; exports from before it did are named after the folder
        # above models/ (where agi-monai export writes model.ts), else after the file
        name = (embedded or {}).get("bundle_name") or (
            path.parent.parent.name if path.parent.name == "models" else path.stem
        )
        return parser, network, str(name)


def _the_model_in(folder: Path) -> Path:
    """The one ``model.ts`` of a folder that is not a bundle: ``folder/model.ts`` or ``folder/<name>/model.ts``
    (a MONAI Application Package's ``HOLOSCAN_MODEL_PATH``)."""
    found = sorted({*folder.glob("model.ts"), *folder.glob("*/model.ts")})
    if len(found) == 1:
        return found[0]
    if not found:
        raise BundleError(
            f"{folder}: not a bundle folder (no configs/{INFERENCE_CONFIG}) and no model.ts in it or in a folder in "
            "it; expected a bundle, a .ts file or a models folder holding one"
        )
    raise BundleError(f"{folder}: holds {len(found)} models ({', '.join(map(str, found))}); expected one: give its file")


@dataclass
class SynthesisOutputs:
    """What :func:`write_synthesis_outputs` wrote and which cases failed."""

    written: list[Path] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def refuse_existing_outputs(case_id: str, target: str, output_dir: str | Path, overwrite: bool = False) -> None:
    """Raises when the case's outputs cannot be written: one exists (unless ``overwrite``), or a file or folder
    under an output's name was not written by a synthesis (never replaced:
    :func:`agi_monai.data.refuse_foreign_outputs`). Checked before a case is synthesized (nothing computed for a
    result that would not be written) and again before it is written.

    Raises:
        DataError: naming the outputs.
    """
    nifti, series = synthesis_output_paths(case_id, target, output_dir)
    refuse_foreign_outputs(nifti, series)
    # the series too without DICOM output: a new NIfTI beside an earlier run's series would look like one case
    existing = [str(p) for p in (nifti, series) if p.exists()]
    if existing and not overwrite:
        raise DataError(", ".join(existing), "output already exists", "a new output, or --overwrite to replace it")


def write_synthesis_outputs(
    case: Mapping[str, Any],
    prediction: MetaTensor,
    synthesizer: BundleSynthesizer,
    output_dir: str | Path,
    dicom: bool = True,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``<case>_<target>.nii.gz`` (float32, atomically) and, with ``dicom``, ``<case>_<target>_dicom/``: a
    new MR series derived from the case's reference input series (DICOM input: same patient, study and frame of
    reference) or a new study with synthetic patient tags (NIfTI input); see
    :func:`agi_monai.data.dicom.write_derived_series`.

    A case is written whole or not at all: if the DICOM series fails, the NIfTI written for the case is removed, and
    with ``overwrite`` the case's earlier NIfTI and series come back (:class:`agi_monai.data.files.EarlierCaseOutputs`);
    an earlier series is never left beside a new NIfTI.

    Returns:
        The NIfTI file and, with ``dicom``, the series folder.

    Raises:
        DataError: an output exists and ``overwrite`` is False (nothing is replaced), or the series cannot be written.
    """
    case_id = str(case["case_id"])
    nifti, series = synthesis_output_paths(case_id, synthesizer.target, output_dir)
    refuse_existing_outputs(case_id, synthesizer.target, output_dir, overwrite)
    writer = AtomicNibabelWriter(
        output_dtype=np.float32, description=synthetic_description(synthesizer.target, synthesizer.inputs, synthesizer.name)
    )
    writer.set_data_array(prediction, channel_dim=0)
    writer.set_metadata(prediction.meta, resample=False)
    reference = case.get(synthesizer.reference)
    from_dicom = is_dicom_source(reference)
    earlier = EarlierCaseOutputs(nifti, series) if overwrite else None  # without overwrite nothing exists (refused)
    try:
        writer.write(nifti)
        if dicom:
            series_description, derivation_description = synthetic_series_descriptions(
                synthesizer.target, synthesizer.inputs, synthesizer.name, synthesizer.reference, "MONAI Deploy app"
            )
            write_derived_series(
                metatensor_to_sitk(prediction),
                series,
                series_description=series_description,
                derivation_description=derivation_description,
                reference=reference if from_dicom else None,
                case_id=case_id,
                overwrite=overwrite,
            )
    except BaseException:  # Ctrl-C and SIGTERM too: the case is left as it was
        if earlier is not None:
            earlier.restore()
        else:
            nifti.unlink(missing_ok=True)
        raise
    if earlier is not None:
        earlier.discard()
    return [nifti, series] if dicom else [nifti]
