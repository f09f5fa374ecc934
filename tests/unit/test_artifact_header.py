"""The safetensors header reader of kiln.artifact (no torch) and the FAULT INJECTION entry."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from kiln.artifact import (
    FAULT_INJECTION_FAIL_RATE_KEY,
    WEIGHTS_FILE,
    ArtifactError,
    fault_injection_fail_rate,
    fault_injection_weights_metadata,
    read_weights_metadata,
)


def _safetensors(path: Path, header: object) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def test_fault_injection_entry_is_written_only_when_set():
    assert fault_injection_weights_metadata(0) is None
    assert fault_injection_weights_metadata(0.25) == {FAULT_INJECTION_FAIL_RATE_KEY: "0.25"}
    assert fault_injection_weights_metadata(1) == {FAULT_INJECTION_FAIL_RATE_KEY: "1.0"}
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=FAULT_INJECTION_FAIL_RATE_KEY):
            fault_injection_weights_metadata(bad)


def test_header_metadata_is_read_without_torch(tmp_path: Path):
    entry = {FAULT_INJECTION_FAIL_RATE_KEY: "0.5"}
    _safetensors(tmp_path / WEIGHTS_FILE, {"__metadata__": entry})
    assert read_weights_metadata(tmp_path / WEIGHTS_FILE) == entry
    assert fault_injection_fail_rate(tmp_path) == 0.5
    _safetensors(tmp_path / WEIGHTS_FILE, {"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}})
    assert read_weights_metadata(tmp_path / WEIGHTS_FILE) == {}
    assert fault_injection_fail_rate(tmp_path) == 0.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x02", "shorter than its header length"),
        (struct.pack("<Q", 1 << 40), "header of"),
        (struct.pack("<Q", 3) + b"{no", "header is not JSON"),
        (struct.pack("<Q", 27) + b'{"__metadata__": {"a": 1}} ', "must map strings to strings"),
    ],
)
def test_malformed_headers_are_artifact_errors(tmp_path: Path, content: bytes, message: str):
    (tmp_path / WEIGHTS_FILE).write_bytes(content)
    with pytest.raises(ArtifactError, match=message):
        read_weights_metadata(tmp_path / WEIGHTS_FILE)


def test_missing_weights_file_is_an_artifact_error(tmp_path: Path):
    with pytest.raises(ArtifactError, match="not found"):
        fault_injection_fail_rate(tmp_path)
