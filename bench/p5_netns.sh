#!/usr/bin/env bash
# Benchmark P5: compute utilization (time in inner steps / wall time) of 4 DiLoCo workers, each in
# its own network namespace created here (ip netns + veth on a private bridge), behind tc netem
# (50 Mbit/s, 100 ms delay, both directions), talking to SeaweedFS on the host side of the bridge.
# Only the script's own namespaces and bridge are addressed; everything is removed on exit.
# Where the kernel has no `netem` qdisc (this VM's has none), the rate is shaped with `tbf` and the
# 100 ms each way is added by bench/delay_proxy.py running inside each namespace.
# Needs root. usage: bench/p5_netns.sh [H=250] [rounds=3] [batch=32] [model=dit-tiny] [codec=int8] [step_s] [sync_extra]
# With step_s, the workers' inner steps are a stand-in taking step_s each (examples/standin_worker.rs:
# the real worker, protocol and payloads, without computing), for models this machine cannot train:
#   bench/p5_netns.sh 250 4 256 dit-b sparse 0.2 "state_every = 10"    (dit-b at its H200 step time)
# sync_extra: more [sync] lines. Utilization is reported over the whole run (round 1 includes each
# worker's first download of the model) and over rounds 2.. (commit to commit: the steady state).
# P5_LOG=skytrain=info shows each worker's phases; P5_COORD_LOG=FILE keeps the coordinator's log.
set -euo pipefail
cd "$(dirname "$0")/.."
declare -a endpoint
H=${1:-250}
ROUNDS=${2:-3}
B=${3:-32}
MODEL=${4:-dit-tiny}
CODEC=${5:-int8}
STEP_S=${6:-}
SYNC_EXTRA=${7:-}
N=4
RATE=50mbit
DELAY=100ms
scripts/setup.sh >/dev/null
cargo build --release --locked --example standin_worker >/dev/null
bin=$PWD/target/release/skytrain
standin=$PWD/target/release/examples/standin_worker
weed=$PWD/.venv/bin/weed
tag=sk$$
br=${tag}br
host=10.77.0.1
tmp=$(mktemp -d)
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  sleep 1
  kill -9 $(jobs -p) 2>/dev/null || true
  for i in $(seq 0 $((N - 1))); do ip netns del "${tag}w$i" 2>/dev/null || true; done
  ip link del "$br" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
ip link add "$br" type bridge
ip addr add "$host/24" dev "$br"
ip link set "$br" up
for i in $(seq 0 $((N - 1))); do
  ns=${tag}w$i
  ip netns add "$ns"
  ip link add "${tag}h$i" type veth peer name "${tag}n$i"
  ip link set "${tag}n$i" netns "$ns"
  ip link set "${tag}h$i" master "$br" up
  ip netns exec "$ns" ip addr add "10.77.0.$((10 + i))/24" dev "${tag}n$i"
  ip netns exec "$ns" ip link set "${tag}n$i" up
  ip netns exec "$ns" ip link set lo up
  if ip netns exec "$ns" tc qdisc add dev "${tag}n$i" root netem delay "$DELAY" rate "$RATE" 2>/dev/null; then
    tc qdisc add dev "${tag}h$i" root netem delay "$DELAY" rate "$RATE"                        # download
    endpoint[$i]=http://$host:8333
  else
    ip netns exec "$ns" tc qdisc add dev "${tag}n$i" root tbf rate "$RATE" burst 64kb latency 1s   # upload
    tc qdisc add dev "${tag}h$i" root tbf rate "$RATE" burst 64kb latency 1s                     # download
    ip netns exec "$ns" python3 bench/delay_proxy.py 127.0.0.1 8333 $host 8333 0.1 &
    endpoint[$i]=http://127.0.0.1:8333
    shaping="tbf + delay proxy (no netem in this kernel)"
  fi
