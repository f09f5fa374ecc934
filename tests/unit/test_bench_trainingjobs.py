"""The pure parts of hack/bench-trainingjobs: manifests, metrics parsing, latencies, the table."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "hack" / "bench-trainingjobs"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("bench_trainingjobs", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = mod  # dataclasses look their module up
    loader.exec_module(mod)
    return mod


def test_pct_nearest_rank(bench: ModuleType) -> None:
    xs = [float(i) for i in range(1, 101)]
    assert bench.pct(xs, 50) == 50.0
    assert bench.pct(xs, 99) == 99.0
    assert bench.pct(reversed(xs), 100) == 100.0
    assert bench.pct([3.0], 99) == 3.0


def test_metric_sum_adds_every_labelled_sample_of_one_name_only(bench: ModuleType) -> None:
    text = (
        "# HELP rest_client_requests_total Number of HTTP requests\n"
        "# TYPE rest_client_requests_total counter\n"
        'rest_client_requests_total{code="200",host="127.0.0.1:16443",method="GET"} 12\n'
        'rest_client_requests_total{code="201",host="127.0.0.1:16443",method="POST"} 400\n'
        'rest_client_requests_total_other{code="200"} 1000\n'
        "rest_client_requests_total 3 1700000000000\n"
        'kiln_api_requests_total{verb="LIST",code="200"} 2.0\n'
    )
    assert bench.metric_sum(text, "rest_client_requests_total") == 415.0
    assert bench.metric_sum(text, "kiln_api_requests_total") == 2.0
    assert bench.metric_sum(text, "absent_total") == 0.0


def test_pytorchjob_master_and_workers_placed_like_kiln_pods(bench: ModuleType) -> None:
    from kiln.api.common import ResourceRequirements
    from kiln.resources.common import pod_tolerations

    pool = {"kiln.dev/pool": "bench-x"}
    job = bench.pytorchjob("pj-0001", "ns", "img:1", pool, workers=3)
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert job["metadata"] == {"name": "pj-0001", "namespace": "ns"}
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in specs.items()} == {"Master": 1, "Worker": 3}
    gpu_tolerations = pod_tolerations(
        None, ResourceRequirements.model_validate({"limits": {"nvidia.com/gpu": 1}})
    )
    for replica in specs.values():
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"
        assert container["resources"] == {"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 1}}
        assert pod["nodeSelector"] == pool
        assert pod["tolerations"] == gpu_tolerations


def test_trainingjob_manifest_validates_against_the_spec_model(bench: ModuleType) -> None:
    from kiln.api.trainingjob import TrainingJobSpec

    job = bench.trainingjob("tj-0001", "ns", "img:1", {"kiln.dev/pool": "p"}, 2)
    spec = TrainingJobSpec.model_validate(job["spec"])
    assert spec.num_nodes == 2
    assert spec.node_selector == {"kiln.dev/pool": "p"}


def test_job_latencies_take_the_last_pod_and_skip_incomplete_jobs(bench: ModuleType) -> None:
    start = {"a": 10.0, "b": 11.0, "c": 12.0}
    pod_job = {"a-0": "a", "a-1": "a", "b-0": "b", "b-1": "b", "c-0": "c", "stray": "zz"}
    times = {
        "a-0": 10.5,
        "a-1": 12.0,
        "b-0": 11.25,
        "b-1": 11.5,
        "c-0": 13.0,
        "stray": 1.0,
        "unlabelled": 2.0,
    }
    assert sorted(bench.job_latencies(start, times, pod_job, 2)) == [0.5, 2.0]


def test_table_has_one_column_per_scenario_and_their_settings(bench: ModuleType) -> None:
    floor = bench.Result("floor", "16 threads", to_created=[1.0, 2.0], makespan=2.0, requests=600.0, jobs=200)
    kiln = bench.Result(
        "kiln", "16 workers", to_created=[1.5], cpu=3.25, rss=100 * 2**20, requests=1000.0, jobs=200, note="x"
    )
    out = bench.table([floor, kiln])
    header, *rows = out.splitlines()
    assert header.split() == ["floor", "kiln"]
    by_label = {r[:30].strip(): r[30:].split() for r in rows if not r.startswith(" ")}
    assert by_label["apply->pods created p99"] == ["2.00s", "1.50s"]
    assert by_label["apply->pods Running p50"] == ["-", "-"]
    assert by_label["operator peak RSS"] == ["-", "100", "MiB"]
    assert by_label["API requests per job"] == ["3.0", "5.0"]
    assert by_label["jobs with all pods created"] == ["2/200", "1/200"]
    assert "  floor: 16 threads" in rows and "  kiln: x" in rows


def test_metric_by_label_sums_per_label_value(bench: ModuleType) -> None:
    text = (
        'kiln_api_requests_total{verb="GET",code="200"} 10.0\n'
        'kiln_api_requests_total{verb="GET",code="404"} 2.0\n'
        'kiln_api_requests_total{code="201",verb="POST"} 5.0\n'
        'kiln_api_requests_total{code="201"} 7.0\n'
        'kiln_api_requests_created{verb="GET",code="200"} 1.7e9\n'
        'rest_client_requests_total{method="GET"} 99\n'
    )
    assert bench.metric_by_label(text, "kiln_api_requests_total", "verb") == {"GET": 12.0, "POST": 5.0}
