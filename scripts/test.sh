#!/usr/bin/env bash
# The test command (README, .ci/run): installs libtorch and the Python reference tools, then runs
# every test — unit, integration (real processes, SIGKILL), and Python interop.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Headless Chromium for the dashboard test (Debian package `chromium`); node/npm for Akash's SDL
# validator come with the machine (tests/akash/install.sh runs `npm ci`).
if ! command -v chromium >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "test: installing chromium (apt)" >&2
  $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null
fi
# podman + runc build and run the deployment image, mmdebstrap makes its Debian bases (tests/image.rs).
if ! command -v podman >/dev/null || ! command -v mmdebstrap >/dev/null || ! command -v runc >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "test: installing podman, runc, mmdebstrap (apt)" >&2
  $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q podman runc mmdebstrap >/dev/null
fi
export RUST_BACKTRACE=1
# Integration tests start real training processes; one test binary at a time keeps 2 cores honest.
cargo test --release --locked -- --test-threads 2
