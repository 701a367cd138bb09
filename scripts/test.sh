#!/usr/bin/env bash
# The test command of README.md: sets up ./.venv if needed, then runs the whole test suite.
#
# With two or more cores the suite runs as two pytest processes side by side: the end-to-end files that train and
# evaluate bundles through the scripts, plus test_data_datasets.py to even the halves' times (LONG below), in one,
# every other file in the other. Each process, and each subprocess the tests start, uses one thread: on shared cores
# two OpenMP teams wait on each other (tests/test_engines.py measured iterations 10-50x slower). pytest-xdist would do the splitting, but
# it is not among the project's dependencies, and two processes are all the CI machine's two cores can use.
# The background half's report is printed when both are done; the exit status fails if either half fails.
#
# Extra arguments run one pytest process with them (e.g. `bash scripts/test.sh -k group_roll`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
python="${AGI_MONAI_VENV:-.venv}/bin/python"
pytest=("$python" -m pytest -q --durations=10)

if [ "$#" -gt 0 ] || [ "$(nproc)" -lt 2 ]; then
    exec "${pytest[@]}" "$@"
fi

# (clean-clone CI, 2026-11-24, commit 781710d: these 15.6 min, the others 16.6 min, side by side; before
# test_data_datasets.py, a tenth of the others' time by --junitxml, moved here: 15.1 and 19.0 min at commit 8586ca0;
# commit 5eecbb5, on a slower day and with new CLI tests: 20.9 and 24.1 min, so test_deploy.py moved here too)
LONG=(tests/test_compare.py tests/test_demo.py tests/test_ablation.py tests/test_downstream.py tests/test_engines.py
      tests/test_robustness.py tests/test_kill_resume.py tests/test_data_datasets.py tests/test_deploy.py)
rest=()
for file in tests/test_*.py; do
    [[ " ${LONG[*]} " == *" $file "* ]] || rest+=("$file")
done

export OMP_NUM_THREADS=1
work=$(mktemp -d)
long_pid=
# interrupted: stop the background pytest and the scripts it runs, not only itself
trap '[ -n "$long_pid" ] && { pkill -TERM -P "$long_pid"; kill "$long_pid"; } 2>/dev/null; rm -rf "$work"' EXIT
started=$SECONDS
echo "test.sh: ${#LONG[@]} files in the background (the end-to-end ones; their report at the end), the other ${#rest[@]} files here"
"${pytest[@]}" --basetemp "$work/long" -p no:cacheprovider "${LONG[@]}" > "$work/long.log" 2>&1 &
long_pid=$!
rest_status=0
"${pytest[@]}" --basetemp "$work/rest" "${rest[@]}" 2>&1 | tee "$work/rest.log" || rest_status=${PIPESTATUS[0]}
long_status=0
wait "$long_pid" || long_status=$?
long_pid=
echo
echo "---------------- the background files (${LONG[*]}), run alongside:"
cat "$work/long.log"
echo
# pytest's last line "N passed, ... in T s" (Holoscan may print its own lines after it, at interpreter exit)
summary() { grep -E '(passed|failed|error|no tests ran).* in [0-9.]+s' "$1" | tail -n 1 | sed 's/^=* *//; s/ *=*$//'; }
outcome=$([ "$rest_status" -eq 0 ] && [ "$long_status" -eq 0 ] && echo passed || echo FAILED)
echo "test.sh: $outcome in $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s;" \
     "background files: $(summary "$work/long.log"); other files: $(summary "$work/rest.log")"
[ "$outcome" = passed ]
