#!/usr/bin/env bash
# The whole test suite: bootstrap, a local Kafka broker (unless FORWARDER_KAFKA_BOOTSTRAP_SERVERS
# names one), pytest, then the broker is stopped. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The real-cluster test (tests/test_k8s_e2e.py) needs the Kubernetes binaries and the image: only
# prepared when it is collected (no arguments, or an argument naming it or the tests directory).
k8s=1
for arg in "$@"; do
    [[ -e ${arg%%::*} ]] && k8s=0
done
for arg in "$@"; do
    case "${arg%%::*}" in tests | tests/ | ./tests | *test_k8s_e2e.py) k8s=1 ;; esac
done
# helm, kubeconform (and the Kubernetes binaries) build from source (minutes when cold): start
# that first, in parallel.
mkdir -p .cache
FORWARDER_TOOLS_KUBE=$k8s deploy/tools/install.sh > .cache/tools-install.log 2>&1 &
tools_pid=$!
scripts/bootstrap.sh
if ((k8s)); then
    # Debian packages, then the image (podman; needs bootstrap's uv), in parallel with the rest.
    { deploy/k8s/packages.sh && deploy/k8s/image.sh; } > .cache/k8s-image.log 2>&1 &
    image_pid=$!
fi
# The project's own tools come first: tests find them by path, and anything a test runs by name
# (a subprocess calling `uv` or `helm`) gets the pinned one, never one installed by hand.
export PATH="$PWD/.venv/bin:$PWD/.cache/uv/bin:$PWD/.cache/tools/bin:$PATH"
if [[ -z "${FORWARDER_KAFKA_BOOTSTRAP_SERVERS:-}" ]]; then
    port=${TEST_KAFKA_PORT:-19092}
    data=".cache/kafka/test-data"
    rm -rf "$data"  # a fresh broker each run: no topics left from earlier runs
    FORWARDER_KAFKA_BOOTSTRAP_SERVERS=$(.venv/bin/python deploy/kafka/rig.py start --port "$port" --data-dir "$data")
    export FORWARDER_KAFKA_BOOTSTRAP_SERVERS
    trap '.venv/bin/python deploy/kafka/rig.py stop --data-dir "$data" >&2' EXIT
fi
if ! wait "$tools_pid"; then
    cat .cache/tools-install.log >&2
    echo "test.sh: installing helm/kubeconform/Kubernetes binaries failed" >&2
    exit 1
fi
if ((k8s)) && ! wait "$image_pid"; then
    cat .cache/k8s-image.log >&2
    echo "test.sh: building the image for the cluster test failed" >&2
    exit 1
fi
.venv/bin/python -m pytest "$@"
