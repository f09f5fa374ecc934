"""Pure builders for how pods reach the artifact store: environment and ``envFrom``.

Pods get the standard AWS SDK variables (see :mod:`kiln.storage`), so the trainer, the model
server and a user's own training script all read them the way every AWS SDK does. Where a value
comes from, first match wins:

- the credentials: ``spec.storage.secretRef`` (required: a missing Secret keeps the pod in
  ``CreateContainerConfigError``, visible in its events), else the operator's default Secret name
  (``KILN_STORAGE_SECRET_NAME``, Helm ``artifacts.s3.secretName``; ``optional`` so that a namespace
  using a workload identity instead needs no Secret), else nothing (the SDK's default chain);
- ``AWS_ENDPOINT_URL`` / ``AWS_REGION``: ``spec.storage``, else the operator's own environment.
  An explicit ``env`` entry wins over the same key in the Secret (core/v1 ``envFrom`` rules).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kiln.api.common import ObjectStorage

#: Artifact root used when neither the TrainingJob nor the operator configuration names one.
DEFAULT_ARTIFACT_ROOT = "file:///var/lib/kiln/artifacts"
ENV_ARTIFACT_ROOT = "KILN_ARTIFACT_ROOT"
ENV_STORAGE_SECRET_NAME = "KILN_STORAGE_SECRET_NAME"


@dataclass(frozen=True)
class StorageDefaults:
    """The operator's storage configuration (Helm values ``artifacts``), applied to every child
    whose spec leaves a storage field unset."""

    artifact_root: str = DEFAULT_ARTIFACT_ROOT
    secret_name: str | None = None
    endpoint: str | None = None
    region: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> StorageDefaults:
        """Read ``KILN_ARTIFACT_ROOT``, ``KILN_STORAGE_SECRET_NAME``, ``AWS_ENDPOINT_URL`` and
        ``AWS_REGION`` (empty values count as unset)."""
        return cls(
            artifact_root=environ.get(ENV_ARTIFACT_ROOT) or DEFAULT_ARTIFACT_ROOT,
            secret_name=environ.get(ENV_STORAGE_SECRET_NAME) or None,
            endpoint=environ.get("AWS_ENDPOINT_URL") or None,
            region=environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or None,
        )


def is_s3(uri: str | None) -> bool:
    """True for an ``s3://`` URI."""
    return bool(uri) and str(uri).startswith("s3://")


def storage_env(
    storage: ObjectStorage | None, defaults: StorageDefaults
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(env, envFrom)`` of a container that reads or writes ``s3://`` URIs.

    Returns:
        ``env``: ``AWS_ENDPOINT_URL`` / ``AWS_REGION`` entries (only those with a value);
        ``envFrom``: at most one ``secretRef``.
    """
    storage = storage or ObjectStorage()
    env: list[dict[str, Any]] = []
    endpoint = storage.endpoint or defaults.endpoint
    region = storage.region or defaults.region
    if endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": endpoint})
    if region:
        env.append({"name": "AWS_REGION", "value": region})
    env_from: list[dict[str, Any]] = []
    if storage.secret_ref is not None:
        env_from.append({"secretRef": {"name": storage.secret_ref.name}})
    elif defaults.secret_name:
        env_from.append({"secretRef": {"name": defaults.secret_name, "optional": True}})
    return env, env_from
