#!/usr/bin/env bash
# The demo command of README.md: sets up ./.venv if needed, then trains AGI-Net for a few minutes on the
# real BraTS cases shipped in tests/data/ and synthesizes FLAIR from (T1, T2) for a held-out TCGA case,
# with PSNR/SSIM/MAE against the real FLAIR next to baselines (scripts/demo.py says how).
# Extra arguments go to scripts/demo.py (e.g. `bash scripts/demo.sh --iterations 600 --output_dir outputs/demo_long`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${AGI_MONAI_VENV:-.venv}/bin/python" scripts/demo.py "$@"
