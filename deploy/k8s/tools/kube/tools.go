//go:build tools

// Package tools pins the Kubernetes commands that deploy/tools/install.sh builds for the
// real-cluster test (make k8s-e2e). `go install pkg@version` refuses k8s.io/kubernetes (its go.mod
// has replace directives), so this main module carries the replaces and `go build` does the rest.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
