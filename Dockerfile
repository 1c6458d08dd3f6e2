# The skytrain image that `deploy sdl` services run: the binary, the libtorch libraries it loads (from
# the pinned PyPI torch wheel), CA certificates for HTTPS stores, a non-root user; nothing else.
#
#   podman build -t skytrain:cpu .                                   # CPU
#   podman build --build-arg VARIANT=cuda -t skytrain:cuda .         # CUDA (NVIDIA driver >= 580)
#
# The base images are build arguments (a registry, or a local image: the tests build Debian bases
# with mmdebstrap, see tests/image.rs). The build stage needs a Rust toolchain (1.95), gcc/g++ and
# Python 3 with venv; it compiles skytrain and gathers the libraries with scripts/collect-runtime.sh.
ARG BUILD_BASE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_BASE=docker.io/library/debian:bookworm-slim

FROM ${BUILD_BASE} AS build
# cpu or cuda: the CUDA variant links libtorch_cuda (`--features cuda`) and ships the full wheel's
# NVIDIA libraries (torch 2.11.0+cu130: CUDA 13.0, driver >= 580).
ARG VARIANT=cpu
# Where the source is compiled. A build that mounts a warm target/ and .venv (podman build -v)
# sets this to the source's own path so cargo reuses them.
ARG SRC=/src
WORKDIR ${SRC}
RUN python3 -m venv --help >/dev/null 2>&1 || \
    (apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/*)
COPY . .
RUN set -eu; \
    features=""; \
    if [ "$VARIANT" = cuda ]; then export SKYTRAIN_TORCH_FULL=1; features="--features cuda"; fi; \
    torch=$(ls -d .venv/lib/python3*/site-packages/torch 2>/dev/null | head -n 1); \
    if [ -n "$torch" ]; then ln -sfn "$PWD/$torch" .libtorch; else SKYTRAIN_SETUP_ONLY=libtorch scripts/setup.sh; fi; \
    cargo build --release --locked $features; \
    scripts/collect-runtime.sh target/release/skytrain /opt/skytrain "$VARIANT"

FROM ${RUNTIME_BASE}
RUN set -eu; \
    if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
      apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*; \
    fi; \
    useradd --uid 10001 --create-home --home-dir /home/skytrain --shell /usr/sbin/nologin skytrain
COPY --from=build /opt/skytrain /opt/skytrain
ENV PATH=/opt/skytrain/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
USER skytrain
WORKDIR /home/skytrain
# Fails the build, not the lease, if the binary cannot load its libraries.
RUN skytrain --version
CMD ["skytrain", "--help"]
