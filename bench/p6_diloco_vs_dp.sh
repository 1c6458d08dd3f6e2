#!/usr/bin/env bash
# Benchmark P6: validation loss of DiLoCo (4 workers, H ∈ {1, 10, 50}) against synchronous data
# parallel with the same total samples, on the same data and seeds. Data parallel over 4 workers of
# batch B is computed exactly as one process with batch 4·B (the gradient all-reduce averages the
# same four micro-batches). Both see data positions 0 .. 4·B·STEPS in the same order.
#
# usage: bench/p6_diloco_vs_dp.sh [steps=300] [batch_per_worker=8] [outer_lr=0.7] [outer_momentum=0.9] [H list="1 10 50"] [codecs="int8"] [sync_extra] [overlap=0]
#   codecs: int8, f16, f32 or sparse; `sparse:K` sends K entries per chunk (`topk`), so one
#   invocation can compare densities against the same data-parallel reference; a suffix `@LR/MU`
#   gives that codec its own outer lr and momentum (e.g. "int8@1.0/0.5 sparse:88@1.5/0"), and
#   `@LR/MU/all` also averages each entry over all members, not only those that sent it
#   (`mean_over_senders = false`, sparse's old aggregation)
#   sync_extra: more [sync] lines for the DiLoCo runs, e.g. "error_decay = 0.95"
#   overlap: the fraction of H each worker trains ahead while a round closes (overlap_steps =
#   round(overlap·H)), e.g. 0.4 for a round that spends 40% of its compute time syncing
# env P6_SEED: the training seed of every run (default 0).
# env P6_IMAGES: training images (default 4096; 1,200 steps see each ~9 times, longer runs want more).
# env P6_RESTART_EVERY: SIGKILL and restart one worker every that many rounds (default 0: never),
#   to measure what a restart's lost worker state costs.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-300}
B=${2:-8}
OUTER_LR=${3:-0.7}
MOMENTUM=${4:-0.9}
HS=${5:-1 10 50}
CODECS=${6:-int8}
SYNC_EXTRA=${7:-}
OVERLAP=${8:-0}
IMAGES=${P6_IMAGES:-4096}
SEED=${P6_SEED:-0}
RESTART_EVERY=${P6_RESTART_EVERY:-0}
N=4
scripts/setup.sh >/dev/null
cargo build --release --locked >/dev/null
bin=$PWD/target/release/skytrain
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
$bin demo-data --store "$tmp/train" --images "$IMAGES" --seed 0 >/dev/null 2>&1
# Held out: other scenes, encoded with the training set's encoders (a fitted autoencoder of its own
# would put them in other latent coordinates).
$bin demo-data --store "$tmp/val" --images 512 --seed 99 --encoders-from "$tmp/train" >/dev/null

spec() { # name batch steps threads rounds H [codec] [overlap] [topk line] [outer lr] [momentum]
  cat <<TOML
name = "$1"
model = "dit-tiny"
[train]
seed = $SEED
batch_size = $2
steps = $3
threads = $4
lr = 1e-3
min_lr = 1e-4
warmup_steps = 20
checkpoint_every = $3
[sync]
rounds = $5
inner_steps = $6
min_members = $N
poll_ms = 50
heartbeat_timeout_s = 30.0
round_deadline_s = 600.0
outer_lr = ${10:-$OUTER_LR}
outer_momentum = ${11:-$MOMENTUM}
codec = "${7:-int8}"
overlap_steps = ${8:-0}
${9:-}
$SYNC_EXTRA
TOML
}
# Every RESTART_EVERY rounds, once worker w((r / RESTART_EVERY) mod 4) has sent its update for round
# r, SIGKILL it and start it again: it rejoins in time for round r + 1 (its heartbeat is still
# fresh), so the plans, data and seeds stay those of the run without restarts and the only
# difference is the state a restart loses (the inner AdamW moments and the error-feedback residual).
restarter() { # store rounds
  local r w pid
  for ((r = RESTART_EVERY; r < $2; r += RESTART_EVERY)); do
    w=$(((r / RESTART_EVERY) % N))
    local round="$1/rounds/$(printf %010d "$r")"
    until [ -e "$round/updates/w$w.json" ] || [ -e "$round/commit.json" ]; do sleep 0.05; done
    [ -e "$round/updates/w$w.json" ] || continue
    pid=$(pgrep -f -- "--store $1 --name w$w ") && kill -9 $pid
    RUST_LOG=error $bin work --store "$1" --name "w$w" --key "$1.w$w.key" &
    echo "restarted w$w after its update for round $r" >&2
  done
  wait
}
newstore() { # the cached latents with their encoders and record (eval-loss checks them)
  mkdir -p "$1/data"
  cp "$tmp/train/data/latents.safetensors" "$tmp/train/data/latents.json" "$1/data/"
  cp -r "$tmp/train/encoders" "$1/"
}

