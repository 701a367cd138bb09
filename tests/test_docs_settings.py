"""Each bundle's docs/README.md lists the settings of its configs: the error for an unknown override
(``agi_monai.bundle.check_command_line``) sends the user there ("the bundle's docs/README.md lists its settings")."""

import json
from pathlib import Path

import pytest

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
RUN_CONFIGS = ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json")


@pytest.mark.parametrize("bundle", sorted(p.name for p in BUNDLES.iterdir() if (p / "configs").is_dir() and p.name != "_template"))
def test_readme_lists_every_setting(bundle):
    readme = (BUNDLES / bundle / "docs" / "README.md").read_text(encoding="utf-8")
    missing = []
    for name in RUN_CONFIGS:
        path = BUNDLES / bundle / "configs" / name
        if not path.is_file():
            continue
        for key in json.loads(path.read_text(encoding="utf-8")):
            setting = key.split("#", 1)[0]  # how check_command_line matches an override
            if f"`{setting}`" not in readme and f"`{key}`" not in readme:
                missing.append(f"{name}: {key}")
    assert not missing, f"bundles/{bundle}/docs/README.md does not list: {missing}"
