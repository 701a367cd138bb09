#!/usr/bin/env bash
# The checks that need a GPU (issue #3's GPU figures), in one command for a lent GPU machine that has
# PyTorch with CUDA but no network and none of our other dependencies:
#
#   bash scripts/gpu_checks.sh prepare              # here, where pip and ./.venv work: fills .whl/ and .gpu/
#   bash scripts/gpu_checks.sh run RESULTS [STEPS]  # on the GPU machine, with .whl/ and .gpu/ beside the code
#   bash scripts/gpu_checks.sh resources [ARCH]     # here, no GPU needed: registers, stack and spills per kernel
#
# prepare downloads the pure-Python wheels the CUDA tests import (for the GPU image's Python, 3.12 by
# default: AGI_MONAI_GPU_PYTHON) and saves the real-image slices test_engines.py trains on (building them
# needs SimpleITK, whose ~50 MB wheel is too big to carry). run installs the wheels into a scratch
# folder (never into the machine's Python), builds the extension in place for the GPU's architecture and
# runs STEPS (default: build tests op network inference), writing logs and tables under RESULTS:
#   tests    pytest: tests/test_group_roll.py (all, CUDA vs CPU for both CUDA implementations),
#            tests/test_layer_norm_gelu.py, and the CUDA tests of tests/test_engines.py (AMP training on real
#            slices; agi_monai.engines imports no SimpleITK, pydicom or nibabel) and tests/test_networks.py
#   op       scripts/benchmark_op.py --device cuda, default kernels (columns) and AGI_MONAI_GROUP_ROLL_CUDA=taps
#   network  scripts/benchmark_network.py --device cuda, batch 16, 256²: float32 and AMP bf16, each beside the
#            previous code (--compare_previous: taps kernels, unfused LayerNorm+GELU) with the CAGR breakdown,
#            then float32 under torch.compile
#   inference scripts/benchmark_inference.py --device cuda: one 240x240x155 case through AGI-Net and ResUNet at the
#            paper's widths as the bundles run it (SliceInferer), 4/16/64 slices per batch, float32 and AMP, with
#            torch.cuda.max_memory_allocated (network only: the end-to-end command needs SimpleITK, not carried)
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_PYTHON="${AGI_MONAI_GPU_PYTHON:-3.12}"

prepare() {
  local py=.venv/bin/python
  [ -x "$py" ] || { echo "gpu_checks: run scripts/setup_env.sh first (prepare uses ./.venv)" >&2; exit 2; }
  mkdir -p .whl .gpu
  "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$GPU_PYTHON" --implementation cp --platform manylinux2014_x86_64 -d .whl \
    monai==1.6.1 pytorch-ignite==0.5.5 fire==0.7.1 termcolor
  "$py" - <<'EOF'
import sys
import torch
sys.path.insert(0, "tests")
from test_engines import build_slices
items = [{key: item[key].as_tensor() for key in ("image", "target")} for item in build_slices()]
torch.save(items, ".gpu/test_engines_slices.pt")
print(f"gpu_checks: saved {len(items)} slices to .gpu/test_engines_slices.pt")
EOF
  du -sh .whl .gpu
}

