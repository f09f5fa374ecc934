"""Pure builders for a TrainingJob's children: one headless Service and one Pod per node.

Every pod runs torchrun (the trainer image's entrypoint) with torchrun's environment-variable
form of its arguments (``PET_<FLAG>``; see torch.distributed.run / torchrun's ``--help``):
``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` (node 0's DNS
name through the headless Service) and ``PET_MASTER_PORT`` (29500), the same variables Kubeflow
Trainer sets, so plain torchrun works unchanged.

For a ``command`` that is not torchrun (a script written for Kubeflow's PyTorchJob calling
``torch.distributed.init_process_group("env://")``), every pod also gets what the
training-operator's PyTorchJob sets (its ``setPodEnv``): ``MASTER_ADDR``, ``MASTER_PORT``,
``WORLD_SIZE`` (nodes x processes per node) and ``RANK`` (the node rank), and, where one process
per pod makes them exact, ``LOCAL_RANK=0`` and ``LOCAL_WORLD_SIZE=1``. Under torchrun they are
harmless: torchrun reads only ``PET_*`` and sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` itself in each worker's environment.
The contract: docs/byom.md.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from pydantic import ValidationError

from kiln.api.common import spec_error
from kiln.api.featuregroup import FeatureGroupSpec
from kiln.api.trainingjob import MASTER_PORT, POD_INFIX, TrainingJobSpec
from kiln.artifact import TERMINATION_LOG, uri_to_path
from kiln.features.schema import schema_digest
from kiln.resources.common import (
    gpu_count,
    owner_reference,
    pod_placement,
    standard_labels,
)
from kiln.resources.storage import StorageDefaults, is_s3, storage_env

LABEL_JOB = "kiln.dev/trainingjob"
LABEL_RANK = "kiln.dev/node-rank"
LABEL_GANG = "kiln.dev/gang"
CONTAINER = "trainer"
#: Where a trainer writing to an object store assembles artifacts and checkpoints before upload.
STAGING_DIR = "/tmp/kiln-staging"


def pod_name(job: str, rank: int) -> str:
    """``<job>-node-<rank>``: the pod (and hostname) of one torchrun node.

    A DNS-1123 label (<= 63 characters) for every rank when the job's name passed admission
    (:func:`kiln.api.trainingjob.max_name_length`).
    """
    return f"{job}{POD_INFIX}{rank}"


def service_name(job: str) -> str:
    """The headless Service giving each pod a DNS name: ``<job>``."""
    return job


def master_addr(job: str, namespace: str) -> str:
    """DNS name of node 0 through the headless Service: ``<job>-node-0.<job>.<ns>.svc``."""
    return f"{pod_name(job, 0)}.{service_name(job)}.{namespace}.svc"


def gpus_per_node(spec: TrainingJobSpec) -> int:
    """GPUs each pod asks for (:func:`kiln.resources.common.gpu_count` of ``resourcesPerNode``)."""
    return gpu_count(spec.resources_per_node)


def resolve_nproc_per_node(spec: TrainingJobSpec) -> int:
    """``numProcPerNode`` as a number: 'auto' means the GPU count per node, else 1."""
    if spec.num_proc_per_node == "auto":
        return max(1, gpus_per_node(spec))
    return int(spec.num_proc_per_node)


def _dir_of(uri: str) -> str:
    return str(uri_to_path(uri))


def service(job: dict[str, Any]) -> dict[str, Any]:
    """The headless Service (``clusterIP: None``) that gives ``<job>-node-<i>`` DNS records.

    ``publishNotReadyAddresses`` lets node 0's name resolve before any readiness, so torchrun's
    rendezvous on the other nodes does not wait for it.
    """
    name = job["metadata"]["name"]
    labels = standard_labels(job, "trainer") | {LABEL_JOB: name}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(name),
            "namespace": job["metadata"]["namespace"],
            "labels": labels,
            "ownerReferences": [owner_reference(job)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: name},
            "ports": [{"name": "c10d", "port": MASTER_PORT, "targetPort": MASTER_PORT, "protocol": "TCP"}],
        },
    }


def distributed_env(job: str, namespace: str, spec: TrainingJobSpec, rank: int) -> list[dict[str, Any]]:
    """The distributed environment of node ``rank``: torchrun's ``PET_*``, then PyTorchJob's.

    ``WORLD_SIZE`` is ``numNodes * numProcPerNode`` (``auto`` resolved to the GPU count, see
    :func:`resolve_nproc_per_node`; Kubeflow counts ``auto`` as 1) and ``RANK`` the node rank,
    as the training-operator sets them; with more than one process per pod they are only right
    for a launcher (torchrun) that replaces them per process, so ``LOCAL_RANK`` /
    ``LOCAL_WORLD_SIZE`` are set only with one process per pod.
    """
    nproc = resolve_nproc_per_node(spec)
    addr = master_addr(job, namespace)
    env = [
        {"name": "PET_NNODES", "value": str(spec.num_nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(nproc)},
        {"name": "PET_NODE_RANK", "value": str(rank)},
        {"name": "PET_MASTER_ADDR", "value": addr},
        {"name": "PET_MASTER_PORT", "value": str(MASTER_PORT)},
        # Restarts are the operator's (whole gang); torchrun must not restart workers in place.
        {"name": "PET_MAX_RESTARTS", "value": "0"},
        {"name": "MASTER_ADDR", "value": addr},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": "WORLD_SIZE", "value": str(spec.num_nodes * nproc)},
        {"name": "RANK", "value": str(rank)},
    ]
    if nproc == 1:
        env += [{"name": "LOCAL_RANK", "value": "0"}, {"name": "LOCAL_WORLD_SIZE", "value": "1"}]
    return env


def output_uri(spec: TrainingJobSpec, defaults: StorageDefaults) -> str:
    """The artifact root of a job: ``spec.output.uri``, else the operator's default."""
    return spec.output.uri if spec.output and spec.output.uri else defaults.artifact_root


