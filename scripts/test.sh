#!/usr/bin/env bash
# The test command of README.md: sets up ./.venv if needed, then runs the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k group_roll`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${AGI_MONAI_VENV:-.venv}/bin/python" -m pytest -q --durations=10 "$@"
