#!/usr/bin/env bash
# End to end in tmux, the way a user over SSH meets the program:
#   drive the wizard with keystrokes to start a tiny CPU run (tests/fixtures/models/tiny-sd1,
#   resolution 64), see the dashboard count steps, detach, kill the tmux session (the
#   "dropped SSH connection"), check the trainer lives on, start a new session,
#   `dreambooth attach RUN_DIR`, and see the run finish with its summary.
# Usage: tests/e2e_tmux.sh [path/to/dreambooth]   (default: target/release/dreambooth)
# Skips (exit 0, with a message) when tmux is not installed; tests/e2e_tmux.rs runs it
# in `./dev test`. About 11 s on an idle 2-core VM (10 steps); E2E_STEPS_PER_IMAGE=N
# changes the run length, E2E_DEBUG=1 prints each screen, E2E_MODEL=PATH trains another
# model (tests/e2e_tmux.rs runs it on tiny-sdxl too).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v tmux >/dev/null 2>&1; then
    echo "SKIP: tmux is not installed (apt-get install -y tmux); the tmux end-to-end test did not run"
    exit 0
fi
bin="${1:-$repo/target/release/dreambooth}"
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
if [ ! -x "$bin" ]; then
    echo "FAIL: $bin not found; build it first: source scripts/env.sh && cargo build --release" >&2
    exit 1
fi
model="${E2E_MODEL:-$repo/tests/fixtures/models/tiny-sd1}"
steps_per_image="${E2E_STEPS_PER_IMAGE:-5}"

