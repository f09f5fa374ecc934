"""A child the API server refuses becomes the parent's ``Ready=False``, not a traceback loop.

Builders derive children from the parent's spec; the API server may still refuse one (422: an
invalid name or field; 403: PodSecurity admission, a ResourceQuota, RBAC, a webhook), and
writing the same child again cannot succeed until the spec, the quota or the policy changes.
:func:`reporting_rejections` wraps every kind's reconcile (in one place, the operator's startup):
on :class:`kiln.kube.Rejected` it sets the parent's ``Ready=False`` with reason
``ChildRejected``, naming the child and quoting the server's message, posts a Warning Event when
that condition changes, and re-raises so that the work queue retries with exponential back-off
(logged in one line, without a traceback; see :mod:`kiln.controllers.runtime`). A spec change
reaches the queue through the watch at once, whatever the back-off.
"""

from __future__ import annotations

import logging

from kubernetes import client as k8s

from kiln import API_VERSION, events, kube
from kiln.conditions import FALSE, get_condition, set_condition
from kiln.controllers.runtime import ReconcileFn, Result
from kiln.status import write_status

log = logging.getLogger("kiln.rejections")
REASON = "ChildRejected"


def reporting_rejections(api: k8s.ApiClient, kind: str, reconcile: ReconcileFn) -> ReconcileFn:
    """``reconcile`` that reports a rejected child on the parent (see the module docstring).

    Raises:
        kiln.kube.Rejected: after reporting it, for the work queue's back-off.
    """

    def run(namespace: str, name: str) -> Result | None:
        try:
            return reconcile(namespace, name)
        except kube.Rejected as e:
            report(api, kind, namespace, name, e)
            raise

    return run


def message(e: kube.Rejected) -> str:
    """The condition/Event message: which child, the HTTP status and the server's own words."""
    return f"{e.kind} {e.name} was rejected by the API server ({e.status} {e.reason}): {e.message}"


def report(api: k8s.ApiClient, kind: str, namespace: str, name: str, e: kube.Rejected) -> None:
    """Write ``Ready=False, reason ChildRejected`` on the parent and post a Warning Event.

    Nothing is written when the condition already says the same (a retry after back-off), so a
    persistent rejection costs one GET per retry. A parent that is gone or changed meanwhile
    (404/409) is left to the next reconcile.
    """
    obj = kube.get(api, API_VERSION, kind, namespace, name)
    if obj is None:
        return
    text = message(e)
    status = obj.get("status") or {}
    before = get_condition(status.get("conditions"), "Ready")
    if before and (before.get("status"), before.get("reason"), before.get("message")) == (
        FALSE,
        REASON,
        text,
    ):
        return
    gen = obj["metadata"].get("generation")
    conditions = set_condition(status.get("conditions"), "Ready", FALSE, REASON, text, generation=gen)
    try:
        write_status(api, obj, {**status, "conditions": conditions, "observedGeneration": gen})
    except (kube.Conflict, kube.Gone) as err:
        log.info("%s %s/%s: not reporting %s now (%s)", kind, namespace, name, REASON, err)
        return
    events.record(api, obj, events.WARNING, REASON, text)
