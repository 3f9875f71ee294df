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
# CCCL's headers (<nv/target>, reached by ATen's CUDA headers) for the NCCL back
# end of the c10d part of the build: the CUDA wheels torch depends on lack them.
# Once, where libtorch has CUDA; without them GPUs average gradients through Gloo.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ -e "$SITE/torch/lib/libtorch_cuda.so" ] && [ ! -e "$SITE/nvidia/cu13/include/nv/target" ] && [ ! -e "$VENV.cccl-tried" ]; then
  exec 9>"$VENV.lock"
  flock 9
  if [ ! -e "$VENV.cccl-tried" ]; then
    echo "installing CUDA's CCCL headers (nvidia-cuda-cccl) for NCCL..." >&2
    touch "$VENV.cccl-tried"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "nvidia-cuda-cccl==13.0.*" >&2 ||
      echo "warning: nvidia-cuda-cccl did not install: data-parallel training on GPUs will use Gloo" >&2
  fi
  flock -u 9
fi
# Gloo's headers for the c10d part of the build (data-parallel training): the
# wheel has Gloo inside libtorch but not its headers; Debian's libgloo-dev has
# them. Installed once where we are root with apt; elsewhere the build leaves
# --nproc out and says what to install.
if [ ! -e /usr/include/gloo/algorithm.h ] && [ -z "${DREAMBOOTH_GLOO_INCLUDE:-}" ] &&
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ ! -e "$VENV.gloo-tried" ]; then
  echo "installing Gloo's headers (libgloo-dev) for data-parallel training..." >&2
  touch "$VENV.gloo-tried"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgloo-dev; } >&2 ||
    echo "warning: libgloo-dev did not install: --nproc will be left out of the build" >&2
fi
echo "$VENV"
