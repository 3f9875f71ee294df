# Sourced by scripts: points the tch build at the shared PyTorch venv.
_venv="$("$(dirname "${BASH_SOURCE[0]}")/torch-venv.sh")"
export LIBTORCH_USE_PYTORCH=1
export PATH="$_venv/bin:$PATH"
# Two cores on CI: keep libtorch from oversubscribing them in tests.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
unset _venv
