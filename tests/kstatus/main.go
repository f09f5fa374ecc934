// Command kstatus prints the kstatus verdict of Kubernetes objects, computed by the real
// sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute (the library Flux, kpt and Config Sync use).
//
// Input: one JSON object per line on stdin (e.g. `kubectl get -o json` of one object, compacted).
// Output: one JSON line per object: {"status": "Failed", "message": "..."}.
// Used by tests/integration/test_health.py; test-only tooling, not shipped.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 16<<20)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		obj := &unstructured.Unstructured{}
		// The apimachinery decoder, so integers stay int64 as kstatus expects.
		if err := obj.UnmarshalJSON(in.Bytes()); err != nil {
			fmt.Fprintln(os.Stderr, "kstatus: bad input:", err)
			os.Exit(2)
		}
		res, err := status.Compute(obj)
		if err != nil {
			fmt.Fprintln(os.Stderr, "kstatus:", err)
			os.Exit(1)
		}
		if err := out.Encode(verdict{Status: res.Status.String(), Message: res.Message}); err != nil {
			os.Exit(1)
		}
	}
	if err := in.Err(); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(2)
	}
}
