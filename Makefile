# Entry points; each delegates to a script under hack/.
.PHONY: demo test setup verify lint crds cluster-up cluster-down

demo:          ## the end-to-end demo on the local cluster
	hack/demo

test:          ## unit + integration tests (sets everything up)
	hack/test

setup:
	hack/setup

verify:        ## generated files match their sources
	hack/verify

lint:
	hack/lint

crds:          ## regenerate crds/ and the chart's copy from kiln.api
	hack/gen-crds

cluster-up:
	hack/cluster up

cluster-down:
	hack/cluster down
