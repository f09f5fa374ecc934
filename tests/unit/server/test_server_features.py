"""Entity-key requests (``KILN_FEATURE_GROUPS``) against a real Redis and a server in this process.

Two FeatureGroups split the digits model's 64 inputs: ``pixels-head`` (``p0``..``p39``, int64,
keyed by ``image_id`` int64, ``maxAgeSeconds`` 3600) and ``pixels-tail`` (``p40``..``p63``,
float32, keyed by ``image_key`` string: a BYTES input). Held-out digits are written to Redis with
:func:`kiln.features.online.write_rows` (the materialization's writer); a request carrying only
the keys must answer exactly what the request carrying the pixels answers, over REST and gRPC
(Triton's clients and kiln's own stub for typed contents).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("torch")  # the serve extra
pytest.importorskip("redis")  # the features extra (the online store client)
pytest.importorskip("tritonclient.grpc")
pytest.importorskip("tritonclient.http")

import grpc
import numpy as np
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from kiln.features import FeatureView
from kiln.features.online import write_rows
from kiln.features.schema import encode_value
from kiln.server.__main__ import main
from kiln.server.features import (
    INCOMPLETE_PARAMETER,
    NULL_FEATURES_PARAMETER,
    STATUSES_PARAMETER,
    FeatureConfigError,
    FeatureLookup,
    check_model,
    parse_feature_groups,
)
from kiln.server.oip import grpc_predict_v2_pb2 as pb
from kiln.server.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from kiln.server.protocol import TensorMetadata
from tests.redis import RedisServer, redis_server  # noqa: F401  (fixture)

from .conftest import MODEL_NAME, MODEL_VERSION, DigitsArtifact, ThreadedServer

pytestmark = pytest.mark.torch

HEAD, TAIL = "pixels-head", "pixels-tail"
SPLIT = 40
MAX_AGE = 3600
ROWS = 12  # held-out digits written to the store
STALE, NULL, MISSING = 5, 6, 99  # image 5 written 2 h ago; image 6 without p3; image 99 never written


def groups(address: str, *, head_features: int = SPLIT) -> list[dict[str, Any]]:
    """The KILN_FEATURE_GROUPS objects (as the operator writes them, without schemaDigest)."""

    def fg(name: str, entity: dict[str, str], features: list[dict[str, str]], max_age: int) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": "serve-test",
            "spec": {
                "entities": [entity],
                "features": features,
                "source": {"uri": f"/data/{name}.parquet"},
                "online": {"enabled": True, "store": {"address": address}, "maxAgeSeconds": max_age},
            },
        }

    return [
        fg(HEAD, {"name": "image_id", "dtype": "int64"},
           [{"name": f"p{i}", "dtype": "int64"} for i in range(head_features)], MAX_AGE),
        fg(TAIL, {"name": "image_key", "dtype": "string"},
           [{"name": f"p{i}", "dtype": "float32"} for i in range(SPLIT, 64)], 86400),
    ]  # fmt: skip


def key(i: int) -> str:
    return f"img-{i:04d}"


def write_digits(redis: RedisServer, x: np.ndarray) -> None:
    """Images 0..ROWS-1 into both groups (image STALE 2 h old, image NULL without p3)."""
    head, tail = (FeatureView.from_object({"metadata": g, "spec": g["spec"]}) for g in groups(redis.address))
    client = redis.client()
    now_us = time.time_ns() // 1000
    head_rows, tail_rows = [], []
    for i in range(ROWS):
        ts = now_us - (2 * MAX_AGE * 1_000_000 if i == STALE else 0)
        values = {f"p{j}": encode_value(int(x[i, j])) for j in range(SPLIT)}
        if i == NULL:
            values["p3"] = None
        head_rows.append(({"image_id": i}, ts, values))
        tail_rows.append(
            ({"image_key": key(i)}, now_us, {f"p{j}": encode_value(float(x[i, j])) for j in range(SPLIT, 64)})
        )
    assert write_rows(client, head, head_rows).written == ROWS
    assert write_rows(client, tail, tail_rows).written == ROWS


@pytest.fixture
def fg_server(
    make_server: Callable[..., ThreadedServer],
    redis_server: RedisServer,  # noqa: F811
    digits_artifact: DigitsArtifact,
) -> ThreadedServer:
    write_digits(redis_server, digits_artifact.x_test)
    return make_server(feature_groups=json.dumps(groups(redis_server.address)))


def infer_url(server: ThreadedServer) -> str:
    return f"{server.url}/v2/models/{MODEL_NAME}/infer"


def keyed_body(ids: list[int]) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "image_id", "datatype": "INT64", "shape": [len(ids)], "data": ids},
            {"name": "image_key", "datatype": "BYTES", "shape": [len(ids)], "data": [key(i) for i in ids]},
        ]
    }


def vector_logits(server: ThreadedServer, x: np.ndarray) -> np.ndarray:
    body = {
        "inputs": [
            {"name": "input-0", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
        ]
    }
    r = requests.post(infer_url(server), json=body, timeout=10)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}["output-0"]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def logits_of(doc: dict[str, Any]) -> np.ndarray:
    out = {o["name"]: o for o in doc["outputs"]}["output-0"]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def sample(server: ThreadedServer, name: str, **labels: str) -> float:
    base = {"model": MODEL_NAME, "version": MODEL_VERSION}
    return server.server.metrics.registry.get_sample_value(name, {**base, **labels}) or 0.0


def fill_values(server: ThreadedServer) -> np.ndarray:
    return np.asarray(server.server.model.config.inputMean, dtype=np.float32)


# ----------------------------------------------------------------------------------- REST
def test_rest_entity_keys_answer_what_the_feature_vector_answers(
    fg_server: ThreadedServer, digits_artifact: DigitsArtifact
) -> None:
    ids = [i for i in range(ROWS) if i not in (STALE, NULL)]
    r = requests.post(infer_url(fg_server), json=keyed_body(ids), timeout=10)
    assert r.status_code == 200, r.text
    doc = r.json()
    np.testing.assert_array_equal(logits_of(doc), vector_logits(fg_server, digits_artifact.x_test[ids]))
    np.testing.assert_allclose(logits_of(doc), digits_artifact.logits_test[ids], rtol=1e-5, atol=1e-5)
    predicted = {o["name"]: o for o in doc["outputs"]}["predicted_class"]["data"]
    assert predicted == digits_artifact.predictions[ids].tolist()
    params = doc["parameters"]
    assert json.loads(params[STATUSES_PARAMETER]) == {
        HEAD: ["PRESENT"] * len(ids),
        TAIL: ["PRESENT"] * len(ids),
    }
    assert params[INCOMPLETE_PARAMETER] == 0 and NULL_FEATURES_PARAMETER not in params
    assert sample(fg_server, "kiln_feature_lookups_total", feature_group=HEAD, status="PRESENT") == len(ids)
    assert sample(fg_server, "kiln_feature_lookup_duration_seconds_count", feature_group=TAIL) == 1
    # a request carrying the model's own input has no feature parameters and reads no features
    r = requests.post(infer_url(fg_server), json={"inputs": [{"name": "input-0", "datatype": "FP32",
        "shape": [1, 64], "data": digits_artifact.x_test[0].tolist()}]}, timeout=10)  # fmt: skip
    assert r.status_code == 200 and "parameters" not in r.json()
    assert sample(fg_server, "kiln_feature_lookup_duration_seconds_count", feature_group=TAIL) == 1


def test_one_round_trip_per_feature_group_per_request(
    fg_server: ThreadedServer,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    ids = list(range(ROWS))
    assert (
        requests.post(infer_url(fg_server), json=keyed_body(ids), timeout=10).status_code == 200
    )  # loads the script
    client = redis_server.client()
    client.config_resetstat()
    assert requests.post(infer_url(fg_server), json=keyed_body(ids), timeout=10).status_code == 200
    stats = {
        k: v["calls"] for k, v in client.info("commandstats").items() if not k.startswith("cmdstat_config")
    }
    stats.pop("cmdstat_info", None)
    # one script call per FeatureGroup (its 12 HMGETs run inside Redis, in that one round trip)
    assert stats == {"cmdstat_evalsha": 2, "cmdstat_hmget": 2 * ROWS}, stats


def test_missing_stale_and_null_are_served_with_the_training_mean_and_reported(
    fg_server: ThreadedServer, digits_artifact: DigitsArtifact
) -> None:
    ids = [0, STALE, NULL, MISSING]
    body = keyed_body(ids)
    body["inputs"][1]["data"][3] = key(0)  # image 99's tail comes from image 0: only its head is missing
    r = requests.post(infer_url(fg_server), json=body, timeout=10)
    assert r.status_code == 200, r.text
    params = r.json()["parameters"]
    assert json.loads(params[STATUSES_PARAMETER]) == {
        HEAD: ["PRESENT", "OUTSIDE_MAX_AGE", "NULL_VALUE", "NOT_FOUND"],
        TAIL: ["PRESENT"] * 4,
    }
    assert json.loads(params[NULL_FEATURES_PARAMETER]) == {HEAD: {"2": ["p3"]}}
    assert params[INCOMPLETE_PARAMETER] == 3
    # what the model saw: the training mean wherever a value was not served
    x = digits_artifact.x_test
    mean = fill_values(fg_server)
    expected = np.stack([x[0], x[STALE], x[NULL], x[0]]).astype(np.float32)
    expected[1, :SPLIT] = mean[:SPLIT]
    expected[2, 3] = mean[3]
    expected[3, :SPLIT] = mean[:SPLIT]
    np.testing.assert_array_equal(logits_of(r.json()), vector_logits(fg_server, expected))
    for status, n in (("PRESENT", 1), ("OUTSIDE_MAX_AGE", 1), ("NULL_VALUE", 1), ("NOT_FOUND", 1)):
        assert sample(fg_server, "kiln_feature_lookups_total", feature_group=HEAD, status=status) == n
    assert sample(fg_server, "kiln_feature_lookups_total", feature_group=TAIL, status="PRESENT") == 4
    page = requests.get(fg_server.metrics_url, timeout=5).text
    assert (
        'kiln_feature_lookups_total{feature_group="pixels-head",model="digits",status="NOT_FOUND",version="3"} 1.0'
        in page
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": [{"name": "image_id", "datatype": "INT64", "shape": [1], "data": [1]}]},
         "missing input 'image_key'"),
        ({"inputs": [{"name": "image_id", "datatype": "INT64", "shape": [1], "data": [1]},
                     {"name": "image_key", "datatype": "INT64", "shape": [1], "data": [1]}]},
         "input 'image_key' has datatype INT64; expected BYTES"),
        ({"inputs": [{"name": "image_id", "datatype": "BYTES", "shape": [1], "data": ["1"]},
                     {"name": "image_key", "datatype": "BYTES", "shape": [1], "data": ["a"]}]},
         "input 'image_id' has datatype BYTES (string/bytes)"),
        ({"inputs": [{"name": "image_id", "datatype": "INT64", "shape": [1], "data": [1]},
                     {"name": "image_key", "datatype": "BYTES", "shape": [1], "data": [7]}]},
         "input 'image_key': 'data' must contain only strings"),
        ({"inputs": [{"name": "image_id", "datatype": "INT64", "shape": [1], "data": [1]},
                     {"name": "input-0", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]},
         "the inputs mix the model's inputs ('input-0') and entity keys"),
        ({"inputs": [{"name": "image_id", "datatype": "INT64", "shape": [1, 1], "data": [1]},
                     {"name": "image_key", "datatype": "BYTES", "shape": [1], "data": ["a"]}]},
         "input 'image_id' has wrong shape [1, 1]; expected [-1]"),
    ],
)  # fmt: skip
def test_bad_entity_requests_get_400_naming_the_input(
    fg_server: ThreadedServer, body: Any, message: str
) -> None:
    r = requests.post(infer_url(fg_server), json=body, timeout=10)
    assert r.status_code == 400 and message in r.json()["error"], r.text


# ----------------------------------------------------------------------------------- gRPC
def test_tritonclient_grpc_and_http_send_entity_keys(
    fg_server: ThreadedServer, digits_artifact: DigitsArtifact
) -> None:
    """Triton's clients send BYTES in binary (length-prefixed), over gRPC and the REST extension."""
    ids = [0, 1, 2, 3, MISSING]
    expected = requests.post(infer_url(fg_server), json=keyed_body(ids), timeout=10).json()
    want = logits_of(expected)
    image_id = np.asarray(ids, dtype=np.int64)
    image_key = np.asarray([key(i).encode() for i in ids], dtype=object)

    g = grpcclient.InferenceServerClient(fg_server.grpc_target)
    try:
        inputs = [grpcclient.InferInput("image_id", [len(ids)], "INT64"),
                  grpcclient.InferInput("image_key", [len(ids)], "BYTES")]  # fmt: skip
        inputs[0].set_data_from_numpy(image_id)
        inputs[1].set_data_from_numpy(image_key)
        result = g.infer(MODEL_NAME, inputs)
    finally:
        g.close()
    np.testing.assert_array_equal(result.as_numpy("output-0"), want)
    params = result.get_response().parameters
    assert params[STATUSES_PARAMETER].string_param == expected["parameters"][STATUSES_PARAMETER]
    assert params[INCOMPLETE_PARAMETER].int64_param == 1

    h = httpclient.InferenceServerClient(fg_server.url.removeprefix("http://"))
    try:
        inputs = [httpclient.InferInput("image_id", [len(ids)], "INT64"),
                  httpclient.InferInput("image_key", [len(ids)], "BYTES")]  # fmt: skip
        inputs[0].set_data_from_numpy(image_id, binary_data=True)
        inputs[1].set_data_from_numpy(image_key, binary_data=True)
        result = h.infer(MODEL_NAME, inputs)
    finally:
        h.close()
    np.testing.assert_array_equal(result.as_numpy("output-0"), want)
    assert (
        result.get_response()["parameters"][STATUSES_PARAMETER] == expected["parameters"][STATUSES_PARAMETER]
    )


