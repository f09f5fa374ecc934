"""Pure builders for a FeatureGroup's children: materialization Jobs and the schedule's CronJob.

Every run is a batch/v1 Job running ``python -m kiln.features materialize`` (see
:mod:`kiln.features.__main__`) in the image of ``spec.materialization.image`` (default: the
operator's ``KILN_FEATURES_IMAGE``; the kiln trainer image, which has the ``features`` extra):

- **A run the operator starts** (the first one, a backfill after the definitions changed, or one
  requested with ``kiln features materialize``) is an Indexed Job ``<group>-<base36 seconds>``
  covering ``[start, end)``: ``start`` is the watermark (``status.lastMaterializationTime``) or,
  without one, the backfill start (:func:`kiln.features.schema.range_start`), ``end`` the time the
  operator decided. The range is cut into ``completions`` windows of about
  ``spec.materialization.windowSeconds`` (at most :data:`~kiln.api.featuregroup.MAX_WINDOWS`);
  completion ``i`` (``$JOB_COMPLETION_INDEX``) writes window ``i``, ``parallelism`` at a time, so
  a large backfill spreads over the cluster. The range and the schema digest are in the Job's
  annotations.
- **The schedule** (``spec.schedule``) is a CronJob ``<group>`` whose Jobs materialize
  ``[start, now)`` where ``start`` is written into its job template: the watermark when the
  CronJob was last applied. The operator re-applies the CronJob whenever the watermark advances,
  so the next scheduled run starts where the last successful run ended. If a scheduled run
  starts before that (the operator was down), its range overlaps the one already written: harmless,
  since materialization is idempotent and an older row never replaces a newer one. No pod ever
  reads the Kubernetes API: the pods need no ServiceAccount token and no RBAC.

Results travel back the standard way: the entry point writes its one JSON result line to
``/dev/termination-log`` (``terminationMessagePath``), the operator reads it from each finished
pod's status (:mod:`kiln.featurestore`) and records the watermark, rows and duration. Exit codes
drive the Job's ``podFailurePolicy``: 1 (a source or schema error, e.g. a missing column) and 2
(bad arguments) fail the Job at once (``FailJob``), 3 (Redis or the object store unavailable)
counts against ``backoffLimit`` and is retried; a disruption (eviction, preemption) is ignored.

The FeatureGroup reaches the pods as JSON in the environment (``KILN_FEATURE_GROUP``): Linux
caps one environment string at 128 KiB (``MAX_ARG_STRLEN``), so a spec whose JSON is over
:data:`MAX_FEATURE_GROUP_JSON` bytes is refused (:class:`SpecTooLarge`) rather than failing at
``exec``. Pods mount an ``emptyDir`` at ``/tmp`` (DuckDB spills there; the root filesystem is
read-only), the source's volume read-only at the source path's parent directory, and get the
source's object-store environment (:func:`kiln.resources.storage.storage_env`) for an ``s3://``
source.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from kiln.api.common import ResourceRequirements
from kiln.api.featuregroup import MAX_WINDOWS, FeatureGroupSpec, RunTrigger
from kiln.artifact import TERMINATION_LOG
from kiln.conditions import rfc3339
from kiln.features.errors import EXIT_PERMANENT, EXIT_TRANSIENT
from kiln.features.schema import schema_digest
from kiln.resources.common import owner_reference, pod_placement, standard_labels
from kiln.resources.storage import StorageDefaults, is_s3, storage_env

LABEL_FEATURE_GROUP = "kiln.dev/featuregroup"
LABEL_TRIGGER = "kiln.dev/materialization-trigger"
ANNOTATION_DIGEST = "kiln.dev/schema-digest"
ANNOTATION_GENERATION = "kiln.dev/generation"
ANNOTATION_START = "kiln.dev/materialize-start"
ANNOTATION_END = "kiln.dev/materialize-end"
#: On the FeatureGroup: set (to any new value, e.g. the time) to request a run (``kiln features
#: materialize``); ``status.lastHandledMaterializeAt`` echoes the value once a run was started.
ANNOTATION_REQUEST = "kiln.dev/materialize-requested-at"
#: On a requested run's Job: the request value it answers (so a lost status write cannot repeat it).
ANNOTATION_ANSWERS = "kiln.dev/answers-request"
CONTAINER = "materialize"
ENV_FEATURE_GROUP = "KILN_FEATURE_GROUP"
ENV_FEATURES_IMAGE = "KILN_FEATURES_IMAGE"
#: Largest FeatureGroup JSON passed in the environment (Linux's MAX_ARG_STRLEN is 128 KiB).
MAX_FEATURE_GROUP_JSON = 96 * 1024
#: Exit codes that fail a run at once: the entry point's permanent errors and argparse's.
PERMANENT_EXIT_CODES = (EXIT_PERMANENT, 2)
#: A scheduled run more than this late (the controller was down) is skipped, not run late.
STARTING_DEADLINE_SECONDS = 600
DEFAULT_RESOURCES = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
_UNITS = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "": 1,
}


class SpecTooLarge(ValueError):
    """The FeatureGroup's JSON does not fit in one environment variable."""


