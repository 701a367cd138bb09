"""What several test files share: the shipped samples' folder, the environment of the processes they start and the
scripts loaded as modules (their shared fixtures are in ``conftest.py``).

Imported as ``from helpers import ...``: pytest puts this folder on ``sys.path`` for the test files in it (its default
"prepend" import mode; the folder has no ``__init__.py``), so it works from a fresh clone with ``bash scripts/test.sh``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
#: the shipped real samples, with their provenance
DATA = REPO / "tests" / "data"

#: The environment of the processes tests start (bundle runs, scripts): one OpenMP thread each, as scripts/test.sh
#: gives pytest itself. On a busy 2-core machine two spinning threads made a tiny-width training iteration take 7 s
#: instead of 0.05 s (measured); the runs are about wiring, not speed.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
#: :data:`SUBPROCESS_ENV` for a script of ``scripts/`` run on the CPU from this checkout (``agi_monai`` importable
#: without an install).
CPU_SCRIPT_ENV = {**SUBPROCESS_ENV, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}


def load_script(name: str) -> ModuleType:
    """``scripts/<name>`` (e.g. ``"compare.py"``; scripts/ is not a package) run as a fresh module named after the
    file, registered in ``sys.modules`` first, where a dataclass of the script looks its module up."""
    module_name = name.removesuffix(".py")
    spec = importlib.util.spec_from_file_location(module_name, REPO / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
