#!/usr/bin/env bash
# Build (or reuse) a local stand-in for pytorch/torchserve:0.12.0-cpu.
#
#   deployment/standin/build.sh [--force]
#
# For machines that cannot pull from Docker Hub. Three steps, each cached:
#   1. debootstrap a minimal Debian into a directory and `docker import` it
#      ($STANDIN_ROOTFS_IMAGE; built once, reused after);
#   2. `pip download` the serving packages pinned in requirements.txt into a
#      temporary wheel directory, with this machine's pip configuration (local
#      wheel indexes are used when pip is set up with them);
#   3. `docker build --network host` deployment/standin/Dockerfile on the rootfs
#      image, pip installing from that wheel directory served on 127.0.0.1.
# The image carries a label with a hash of its inputs; when an image with the
# same hash exists it is reused (pass --force to rebuild).
#
# Environment:
#   STANDIN_IMAGE         image to build   (default dogscats/torchserve-standin:0.12.0-cpu)
#   STANDIN_ROOTFS_IMAGE  Debian rootfs    (default dogscats/debian-rootfs:bookworm)
#   DEBIAN_MIRROR         for debootstrap and apt in the build (default http://deb.debian.org/debian)
#   PYTHON                interpreter whose pip downloads the wheels (default .venv/bin/python)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/deployment/standin"
STANDIN_IMAGE="${STANDIN_IMAGE:-dogscats/torchserve-standin:0.12.0-cpu}"
STANDIN_ROOTFS_IMAGE="${STANDIN_ROOTFS_IMAGE:-dogscats/debian-rootfs:bookworm}"
DEBIAN_SUITE=bookworm          # its python3 is 3.11, the ABI the wheels are fetched for
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
LABEL=org.dogscats.standin.inputs
# What the stock image has, pinned to this project's versions so that answers can
# be compared with a local TorchServe exactly.
PACKAGES='^(torch|torchvision|torchserve|torch-model-archiver|captum|pyyaml|pillow|numpy)=='

FORCE=0
case "${1:-}" in
    --force) FORCE=1 ;;
    "") ;;
    *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

log() { echo "[standin] $*" >&2; }
# shellcheck source=../images.sh
. "$ROOT/deployment/images.sh"

make_work standin

# Build context: the stand-in's own files plus the pinned requirements.
CTX="$WORK/context"
mkdir -p "$CTX"
cp "$HERE/Dockerfile" "$HERE/dockerd-entrypoint.sh" "$HERE/config.properties" "$CTX/"
grep -iE "$PACKAGES" "$ROOT/requirements.txt" | sed 's/[[:space:]]*#.*//' > "$CTX/requirements.txt"
[ "$(wc -l < "$CTX/requirements.txt")" -ge 8 ] || { log "requirements.txt lacks some serving pins:"; cat "$CTX/requirements.txt" >&2; exit 1; }
INPUTS="$(cd "$CTX" && cat Dockerfile dockerd-entrypoint.sh config.properties requirements.txt \
          <(echo "$DEBIAN_SUITE $STANDIN_ROOTFS_IMAGE") | sha256sum | cut -c1-16)"

if [ "$FORCE" = 0 ] && [ "$(docker image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$STANDIN_IMAGE" 2>/dev/null)" = "$INPUTS" ]; then
    log "reusing $STANDIN_IMAGE (inputs $INPUTS)"
    exit 0
fi
START=$(date +%s)

# 1. Debian root file system -> image
make_rootfs_image "$STANDIN_ROOTFS_IMAGE" "$DEBIAN_SUITE" "$DEBIAN_MIRROR"

# 2. Wheels for CPython 3.11 / glibc 2.36 (Debian 12), resolved with this machine's pip setup
log "pip download: $(tr '\n' ' ' < "$CTX/requirements.txt")"
download_wheels "$WORK/wheels" -r "$CTX/requirements.txt"

# 3. Serve them on loopback for the build (no copy into the build context / layers)
serve_wheels "$WORK/wheels"

log "docker build $STANDIN_IMAGE"
docker build --network host \
    --build-arg "BASE_IMAGE=$STANDIN_ROOTFS_IMAGE" \
    --build-arg "WHEELS_URL=http://127.0.0.1:$PORT/" \
    --build-arg "INPUTS=$INPUTS" \
    -t "$STANDIN_IMAGE" "$CTX"
log "built $STANDIN_IMAGE in $(( $(date +%s) - START ))s"
