#!/usr/bin/env bash
# Second test environment: Axolotl 0.21.0 on Python 3.11, CPU.
#
#   .ci/setup-axolotl-0.21.sh VENV_DIR      (e.g. .venv-ax021; idempotent)
#   VENV_DIR/bin/python -m pytest -q tests/unit/test_args.py tests/e2e/test_axolotl_train.py
#
# Axolotl 0.21.0 declares Requires-Python >= 3.12, and this project's CI runs 3.11, so
# the wheel is installed with --no-deps --ignore-requires-python, after:
#   1. torch 2.13.0 (the CPU build this machine serves from disk; installed first, or a
#      requirement would pull a multi-GB CUDA build),
#   2. Axolotl 0.21.0's own requirements, listed explicitly in
#      .ci/requirements-axolotl-0.21.txt (pinned as 0.21.0 pins them; extras and the
#      CUDA/Triton-only packages are left out, see that file).
# Then pytest (with pytest-xdist), and this package as users get it (a wheel, with its .pth).
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=$1
PYTHON=${PYTHON:-python3.11}
TORCH_VERSION=2.13.0
AXOLOTL_VERSION=0.21.0
REQS="$REPO/.ci/requirements-axolotl-0.21.txt"
# pytest-xdist at the Makefile's pin (its test targets run pytest -n).
XDIST_VERSION=$(sed -n 's/^XDIST_VERSION ?= //p' "$REPO/Makefile")

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

start=$(date +%s)
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip)

# Dependencies: skipped when the stamp matches the requirement list (same hash).
stamp="$VENV/.deps-axolotl-$AXOLOTL_VERSION"
want="torch==$TORCH_VERSION xdist==$XDIST_VERSION $(sha256sum "$REQS" | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    "${PIP[@]}" install -q "torch==$TORCH_VERSION"
    "${PIP[@]}" install -q -r "$REQS" "pytest>=8" "pytest-xdist==$XDIST_VERSION"
    "${PIP[@]}" install -q --no-deps --ignore-requires-python "axolotl==$AXOLOTL_VERSION"
    echo "$want" >"$stamp"
fi

# This package, always reinstalled from the working tree (not with DEPS_ONLY=1: .ci/run
# builds the dependencies in the background while `make demo` builds this package).
if [[ "${DEPS_ONLY:-0}" == 1 ]]; then
    echo "setup-axolotl-0.21: $VENV dependencies ready in $(( $(date +%s) - start ))s"
    exit 0
fi
(cd "$REPO" && "${PIP[@]}" install -q --no-deps --force-reinstall .)

"$PY" - <<'EOF'
import importlib.metadata as md
import sys

print(
    "python", sys.version.split()[0],
    "| torch", md.version("torch"),
    "| axolotl", md.version("axolotl"),
    "| transformers", md.version("transformers"),
    "| axolotl-otr", md.version("axolotl-otr"),
)
EOF
echo "setup-axolotl-0.21: $VENV ready in $(( $(date +%s) - start ))s ($(du -sh "$VENV" | cut -f1))"