@dataclass(frozen=True)
class MaterializationDefaults:
    """The operator's configuration for what ``spec.materialization`` / ``spec.source`` leave unset."""

    image: str | None = None
    storage: StorageDefaults = field(default_factory=StorageDefaults)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> MaterializationDefaults:
        """``KILN_FEATURES_IMAGE`` and the storage settings (:meth:`StorageDefaults.from_environ`)."""
        return cls(environ.get(ENV_FEATURES_IMAGE) or None, StorageDefaults.from_environ(environ))


def image(spec: FeatureGroupSpec, defaults: MaterializationDefaults) -> str | None:
    """The materialization image: ``spec.materialization.image``, else the operator's (None: neither)."""
    return spec.materialization.image or defaults.image


def run_name(group: str, now: dt.datetime) -> str:
    """``<group>-<Unix seconds of now, base 36>``: at most 59 characters for a group name of at most 52
    (the CronJob limit), so an Indexed Job pod's hostname ``<job>-<index>`` (index < 1000) is a
    DNS label (<= 63)."""
    n, digits = int(now.timestamp()), ""
    while True:
        n, r = divmod(n, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + digits
        if n == 0:
            return f"{group}-{digits}"


def window_count(start: dt.datetime, end: dt.datetime, window_seconds: int) -> int:
    """Completions of a run over ``[start, end)``: ceil(length / windowSeconds), in [1, MAX_WINDOWS]."""
    seconds = (end - start).total_seconds()
    return max(1, min(MAX_WINDOWS, math.ceil(seconds / window_seconds)))


def quantity_bytes(q: int | str) -> int | None:
    """A core/v1 memory quantity (``2Gi``, ``512M``, ``1e9``, ``1024``) in bytes; None if unreadable."""
    m = re.fullmatch(r"([0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T|)", str(q).strip())
    if not m:
        return None
    try:
        return int(float(m.group(1)) * _UNITS[m.group(2)])
    except ValueError:
        return None


def resources(spec: FeatureGroupSpec) -> dict[str, Any]:
    """The container's resources: ``spec.materialization.resources``, else :data:`DEFAULT_RESOURCES`."""
    r = spec.materialization.resources
    return r.to_api() if r is not None else copy.deepcopy(DEFAULT_RESOURCES)


def duckdb_memory_limit(res: dict[str, Any]) -> str:
    """DuckDB's ``memory_limit``: half the container's memory limit (the rest is Arrow batches,
    Redis pipelines and Python), at least 64 MiB; ``1GB`` without a limit."""
    limit = (res.get("limits") or {}).get("memory")
    n = quantity_bytes(limit) if limit is not None else None
    return "1GB" if n is None else f"{max(64, n // 2 // 2**20)}MiB"


def feature_group_json(fg: dict[str, Any], spec: FeatureGroupSpec) -> str:
    """The FeatureGroup as the entry point reads it (name, namespace, the parsed spec), compact JSON.

    Raises:
        SpecTooLarge: it is over :data:`MAX_FEATURE_GROUP_JSON` bytes.
    """
    meta = fg["metadata"]
    obj = {
        "apiVersion": fg.get("apiVersion", "kiln.dev/v1alpha1"),
        "kind": "FeatureGroup",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
        "spec": spec.to_api(),
    }
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    if len(text.encode()) > MAX_FEATURE_GROUP_JSON:
        raise SpecTooLarge(
            f"the FeatureGroup is {len(text.encode())} bytes as JSON, over the {MAX_FEATURE_GROUP_JSON} "
            "a materialization pod's environment can hold (shorten descriptions)"
        )
    return text


def source_mount_path(uri: str) -> str:
    """Where the source's volume is mounted: the parent directory of its path
    (``file:///data/events.parquet`` and ``/data/events/`` -> ``/data``)."""
    parsed = urlparse(uri)
    path = parsed.path if parsed.scheme == "file" else uri
    return posixpath.dirname(path.rstrip("/")) or "/"


def _labels(fg: dict[str, Any], trigger: RunTrigger) -> dict[str, str]:
    return standard_labels(fg, "materialization") | {
        LABEL_FEATURE_GROUP: fg["metadata"]["name"],
        LABEL_TRIGGER: str(trigger),
    }


def _container(
    fg: dict[str, Any],
    spec: FeatureGroupSpec,
    img: str,
    command: str,
    args: list[str],
    defaults: MaterializationDefaults,
) -> dict[str, Any]:
    res = resources(spec)
    if command == "materialize":
        args = [*args, "--memory-limit", duckdb_memory_limit(res)]
    env: list[dict[str, Any]] = [
        {"name": ENV_FEATURE_GROUP, "value": feature_group_json(fg, spec)},
        {"name": "KILN_TERMINATION_LOG", "value": TERMINATION_LOG},
    ]
    env_from: list[dict[str, Any]] = []
    if is_s3(spec.source.uri):
        s3_env, env_from = storage_env(spec.source.storage, defaults.storage)
        env += s3_env
    store = spec.online.store
    if command == "materialize" and store is not None and store.secret_ref is not None:
        env_from.append({"secretRef": {"name": store.secret_ref.name}})  # KILN_REDIS_PASSWORD
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if spec.source.volume and not is_s3(spec.source.uri):
        mounts.append({"name": "source", "mountPath": source_mount_path(spec.source.uri), "readOnly": True})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": img,
        "command": ["python", "-m", "kiln.features", command],
        "args": args,
        "env": env,
        **({"envFrom": env_from} if env_from else {}),
        "resources": res,
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": copy.deepcopy(_SECURITY_CONTEXT),
    }
    if spec.materialization.image_pull_policy:
        container["imagePullPolicy"] = spec.materialization.image_pull_policy
    return container