def feature_group_blocker(
    spec: TrainingJobSpec, feature_group: dict[str, Any] | None
) -> tuple[str, str] | None:
    """Why the gang cannot be built for ``spec.dataset.featureGroupRef`` (as read; None when
    absent): (reason, message), or None when it can (or the job names no FeatureGroup)."""
    ref = spec.dataset.feature_group_ref
    if ref is None:
        return None
    if feature_group is None:
        return "FeatureGroupNotFound", f"FeatureGroup {ref.name} (dataset.featureGroupRef) does not exist"
    try:
        FeatureGroupSpec.model_validate(feature_group.get("spec") or {})
    except ValidationError as e:
        return "FeatureGroupInvalid", f"FeatureGroup {ref.name} is invalid: {spec_error(e)}"
    return None


def feature_group_dataset(spec: TrainingJobSpec, feature_group: dict[str, Any]) -> dict[str, Any]:
    """The trainer's ``KILN_DATASET`` for a featureGroupRef: the FeatureGroup itself (name,
    namespace, spec, schema digest: the trainer runs the point-in-time join with it) and the
    entity table's location and columns."""
    fg_spec = FeatureGroupSpec.model_validate(feature_group.get("spec") or {})
    meta = feature_group["metadata"]
    return {
        "featureGroup": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "spec": fg_spec.to_api(),
            "schemaDigest": schema_digest(fg_spec),
        },
        "entityUri": spec.dataset.entity_uri,
        "labelColumn": spec.dataset.label_column,
        "timestampColumn": spec.dataset.timestamp_column,
    }


