"""Robustness to misaligned inputs (the paper's Fig. 3): one input contrast is moved by a known amount at test time,
every network synthesizes from the moved inputs, and the metrics are plotted against the amount.

Two kinds of perturbation, each at monotone levels 0, 0.5, ..., 3 (:func:`perturbation_levels`):

- ``"translation"`` (the paper's): the chosen input channel is translated within the axial plane by ``level``
  pixels in a random direction (the same 2D vector on every slice), with bilinear interpolation
  (:class:`agi_monai.data.RandShiftChanneld`);
- ``"rigid"`` (3D): the chosen channel is rotated by ``level`` degrees about a random axis through the volume
  centre, then translated by ``level`` mm in a random direction (:class:`agi_monai.data.RandRigidMisalignChanneld`,
  trilinear, physical units from the volume's affine).

The random direction, axis and (unless given) channel come from ``seed`` and the case's position only, so every
level of a case moves the same input in the same direction, by more at each level, and every network sees the
same moved inputs. The ground truth and the brain mask are never moved (the mask comes from the unmoved inputs).
Each row of a sweep records the motion as applied: the displacement of the image content (not a transform
parameter), which ``tests/test_robustness.py`` checks against the moved image.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import convert_to_tensor
from tqdm import tqdm

from agi_monai.data.transforms import RandRigidMisalignChanneld, RandShiftChanneld
from agi_monai.engines.inference import default_slices_per_batch, synthesize_volume
from agi_monai.evaluation.figures import robustness_plot
from agi_monai.evaluation.protocols import METRIC_NAMES, PROTOCOL_NAMES, evaluate_volume, evaluated_slices
from agi_monai.evaluation.tables import sweep_markdown, write_csv, write_text

__all__ = [
    "PERTURBATIONS",
    "Misalignment",
    "check_sweep",
    "earlier_sweep_files",
    "misalign",
    "perturbation_levels",
    "robustness_sweep",
    "write_sweep",
]

#: Perturbation kind -> the x axis label of its plot.
PERTURBATIONS = {
    "translation": "in-plane translation of one input (pixels)",
    "rigid": "rigid motion of one input: rotation (degrees) = translation (mm)",
}


def perturbation_levels(maximum: float = 3.0, step: float = 0.5) -> list[float]:
    """``[0, step, 2 step, ..., maximum]``, strictly increasing (the paper: 0, 0.5, ..., 3, seven levels).

    Raises:
        ValueError: ``step`` is not positive, ``maximum`` negative, or not a whole number of steps.
    """
    if not step > 0 or not maximum >= 0:
        raise ValueError(f"levels up to {maximum} in steps of {step}: expected step > 0 and maximum >= 0")
    count = maximum / step
    if abs(count - round(count)) > 1e-9:
        raise ValueError(f"maximum {maximum} is not a whole number of steps of {step}; expected e.g. 3.0 and 0.5")
    return [round(i * step, 10) for i in range(int(round(count)) + 1)]


@dataclass(frozen=True)
class Misalignment:
    """How one input channel was moved.

    Attributes:
        kind: ``"translation"`` or ``"rigid"``.
        level: the stated amount: pixels (translation); degrees and mm (rigid).
        channel: the moved input channel.
        displacement: the displacement of the image content along the volume's axes 0, 1 (translation, pixels)
            or 0, 1, 2 (rigid, mm, applied after the rotation); its length is ``level``.
        rotation_deg: the rotation angle (rigid; 0 for a translation).
        rotation_axis: the unit rotation axis in the volume's axes (rigid), about the volume centre.
    """

    kind: str
    level: float
    channel: int
    displacement: tuple[float, ...]
    rotation_deg: float = 0.0
    rotation_axis: tuple[float, ...] = ()

    def as_row(self) -> dict[str, Any]:
        """CSV columns: translation ``shift_px`` (length), ``shift_x_px``, ``shift_y_px``; rigid ``rotation_deg``,
        ``axis_x/y/z``, ``translation_mm`` (length), ``translation_x/y/z_mm``. Axes x, y, z are the volume's
        axes 0, 1, 2 (RAS for the bundles' items)."""
        names = "xyz"
        if self.kind == "translation":
            row = {"shift_px": float(np.linalg.norm(self.displacement))}
            row.update({f"shift_{names[i]}_px": value for i, value in enumerate(self.displacement)})
            return row
        row = {"rotation_deg": self.rotation_deg}
        row.update({f"axis_{names[i]}": value for i, value in enumerate(self.rotation_axis)})
        row["translation_mm"] = float(np.linalg.norm(self.displacement))
        row.update({f"translation_{names[i]}_mm": value for i, value in enumerate(self.displacement)})
        return row


def _check_kind(kind: str) -> None:
    if kind not in PERTURBATIONS:
        raise ValueError(f"perturbation {kind!r}; expected one of {list(PERTURBATIONS)}")


def check_sweep(
    kinds: Sequence[str],
    protocols: Sequence[str],
    maximum: float = 3.0,
    step: float = 0.5,
    slice_step: int = 1,
    metrics: Sequence[str] = (),
    moved_input: str | None = None,
    inputs: Sequence[str] | None = None,
    option: str = "--kinds",
) -> list[float]:
    """The checks :func:`robustness_sweep` and :func:`write_sweep` make, for a script to make before any work
    (training, loading): each kind, the protocols, the levels, ``slice_step``, the metrics, and ``moved_input``
    among ``inputs``.

    Returns:
        The levels (:func:`perturbation_levels`).

    Raises:
        ValueError: the first bad setting, named by its option (``option`` for the kinds).
    """
    for kind in kinds:
        if kind not in PERTURBATIONS:
            raise ValueError(f"{option} {kind}: expected some of {list(PERTURBATIONS)}")
    unknown = [p for p in protocols if p not in PROTOCOL_NAMES]
    if unknown or not protocols:
        raise ValueError(f"protocols {list(protocols)}: expected a non-empty list of {list(PROTOCOL_NAMES)}")
    if slice_step < 1 or (slice_step > 1 and "brasyn3d" in protocols):
        raise ValueError(f"slice_step {slice_step}: expected >= 1, and 1 with the 3D protocol 'brasyn3d'")
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"metrics {unknown}; expected some of {list(METRIC_NAMES)}")
    if moved_input is not None and inputs is not None and moved_input not in inputs:
        raise ValueError(f"moved_input {moved_input!r} is not one of the inputs {list(inputs)}")
    return perturbation_levels(maximum, step)


