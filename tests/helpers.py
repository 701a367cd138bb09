"""What several test files share: the shipped samples' folder and the scripts loaded as modules.

Imported as ``from helpers import ...``: pytest puts this folder on ``sys.path`` for the test files in it (its default
"prepend" import mode; the folder has no ``__init__.py``), so it works from a fresh clone with ``bash scripts/test.sh``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
#: the shipped real samples, with their provenance
DATA = REPO / "tests" / "data"


def load_script(name: str) -> ModuleType:
    """``scripts/<name>`` (e.g. ``"compare.py"``; scripts/ is not a package) run as a fresh module named after the
    file, registered in ``sys.modules`` first, where a dataclass of the script looks its module up."""
    module_name = name.removesuffix(".py")
    spec = importlib.util.spec_from_file_location(module_name, REPO / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
