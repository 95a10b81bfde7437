#!/usr/bin/env bash
# The whole test suite: bootstrap, a local Kafka broker (unless FORWARDER_KAFKA_BOOTSTRAP_SERVERS
# names one), pytest, then the broker is stopped. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# helm and kubeconform build from source (minutes when cold): start that first, in parallel.
mkdir -p .cache
deploy/tools/install.sh > .cache/tools-install.log 2>&1 &
tools_pid=$!
scripts/bootstrap.sh
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
    echo "test.sh: installing helm/kubeconform failed" >&2
    exit 1
fi
.venv/bin/python -m pytest "$@"
