#!/usr/bin/env bash
# One GPU session's checks, run from the repository root on a CUDA machine that has
# torch 2.11.0 but no Rust: a release binary built elsewhere is given as $BIN.
#   BIN=path/to/dreambooth PY=python OUT=results-dir benches/gpu_check.sh [speed] [graphs] [presets] [sdxl] [all]
# 1. CUDA correctness: `generate` on the fixture model, CUDA against CPU.
# 2. Speed and peak memory of a training step with SD 1.5 shapes (random weights) at
#    512: ours (`dreambooth bench`) and diffusers' step (benches/diffusers_train_step.py),
#    same card, same settings, one after the other; FLOPs of the step for MFU.
#    graphs: CUDA graph replay against eager steps (same final loss), then its speed.
# 3. presets: the estimator (`dreambooth vram`) against the measured CUDA peak per preset.
# 4. sdxl (not part of `all`: it takes a whole command, ~8 of its 10 minutes): SDXL base
#    1.0's shapes with random weights (benches/make_sdxl_shapes.py, written here: 7 GB
#    cannot travel) at 1024, bf16. Each SDXL preset's CUDA peak against `dreambooth
#    vram`; our it/s against diffusers' step (benches/diffusers_train_step.py with the
#    same config), alternating ours, diffusers, ours, diffusers: LoRA (sdxl-12gb) and
#    full (sdxl-24gb: 8-bit AdamW and the fused backward pass; diffusers' side takes
#    torch AdamW where bitsandbytes is absent, and runs PyTorch's per-parameter
#    optimizer hooks for the fused pass), then, time left, the full UNet with float32
#    AdamW and clipping on both sides (sdxl-bf16-full-adamw.yaml, like for like).
#    SDXL_BUDGET (seconds, default 450) stops starting new runs past it; each run is
#    cut at 120 s, so the part ends within ~10 minutes.
# Every result is one JSON line in $OUT/results.jsonl.
set -uo pipefail
what=" ${*:-all} "
# want NAME: NAME was asked for (or all was).
want() { [[ "$what" == *" all "* || "$what" == *" $1 "* ]]; }
BIN="${BIN:?the dreambooth binary}"
PY="${PY:-python}"
OUT="${OUT:?a results folder}"
mkdir -p "$OUT"
# At most 8 files come back from $OUT: configs and scratch go to $WORK.
WORK="${WORK:-/tmp/gpu-check}"
mkdir -p "$WORK"
results="$OUT/results.jsonl"
note() { echo "{\"check\":\"$1\",\"result\":$2}" >>"$results"; }
json_or_error() { local line; line=$("$@" 2>"$WORK/last.err" | tail -1); [ -n "$line" ] && echo "$line" || echo "{\"error\":$(tail -2 "$WORK/last.err" | $PY -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>&1
SD15=/tmp/sd15-shapes
if want speed || want graphs || want presets; then
  [ -d "$SD15" ] || $PY benches/make_sd15_shapes.py --out "$SD15" >>"$OUT/log.txt" 2>&1
fi

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
    cfg="$WORK/preset-$preset.yaml"
    printf 'name: p\nsource_checkpoint: %s\nresolution: 512\npreset: %s\nconcepts:\n  - instance_data_dir: %s\n    instance_prompt: a photo of sks dog\n' \
      "$SD15" "$preset" "$WORK" >"$cfg"
    { echo "== $preset"; "$BIN" vram "$cfg" 2>&1; } >>"$OUT/vram.txt"
    note "preset_$preset" "$(json_or_error "$BIN" bench --model "$SD15" --config "$cfg" --steps 3 --device cuda)"
  done
fi
if [[ "$what" == *" sdxl "* ]]; then
  SDXL="${SDXL_DIR:-/tmp/sdxl-shapes}"
  budget=${SDXL_BUDGET:-450}
  t0=$SECONDS
  # in_budget: there is time to start another run.
  in_budget() { (( SECONDS - t0 < budget )) || { note sdxl_budget_spent "{\"seconds\":$((SECONDS - t0)),\"skipped\":\"$1\"}"; false; }; }
  [ -f "$SDXL/unet/config.json" ] || note sdxl_weights "$(json_or_error $PY benches/make_sdxl_shapes.py --out "$SDXL" --device cuda)"
  # ours NAME CONFIG: `dreambooth bench`; theirs NAME CONFIG: diffusers' step, same config.
  ours() { in_budget "$1" && note "$1" "$(json_or_error timeout 120 "$BIN" bench --model "$SDXL" --config "$2" --steps 10 --device cuda)"; }
  theirs() { in_budget "$1" && note "$1" "$(json_or_error timeout 120 $PY benches/diffusers_train_step.py --model "$SDXL" --config "$2" --steps 10 --warmup 3 --pre-compute-text-embeddings --device cuda)"; }
  # The estimator's figures as JSON: resident, the training step's peak, the run's peak.
  estimate() {
    "$BIN" vram "$1" >"$WORK/vram-$2.txt" 2>&1
    { echo "== $2"; cat "$WORK/vram-$2.txt"; } >>"$OUT/vram.txt"
    $PY - "$WORK/vram-$2.txt" <<'PY'
import json, re, sys
text = open(sys.argv[1]).read()
gib = lambda pat: (lambda m: round(float(m.group(1)) * 2**30) if m else None)(re.search(pat, text))
resident, step = gib(r"resident total\s+([\d.]+) GiB"), gib(r"training step \(\+([\d.]+) GiB\)")
print(json.dumps({"resident_bytes": resident, "step_extra_bytes": step,
                  "training_peak_bytes": resident + step if resident is not None and step is not None else None,
                  "run_peak_bytes": gib(r"peak \(allocated\)[^\n]*?([\d.]+) GiB"),
                  "card_needed_bytes": gib(r"card memory needed[^\n]*?([\d.]+) GiB")}))
PY
  }
  for preset in 12gb 24gb 16gb 48gb; do
    cfg="$WORK/sdxl-$preset.yaml"
    printf 'name: p\nsource_checkpoint: %s\npreset: sdxl-%s\nconcepts:\n  - instance_data_dir: %s\n    instance_prompt: a photo of sks dog\n' \
      "$SDXL" "$preset" "$WORK" >"$cfg"
    note "sdxl_estimate_$preset" "$(estimate "$cfg" "sdxl-$preset" 2>&1 | tail -1)"
  done
  # Alternating pairs; each preset's first run of ours is also its measured peak.
  for round in 1 2; do
    ours "sdxl_ours_12gb_lora_$round" "$WORK/sdxl-12gb.yaml"
    theirs "sdxl_diffusers_12gb_lora_$round" "$WORK/sdxl-12gb.yaml"
  done
  for round in 1 2; do
    ours "sdxl_ours_24gb_full_$round" "$WORK/sdxl-24gb.yaml"
    theirs "sdxl_diffusers_24gb_full_$round" "$WORK/sdxl-24gb.yaml"
  done
  ours sdxl_ours_16gb "$WORK/sdxl-16gb.yaml"
  ours sdxl_ours_48gb "$WORK/sdxl-48gb.yaml"
  for round in 1 2; do
    ours "sdxl_ours_full_adamw_$round" benches/configs/sdxl-bf16-full-adamw.yaml
    theirs "sdxl_diffusers_full_adamw_$round" benches/configs/sdxl-bf16-full-adamw.yaml
  done
  note sdxl_seconds "$((SECONDS - t0))"
fi
echo "done: $(wc -l <"$results") results"
