# Entry points; each delegates to a script under hack/.
.PHONY: demo demo-llm test setup verify lint crds cluster-up cluster-down

demo:          ## the end-to-end demo on the local cluster
	hack/demo

demo-llm:      ## the LLM runtime's demo steps (vLLM on CPU; a 7 GB image and the vLLM venv)
	hack/demo --only llm

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
