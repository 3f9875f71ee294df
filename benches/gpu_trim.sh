#!/usr/bin/env bash
# The device machine receives the working tree's tracked files, at most 64 MiB in
# all (carried paths included); tests/fixtures alone is ~175 MB. gpu_check.sh needs
# only tiny-sd1's folder (speed, graphs) and tiny-sdxl's tokenizers (sdxl: the
# SDXL-shaped model is written there), so before a device run the fixture weights
# the check does not use are untracked and ignored for the duration, and afterwards
# put back. Never commit between `on` and `off`.
#   benches/gpu_trim.sh on         # before the device call (about 33 MB stay)
#   benches/gpu_trim.sh on sdxl    # for `gpu_check.sh sdxl` alone: tiny-sd1's weights go too (about 13 MB stay)
#   benches/gpu_trim.sh off        # right after it
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=.git/info/exclude
marker="# gpu_trim.sh"
big=(
  tests/fixtures/reference
  tests/fixtures/models/tiny-sd1.safetensors
  tests/fixtures/models/tiny-sd1.ckpt
  tests/fixtures/models/tiny-sd2.safetensors
  tests/fixtures/models/tiny-sd2
  tests/fixtures/models/tiny-sdxl.safetensors
  tests/fixtures/models/tiny-sdxl/unet/diffusion_pytorch_model.safetensors
  tests/fixtures/models/tiny-sdxl/vae/diffusion_pytorch_model.safetensors
  tests/fixtures/models/tiny-sdxl/text_encoder/model.safetensors
  tests/fixtures/models/tiny-sdxl/text_encoder_2/model.safetensors
)
if [ "${1:-}" = on ] && [ "${2:-}" = sdxl ]; then
  big+=(
    tests/fixtures/models/tiny-sd1/unet/diffusion_pytorch_model.safetensors
    tests/fixtures/models/tiny-sd1/vae/diffusion_pytorch_model.safetensors
    tests/fixtures/models/tiny-sd1/text_encoder/model.safetensors
  )
fi
case "${1:-}" in
  on)
    git rm -r -q --cached "${big[@]}"
    # (gitignore has no comments after a pattern: the block's own lines mark it)
    { echo "$marker begin"; printf '/%s\n' "${big[@]}"; echo "$marker end"; } >>"$exclude"
    echo "trimmed; tracked files now: $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) bytes"
    ;;
  off)
    # What `on` (either way) excluded, read back from the exclude file.
    mapfile -t trimmed < <(sed -n "/^$marker begin\$/,/^$marker end\$/p" "$exclude" | grep -v '^#' | sed 's|^/||')
    sed -i "/^$marker begin\$/,/^$marker end\$/d" "$exclude"
    [ ${#trimmed[@]} -eq 0 ] || git reset -q -- "${trimmed[@]}"
    git status --short -- tests/fixtures
    echo "restored"
    ;;
  *)
    echo "usage: benches/gpu_trim.sh on [sdxl] | off" >&2
    exit 2
    ;;
esac
