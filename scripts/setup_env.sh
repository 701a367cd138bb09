#!/usr/bin/env bash
# Creates ./.venv (if needed) with torch, the pinned dependencies and the compiled extension.
# Idempotent: a second run only rebuilds the extension when csrc/ changed. Used by scripts/test.sh
# and scripts/demo.sh, so that each README command sets itself up on a fresh machine.
#
#   AGI_MONAI_TORCH    torch requirement (default torch==2.14.1: the CUDA 13.0 build, so the CUDA
#                      kernels compile wherever nvcc 13 is installed; torch==2.13.0 here is CPU-only)
#   AGI_MONAI_WITH_CUDA  auto (default) | 1 | 0 — see setup.py
#   AGI_MONAI_VENV     where the virtual environment lives (default ./.venv)
#   AGI_MONAI_DEPLOY   1 (default) | 0: the side environment $VENV/deploy with the MONAI Deploy App SDK
#                      (scripts/deploy_requirements.txt; docs/deploy.md says why it is a side environment). Its
#                      failure is not fatal: the Deploy tests then skip, saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${AGI_MONAI_VENV:-.venv}"
TORCH_REQ="${AGI_MONAI_TORCH:-torch==2.14.1}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_REQ"
  pip_install "$TORCH_REQ"
fi
if ! "$VENV/bin/python" -c "import monai, ignite, nibabel, pydicom, SimpleITK, fire, pytest, tqdm, ninja, jsonschema, matplotlib" 2>/dev/null; then
  echo "[setup] installing the pinned dependencies (pyproject.toml)"
  pip_install setuptools wheel ninja
  pip_install "monai==1.6.1" "pytorch-ignite==0.5.5" "nibabel==5.4.2" "pydicom==3.0.2" "SimpleITK==2.5.7" \
    "fire==0.7.1" "tqdm>=4.66" "tensorboard>=2.15" "matplotlib>=3.8" "pytest>=8" "jsonschema>=4"
fi

# Rebuild the extension only when its sources are newer than the built library.
so=$(ls agi_monai/_C*.so 2>/dev/null | head -n 1 || true)
if [ -z "$so" ] || [ -n "$(find csrc setup.py pyproject.toml -newer "$so" -print -quit)" ] \
   || [ ! -x "$VENV/bin/agi-monai" ] \
   || ! "$VENV/bin/python" -c "import agi_monai" 2>/dev/null; then
  echo "[setup] building the agi_monai._C extension (C++ kernels; CUDA kernels when torch and nvcc allow)"
  start=$(date +%s)
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e .
  echo "[setup] extension built in $(( $(date +%s) - start )) s"
fi
if [ "${AGI_MONAI_DEPLOY:-1}" = 1 ]; then
  site_dir=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  pyver=$("$VENV/bin/python" -c 'import sys; print(f"python{sys.version_info.major}.{sys.version_info.minor}")')
  deploy_site="$VENV/deploy/lib/$pyver/site-packages"
  # written once the side environment is complete (a package's own file is written early: an install killed midway
  # left it, and the environment was taken for complete)
  deploy_done="$VENV/deploy/.agi_monai_installed"
  if [ ! -f "$deploy_done" ] || [ scripts/deploy_requirements.txt -nt "$deploy_done" ]; then
    echo "[setup] installing the MONAI Deploy App SDK into the side environment $VENV/deploy"
    if "$PY" -m venv "$VENV/deploy" \
       && echo "import site; site.addsitedir('$(realpath "$site_dir")')" > "$deploy_site/aa_agi_monai_main_venv.pth" \
       && "$VENV/deploy/bin/python" -m pip install --disable-pip-version-check -q --no-deps -r scripts/deploy_requirements.txt \
       && "$VENV/deploy/bin/python" -W 'ignore:Current stack size:RuntimeWarning' -c 'import holoscan'; then
      # (That first start ran the holoscan wheel's one-time install hook, a .pth file that imports pip: left
      # for later, it would run inside the first process that loads the SDK, where importing pip switches off
      # setuptools' distutils shim, so that torch.compile's C++ tooling then fails in that process. Its warning
      # about the stack size is for the app's runs, where docs/deploy.md deals with it, not for this start.)
      touch "$deploy_done"
    else
      echo "[setup] WARNING: the MONAI Deploy side environment could not be installed; its tests will skip"
    fi
  fi
fi

"$VENV/bin/python" - <<'PY'
import torch, agi_monai.ops as ops
print(f"[setup] ready: torch {torch.__version__}, compiled op: {ops.extension_available()}, "
      f"CUDA kernels: {ops.extension_has_cuda()}, GPU visible: {torch.cuda.is_available()}")
PY
