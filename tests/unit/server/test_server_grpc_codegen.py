"""The committed gRPC modules (kiln/server/oip) are what hack/gen-grpc makes of the proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_generated_modules_match_the_proto() -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) generates the modules")
    p = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "gen-grpc"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_generated_messages_are_private_to_kiln() -> None:
    """Kiln's inference.* messages live in their own descriptor pool, not the process-wide one."""
    pytest.importorskip("grpc")
    from google.protobuf import descriptor_pool

    from kiln.server.oip import grpc_predict_v2_pb2 as pb

    assert pb.DESCRIPTOR.pool is not descriptor_pool.Default()
    assert pb.DESCRIPTOR.package == "inference"
    assert (
        pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name == "inference.GRPCInferenceService"
    )
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindMessageTypeByName("inference.ModelInferRequest.KilnProbe")
