#!/usr/bin/env bash
# A real one-node Kubernetes cluster for the chart's tests, started and stopped on this machine:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, a kubelet on containerd (runc,
# CNI bridge) and kube-proxy (iptables), all from .cache/tools/bin (deploy/tools/install.sh) and
# Debian packages (deploy/k8s/packages.sh).
#
#   deploy/k8s/cluster.sh up      # prints the kubeconfig path; state in $FORWARDER_K8S_STATE
#   deploy/k8s/cluster.sh down    # stops every process, unmounts, removes the bridge and rules
#
# Everything listens on loopback, except the kubelet and the pods, which use a bridge this script
# creates (FORWARDER_K8S_BRIDGE, FORWARDER_K8S_POD_CIDR): its gateway address is how pods reach
# services on the host (Kafka, the fake Datagrid) and how the API server reaches the kubelet.
# `down` is idempotent and forceful: it is also what cleans up after a failed `up`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
here="${repo}/deploy/k8s"

BIN="${FORWARDER_K8S_BIN:-${repo}/.cache/tools/bin}"
STATE="${FORWARDER_K8S_STATE:-/tmp/fwd-k8s-$(printf '%s' "${repo}" | sha256sum | cut -c1-8)}"
PORT_BASE="${FORWARDER_K8S_PORT_BASE:-21400}"
BRIDGE="${FORWARDER_K8S_BRIDGE:-fwdk8s0}"
POD_CIDR="${FORWARDER_K8S_POD_CIDR:-10.233.7.0/24}"
SERVICE_CIDR="${FORWARDER_K8S_SERVICE_CIDR:-10.233.64.0/20}"
NODE="${FORWARDER_K8S_NODE:-fwd-node-0}"
IMAGES="${FORWARDER_K8S_IMAGES:-${repo}/.cache/k8s/images}"
# containerd's content and snapshots outlive a run: importing an unchanged image is then instant.
CONTAINERD_ROOT="${FORWARDER_K8S_CONTAINERD_ROOT:-${repo}/.cache/k8s/containerd}"

ETCD_PORT=$((PORT_BASE + 1)) ETCD_PEER_PORT=$((PORT_BASE + 2)) API_PORT=$((PORT_BASE + 3))
KCM_PORT=$((PORT_BASE + 4)) SCHED_PORT=$((PORT_BASE + 5)) KUBELET_PORT=$((PORT_BASE + 6))
KUBELET_HEALTHZ_PORT=$((PORT_BASE + 7)) PROXY_METRICS_PORT=$((PORT_BASE + 8))
PROXY_HEALTHZ_PORT=$((PORT_BASE + 9))
prefix="${POD_CIDR%/*}"
GATEWAY="${prefix%.*}.1"
SOCK="${STATE}/containerd/containerd.sock"
export KUBECONFIG="${STATE}/kubeconfig"

log() { printf 'cluster.sh: %s\n' "$*" >&2; }
kubectl() { "${BIN}/kubectl" "$@"; }

# start NAME COMMAND... : run in the background, output in NAME.log, pid in pids/NAME.
start() {
    local name="$1"
    shift
    "$@" > "${STATE}/logs/${name}.log" 2>&1 &
    echo $! > "${STATE}/pids/${name}"
}

