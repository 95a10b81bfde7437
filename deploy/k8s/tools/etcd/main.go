// Command etcd is etcd's own server entry point (etcdmain.Main is what the etcd binary runs).
// `go install go.etcd.io/etcd/v3@...` is refused by the module proxy, so this module builds it.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
