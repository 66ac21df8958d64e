#!/usr/bin/env bash
# The packaging check of issue 26, as a user meets it: a wheel built with
# `python -m build` from a clean clone of HEAD installs, with its dependencies
# from the package index, into a new virtual environment and runs the demo
# from a folder outside the repository, with a new RETRAIN_HOME.
#
#   bash benchmarks/wheel_demo.sh [WORK_DIR]     (make wheel-check [WHEEL_DIR=...])
#
# WORK_DIR (default: a new temporary folder) receives the clone, the two
# environments, the wheel and the demo's folder; it is kept. PYTHON (default
# python3) makes the environments. Each step's wall time is printed; the first
# failing step stops the script with its status. Not a test: it downloads and
# installs TensorFlow and the rest (about 2 GB, minutes; pip's cache helps).
# Only committed work is checked: the clone is of HEAD. The build's output goes to
# WORK_DIR/build.log.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
work="${1:-$(mktemp -d -t retrain-wheel-XXXXXX)}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
# Nothing of the repository or the caller's environments may leak into the check.
unset PYTHONPATH VIRTUAL_ENV
export RETRAIN_HOME="$work/home"

step() {
    local name="$1" start end seconds
    shift
    start=$(date +%s.%N)
    "$@"
    end=$(date +%s.%N)
    seconds=$(awk "BEGIN { printf \"%.1f\", $end - $start }")
    printf '%-48s %7s s\n' "$name" "$seconds" >>"$work/times.txt"
    echo "== $name: $seconds s"
}

if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
    echo "note: $repo has uncommitted changes; the check builds HEAD only"
fi
: >"$work/times.txt"
rm -rf "$work/clone" "$work/dist" "$work/build-env" "$work/env" "$work/run"
step "clone HEAD" git clone --quiet "$repo" "$work/clone"
step "build environment (build from the index)" \
    bash -c "'$python' -m venv '$work/build-env' && '$work/build-env/bin/pip' install --quiet build"
step "python -m build (sdist, then the wheel)" \
    bash -c "'$work/build-env/bin/python' -m build --outdir '$work/dist' '$work/clone' >'$work/build.log'"
wheel="$(ls "$work"/dist/retrain-*.whl)"
step "new environment + pip install the wheel" \
    bash -c "'$python' -m venv '$work/env' && '$work/env/bin/pip' install --quiet '$wheel'"

mkdir -p "$work/run"
cd "$work/run"
step "retrain --version" "$work/env/bin/retrain" --version
"$work/env/bin/python" -c "import retrain, sys; print('retrain imported from', retrain.__file__)
sys.exit('$repo' in retrain.__file__)"
step "retrain-demo (first run: converts the backbone)" \
    "$work/env/bin/retrain-demo" --output_dir "$work/run/demo"
step "retrain-demo again (cache reused)" "$work/env/bin/retrain-demo" --output_dir "$work/run/demo"
step "retrain-report on the demo's output" "$work/env/bin/retrain-report" "$work/run/demo/output"
echo
echo "All steps passed ($work):"
cat "$work/times.txt"
