"""Artifact storage: ``s3://`` (any S3-compatible object store) and ``file://`` locations.

Everything that reads or writes artifacts, datasets, checkpoints or registration records goes
through this module, so the trainer, the model server, the operator and the CLI treat a bucket and
a mounted volume alike. It never imports torch.

URIs:

- ``s3://bucket/key/prefix``: an object store, through boto3 (the AWS SDK for Python; its
  ``TransferManager`` does multipart, concurrent transfers). A "directory" is a key prefix: the
  objects ``<prefix>/<relative path>``.
- ``file:///abs/path`` or a plain absolute path: a local or mounted filesystem.

Credentials and endpoint come the way S3 users already set them, read by botocore itself:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_REGION``,
``AWS_ENDPOINT_URL`` (botocore >= 1.31), or with none of them the SDK's default chain (IRSA,
EKS Pod Identity, instance roles). S3-compatible stores usually need path-style addressing
(``http://endpoint/bucket/key``): it is used whenever ``AWS_ENDPOINT_URL`` is set, else botocore's
``auto``; ``KILN_S3_ADDRESSING_STYLE`` (``path`` | ``virtual`` | ``auto``) overrides. Secrets are
never put in an error message: only bucket, key and the store's error code are.

Errors are :class:`StorageError` with a ``reason`` a status condition can carry:

==================  ==========================================================  ==========
reason              cause                                                       transient
==================  ==========================================================  ==========
ObjectNotFound      no such object / no file at that path                       no
BucketNotFound      no such bucket                                              no
AccessDenied        credentials missing, wrong, or not allowed (401/403)        no
StoreUnavailable    connection refused or reset, timeout, 5xx, throttling       yes
InvalidURI          not an ``s3://`` or ``file://`` URI                          no
==================  ==========================================================  ==========
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from pydantic import ValidationError

from kiln.artifact import (
    METADATA_FILE,
    ArtifactError,
    ArtifactMetadata,
    MissingFile,
    artifact_files,
    check_artifact,
    sha256_file,
    verify_artifact,
)
from kiln.artifact import (
    DigestMismatch as DigestMismatch,  # re-exported: raised by verify_artifact_at
)

OBJECT_NOT_FOUND = "ObjectNotFound"
BUCKET_NOT_FOUND = "BucketNotFound"
ACCESS_DENIED = "AccessDenied"
STORE_UNAVAILABLE = "StoreUnavailable"
INVALID_URI = "InvalidURI"

#: Bytes read per chunk when streaming an object through sha256.
CHUNK_BYTES = 1 << 20
ENV_ADDRESSING_STYLE = "KILN_S3_ADDRESSING_STYLE"
ENV_MAX_ATTEMPTS = "KILN_S3_MAX_ATTEMPTS"

_ACCESS_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
    "AccountProblem",
    "401",
    "403",
}
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"}


class StorageError(ArtifactError):
    """A storage operation failed; ``reason`` is one of the module's reasons (see its docstring).

    ``transient`` is True when retrying later can succeed (the store was unreachable or busy).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def transient(self) -> bool:
        return self.reason == STORE_UNAVAILABLE


@dataclass(frozen=True)
class Location:
    """A parsed storage URI: ``scheme`` ``s3`` (bucket + key prefix) or ``file`` (absolute path).

    For ``s3`` the key has no leading or trailing ``/``; for ``file`` ``key`` is the absolute path
    and ``bucket`` is empty.
    """

    scheme: str
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        """The canonical URI (``s3://bucket/key`` or ``file:///path``)."""
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"
        return Path(self.key).as_uri()

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def path(self) -> Path:
        """The local path of a ``file`` location.

        Raises:
            StorageError: InvalidURI for an ``s3`` location.
        """
        if not self.is_local:
            raise StorageError(INVALID_URI, f"{self.uri} is not a local path")
        return Path(self.key)

    @property
    def name(self) -> str:
        """Last path segment."""
        return PurePosixPath(self.key).name

    def join(self, *parts: str) -> Location:
        """The location ``parts`` below this one (``'a/b'`` segments allowed; no ``..``)."""
        clean = [p.strip("/") for p in parts if p.strip("/")]
        if not clean:
            return self
        rel = PurePosixPath(*clean)
        if ".." in rel.parts:
            raise StorageError(INVALID_URI, f"'..' is not allowed below {self.uri}")
        if self.scheme == "s3":
            return Location("s3", self.bucket, f"{self.key}/{rel}" if self.key else str(rel))
        return Location("file", self.bucket, str(PurePosixPath(self.key) / rel))

    def parent(self) -> Location:
        """The enclosing directory (prefix)."""
        return Location(self.scheme, self.bucket, str(PurePosixPath(self.key).parent).lstrip("."))

    def __str__(self) -> str:
        return self.uri


