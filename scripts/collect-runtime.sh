#!/usr/bin/env bash
# Copies the built skytrain binary and the libtorch files it loads into one folder (DEST), keeping the
# torch wheel's layout (torch/lib, nvidia/...) so the libraries' own $ORIGIN rpaths still find each
# other and the binary finds them at $ORIGIN/../torch/lib. Used by the Dockerfile's build stage.
#   scripts/collect-runtime.sh BINARY DEST cpu|cuda
# cpu: exactly the libraries `ldd` resolves (libtorch_cpu, libc10, libgomp, libcudart, libcupti).
# cuda: all of torch/lib and nvidia/, because libtorch_cuda and cuDNN dlopen parts of them lazily.
set -euo pipefail
bin=$1 dest=$2 variant=${3:-cpu}
cd "$(dirname "$0")/.."
site=$(dirname "$(readlink -f .libtorch)")
mkdir -p "$dest/bin" "$dest/torch"
cp "$bin" "$dest/bin/skytrain"
cp "$site/torch/version.py" "$dest/torch/version.py"
case "$variant" in
  cpu)
    ldd "$bin" | awk '$2 == "=>" {print $3}' | while read -r lib; do
      real=$(realpath -m "$lib")
      case "$real" in
        "$site"/*) (cd "$site" && cp --parents "${real#"$site"/}" "$dest/") ;;
      esac
    done
    ;;
  cuda)
    mkdir -p "$dest/torch/lib"
    cp -a "$site/torch/lib/." "$dest/torch/lib/"
    rm -f "$dest/torch/lib/libtorch_python.so"   # Python bindings: not loaded by skytrain
    cp -a "$site/nvidia" "$dest/"
    ;;
  *) echo "collect-runtime: variant must be cpu or cuda, not '$variant'" >&2; exit 2 ;;
esac
# Fail here, not on a provider, if anything the binary needs was left behind.
if LD_LIBRARY_PATH= ldd "$dest/bin/skytrain" | grep -q "not found"; then
  echo "collect-runtime: libraries missing from $dest:" >&2
  ldd "$dest/bin/skytrain" | grep "not found" >&2
  exit 1
fi
du -sh "$dest" >&2
