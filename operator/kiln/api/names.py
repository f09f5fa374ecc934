"""Admission rules on ``metadata.name`` for kinds whose children take their names from it.

The API server already holds a custom resource's name to a DNS-1123 subdomain: lowercase
letters, digits, '-' and '.', at most 253 characters, starting and ending with a letter or digit.
Children derived from the name need more
(https://kubernetes.io/docs/concepts/overview/working-with-objects/names/):

- a Service name is a DNS-1035 label: at most 63 characters, no '.', starting with a letter;
- a pod's ``hostname`` and ``subdomain`` are DNS-1123 labels: at most 63 characters, no '.';
- a label value (children carry ``kiln.dev/<kind>: <name>``) is at most 63 characters;
- a CronJob name is at most 52 characters (its Jobs append an 11-character suffix).

The rules are CEL ``x-kubernetes-validations`` at the root of the CRD schema, where
``self.metadata.name`` is accessible, and each message says what is wrong and the limit. The
messages are static: a ``messageExpression`` quoting the actual length (``string(int)``
concatenated) is estimated far over the CRD's CEL cost budget, and the API server refuses the
CRD (measured on kube-apiserver 1.35). They
are checked on create only (``optionalOldSelf``: ``oldSelf`` has no value then). A name never
changes, and an object stored before a rule existed must stay updatable: status writes and
finalizer removal (deletion) are updates too.
"""

from __future__ import annotations

from typing import Any

#: Longest DNS label (RFC 1035 / RFC 1123), e.g. a Service name, a pod hostname, a label value.
DNS_LABEL_MAX = 63
#: Longest CronJob name (the CronJob controller appends ``-<11 digits>`` to name its Jobs).
CRONJOB_NAME_MAX = 52
NAME = "self.metadata.name"


def on_create(rule: str, message: str) -> dict[str, Any]:
    """A root ``x-kubernetes-validations`` entry checked when the object is created, never after.

    Its errors name the field ``metadata.name`` (the CRD declares it, see :mod:`kiln.api.crd`).
    """
    return {
        "rule": f"oldSelf.hasValue() || ({rule})",
        "message": message,
        "fieldPath": ".metadata.name",
        "optionalOldSelf": True,
    }


def starts_with_letter(kind: str, purpose: str) -> dict[str, Any]:
    """The name starts with a lowercase letter (DNS-1035), because it names ``purpose``."""
    return on_create(
        f"{NAME}.matches('^[a-z]')",
        f"{kind} name must start with a lowercase letter (a DNS-1035 label): it names {purpose}",
    )


def no_dots(kind: str, purpose: str) -> dict[str, Any]:
    """The name has no '.', so that it is a DNS label and not only a subdomain."""
    return on_create(
        f"!{NAME}.contains('.')",
        f"{kind} name must not contain '.' (a DNS label): it names {purpose}",
    )


def max_length(kind: str, limit: int, purpose: str) -> dict[str, Any]:
    """The name has at most ``limit`` characters."""
    return on_create(
        f"{NAME}.size() <= {limit}", f"{kind} name must be at most {limit} characters: it names {purpose}"
    )


def dns1035_label(kind: str, purpose: str) -> tuple[dict[str, Any], ...]:
    """The name is a DNS-1035 label (e.g. it names a Service): a letter first, no '.', <= 63."""
    return (
        starts_with_letter(kind, purpose),
        no_dots(kind, purpose),
        max_length(kind, DNS_LABEL_MAX, purpose),
    )
