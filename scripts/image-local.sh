#!/usr/bin/env bash
# Builds the skytrain image where no image registry is reachable (the tests, an offline machine):
# the Debian bookworm bases are made here with mmdebstrap from Debian's packages, and the build stage
# borrows this checkout's Rust toolchain, cargo registry, target/ and .venv through overlay mounts
# (podman build -v …:O: read as lower layers, writes discarded), so cargo reuses the warm build.
# With a registry, build the Dockerfile directly (README, "Deploy").
#   scripts/image-local.sh [TAG] [cpu|cuda]
# Needs podman, runc and mmdebstrap (Debian packages) and a finished scripts/setup.sh. The CUDA
# variant needs the full wheel: SKYTRAIN_VENV names a venv with every torch dependency installed
# (`SKYTRAIN_TORCH_FULL=1 SKYTRAIN_VENV=/path scripts/setup.sh`).
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-localhost/skytrain:cpu}
variant=${2:-cpu}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/scripts/containers.conf}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_home=${CARGO_HOME:-$HOME/.cargo}

# base NAME PACKAGES [podman import options]: a minbase Debian with PACKAGES, made once per machine.
base() {
  local name=$1 packages=$2
  shift 2
  podman image exists "$name" && return
  local tmp
  tmp=$(mktemp -d)
  echo "image-local: mmdebstrap $name ($packages)" >&2
  mmdebstrap --quiet --variant=minbase --include="$packages" bookworm "$tmp/rootfs.tar" "$mirror"
  podman import -q "$@" "$tmp/rootfs.tar" "$name" >/dev/null
  rm -rf "$tmp"
}
base localhost/skytrain-runtime-base:bookworm ca-certificates
base localhost/skytrain-build-base:bookworm ca-certificates,gcc,g++,libc6-dev,python3-venv \
  --change "ENV PATH=$cargo_home/bin:/usr/local/bin:/usr/bin:/bin" \
  --change "ENV RUSTUP_HOME=$rustup_home" --change "ENV CARGO_HOME=$cargo_home"

venv=${SKYTRAIN_VENV:-$PWD/.venv}
[ -d "$venv" ] || { echo "image-local: run scripts/setup.sh first ($venv missing)" >&2; exit 1; }
mkdir -p target
podman build --format docker -f Dockerfile -t "$tag" \
  --build-arg VARIANT="$variant" \
  --build-arg BUILD_BASE=localhost/skytrain-build-base:bookworm \
  --build-arg RUNTIME_BASE=localhost/skytrain-runtime-base:bookworm \
  --build-arg SRC="$PWD" \
  -v "$rustup_home:$rustup_home:ro" -v "$cargo_home:$cargo_home:O" \
  -v "$PWD/target:$PWD/target:O" -v "$venv:$PWD/.venv:ro" \
  .
podman image inspect --format '{{.Size}}' "$tag" | awk -v t="$tag" '{printf "image-local: %s: %.0f MB\n", t, $1/1e6}' >&2
