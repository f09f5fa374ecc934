"""Types shared by the four kinds: conditions, references, Kubernetes core sub-objects.

Every model here serialises with camelCase aliases (Kubernetes API conventions) and forbids
unknown fields, so a typo in a manifest is an error rather than silently ignored.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema
from pydantic.alias_generators import to_camel

#: Kubernetes resource quantity (e.g. ``500m``, ``2Gi``, ``8``): an int or a quantity string.
QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
Quantity = Annotated[
    int | str,
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            # As controller-gen emits resource.Quantity: the pattern only constrains strings.
            "pattern": QUANTITY_PATTERN,
        }
    ),
]

#: A JSON value of any shape, kept as is by the API server.
FreeForm = Annotated[Any, WithJsonSchema({"x-kubernetes-preserve-unknown-fields": True})]
#: A JSON object of any shape (e.g. a core/v1 VolumeSource), kept as is by the API server.
FreeFormObject = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
RFC3339 = "date-time"


def cel(
    rule: str, message: str, *, field_path: str | None = None, reason: str | None = None
) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry (a CEL rule evaluated by the API server).

    See https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#validation-rules
    """
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    if reason:
        out["reason"] = reason
    return out


def immutable(name: str) -> dict[str, Any]:
    """``json_schema_extra`` for a field that may not change once set (a CEL transition rule)."""
    return {"x-kubernetes-validations": [cel("self == oldSelf", f"{name} is immutable")]}


class KilnModel(BaseModel):
    """Base of every API type: camelCase aliases, unknown fields forbidden."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=False,
    )

    def to_api(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase keys, unset optionals omitted."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def with_rules(*rules: dict[str, Any]) -> ConfigDict:
    """A model config adding CEL ``x-kubernetes-validations`` to the model's schema."""
    validations: Any = list(rules)  # JSON values; pydantic's JsonValue type is invariant
    return ConfigDict(**KilnModel.model_config, json_schema_extra={"x-kubernetes-validations": validations})


def spec_error(error: ValidationError) -> str:
    """One line naming the first invalid spec field, e.g. ``spec.numNodes: Input should be ...``.

    For the ``Ready=False, reason InvalidSpec`` condition of input the CRD schema admitted but
    the model refuses.
    """
    first = error.errors()[0]
    where = ".".join(str(x) for x in first["loc"])
    return f"spec.{where}: {first['msg']}" if where else f"spec: {first['msg']}"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(KilnModel):
    """A status condition, shaped like ``metav1.Condition``."""

    type: str = Field(
        max_length=316,
        pattern=r"^([a-z0-9.-]+/)?[A-Za-z][A-Za-z0-9_]*$",
        description="Condition type, e.g. Ready, Running, Succeeded.",
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(default="", max_length=1024, description="CamelCase reason for the last transition.")
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    last_transition_time: str | None = Field(
        default=None,
        json_schema_extra={"format": RFC3339},
        description="When the status last changed (RFC 3339).",
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the condition was computed for."
    )


Conditions = Annotated[
    list[Condition],
    Field(
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        max_length=32,
    ),
]


class LocalObjectReference(KilnModel):
    """Reference to an object of a known kind in the same namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN, description="Object name.")


#: An ``s3://bucket[/prefix]`` URI (bucket names as S3 allows them) or an absolute path / ``file://`` URI.
STORAGE_URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|(file://)?/.*)$"


class ObjectStorage(KilnModel):
    """How pods reach the S3-compatible object store behind ``s3://`` URIs.

    Credentials reach the pods as the standard AWS SDK environment variables, so anything an AWS
    user already has works: a Secret (``secretRef``), or no Secret at all with a workload identity
    (IRSA, EKS Pod Identity) on the pods' ServiceAccount. Unset fields take the operator's defaults
    (Helm values ``artifacts.s3``).
    """

    secret_ref: LocalObjectReference | None = Field(
        default=None,
        description="Secret in this namespace whose keys become the pods' environment (envFrom): "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, and optionally AWS_SESSION_TOKEN, AWS_REGION, "
        "AWS_ENDPOINT_URL. Default: the Secret named by the operator's artifacts.s3.secretName; "
        "without either, the pods' own identity.",
    )
    endpoint: str | None = Field(
        default=None,
        max_length=1024,
        pattern=r"^https?://[^/ ]+(/.*)?$",
        description="Endpoint URL of an S3-compatible store (AWS_ENDPOINT_URL, path-style addressing), "
        "e.g. http://minio.storage.svc:9000. Default: the operator's artifacts.s3.endpoint; unset means AWS S3.",
    )
    region: str | None = Field(
        default=None,
        max_length=64,
        pattern=r"^[a-z0-9-]+$",
        description="Region (AWS_REGION). Default: the operator's artifacts.s3.region.",
    )


class PrometheusProvider(KilnModel):
    """A Prometheus server the operator queries (HTTP API, instant queries)."""

    address: str = Field(
        min_length=1,
        max_length=2048,
        pattern=r"^https?://",
        description="e.g. http://prometheus.monitoring:9090",
    )


class ResourceRequirements(KilnModel):
    """Compute resources, as core/v1 ResourceRequirements (e.g. ``nvidia.com/gpu: 8``)."""

    requests: dict[Annotated[str, Field(max_length=253)], Quantity] | None = Field(
        default=None, max_length=16, description="Minimum resources per pod."
    )
    limits: dict[Annotated[str, Field(max_length=253)], Quantity] | None = Field(
        default=None,
        max_length=16,
        description="Maximum resources per pod; extended resources (GPUs) need requests == limits.",
    )


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(KilnModel):
    """A core/v1 Toleration."""

    key: str | None = Field(
        default=None, max_length=316, description="Taint key; empty with Exists matches all."
    )
    operator: TolerationOperator | None = Field(default=None, description="Exists or Equal (default Equal).")
    value: str | None = Field(default=None, max_length=63, description="Taint value for Equal.")
    effect: TaintEffect | None = Field(default=None, description="Effect to match; empty matches all.")
    toleration_seconds: int | None = Field(
        default=None, description="For NoExecute: how long the pod stays bound after the taint appears."
    )


class EnvVar(KilnModel):
    """A plain environment variable (name and literal value)."""

    name: str = Field(
        min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", description="Variable name."
    )
    value: str = Field(default="", max_length=32768, description="Literal value.")