def _job_spec(
    fg: dict[str, Any],
    spec: FeatureGroupSpec,
    img: str,
    command: str,
    args: list[str],
    labels: dict[str, str],
    windows: int,
    defaults: MaterializationDefaults,
) -> dict[str, Any]:
    """The batch/v1 JobSpec of one run (Indexed, ``windows`` completions) of ``command`` ``args``."""
    m = spec.materialization
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    if spec.source.volume and not is_s3(spec.source.uri):
        volumes.append({"name": "source", **spec.source.volume})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [_container(fg, spec, img, command, args, defaults)],
        "volumes": volumes,
    }
    pod_spec.update(
        pod_placement(
            node_selector=m.node_selector,
            tolerations=m.tolerations,
            resources=ResourceRequirements.model_validate(resources(spec)),
            priority_class_name=None,
            service_account_name=m.service_account_name,
        )
    )
    job: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": windows,
        "parallelism": min(windows, m.parallelism),
        "backoffLimit": m.backoff_limit,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": list(PERMANENT_EXIT_CODES),
                    },
                },
                {
                    "action": "Count",
                    "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_TRANSIENT]},
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        },
        "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
    }
    if m.active_deadline_seconds:
        job["activeDeadlineSeconds"] = m.active_deadline_seconds
    return job