done
shaping=${shaping:-netem}
export AWS_ACCESS_KEY_ID=p5 AWS_SECRET_ACCESS_KEY=p5-secret AWS_ENDPOINT_URL=http://$host:8333 AWS_ALLOW_HTTP=true AWS_REGION=us-east-1
"$weed" mini -dir="$tmp/weed" -ip=$host -ip.bind=$host -bucket=test -admin.ui=false -webdav=false >"$tmp/weed.log" 2>&1 &
for _ in $(seq 1 60); do $bin demo-data --store s3://test/p5 --images 2048 >/dev/null 2>&1 && break; sleep 1; done
cat > "$tmp/run.toml" <<TOML
name = "p5"
model = "$MODEL"
[train]
batch_size = $B
steps = $((ROUNDS * H))
threads = 1
[sync]
rounds = $ROUNDS
inner_steps = $H
min_members = $N
poll_ms = 200
heartbeat_timeout_s = 60.0
round_deadline_s = 3600.0
codec = "$CODEC"
$SYNC_EXTRA
TOML
for i in $(seq 0 $((N - 1))); do $bin key new --out "$tmp/w$i.key" --admit "$tmp/run.toml" >/dev/null 2>&1; done
$bin run init "$tmp/run.toml" --store s3://test/p5 >/dev/null
pids=()
for i in $(seq 0 $((N - 1))); do
  if [ -n "$STEP_S" ]; then
    worker=("$standin" s3://test/p5 "w$i" "$tmp/w$i.key" "$STEP_S")
  else
    worker=("$bin" work --store s3://test/p5 --name "w$i" --key "$tmp/w$i.key")
  fi
  ip netns exec "${tag}w$i" env RUST_LOG=${P5_LOG:-error} AWS_ENDPOINT_URL="${endpoint[$i]}" "${worker[@]}" &
  pids+=($!)
done
RUST_LOG=${P5_LOG:-error} $bin coordinate --store s3://test/p5 >"${P5_COORD_LOG:-/dev/null}" 2>&1
wait "${pids[@]}"
$bin run rounds --store s3://test/p5 > "$tmp/rounds.jsonl"
python3 - "$tmp/rounds.jsonl" "$N" "$H" "$B" "$shaping" "$MODEL" "$CODEC" "$STEP_S" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
n, h, b = map(int, sys.argv[2:5])
model, codec, step_s = sys.argv[6:9]
print(f"link shaping: {sys.argv[5]}")
start, end = rows[0]["planned_ms"], rows[-1]["committed_ms"]
wall = (end - start) / 1e3
workers = sorted({w for r in rows for w in r["inner_seconds"]})
print(f"P5: {n} workers in network namespaces, 50 Mbit/s + 100 ms each way, SeaweedFS on the host;")
compute = f"stand-in inner steps of {step_s} s" if step_s else "real inner steps"
print(f"    {model}, {codec}, {compute}, H = {h}, batch {b}, {len(rows)} rounds, "
      f"{rows[0]['bytes'] / len(rows[0]['inner_seconds']) / 1e6:.2f} MB per update; wall {wall:.1f} s")
utils = []
for w in workers:
    inner = sum(r["inner_seconds"].get(w, 0.0) for r in rows)
    utils.append(inner / wall)
    print(f"  {w}: {inner:.1f} s in inner steps -> utilization {100 * inner / wall:.1f}%")
print(f"  mean utilization {100 * sum(utils) / len(utils):.1f}%")
if len(rows) > 1:
    steady = (end - rows[0]["committed_ms"]) / 1e3
    inner = [sum(r["inner_seconds"].get(w, 0.0) for r in rows[1:]) for w in workers]
    print(f"  steady state (rounds 2..{rows[-1]['round']}, commit to commit, {steady:.1f} s): "
          f"mean utilization {100 * sum(inner) / len(inner) / steady:.1f}%")
if len(rows) > 3:
    # From the third commit on: a round's steps may start before its plan (overlap_steps), so the
    # steady figure is one round's inner time per commit-to-commit interval.
    tail = rows[3:]
    interval = (end - rows[2]["committed_ms"]) / 1e3 / len(tail)
    per_round = sum(sum(r["inner_seconds"].values()) / len(r["inner_seconds"]) for r in tail) / len(tail)
    print(f"  rounds 4..{rows[-1]['round']}: {interval:.1f} s commit to commit for {per_round:.1f} s of inner steps "
          f"per worker -> utilization {100 * per_round / interval:.1f}%")
for r in rows:
    dur = (r["committed_ms"] - r["planned_ms"]) / 1e3
    fetched = max(r.get("fetched_bytes", {}).values(), default=0)
    print(f"  round {r['round']}: {dur:.1f} s, inner max {max(r['inner_seconds'].values()):.1f} s, "
          f"up {r['bytes'] / len(r['inner_seconds']) / 1e6:.2f} MB per worker, down {fetched / 1e6:.2f} MB per worker")
PY