def parse(uri: str | Location) -> Location:
    """Parse ``s3://bucket[/prefix]``, ``file:///abs/path`` or an absolute path.

    Raises:
        StorageError: InvalidURI for another scheme, an s3 URI without a bucket, or a relative
            path.
    """
    if isinstance(uri, Location):
        return uri
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(INVALID_URI, f"{uri!r}: an s3:// URI needs a bucket (s3://bucket/prefix)")
        return Location("s3", parsed.netloc, parsed.path.strip("/"))
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme else uri
        if not path.startswith("/"):
            raise StorageError(INVALID_URI, f"{uri!r}: a file location must be an absolute path")
        return Location("file", "", str(PurePosixPath(path)))
    raise StorageError(
        INVALID_URI, f"unsupported storage URI scheme {parsed.scheme!r} in {uri!r}; use s3:// or file://"
    )


def is_remote(uri: str) -> bool:
    """True for an ``s3://`` URI."""
    return urlparse(uri).scheme == "s3"


# --- S3 client ------------------------------------------------------------------------------

_client_lock = threading.Lock()
_clients: dict[tuple[str, ...], Any] = {}


def _client_key() -> tuple[str, ...]:
    names = (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_PROFILE",
        ENV_ADDRESSING_STYLE,
        ENV_MAX_ATTEMPTS,
    )
    return tuple(os.environ.get(n, "") for n in names)


