#!/usr/bin/env bash
# Make a fresh machine ready: system packages (when missing), uv, the project venv from the lock file
# and Kafka's jars. Idempotent and cached under .cache/. (helm and kubeconform, needed by the tests
# only, come from deploy/tools/install.sh: `make tools`, run by scripts/test.sh.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf 'bootstrap: %s\n' "$*" >&2; }

# Debian packages: prometheus/promtool (observability tests), kcat, jq and curl (benchmark
# baselines), openssl (the Kafka rig's test certificates for its secured listeners), a C compiler
# and python3's headers (wheel builds compile forwarder/hotpath.py with mypyc: hatch_build.py;
# tests/unit/test_hotpath.py builds it so, and in CI fails without them).
missing=()
command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
python3 -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || missing+=(python3-dev)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v kcat >/dev/null 2>&1 || missing+=(kcat)
command -v jq >/dev/null 2>&1 || missing+=(jq)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        log "please install: ${missing[*]} (Debian packages)"; exit 1
    fi
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi
# Go is not needed here: only deploy/tools/install.sh (test tools) uses it, and checks for it.
for tool in java mvn python3; do
    command -v "$tool" >/dev/null 2>&1 || { log "$tool is required"; exit 1; }
done

# uv, pinned, in a private venv (no global install).
UV=.cache/uv/bin/uv
if [[ ! -x $UV ]] || [[ "$($UV --version)" != "uv 0.13.9"* ]]; then
    log "installing uv 0.13.9"
    python3 -m venv .cache/uv
    .cache/uv/bin/pip install -q --disable-pip-version-check uv==0.13.9
fi
$UV sync --frozen --quiet

.venv/bin/python deploy/kafka/rig.py fetch >&2
