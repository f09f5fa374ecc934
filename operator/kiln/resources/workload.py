"""Pure builder of the Kueue Workload that queues a TrainingJob (the why: :mod:`kiln.queueing`).

A TrainingJob labelled ``kueue.x-k8s.io/queue-name: <LocalQueue>`` (the label Kueue's own job
integrations read, e.g. on a PyTorchJob) gets one ``kueue.x-k8s.io/v1beta2`` Workload, owned by
the job, with one pod set ``main`` of ``numNodes`` pods: the whole gang is one unit of quota, so
Kueue admits it whole or not at all, and preempts it whole. Its pod template carries what
Kueue's admission reads (containers' resources, nodeSelector, tolerations, priorityClassName),
not the whole pod: the pods themselves are created by Kiln after admission
(:func:`kiln.resources.trainingjob.pods`).

Priority, as Kueue's jobframework sets it (``constructWorkload`` / ``prepareWorkload``): the
``kueue.x-k8s.io/priority-class`` label names a WorkloadPriorityClass, else
``spec.priorityClassName`` a PriorityClass; the Workload gets ``priorityClassRef`` and the
class's value in ``priority`` (its CRD requires both together, and no Kueue webhook fills in the
value of a Workload created directly).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from kiln.api.trainingjob import TrainingJobSpec
from kiln.resources.common import owner_reference, standard_labels
from kiln.resources.trainingjob import CONTAINER, LABEL_JOB, pod

KUEUE_API_VERSION = "kueue.x-k8s.io/v1beta2"
WORKLOAD = "Workload"
RESOURCE_FLAVOR = "ResourceFlavor"
WORKLOAD_PRIORITY_CLASS = "WorkloadPriorityClass"
#: The LocalQueue a job is submitted to (Kueue's constants.QueueLabel).
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
#: A WorkloadPriorityClass for the job (Kueue's constants.WorkloadPriorityClassLabel).
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"
#: The one pod set of a TrainingJob's Workload (Kueue's default pod set name).
POD_SET = "main"
#: What Kueue's admission reads from a pod spec; the rest of the pod stays Kiln's.
_TEMPLATE_FIELDS = ("nodeSelector", "tolerations", "priorityClassName", "affinity", "runtimeClassName")


def queue_name(job: dict[str, Any]) -> str | None:
    """The LocalQueue the job names with :data:`QUEUE_LABEL`, or None (not queued)."""
    labels = job.get("metadata", {}).get("labels") or {}
    return labels.get(QUEUE_LABEL) or None


def workload_name(job: dict[str, Any]) -> str:
    """``trainingjob-<name>-<5 hex>``: the hash of the job's uid tells incarnations apart, so a
    job deleted and created again under the same name never meets its predecessor's Workload.
    (Kueue's jobframework names them ``<kind>-<name>-<hash>`` too.) At most 74 characters."""
    meta = job["metadata"]
    digest = hashlib.sha256(str(meta.get("uid", "")).encode()).hexdigest()[:5]
    return f"trainingjob-{meta['name']}-{digest}"


@dataclass(frozen=True)
class Priority:
    """A resolved priority class: ``kind`` WorkloadPriorityClass (group kueue.x-k8s.io) or
    PriorityClass (group scheduling.k8s.io), its ``name`` and integer ``value``."""

    kind: str
    name: str
    value: int

    def ref(self) -> dict[str, str]:
        group = "kueue.x-k8s.io" if self.kind == WORKLOAD_PRIORITY_CLASS else "scheduling.k8s.io"
        return {"group": group, "kind": self.kind, "name": self.name}


def priority_class(job: dict[str, Any], spec: TrainingJobSpec) -> tuple[str, str] | None:
    """Which class sets the Workload's priority: ``(kind, name)`` from :data:`PRIORITY_CLASS_LABEL`
    (a WorkloadPriorityClass), else ``spec.priorityClassName`` (a PriorityClass), else None."""
    labels = job.get("metadata", {}).get("labels") or {}
    if labels.get(PRIORITY_CLASS_LABEL):
        return WORKLOAD_PRIORITY_CLASS, labels[PRIORITY_CLASS_LABEL]
    if spec.priority_class_name:
        return "PriorityClass", spec.priority_class_name
    return None


def pod_sets(job: dict[str, Any], spec: TrainingJobSpec) -> list[dict[str, Any]]:
    """The Workload's ``spec.podSets``: one pod set of ``numNodes`` pods whose template is the
    gang's pod (rank 0) cut down to what admission reads: the trainer container's image and
    resources, and the placement fields (:data:`_TEMPLATE_FIELDS`)."""
    full = pod(job, spec, 0, 0)["spec"]
    container = next(c for c in full["containers"] if c["name"] == CONTAINER)
    template: dict[str, Any] = {
        "containers": [
            {
                "name": CONTAINER,
                "image": container["image"],
                **({"resources": container["resources"]} if container.get("resources") else {}),
            }
        ],
        "restartPolicy": full["restartPolicy"],
    }
    template |= {k: full[k] for k in _TEMPLATE_FIELDS if k in full}
    return [{"name": POD_SET, "count": spec.num_nodes, "template": {"spec": template}}]


def workload(job: dict[str, Any], spec: TrainingJobSpec, priority: Priority | None = None) -> dict[str, Any]:
    """The Workload of a queued TrainingJob (``queue_name(job)`` must not be None).

    Owned by the job (controller reference), so it goes with it; labelled with the job's name
    (:data:`kiln.resources.trainingjob.LABEL_JOB`) so its watch events reach the job's
    reconcile. No finalizer: Kueue's resource-in-use finalizer is what its jobframework adds
    and removes around a job it manages; Kiln deletes the Workload only once the gang's pods
    are gone, and the garbage collector deletes it with the job.

    Raises:
        ValueError: the job names no LocalQueue.
    """
    queue = queue_name(job)
    if queue is None:
        raise ValueError(f"TrainingJob {job['metadata']['name']} has no {QUEUE_LABEL} label")
    meta = job["metadata"]
    body: dict[str, Any] = {
        "queueName": queue,
        "podSets": pod_sets(job, spec),
    }
    if priority is not None:
        body["priorityClassRef"] = priority.ref()
        body["priority"] = priority.value
    return {
        "apiVersion": KUEUE_API_VERSION,
        "kind": WORKLOAD,
        "metadata": {
            "name": workload_name(job),
            "namespace": meta["namespace"],
            "labels": standard_labels(job, "trainer") | {LABEL_JOB: meta["name"]},
            "ownerReferences": [owner_reference(job)],
        },
        "spec": body,
    }
