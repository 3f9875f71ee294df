#!/usr/bin/env bash
# Creates (once per machine) the virtual environment whose PyTorch 2.11.0 lends
# libtorch to the tch build, and prints its path. Idempotent: a working venv is
# left alone; a missing or broken one is (re)made.
# DREAMBOOTH_TORCH_VENV overrides the place.
set -euo pipefail
TORCH_VERSION=2.11.0
VENV="${DREAMBOOTH_TORCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/dreambooth/torch-$TORCH_VERSION}"

venv_ok() {
  [ -x "$VENV/bin/python" ] &&
    "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" >/dev/null 2>&1
}

if ! venv_ok; then
  echo "setting up PyTorch $TORCH_VERSION in $VENV (once per machine, about 5 GB)..." >&2
  mkdir -p "$(dirname "$VENV")"
  # Another checkout may be building the same venv: serialise on a lock file.
  exec 9>"$VENV.lock"
  flock 9
  if ! venv_ok; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" numpy >&2
  fi
fi
echo "$VENV"
