"""Model registry against a real kube-apiserver: numbering under concurrency, refused promotions,
policy, audit trail, imports, immutability and rebuild from the artifact store."""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from kiln import API_VERSION
from kiln import kube as kb
from kiln.artifact import (
    CONFIG_FILE,
    METADATA_FILE,
    WEIGHTS_FILE,
    ArtifactMetadata,
    DatasetInfo,
    ModelConfig,
    describe_hf_directory,
    path_to_uri,
    sha256_file,
)
from kiln.cli import main as kiln_main
from kiln.conditions import get_condition
from kiln.registration import ModelNotFound, register_version
from kiln.registry import record

from .conftest import Cluster
from .health import argocd_health, kstatus
from .helpers import wait_for, wait_for_events

LINEAGE = {"source": "TrainingJob", "image": "kiln-trainer:dev", "dataset": "sklearn-digits"}


def make_artifact(
    root: Path, model: str, name: str, *, accuracy: float = 0.5, created_at: str = "2026-01-01T00:00:00Z"
) -> tuple[str, str]:
    """Write a complete artifact directory ``<root>/<model>/<name>``; returns ``(uri, digest)``."""
    d = root / model / name
    d.mkdir(parents=True)
    (d / WEIGHTS_FILE).write_bytes(hashlib.sha256(f"{model}/{name}".encode()).digest() * 64)
    digest = sha256_file(d / WEIGHTS_FILE)
    cfg = ModelConfig(inputSize=4, numClasses=2, inputMean=[0.0] * 4, inputStd=[1.0] * 4)
    (d / CONFIG_FILE).write_text(cfg.model_dump_json())
    meta = ArtifactMetadata(
        modelName=model,
        weightsDigest=digest,
        metrics={"accuracy": accuracy, "loss": 1 - accuracy},
        hyperparameters={"lr": 0.01, "epochs": 3},
        dataset=DatasetInfo(name="sklearn-digits", digest="sha256:" + "d" * 64, numSamples=1797),
        image="kiln-trainer:dev",
        trainingJob=name,
        createdAt=created_at,
    )
    (d / METADATA_FILE).write_text(meta.model_dump_json())
    return path_to_uri(d), digest


def create_model(api: client.ApiClient, ns: str, name: str = "digits", **spec: Any) -> dict[str, Any]:
    """Create a Model with ``spec`` (API-shaped)."""
    body = {
        "apiVersion": API_VERSION,
        "kind": "Model",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }
    created = kb.create(api, body)
    assert created is not None, f"Model {ns}/{name} already exists"
    return created


def get_model(api: client.ApiClient, ns: str, name: str = "digits") -> dict[str, Any]:
    obj = kb.get(api, API_VERSION, "Model", ns, name)
    assert obj is not None
    return obj


def patch_spec(api: client.ApiClient, ns: str, body: dict[str, Any], name: str = "digits") -> dict[str, Any]:
    """JSON-merge-patch the Model's spec (``None`` values delete keys)."""
    return kb.patch(api, API_VERSION, "Model", ns, name, {"spec": body})


def ready(obj: dict[str, Any]) -> dict[str, Any]:
    return get_condition((obj.get("status") or {}).get("conditions"), "Ready") or {}


def wait_reconciled(
    api: client.ApiClient,
    ns: str,
    predicate: Any = None,
    name: str = "digits",
    timeout: float = 30,
    message: str = "Model reconciled",
) -> dict[str, Any]:
    """Wait until status.observedGeneration is the current generation and ``predicate(obj)`` holds."""

    def check() -> dict[str, Any] | None:
        obj = get_model(api, ns, name)
        st = obj.get("status") or {}
        if st.get("observedGeneration") != obj["metadata"]["generation"]:
            return None
        return obj if predicate is None or predicate(obj) else None

    return wait_for(check, timeout, interval=0.1, message=message)


def stages(obj: dict[str, Any]) -> dict[str, Any]:
    return (obj.get("status") or {}).get("stages") or {}


