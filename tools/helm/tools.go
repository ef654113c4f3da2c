//go:build tools

// Package tools pins the helm CLI (helm.sh/helm/v4/cmd/helm) for scripts/kube-tools.sh.
package tools

import (
	_ "helm.sh/helm/v4/cmd/helm"
)
