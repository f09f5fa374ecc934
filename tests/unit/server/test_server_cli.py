"""kiln-serve settings (flags and env) and artifact refusal."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")

from kiln.artifact import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE, sha256_file
from kiln.server.__main__ import main
from kiln.server.settings import ENV_VARS, ServerSettings, parse_settings

from .conftest import DigitsArtifact

pytestmark = pytest.mark.torch

DIGEST = "sha256:" + "ab" * 32
REQUIRED = ["--artifact", "/a", "--digest", DIGEST, "--model-name", "digits"]


def test_defaults() -> None:
    s = parse_settings(REQUIRED, {})
    assert s == ServerSettings(artifact="/a", digest=DIGEST, model_name="digits")
    assert (s.port, s.grpc_port, s.metrics_port) == (8080, 8081, 9090)
    assert (s.port, s.metrics_port, s.max_batch_size, s.max_batch_delay_ms, s.cache_size, s.fail_rate) == (
        8080,
        9090,
        32,
        2.0,
        0,
        0.0,
    )
    assert s.max_request_bytes == 8 * 1024 * 1024


FEATURE_GROUPS = json.dumps(
    [
        {
            "name": "pixels",
            "namespace": "ns",
            "spec": {
                "entities": [{"name": "image_id"}],
                "features": [{"name": "p0", "dtype": "float32"}],
                "source": {"uri": "/data/pixels.parquet"},
                "online": {"enabled": True, "store": {"address": "redis:6379"}},
            },
        }
    ]
)


def test_everything_comes_from_the_environment_and_flags_win() -> None:
    env = {
        "KILN_ARTIFACT_URI": "file:///models/digits/3",
        "KILN_ARTIFACT_DIGEST": DIGEST,
        "KILN_MODEL_NAME": "digits",
        "KILN_MODEL_VERSION": "3",
        "KILN_PORT": "8000",
        "KILN_GRPC_PORT": "8001",
        "KILN_METRICS_PORT": "9100",
        "KILN_MAX_BATCH_SIZE": "64",
        "KILN_MAX_BATCH_DELAY_MS": "5",
        "KILN_INLINE_FORWARD_BELOW_US": "250",
        "KILN_CACHE_SIZE": "100",
        "KILN_FAIL_RATE": "0.25",
        "KILN_MAX_REQUEST_BYTES": "65536",
        "KILN_DRAIN_TIMEOUT_SECONDS": "10",
        "KILN_SHUTDOWN_DELAY_SECONDS": "3",
        "KILN_TORCH_THREADS": "2",
        "KILN_LOG_LEVEL": "DEBUG",
        "KILN_HOST": "127.0.0.1",
        "KILN_MODEL_DIR": "/var/lib/kiln/model",
        "KILN_MODEL_HOOK": "digits_hooks:Scale",
        "KILN_FEATURE_GROUPS": FEATURE_GROUPS,
    }
    assert set(env) == set(ENV_VARS.values())
    s = parse_settings([], env)
    assert s == ServerSettings(
        artifact="file:///models/digits/3",
        digest=DIGEST,
        model_name="digits",
        model_version="3",
        model_dir="/var/lib/kiln/model",
        model_hook="digits_hooks:Scale",
        host="127.0.0.1",
        port=8000,
        grpc_port=8001,
        metrics_port=9100,
        max_batch_size=64,
        max_batch_delay_ms=5.0,
        inline_forward_below_us=250.0,
        cache_size=100,
        fail_rate=0.25,
        max_request_bytes=65536,
        drain_timeout_seconds=10.0,
        shutdown_delay_seconds=3.0,
        torch_threads=2,
        log_level="DEBUG",
        feature_groups=FEATURE_GROUPS,
    )
    assert parse_settings(["--port", "7000", "--fail-rate", "0"], env).port == 7000
    assert parse_settings(["--fail-rate", "0"], env).fail_rate == 0.0


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {}, "--artifact (or KILN_ARTIFACT_URI) is required"),
        (["--artifact", "/a", "--model-name", "m"], {}, "--digest (or KILN_ARTIFACT_DIGEST) is required"),
        ([*REQUIRED[:3], "sha256:xyz", *REQUIRED[4:]], {}, "digest must look like"),
        (REQUIRED, {"KILN_PORT": "http"}, "KILN_PORT='http' is not a valid int"),
        ([*REQUIRED, "--fail-rate", "1.5"], {}, "fail rate must be in [0, 1]"),
        ([*REQUIRED, "--max-batch-size", "0"], {}, "max batch size must be >= 1"),
        ([*REQUIRED, "--inline-forward-below-us", "-1"], {}, "inline forward threshold must be >= 0 us"),
        ([*REQUIRED, "--port", "9090"], {}, "port and metrics port must differ"),
        ([*REQUIRED, "--grpc-port", "8080"], {}, "port and grpc port must differ"),
        ([*REQUIRED, "--port", "70000"], {}, "port must be in 0..65535"),
        (REQUIRED, {"KILN_FEATURE_GROUPS": "[{"}, "KILN_FEATURE_GROUPS is not JSON"),
        (
            REQUIRED,
            {"KILN_FEATURE_GROUPS": FEATURE_GROUPS.replace('"enabled": true', '"enabled": false')},
            "FeatureGroup pixels has no online store",
        ),
    ],
)
def test_invalid_settings_exit_2_with_a_message(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        parse_settings(argv, env)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def _copy(artifact: DigitsArtifact, tmp_path: Path) -> Path:
    dst = tmp_path / "artifact"
    shutil.copytree(artifact.path, dst)
    return dst


def _main(path: Path, digest: str) -> int:
    return main(
        ["--artifact", path.as_uri(), "--digest", digest, "--model-name", "digits", "--port", "0"], {}
    )


def test_digest_mismatch_is_refused(
    digits_artifact: DigitsArtifact, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _main(digits_artifact.path, "sha256:" + "0" * 64) == 1
    err = capsys.readouterr().err
    assert "refusing to serve" in err and "!= expected sha256:" + "0" * 64 in err


def test_tampered_weights_are_refused(
    digits_artifact: DigitsArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _copy(digits_artifact, tmp_path)
    with open(path / WEIGHTS_FILE, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\0\0\0")
    assert _main(path, digits_artifact.digest) == 1
    assert "weights digest" in capsys.readouterr().err


@pytest.mark.parametrize("missing", [WEIGHTS_FILE, CONFIG_FILE, METADATA_FILE])
def test_missing_files_are_refused(
    digits_artifact: DigitsArtifact, tmp_path: Path, missing: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _copy(digits_artifact, tmp_path)
    (path / missing).unlink()
    assert _main(path, digits_artifact.digest) == 1
    assert missing in capsys.readouterr().err


def test_weights_that_do_not_fit_the_config_are_refused(
    digits_artifact: DigitsArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _copy(digits_artifact, tmp_path)
    config = json.loads((path / CONFIG_FILE).read_text())
    config["hiddenSizes"] = [32, 32]
    (path / CONFIG_FILE).write_text(json.dumps(config))
    assert _main(path, digits_artifact.digest) == 1
    assert "weights do not match config.json" in capsys.readouterr().err


def test_pickle_weights_are_never_loaded(
    digits_artifact: DigitsArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pickle file under the weights name (digest matching) is refused as not safetensors."""
    import torch

    from kiln.artifact import read_metadata

    path = _copy(digits_artifact, tmp_path)
    torch.save({"x": torch.zeros(1)}, path / WEIGHTS_FILE)
    digest = sha256_file(path / WEIGHTS_FILE)
    meta = read_metadata(path).model_copy(update={"weightsDigest": digest})
    (path / METADATA_FILE).write_text(meta.model_dump_json())
    assert _main(path, digest) == 1
    assert "not a valid safetensors file" in capsys.readouterr().err
