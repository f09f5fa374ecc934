#!/usr/bin/env bash
# A kind cluster (Kubernetes in Docker) for the Kiln demo, for machines with Docker.
#
#   hack/kind-up.sh            create (or reuse) the cluster, build and load the images
#
# What it sets up, matching the local real node kiln-real-0 of `hack/cluster up --real-node`, so
# the demo's pods (nodeSelector kiln.dev/pool=real + toleration kiln.dev/real-node) land on it:
#   - cluster $KIND_CLUSTER_NAME (default kiln): one control-plane node and one worker,
#     <name>-worker, labelled kiln.dev/pool=real and tainted kiln.dev/real-node=true:NoSchedule;
#   - on the worker, the host directory $KILN_KIND_ARTIFACTS (default _out/kind/artifacts in this
#     repository; created, mode 0777 so the images' non-root user 65532 can write) mounted at
#     /var/lib/kiln-demo/artifacts, the hostPath the demo's TrainingJobs write artifacts to and its
#     InferenceServices read them from;
#   - images kiln-operator:dev, kiln-trainer:dev and kiln-server:dev built from images/<x>/Dockerfile
#     and loaded into the nodes with `kind load docker-image` (pods use imagePullPolicy IfNotPresent);
#   - a kubeconfig for the cluster in _out/kind/kubeconfig (kind also merges it into your default
#     kubeconfig as context kind-<name>).
# No ServiceMonitor CRD is installed: the operator skips the ServiceMonitor child when its CRD is
# missing (noted in the InferenceService's Ready message) and creates it once the CRD exists.
#
# Idempotent: an existing cluster of that name is reused (label and taint are re-applied; its
# worker must already have the artifact mount, which cannot be added to a running node), images
# are rebuilt from Docker's layer cache and only loaded when changed.
#
# Environment:
#   KIND_CLUSTER_NAME      cluster name (default kiln)
#   KIND_NODE_IMAGE        node image for `kind create cluster --image` (default: kind's own)
#   KILN_KIND_ARTIFACTS    host directory behind /var/lib/kiln-demo/artifacts (default _out/kind/artifacts)
#   TORCH_INDEX_URL        pip index for torch in the trainer and server images (default the CPU-only
#                          https://download.pytorch.org/whl/cpu: small images; set it empty to take
#                          PyPI's torch, which bundles CUDA, in both: GBs larger, needed for GPU nodes)
#   KILN_KIND_SKIP_BUILD=1 do not build the images (load the existing kiln-*:dev ones)
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)

CLUSTER=${KIND_CLUSTER_NAME:-kiln}
WORKER="${CLUSTER}-worker"
CONTROL_PLANE="${CLUSTER}-control-plane"
ARTIFACTS_IN_NODE=/var/lib/kiln-demo/artifacts
HOST_ARTIFACTS=${KILN_KIND_ARTIFACTS:-$REPO/_out/kind/artifacts}
TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
OUT="$REPO/_out/kind"
KUBECONFIG_OUT="$OUT/kubeconfig"
IMAGES=(operator trainer server)
POOL_LABEL=kiln.dev/pool=real
TAINT=kiln.dev/real-node=true:NoSchedule

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() {
    printf 'kind-up: %s\n' "$*" >&2
    exit 1
}

# kubectl inside the control-plane node: the host needs no kubectl of its own.
kctl() { docker exec "$CONTROL_PLANE" kubectl --kubeconfig=/etc/kubernetes/admin.conf "$@"; }

# ------------------------------------------------------------------------------ prerequisites
command -v docker >/dev/null 2>&1 ||
    die "docker not found: install Docker (https://docs.docker.com/engine/install/) or use 'make demo', which needs no Docker"
command -v kind >/dev/null 2>&1 ||
    die "kind not found: install it (https://kind.sigs.k8s.io/docs/user/quick-start/#installation), e.g. 'go install sigs.k8s.io/kind@latest'"
docker info >/dev/null 2>&1 ||
    die "docker is installed but its daemon is not reachable ('docker info' fails): start Docker, or check your permissions on its socket"

