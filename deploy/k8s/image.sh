#!/usr/bin/env bash
# Build the project's image from its Dockerfile with podman, for the real-cluster test.
#
#   deploy/k8s/image.sh            # prints the directory holding the image archives
#
# No container registry is reachable where this runs, so the Dockerfile's two base images are
# replaced (through its PYTHON_IMAGE / UV_IMAGE build args; its FROM lines stay as they are) by
# local stand-ins:
#   python: a Debian bookworm rootfs with Debian's python3.11 (mmdebstrap), linked at
#           /usr/local/bin/python3.11 where the official python image has it, with its headers
#           as there (python3.11-dev: the build stage compiles the hot path against them);
#   uv:     the uv binary of the PyPI wheel that scripts/bootstrap.sh installs (.cache/uv/bin/uv),
#           at /uv as in ghcr.io/astral-sh/uv.
# plus a pause image (Debian's static catatonit) for containerd's pod sandboxes. The stand-ins are
# cached under .cache/k8s/images, keyed on a hash of their inputs; podman's own layer cache makes a
# rebuild of an unchanged tree quick. The outputs are docker archives that containerd imports.
#
# Behind a TLS-intercepting proxy the build needs the system's CA bundle to reach PyPI: it is
# passed as the build secret `ca-bundle` (FORWARDER_BUILD_CA_BUNDLE, default the Debian path).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
repo=$PWD

log() { printf 'image.sh: %s\n' "$*" >&2; }
need() { command -v "$1" >/dev/null 2>&1 || { log "$1 is missing: run deploy/k8s/packages.sh"; exit 1; }; }
need podman
need mmdebstrap
need runc

out="${FORWARDER_K8S_IMAGES:-${repo}/.cache/k8s/images}"
mkdir -p "${out}"
ca_bundle="${FORWARDER_BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
image="localhost/datagrid-forwarder:e2e"

# A private podman store and configuration: nothing touches the machine's podman set-up.
# runc, not crun: Debian's crun 1.8 refuses hybrid cgroup v1/v2 hosts. Without CAP_SYS_RESOURCE
# a container's rlimits may not exceed the current hard limits, and podman's defaults do.
run_root="/tmp/fwd-podman-$(printf '%s' "${repo}" | sha256sum | cut -c1-10)"
nofile=$(ulimit -Hn) nproc=$(ulimit -Hu)
[[ ${nofile} == unlimited ]] && nofile=1048576
[[ ${nproc} == unlimited ]] && nproc=4096
((nproc > 4096)) && nproc=4096
cat > "${out}/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF="${out}/containers.conf"
pm() { podman --root "${out}/storage" --runroot "${run_root}" --storage-driver overlay "$@"; }

# python stand-in: keyed on the mmdebstrap command line.
suite=bookworm
mmdebstrap_args=(--variant=minbase --include=python3.11,python3.11-dev,ca-certificates
    '--customize-hook=mkdir -p "$1"/usr/local/bin && ln -sf /usr/bin/python3.11 "$1"/usr/local/bin/python3.11'
    '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin'
    "${suite}")
key=$(printf '%s\n' "${mmdebstrap_args[@]}" | sha256sum | cut -c1-12)
python_image="localhost/forwarder-standin/python:3.11-${key}"
if ! pm image exists "${python_image}"; then
    tarball="${out}/python-${key}.tar"
    if [[ ! -s ${tarball} ]]; then
        log "python stand-in: mmdebstrap ${suite} (about a minute)"
        rm -f "${tarball}.part"
        mmdebstrap --quiet --format=tar "${mmdebstrap_args[@]}" "${tarball}.part"  # (.part: no extension to infer from)
        mv "${tarball}.part" "${tarball}"
    fi
    pm import --quiet --change 'CMD ["python3.11"]' "${tarball}" "${python_image}" >/dev/null
fi

# uv stand-in: the wheel's binary, keyed on its bytes.
uv_bin="${repo}/.cache/uv/bin/uv"
[[ -x ${uv_bin} ]] || { log "${uv_bin} is missing: run scripts/bootstrap.sh"; exit 1; }
uv_version=$("${uv_bin}" --version | awk '{print $2}')
key=$(cat "${uv_bin}" "${uv_bin}x" 2>/dev/null | sha256sum | cut -c1-12)
uv_image="localhost/forwarder-standin/uv:${uv_version}-${key}"
if ! pm image exists "${uv_image}"; then
    stage=$(mktemp -d)
    cp "${uv_bin}" "${stage}/uv"
    [[ -x ${uv_bin}x ]] && cp "${uv_bin}x" "${stage}/uvx"
    tar -C "${stage}" -cf "${stage}.tar" .
    pm import --quiet "${stage}.tar" "${uv_image}" >/dev/null
    rm -rf "${stage}" "${stage}.tar"
fi

# pause image for the pod sandboxes: catatonit in pause mode.
catatonit=$(command -v catatonit || echo /usr/libexec/podman/catatonit)
key=$(sha256sum < "${catatonit}" | cut -c1-12)
pause_image="localhost/forwarder-standin/pause:${key}"
if ! pm image exists "${pause_image}"; then
    stage=$(mktemp -d)
    cp "${catatonit}" "${stage}/pause"
    tar -C "${stage}" -cf "${stage}.tar" .
    pm import --quiet --change 'ENTRYPOINT ["/pause", "-P"]' "${stage}.tar" "${pause_image}" >/dev/null
    rm -rf "${stage}" "${stage}.tar"
fi

secret=()
if [[ -s ${ca_bundle} ]]; then
    secret=(--secret "id=ca-bundle,src=${ca_bundle}")
fi
version=$(grep -m1 '^version' pyproject.toml | cut -d'"' -f2)
started=${SECONDS}
log "podman build ${image} (PYTHON_IMAGE=${python_image}, UV_IMAGE=${uv_image})"
# --format docker keeps the HEALTHCHECK (the OCI format has none).
pm build --quiet --format docker --pull=never --network=host "${secret[@]}" \
    --build-arg "PYTHON_IMAGE=${python_image}" --build-arg "UV_IMAGE=${uv_image}" \
    --build-arg "VERSION=${version}" --build-arg "REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    -t "${image}" . >/dev/null
log "built in $((SECONDS - started))s"

rm -f "${out}/forwarder.tar" "${out}/pause.tar"
pm save --quiet --format docker-archive -o "${out}/forwarder.tar" "${image}"
pm save --quiet --format docker-archive -o "${out}/pause.tar" "${pause_image}"
printf '%s\n' "${image}" > "${out}/forwarder.ref"
printf '%s\n' "${pause_image}" > "${out}/pause.ref"
printf '%s\n' "${out}"