def history(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return (obj.get("status") or {}).get("history") or []


def register(
    api: client.ApiClient, ns: str, root: Path, job: str, accuracy: float = 0.5, model: str = "digits"
) -> int:
    uri, digest = make_artifact(root, model, job, accuracy=accuracy)
    return register_version(
        api,
        ns,
        model,
        artifact_uri=uri,
        digest=digest,
        metrics={"accuracy": accuracy, "loss": 1 - accuracy},
        hyperparameters={"lr": 0.01},
        lineage={**LINEAGE, "trainingJob": job},
    )


def test_concurrent_registrations_get_distinct_consecutive_numbers(
    kube: client.ApiClient, namespace: str, operator: object, tmp_path: Path
) -> None:
    """24 TrainingJobs finishing at once (while the operator reconciles too) get 1..24."""
    create_model(kube, namespace, versionHistoryLimit=50)
    jobs = [f"job-{i:02d}" for i in range(24)]
    artifacts = {j: make_artifact(tmp_path, "digits", j) for j in jobs}
    start = threading.Barrier(len(jobs))

    def one(job: str) -> int:
        uri, digest = artifacts[job]
        start.wait()
        return register_version(
            kube,
            namespace,
            "digits",
            artifact_uri=uri,
            digest=digest,
            metrics={"accuracy": 0.9},
            hyperparameters={"lr": 0.01},
            lineage={**LINEAGE, "trainingJob": job},
        )

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        numbers = dict(zip(jobs, pool.map(one, jobs), strict=True))
    assert sorted(numbers.values()) == list(range(1, len(jobs) + 1))
    obj = get_model(kube, namespace)
    st = obj["status"]
    assert st["latestVersion"] == len(jobs)
    by_job = {v["lineage"]["trainingJob"]: v for v in st["versions"]}
    for job, n in numbers.items():  # each job's number is the entry holding its artifact
        assert by_job[job]["version"] == n and by_job[job]["digest"] == artifacts[job][1]
    # Idempotent per TrainingJob: a retry returns the same number and writes nothing.
    assert (
        register_version(
            kube,
            namespace,
            "digits",
            artifact_uri=artifacts["job-03"][0],
            digest=artifacts["job-03"][1],
            lineage={**LINEAGE, "trainingJob": "job-03"},
        )
        == numbers["job-03"]
    )
    assert get_model(kube, namespace)["status"]["latestVersion"] == len(jobs)
    # Each artifact got its registration record, with the number it was given.
    rec = record.parse((tmp_path / "digits" / "job-07" / record.RECORD_FILE).read_bytes())
    reg = rec.find(namespace, "digits")
    assert reg is not None and reg.version.version == numbers["job-07"]
    with pytest.raises(ModelNotFound):
        register(kube, namespace, tmp_path, "orphan", model="nope")


def test_refused_promotions_keep_the_previous_version(
    kube: client.ApiClient, namespace: str, operator: object, tmp_path: Path
) -> None:
    create_model(kube, namespace)
    for i in (1, 2, 3):
        assert register(kube, namespace, tmp_path, f"job-{i}") == i
    patch_spec(kube, namespace, {"stages": {"production": 1}, "aliases": {"champion": 1}})
    obj = wait_reconciled(kube, namespace, lambda o: ready(o).get("status") == "True")
    assert stages(obj) == {"production": 1} and obj["status"]["aliases"] == {"champion": 1}

    assert kstatus(obj)["status"] == "Current" and argocd_health(obj)["status"] == "Healthy"

    # (version, damage, reason, stalled: only a person can resolve it)
    cases = [
        (99, lambda: None, "VersionNotFound", False),  # not issued yet: a registration may bring it
        (
            2,
            lambda: (tmp_path / "digits" / "job-2" / "model.safetensors").unlink(),
            "ArtifactMissing",
            False,  # it may be copied in later
        ),
        (
            3,
            lambda: (tmp_path / "digits" / "job-3" / "model.safetensors").write_bytes(b"tampered"),
            "DigestMismatch",
            True,  # registered digests are immutable
        ),
    ]
    for version, damage, reason, permanent in cases:
        damage()
        patch_spec(kube, namespace, {"stages": {"production": version}})
        obj = wait_reconciled(
            kube,
            namespace,
            lambda o, reason=reason, permanent=permanent: (
                ready(o).get("reason") == reason
                and (get_condition(o["status"]["conditions"], "Stalled") is not None) == permanent
            ),
            message=f"refusal of version {version}",
        )
        cond = ready(obj)
        assert cond["reason"] == reason, cond
        assert f"stages.production: version {version} refused ({reason})" in cond["message"]
        assert cond["observedGeneration"] == obj["metadata"]["generation"]
        assert stages(obj) == {"production": 1}, "the previous version must stay in force"
        stalled = get_condition(obj["status"]["conditions"], "Stalled")
        if permanent:
            assert stalled and stalled["status"] == "True" and stalled["reason"] == reason
            assert kstatus(obj)["status"] == "Failed" and argocd_health(obj)["status"] == "Degraded"
        else:
            assert stalled is None
            assert kstatus(obj)["status"] == "InProgress" and argocd_health(obj)["status"] == "Progressing"
    # The same checks guard aliases.
    patch_spec(kube, namespace, {"stages": {"production": 1}, "aliases": {"champion": 3}})
    obj = wait_reconciled(
        kube,
        namespace,
        lambda o: ready(o).get("status") == "False" and get_condition(o["status"]["conditions"], "Stalled"),
    )
    assert ready(obj)["reason"] == "DigestMismatch" and "aliases.champion: version 3" in ready(obj)["message"]
    assert obj["status"]["aliases"] == {"champion": 1}
    assert get_condition(obj["status"]["conditions"], "Stalled")["reason"] == "DigestMismatch"
    refused = [
        e
        for e in wait_for_events(kube, namespace, "Model", {"PromotionRefused"}, "digits")
        if e.reason == "PromotionRefused"
    ]
    assert refused and all(e.type == "Warning" for e in refused)
    # Nothing in force changed, so the audit trail only has the first assignments.
    assert [(h.get("stage") or h.get("alias"), h.get("toVersion")) for h in history(obj)] == [
        ("Production", 1),
        ("champion", 1),
    ]


def test_policy_spec_and_audit_trail(
    kube: client.ApiClient, namespace: str, operator: object, tmp_path: Path
) -> None:
    create_model(
        kube,
        namespace,
        promotionPolicy=[
            {"stage": "Production", "metric": "accuracy", "min": 0.9},
            {"stage": "Staging", "metric": "accuracy", "min": 0.7},
        ],
    )
    assert register(kube, namespace, tmp_path, "job-1", accuracy=0.5) == 1
    assert register(kube, namespace, tmp_path, "job-2", accuracy=0.95) == 2
    assert register(kube, namespace, tmp_path, "job-3", accuracy=0.75) == 3
    obj = wait_reconciled(kube, namespace)
    assert stages(obj) == {"production": 2, "staging": 3}
    assert obj["status"]["policyStages"] == {"production": 2, "staging": 3}
    assert obj.get("spec", {}).get("stages") is None, "the operator never writes spec"

    # spec wins for the stages it declares...
    patch_spec(kube, namespace, {"stages": {"production": 1}, "aliases": {"champion": 2}})
    obj = wait_reconciled(kube, namespace, lambda o: stages(o).get("production") == 1)
    assert stages(obj) == {"production": 1, "staging": 3}
    # ...and removing the declaration hands the stage back to the policy's pick.
    patch_spec(kube, namespace, {"stages": None})
    obj = wait_reconciled(kube, namespace, lambda o: stages(o).get("production") == 2)
    # A declaration naming a version not registered yet comes into force when it registers.
    patch_spec(kube, namespace, {"stages": {"development": 4}})
    wait_reconciled(kube, namespace, lambda o: ready(o).get("reason") == "VersionNotFound")
    assert register(kube, namespace, tmp_path, "job-4", accuracy=0.1) == 4
    obj = wait_reconciled(kube, namespace, lambda o: ready(o).get("status") == "True")
    assert stages(obj) == {"production": 2, "staging": 3, "development": 4}

    trail = [
        (
            h.get("stage") or "alias:" + h.get("alias", ""),
            h.get("fromVersion"),
            h.get("toVersion"),
            h["cause"],
        )
        for h in history(obj)
    ]
    assert trail == [
        ("Production", None, 2, "Policy"),
        ("Staging", None, 3, "Policy"),
        ("Production", 2, 1, "SpecChange"),
        ("alias:champion", None, 2, "SpecChange"),
        ("Production", 1, 2, "Policy"),
        ("Development", None, 4, "Registration"),
    ]
    assert all(h["time"].endswith("Z") for h in history(obj))
    wait_for_events(kube, namespace, "Model", {"VersionRegistered", "StageChanged", "AliasChanged"}, "digits")


def test_import_versions_trained_elsewhere(
    kube: client.ApiClient, namespace: str, operator: object, tmp_path: Path
) -> None:
    good_uri, good_digest = make_artifact(tmp_path, "elsewhere", "run-a", accuracy=0.9)
    bad_uri, _ = make_artifact(tmp_path, "elsewhere", "run-b")
    create_model(
        kube,
        namespace,
        stages={"production": 1},
        **{
            "import": [
                {"artifactUri": good_uri, "digest": good_digest, "metrics": {"accuracy": 0.9}},
                {"artifactUri": bad_uri, "digest": "sha256:" + "0" * 64},
            ]
        },
    )
    obj = wait_reconciled(kube, namespace, lambda o: ready(o).get("reason") == "DigestMismatch")
    st = obj["status"]
    assert st["imported"] == 1 and st["latestVersion"] == 1
    assert st["versions"][0]["lineage"]["source"] == "Import"
    assert st["versions"][0]["createdAt"] == "2026-01-01T00:00:00Z"  # from the artifact's metadata.json
    assert stages(obj) == {"production": 1}
    assert "import[1]" in ready(obj)["message"]
    # Fixing the entry registers it next; earlier entries are not registered twice.
    fixed_uri, fixed_digest = make_artifact(tmp_path, "elsewhere", "run-c")
    patch_spec(
        kube,
        namespace,
        {
            "import": [
                {"artifactUri": good_uri, "digest": good_digest, "metrics": {"accuracy": 0.9}},
                {"artifactUri": fixed_uri, "digest": fixed_digest},
            ]
        },
    )
    obj = wait_reconciled(kube, namespace, lambda o: ready(o).get("status") == "True")
    assert obj["status"]["imported"] == 2 and [v["version"] for v in obj["status"]["versions"]] == [1, 2]


def test_import_llm_directories_records_the_format_and_refuses_a_missing_tokenizer(
    kube: client.ApiClient, namespace: str, operator: object, tmp_path: Path
) -> None:
    """An hf-transformers version (docs/llm.md) registers with its format; one whose metadata
    leaves the tokenizer out is refused at registration (Ready=False, ImportFailed)."""
    files = {
        "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
        "tokenizer.json": b"{}",
        "model.safetensors": b"weights",
    }
    uris = {}
    for name in ("llm-a", "llm-b"):
        d = tmp_path / "llm" / name
        d.mkdir(parents=True)
        for f, data in files.items():
            (d / f).write_bytes(data)
        meta = describe_hf_directory(d, created_at="2026-01-01T00:00:00Z")
        if name == "llm-b":  # hand-written metadata without the tokenizer
            del meta.files["tokenizer.json"]
        (d / METADATA_FILE).write_text(meta.model_dump_json())
        uris[name] = (path_to_uri(d), meta.weightsDigest)
    imports = [{"artifactUri": uri, "digest": digest} for uri, digest in uris.values()]
    create_model(kube, namespace, "tiny-llama", **{"import": imports})
    obj = wait_reconciled(
        kube, namespace, lambda o: ready(o).get("reason") == "ArtifactInvalid", name="tiny-llama"
    )
    assert obj["status"]["imported"] == 1
    assert obj["status"]["versions"][0]["format"] == "hf-transformers"
    assert "import[1]" in ready(obj)["message"] and "needs its tokenizer" in ready(obj)["message"]
    wait_for_events(kube, namespace, "Model", {"ImportFailed"}, "tiny-llama")


def test_versions_are_immutable_and_pruned(
    kube: client.ApiClient, namespace: str, operator: object, tmp_path: Path
) -> None:
    create_model(kube, namespace, versionHistoryLimit=2, stages={"production": 1})
    for i in range(1, 6):
        assert register(kube, namespace, tmp_path, f"job-{i}") == i
    obj = wait_reconciled(kube, namespace, lambda o: len(o["status"]["versions"]) == 3)
    assert [v["version"] for v in obj["status"]["versions"]] == [1, 4, 5]  # production pinned
    assert obj["status"]["latestVersion"] == 5
    assert register(kube, namespace, tmp_path, "job-6") == 6  # never reuses a pruned number
    # The API server itself refuses a change to a registered version (CEL transition rule).
    obj = get_model(kube, namespace)
    versions = [dict(v) for v in obj["status"]["versions"]]
    versions[0]["digest"] = "sha256:" + "f" * 64
    with pytest.raises(ApiException) as err:
        kb.patch_status(kube, obj, {"versions": versions})
    assert err.value.status == 422 and "a registered version is immutable" in (err.value.body or "")


def test_rebuild_after_a_restore_without_status(
    kube: client.ApiClient,
    namespace: str,
    operator: object,
    tmp_path: Path,
    cluster: Cluster,
    capsys: pytest.CaptureFixture[str],
) -> None:
    create_model(
        kube,
        namespace,
        stages={"production": 2},
        aliases={"champion": 3},
        promotionPolicy=[{"stage": "Staging", "metric": "accuracy", "min": 0.8}],
    )
    for i, acc in ((1, 0.5), (2, 0.6), (3, 0.85), (4, 0.7)):
        assert register(kube, namespace, tmp_path, f"job-{i}", accuracy=acc) == i
    before = wait_reconciled(kube, namespace, lambda o: ready(o).get("status") == "True")["status"]
    assert stages({"status": before}) == {"production": 2, "staging": 3}

    # What Velero does by default: the object comes back, its status does not.
    obj = get_model(kube, namespace)
    kb.patch_status(kube, obj, {k: None for k in obj["status"]})
    wiped = wait_reconciled(kube, namespace, lambda o: ready(o).get("reason") == "VersionNotFound")
    assert wiped["status"].get("versions") is None and wiped["status"]["latestVersion"] == 0

    rc = kiln_main(
        [
            "registry",
            "rebuild",
            "digits",
            "-n",
            namespace,
            "--artifacts",
            str(tmp_path),
            "--kubeconfig",
            cluster.kubeconfig,
        ]
    )
    out = capsys.readouterr().out
    print(out)
    assert rc == 0, out
    assert "restored 4 version(s)" in out
    after = wait_reconciled(kube, namespace, lambda o: ready(o).get("status") == "True")["status"]
    assert after["versions"] == before["versions"], "same numbers, digests, metrics, lineage, createdAt"
    assert after["latestVersion"] == 4
    assert stages({"status": after}) == {"production": 2, "staging": 3}  # spec + replayed policy pick
    assert after["aliases"] == {"champion": 3}
    # Counting goes on from the restored number.
    assert register(kube, namespace, tmp_path, "job-5") == 5
    # A second rebuild changes nothing.
    assert (
        kiln_main(
            [
                "registry",
                "rebuild",
                "digits",
                "-n",
                namespace,
                "--artifacts",
                str(tmp_path),
                "--kubeconfig",
                cluster.kubeconfig,
            ]
        )
        == 0
    )
    assert "restored 0 version(s)" in capsys.readouterr().out
    assert get_model(kube, namespace)["status"]["latestVersion"] == 5


def test_rebuild_skips_tampered_and_can_adopt_unregistered(
    kube: client.ApiClient,
    namespace: str,
    tmp_path: Path,
    cluster: Cluster,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without the operator: rebuild verifies digests, and numbers unrecorded artifacts after the rest."""
    create_model(kube, namespace)
    for i in (1, 2):
        assert register(kube, namespace, tmp_path, f"job-{i}") == i
    make_artifact(tmp_path, "digits", "job-x", created_at="2026-02-01T00:00:00Z")  # trained, never registered
    make_artifact(tmp_path, "digits", "job-w", created_at="2026-01-15T00:00:00Z")
    obj = get_model(kube, namespace)
    kb.patch_status(kube, obj, {k: None for k in obj["status"]})
    (tmp_path / "digits" / "job-2" / "model.safetensors").write_bytes(b"tampered")

    args = [
        "registry",
        "rebuild",
        "digits",
        "-n",
        namespace,
        "--artifacts",
        str(tmp_path),
        "--kubeconfig",
        cluster.kubeconfig,
        "--include-unregistered",
    ]
    assert kiln_main([*args, "--dry-run"]) == 1
    assert (get_model(kube, namespace).get("status") or {}).get("versions") is None
    capsys.readouterr()
    assert kiln_main(args) == 1  # a skipped artifact is an error worth a non-zero exit
    out = capsys.readouterr().out
    assert "skipped: DigestMismatch" in out
    st = get_model(kube, namespace)["status"]
    got = [(v["version"], v["lineage"]["source"], v["lineage"].get("trainingJob")) for v in st["versions"]]
    # job-2's number stays reserved (latestVersion counts it); unregistered ones follow in createdAt order.
    assert got == [(1, "TrainingJob", "job-1"), (3, "Rebuild", "job-w"), (4, "Rebuild", "job-x")]
    # The adopted ones now carry records, so the next rebuild keeps their numbers.
    reg = record.parse((tmp_path / "digits" / "job-x" / record.RECORD_FILE).read_bytes()).find(
        namespace, "digits"
    )
    assert reg is not None and reg.version.version == 4


def test_printer_columns(
    kube: client.ApiClient, namespace: str, operator: object, tmp_path: Path, cluster: Cluster
) -> None:
    create_model(kube, namespace, stages={"production": 1, "staging": 2})
    for i in (1, 2, 3):
        register(kube, namespace, tmp_path, f"job-{i}")
    wait_reconciled(kube, namespace, lambda o: ready(o).get("status") == "True")
    out = cluster.kubectl_run("get", "kmodel", "-n", namespace).stdout
    print(out)
    header, row = out.strip().splitlines()
    assert header.split() == ["NAME", "LATEST", "PRODUCTION", "STAGING", "READY", "AGE"]
    assert row.split()[:5] == ["digits", "3", "1", "2", "True"]
    wide = json.loads(cluster.kubectl_run("get", "kiln", "-n", namespace, "-o", "json").stdout)
    assert [i["kind"] for i in wide["items"]] == ["Model"]
    assert wide["items"][0]["apiVersion"] == API_VERSION


def test_registration_waits_for_nothing_but_the_api(
    kube: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    """Registration works without the operator, and without the artifact store mounted."""
    create_model(kube, namespace, promotionPolicy=[{"stage": "Production", "metric": "accuracy", "min": 0.1}])
    n = register_version(
        kube,
        namespace,
        "digits",
        artifact_uri="file:///not/mounted/here",
        digest="sha256:" + "a" * 64,
        metrics={"accuracy": 0.99},
        lineage={"trainingJob": "remote"},
        created_at="2026-03-01T00:00:00Z",
    )
    assert n == 1
    st = wait_for(lambda: get_model(kube, namespace).get("status"), 10)
    assert st["versions"][0]["lineage"] == {"source": "TrainingJob", "trainingJob": "remote"}
    assert st.get("stages") is None, "an artifact that cannot be verified is not promoted by the policy"
