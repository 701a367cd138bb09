"""Writes every scenario bundle in ``bundles/`` from the one template ``bundles/_template/`` and the table below.

    python scripts/generate_bundles.py            # (re)write bundles/<scenario>/ for every scenario
    python scripts/generate_bundles.py --check    # exit 1 listing the files that differ from what it would write

Template files hold ``{{token}}`` placeholders. In JSON, a string that is exactly one token becomes the
token's JSON value (a list, a number...); elsewhere tokens are replaced by text. Generated bundles are never
edited by hand: ``tests/test_bundles.py`` fails when a committed bundle differs from what this writes.

A 3D scenario (``spatial_dims=3``) is the 2D bundle changed by the overlays in ``bundles/_template/3d/``, so
that the two cannot drift apart: a JSON overlay sets config ids (``"validate#inferer": {...}``, as MONAI's
override files do; a new top-level id goes after the overlay's previous id) and removes the ids listed under
``"_remove_"``; the ``README.md`` overlay replaces the model card's sections of the same heading (the text before
the first heading replaces the card's opening paragraph).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BUNDLES = ROOT / "bundles"
TEMPLATE = BUNDLES / "_template"
#: Template files copied into each bundle (the template's ``schemas/`` stays there).
TEMPLATE_FILES = (
    "LICENSE",
    "configs/metadata.json",
    "configs/train.json",
    "configs/evaluate.json",
    "configs/inference.json",
    "configs/multi_gpu_train.json",
    "configs/logging.conf",
    "docs/README.md",
)
TOKEN = re.compile(r"\{\{(\w+)\}\}")
OVERLAYS_3D = TEMPLATE / "3d"
REMOVE = "_remove_"

# Reference grid per scenario = agi_monai.data.choose_reference(inputs): T2, then PD, FLAIR, T1, T1Gd.
REFERENCE_ORDER = ("T2", "PD", "FLAIR", "T1", "T1Gd")

FAMILIES: dict[str, dict[str, Any]] = {
    "IXI": {
        "dataset_dir": "/workspace/data/IXI",
        "prepare_script": "prepare_ixi.py",
        "data_source": "IXI dataset (brain-development.org/ixi-dataset): T1, T2 and PD of healthy subjects",
        "data_text": (
            "IXI (https://brain-development.org/ixi-dataset/): T1, T2 and PD of about 600 healthy subjects "
            "(Guy's, Hammersmith and IOP hospitals, London); T2 and PD come from one dual-echo scan, the sagittal "
            "T1 is registered rigidly onto their grid. The paper splits 577 subjects 500/37/40 (training/validation/"
            "test), 256x256 axial slices. Files named like `IXI012-HH-1211-T1.nii.gz`."
        ),
        "data_licence": (
            "IXI is distributed under the Creative Commons CC BY-SA 3.0 licence "
            "(https://creativecommons.org/licenses/by-sa/3.0/); download it from the IXI site."
        ),
        "dataset_reference": "IXI dataset, https://brain-development.org/ixi-dataset/",
        # in-plane spacing (mm) of the reference grid the networks are trained on: IXI's T2/PD, 256x256
        "training_spacing": [0.9375, 0.9375],
    },
    "BraTS": {
        "dataset_dir": "/workspace/data/BraTS2023",
        "prepare_script": "prepare_brats.py",
        "data_source": "BraTS 2023 adult glioma challenge (Synapse syn51156910): T1, T1Gd, T2, FLAIR, skull-stripped, co-registered",
        "data_text": (
            "BraTS 2023 adult glioma (https://www.synapse.org/brats2023): pre-operative T1 (`t1n`), T1Gd (`t1c`), "
            "T2 (`t2w`) and FLAIR (`t2f`), skull-stripped, co-registered to one 1 mm 240x240x155 grid; files named "
            "like `BraTS-GLI-00001-000-t1n.nii.gz` (older BraTS `*_t1ce.nii.gz` also work). The paper splits 580 "
            "patients 500/40/40, 240x240 axial slices."
        ),
        "data_licence": (
            "BraTS 2023 data are under the challenge's data terms (registration on Synapse); cite the BraTS 2023 "
            "papers when using them."
        ),
        "dataset_reference": (
            "Baid U. et al., The RSNA-ASNR-MICCAI BraTS 2021 Benchmark on Brain Tumor Segmentation and "
            "Radiogenomic Classification, arXiv:2107.02314; Menze B. et al., IEEE TMI 34(10) 2015"
        ),
        "training_spacing": [1.0, 1.0],
    },
}


@dataclass(frozen=True)
class Scenario:
    name: str
    family: str
    inputs: tuple[str, ...]
    target: str
    spatial_size: int
    paper: str = (
        "in Table 3 (the paper's 3-to-1 BraTS scenarios); its numbers are in the table's image, not in the text we "
        "have, so none is quoted here"
    )
    spatial_dims: int = 2


SCENARIOS = (
    Scenario("ixi_t2_pd_to_t1", "IXI", ("T2", "PD"), "T1", 256,
             "AGI-Net 29.23 / 94.38 / 1.59, pix2pix-ResUNet 28.77 / 93.96 / 1.70"),
    Scenario("ixi_t1_pd_to_t2", "IXI", ("T1", "PD"), "T2", 256,
             "AGI-Net 31.71 / 94.33 / 1.37, pix2pix-ResUNet 31.20 / 94.14 / 1.44"),
    Scenario("ixi_t1_t2_to_pd", "IXI", ("T1", "T2"), "PD", 256,
             "AGI-Net 34.96 / 96.62 / 0.97, pix2pix-ResUNet 34.38 / 96.34 / 1.01"),
    Scenario("brats_t2_flair_to_t1", "BraTS", ("T2", "FLAIR"), "T1", 240,
             "AGI-Net 26.07 / 92.20 / 1.98, pix2pix-ResUNet 25.67 / 91.68 / 2.10"),
    Scenario("brats_t1_flair_to_t2", "BraTS", ("T1", "FLAIR"), "T2", 240,
             "AGI-Net 25.37 / 92.17 / 1.95, pix2pix-ResUNet 24.82 / 91.62 / 2.13"),
    Scenario("brats_t1_t2_to_flair", "BraTS", ("T1", "T2"), "FLAIR", 240,
             "AGI-Net 24.54 / 89.80 / 2.22, pix2pix-ResUNet 24.06 / 89.18 / 2.37"),
    Scenario("brats_t2_flair_t1gd_to_t1", "BraTS", ("T2", "FLAIR", "T1Gd"), "T1", 240),
    Scenario("brats_t1_flair_t1gd_to_t2", "BraTS", ("T1", "FLAIR", "T1Gd"), "T2", 240),
    Scenario("brats_t1_t2_t1gd_to_flair", "BraTS", ("T1", "T2", "T1Gd"), "FLAIR", 240),
    Scenario(
        "brats_t1_t2_flair_to_t1gd", "BraTS", ("T1", "T2", "FLAIR"), "T1Gd", 240,
        "in Table 3 (the paper's 3-to-1 BraTS scenarios; its numbers are in the table's image, not in the text we "
        "have, so none is quoted here), and in its downstream segmentation test (Table 4: Dice with synthesized vs "
        "real vs zero-imputed T1Gd)",
    ),
    Scenario(
        "brats_t1_t2_flair_to_t1gd_3d", "BraTS", ("T1", "T2", "FLAIR"), "T1Gd", 240,
        "in Table 10 (3D AGI-Net with a 3D pix2pix, against mmGAN, pGAN, MedSynth and pix2pix in 3D); the numbers "
        "are in the table's image, not in the text we have, so none is quoted here",
        spatial_dims=3,
    ),
)


def tokens(scenario: Scenario) -> dict[str, Any]:
    """The values of the template's ``{{token}}`` placeholders for one scenario."""
    family = FAMILIES[scenario.family]
    inputs = list(scenario.inputs)
    size = scenario.spatial_size
    return {
        **family,
        "name": scenario.name,
        "family": scenario.family,
        "title": f"{scenario.family} ({', '.join(inputs)}) -> {scenario.target}{' in 3D' if scenario.spatial_dims == 3 else ''}",
        "inputs": inputs,
        "inputs_text": ", ".join(inputs),
        "target": scenario.target,
        "reference": next(c for c in REFERENCE_ORDER if c in inputs),
        "num_inputs": len(inputs),
        "num_inputs_plus_one": len(inputs) + 1,
        "spatial_size": [size, size],
        "spatial_size_text": f"{size}x{size}",
        "channel_def": {str(i): c for i, c in enumerate(inputs)},
        "channel_text": ", ".join(f"{i}: {c}" for i, c in enumerate(inputs)),
        "paper_results": scenario.paper,
        # the paper's batch of 2D slices; 3D patches of 96^3 are 24x larger each
        "batch_size": 2 if scenario.spatial_dims == 3 else 16,
    }


