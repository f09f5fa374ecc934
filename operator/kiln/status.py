"""The one status-write path of every kiln.dev kind (controllers and the CLI alike).

:func:`write_status` takes the object as it was read and the *whole* new status (a typed model from
:mod:`kiln.api`, or its ``to_api()`` dict), and:

1. computes the JSON merge patch (RFC 7386) turning the status that was read into the new one,
   with an explicit ``null`` for every key that disappeared (:func:`diff`), so a field the
   controller dropped (``startTime`` on suspend, ``nextRestartTime`` after a gang restart)
   is really removed from the stored object;
2. skips the request when that patch is empty: no write when nothing changed (counted in
   ``kiln_status_writes_total{result="skipped"}``);
3. sends it to the ``status`` subresource with ``metadata.resourceVersion`` set to the version
   that was read: a precondition, so the API server answers 409 Conflict if anything changed
   since, and the patch (a diff against exactly that version) never applies to another one;
4. on 409 re-reads the object. When nothing the decision was made from changed (spec, status,
   deletion, ``kiln.dev/`` annotations, labels: :func:`decision_inputs`), only metadata that
   other tools write (an Argo CD tracking annotation, a ``kubectl annotate``, a finalizer), the
   same status is written again against the new resourceVersion, up to
   :data:`CONFLICT_RETRIES` times. This is client-go's ``retry.RetryOnConflict`` narrowed to the
   case where it is provably safe; without it a reconcile that takes longer than the interval
   between such writes never lands its status (found by the 409-storm fault test). Otherwise
   the 409 goes out as :class:`kiln.kube.Conflict`, which the work queue
   (:mod:`kiln.controllers.runtime`) turns into an immediate re-run from a fresh read (with a
   short delay only after several conflicts in a row), not an error: nothing was written, so
   deciding again is always safe. In-place retry loops (the registry's) catch it themselves.

Why a merge patch with nulls and not server-side apply of the status subresource: with the
resourceVersion precondition the diff is computed against exactly the stored status, so the
patch is exact whoever wrote the fields before. Server-side apply removes only the fields that
*its* field manager owned: every status written before (by merge patches, which are Update
operations of another manager, by ``kiln registry rebuild``, by ``kubectl edit --subresource
status``) would keep its stale keys until ownership was migrated, and a field that another
manager also owns is never removed. Apply also costs a managedFields entry per object, and we would
still need the precondition for the registry's read-modify-write of version numbers. Lists
(``conditions``, ``versions``, ``history``) are replaced whole, which is what we want: the
controller computes them whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubernetes import client as k8s
from pydantic import BaseModel

from kiln import kube
from kiln.mergepatch import merge_patch
from kiln.metrics import STATUS_WRITES

Status = BaseModel | Mapping[str, Any]

#: In-place re-writes after a 409 when only metadata outside :func:`decision_inputs` changed.
CONFLICT_RETRIES = 5


def as_dict(status: Status) -> dict[str, Any]:
    """The status as the API server stores it: camelCase keys, unset optionals omitted."""
    if isinstance(status, BaseModel):
        return status.model_dump(by_alias=True, exclude_none=True, mode="json")
    return dict(status)


def diff(old: Mapping[str, Any] | None, new: Status) -> dict[str, Any]:
    """The merge patch turning status ``old`` into ``new``: ``{}`` when they are equal.

    Keys of ``old`` missing from ``new`` are ``None`` (JSON ``null``: removed by the server).
    """
    return merge_patch(old or {}, as_dict(new))


def decision_inputs(obj: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a reconcile's decision about ``obj`` depends on: ``spec``, ``status``, deletion,
    labels and the ``kiln.dev/`` annotations (e.g. the Model's change-cause). Two reads with
    equal inputs get the same status; other metadata (resourceVersion, managedFields, other
    tools' annotations) can change under a status write without making it stale."""
    meta = obj.get("metadata") or {}
    ours = {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith("kiln.dev/")}
    return (obj.get("spec"), obj.get("status"), meta.get("deletionTimestamp"), meta.get("labels"), ours)


def write_status(api: k8s.ApiClient, obj: dict[str, Any], status: Status) -> dict[str, Any]:
    """Make ``status`` the whole status of ``obj`` (as read), or do nothing if it already is.

    Args:
        obj: the object as read (``apiVersion``, ``kind``, ``metadata`` with ``name``,
            ``namespace`` and ``resourceVersion``; ``status``).
        status: the complete new status (typed model or dict); keys not in it are removed.
    Returns:
        The object as stored after the write, or ``obj`` itself when nothing changed.
    Raises:
        kiln.kube.Conflict: the object changed since it was read (HTTP 409); nothing written.
        kiln.kube.Gone: the object no longer exists (HTTP 404).
        kubernetes.client.rest.ApiException: any other refusal (e.g. 422 from the schema).
    """
    kind = str(obj.get("kind", ""))
    new = as_dict(status)
    current = obj
    for attempt in range(CONFLICT_RETRIES + 1):
        patch = diff(current.get("status"), new)
        if not patch:
            STATUS_WRITES.labels(kind, "skipped").inc()
            return dict(current)
        try:
            out = kube.patch_status(
                api, current, patch, resource_version=current["metadata"]["resourceVersion"]
            )
        except kube.Conflict:
            STATUS_WRITES.labels(kind, "conflict").inc()
            meta = obj["metadata"]
            fresh = kube.get(api, str(obj["apiVersion"]), kind, meta.get("namespace"), meta["name"])
            if attempt == CONFLICT_RETRIES or fresh is None or decision_inputs(fresh) != decision_inputs(obj):
                raise
            current = fresh
            continue
        STATUS_WRITES.labels(kind, "written").inc()
        return out
    raise AssertionError("unreachable")
