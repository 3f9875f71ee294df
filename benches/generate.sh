#!/usr/bin/env bash
# Times `dreambooth generate` against diffusers on the same model, prompt, sampler,
# steps, size and seed, on the CPU with 2 threads. Whole-process wall time, so model
# loading and Python/torch start-up count, as a user feels them.
#   benches/generate.sh [MODEL_DIR] [SAMPLER] [STEPS] [SIZE] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
model="${1:-tests/fixtures/models/tiny-sd1}"; sampler="${2:-dpmpp-2m}"; steps="${3:-20}"; size="${4:-32}"; runs="${5:-5}"
cargo build --release --quiet
out="$(mktemp -d)"
ours=(./target/release/dreambooth generate --model "$model" --prompt "a photo of sks dog" --negative blurry
      --seed 0 --steps "$steps" --scheduler "$sampler" --width "$size" --height "$size" --device cpu --out "$out/ours.png")
ref=(python benches/diffusers_generate.py "$model" "$sampler" "$steps" "$size" "$out/ref.png")
time_runs() {
  local best=() t0 t1
  for _ in $(seq "$runs"); do
    t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N)
    best+=("$(echo "$t1 - $t0" | bc)")
  done
  printf '%s\n' "${best[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
"${ours[@]}" >/dev/null 2>&1; "${ref[@]}" >/dev/null 2>&1   # warm-up (page cache)
o=$(time_runs "${ours[@]}"); r=$(time_runs "${ref[@]}")
echo "{\"model\":\"$model\",\"sampler\":\"$sampler\",\"steps\":$steps,\"size\":$size,\"ours_median_s\":$o,\"diffusers_median_s\":$r,\"speedup\":$(echo "scale=2; $r / $o" | bc)}"
