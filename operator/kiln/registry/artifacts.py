"""The registry's artifact-store I/O: verifying versions and keeping registration records.

Beside the pure registry logic (as ``rollout/prometheus.py`` sits beside the pure analysis), this
module is the registry's only client of the artifact store, used by the Model controller, the
TrainingJob controller (through registration) and the ``kiln`` CLI alike. It never talks to the
API server. Artifacts live in an object store (``s3://``) or on a mounted volume (``file://``);
both go through :mod:`kiln.storage`.

Verification streams the weights through sha256 once per object version and remembers the
result (:class:`kiln.storage.VerificationCache`); later checks cost one HEAD request, which also
notices an object replaced under the same key.
"""

from __future__ import annotations

import logging
import threading

from kiln import storage
from kiln.api.model import ModelVersion
from kiln.artifact import METADATA_FILE, ArtifactError, ArtifactMetadata
from kiln.registry import record
from kiln.registry.stages import ARTIFACT_INVALID, ARTIFACT_MISSING, DIGEST_MISMATCH, Problem

log = logging.getLogger("kiln.registry")

#: The store could not be reached (or answered 5xx): retry later; nothing is decided on it.
STORE_UNAVAILABLE = storage.STORE_UNAVAILABLE
#: Store errors that are reported under their own reason (the rest map to ArtifactMissing).
_STORE_REASONS = {storage.BUCKET_NOT_FOUND, storage.ACCESS_DENIED, storage.STORE_UNAVAILABLE}

_verified = storage.VerificationCache()


def verify(artifact_uri: str, digest: str) -> tuple[ArtifactMetadata | None, Problem | None]:
    """Verify the artifact at ``artifact_uri`` (``s3://`` or ``file://``) against ``digest``.

    Returns:
        ``(metadata, None)`` when it verifies, else ``(None, Problem)`` with reason
        ArtifactMissing (no such prefix/directory, or a file its metadata requires: model
        file, config.json of kiln-mlp, any file in ``files``; or a bad URI), ArtifactInvalid
        (unreadable or inconsistent metadata.json, unknown ``format``), DigestMismatch (the
        model file differs from ``digest`` or any file from its digest in metadata.json; the
        message names the file), or the store's own reason
        BucketNotFound / AccessDenied / StoreUnavailable (the last one transient). Messages name
        the bucket and key (or path), never credentials.
    """
    try:
        return _verified.verify(artifact_uri, digest), None
    except storage.StorageError as e:
        return None, _store_problem(e)
    except storage.DigestMismatch as e:
        return None, Problem(DIGEST_MISMATCH, str(e))
    except ArtifactError as e:
        return None, Problem(ARTIFACT_INVALID, str(e))


def _store_problem(e: storage.StorageError) -> Problem:
    return Problem(e.reason if e.reason in _STORE_REASONS else ARTIFACT_MISSING, str(e))


class Checker:
    """``registry.Check`` over :func:`verify`, remembering results for one reconcile."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], tuple[ArtifactMetadata | None, Problem | None]] = {}

    def verify(self, artifact_uri: str, digest: str) -> tuple[ArtifactMetadata | None, Problem | None]:
        key = (artifact_uri, digest)
        if key not in self._cache:
            self._cache[key] = verify(artifact_uri, digest)
        return self._cache[key]

    def __call__(self, v: ModelVersion) -> Problem | None:
        return self.verify(v.artifact_uri, v.digest)[1]


# --- registration records ------------------------------------------------------------------

_recorded: set[tuple[str, str, int, str]] = set()  # (namespace, model, version, digest) known written
_record_lock = threading.Lock()


def _reachable(loc: storage.Location) -> bool:
    """Whether the artifact is there to write a record next to: a local directory must exist here
    (the store may not be mounted in this pod); in an object store, where a prefix exists as long
    as any object under it does, its ``metadata.json`` must (a record written after the artifact
    was deleted would make a lone object that claims a number).

    Raises:
        storage.StorageError: the store could not answer.
    """
    if loc.is_local:
        return loc.path.is_dir()
    return storage.exists(loc.join(METADATA_FILE))


def write_record(
    namespace: str,
    model: str,
    entry: ModelVersion,
    *,
    model_uid: str | None = None,
    registered_at: str,
    at: str | None = None,
) -> bool:
    """Write (or update) ``<artifact>/kiln-registration.json`` for this version.

    Best effort: returns False, logging why, when the artifact is not on a store reachable from
    here or the record cannot be written; the version stays registered either way and a later
    reconcile tries again (:func:`backfill_records`).

    Args:
        registered_at: RFC 3339 time to record (kept from an existing record of the same number).
        at: where the artifact is reachable from here, when that differs from its URI (a volume
            mounted at another path, as for ``kiln registry rebuild --artifacts``).
    """
    try:
        loc = storage.parse(at or entry.artifact_uri)
        reachable = _reachable(loc)
    except storage.StorageError as e:
        log.warning("no registration record for %s/%s v%d now: %s", namespace, model, entry.version, e)
        return False
    if not reachable:
        log.info(
            "artifact %s not mounted here; no registration record for %s/%s v%d",
            loc,
            namespace,
            model,
            entry.version,
        )
        return False
    rec = loc.join(record.RECORD_FILE)
    with _record_lock:
        try:
            current = _read_record(rec)
            reg = record.Registration(
                namespace=namespace,
                model=model,
                model_uid=model_uid,
                registered_at=registered_at,
                version=entry,
            )
            if current is not None and (old := current.find(namespace, model)) is not None:
                if old.version == entry and old.model_uid == model_uid:
                    _recorded.add((namespace, model, entry.version, entry.digest))
                    return True
                if old.version.version == entry.version:
                    reg.registered_at = old.registered_at
            storage.write_bytes(rec, record.dumps(record.upsert(current, reg)).encode())
        except storage.StorageError as e:
            log.warning("could not write registration record %s: %s", rec, e)
            return False
        _recorded.add((namespace, model, entry.version, entry.digest))
        return True


def _read_record(rec: storage.Location) -> record.RegistrationRecord | None:
    """The record at ``rec``; None when there is none or it is unreadable (then replaced).

    Raises:
        storage.StorageError: the store failed for another reason than "no such object".
    """
    try:
        return record.parse(storage.read_bytes(rec))
    except storage.StorageError as e:
        if e.reason == storage.OBJECT_NOT_FOUND:
            return None
        raise
    except record.RecordError as e:
        log.warning("replacing unreadable registration record %s: %s", rec, e)
        return None


def backfill_records(
    namespace: str, model: str, uid: str | None, versions: list[ModelVersion], *, now: str
) -> None:
    """Write the records missing for kept versions (e.g. lost to a crash, or to a store outage,
    right after registration). Versions already known written in this process cost nothing."""
    for v in versions:
        if (namespace, model, v.version, v.digest) in _recorded:
            continue
        try:
            loc = storage.parse(v.artifact_uri)
            if not _reachable(loc):
                continue
            current = _read_record(loc.join(record.RECORD_FILE))
        except storage.StorageError:
            continue  # unreachable now: the next reconcile tries again
        reg = current.find(namespace, model) if current else None
        if reg is not None and reg.version.version == v.version and reg.version.digest == v.digest:
            _recorded.add((namespace, model, v.version, v.digest))
            continue
        write_record(namespace, model, v, model_uid=uid, registered_at=now)
