#!/usr/bin/env bash
# The Docker end-to-end test (tests/test_docker.py): build the image, run it, compare
# its answers with a local TorchServe's, clean up. Needs the project's virtualenv
# (.venv, or $PYTHON) and Docker; starts a Docker engine when none runs and it can.
#
#   tests/run_docker_test.sh             # keeps the images it built (next run is faster)
#   tests/run_docker_test.sh --rmi       # also removes the project image it built
#   tests/run_docker_test.sh --rmi-all   # ... and the stand-in base image and Debian rootfs image
#   tests/run_docker_test.sh --fresh-machine  # also tests/test_fresh_machine.py (slow: a whole new .venv)
#   tests/run_docker_test.sh -- -k compose    # anything after -- goes to pytest
#
# Environment: see the docstring of tests/test_docker.py (DOCKER_TEST_BASE_IMAGE,
# DOCKER_TEST_MODEL_STORE, DOCKER_TEST_ATOL, DOCKER_TEST_NETWORK, DOCKERD_ARGS, ...).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

FILES=(tests/test_docker.py)
while [ $# -gt 0 ]; do
    case "$1" in
        --rmi) export DOCKER_TEST_RMI=1; shift ;;
        --rmi-all) export DOCKER_TEST_RMI=all; shift ;;
        --fresh-machine) FILES+=(tests/test_fresh_machine.py); shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
# That interpreter's bin/ first on PATH: its torch-model-archiver, torchserve and the workers' python.
PATH="$(dirname "$(command -v "$PYTHON")"):$PATH"
export PYTHON PATH
export RUN_DOCKER_TESTS=1
START=$(date +%s)
set +e
"$PYTHON" -m pytest "${FILES[@]}" -v -s -n 0 -p no:cacheprovider "$@"
status=$?
set -e
echo "docker test: exit $status after $(( $(date +%s) - START ))s"
exit $status