run() {
  local results="${1:?usage: gpu_checks.sh run RESULTS [STEPS...]}"
  shift
  local steps="${*:-build tests op network inference}"
  mkdir -p "$results"
  local py="${PYTHON:-python3}"
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/agi_monai_site .whl/*.whl
    export PYTHONPATH="/tmp/agi_monai_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  [ -f .gpu/test_engines_slices.pt ] && export AGI_MONAI_TEST_SLICES="$PWD/.gpu/test_engines_slices.pt"
  export PYTHONUNBUFFERED=1
  local failed=""
  for step in $steps; do
    echo "=== gpu_checks: $step ($(date -u +%H:%M:%S))"
    # A failing step is reported and the next one still runs (a failed build stops everything: nothing else
    # could run), so that one GPU session yields every figure it can.
    # (not `if ! run_step`: that context would switch off set -e inside the step)
    set +e
    run_step "$step" "$results" "$py"
    local status=$?
    set -e
    if [ "$status" -ne 0 ]; then
      [ "$step" = build ] && { echo "gpu_checks: build failed, see $results/build.log" >&2; exit 1; }
      failed="$failed $step"
    fi
  done
  echo "gpu_checks: done, results in $results${failed:+; FAILED:$failed}"
  [ -z "$failed" ]
}

run_step() {
  local step="$1" results="$2" py="$3"
  (
    set -euo pipefail
    case "$step" in
      build)
        # The system compiler: some images' default gcc links libstdc++ statically into the extension,
        # which turns every TORCH_CHECK error into a segfault (docs/benchmarks.md, "Machines").
        local arch
        arch="$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
        CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared" TORCH_CUDA_ARCH_LIST="$arch" \
          AGI_MONAI_WITH_CUDA=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS="$(nproc)" \
          "$py" setup.py -q build_ext --inplace 2>&1 | tee "$results/build.log" | tail -3
        "$py" -c "from agi_monai import ops; assert ops.extension_has_cuda(), ops.extension_error(); print('extension with CUDA kernels')"
        ;;
      tests)
        "$py" -m pytest -q -p no:cacheprovider tests/test_group_roll.py tests/test_layer_norm_gelu.py 2>&1 \
          | tee "$results/tests_ops.log" | tail -3
        "$py" -m pytest -q -p no:cacheprovider -m cuda tests/test_engines.py tests/test_networks.py 2>&1 \
          | tee "$results/tests_engines_networks_cuda.log" | tail -3
        ;;
      op)
        "$py" scripts/benchmark_op.py --device cuda --cuda_paths taps --out "$results/benchmark_op_cuda.json" \
          2>&1 | tee "$results/benchmark_op_cuda.log" | tail -25
        ;;
      network)
        local out="$results/benchmark_network_cuda.md"
        for amp in "" bf16; do
          echo "--- ${amp:+--amp $amp}"
          "$py" scripts/benchmark_network.py --device cuda --batch 16 --size 256 --repeats 20 ${amp:+--amp $amp} \
            --compare_fold False --breakdown True --compare_previous True --out "$out" 2>&1 | grep -v Warning | tail -14
        done
        echo "--- torch.compile, float32"
        "$py" scripts/benchmark_network.py --device cuda --batch 16 --size 256 --warmup 3 --repeats 20 --compile \
          --compare_fold False --out "$out" 2>&1 | grep -v Warning | tail -8
        ;;
      inference)
        "$py" scripts/benchmark_inference.py --device cuda --batch_sizes 4,16,64 \
          --out "$results/benchmark_inference_cuda.json" 2>&1 | tee "$results/benchmark_inference_cuda.log" | tail -22
        ;;
      *) echo "gpu_checks: unknown step '$step' (build, tests, op, network, inference)" >&2; exit 2 ;;
    esac
  )
}

# What ptxas allocates per CUDA kernel (float32 and bfloat16 with 32-bit indices: the instantiations AGI-Net
# runs), for ARCH (default 9.0, the H100): registers bound the occupancy, spills would put the column
# kernels' per-thread taps in local memory. Needs nvcc and ./.venv's torch, no GPU (about a minute).
resources() {
  local arch="${1:-9.0}" py=.venv/bin/python tmp
  [ -x "$py" ] || { echo "gpu_checks: run scripts/setup_env.sh first (resources uses ./.venv)" >&2; exit 2; }
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  local includes
  includes="$("$py" -c 'import sysconfig, torch.utils.cpp_extension as c
print(" ".join("-I" + p for p in c.include_paths(device_type="cuda") + [sysconfig.get_paths()["include"]]))' 2>/dev/null)"
  # shellcheck disable=SC2086  # includes is a list of flags
  nvcc -c csrc/cuda/group_roll_kernel.cu -o "$tmp/kernel.o" $includes -Icsrc -O3 -std=c++20 \
    -gencode "arch=compute_${arch/./},code=sm_${arch/./}" -Xptxas -v --expt-relaxed-constexpr \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ >"$tmp/ptxas.log" 2>&1 || { cat "$tmp/ptxas.log" >&2; exit 1; }
  "$py" - "$tmp/ptxas.log" "$arch" <<'EOF'
import re
import subprocess
import sys

log, arch = open(sys.argv[1]).read().splitlines(), sys.argv[2]
print(f"sm_{arch.replace('.', '')}: kernel | registers | stack frame (bytes) | spill stores / loads (bytes)")
name = frame = None
for line in log:
    if m := re.search(r"Compiling entry function '(\S+)'", line):
        name = subprocess.run(["c++filt", m.group(1)], capture_output=True, text=True).stdout.strip()
    elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
        frame = m.groups()
    elif (m := re.search(r"Used (\d+) registers", line)) and name:
        kernel = re.search(r"(\w+_kernel(<[^(]*>)?)\(", name).group(1)
        if not re.search(r"double|Half|long", kernel):
            print(f"{kernel} | {m.group(1)} | {frame[0]} | {frame[1]} / {frame[2]}")
        name = None
EOF
}

case "${1:-}" in
  prepare) prepare ;;
  resources) shift; resources "$@" ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash scripts/gpu_checks.sh prepare | run RESULTS [build] [tests] [op] [network] [inference] | resources [ARCH]" >&2
     exit 2 ;;
esac