def misalign(
    image: torch.Tensor, kind: str, level: float, channel: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, Misalignment]:
    """Move one channel of a (C, H, W, D) input stack by ``level`` (see the module docstring); the others and
    ``image`` itself are unchanged.

    Args:
        image: the preprocessed inputs, (C, H, W, D); for ``"rigid"`` a ``MetaTensor`` whose affine gives the
            voxel spacing (1 mm otherwise).
        kind: ``"translation"`` (in-plane, pixels) or ``"rigid"`` (degrees and mm).
        level: the amount, >= 0.
        channel: the channel to move; None draws one from ``seed``.
        seed: seeds the direction, the rotation axis and the drawn channel; the same seed gives the same ones at
            every level.

    Returns:
        The moved stack (a new tensor) and the :class:`Misalignment` applied.
    """
    _check_kind(kind)
    if image.ndim != 4:
        raise ValueError(f"image has shape {tuple(image.shape)}; expected a (C, H, W, D) stack of input volumes")
    if not level >= 0:
        raise ValueError(f"level {level}; expected a non-negative amount")
    if channel is not None and not 0 <= channel < image.shape[0]:
        raise ValueError(f"channel {channel}; the stack has {image.shape[0]} channels")
    if kind == "translation":
        shift = RandShiftChanneld("image", magnitude_px=(level, level), channel=channel, in_plane=True)
        shift.set_random_state(seed)
        moved = shift({"image": image})["image"]
        if level == 0:  # the draws are recorded; the identity needs no resampling (and its round-off)
            moved = image.clone()
        # MONAI's Affine maps output coordinates to input coordinates: translate_params t moves the content by -t
        displacement = tuple(0.0 - float(v) for v in shift.shift[:2])  # 0.0 - : no -0.0 at level 0
        return moved, Misalignment(kind, float(level), shift.shifted_channel, displacement)
    motion = RandRigidMisalignChanneld("image", rotation_deg=(level, level), translation_mm=(level, level), channel=channel)
    motion.set_random_state(seed)
    moved = motion({"image": image})["image"]
    if level == 0:
        moved = image.clone()
    record = Misalignment(
        kind, float(level), motion.moved_channel, tuple(float(v) for v in motion.translation), motion.angle_deg,
        tuple(float(v) for v in motion.axis),
    )
    return moved, record


