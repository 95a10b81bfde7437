#!/usr/bin/env bash
# Build, locally, what .github/workflows/release.yaml publishes for this version (no release has
# been published yet: these files are how to install one until then).
#
#   scripts/release-artifacts.sh [OUT_DIR]      # default dist/; `make release-artifacts`
#
# Into OUT_DIR:
#   forwarder-<version>.tgz                  the Helm chart: `helm lint --strict`, `helm package`
#   datagrid-forwarder-<version>.oci.tar     the image, an OCI archive of <image.repository>:<version>
#   SHA256SUMS                               `sha256sum -c SHA256SUMS` checks both
#
# Like the workflow it refuses versions that disagree (pyproject.toml, Chart.yaml's version and
# appVersion). Reproducible: the chart is repacked with every file dated the commit's time and
# a gzip header without a timestamp, so one commit always gives the same bytes (helm package
# dates the files "now"). The image is deploy/k8s/image.sh's build (the one the real-cluster test
# runs, reused when it is current): the Dockerfile at this commit, dependencies from uv.lock,
# labelled with the version and revision, for this machine's architecture only. Where no
# container registry is reachable, as in this project's CI, its base images are local stand-ins
# (Debian's python3.11 and the uv that bootstrap installs), and its
# org.opencontainers.image.base.name label says so; podman stamps build times into it, so it is
# rebuilt from the same inputs but not byte for byte. Every tool is the project's own: helm from
# deploy/tools/install.sh, podman and friends from deploy/k8s/packages.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD
out="${1:-dist}"

log() { printf 'release-artifacts: %s\n' "$*" >&2; }

version=$(grep -m1 '^version' pyproject.toml | cut -d'"' -f2)
chart_version=$(awk '$1 == "version:" { print $2 }' helm/forwarder/Chart.yaml)
app_version=$(awk '$1 == "appVersion:" { gsub(/"/, "", $2); print $2 }' helm/forwarder/Chart.yaml)
if [[ ${chart_version} != "${version}" || ${app_version} != "${version}" ]]; then
    log "pyproject.toml says ${version} but Chart.yaml version=${chart_version} appVersion=${app_version}"
    exit 1
fi
image_repository=$(awk '$1 == "image:" { in_image = 1; next } in_image && $1 == "repository:" { print $2; exit }' \
    helm/forwarder/values.yaml)
[[ -n ${image_repository} ]] || { log "no image.repository in helm/forwarder/values.yaml"; exit 1; }
revision=$(git rev-parse HEAD)
epoch=$(git log -1 --format=%ct)
if [[ -n $(git status --porcelain -- Dockerfile pyproject.toml uv.lock README.md forwarder helm/forwarder) ]]; then
    log "warning: uncommitted changes: the artifacts are not those of ${revision}"
fi

mkdir -p "${out}"
out=$(cd "${out}" && pwd)
chart_file="forwarder-${version}.tgz"
image_file="datagrid-forwarder-${version}.oci.tar"
rm -f "${out}/${chart_file}" "${out}/${image_file}" "${out}/SHA256SUMS"
stage=$(mktemp -d)
trap 'rm -rf "${stage}"' EXIT

# --- the chart -------------------------------------------------------------------------------
tools_bin=$(deploy/tools/install.sh | tail -n1)
helm() {
    HELM_CACHE_HOME="${stage}/helm/cache" HELM_CONFIG_HOME="${stage}/helm/config" \
        HELM_DATA_HOME="${stage}/helm/data" "${tools_bin}/helm" "$@"
}
helm lint --strict helm/forwarder >/dev/null
helm package helm/forwarder --destination "${stage}/chart" >/dev/null
mkdir "${stage}/chart/x"
tar -xzf "${stage}/chart/${chart_file}" -C "${stage}/chart/x"
(cd "${stage}/chart/x" && tar --sort=name --mtime="@${epoch}" --owner=0 --group=0 --numeric-owner \
    --format=ustar -cf - forwarder) | gzip -n -9 > "${out}/${chart_file}"
log "chart: ${out}/${chart_file}"

# --- the image -------------------------------------------------------------------------------
deploy/k8s/packages.sh
images=$(deploy/k8s/image.sh)
# image.sh's private podman store and configuration (see there).
export CONTAINERS_CONF="${images}/containers.conf"
run_root="/tmp/fwd-podman-$(printf '%s' "${repo}" | sha256sum | cut -c1-10)"
pm() { podman --root "${images}/storage" --runroot "${run_root}" --storage-driver overlay "$@"; }
built=$(cat "${images}/forwarder.ref")
label() { pm image inspect --format "{{ index .Labels \"org.opencontainers.image.$1\" }}" "${built}"; }
if [[ $(label version) != "${version}" || $(label revision) != "${revision}" ]]; then
    log "${built} is labelled $(label version) at $(label revision), not ${version} at ${revision}"
    exit 1
fi
pm tag "${built}" "${image_repository}:${version}"
pm save --quiet --format oci-archive -o "${out}/${image_file}" "${image_repository}:${version}"
log "image: ${out}/${image_file} (${image_repository}:${version}, base $(label base.name))"

(cd "${out}" && sha256sum "${chart_file}" "${image_file}" > SHA256SUMS)
log "checksums: ${out}/SHA256SUMS"
printf '%s\n' "${out}"