def addressing_style(environ: dict[str, str] | None = None) -> str:
    """``path`` when a custom endpoint is configured (S3-compatible stores), else ``auto``;
    ``KILN_S3_ADDRESSING_STYLE`` overrides."""
    env = os.environ if environ is None else environ
    explicit = env.get(ENV_ADDRESSING_STYLE, "").strip().lower()
    if explicit in ("path", "virtual", "auto"):
        return explicit
    return "path" if (env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3")) else "auto"


def s3_client() -> Any:
    """A boto3 S3 client configured from the environment (cached; boto3 clients are thread-safe).

    botocore's ``standard`` retry mode retries throttling, 5xx and connection errors with
    exponential back-off (``KILN_S3_MAX_ATTEMPTS``, default 3 attempts); timeouts are 10 s to
    connect and 60 s per read.
    """
    key = _client_key()
    with _client_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            attempts = int(os.environ.get(ENV_MAX_ATTEMPTS, "3") or 3)
            config = Config(
                s3={"addressing_style": addressing_style()},
                signature_version="s3v4",
                retries={"mode": "standard", "max_attempts": max(1, attempts)},
                connect_timeout=10,
                read_timeout=60,
                # Only checksum when the operation requires it: several S3-compatible stores
                # reject the CRC32 trailers botocore >= 1.36 sends by default.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
            client = boto3.session.Session().client("s3", config=config, region_name=region)
            _clients.clear()
            _clients[key] = client
        return client


def _translate(e: BaseException, loc: Location, what: str) -> StorageError:
    """Map a botocore exception to a :class:`StorageError` naming the bucket/key."""
    from botocore import exceptions as bx

    where = loc.uri
    if isinstance(e, bx.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code == "NoSuchBucket":
            return StorageError(BUCKET_NOT_FOUND, f"{what} {where}: bucket {loc.bucket!r} does not exist")
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            return StorageError(OBJECT_NOT_FOUND, f"{what} {where}: no such object")
        if code in _ACCESS_CODES or status in (401, 403):
            return StorageError(
                ACCESS_DENIED, f"{what} {where}: access denied by the store ({code or status})"
            )
        if code in _TRANSIENT_CODES or status >= 500:
            return StorageError(STORE_UNAVAILABLE, f"{what} {where}: store error {code or status}")
        return StorageError(STORE_UNAVAILABLE, f"{what} {where}: store error {code or status}")
    if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError):
        return StorageError(
            ACCESS_DENIED,
            f"{what} {where}: no S3 credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, e.g. "
            "from a Secret, or give the pod a workload identity)",
        )
    if isinstance(e, bx.BotoCoreError | OSError):
        return StorageError(STORE_UNAVAILABLE, f"{what} {where}: store unreachable: {type(e).__name__}: {e}")
    return StorageError(STORE_UNAVAILABLE, f"{what} {where}: {type(e).__name__}: {e}")


@contextlib.contextmanager
def _s3_errors(loc: Location, what: str) -> Iterator[None]:
    from botocore import exceptions as bx

    try:
        yield
    except StorageError:
        raise
    except (bx.ClientError, bx.BotoCoreError, OSError) as e:
        err = _translate(e, loc, what)
        if err.reason == OBJECT_NOT_FOUND and loc.bucket and _bucket_missing(loc.bucket):
            err = StorageError(BUCKET_NOT_FOUND, f"{what} {loc.uri}: bucket {loc.bucket!r} does not exist")
        raise err from e


def _bucket_missing(bucket: str) -> bool:
    """HEAD answers a bare 404 for a missing key and a missing bucket alike; tell them apart."""
    from botocore import exceptions as bx

    try:
        s3_client().head_bucket(Bucket=bucket)
    except bx.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchBucket", "NotFound")
    except bx.BotoCoreError:
        return False
    return False


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    # 8 MiB parts, 8 threads: boto3's defaults, written down so a change of defaults is visible.
    return TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=8)


# --- operations -----------------------------------------------------------------------------


def _local_errors(loc: Location, what: str, e: OSError) -> StorageError:
    if isinstance(e, FileNotFoundError | NotADirectoryError):
        return StorageError(OBJECT_NOT_FOUND, f"{what} {loc.uri}: no such file")
    if isinstance(e, PermissionError):
        return StorageError(ACCESS_DENIED, f"{what} {loc.uri}: permission denied")
    return StorageError(STORE_UNAVAILABLE, f"{what} {loc.uri}: {e}")


def read_bytes(uri: str | Location) -> bytes:
    """The whole content of one object or file.

    Raises:
        StorageError: see the module docstring.
    """
    loc = parse(uri)
    if loc.is_local:
        try:
            return loc.path.read_bytes()
        except OSError as e:
            raise _local_errors(loc, "read", e) from e
    with _s3_errors(loc, "read"):
        return bytes(s3_client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read())


def write_bytes(uri: str | Location, data: bytes) -> None:
    """Write one object or file whole (atomically: a reader sees the old or the new content).

    Raises:
        StorageError: see the module docstring.
    """
    loc = parse(uri)
    if loc.is_local:
        try:
            _atomic_write_local(loc.path, data)
        except OSError as e:
            raise _local_errors(loc, "write", e) from e
        return
    with _s3_errors(loc, "write"):
        s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data)