def run_job(
    fg: dict[str, Any],
    spec: FeatureGroupSpec,
    *,
    name: str,
    trigger: RunTrigger,
    start: dt.datetime | None,
    end: dt.datetime | None,
    defaults: MaterializationDefaults,
    request: str | None = None,
) -> dict[str, Any]:
    """The Job of one run the operator starts: an Indexed Job over ``[start, end)`` (see the module
    docstring), or, for ``trigger`` Validation (no online store), one pod checking the source.

    Raises:
        ValueError: no image (neither the spec nor the operator names one).
        SpecTooLarge: see :func:`feature_group_json`.
    """
    img = image(spec, defaults)
    if not img:
        raise ValueError("no materialization image: set spec.materialization.image")
    meta = fg["metadata"]
    labels = _labels(fg, trigger)
    annotations = {
        ANNOTATION_DIGEST: schema_digest(spec),
        ANNOTATION_GENERATION: str(meta.get("generation", "")),
    }
    if request:
        annotations[ANNOTATION_ANSWERS] = request
    if trigger == RunTrigger.VALIDATION or start is None or end is None:
        command, args, windows = "validate", [], 1
    else:
        command, windows = "materialize", window_count(start, end, spec.materialization.window_seconds)
        args = ["--start", rfc3339(start), "--end", rfc3339(end), "--windows", str(windows)]
        annotations |= {ANNOTATION_START: rfc3339(start), ANNOTATION_END: rfc3339(end)}
    job_spec = _job_spec(fg, spec, img, command, args, labels, windows, defaults)
    job_spec["ttlSecondsAfterFinished"] = spec.materialization.ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(fg)],
        },
        "spec": job_spec,
    }


def cronjob_name(group: str) -> str:
    """The schedule's CronJob: named like the group (at most 52 characters, the CronJob limit)."""
    return group


def cronjob(
    fg: dict[str, Any], spec: FeatureGroupSpec, *, start: dt.datetime, defaults: MaterializationDefaults
) -> dict[str, Any]:
    """The CronJob of ``spec.schedule``: each Job materializes ``[start, now)`` in one pod, ``start``
    being the watermark when this was built (see the module docstring). ``concurrencyPolicy:
    Forbid``: a run still going when the next is due makes the next one wait for its turn.

    Raises:
        ValueError: no schedule, or no image.
        SpecTooLarge: see :func:`feature_group_json`.
    """
    img = image(spec, defaults)
    if not spec.schedule or not img:
        raise ValueError("a materialization CronJob needs spec.schedule and an image")
    meta = fg["metadata"]
    labels = _labels(fg, RunTrigger.SCHEDULE)
    args = ["--start", rfc3339(start), "--end", "now", "--windows", "1"]
    annotations = {
        ANNOTATION_DIGEST: schema_digest(spec),
        ANNOTATION_GENERATION: str(meta.get("generation", "")),
        ANNOTATION_START: rfc3339(start),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {
            "name": cronjob_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(fg)],
        },
        "spec": {
            "schedule": spec.schedule,
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": STARTING_DEADLINE_SECONDS,
            "successfulJobsHistoryLimit": 1,
            "failedJobsHistoryLimit": 1,
            "jobTemplate": {
                "metadata": {"labels": dict(labels), "annotations": dict(annotations)},
                "spec": _job_spec(fg, spec, img, "materialize", args, labels, 1, defaults),
            },
        },
    }
