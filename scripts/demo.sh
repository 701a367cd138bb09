#!/usr/bin/env bash
# The demo command of README.md: sets up ./.venv if needed, then trains AGI-Net and ResUNet at the same budget
# with bundle brats_t1_t2_flair_to_t1gd's train.json on the real BraTS cases shipped in tests/data/ and
# synthesizes T1Gd from (T1, T2, FLAIR) for a held-out TCGA case, with PSNR/SSIM/MAE against the real T1Gd
# next to input-as-T1Gd baselines and a PNG panel (scripts/demo.py says how).
# Extra arguments go to scripts/demo.py (e.g. `bash scripts/demo.sh --iterations 600 --output_dir outputs/demo_long`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# OpenMP threads that wait by spinning (libgomp's default) stall each other when the cores are shared with other
# work: an AGI-Net training step of the demo took 4.9-6.1 s with two spinning threads and 1.3-1.7 s with
# passive ones on 2 cores at load 3-4 (one thread: 1.6-2.2 s); on the idle machine passive costs about 10 % (0.63-0.65
# s against 0.57-0.60 s). libgomp reads this when torch loads, so here.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec "${AGI_MONAI_VENV:-.venv}/bin/python" scripts/demo.py "$@"