# wait_for WHAT SECONDS COMMAND... : poll until COMMAND succeeds; on timeout show the logs.
wait_for() {
    local what="$1" seconds="$2" i
    shift 2
    for ((i = 0; i < seconds * 4; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    log "timed out after ${seconds}s waiting for ${what}"
    for f in "${STATE}"/logs/*.log; do
        echo "---- ${f##*/} (last 15 lines)" >&2
        tail -n 15 "${f}" >&2
    done
    return 1
}

alive() { local pid; pid=$(cat "${STATE}/pids/$1" 2>/dev/null) && kill -0 "${pid}" 2>/dev/null; }

# stop NAME: SIGTERM, up to 10 s, then SIGKILL.
stop() {
    local pid i
    pid=$(cat "${STATE}/pids/$1" 2>/dev/null) || return 0
    if kill -TERM "${pid}" 2>/dev/null; then
        for ((i = 0; i < 40; i++)); do kill -0 "${pid}" 2>/dev/null || break; sleep 0.25; done
        kill -KILL "${pid}" 2>/dev/null || true
    fi
    rm -f "${STATE}/pids/$1"
}

up() {
    for tool in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
        [[ -x ${BIN}/${tool} ]] || { log "${BIN}/${tool} is missing: run deploy/tools/install.sh"; exit 1; }
    done
    for tool in containerd ctr runc iptables ip openssl pgrep findmnt python3; do
        command -v "${tool}" >/dev/null || { log "${tool} is missing: run deploy/k8s/packages.sh"; exit 1; }
    done
    for f in forwarder.tar pause.tar pause.ref; do
        [[ -s ${IMAGES}/${f} ]] || { log "${IMAGES}/${f} is missing: run deploy/k8s/image.sh"; exit 1; }
    done
    [[ -d /usr/lib/cni ]] || { log "/usr/lib/cni is missing: run deploy/k8s/packages.sh"; exit 1; }
    down_quiet
    rm -rf "${STATE}"
    mkdir -p "${STATE}"/{logs,pids,pki,cni,containerd,kubelet}
    cd "${STATE}"
    cat /proc/sys/net/ipv4/ip_forward > ip_forward.before
    # containerd 1.6 keeps pod network namespaces in /run/netns: note the ones that are not ours.
    ls /run/netns 2>/dev/null > netns.before || true

    # Credentials: one admin token for every client, a key pair for service-account tokens.
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    echo 'admin-token,admin,admin,"system:masters"' > tokens.csv
    cat > kubeconfig <<EOF
apiVersion: v1
kind: Config
clusters: [{name: fwd, cluster: {server: "https://127.0.0.1:${API_PORT}", insecure-skip-tls-verify: true}}]
users: [{name: admin, user: {token: admin-token}}]
contexts: [{name: fwd, context: {cluster: fwd, user: admin}}]
current-context: fwd
EOF

    # The pods' bridge, created here (not by the CNI plugin on the first pod) so that the host
    # services the pods use can listen on its gateway address before any pod exists.
    ip link add "${BRIDGE}" type bridge
    ip addr add "${GATEWAY}/${POD_CIDR#*/}" dev "${BRIDGE}"
    ip link set "${BRIDGE}" up
    # Service IPs from the host go out on the bridge, from its address (never the machine's own).
    ip route add "${SERVICE_CIDR}" dev "${BRIDGE}" src "${GATEWAY}"
    # Pod -> Service -> pod on the same bridge is routed through the host.
    echo 1 > /proc/sys/net/ipv4/ip_forward

    start etcd "${BIN}/etcd" --name fwd --data-dir "${STATE}/etcd" \
        --listen-client-urls "http://127.0.0.1:${ETCD_PORT}" --advertise-client-urls "http://127.0.0.1:${ETCD_PORT}" \
        --listen-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" \
        --initial-cluster "fwd=http://127.0.0.1:${ETCD_PEER_PORT}" --log-level warn
    # --endpoint-reconciler-type=none: a loopback advertise address is refused by the reconciler.
    start apiserver "${BIN}/kube-apiserver" --etcd-servers "http://127.0.0.1:${ETCD_PORT}" \
        --bind-address 127.0.0.1 --secure-port "${API_PORT}" --advertise-address 127.0.0.1 \
        --endpoint-reconciler-type none --cert-dir "${STATE}/pki" --token-auth-file "${STATE}/tokens.csv" \
        --authorization-mode RBAC --service-account-issuer https://kubernetes.default.svc \
        --service-account-key-file "${STATE}/sa.pub" --service-account-signing-key-file "${STATE}/sa.key" \
        --service-cluster-ip-range "${SERVICE_CIDR}" --kubelet-preferred-address-types InternalIP
    wait_for "the API server" 90 kubectl get --raw /readyz

    local k="${STATE}/kubeconfig"
    start controller-manager "${BIN}/kube-controller-manager" --kubeconfig "${k}" \
        --authentication-kubeconfig "${k}" --authorization-kubeconfig "${k}" --leader-elect=false \
        --service-account-private-key-file "${STATE}/sa.key" --root-ca-file "${STATE}/pki/apiserver.crt" \
        --use-service-account-credentials --bind-address 127.0.0.1 --secure-port "${KCM_PORT}"
    start scheduler "${BIN}/kube-scheduler" --kubeconfig "${k}" --authentication-kubeconfig "${k}" \
        --authorization-kubeconfig "${k}" --leader-elect=false --bind-address 127.0.0.1 --secure-port "${SCHED_PORT}"

    # containerd: private root, state and socket; runc; the bridge above through CNI.
    mkdir -p "${CONTAINERD_ROOT}"
    sed -e "s#@STATE@#${STATE}#g" -e "s#@SANDBOX_IMAGE@#$(cat "${IMAGES}/pause.ref")#g" \
        -e "s#@CONTAINERD_ROOT@#${CONTAINERD_ROOT}#g" \
        "${here}/containerd.toml.in" > containerd/config.toml
    sed -e "s#@BRIDGE@#${BRIDGE}#g" -e "s#@POD_CIDR@#${POD_CIDR}#g" -e "s#@GATEWAY@#${GATEWAY}#g" \
        "${here}/cni.conflist.in" > cni/10-fwd.conflist
    start containerd containerd --config "${STATE}/containerd/config.toml"
    wait_for containerd 30 ctr --address "${SOCK}" version
    ctr --address "${SOCK}" -n k8s.io images import --all-platforms "${IMAGES}/pause.tar" >/dev/null
    ctr --address "${SOCK}" -n k8s.io images import --all-platforms "${IMAGES}/forwarder.tar" >/dev/null

    sed -e "s#@STATE@#${STATE}#g" -e "s#@GATEWAY@#${GATEWAY}#g" -e "s#@KUBELET_PORT@#${KUBELET_PORT}#g" \
        -e "s#@KUBELET_HEALTHZ_PORT@#${KUBELET_HEALTHZ_PORT}#g" -e "s#@POD_CIDR@#${POD_CIDR}#g" \
        "${here}/kubelet.yaml.in" > kubelet/config.yaml
    start kubelet "${BIN}/kubelet" --kubeconfig "${k}" --config "${STATE}/kubelet/config.yaml" \
        --hostname-override "${NODE}" --node-ip "${GATEWAY}" --root-dir "${STATE}/kubelet/root" \
        --cert-dir "${STATE}/kubelet/pki" --node-labels "topology.kubernetes.io/zone=zone-a"
    start kube-proxy "${BIN}/kube-proxy" --kubeconfig "${k}" --hostname-override "${NODE}" \
        --proxy-mode iptables --cluster-cidr "${POD_CIDR}" --nodeport-addresses "${POD_CIDR}" \
        --metrics-bind-address "127.0.0.1:${PROXY_METRICS_PORT}" --healthz-bind-address "127.0.0.1:${PROXY_HEALTHZ_PORT}" \
        --conntrack-max-per-core 0 --conntrack-tcp-timeout-established 0 --conntrack-tcp-timeout-close-wait 0
    wait_for "node ${NODE} Ready" 90 kubectl wait --for=condition=Ready "node/${NODE}" --timeout=1s
    # The node has no podCIDR allocator (nodeipam is off): pods get addresses from host-local.
    wait_for "the default ServiceAccount" 60 kubectl get serviceaccount default -n default
    wait_for "kube-proxy" 60 python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:${PROXY_HEALTHZ_PORT}/healthz', timeout=2)"
    for name in etcd apiserver controller-manager scheduler containerd kubelet kube-proxy; do
        alive "${name}" || { log "${name} exited"; tail -n 30 "${STATE}/logs/${name}.log" >&2; exit 1; }
    done
    printf '%s\n' "${KUBECONFIG}"
}

down_quiet() { down >/dev/null 2>&1 || true; }

down() {
    [[ -d ${STATE} ]] || return 0
    # Pods first, through the kubelet (CNI DEL, unmounts), as long as the cluster answers.
    if alive kubelet && alive apiserver; then
        kubectl delete pods --all --all-namespaces --grace-period=0 --force --wait=false >/dev/null 2>&1 || true
        wait_for_pods=$((SECONDS + 20))
        while ((SECONDS < wait_for_pods)) && [[ -n $(ctr --address "${SOCK}" -n k8s.io tasks ls -q 2>/dev/null) ]]; do
            sleep 0.5
        done
    fi
    stop kube-proxy
    stop kubelet
    stop scheduler
    stop controller-manager
    # Whatever still runs in containerd: kill the tasks, then the shims that hold them.
    if alive containerd; then
        local task
        for task in $(ctr --address "${SOCK}" -n k8s.io tasks ls -q 2>/dev/null); do
            ctr --address "${SOCK}" -n k8s.io tasks kill -a -s SIGKILL "${task}" >/dev/null 2>&1 || true
        done
        sleep 1
        for task in $(ctr --address "${SOCK}" -n k8s.io tasks ls -q 2>/dev/null); do
            ctr --address "${SOCK}" -n k8s.io tasks delete -f "${task}" >/dev/null 2>&1 || true
        done
    fi
    stop containerd
    local pid
    for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address ${SOCK}" || true); do
        kill -KILL "${pid}" 2>/dev/null || true
    done
    # apiserver before etcd: an API server without its etcd retries for a long time on shutdown.
    stop apiserver
    stop etcd
    # kube-proxy's chains, the CNI network namespaces containerd made, the mounts, the bridge.
    [[ -x ${BIN}/kube-proxy ]] && "${BIN}/kube-proxy" --cleanup >/dev/null 2>&1 || true
    local ns
    for ns in /run/netns/cni-*; do
        [[ -e ${ns} ]] || continue
        grep -qxF "${ns##*/}" "${STATE}/netns.before" 2>/dev/null && continue
        umount "${ns}" 2>/dev/null || true
        rm -f "${ns}"
    done
    findmnt -rn -o TARGET | grep -F -e "${STATE}/" -e "${CONTAINERD_ROOT}/" | sort -r | while read -r target; do
        umount -l "${target}" 2>/dev/null || true
    done
    ip link show "${BRIDGE}" >/dev/null 2>&1 && ip link delete "${BRIDGE}"
    if [[ -s ${STATE}/ip_forward.before ]]; then
        cat "${STATE}/ip_forward.before" > /proc/sys/net/ipv4/ip_forward
    fi
    # Keep the logs (the test shows them on failure); `up` starts from an empty directory.
    find "${STATE}" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
