#!/usr/bin/env bash
# Installs Akash's SDL validator (npm @akashnetwork/chain-sdk, pinned in package-lock.json) for the
# deploy tests; --ignore-scripts as its README asks. Safe to call concurrently.
set -euo pipefail
cd "$(dirname "$0")"
exec 9>.install.lock
flock 9
if [ ! -f node_modules/@akashnetwork/chain-sdk/dist/sdl-schema.yaml ]; then
  npm ci --ignore-scripts --no-audit --no-fund --silent >&2
fi
