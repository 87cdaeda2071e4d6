# Functions the image builds without Docker Hub or PyPI share (deployment/standin/build.sh,
# deployment/kserve/build.sh): sourced, not run. Each uses the caller's $PYTHON and log(), and $WORK.

# make_work NAME: a new temporary folder $WORK, removed when the script exits, the wheel server that
# serve_wheels started stopped first.
make_work() {
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")"
    SERVER_PID=""
    trap _remove_work EXIT
}

_remove_work() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}

# make_rootfs_image IMAGE SUITE MIRROR: a minimal Debian root file system, debootstrapped into $WORK and
# `docker import`ed as IMAGE (root and debootstrap needed). Nothing when IMAGE exists already.
make_rootfs_image() {
    local image="$1" suite="$2" mirror="$3"
    if docker image inspect "$image" >/dev/null 2>&1; then
        log "reusing $image"
        return 0
    fi
    command -v debootstrap >/dev/null || { log "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
    [ "$(id -u)" = 0 ] || { log "debootstrap needs root"; exit 1; }
    log "debootstrap $suite from $mirror"
    debootstrap --variant=minbase --include=ca-certificates "$suite" "$WORK/rootfs" "$mirror" \
        > "$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" --numeric-owner -c . | docker import \
        --change 'CMD ["/bin/bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --message "debootstrap --variant=minbase $suite" - "$image" >/dev/null
    rm -rf "$WORK/rootfs"
    log "imported $image"
}

# download_wheels DEST PIP_ARGS...: CPython 3.11 manylinux wheels (Debian 12: glibc 2.36) of what PIP_ARGS
# name (-r FILE, -c FILE, --extra-index-url ...), with this machine's pip configuration.
download_wheels() {
    local dest="$1"
    shift
    local platforms=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
    local minor
    for minor in $(seq 5 36); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --dest "$dest" \
        --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 "${platforms[@]}" "$@"
    log "wheels: $(du -sh "$dest" | cut -f1)"
}

# serve_wheels DIR: DIR over HTTP on a free 127.0.0.1 port for a `docker build --network host`; sets PORT and
# SERVER_PID (the caller's cleanup kills it), and returns once it answers.
serve_wheels() {
    PORT="$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    "$PYTHON" -m http.server --bind 127.0.0.1 --directory "$1" "$PORT" >"$WORK/http.log" 2>&1 &
    SERVER_PID=$!
    local _
    for _ in $(seq 50); do
        "$PYTHON" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/', timeout=1)" 2>/dev/null && break
        sleep 0.2
    done
}
