#!/usr/bin/env bash
# One GPU session's checks, run from the repository root on a CUDA machine that has
# torch 2.11.0 but no Rust: a release binary built elsewhere is given as $BIN.
#   BIN=path/to/dreambooth PY=python OUT=results-dir benches/gpu_check.sh [speed] [graphs] [presets] [all]
# 1. CUDA correctness: `generate` on the fixture model, CUDA against CPU.
# 2. Speed and peak memory of a training step with SD 1.5 shapes (random weights) at
#    512: ours (`dreambooth bench`) and diffusers' step (benches/diffusers_train_step.py),
#    same card, same settings, one after the other; FLOPs of the step for MFU.
#    graphs: CUDA graph replay against eager steps (same final loss), then its speed.
# 3. presets: the estimator (`dreambooth vram`) against the measured CUDA peak per preset.
# Every result is one JSON line in $OUT/results.jsonl.
set -uo pipefail
what=" ${*:-all} "
# want NAME: NAME was asked for (or all was).
want() { [[ "$what" == *" all "* || "$what" == *" $1 "* ]]; }
BIN="${BIN:?the dreambooth binary}"
PY="${PY:-python}"
OUT="${OUT:?a results folder}"
mkdir -p "$OUT"
results="$OUT/results.jsonl"
note() { echo "{\"check\":\"$1\",\"result\":$2}" >>"$results"; }
json_or_error() { local line; line=$("$@" 2>"$OUT/last.err" | tail -1); [ -n "$line" ] && echo "$line" || echo "{\"error\":$(tail -2 "$OUT/last.err" | $PY -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>&1
SD15=/tmp/sd15-shapes
[ -d "$SD15" ] || $PY benches/make_sd15_shapes.py --out "$SD15" >>"$OUT/log.txt" 2>&1

if want speed; then
  M=tests/fixtures/models/tiny-sd1
  for dev in cuda cpu; do
    "$BIN" generate --model $M --prompt "a photo of sks dog" --negative blurry --seed 0 --steps 20 \
      --scheduler dpmpp-2m --device $dev --out "$OUT/tiny-$dev.png" >>"$OUT/log.txt" 2>&1
  done
  note generate_cuda_vs_cpu "$($PY -c "
import json, numpy as np
from PIL import Image
a = np.asarray(Image.open('$OUT/tiny-cuda.png'), dtype=int); b = np.asarray(Image.open('$OUT/tiny-cpu.png'), dtype=int)
print(json.dumps({'max_abs_diff_of_255': int(abs(a - b).max()), 'mean_abs_diff': float(abs(a - b).mean())}))" 2>&1 || echo '"failed"')"
  for cfg in sd15-bf16-sdpa-b1 sd15-bf16-sdpa-b1-adam8 sd15-bf16-default-b1 sd15-fp16-sdpa-b1 sd15-bf16-sdpa-b8; do
    note "ours_$cfg" "$(json_or_error "$BIN" bench --model "$SD15" --config benches/configs/$cfg.yaml --steps 10 --device cuda)"
  done
  note diffusers_sd15-bf16-sdpa-b1 "$(json_or_error $PY benches/diffusers_train_step.py --model "$SD15" --precision bf16 --attention sdpa --batch 1 --steps 10 --device cuda)"
  # Like for like: our trainer encodes a frozen text encoder's prompts once.
  note diffusers_sd15-bf16-sdpa-b1-precomputed "$(json_or_error $PY benches/diffusers_train_step.py --model "$SD15" --precision bf16 --attention sdpa --batch 1 --steps 10 --device cuda --pre-compute-text-embeddings)"
  note diffusers_sd15-bf16-default-b1 "$(json_or_error $PY benches/diffusers_train_step.py --model "$SD15" --precision bf16 --attention default --batch 1 --steps 10 --device cuda)"
  note diffusers_sd15-fp16-sdpa-b1 "$(json_or_error $PY benches/diffusers_train_step.py --model "$SD15" --precision fp16 --attention sdpa --batch 1 --steps 10 --device cuda)"
  note diffusers_sd15-bf16-sdpa-b8 "$(json_or_error $PY benches/diffusers_train_step.py --model "$SD15" --precision bf16 --attention sdpa --batch 8 --steps 10 --device cuda)"
  note flops_b8 "$(json_or_error $PY benches/count_flops.py --model "$SD15" --batch 8)"
fi

if want speed || want graphs; then
  # CUDA graphs (DREAMBOOTH_CUDA_GRAPHS=1, an experiment): the same steps eagerly and
  # replayed must end at the same loss (same data, same noise); then the speed.
  for mode in 0 1; do
    note "graphs${mode}_tiny-bf16-b1" "$(DREAMBOOTH_CUDA_GRAPHS=$mode json_or_error "$BIN" bench --model tests/fixtures/models/tiny-sd1 --config benches/configs/sd15-bf16-sdpa-b1.yaml --steps 10 --device cuda)"
    note "graphs${mode}_tiny-bf16-b1-accum2-8bit" "$(DREAMBOOTH_CUDA_GRAPHS=$mode json_or_error "$BIN" bench --model tests/fixtures/models/tiny-sd1 --config benches/configs/graphs-accum2-adam8.yaml --steps 10 --device cuda)"
  done
  for cfg in sd15-bf16-sdpa-b1 sd15-bf16-sdpa-b8; do
    note "ours_graphs_$cfg" "$(DREAMBOOTH_CUDA_GRAPHS=1 json_or_error "$BIN" bench --model "$SD15" --config benches/configs/$cfg.yaml --steps 10 --device cuda)"
  done
fi

if want presets; then
  for preset in 6gb 8gb 12gb 16gb 24gb 48gb; do
    cfg="$OUT/preset-$preset.yaml"
    printf 'name: p\nsource_checkpoint: %s\nresolution: 512\npreset: %s\nconcepts:\n  - instance_data_dir: %s\n    instance_prompt: a photo of sks dog\n' \
      "$SD15" "$preset" "$OUT" >"$cfg"
    "$BIN" vram "$cfg" >"$OUT/vram-$preset.txt" 2>&1
    note "preset_$preset" "$(json_or_error "$BIN" bench --model "$SD15" --config "$cfg" --steps 3 --device cuda)"
  done
fi
echo "done: $(wc -l <"$results") results"