def pod(
    job: dict[str, Any],
    spec: TrainingJobSpec,
    rank: int,
    gang: int,
    defaults: StorageDefaults | None = None,
    admitted: dict[str, Any] | None = None,
    feature_group: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Pod of node ``rank`` (0-based) of gang ``gang`` (bumped at every whole-gang restart).

    ``feature_group`` is the FeatureGroup ``spec.dataset.featureGroupRef`` names, as read
    (required then; see :func:`feature_group_blocker`).

    ``defaults`` is the operator's storage configuration (artifact root, S3 endpoint and Secret)
    for what ``spec.output`` / ``spec.storage`` leave unset. ``admitted`` is the placement Kueue's
    admission adds (``nodeSelector`` and ``tolerations`` of the assigned ResourceFlavors, see
    :func:`kiln.queueing.flavor_placement`), merged into the job's own. With an ``s3://`` output or dataset
    the pod gets the AWS SDK environment (:func:`kiln.resources.storage.storage_env`) and no
    output volume: the trainer stages files under ``/tmp`` and uploads them.

    The pod has ``restartPolicy: Never``: a failure is handled by the operator restarting the
    whole gang, never by the kubelet restarting one member (a lone restarted rank cannot rejoin
    a DDP group). Its termination message (``/dev/termination-log``) carries the trainer's
    result; ``FallbackToLogsOnError`` puts the log tail there when a failing trainer wrote none.
    """
    meta = job["metadata"]
    name, ns = meta["name"], meta["namespace"]
    defaults = defaults or StorageDefaults()
    out_uri = output_uri(spec, defaults)
    dataset = spec.dataset
    dataset_env: dict[str, Any] = {}
    if dataset.builtin:
        dataset_env = {"builtin": dataset.builtin}
    elif dataset.uri:
        dataset_env = {"uri": dataset.uri, "labelColumn": dataset.label_column}
        if dataset.format:
            dataset_env["format"] = dataset.format
    elif dataset.feature_group_ref:
        if feature_group is None:
            raise ValueError(
                f"dataset.featureGroupRef {dataset.feature_group_ref.name}: FeatureGroup not given"
            )
        dataset_env = feature_group_dataset(spec, feature_group)

    env: list[dict[str, Any]] = [
        *distributed_env(name, ns, spec, rank),
        {"name": "KILN_HYPERPARAMETERS", "value": json.dumps(spec.hyperparameters or {}, sort_keys=True)},
        {"name": "KILN_DATASET", "value": json.dumps(dataset_env, sort_keys=True)},
        {"name": "KILN_OUTPUT_URI", "value": out_uri},
        {"name": "KILN_MODEL_NAME", "value": spec.model_ref.name if spec.model_ref else name},
        {"name": "KILN_TRAININGJOB", "value": name},
        {"name": "KILN_IMAGE", "value": spec.image},
        {"name": "KILN_TERMINATION_LOG", "value": TERMINATION_LOG},
    ]
    env_from: list[dict[str, Any]] = []
    fg_source = ((feature_group or {}).get("spec") or {}).get("source") or {}
    if is_s3(out_uri) or is_s3(dataset.uri) or is_s3(dataset.entity_uri) or is_s3(fg_source.get("uri")):
        s3_env, env_from = storage_env(spec.storage, defaults)
        env += [*s3_env, {"name": "KILN_STAGING_DIR", "value": STAGING_DIR}]
    env += [e.to_api() for e in spec.env or []]

    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {}},
        # DDP's gloo/NCCL and DataLoader workers use shared memory; the runtime default is 64 MiB.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if not is_s3(out_uri):
        volume = spec.output.volume if spec.output and spec.output.volume else {"emptyDir": {}}
        volumes.append({"name": "output", **volume})
        mounts.append({"name": "output", "mountPath": _dir_of(out_uri)})
    if dataset.uri and dataset.volume and not is_s3(dataset.uri):
        volumes.append({"name": "dataset", **dataset.volume})
        mounts.append(
            {"name": "dataset", "mountPath": posixpath.dirname(_dir_of(dataset.uri)), "readOnly": True}
        )

    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "env": env,
        **({"envFrom": env_from} if env_from else {}),
        "ports": [{"name": "c10d", "containerPort": MASTER_PORT, "protocol": "TCP"}],
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    if spec.command:
        container["command"] = list(spec.command)
    if spec.args:
        container["args"] = list(spec.args)
    if spec.resources_per_node:
        container["resources"] = spec.resources_per_node.to_api()

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "hostname": pod_name(name, rank),
        "subdomain": service_name(name),
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }
    pod_spec.update(
        pod_placement(
            node_selector=spec.node_selector,
            tolerations=spec.tolerations,
            resources=spec.resources_per_node,
            priority_class_name=spec.priority_class_name,
            service_account_name=spec.service_account_name,
        )
    )
    _merge_placement(pod_spec, admitted or {})

    labels = standard_labels(job, "trainer") | {
        LABEL_JOB: name,
        LABEL_RANK: str(rank),
        LABEL_GANG: str(gang),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(name, rank),
            "namespace": ns,
            "labels": labels,
            "ownerReferences": [owner_reference(job)],
        },
        "spec": pod_spec,
    }


def _merge_placement(pod_spec: dict[str, Any], extra: dict[str, Any]) -> None:
    """Add ``extra``'s ``nodeSelector`` labels and ``tolerations`` to ``pod_spec`` (in place), as
    Kueue's jobframework merges a ResourceFlavor into a pod set (podset.Merge). Kueue assigns
    only flavors whose node labels the pod's own nodeSelector allows, so keys do not clash."""
    if extra.get("nodeSelector"):
        pod_spec["nodeSelector"] = {**pod_spec.get("nodeSelector", {}), **extra["nodeSelector"]}
    tolerations = list(pod_spec.get("tolerations", []))
    tolerations += [t for t in extra.get("tolerations", []) if t not in tolerations]
    if tolerations:
        pod_spec["tolerations"] = tolerations


def pods(
    job: dict[str, Any],
    spec: TrainingJobSpec,
    gang: int,
    defaults: StorageDefaults | None = None,
    admitted: dict[str, Any] | None = None,
    feature_group: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """All ``numNodes`` pods of gang ``gang``, rank 0 first (``defaults``, ``admitted``,
    ``feature_group`` as in :func:`pod`)."""
    return [pod(job, spec, rank, gang, defaults, admitted, feature_group) for rank in range(spec.num_nodes)]
