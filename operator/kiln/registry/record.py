"""Registration records: the registry's copy of itself in the artifact store (format only).

When a version is registered, the operator (which mounts the artifact store) writes
``<artifact dir>/kiln-registration.json`` next to ``metadata.json``. ``metadata.json`` says what
the trainer produced; the record says what the registry made of it: which Model, which version
*number*, and the exact status entry. ``kiln registry rebuild`` reads the records back, so a
restore that dropped ``status`` (Velero restores custom resources without status by default)
gets every version back under its original number, with the same digest, metrics and
lineage, and ``latestVersion`` keeps counting from where it was.

One artifact can be registered in several Models (e.g. imported twice), so the file holds a
list of registrations keyed by namespace and Model name. Example::

    {"apiVersion": "kiln.dev/v1alpha1", "kind": "RegistrationRecord",
     "registrations": [{"namespace": "ml", "model": "digits", "registeredAt": "...",
                        "version": {"version": 3, "artifactUri": "file:///...", "digest": "sha256:...",
                                    "metrics": {...}, "lineage": {...}, "createdAt": "..."}}]}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError

from kiln.api.common import KilnModel
from kiln.api.model import ModelVersion

RECORD_FILE = "kiln-registration.json"


class RecordError(ValueError):
    """A registration record is not valid JSON of the expected shape."""


class Registration(KilnModel):
    """One registration of an artifact as a version of a Model."""

    namespace: str = Field(description="Namespace of the Model at registration.")
    model: str = Field(description="Name of the Model.")
    model_uid: str | None = Field(default=None, description="uid of the Model then (a restore changes it).")
    registered_at: str = Field(description="When the operator registered it (RFC 3339).")
    version: ModelVersion = Field(description="The status entry, exactly as registered.")


class RegistrationRecord(KilnModel):
    """Contents of ``kiln-registration.json``."""

    api_version: Literal["kiln.dev/v1alpha1"] = "kiln.dev/v1alpha1"
    kind: Literal["RegistrationRecord"] = "RegistrationRecord"
    registrations: list[Registration] = Field(default_factory=list)

    def find(self, namespace: str | None, model: str) -> Registration | None:
        """The registration for ``model`` (in ``namespace``; any namespace when None)."""
        for r in self.registrations:
            if r.model == model and (namespace is None or r.namespace == namespace):
                return r
        return None


def parse(data: bytes | str) -> RegistrationRecord:
    """Parse a record file's bytes.

    Raises:
        RecordError: not JSON, or not the expected shape.
    """
    try:
        return RegistrationRecord.model_validate_json(data)
    except ValidationError as e:
        raise RecordError(str(e.errors()[0]["msg"])) from e


def dumps(record: RegistrationRecord) -> str:
    """Serialise a record (stable, indented JSON with a trailing newline)."""
    return record.model_dump_json(by_alias=True, exclude_none=True, indent=2) + "\n"


def upsert(record: RegistrationRecord | None, registration: Registration) -> RegistrationRecord:
    """``record`` with ``registration`` added, replacing one for the same namespace and Model."""
    kept = [
        r
        for r in (record.registrations if record else [])
        if (r.namespace, r.model) != (registration.namespace, registration.model)
    ]
    return RegistrationRecord(registrations=[*kept, registration])
