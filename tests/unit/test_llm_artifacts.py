"""LLM versions (issue 17): the hf-transformers artifact format, its registration, which
runtime engine serves it, and the LLM analysis templates. No torch, no vLLM: files are plain
bytes standing in for a Hugging Face directory (verification only hashes them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from kiln.api.inferenceservice import ENGINE_FORMATS, AnalysisMetric, Engine, MetricTemplate
from kiln.api.model import Lineage, ModelSpec, ModelStatus, VersionSource
from kiln.artifact import (
    FORMAT_HF,
    HF_WEIGHTS_INDEX,
    METADATA_FILE,
    MODEL_FILES,
    ArtifactError,
    DigestMismatch,
    MissingFile,
    describe_hf_directory,
    model_file,
    path_to_uri,
    verify_artifact,
)
from kiln.controllers.inferenceservice import Unresolved, check_runtime_format
from kiln.registry import artifacts, register
from kiln.registry.stages import ARTIFACT_INVALID, ARTIFACT_MISSING
from kiln.rollout.analysis import render_query
from kiln.rollout.templates import QUERIES, query_of

NOW = "2026-12-01T00:00:00Z"
HF_FILES = {
    "config.json": b'{"architectures": ["LlamaForCausalLM"], "head_dim": 64}',
    "generation_config.json": b"{}",
    "tokenizer.json": b'{"model": {"type": "BPE"}}',
    "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
    "special_tokens_map.json": b"{}",
    "model.safetensors": b"weights of a tiny llama",
}


def hf_dir(d: Path, files: dict[str, bytes] | None = None, *, drop: tuple[str, ...] = ()) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, data in (files or HF_FILES).items():
        if name not in drop:
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(data)
    return d


def write_meta(d: Path, **kw: str) -> str:
    meta = describe_hf_directory(d, model_name="tiny-llama", created_at=NOW, **kw)
    (d / METADATA_FILE).write_text(meta.model_dump_json())
    return meta.weightsDigest


def test_a_hugging_face_directory_becomes_a_verified_artifact(tmp_path: Path) -> None:
    d = hf_dir(tmp_path / "v1")
    (d / "kiln-registration.json").write_text("{}")  # the registry's record is no part of it
    (d / ".cache").mkdir()
    (d / ".cache" / "lock").write_text("x")
    digest = write_meta(d)
    meta = verify_artifact(d, digest)
    assert meta.format == FORMAT_HF and meta.schemaVersion == 2
    assert sorted(meta.files) == sorted(HF_FILES)
    assert digest == meta.files["model.safetensors"] == meta.weightsDigest
    got, problem = artifacts.verify(path_to_uri(d), digest)
    assert problem is None and got is not None and got.format == FORMAT_HF


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({k: v for k, v in HF_FILES.items() if k != "tokenizer.json"}, "needs its tokenizer"),
        ({k: v for k, v in HF_FILES.items() if k != "config.json"}, "needs config.json"),
        ({k: v for k, v in HF_FILES.items() if k != "model.safetensors"}, "needs safetensors weights"),
        ({**HF_FILES, "pytorch_model.bin": b"pickle"}, "pickled weights are never loaded"),
        (
            {**{k: v for k, v in HF_FILES.items() if k != "tokenizer.json"}, "vocab.json": b"{}"},
            "vocab.json \\+ merges.txt",
        ),
    ],
)
def test_a_directory_that_cannot_be_served_is_not_described(
    tmp_path: Path, files: dict[str, bytes], message: str
) -> None:
    with pytest.raises(ArtifactError, match=message):
        describe_hf_directory(hf_dir(tmp_path / "v", files))


def test_other_tokenizer_layouts_are_accepted(tmp_path: Path) -> None:
    base = {k: v for k, v in HF_FILES.items() if k != "tokenizer.json"}
    describe_hf_directory(hf_dir(tmp_path / "bpe", {**base, "vocab.json": b"{}", "merges.txt": b"a b"}))
    describe_hf_directory(hf_dir(tmp_path / "spm", {**base, "tokenizer.model": b"spm"}))


def test_registration_refuses_metadata_without_a_tokenizer(tmp_path: Path) -> None:
    """Hand-written metadata that leaves the tokenizer out: ArtifactInvalid at registration."""
    d = hf_dir(tmp_path / "v1")
    digest = write_meta(d)
    doc = json.loads((d / METADATA_FILE).read_text())
    del doc["files"]["tokenizer.json"]
    (d / METADATA_FILE).write_text(json.dumps(doc))
    meta, problem = artifacts.verify(path_to_uri(d), digest)
    assert meta is None and problem is not None
    assert problem.reason == ARTIFACT_INVALID and "needs its tokenizer" in problem.message


def test_registration_refuses_a_missing_or_changed_tokenizer(tmp_path: Path) -> None:
    d = hf_dir(tmp_path / "v1")
    digest = write_meta(d)
    (d / "tokenizer.json").write_bytes(b'{"model": {"type": "WordPiece"}}')
    with pytest.raises(DigestMismatch, match=r"tokenizer\.json") as e:
        verify_artifact(d, digest)
    assert e.value.file == "tokenizer.json"
    (d / "tokenizer.json").unlink()
    with pytest.raises(MissingFile, match=r"tokenizer\.json"):
        verify_artifact(d, digest)
    _, problem = artifacts.verify(path_to_uri(d), digest)
    assert problem is not None and problem.reason == ARTIFACT_MISSING


def test_a_sharded_checkpoint_is_identified_by_its_index(tmp_path: Path) -> None:
    files = {k: v for k, v in HF_FILES.items() if k != "model.safetensors"}
    files |= {
        HF_WEIGHTS_INDEX: b'{"weight_map": {}}',
        "model-00001-of-00002.safetensors": b"shard 1",
        "model-00002-of-00002.safetensors": b"shard 2",
    }
    d = hf_dir(tmp_path / "v1", files)
    digest = write_meta(d)
    meta = verify_artifact(d, digest)
    assert model_file(meta) == HF_WEIGHTS_INDEX and digest == meta.files[HF_WEIGHTS_INDEX]
    (d / "model-00002-of-00002.safetensors").write_bytes(b"another shard")
    with pytest.raises(DigestMismatch, match=r"model-00002-of-00002\.safetensors"):
        verify_artifact(d, digest)


def test_the_registry_records_the_format() -> None:
    out = register(
        ModelSpec(),
        ModelStatus(),
        lambda v: None,
        artifact_uri="s3://models/tiny-llama/v1",
        digest="sha256:" + "ab" * 32,
        created_at=NOW,
        lineage=Lineage(source=VersionSource.IMPORT),
        now=NOW,
        format=FORMAT_HF,
    )
    assert out.registered is not None and out.registered.format == FORMAT_HF
    assert out.status.to_api()["versions"][0]["format"] == FORMAT_HF


def test_each_format_has_exactly_one_engine() -> None:
    served = [f for formats in ENGINE_FORMATS.values() for f in formats]
    assert sorted(served) == sorted(MODEL_FILES) and len(served) == len(set(served))
    assert set(ENGINE_FORMATS) == set(Engine)


@pytest.mark.parametrize(
    ("engine", "fmt", "refused"),
    [
        ("vllm", FORMAT_HF, False),
        ("kiln", "torch-export", False),
        ("kiln", None, False),  # format unknown to the registry: the server decides
        ("vllm", None, False),
        ("kiln", FORMAT_HF, True),
        ("vllm", "onnx", True),
        ("vllm", "kiln-mlp", True),
    ],
)
def test_a_version_the_engine_cannot_serve_is_refused(engine: str, fmt: str | None, refused: bool) -> None:
    version = {"version": 3, "artifactUri": "s3://m/3", "digest": "sha256:" + "0" * 64, "format": fmt}
    if not refused:
        check_runtime_format(version, engine, "tiny-llama")
        return
    with pytest.raises(Unresolved) as e:
        check_runtime_format(version, engine, "tiny-llama")
    assert e.value.reason == "RuntimeFormatMismatch"
    assert f"version 3 of Model 'tiny-llama' is a {fmt} artifact" in e.value.message
    assert "use runtime.engine " in e.value.message


def test_llm_templates_select_the_canary_version_series() -> None:
    variables = {"namespace": "ml", "version": "4"}
    ttft = render_query(
        query_of(AnalysisMetric(name="ttft", template="TimeToFirstTokenP95", max=0.5)), variables
    )
    assert ttft == (
        "histogram_quantile(0.95, sum by (le) "
        '(rate(vllm:time_to_first_token_seconds_bucket{namespace="ml",version="4"}[2m])))'
    )
    itl = render_query(QUERIES[MetricTemplate.INTER_TOKEN_LATENCY_P95], variables)
    assert "vllm:inter_token_latency_seconds_bucket" in itl
    errors = render_query(QUERIES[MetricTemplate.LLM_ERROR_RATIO], variables)
    assert 'status="5xx"' in errors and errors.count('version="4"') == 2
    own = AnalysisMetric(name="mine", query="up", min=1)
    assert query_of(own) == "up"


@pytest.mark.parametrize("fields", [{}, {"query": "up", "template": "LLMErrorRatio"}])
def test_a_metric_needs_exactly_one_of_query_and_template(fields: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match="exactly one of query, template"):
        AnalysisMetric.model_validate({"name": "m", "max": 1, **fields})


def test_kiln_artifact_hf_writes_the_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.cli import main

    d = hf_dir(tmp_path / "v1")
    assert main(["artifact", "hf", str(d), "--name", "tiny-llama"]) == 0
    digest = capsys.readouterr().out.strip()
    assert verify_artifact(d, digest).modelName == "tiny-llama"
    bare = hf_dir(tmp_path / "v2", drop=("tokenizer.json",))
    assert main(["artifact", "hf", str(bare)]) == 1
    assert "needs its tokenizer" in capsys.readouterr().err
    assert not (bare / METADATA_FILE).exists()


def test_kiln_serve_refuses_an_llm_artifact_naming_the_runtime(tmp_path: Path) -> None:
    """kiln-serve serves tensor models; an hf-transformers version is refused with the reason
    (the operator refuses the mismatch earlier, RuntimeFormatMismatch: this is kiln-serve's own
    guard), not a KeyError."""
    pytest.importorskip("torch")
    from kiln.artifact import ArtifactError
    from kiln.server.model import load_model

    d = hf_dir(tmp_path / "v1")
    digest = write_meta(d)
    with pytest.raises(ArtifactError, match=r"format 'hf-transformers', which kiln-serve does not serve"):
        load_model(d, digest, name="tiny-llama", version="1")
