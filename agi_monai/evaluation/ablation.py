"""The paper's ablations (arXiv 2411.14684, §4.3) as overrides of a bundle's ``train.json``.

Each ablation is ONE override of the generator's ``network_def`` (or none: the full AGI-Net), so it runs with any
scenario bundle, from Python (``scripts/ablation.py``) or from the command line::

    python -m monai.bundle run --config_file bundles/brats_t1_t2_to_flair/configs/train.json \\
        --bundle_root runs/gr_only --dataset_dir /data/BraTS2023 --network_def#attention False

- Table 5 (Group-wise Rolling and Cross Group Attention), :data:`TABLE5`, the default set of
  ``scripts/ablation.py``: ``stages_none`` (the baseline, no GR and no CA: standard convolutions, the ResUNet),
  ``gr_only`` (Group-wise Rolling without Cross Group Attention, ``network_def#attention`` false) and ``agi_net``
  (GR + CA: the full network, n = 8, CAGR in down1-3, body, up1; no override);
- ``ca_only``: Cross Group Attention without rolling (``network_def#rolling`` false) -- NOT in the paper (Table 5
  has no CA-only row), an extra;
- ``groups_<n>``, n in 1, 2, 4, 8, 16 (Table 7): ``network_def#groups``;
- ``stages_down1``, ..., ``stages_up3`` (Table 9): CAGR in the stages up to and including the named one
  (cumulative, as in the table), ``network_def#cagr_stages``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agi_monai.networks import STAGES, AGINet

__all__ = ["ABLATIONS", "TABLE5", "Ablation", "architecture", "select_ablations"]

NETWORK = "network_def#"


@dataclass(frozen=True)
class Ablation:
    """One ablation: a name, what it tests, and its override of ``train.json`` (at most one entry).

    Attributes:
        name: e.g. ``"gr_only"``.
        description: what it changes, in words.
        overrides: ``{config id: value}``, e.g. ``{"network_def#attention": False}``; empty for the full network.
    """

    name: str
    description: str
    overrides: Mapping[str, Any]

    @property
    def network_arguments(self) -> dict[str, Any]:
        """The overrides as keyword arguments of the network class (``{"attention": False}``)."""
        return {key[len(NETWORK):]: value for key, value in self.overrides.items()}

    def architecture(self) -> tuple[Any, ...]:
        """:func:`architecture` of the bundle's AGI-Net with this override."""
        return architecture(self.network_arguments)

    def override_text(self) -> str:
        """The override as a ``monai.bundle run`` option (``--network_def#attention False``), or ``(none)``."""
        return " ".join(f"--{key} {_cli_value(value)}" for key, value in self.overrides.items()) or "(none)"


def _cli_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "\"[" + ",".join(f"'{v}'" if isinstance(v, str) else str(v) for v in value) + "]\""
    return str(value)


def _ablations() -> dict[str, Ablation]:
    table = [
        Ablation("stages_none", "no GR, no CA: standard convolutions, the ResUNet (Table 5 baseline; Table 7's "
                 "ResUNet row)", {f"{NETWORK}cagr_stages": []}),
        Ablation("gr_only", "Group-wise Rolling only, no Cross Group Attention (Table 5, GR)",
                 {f"{NETWORK}attention": False}),
        Ablation("agi_net", "GR + CA: AGI-Net as in the paper, n = 8, CAGR in down1-3, body, up1 (Table 5, GR+CA)", {}),
        Ablation("ca_only", "Cross Group Attention only, no Group-wise Rolling (NOT in the paper: an extra)",
                 {f"{NETWORK}rolling": False}),
    ]
    table += [Ablation(f"groups_{n}", f"n = {n} channel groups (Table 7)", {f"{NETWORK}groups": n}) for n in (1, 2, 4, 8, 16)]
    table += [
        Ablation(
            f"stages_{stage}", f"CAGR in {', '.join(STAGES[: i + 1])} (Table 9, +{stage})",
            {f"{NETWORK}cagr_stages": list(STAGES[: i + 1])},
        )
        for i, stage in enumerate(STAGES)
    ]
    return {ablation.name: ablation for ablation in table}


#: Every ablation by name: Table 5's rows (baseline, GR, GR+CA), CA only (not in the paper), groups (Table 7),
#: stages (Table 9).
ABLATIONS: dict[str, Ablation] = _ablations()

#: The paper's Table 5 (GR and CA), row by row: no CAGR (the baseline), GR only, GR + CA (the full AGI-Net).
TABLE5: tuple[str, ...] = ("stages_none", "gr_only", "agi_net")


def select_ablations(names: str | Sequence[str]) -> list[Ablation]:
    """The ablations named (a list, or a comma-separated string; ``"all"`` for every one), in the order given.

    Raises:
        ValueError: an unknown or repeated name (the message lists the known ones).
    """
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n) for n in names]
    if wanted == ["all"]:
        return list(ABLATIONS.values())
    unknown = [n for n in wanted if n not in ABLATIONS]
    if unknown or not wanted:
        raise ValueError(f"ablations {unknown or wanted}: expected names among {list(ABLATIONS)} (or 'all')")
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"ablations {wanted}: a name is repeated")
    return [ABLATIONS[n] for n in wanted]


def architecture(arguments: Mapping[str, Any]) -> tuple[Any, ...]:
    """``(groups, CAGR stages, attention, rolling)`` of an :class:`agi_monai.networks.AGINet` built with
    ``arguments`` (its defaults for the others): equal tuples are the same architecture (``groups`` only counts
    when some stage has a CAGR), so that e.g. ``agi_net``, ``groups_8`` and ``stages_up1`` are recognised as one
    network, and ``stages_none`` as the ResUNet."""
    defaults = {name: p.default for name, p in inspect.signature(AGINet).parameters.items()}
    merged = {**defaults, **arguments}
    stages = tuple(s for s in STAGES if s in merged["cagr_stages"])
    if not stages:
        return (None, (), None, None)
    return (int(merged["groups"]), stages, bool(merged["attention"]), bool(merged["rolling"]))
