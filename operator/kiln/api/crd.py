"""Generate CustomResourceDefinitions from the pydantic models.

The API server accepts only *structural* OpenAPI v3 schemas
(https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#specifying-a-structural-schema),
while pydantic emits JSON Schema 2020-12. :func:`to_structural` bridges the two:

- ``$ref``/``$defs`` are inlined (the API server has no references);
- ``anyOf: [X, {type: null}]`` (an ``Optional``) becomes ``X`` with ``nullable: true`` dropped:
  Kubernetes omits absent fields rather than storing null, so optional fields simply are not
  ``required``;
- numeric ``exclusiveMinimum``/``exclusiveMaximum`` become OpenAPI 3.0's boolean form;
- ``title``, ``examples`` and ``default: null`` are dropped; ``additionalProperties: false``
  (pydantic's ``extra="forbid"``) is dropped because the API server prunes unknown fields;
- ``const`` becomes a one-element ``enum``;
- below a node marked ``x-kiln-template`` (another kind's spec embedded as a template, e.g. a
  Model's retraining TrainingJob template) the transition rules (those using ``oldSelf``, such as
  "image is immutable") are dropped: they guard the other kind's objects, not the template.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from kiln import GROUP, VERSION
from kiln.api import KINDS, Kind
from kiln.api.model import TEMPLATE_MARK

_DROP = {"title", "examples", "discriminator", "$schema", "propertyNames"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            target = copy.deepcopy(defs[name])
            extra = {k: v for k, v in node.items() if k != "$ref"}
            return _resolve(_merge(target, extra), defs)
        return {k: _resolve(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_resolve(x, defs) for x in node]
    return node


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``over``; CEL rule lists are concatenated, not replaced."""
    out = dict(base)
    for k, v in over.items():
        if k == "x-kubernetes-validations" and k in out:
            out[k] = [*out[k], *v]
        else:
            out[k] = v
    return out


def _is_null(s: Any) -> bool:
    return isinstance(s, dict) and s.get("type") == "null"


def _without_transition_rules(node: Any) -> Any:
    """``node`` with every CEL rule that uses ``oldSelf`` removed, at any depth."""
    if isinstance(node, list):
        return [_without_transition_rules(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "x-kubernetes-validations":
            kept = [r for r in v if "oldSelf" not in r.get("rule", "")]
            if kept:
                out[k] = kept
        else:
            out[k] = _without_transition_rules(v)
    return out


def _clean(node: Any) -> Any:
    if isinstance(node, list):
        return [_clean(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if node.pop(TEMPLATE_MARK, False):
        return _without_transition_rules(_clean(node))
    # Optional[X] -> X
    for key in ("anyOf", "oneOf"):
        if key in node and any(_is_null(s) for s in node[key]):
            rest = [s for s in node[key] if not _is_null(s)]
            node.pop(key)
            if len(rest) == 1:
                node = _merge(rest[0], node)  # the field's description/default/rules win
            else:
                node[key] = rest
    for k in _DROP:
        node.pop(k, None)
    if node.get("default", 0) is None:
        node.pop("default")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in node and not isinstance(node[key], bool):
            node["minimum" if key == "exclusiveMinimum" else "maximum"] = node[key]
            node[key] = True
    if node.get("additionalProperties") is False:
        node.pop("additionalProperties")
    if node.get("x-kubernetes-preserve-unknown-fields") and node.get("additionalProperties") is True:
        # `additionalProperties: true` means "values of any schema", and the API server then
        # prunes every field below them ({hostPath: {path: ...}} became {hostPath: {}}):
        # preserve-unknown-fields alone keeps the whole free-form object.
        node.pop("additionalProperties")
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
    if "enum" in node and "type" not in node:
        node["type"] = "string" if all(isinstance(v, str) for v in node["enum"]) else node.get("type")
    if "properties" in node and "type" not in node:
        node["type"] = "object"
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k == "properties":
            out[k] = {pk: _clean(pv) for pk, pv in v.items()}
        elif isinstance(v, dict | list) and not k.startswith("x-kubernetes-validations"):
            out[k] = _clean(v)
        else:
            out[k] = v
    return out


def to_structural(model: type) -> dict[str, Any]:
    """Structural OpenAPI v3 schema of a pydantic model (camelCase aliases).

    Returns:
        A JSON-compatible dict suitable for ``openAPIV3Schema`` sub-trees.
    Raises:
        KeyError: when a ``$ref`` names a definition pydantic did not emit (a bug).
    """
    raw = model.model_json_schema(by_alias=True, mode="validation")  # type: ignore[attr-defined]
    defs = raw.get("$defs", {})
    return _clean(_resolve(raw, defs))


def root_rules(kind: Kind) -> list[dict[str, Any]]:
    """CEL rules of the whole object (e.g. on ``metadata.name``, see :mod:`kiln.api.names`),
    declared on the kind's resource model with ``with_rules``."""
    rules: list[dict[str, Any]] = to_structural(kind.resource).get("x-kubernetes-validations", [])
    return rules


def crd_for(kind: Kind) -> dict[str, Any]:
    """The CustomResourceDefinition (apiextensions.k8s.io/v1) of one kind."""
    spec_schema = to_structural(kind.spec)
    status_schema = to_structural(kind.status)
    status_schema["description"] = f"Observed state of the {kind.kind}, written by the operator."
    top: dict[str, Any] = {
        "type": "object",
        "description": (kind.resource.__doc__ or kind.kind).strip().splitlines()[0],
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "kiln.dev/v1alpha1"},
            "kind": {"type": "string", "description": kind.kind},
            # Only name and generateName may be declared; declaring them lets root rules on the
            # name report fieldPath metadata.name.
            "metadata": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "generateName": {"type": "string"}},
            },
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    if rules := root_rules(kind):
        top["x-kubernetes-validations"] = rules
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": kind.crd_name,
            "labels": {"app.kubernetes.io/part-of": "kiln"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": list(kind.short_names),
                "categories": ["kiln"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(c) for c in kind.printer_columns],
                    "schema": {"openAPIV3Schema": top},
                }
            ],
        },
    }


def render(kind: Kind) -> str:
    """YAML text of one CRD, with a header saying it is generated."""
    header = "# Generated by hack/gen-crds from kiln.api; do not edit by hand.\n"
    return header + yaml.safe_dump(crd_for(kind), sort_keys=False, width=120)


def all_crds() -> dict[str, str]:
    """File name -> YAML text for every kind (``<group>_<plural>.yaml``, as controller-gen names them)."""
    return {f"{GROUP}_{k.plural}.yaml": render(k) for k in KINDS}