def earlier_sweep_files(folder: str | Path) -> list[str]:
    """The names of the files :func:`write_sweep` (and ``scripts/robustness_sweep.py``'s ``robustness.json``) may
    have written in ``folder``, of any kind and protocol: what a new sweep into ``folder`` removes first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stems = [f"{kind}_{protocol}" for kind in PERTURBATIONS for protocol in PROTOCOL_NAMES]
    return sorted(
        path.name for path in folder.iterdir()
        if path.name in ("robustness.md", "robustness.json")
        or (path.suffix == ".csv" and path.stem in stems)
        or (path.suffix == ".png" and any(path.stem.startswith(f"{stem}_") for stem in stems))
    )


def robustness_sweep(
    networks: Mapping[str, torch.nn.Module],
    cases: Iterable[Mapping[str, Any]],
    kind: str = "translation",
    levels: Sequence[float] | None = None,
    inputs: Sequence[str] | None = None,
    moved_input: str | None = None,
    seed: int = 0,
    protocols: Sequence[str] = ("slice2d",),
    device: str | torch.device = "cpu",
    slices_per_batch: int | None = None,
    slice_step: int = 1,
    min_foreground_fraction: float = 0.05,
    progress: bool = False,
    **protocol_options: Any,
) -> list[dict[str, Any]]:
    """Every network on every case at every level: one input moved (:func:`misalign`), the target synthesized
    slice by slice (:func:`agi_monai.engines.inference.synthesize_volume`, as ``inference.json``) and measured
    against the unmoved ground truth inside the unmoved brain mask
    (:func:`agi_monai.evaluation.evaluate_volume`).

    Args:
        networks: name -> generator (weights loaded), e.g. ``{"AGI-Net": ..., "ResUNet": ...}``.
        cases: preprocessed items with ``"image"`` (C, H, W, D), ``"target"``, ``"mask"`` and ``"case_id"``
            (:func:`agi_monai.data.build_inference_dataset` with a target).
        kind: ``"translation"`` or ``"rigid"``.
        levels: increasing amounts; default :func:`perturbation_levels` (0, 0.5, ..., 3).
        inputs: the input contrasts in channel order (to name the moved one); default ``"channel <i>"``.
        moved_input: the contrast to move (one of ``inputs``); None draws one per case from the seed.
        seed: case ``i`` uses ``seed + i`` for its direction, axis (and drawn channel), at every level.
        protocols: ``"slice2d"`` and/or ``"brasyn3d"``.
        device: where the networks run.
        slices_per_batch: axial slices per forward pass; default
            :func:`agi_monai.engines.inference.default_slices_per_batch`.
        slice_step: synthesize and measure every ``slice_step``-th of the slices protocol ``"slice2d"``
            evaluates (those whose mask covers ``min_foreground_fraction``), after moving the whole volume: a
            ``slice_step`` times cheaper sweep (the paper's test sets also hold a subset of each volume's slices).
            1 (every slice) is needed for ``"brasyn3d"``, a 3D measure.
        min_foreground_fraction: ``"slice2d"``'s slice selection.
        progress: show a progress bar.
        protocol_options: further arguments of :func:`agi_monai.evaluation.evaluate_volume`.

    Returns:
        One row per (network, level, case, protocol): ``network``, ``perturbation`` (the level), ``case_id``,
        ``kind``, ``moved_input``, ``seed``, the :meth:`Misalignment.as_row` columns, ``slice_step``,
        ``protocol``, ``psnr_db``, ``ssim_pct``, ``mae_x100``, ``evaluated`` (slices or voxels).
    """
    _check_kind(kind)
    levels = list(perturbation_levels() if levels is None else levels)
    if not levels or any(b <= a for a, b in zip(levels, levels[1:])) or levels[0] < 0:
        raise ValueError(f"levels {levels}; expected non-negative, strictly increasing amounts")
    if not networks:
        raise ValueError("networks is empty; expected at least one generator")
    unknown = [p for p in protocols if p not in PROTOCOL_NAMES]
    if unknown or not protocols:
        raise ValueError(f"protocols {list(protocols)}: expected a non-empty list of {list(PROTOCOL_NAMES)}")
    if slice_step < 1 or (slice_step > 1 and "brasyn3d" in protocols):
        raise ValueError(f"slice_step {slice_step}: expected >= 1, and 1 with the 3D protocol 'brasyn3d'")
    slices_per_batch = slices_per_batch or default_slices_per_batch(torch.device(device))
    for network in networks.values():
        network.to(device).eval()
    cases = list(cases)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(cases) * len(levels) * len(networks), desc=f"{kind} sweep", disable=not progress)
    for index, case in enumerate(cases):
        image = case["image"]
        names = list(inputs) if inputs is not None else [f"channel {i}" for i in range(image.shape[0])]
        if len(names) != image.shape[0]:
            raise ValueError(f"inputs {names} name {len(names)} channels; the case's image has {image.shape[0]}")
        if moved_input is not None and moved_input not in names:
            raise ValueError(f"moved_input {moved_input!r} is not one of the inputs {names}")
        channel = names.index(moved_input) if moved_input is not None else None
        case_id = str(case.get("case_id", index))
        target, mask = (convert_to_tensor(case[key], track_meta=False) for key in ("target", "mask"))
        chosen = slice(None)
        if slice_step > 1:
            chosen = evaluated_slices(mask, min_foreground_fraction)[::slice_step]
            target, mask = target[..., chosen], mask[..., chosen]
        for level in levels:
            moved, record = misalign(image, kind, level, channel, seed + index)
            moved = convert_to_tensor(moved, track_meta=False)[..., chosen]
            for name, network in networks.items():
                prediction = synthesize_volume(network, moved, device, slices_per_batch)
                results = evaluate_volume(
                    prediction, target, mask, protocols, min_foreground_fraction=min_foreground_fraction,
                    **protocol_options,
                )
                for protocol, result in results.items():
                    rows.append({
                        "network": name, "perturbation": float(level), "case_id": case_id, "kind": kind,
                        "moved_input": names[record.channel], "seed": seed + index, **record.as_row(),
                        "slice_step": slice_step, "protocol": protocol, **result.metrics, "evaluated": result.evaluated,
                    })
                bar.update()
    bar.close()
    return rows


def write_sweep(
    rows: Sequence[Mapping[str, Any]],
    output_dir: str | Path,
    metrics: Sequence[str] = ("psnr_db", "ssim_pct"),
    title: str | None = None,
    preamble: Sequence[str] = (),
) -> dict[str, Path]:
    """Per (kind, protocol) of ``rows`` (:func:`robustness_sweep`): ``<kind>_<protocol>.csv`` (the rows),
    ``<kind>_<protocol>_<metric>.png`` per metric (metric vs level, a line per network, a band of ± std over
    cases when there are several; :func:`agi_monai.evaluation.robustness_plot`), and one ``robustness.md``
    with a table per (kind, protocol, metric) (mean over cases). Every file is written atomically.

    ``preamble``: markdown lines placed under the markdown's title (e.g. what was measured: checkpoints, data).

    Returns:
        ``{file stem: path}`` of every file written (``"robustness"`` for the markdown).
    """
    if not rows:
        raise ValueError("the sweep has no rows")
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"metrics {unknown}; expected some of {list(METRIC_NAMES)}")
    output_dir = Path(output_dir)
    written: dict[str, Path] = {}
    sections = [f"# Robustness to a misaligned input: {title}" if title else "# Robustness to a misaligned input", ""]
    if preamble:
        sections += [*preamble, ""]
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((str(row["kind"]), str(row["protocol"])), []).append(row)
    for (kind, protocol), group in groups.items():
        stem = f"{kind}_{protocol}"
        written[stem] = write_csv(group, output_dir / f"{stem}.csv")
        moved = sorted({str(row["moved_input"]) for row in group})
        cases = sorted({str(row["case_id"]) for row in group})
        sections += [
            f"## {PERTURBATIONS.get(kind, kind)}, protocol `{protocol}`", "",
            f"Moved input: {', '.join(moved)}; {len(cases)} case(s): {', '.join(cases)}; rows: `{stem}.csv`.", "",
        ]
        for metric in metrics:
            plot_title = f"{title}, {protocol}" if title else protocol
            plot = robustness_plot(group, output_dir / f"{stem}_{metric}.png", metric, title=plot_title,
                                   xlabel=PERTURBATIONS.get(kind, kind))
            written[plot.stem] = plot
            sections += [sweep_markdown(group, metric), f"![{stem} {metric}]({plot.name})", ""]
    written["robustness"] = write_text("\n".join(sections), output_dir / "robustness.md")
    return written