def _atomic_write_local(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD (or stat) says of one object: size in bytes and an opaque version tag
    (the S3 ETag, or ``<mtime_ns>-<inode>`` of a file) that changes when the content is replaced."""

    size: int
    tag: str


def stat(uri: str | Location) -> ObjectInfo:
    """Size and version tag of one object or file.

    Raises:
        StorageError: ObjectNotFound when it does not exist; see the module docstring.
    """
    loc = parse(uri)
    if loc.is_local:
        try:
            st = loc.path.stat()
        except OSError as e:
            raise _local_errors(loc, "stat", e) from e
        if not loc.path.is_file():
            raise StorageError(OBJECT_NOT_FOUND, f"stat {loc.uri}: not a file")
        return ObjectInfo(st.st_size, f"{st.st_mtime_ns}-{st.st_ino}")
    with _s3_errors(loc, "stat"):
        head = s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
    return ObjectInfo(int(head.get("ContentLength", 0)), str(head.get("ETag", "")))


def exists(uri: str | Location) -> bool:
    """Whether one object or file exists.

    Raises:
        StorageError: for anything but "not found" (a missing bucket is an error, not False).
    """
    try:
        stat(uri)
    except StorageError as e:
        if e.reason == OBJECT_NOT_FOUND:
            return False
        raise
    return True


def sha256(uri: str | Location) -> str:
    """``'sha256:<hex>'`` of one object or file, streamed in :data:`CHUNK_BYTES` chunks.

    Raises:
        StorageError: see the module docstring.
    """
    loc = parse(uri)
    if loc.is_local:
        try:
            return sha256_file(loc.path, CHUNK_BYTES)
        except OSError as e:
            raise _local_errors(loc, "read", e) from e
    h = hashlib.sha256()
    with _s3_errors(loc, "read"):
        body = s3_client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
        for chunk in body.iter_chunks(CHUNK_BYTES):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def list_files(uri: str | Location) -> list[str]:
    """Relative paths (``/``-separated, sorted) of every object or file below a directory/prefix.

    A prefix with no objects below it (or a missing directory) gives an empty list.

    Raises:
        StorageError: see the module docstring (a missing bucket is BucketNotFound).
    """
    loc = parse(uri)
    if loc.is_local:
        root = loc.path
        if not root.is_dir():
            return []
        try:
            return sorted(str(p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file())
        except OSError as e:
            raise _local_errors(loc, "list", e) from e
    prefix = f"{loc.key}/" if loc.key else ""
    out: list[str] = []
    with _s3_errors(loc, "list"):
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix)
        for page in pages:
            out.extend(o["Key"][len(prefix) :] for o in page.get("Contents", []))
    return sorted(k for k in out if k and not k.endswith("/"))


def download_file(uri: str | Location, dest: Path) -> None:
    """Copy one object or file to ``dest`` (written under a temporary name, then renamed).

    Raises:
        StorageError: see the module docstring.
    """
    loc = parse(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.part"
    try:
        if loc.is_local:
            try:
                shutil.copyfile(loc.path, tmp)
            except OSError as e:
                raise _local_errors(loc, "download", e) from e
        else:
            with _s3_errors(loc, "download"):
                s3_client().download_file(loc.bucket, loc.key, str(tmp), Config=_transfer_config())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download_dir(uri: str | Location, dest: Path) -> list[str]:
    """Copy every object below a prefix (or every file below a directory) into ``dest``.

    Returns:
        The relative paths copied (empty when there was nothing below ``uri``).
    Raises:
        StorageError: see the module docstring.
    """
    loc = parse(uri)
    files = list_files(loc)
    for rel in files:
        download_file(loc.join(rel), dest / rel)
    return files


def upload_file(src: Path, uri: str | Location) -> None:
    """Copy one local file to an object or file location (multipart for large files).

    Raises:
        StorageError: see the module docstring.
    """
    loc = parse(uri)
    if loc.is_local:
        try:
            loc.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = loc.path.parent / f".{loc.path.name}.{uuid.uuid4().hex[:8]}.part"
            shutil.copyfile(src, tmp)
            os.replace(tmp, loc.path)
        except OSError as e:
            raise _local_errors(loc, "upload", e) from e
        return
    with _s3_errors(loc, "upload"):
        s3_client().upload_file(str(src), loc.bucket, loc.key, Config=_transfer_config())


def upload_dir(src: Path, uri: str | Location, *, last: Sequence[str] = ()) -> list[str]:
    """Copy every file below local directory ``src`` to the prefix/directory ``uri``.

    The files named in ``last`` (relative paths) are copied after all others, so a reader that
    waits for them (e.g. ``metadata.json`` of an artifact) never sees a partial directory: object
    stores have no rename, so "complete" is "its last file exists".

    Returns:
        The relative paths copied, in the order copied.
    Raises:
        StorageError: see the module docstring.
    """
    loc = parse(uri)
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    ordered = [f for f in files if f not in last] + [f for f in last if f in files]
    for rel in ordered:
        upload_file(src / rel, loc.join(rel))
    return ordered


def delete_file(uri: str | Location) -> None:
    """Delete one object or file; nothing happens when it does not exist.

    Raises:
        StorageError: see the module docstring (a missing bucket is BucketNotFound).
    """
    loc = parse(uri)
    if loc.is_local:
        try:
            loc.path.unlink(missing_ok=True)
        except OSError as e:
            raise _local_errors(loc, "delete", e) from e
        return
    with _s3_errors(loc, "delete"):
        s3_client().delete_object(Bucket=loc.bucket, Key=loc.key)


def delete_tree(uri: str | Location) -> int:
    """Delete every object below a prefix (or a local directory tree). Returns how many.

    Raises:
        StorageError: see the module docstring.
    """
    loc = parse(uri)
    if loc.is_local:
        if not loc.path.exists():
            return 0
        n = sum(1 for p in loc.path.rglob("*") if p.is_file())
        shutil.rmtree(loc.path, ignore_errors=True)
        return n
    files = list_files(loc)
    client = s3_client()
    with _s3_errors(loc, "delete"):
        for i in range(0, len(files), 1000):  # DeleteObjects takes at most 1,000 keys
            batch = [{"Key": loc.join(rel).key} for rel in files[i : i + 1000]]
            client.delete_objects(Bucket=loc.bucket, Delete={"Objects": batch, "Quiet": True})
    return len(files)


# --- artifacts ------------------------------------------------------------------------------


def read_artifact_metadata(uri: str | Location) -> ArtifactMetadata:
    """``metadata.json`` of the artifact directory/prefix at ``uri``.

    Raises:
        StorageError: the file cannot be read (ObjectNotFound when the artifact is absent).
        ArtifactError: it is not valid metadata.
    """
    loc = parse(uri)
    raw = read_bytes(loc.join(METADATA_FILE))
    try:
        return ArtifactMetadata.model_validate_json(raw)
    except ValidationError as e:
        raise ArtifactError(f"artifact metadata {loc.join(METADATA_FILE)} is invalid: {e}") from e


def verify_artifact_at(uri: str | Location, expected_digest: str | None = None) -> ArtifactMetadata:
    """Check the artifact at ``uri`` in place with :func:`kiln.artifact.check_artifact`.

    Works on a bucket prefix as on a directory: every file the metadata lists (the model file,
    ``config.json`` of a ``kiln-mlp`` artifact, the rest of ``files``) is streamed through sha256
    (nothing is written locally) and compared with the metadata, the model file also with
    ``expected_digest`` (when given). Object stores' own checksums are not used: S3's stored
    SHA-256 of a multipart upload is a checksum of part checksums, not of the file, and
    S3-compatible stores may not keep one at all.

    Returns:
        The artifact's metadata.
    Raises:
        StorageError: ObjectNotFound names the missing file (``metadata.json`` or one it
            requires); any other store error as in the module docstring.
        DigestMismatch: a file does not match (named).
        ArtifactError: invalid or inconsistent metadata; UnknownFormat for an unknown format.
    """
    loc = parse(uri)
    meta = read_artifact_metadata(loc)
    try:
        return check_artifact(
            meta,
            where=loc.uri,
            exists=lambda f: exists(loc.join(f)),
            digest_of=lambda f: sha256(loc.join(f)),
            expected_digest=expected_digest,
        )
    except MissingFile as e:
        raise StorageError(OBJECT_NOT_FOUND, str(e)) from e


class VerificationCache:
    """Remembers artifacts that verified, so a store is read whole once per object version.

    An entry is keyed by ``(uri, digest)`` and holds the :class:`ObjectInfo` (size and ETag /
    mtime+inode) of ``metadata.json`` and of every file it lists, taken before they were hashed;
    :meth:`verify` re-reads only when a HEAD shows one changed (one HEAD per file). Thread-safe.
    Bounded: the oldest entries go past ``max_entries``.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self._lock = threading.Lock()
        self._ok: dict[tuple[str, str], tuple[tuple[ObjectInfo, ...], ArtifactMetadata]] = {}
        self._max = max_entries

    @staticmethod
    def _infos(loc: Location, meta: ArtifactMetadata) -> tuple[ObjectInfo, ...] | None:
        """HEADs of ``metadata.json`` and the files ``meta`` lists; None when one is missing or
        the format is unknown (then :func:`verify_artifact_at` says what is wrong)."""
        try:
            files = [METADATA_FILE, *artifact_files(meta)]
            return tuple(stat(loc.join(f)) for f in files)
        except ArtifactError as e:
            if isinstance(e, StorageError) and e.reason != OBJECT_NOT_FOUND:
                raise
            return None

    def verify(self, uri: str, digest: str) -> ArtifactMetadata:
        """:func:`verify_artifact_at` with the cache in front (same errors)."""
        loc = parse(uri)
        with self._lock:
            hit = self._ok.get((loc.uri, digest))
        if hit is not None and self._infos(loc, hit[1]) == hit[0]:
            return hit[1]
        try:  # the files' state before hashing: a file replaced meanwhile is re-read next time
            infos = self._infos(loc, read_artifact_metadata(loc))
        except ArtifactError as e:
            if isinstance(e, StorageError) and e.reason != OBJECT_NOT_FOUND:
                raise
            infos = None
        meta = verify_artifact_at(loc, digest)
        if infos is not None and len(infos) == 1 + len(artifact_files(meta)):
            with self._lock:
                self._ok[(loc.uri, digest)] = (infos, meta)
                while len(self._ok) > self._max:
                    self._ok.pop(next(iter(self._ok)))
        return meta


def fetch_artifact(
    uri: str | Location, cache_dir: Path, expected_digest: str, *, verify: bool = True
) -> Path:
    """A local copy of the artifact at ``uri``; returns its directory.

    A ``file://`` artifact is used where it is (nothing copied). An ``s3://`` artifact is
    downloaded into ``cache_dir/<digest hex>/`` (assembled under a temporary name, renamed when
    complete, and only once its weights hash to ``expected_digest`` and to the metadata's digest,
    so nothing unverified is ever found there later); a copy already there from an earlier start
    of the same pod is reused, re-verified with ``verify``. A ``file://`` artifact is verified in
    place with ``verify``; without it the caller verifies (the model server does, when it loads).

    Raises:
        StorageError: the artifact cannot be read from the store.
        ArtifactError: it is incomplete or its digest does not match.
    """
    loc = parse(uri)
    if loc.is_local:
        d = loc.path
        if not d.is_dir():
            raise StorageError(OBJECT_NOT_FOUND, f"artifact directory {d} does not exist")
        if verify:
            verify_artifact(d, expected_digest)
        return d
    final = cache_dir / expected_digest.split(":", 1)[-1]
    if final.is_dir():
        if verify:
            verify_artifact(final, expected_digest)
        return final
    tmp = cache_dir / f".download-{uuid.uuid4().hex[:8]}"
    try:
        if not download_dir(loc, tmp):
            raise StorageError(OBJECT_NOT_FOUND, f"artifact {loc.uri}: no objects under this prefix")
        try:  # a copy is renamed into place only once it verified
            verify_artifact(tmp, expected_digest)
        except ArtifactError as e:
            raise ArtifactError(f"artifact {loc.uri} (downloaded): {str(e).replace(str(tmp), '.')}") from e
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
