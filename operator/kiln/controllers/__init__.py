"""kopf handlers of the four kinds. Importing this package registers them with kopf.

Run with ``kiln operator`` (which passes :class:`~kiln.controllers.leadership.OperatorOptions`
in kopf's memo: leader election, namespaced mode) or ``kopf run -m kiln.controllers`` (no
leader election: this process always reconciles).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf

from kiln.controllers import featuregroup, inferenceservice, model, trainingjob
from kiln.controllers.client import api_client
from kiln.controllers.leadership import Leadership, OperatorOptions
from kiln.controllers.rejections import reporting_rejections
from kiln.controllers.runtime import QUEUES, WorkQueue
from kiln.metrics import LEADER

CONTROLLERS = (trainingjob, model, inferenceservice, featuregroup)


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Keep kopf's own bookkeeping out of our typed status (the schema would prune it anyway).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.kiln.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kopf.kiln.dev")
    settings.persistence.finalizer = "kiln.dev/kopf-finalizer"
    # Kiln posts its own Events for transitions; kopf's per-handler log events would be noise.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.networking.request_timeout = 60
    options = memo.get("kiln") or OperatorOptions()
    if options.namespaced:
        # Only the watched namespaces' Roles exist: listing namespaces or CRDs cluster-wide would
        # be refused. kopf then takes the namespaces as given and the resources from discovery.
        settings.scanning.disabled = True
    workers = int(os.environ.get("KILN_WORKERS", "16"))
    leadership = None
    if options.leader_election is not None:
        loop = asyncio.get_running_loop()
        leadership = Leadership(
            options.leader_election, api_client(), loop, on_lost=lambda: _lost(options, loop)
        )
        memo["kiln_leadership"] = leadership
    # every kind's reconcile workers and the TrainingJob's gang creators may call at once
    threads = workers * len(CONTROLLERS) + trainingjob.GANG_CREATORS
    api = api_client(leadership.may_write if leadership else None, threads=threads)
    for c in CONTROLLERS:
        reconcile = reporting_rejections(api, c.KIND, c.reconciler(api))
        QUEUES.add(WorkQueue(c.KIND, reconcile, workers=workers, paused=leadership is not None))
    if leadership is not None:
        leadership.start()
    else:
        LEADER.set(1)


def _lost(options: OperatorOptions, loop: asyncio.AbstractEventLoop) -> None:
    """Leadership lost (called from the elector's thread): stop the operator, exit non-zero."""
    options.lost.set()
    loop.call_soon_threadsafe(options.stop.set)


@kopf.on.cleanup()
async def _cleanup(memo: kopf.Memo, **_: Any) -> None:
    for q in QUEUES.all():
        await q.close()
    QUEUES.clear()
    leadership = memo.get("kiln_leadership")
    if leadership is not None:
        await leadership.stop()  # releases the Lease once nothing reconciles any more
    options = memo.get("kiln")
    if options is not None:
        options.stop.set()  # kopf waits for its stop flag; unset, the exit would hang 5 s