def test_grpc_typed_contents_entity_keys(fg_server: ThreadedServer, digits_artifact: DigitsArtifact) -> None:
    ids = [4, 7]
    req = pb.ModelInferRequest(model_name=MODEL_NAME)
    req.inputs.add(name="image_id", datatype="INT64", shape=[2]).contents.int64_contents.extend(ids)
    req.inputs.add(name="image_key", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(
        [key(i).encode() for i in ids]
    )
    with grpc.insecure_channel(fg_server.grpc_target) as channel:
        resp = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=10)
    logits = np.asarray(resp.outputs[0].contents.fp32_contents, dtype=np.float32).reshape(2, 10)
    np.testing.assert_array_equal(logits, vector_logits(fg_server, digits_artifact.x_test[ids]))
    assert json.loads(resp.parameters[STATUSES_PARAMETER].string_param) == {
        HEAD: ["PRESENT"] * 2,
        TAIL: ["PRESENT"] * 2,
    }


# ----------------------------------------------------------------------------------- faults
def test_redis_down_is_503_and_unavailable_then_recovers(
    fg_server: ThreadedServer,
    redis_server: RedisServer,  # noqa: F811
    digits_artifact: DigitsArtifact,
) -> None:
    redis_server.stop()
    r = requests.post(infer_url(fg_server), json=keyed_body([0]), timeout=30)
    assert r.status_code == 503, r.text
    assert (
        "online store of FeatureGroup pixels-" in r.json()["error"] and "is unavailable" in r.json()["error"]
    )
    g = grpcclient.InferenceServerClient(fg_server.grpc_target)
    try:
        inputs = [
            grpcclient.InferInput("image_id", [1], "INT64"),
            grpcclient.InferInput("image_key", [1], "BYTES"),
        ]
        inputs[0].set_data_from_numpy(np.asarray([0], dtype=np.int64))
        inputs[1].set_data_from_numpy(np.asarray([key(0).encode()], dtype=object))
        with pytest.raises(InferenceServerException) as e:
            g.infer(MODEL_NAME, inputs)
        assert e.value.status() == "StatusCode.UNAVAILABLE" and "is unavailable" in e.value.message()
    finally:
        g.close()
    assert sample(fg_server, "kiln_inference_requests_total", protocol="rest", code="503") == 1
    assert sample(fg_server, "kiln_feature_lookup_errors_total", feature_group=HEAD) >= 1
    # the model's own input does not need the store
    vector_logits(fg_server, digits_artifact.x_test[:1])
    assert fg_server.server.ready
    redis_server.start()
    write_digits(redis_server, digits_artifact.x_test)  # no persistence: the restarted store is empty
    r = requests.post(infer_url(fg_server), json=keyed_body([0]), timeout=10)
    assert r.status_code == 200 and json.loads(r.json()["parameters"][STATUSES_PARAMETER])[HEAD] == [
        "PRESENT"
    ]


