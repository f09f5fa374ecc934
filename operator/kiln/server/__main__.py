"""``kiln-serve``: serve a Kiln artifact over the Open Inference Protocol.

An ``s3://`` artifact is first downloaded into ``--model-dir`` and verified there
(:func:`kiln.storage.fetch_artifact`); ``--fetch-only`` stops after that, which is what the
``storage-initializer`` init container of an InferenceService pod runs, so the server container
finds a verified copy and verifies it again before loading.

Exit status: 0 after a graceful shutdown (SIGTERM/SIGINT) or a successful ``--fetch-only``, 1 when
the artifact is refused (cannot be downloaded, unknown format, missing files, digest mismatch,
weights that do not fit the config, a program that does not load, holds pickled payloads or does
not fit its signature), the model hook cannot be loaded, or the FeatureGroups of
``KILN_FEATURE_GROUPS`` do not fit the model (:mod:`kiln.server.features`), 2 for invalid settings.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kiln.server.settings import parse_settings


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Parse settings, verify and load the artifact, serve until SIGTERM. Returns the exit status."""
    settings = parse_settings(argv, environ)
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("kiln.server")

    from kiln.artifact import ArtifactError
    from kiln.storage import fetch_artifact

    try:
        # Verified here only when nothing else follows; load_model verifies before loading.
        local = fetch_artifact(
            settings.artifact, Path(settings.model_dir), settings.digest, verify=settings.fetch_only
        )
    except ArtifactError as e:
        log.error("refusing to serve: %s", e)
        print(f"kiln-serve: refusing to serve artifact {settings.artifact}: {e}", file=sys.stderr)
        return 1
    if settings.fetch_only:
        log.info("artifact %s verified at %s (%s)", settings.artifact, local, settings.digest)
        return 0

    # Drop the *_created series: they double the page size and no Kiln query reads them.
    from prometheus_client import disable_created_metrics

    disable_created_metrics()
    # Heavy imports only once the settings are known to be valid.
    from kiln.server.app import serve
    from kiln.server.model import configure_torch, load_model

    configure_torch(settings.torch_threads)
    try:
        model: Any = load_model(
            local,
            settings.digest,
            name=settings.model_name,
            version=settings.model_version,
            threads=settings.torch_threads,
        )
        if settings.model_hook:
            from kiln.server.hooks import HookedModel, load_hook

            model = HookedModel(model, load_hook(settings.model_hook))
            log.info("model hook %s loaded (runs in this process, no isolation)", settings.model_hook)
    except ArtifactError as e:
        log.error("refusing to serve: %s", e)
        print(f"kiln-serve: refusing to serve artifact {settings.artifact}: {e}", file=sys.stderr)
        return 1
    # uvloop (libuv) rather than asyncio's own event loop: less CPU per request on the same
    # aiohttp and grpc.aio code (hack/bench-server).
    import uvloop

    return uvloop.run(serve(model, settings, profile_dir=local))


if __name__ == "__main__":
    sys.exit(main())
