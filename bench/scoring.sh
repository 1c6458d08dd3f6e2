#!/usr/bin/env bash
# Update scoring on an honest run: the share of honest updates rejected over ROUNDS rounds, and
# the scoring's cost against the round's wall time (score_seconds in each commit, against the time
# between commits). dit-tiny on the demo's data, WORKERS honest workers, H inner steps of batch 8,
# [sync] score = true with its defaults (64 held-out samples, step 0.25, 0.4 of the median).
#
# usage: bench/scoring.sh [rounds=200] [H=10] [workers=3]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-200}
H=${2:-10}
N=${3:-3}
scripts/setup.sh >/dev/null
cargo build --release --locked >/dev/null
bin=$PWD/target/release/skytrain
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
$bin demo-data --store "$tmp/store" --images 2048 --seed 0 >/dev/null 2>&1
cat > "$tmp/run.toml" <<TOML
name = "scoring"
model = "dit-tiny"
[train]
seed = 0
batch_size = 8
steps = $((ROUNDS * H))
threads = 1
lr = 1e-3
warmup_steps = 20
[sync]
rounds = $ROUNDS
inner_steps = $H
min_members = $N
poll_ms = 50
heartbeat_timeout_s = 30.0
round_deadline_s = 600.0
outer_lr = 1.0
outer_momentum = 0.5
score = true
TOML
for w in $(seq 1 "$N"); do $bin key new --out "$tmp/w$w.key" --admit "$tmp/run.toml" >/dev/null 2>&1; done
$bin run init "$tmp/run.toml" --store "$tmp/store" >/dev/null
for w in $(seq 1 "$N"); do RUST_LOG=error $bin work --store "$tmp/store" --name "w$w" --key "$tmp/w$w.key" --no-selfcheck & done
$bin coordinate --store "$tmp/store" >/dev/null 2>&1
wait
python3 - "$tmp/store" "$ROUNDS" "$H" "$N" <<'PY'
import glob, json, statistics, sys
store, rounds, h, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
commits = [json.load(open(p)) for p in sorted(glob.glob(f"{store}/rounds/*/commit.json"))]
scored = [c for c in commits[1:]]
accepted = sum(len(c["accepted"]) for c in scored)
rejected = [(c["round"], r["worker"], r["reason"]) for c in scored for r in c["rejected"]]
total = accepted + len(rejected)
walls = [(b["committed_ms"] - a["committed_ms"]) / 1e3 for a, b in zip(commits[1:], commits[2:])]
score_s = [c["score_seconds"] for c in scored if c.get("score_seconds") is not None]
print(f"scoring: dit-tiny, {n} honest workers, H = {h}, batch 8, {len(scored)} rounds")
print(f"honest updates rejected: {len(rejected)} of {total} ({100 * len(rejected) / max(total, 1):.2f}%)")
for r in rejected[:10]:
    print("  round %d %s: %s" % r)
print(f"scoring time per round: median {statistics.median(score_s):.3f} s; round wall time median {statistics.median(walls):.3f} s "
      f"-> {100 * statistics.median(score_s) / statistics.median(walls):.1f}% of a round")
print(f"mean inner loss: first round {scored[0]['mean_loss']:.4f}, last {scored[-1]['mean_loss']:.4f}")
PY