work="$(mktemp -d)"
sock="dreambooth-e2e-$$"
tm() { tmux -L "$sock" -f /dev/null "$@"; }
cleanup() {
    tm kill-server 2>/dev/null || true
    # Only the trainer this test started (its pid is in the run's start event).
    if [ -n "${trainer_pid:-}" ] && kill -0 "$trainer_pid" 2>/dev/null; then kill "$trainer_pid" || true; fi
    if [ "${keep:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

fail() {
    echo "FAIL: $*" >&2
    echo "---- screen ----" >&2
    tm capture-pane -p -t e2e >&2 2>/dev/null || true
    [ -f "$work/runs/e2e/train.log" ] && { echo "---- train.log ----" >&2; tail -20 "$work/runs/e2e/train.log" >&2; }
    keep=1
    exit 1
}

screen() { tm capture-pane -p -t e2e; }

# wait_for SECONDS REGEX WHAT: until the visible screen matches.
wait_for() {
    local deadline=$((SECONDS + $1))
    while ! screen | grep -Eq "$2"; do
        [ $SECONDS -lt $deadline ] || fail "no \"$3\" on screen after $1 s"
        sleep 0.3
    done
    if [ -n "${E2E_DEBUG:-}" ]; then echo "== $3"; screen; fi
}

keys() { tm send-keys -t e2e "$@"; sleep 0.15; }
# Types text literally (no key-name lookup), then lets the screen redraw.
type_text() { tm send-keys -t e2e -l "$1"; sleep 0.15; }

# Two small subject images (PNG, written with Python's standard library).
mkdir -p "$work/images" "$work/presets"
python3 - "$work/images" <<'EOF'
import struct, sys, zlib
def png(path, shift):
    w = h = 32
    rows = b"".join(b"\x00" + b"".join(bytes((230, 40, 30) if (x - 14 - shift) ** 2 + (y - 16) ** 2 < 64 else (20, 40, 200)) for x in range(w)) for y in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
for k in range(2):
    png(f"{sys.argv[1]}/img-{k}.png", 2 * k)
EOF
# A presets/cpu.yaml in the working directory wins over the built-in one: the tiny
# model at resolution 64 (the smallest allowed) with two sampling steps, so the run takes seconds.
cat > "$work/presets/cpu.yaml" <<'EOF'
device: cpu
resolution: 64
training:
  mixed_precision: "no"
  attention: default
  save_model_every_n_epochs: 0
  save_preview_every_n_epochs: 20
sampling:
  steps: 2
EOF

# Session 1: the wizard, 80×24.
tm new-session -d -s e2e -x 80 -y 24 -c "$work" "env OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} bash --norc --noprofile"
keys "cd '$work' && PS1='e2e\$ ' && clear" Enter
keys "'$bin' wizard --runs-dir runs" Enter
wait_for 20 "1 Name" "the wizard's first step"
type_text "e2e"; keys Enter
wait_for 10 "2 · Source checkpoint" "the model step"
type_text "$model"; keys Enter
wait_for 10 "3 · Concepts" "the concepts step"
keys a
type_text "$work/images"; keys Down
type_text "a photo of sks disc"; keys Enter
wait_for 10 "2 images" "the concept listed"
keys Enter
wait_for 10 "4 · Training" "the training step"
keys BSpace BSpace BSpace
type_text "$steps_per_image"; keys Enter
wait_for 10 "5 · .*|▶ cpu" "the VRAM step"
keys Enter
wait_for 10 "preset: cpu" "the review with the preset"
screen | grep -q "mixed_precision" && fail "the saved config overrides the preset's mixed_precision"
keys Enter
[ -n "${E2E_DEBUG:-}" ] && { sleep 3; echo "== after save"; screen; }

# The wizard starts the trainer detached and opens the dashboard on it.
wait_for 60 "step [1-9][0-9]*/$((steps_per_image * 2))" "a step count in the dashboard"
first="$(screen | grep -Eo "step [0-9]+/[0-9]+" | head -1)"
deadline=$((SECONDS + 60))
while second="$(screen | grep -Eo "step [0-9]+/[0-9]+" | head -1)"; [ "$second" = "$first" ]; do
    [ $SECONDS -lt $deadline ] || fail "the dashboard did not update (still $first after 60 s)"
    sleep 0.3
done
echo "dashboard updated: $first -> $second"
keys d
# (A machine fast enough to finish the run already just quits the dashboard.)
wait_for 10 "detached; training goes on|^e2e\\$ *$" "the detach message"
trainer_pid="$(grep -o '"pid":[0-9]*' "$work/runs/e2e/events.jsonl" | head -1 | cut -d: -f2)"
[ -n "$trainer_pid" ] || fail "no trainer pid in events.jsonl"

# The "SSH connection" drops: the whole tmux server goes, the trainer must not.
tm kill-server
sleep 1
kill -0 "$trainer_pid" 2>/dev/null || grep -q '"event":"done"' "$work/runs/e2e/events.jsonl" \
    || fail "the trainer died with the terminal"
echo "trainer $trainer_pid survived the terminal"

# Session 2: attach and see it finish.
tm new-session -d -s e2e -x 80 -y 24 -c "$work" "env OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} bash --norc --noprofile"
keys "cd '$work' && PS1='e2e\$ ' && clear" Enter
keys "'$bin' attach runs/e2e" Enter
wait_for 300 "finished" "the finished run"
wait_for 5 "summary" "the summary"
wait_for 5 "checkpoint: .*step-0*$((steps_per_image * 2))" "the final checkpoint's path"
screen | grep -q "Traceback\|panicked" && fail "a panic on screen"
keys q
wait_for 10 "^e2e\\$ *$" "the shell prompt (terminal restored)"
grep -q '"event":"done"' "$work/runs/e2e/events.jsonl" || fail "no done event"

# Resize and a signal: the dashboard redraws at the new size, and SIGTERM leaves
# the terminal as it found it (cooked mode, echo on).
keys "bash -c 'echo \$\$ > attach.pid; exec \"$bin\" attach runs/e2e'" Enter
wait_for 20 "finished" "the dashboard again"
tm resize-window -t e2e -x 100 -y 30
deadline=$((SECONDS + 10))
until [ "$(screen | head -1 | python3 -c 'import sys; print(len(sys.stdin.read().rstrip()))')" = 100 ]; do
    [ $SECONDS -lt $deadline ] || fail "the dashboard did not redraw at 100 columns"
    sleep 0.3
done
echo "redrawn at 100x30"
kill -TERM "$(cat "$work/attach.pid")"
wait_for 10 "^e2e\\$ *$" "the shell prompt after SIGTERM"
keys "stty -a | grep -qw -- -icanon && echo TERMINAL-LEFT-RAW || echo TERMINAL-RESTORED" Enter
wait_for 10 "^TERMINAL-(RESTORED|LEFT-RAW)" "the terminal mode"
screen | grep -q "^TERMINAL-RESTORED" || fail "SIGTERM left the terminal in raw mode"
echo "terminal restored after SIGTERM"

# The connection drops while a dashboard is attached: the dashboard must end with
# its terminal, not spin on it (crossterm retries a hung-up terminal's reads).
keys "bash -c 'echo \$\$ > attach2.pid; exec \"$bin\" attach runs/e2e'" Enter
wait_for 20 "finished" "the dashboard before the hang-up"
attach_pid="$(cat "$work/attach2.pid")"
tm kill-server
deadline=$((SECONDS + 10))
while kill -0 "$attach_pid" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { kill -9 "$attach_pid"; fail "the dashboard outlived its terminal by 10 s"; }
    sleep 0.3
done
echo "dashboard ended with its terminal"
echo "PASS: wizard -> detached run -> dashboard -> detach -> tmux killed -> attach -> finished -> hang-up ends the dashboard"
