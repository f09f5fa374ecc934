"""Failpoints: named places where a fault test makes the operator die, as a SIGKILL would.

The fault tests (``tests/integration/test_faults.py``) must kill the operator at an exact point
of a reconcile: between creating a gang's pods and recording it, between registering a version
and recording it on the TrainingJob, between applying a canary step and recording it. A signal
sent from outside lands anywhere; a failpoint lands where it is named. The idea and the
environment-variable interface are etcd's ``gofail`` (``GOFAIL_FAILPOINTS="name=action"``), cut
down to the one action Kiln needs.

``KILN_FAILPOINTS`` is a comma-separated list of names; :func:`hit` with an armed name logs one
line and sends the process SIGKILL: no ``finally``, no atexit, no lease release, exactly what the
kubelet's SIGKILL or the OOM killer leaves behind. Unset (every real deployment), :func:`hit` is
a set lookup. The names are listed in :data:`NAMES`, so a test cannot arm one that does not exist.
"""

from __future__ import annotations

import logging
import os
import signal

ENV = "KILN_FAILPOINTS"
log = logging.getLogger("kiln.failpoints")

#: Every failpoint and where it is.
NAMES = {
    "trainingjob-pod-created": "a gang pod was created; the others and the status write are not done",
    "trainingjob-registered": "the Model has the new version; the TrainingJob's status does not say so",
    "inferenceservice-step-applied": (
        "a running canary's next weight is applied to the children; the status does not record it"
    ),
}


def armed(environ: dict[str, str] | None = None) -> frozenset[str]:
    """The failpoints armed by ``KILN_FAILPOINTS`` (default: this process's environment).

    Raises:
        ValueError: a name that is not in :data:`NAMES` (a typo would silently test nothing).
    """
    value = (os.environ if environ is None else environ).get(ENV, "")
    names = frozenset(n.strip() for n in value.split(",") if n.strip())
    unknown = sorted(names - NAMES.keys())
    if unknown:
        raise ValueError(f"{ENV}: unknown failpoint(s) {unknown}; known: {sorted(NAMES)}")
    return names


_ARMED = armed()


def hit(name: str) -> None:
    """Die here (SIGKILL to this process) if failpoint ``name`` is armed; else nothing."""
    assert name in NAMES, name
    if name in _ARMED:
        log.warning("failpoint %s: killing the operator (%s)", name, NAMES[name])
        for h in logging.getLogger().handlers:
            h.flush()
        os.kill(os.getpid(), signal.SIGKILL)