case "$HOST_ARTIFACTS" in
/*) ;;
*) HOST_ARTIFACTS="$REPO/$HOST_ARTIFACTS" ;;
esac
mkdir -p "$OUT"

# The directory is bind-mounted into the node as is, and the trainer and server run as UID 65532.
prepare_artifacts() {
    mkdir -p "$HOST_ARTIFACTS"
    chmod 0777 "$HOST_ARTIFACTS" 2>/dev/null ||
        echo "warning: could not chmod 0777 $HOST_ARTIFACTS: make sure UID 65532 can write to it" >&2
}

# ------------------------------------------------------------------------------ cluster
clusters=$(kind get clusters 2>/dev/null || true)
if grep -qx "$CLUSTER" <<<"$clusters"; then
    say "reusing kind cluster $CLUSTER"
    docker inspect "$WORKER" >/dev/null 2>&1 ||
        die "cluster $CLUSTER has no node $WORKER (not made by this script): delete it with 'kind delete cluster --name $CLUSTER' or set KIND_CLUSTER_NAME"
    mounted=$(docker inspect -f "{{range .Mounts}}{{if eq .Destination \"$ARTIFACTS_IN_NODE\"}}{{.Source}}{{end}}{{end}}" "$WORKER")
    [ -n "$mounted" ] ||
        die "node $WORKER has no mount at $ARTIFACTS_IN_NODE (a node's mounts cannot be changed): 'kind delete cluster --name $CLUSTER' and run this again"
    if [ "$mounted" != "$HOST_ARTIFACTS" ]; then
        echo "note: $WORKER mounts $mounted (not $HOST_ARTIFACTS) at $ARTIFACTS_IN_NODE; using it"
        HOST_ARTIFACTS=$mounted
    fi
    prepare_artifacts
else
    prepare_artifacts
    say "creating kind cluster $CLUSTER (control plane + worker $WORKER)"
    config="$OUT/kind-config.yaml"
    cat >"$config" <<EOF
# Written by hack/kind-up.sh.
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
name: $CLUSTER
nodes:
  - role: control-plane
  - role: worker
    labels:
      kiln.dev/pool: real
    extraMounts:
      - hostPath: $HOST_ARTIFACTS
        containerPath: $ARTIFACTS_IN_NODE
EOF
    args=(create cluster --name "$CLUSTER" --config "$config" --wait 180s)
    if [ -n "${KIND_NODE_IMAGE:-}" ]; then
        args+=(--image "$KIND_NODE_IMAGE")
    fi
    kind "${args[@]}"
fi

say "worker $WORKER: label $POOL_LABEL, taint $TAINT"
kctl wait --for=condition=Ready "node/$WORKER" --timeout=180s
# Set again on a reused cluster too (--overwrite: no error when already there). The taint keeps
# everything not meant for the "real" pool off the worker, as on kiln-real-0.
kctl label node "$WORKER" "$POOL_LABEL" --overwrite
kctl taint node "$WORKER" "$TAINT" --overwrite

kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG_OUT"
chmod 0600 "$KUBECONFIG_OUT"

# ------------------------------------------------------------------------------ images
for x in "${IMAGES[@]}"; do
    image="kiln-$x:dev"
    if [ "${KILN_KIND_SKIP_BUILD:-}" = 1 ]; then
        docker image inspect "$image" >/dev/null 2>&1 ||
            die "KILN_KIND_SKIP_BUILD=1 but there is no image $image: build it or unset KILN_KIND_SKIP_BUILD"
    else
        build=(build -f "images/$x/Dockerfile" -t "$image")
        if [ "$x" != operator ]; then
            build+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
        fi
        say "docker ${build[*]} ."
        docker "${build[@]}" .
    fi
    say "kind load docker-image $image --name $CLUSTER"
    kind load docker-image "$image" --name "$CLUSTER"
done

# ------------------------------------------------------------------------------ next
say "kind cluster $CLUSTER is ready"
cat <<EOF
  nodes:      $CONTROL_PLANE, $WORKER ($POOL_LABEL, taint $TAINT)
  artifacts:  $HOST_ARTIFACTS on this machine = $ARTIFACTS_IN_NODE on $WORKER
  images:     kiln-operator:dev kiln-trainer:dev kiln-server:dev (loaded into the nodes)
  kubeconfig: $KUBECONFIG_OUT (also context kind-$CLUSTER in your default kubeconfig)

Next, install Kiln and train (the same manifests the local demo applies):

  export KUBECONFIG=$KUBECONFIG_OUT
  helm upgrade --install kiln charts/kiln -n kiln-system --create-namespace \\
    --set image.repository=kiln-operator,image.tag=dev,image.pullPolicy=IfNotPresent \\
    --set-json 'artifacts.volume={"hostPath":{"path":"$ARTIFACTS_IN_NODE","type":"Directory"}}' \\
    --set-json 'nodeSelector={"kiln.dev/pool":"real"}' \\
    --set-json 'tolerations=[{"key":"kiln.dev/real-node","operator":"Equal","value":"true","effect":"NoSchedule"}]'
  kubectl create namespace kiln-demo
  kubectl -n kiln-demo apply -f examples/model.yaml -f hack/demo.d/trainingjob.yaml

(hack/demo itself runs on the local cluster only: its canary steps use a Prometheus and a load
generator on the host, which cannot reach kind's pod and Service networks.)

Delete it with: kind delete cluster --name $CLUSTER
EOF
