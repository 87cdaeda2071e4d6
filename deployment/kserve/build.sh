#!/usr/bin/env bash
# Build (or reuse) the KServe image of the Dogs-vs-Cats models (deployment/kserve/Dockerfile), with neither
# Docker Hub nor PyPI inside the build: the approach of deployment/standin/build.sh.
#
#   deployment/kserve/build.sh [--force]
#
#   1. a build context with only the files the Dockerfile copies, at their repository paths (the selection
#      Dockerfile.dockerignore makes for a plain `docker build` from the repository root);
#   2. the base image: $KSERVE_BASE_IMAGE when set (e.g. python:3.11-slim, pulled when missing), else the
#      minimal Debian 12 root file system the TorchServe stand-in uses, $STANDIN_ROOTFS_IMAGE, made here with
#      debootstrap | docker import when missing (root and debootstrap needed; apt in the build adds python3);
#   3. `pip download` deployment/kserve/runtime-packages.txt at the versions requirements.txt pins (as
#      constraints), CPython 3.11 manylinux wheels, with this machine's pip configuration (plus PyTorch's CPU
#      index when TORCH_INDEX_URL is set: CPU-only torch, ~4 GB smaller);
#   4. `docker build --network host`, pip installing from those wheels served on 127.0.0.1
#      (PIP_ARGS="--no-index --find-links http://127.0.0.1:PORT/").
# The image carries a label with a hash of its inputs (the staged files, the base image, the index); when an
# image of that name with the same hash exists it is reused (--force rebuilds).
#
# Environment:
#   KSERVE_IMAGE          image to build     (default dogscats-kserve:latest)
#   KSERVE_BASE_IMAGE     base image         (default: $STANDIN_ROOTFS_IMAGE)
#   STANDIN_ROOTFS_IMAGE  Debian rootfs      (default dogscats/debian-rootfs:bookworm, shared with deployment/standin)
#   DEBIAN_MIRROR         for debootstrap    (default http://deb.debian.org/debian)
#   TORCH_INDEX_URL       extra pip index for torch/torchvision (default none; https://download.pytorch.org/whl/cpu
#                         for the CPU-only builds)
#   PYTHON                interpreter whose pip downloads the wheels (default .venv/bin/python)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
KSERVE_IMAGE="${KSERVE_IMAGE:-dogscats-kserve:latest}"
STANDIN_ROOTFS_IMAGE="${STANDIN_ROOTFS_IMAGE:-dogscats/debian-rootfs:bookworm}"
BASE_IMAGE="${KSERVE_BASE_IMAGE:-$STANDIN_ROOTFS_IMAGE}"
DEBIAN_SUITE=bookworm          # its python3 is 3.11, the ABI the wheels are fetched for
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
LABEL=org.dogscats.kserve.inputs

FORCE=0
case "${1:-}" in
    --force) FORCE=1 ;;
    "") ;;
    *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

log() { echo "[kserve-image] $*" >&2; }
# shellcheck source=../images.sh
. "$ROOT/deployment/images.sh"

make_work kserve-image

# 1. The files the Dockerfile copies, at their paths: the same selection as Dockerfile.dockerignore. Models: the
# registry's code and each models/NAME/'s code, weights, meta JSON, classes and export (not validated/ runs,
# training curves or metrics).
CTX="$WORK/context"
mkdir -p "$CTX"
(
    cd "$ROOT"
    {
        printf '%s\n' requirements.txt deployment/config.properties deployment/readiness.py \
            deployment/kserve/Dockerfile deployment/kserve/healthcheck.py deployment/kserve/runtime-packages.txt
        find serving -maxdepth 1 -type f -name '*.py'
        find models -maxdepth 1 -type f \( -name '*.py' -o -name '*.json' -o -name '*.txt' \)
        find models -mindepth 2 -maxdepth 2 -type f \
            \( -name '*.py' -o -name '*.json' -o -name '*.pth' -o -name '*.onnx' \) ! -name '*.previous-*'
    } | LC_ALL=C sort | tar -cf - --no-recursion -T - | tar -xf - -C "$CTX"
)

# 2. The base image. The Debian rootfs is the one deployment/standin/build.sh makes (same name, same command).
if [ "$BASE_IMAGE" = "$STANDIN_ROOTFS_IMAGE" ]; then
    make_rootfs_image "$STANDIN_ROOTFS_IMAGE" "$DEBIAN_SUITE" "$DEBIAN_MIRROR"
elif ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    docker pull "$BASE_IMAGE"
fi

# Reuse an image built from the same inputs.
INPUTS="$( (cd "$CTX" && find . -type f | LC_ALL=C sort | xargs sha256sum; \
            echo "base $BASE_IMAGE $(docker image inspect -f '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || true)"; \
            echo "torch index $TORCH_INDEX_URL") | sha256sum | cut -c1-16)"

BUILT="$(docker image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$KSERVE_IMAGE" 2>/dev/null || true)"
if [ "$FORCE" = 0 ] && [ "$BUILT" = "$INPUTS" ]; then
    log "reusing $KSERVE_IMAGE (inputs $INPUTS)"
    exit 0
fi
log "base image $BASE_IMAGE"
START=$(date +%s)

# 3. Wheels for CPython 3.11 / glibc 2.36 (Debian 12; python:3.11-slim is Debian 12 too)
sed -e 's/\[[^]]*\]//' "$CTX/requirements.txt" > "$WORK/constraints.txt"  # pip refuses extras in constraints
log "pip download: $(grep -v '^#' "$CTX/deployment/kserve/runtime-packages.txt" | tr '\n' ' ')"
INDEX=()
[ -z "$TORCH_INDEX_URL" ] || INDEX=(--extra-index-url "$TORCH_INDEX_URL")
download_wheels "$WORK/wheels" ${INDEX[@]+"${INDEX[@]}"} -c "$WORK/constraints.txt" \
    -r "$CTX/deployment/kserve/runtime-packages.txt"

# 4. The build, with the wheels served on loopback (nothing of them lands in the context or a layer)
serve_wheels "$WORK/wheels"

log "docker build $KSERVE_IMAGE"
docker build --network host \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --build-arg "PIP_ARGS=--no-index --find-links http://127.0.0.1:$PORT/" \
    --build-arg "TORCH_INDEX_URL=" \
    --build-arg "INPUTS=$INPUTS" \
    -f "$CTX/deployment/kserve/Dockerfile" -t "$KSERVE_IMAGE" "$CTX"
log "built $KSERVE_IMAGE in $(( $(date +%s) - START ))s"
