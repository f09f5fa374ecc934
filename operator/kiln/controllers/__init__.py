"""kopf handlers of the four kinds. Importing this package registers them with kopf.

Run with ``kiln operator`` or ``kopf run -m kiln.controllers``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from kiln.controllers import featuregroup, inferenceservice, model, trainingjob
from kiln.controllers.client import api_client
from kiln.controllers.rejections import reporting_rejections
from kiln.controllers.runtime import QUEUES, WorkQueue

CONTROLLERS = (trainingjob, model, inferenceservice, featuregroup)


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Keep kopf's own bookkeeping out of our typed status (the schema would prune it anyway).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.kiln.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kopf.kiln.dev")
    settings.persistence.finalizer = "kiln.dev/kopf-finalizer"
    # Kiln posts its own Events for transitions; kopf's per-handler log events would be noise.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.networking.request_timeout = 60
    workers = int(os.environ.get("KILN_WORKERS", "16"))
    api = api_client()
    for c in CONTROLLERS:
        reconcile = reporting_rejections(api, c.KIND, c.reconciler(api))
        QUEUES.add(WorkQueue(c.KIND, reconcile, workers=workers))


@kopf.on.cleanup()
async def _cleanup(**_: Any) -> None:
    for q in QUEUES.all():
        await q.close()
    QUEUES.clear()