# ----------------------------------------------------------------------------------- start-up
def test_startup_refuses_a_model_whose_input_width_differs(
    digits_artifact: DigitsArtifact, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"KILN_FEATURE_GROUPS": json.dumps(groups("127.0.0.1:1", head_features=SPLIT - 1))}
    argv = ["--artifact", digits_artifact.path.as_uri(), "--digest", digits_artifact.digest,
            "--model-name", MODEL_NAME, "--port", "0", "--grpc-port", "0", "--metrics-port", "0"]  # fmt: skip
    assert main(argv, env) == 1
    err = capsys.readouterr().err
    assert "refusing to serve with KILN_FEATURE_GROUPS" in err
    assert "the model's input 'input-0' is FP32 [-1, 64]; the FeatureGroups give 63 features" in err


class _Model:
    def __init__(self, inputs: list[TensorMetadata], schema_digest: str | None = None) -> None:
        self.inputs = tuple(inputs)
        self.metadata = type("M", (), {"dataset": type("D", (), {"schemaDigest": schema_digest})()})()


WIDE = TensorMetadata("x", "FP32", [-1, 64])


@pytest.mark.parametrize(
    ("model", "mutate", "message"),
    [
        (_Model([WIDE, WIDE]), None, "the model has 2 inputs"),
        (_Model([TensorMetadata("x", "FP32", [-1])]), None, "it must be a number type of shape [-1, 64]"),
        (_Model([TensorMetadata("image_id", "FP32", [-1, 64])]), None, "entity image_id has the name of the model's input"),
        (_Model([WIDE]), lambda g: g[1]["spec"]["features"][0].update(dtype="string"), "string features cannot be a model input: pixels-tail.p40"),
        (_Model([WIDE]), lambda g: g[1]["spec"]["entities"][0].update(name="image_id"), "entity image_id is int64 in one FeatureGroup and string in pixels-tail"),
        (_Model([WIDE], "sha256:" + "0" * 64), None, "the model was trained on a FeatureGroup with schema digest sha256:000"),
    ],
)  # fmt: skip
def test_check_model_refuses(model: _Model, mutate: Callable[[Any], None] | None, message: str) -> None:
    g = groups("127.0.0.1:1")
    if mutate:
        mutate(g)
    with pytest.raises(FeatureConfigError) as e:
        FeatureLookup(parse_feature_groups(json.dumps(g)), model, connect=lambda a, p: None)
    assert message in str(e.value)


