#!/usr/bin/env bash
# The demo command of README.md: sets up ./.venv if needed, then trains AGI-Net and ResUNet at the same budget
# with bundle brats_t1_t2_flair_to_t1gd's train.json on the real BraTS cases shipped in tests/data/ and
# synthesizes T1Gd from (T1, T2, FLAIR) for a held-out TCGA case, with PSNR/SSIM/MAE against the real T1Gd
# next to input-as-T1Gd baselines and a PNG panel (scripts/demo.py says how).
# Extra arguments go to scripts/demo.py (e.g. `bash scripts/demo.sh --iterations 600 --output_dir outputs/demo_long`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${AGI_MONAI_VENV:-.venv}/bin/python" scripts/demo.py "$@"
