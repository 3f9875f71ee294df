#!/usr/bin/env bash
# The device machine receives the working tree's tracked files, at most 64 MiB in
# all; tests/fixtures alone is ~118 MB. gpu_check.sh needs only tiny-sd1's folder,
# so before a device run the larger fixture models the check does not use are
# untracked and ignored for the duration, and afterwards put back. Never commit
# between `on` and `off`.
#   benches/gpu_trim.sh on     # before the device call
#   benches/gpu_trim.sh off    # right after it
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=.git/info/exclude
marker="# gpu_trim.sh"
big=(
  tests/fixtures/models/tiny-sd1.safetensors
  tests/fixtures/models/tiny-sd1.ckpt
  tests/fixtures/models/tiny-sd2.safetensors
  tests/fixtures/models/tiny-sd2
)
case "${1:-}" in
  on)
    git rm -r -q --cached "${big[@]}"
    for p in "${big[@]}"; do echo "/$p $marker" >>"$exclude"; done
    echo "trimmed; tracked files now: $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) bytes"
    ;;
  off)
    grep -v "$marker" "$exclude" >"$exclude.tmp" || true
    mv "$exclude.tmp" "$exclude"
    git reset -q -- "${big[@]}"
    git status --short -- tests/fixtures
    echo "restored"
    ;;
  *)
    echo "usage: benches/gpu_trim.sh on|off" >&2
    exit 2
    ;;
esac
