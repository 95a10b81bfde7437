#!/usr/bin/env bash
# Debian packages of the real-cluster test (make k8s-e2e), installed when missing: podman (image
# build), runc (crun 1.8 refuses hybrid cgroup hosts), containerd (the kubelet's runtime), the CNI
# plugins, mmdebstrap (base image stand-in), catatonit (pause image), iptables and conntrack
# (kube-proxy), iproute2, openssl and procps (the cluster script). The Kubernetes binaries come from deploy/tools/install.sh.
set -euo pipefail
packages=(podman runc containerd containernetworking-plugins mmdebstrap catatonit iptables conntrack uidmap conmon
    iproute2 openssl procps)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
((${#missing[@]} == 0)) && exit 0
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "packages.sh: please install: ${missing[*]} (Debian packages)" >&2
    exit 1
fi
echo "packages.sh: apt-get install ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
