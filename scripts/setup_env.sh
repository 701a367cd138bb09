#!/usr/bin/env bash
# Creates ./.venv (if needed) with torch, the pinned dependencies and the compiled extension.
# Idempotent: a second run only rebuilds the extension when csrc/ changed, and a side environment when its pins
# or torch changed. Used by scripts/test.sh and scripts/demo.sh, so that each README command sets itself up on a
# fresh machine.
#
#   AGI_MONAI_TORCH    torch requirement (default torch==2.14.1: the CUDA 13.0 build, so the CUDA
#                      kernels compile wherever nvcc 13 is installed; torch==2.13.0 here is CPU-only)
#   AGI_MONAI_WITH_CUDA  auto (default) | 1 | 0 — see setup.py
#   AGI_MONAI_VENV     where the virtual environment lives (default ./.venv)
#   AGI_MONAI_DEPLOY   1 (default) | 0: the side environment $VENV/deploy with the MONAI Deploy App SDK
#                      (scripts/deploy_requirements.txt; docs/deploy.md says why it is a side environment). Its
#                      failure is not fatal: the Deploy tests then skip, saying why.
#   AGI_MONAI_LABEL    1 (default) | 0: the side environment $VENV/label with MONAI Label and numpy < 2
#                      (scripts/label_requirements.txt; docs/deploy.md). Its failure is not fatal: the test of
#                      MONAI Label's BundleInferTask then skips, saying why.
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
# side_env NAME REQUIREMENTS WHAT CHECK...: the side environment $VENV/NAME, a venv of .venv's Python that also sees
# .venv's packages through a .pth file (after its own: its pins win), with the exact pins of REQUIREMENTS installed
# --no-deps (a resolver run would pull a second torch or replace the project's packages), then started once with
# CHECK (python's arguments). Built from nothing when missing, incomplete or built from other pins or another torch
# (a pin removed leaves no package behind). Its failure is not fatal: a warning, and the tests that need it skip,
# saying why; a build that failed with the same pins and torch is not retried on every run (its marker says how).
main_site=$(realpath "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')")
pyver=$("$VENV/bin/python" -c 'import sys; print(f"python{sys.version_info.major}.{sys.version_info.minor}")')
torch_version=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')
side_env() {
  local name=$1 dir="$VENV/$1" requirements=$2 what=$3
  shift 3
  # The markers hold what the environment was built from, the pins and torch's version, compared by content: a
  # clone or checkout gives every file a new time. The done marker is written once the environment is complete (a
  # package's own file is written early: an install killed midway left it, and the environment was taken for
  # complete), and removed first when it is rebuilt.
  local done_marker="$dir/.agi_monai_installed" failed_marker="$VENV/.agi_monai_${name}_failed" wanted start
  wanted="$(cat "$requirements"; echo "torch $torch_version")"
  if [ -f "$done_marker" ] && [ "$(cat "$done_marker")" = "$wanted" ]; then
    return 0
  fi
  if [ -f "$failed_marker" ] && [ "$(cat "$failed_marker")" = "$wanted" ]; then
    echo "[setup] WARNING: the side environment $dir ($what) failed to install with these pins and torch $torch_version" \
         "before; not retried (remove $failed_marker to retry); the tests that need it will skip"
    return 0
  fi
  if [ -e "$dir" ] && [ ! -f "$dir/pyvenv.cfg" ]; then
    echo "[setup] WARNING: $dir is not a virtual environment; left as it is (the tests that need $what will skip)"
    return 0
  fi
  echo "[setup] installing $what into the side environment $dir"
  start=$(date +%s)
  if rm -f "$done_marker" && rm -rf "$dir" \
     && "$VENV/bin/python" -m venv "$dir" \
     && echo "import site; site.addsitedir('$main_site')" > "$dir/lib/$pyver/site-packages/aa_agi_monai_main_venv.pth" \
     && "$dir/bin/python" -m pip install --disable-pip-version-check -q --no-deps -r "$requirements" \
     && "$dir/bin/python" "$@"; then
    printf '%s\n' "$wanted" > "$done_marker"
    rm -f "$failed_marker"
    echo "[setup] $dir installed in $(( $(date +%s) - start )) s"
  else
    printf '%s\n' "$wanted" > "$failed_marker"
    echo "[setup] WARNING: the side environment $dir ($what) could not be installed; the tests that need it will skip"
  fi
}
if [ "${AGI_MONAI_DEPLOY:-1}" = 1 ]; then
  # The check start runs the holoscan wheel's one-time install hook, a .pth file that imports pip: left for later,
  # it would run inside the first process that loads the SDK, where importing pip switches off setuptools' distutils
  # shim, so that torch.compile's C++ tooling then fails in that process. Its warning about the stack size is for the
  # app's runs, where docs/deploy.md deals with it, not for this start.
  side_env deploy scripts/deploy_requirements.txt "the MONAI Deploy App SDK" \
    -W 'ignore:Current stack size:RuntimeWarning' -c 'import holoscan'
fi
if [ "${AGI_MONAI_LABEL:-1}" = 1 ]; then
  side_env label scripts/label_requirements.txt "MONAI Label" \
    -c 'from monailabel.tasks.infer.bundle import BundleInferTask'
fi

"$VENV/bin/python" - <<'PY'
import torch, agi_monai.ops as ops
print(f"[setup] ready: torch {torch.__version__}, compiled op: {ops.extension_available()}, "
      f"CUDA kernels: {ops.extension_has_cuda()}, GPU visible: {torch.cuda.is_available()}")
PY