newstore "$tmp/dp"
spec dp $((N * B)) "$STEPS" 2 1 1 > "$tmp/dp.toml"
$bin run init "$tmp/dp.toml" --store "$tmp/dp" >/dev/null
t0=$(date +%s)
$bin train --store "$tmp/dp" >/dev/null 2>&1
echo "dp $(( $(date +%s) - t0 )) $($bin eval-loss --store "$tmp/dp" --val-store "$tmp/val")" > "$tmp/results"

for H in $HS; do for CODEC in $CODECS; do
  s="$tmp/h$H-${CODEC//[^A-Za-z0-9.]/_}"
  newstore "$s"
  ahead=$(python3 -c "print(round($OVERLAP * $H))")
  codec=${CODEC%%@*} lr="" mu="" topk=""
  [[ $CODEC == *@* ]] && { lr=${CODEC#*@}; lr=${lr%/all}; mu=${lr#*/}; lr=${lr%/*}; }
  [[ $codec == *:* ]] && topk="topk = ${codec#*:}"
  [[ $CODEC == */all ]] && topk="$topk"$'\n'"mean_over_senders = false"
  spec "diloco-h$H" "$B" "$STEPS" 1 $((STEPS / H)) "$H" "${codec%%:*}" "$ahead" "$topk" "$lr" "$mu" > "$s.toml"
  for w in $(seq 0 $((N - 1))); do $bin key new --out "$s.w$w.key" --admit "$s.toml" >/dev/null 2>&1; done
  $bin run init "$s.toml" --store "$s" >/dev/null
  t0=$(date +%s)
  for w in $(seq 0 $((N - 1))); do RUST_LOG=error $bin work --store "$s" --name "w$w" --key "$s.w$w.key" & done
  [ "$RESTART_EVERY" -gt 0 ] && restarter "$s" $((STEPS / H)) &
  $bin coordinate --store "$s" >/dev/null 2>&1
  wait
  echo "diloco-H$H-$CODEC $(( $(date +%s) - t0 )) $($bin eval-loss --store "$s" --val-store "$tmp/val")" >> "$tmp/results"
done; done

python3 - "$tmp/results" "$STEPS" "$B" "$N" "$OUTER_LR" "$MOMENTUM" "$SYNC_EXTRA" "$OVERLAP" "$IMAGES" "$SEED" "$RESTART_EVERY" <<'PY'
import json, sys
path, steps, b, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
images = int(sys.argv[9])
rows = []
for line in open(path):
    name, secs, js = line.split(" ", 2)
    rows.append((name, int(secs), json.loads(js)["validation_loss"]))
dp = rows[0][2]
extra = f"; {sys.argv[7]}" if sys.argv[7] else ""
extra += f"; overlap_steps = {sys.argv[8]}·H" if float(sys.argv[8]) else ""
extra += f"; one worker restarted every {sys.argv[11]} rounds" if int(sys.argv[11]) else ""
print(f"P6: dit-tiny, seed {sys.argv[10]}, {n} workers × batch {b}, {steps} inner steps each ({n * b * steps:,} samples from {images:,} training images); validation loss on 512 held-out images × 8 noise levels; outer lr {sys.argv[5]}, momentum {sys.argv[6]}{extra}")
print("| training | wall s | validation loss | vs data parallel |")
print("|---|---|---|---|")
for name, secs, loss in rows:
    print(f"| {name} | {secs} | {loss:.5f} | {100 * (loss - dp) / dp:+.2f}% |")
PY
