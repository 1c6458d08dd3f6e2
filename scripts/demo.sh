#!/usr/bin/env bash
# The main job on the embedded default: installs libtorch, builds, runs `skytrain demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo run --release --locked -- demo "$@"