def test_check_model_accepts_the_digest_it_was_trained_on() -> None:
    views = [g.view for g in parse_feature_groups(json.dumps(groups("127.0.0.1:1")))]
    assert check_model(views, (WIDE,), views[1].digest) == 64
    assert check_model(views, (TensorMetadata("x", "FP64", [-1, -1]),), None) == 64


def test_parse_refuses_a_digest_that_is_not_the_specs() -> None:
    g = groups("127.0.0.1:1")
    g[0]["schemaDigest"] = "sha256:" + "1" * 64
    with pytest.raises(FeatureConfigError, match=r"schemaDigest sha256:1111.* is not the digest of its spec"):
        parse_feature_groups(json.dumps(g))
    g[0]["schemaDigest"] = FeatureView.from_object({"metadata": g[0], "spec": g[0]["spec"]}).digest
    assert parse_feature_groups(json.dumps(g))[0].view.digest == g[0]["schemaDigest"]


def test_a_password_protected_store_with_the_password_of_its_secret(
    make_server: Callable[..., ThreadedServer],
    redis_server: RedisServer,  # noqa: F811
    digits_artifact: DigitsArtifact,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``passwordEnv`` (the operator fills it from ``online.store.secretRef``) names the variable
    holding each store's password; without it the store refuses, and the request gets 503."""
    write_digits(redis_server, digits_artifact.x_test)
    redis_server.client().config_set("requirepass", "s3cret")
    g = groups(redis_server.address)
    for entry in g:
        entry["passwordEnv"] = "KILN_REDIS_PASSWORD_0"
    monkeypatch.setenv("KILN_REDIS_PASSWORD_0", "s3cret")
    server = make_server(feature_groups=json.dumps(g))
    r = requests.post(infer_url(server), json=keyed_body([0, 1]), timeout=10)
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["parameters"][STATUSES_PARAMETER])[HEAD] == ["PRESENT", "PRESENT"]
    monkeypatch.delenv("KILN_REDIS_PASSWORD_0")
    unauthenticated = make_server(feature_groups=json.dumps(groups(redis_server.address)))
    r = requests.post(infer_url(unauthenticated), json=keyed_body([0]), timeout=10)
    assert r.status_code == 503 and "is unavailable" in r.json()["error"], r.text
