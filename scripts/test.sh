#!/usr/bin/env bash
# The test command (README, .ci/run): installs libtorch and the Python reference tools, then runs
# every test — unit, integration (real processes, SIGKILL), and Python interop.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export RUST_BACKTRACE=1
# Integration tests start real training processes; one test binary at a time keeps 2 cores honest.
cargo test --release --locked -- --test-threads 2
