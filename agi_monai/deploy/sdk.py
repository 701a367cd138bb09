"""Importing the MONAI Deploy App SDK (``monai.deploy``), also when it lives in a side environment.

``import monai`` imports every subpackage of ``monai`` (``monai/__init__.py`` calls ``load_submodules``), so an SDK
installed into the project's environment puts ``monai/deploy`` there and makes every ``import monai`` import
Holoscan too (seconds, and a stack-size ``RuntimeWarning`` on stderr of every process). For development the SDK
can therefore live in a side virtual environment (docs/deploy.md: ``.venv/deploy``, whose site-packages hold the
SDK, Holoscan and their dependencies); :func:`import_deploy_sdk` adds it to this process on demand. In a MONAI
Deploy application package (``pip install agi-monai[deploy]``) the SDK is simply installed and nothing is added.
"""

from __future__ import annotations

import importlib
import os
import site
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["DEPLOY_SITE_ENV", "default_deploy_site", "import_deploy_sdk"]

#: Environment variable naming the site-packages folder that holds ``monai/deploy`` (the side environment's).
DEPLOY_SITE_ENV = "AGI_MONAI_DEPLOY_SITE"


def default_deploy_site() -> Path:
    """``<this environment>/deploy/lib/pythonX.Y/site-packages``: the side venv ``.venv/deploy`` of docs/deploy.md."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return Path(sys.prefix) / "deploy" / "lib" / version / "site-packages"


def import_deploy_sdk() -> ModuleType:
    """``monai.deploy``, imported from this environment or else from ``$AGI_MONAI_DEPLOY_SITE`` /
    :func:`default_deploy_site` (added with ``site.addsitedir``, so its ``.pth`` files run, and its ``monai/deploy``
    appended to the ``monai`` package's path).

    Raises:
        ImportError: the SDK is in neither place, or it does not import (the message says which and why).
    """
    import monai

    try:
        return importlib.import_module("monai.deploy")
    except ModuleNotFoundError as error:
        if error.name not in ("monai.deploy", "holoscan"):
            raise
    folder = Path(os.environ.get(DEPLOY_SITE_ENV) or default_deploy_site())
    if not (folder / "monai" / "deploy" / "__init__.py").is_file():
        raise ImportError(
            f"the MONAI Deploy App SDK is not installed: no monai.deploy in this environment nor in {folder} "
            f"(${DEPLOY_SITE_ENV}); install it as docs/deploy.md says (pip install agi-monai[deploy] in a deployment "
            f"environment, or the side environment .venv/deploy for development)"
        )
    if str(folder) not in sys.path:
        site.addsitedir(str(folder))
    portion = str(folder / "monai")
    if portion not in monai.__path__:
        monai.__path__.append(portion)
    return importlib.import_module("monai.deploy")