def _fill_text(text: str, values: dict[str, Any]) -> str:
    return TOKEN.sub(lambda m: str(values[m.group(1)]), text)


def _fill_json(node: Any, values: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        return {key: _fill_json(value, values) for key, value in node.items()}
    if isinstance(node, list):
        return [_fill_json(value, values) for value in node]
    if isinstance(node, str):
        whole = TOKEN.fullmatch(node)
        return values[whole.group(1)] if whole else _fill_text(node, values)
    return node


def _parent(config: dict[str, Any], config_id: str) -> tuple[Any, Any]:
    """The node holding config id ``a#b#c`` and its key there: ``config`` and the id itself when ``config`` has that
    key (an override file's flat ``"a#b#c"``), else the nested node ``config[a][b]`` and ``c``."""
    if config_id in config:
        return config, config_id
    *parents, last = config_id.split("#")
    node = config
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, int(last) if isinstance(node, list) else last


def _overlay_json(config: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    previous = None
    for config_id, value in overlay.items():
        if config_id == REMOVE:
            continue
        node, key = _parent(config, config_id)
        if node is config and key not in config and previous in config:  # a new top-level id, after `previous`
            items = list(config.items())
            position = [name for name, _ in items].index(previous) + 1
            config.clear()
            config.update(items[:position] + [(key, value)] + items[position:])
        else:
            node[key] = value
        previous = config_id.split("#")[0]
    for config_id in overlay.get(REMOVE, []):
        node, key = _parent(config, config_id)
        del node[key]
    return config


def _sections(text: str) -> dict[str, str]:
    """Markdown text by ``## `` section (key: the heading line; "" for the text before the first one)."""
    parts = re.split(r"^(?=## )", text, flags=re.M)
    return {(part.splitlines()[0] if part.startswith("## ") else ""): part for part in parts}


def _overlay_text(text: str, overlay: str) -> str:
    sections, replacements = _sections(text), _sections(overlay)
    unknown = set(replacements) - set(sections)
    if unknown:
        raise ValueError(f"{OVERLAYS_3D}: sections {sorted(unknown)} are not in the template's README.md")
    title = next(iter(sections.values())).splitlines()[0]  # the card's title stays the template's
    if "" in replacements:
        replacements[""] = f"{title}\n\n{replacements['']}"
    return "".join(replacements.get(heading, part) for heading, part in sections.items())


def render(scenario: Scenario) -> dict[str, str]:
    """Relative path -> content of every file of the scenario's bundle."""
    values = tokens(scenario)
    files = {}
    for relative in TEMPLATE_FILES:
        text = (TEMPLATE / relative).read_text(encoding="utf-8")
        overlay = OVERLAYS_3D / Path(relative).name
        overlay_text = overlay.read_text(encoding="utf-8") if scenario.spatial_dims == 3 and overlay.is_file() else None
        if relative.endswith(".json"):
            config = json.loads(text)
            if overlay_text is not None:
                config = _overlay_json(config, json.loads(overlay_text))
            files[relative] = json.dumps(_fill_json(config, values), indent=4, ensure_ascii=False) + "\n"
        else:
            if overlay_text is not None:
                text = _overlay_text(text, overlay_text)
            files[relative] = _fill_text(text, values)
    return files


def planned(bundles: Path = BUNDLES) -> list[tuple[Path, str]]:
    """Every file of every bundle, with the content the generator writes."""
    return [
        (bundles / scenario.name / relative, content)
        for scenario in SCENARIOS
        for relative, content in render(scenario).items()
    ]


def differences(bundles: Path = BUNDLES) -> list[str]:
    """Files that are missing or differ from what the generator writes (paths relative to ``bundles``)."""
    return [
        str(path.relative_to(bundles))
        for path, content in planned(bundles)
        if not path.is_file() or path.read_text(encoding="utf-8") != content
    ]


def write(bundles: Path = BUNDLES) -> list[Path]:
    """Write every bundle; returns the files written."""
    written = []
    for path, content in planned(bundles):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report bundles that differ from the template")
    args = parser.parse_args(argv)
    if args.check:
        stale = differences()
        for path in stale:
            print(f"differs from the template: bundles/{path}")
        print(f"{len(SCENARIOS)} bundles checked, {len(stale)} files differ")
        return 1 if stale else 0
    written = write()
    print(f"wrote {len(written)} files of {len(SCENARIOS)} bundles from {TEMPLATE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
