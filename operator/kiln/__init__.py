"""Kiln: a Kubernetes operator that takes a machine-learning model from data to production.

Sub-packages (dependencies point one way: ``api`` <- ``resources`` <- ``controllers``):

- ``kiln.api``: pydantic models of the four kinds; the only source of the CRD schemas.
- ``kiln.resources``: pure builders, custom resource -> child manifests (dicts).
- ``kiln.controllers``: kopf handlers, one module per kind.
- ``kiln.registry`` / ``kiln.rollout``: pure logic used by the controllers.
- ``kiln.artifact``: the on-disk artifact format and the trainer's result protocol (no torch).
- ``kiln.trainer`` / ``kiln.server``: the code that runs in the trainer and server images (torch).
"""

__version__ = "0.1.0"

GROUP = "kiln.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
FIELD_MANAGER = "kiln"
