"""A real Prometheus for the local cluster that scrapes exactly what ServiceMonitors select.

The local cluster has no prometheus-operator. This module plays its configuration part, and only
that: it reads the ServiceMonitors that match a ``serviceMonitorSelector`` and writes the scrape
configuration prometheus-operator would generate for them (Kubernetes service discovery, role
``endpointslice``, relabelling that keeps the Services the monitor's selector matches and the
endpoint port it names), then has Prometheus (built by hack/cluster with Kubernetes discovery) reload it. Prometheus itself discovers
the pods through the API server and scrapes them; nothing is listed statically.

The translation follows prometheus-operator's ``generateServiceMonitorConfig``
(pkg/prometheus/promcfg.go, v0.89): job ``serviceMonitor/<namespace>/<name>/<index>``; ``keep``
rules on ``__meta_kubernetes_service_label_<name>`` + ``..._labelpresent_<name>`` for
``matchLabels`` and ``matchExpressions``; ``keep`` on ``__meta_kubernetes_endpointslice_port_name``;
target labels ``namespace``, ``service``, ``pod``, ``container``, ``endpoint`` and ``job`` (the
Service name). Supported endpoint fields: ``port``, ``path``, ``scheme``, ``interval``,
``scrapeTimeout``, ``params``, ``honorLabels``, ``relabelings``, ``metricRelabelings``; others
raise ``UnsupportedServiceMonitor`` rather than being ignored.

Stdlib only: it runs from hack/ scripts and from the e2e tests.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

SUPPORTED_ENDPOINT_FIELDS = {
    "port",
    "path",
    "scheme",
    "interval",
    "scrapeTimeout",
    "params",
    "honorLabels",
    "relabelings",
    "metricRelabelings",
}


class UnsupportedServiceMonitor(ValueError):
    """A ServiceMonitor uses a field this translation does not implement."""


def sanitize_label_name(name: str) -> str:
    """A Kubernetes label key as Prometheus' discovery spells it (``[^a-zA-Z0-9_]`` -> ``_``)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _selector_relabelings(selector: dict[str, Any]) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for key, value in sorted((selector.get("matchLabels") or {}).items()):
        k = sanitize_label_name(key)
        rules.append(
            {
                "action": "keep",
                "source_labels": [
                    f"__meta_kubernetes_service_label_{k}",
                    f"__meta_kubernetes_service_labelpresent_{k}",
                ],
                "regex": f"({re.escape(value)});true",
            }
        )
    for expr in selector.get("matchExpressions") or []:
        k = sanitize_label_name(expr["key"])
        op = expr["operator"]
        values = "|".join(re.escape(v) for v in expr.get("values") or [])
        if op == "In":
            rules.append(
                {
                    "action": "keep",
                    "source_labels": [
                        f"__meta_kubernetes_service_label_{k}",
                        f"__meta_kubernetes_service_labelpresent_{k}",
                    ],
                    "regex": f"({values});true",
                }
            )
        elif op == "NotIn":
            rules.append(
                {
                    "action": "drop",
                    "source_labels": [
                        f"__meta_kubernetes_service_label_{k}",
                        f"__meta_kubernetes_service_labelpresent_{k}",
                    ],
                    "regex": f"({values});true",
                }
            )
        elif op in ("Exists", "DoesNotExist"):
            rules.append(
                {
                    "action": "keep" if op == "Exists" else "drop",
                    "source_labels": [f"__meta_kubernetes_service_labelpresent_{k}"],
                    "regex": "true",
                }
            )
        else:
            raise UnsupportedServiceMonitor(f"matchExpressions operator {op!r}")
    return rules


def _snake(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ServiceMonitor RelabelConfigs (camelCase) as Prometheus configuration (snake_case)."""
    names = {
        "sourceLabels": "source_labels",
        "targetLabel": "target_label",
        "separator": "separator",
        "regex": "regex",
        "modulus": "modulus",
        "replacement": "replacement",
        "action": "action",
    }
    out = []
    for rule in rules:
        unknown = set(rule) - set(names)
        if unknown:
            raise UnsupportedServiceMonitor(f"relabeling fields {sorted(unknown)}")
        converted = {names[k]: v for k, v in rule.items()}
        if "action" in converted:
            converted["action"] = str(converted["action"]).lower()
        out.append(converted)
    return out


def scrape_configs(
    monitor: dict[str, Any], *, kubeconfig: str | None = None, role: str = "endpointslice"
) -> list[dict[str, Any]]:
    """The scrape jobs prometheus-operator generates for one ServiceMonitor (one per endpoint).

    ``monitor`` is the ServiceMonitor object as the API returns it. ``kubeconfig`` is the file
    Prometheus' Kubernetes discovery authenticates with (None: in-cluster credentials).
    ``role`` is the discovery role: ``endpointslice`` (prometheus-operator's
    ``serviceDiscoveryRole: EndpointSlice``; core/v1 Endpoints is deprecated since Kubernetes
    1.33) or ``endpoints``.
    Raises UnsupportedServiceMonitor for fields this translation does not implement, ValueError
    for another role.
    """
    if role not in ("endpointslice", "endpoints"):
        raise ValueError(f"role must be endpointslice or endpoints, got {role!r}")
    port_label = f"__meta_kubernetes_{role.removesuffix('s')}_port_name"
    meta, spec = monitor["metadata"], monitor.get("spec") or {}
    ns_sel = spec.get("namespaceSelector") or {}
    if ns_sel.get("any"):
        namespaces: list[str] = []
    else:
        namespaces = list(ns_sel.get("matchNames") or [meta["namespace"]])
    if spec.get("targetLabels") or spec.get("podTargetLabels") or spec.get("jobLabel"):
        raise UnsupportedServiceMonitor("targetLabels, podTargetLabels and jobLabel are not translated")
    sd: dict[str, Any] = {"role": role}
    if namespaces:
        sd["namespaces"] = {"names": namespaces}
    if kubeconfig:
        sd["kubeconfig_file"] = kubeconfig
    jobs = []
    for i, ep in enumerate(spec.get("endpoints") or []):
        unknown = set(ep) - SUPPORTED_ENDPOINT_FIELDS
        if unknown:
            raise UnsupportedServiceMonitor(f"endpoint fields {sorted(unknown)}")
        if "port" not in ep:
            raise UnsupportedServiceMonitor("an endpoint without a named port (targetPort is not translated)")
        relabel = [
            {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
            *_selector_relabelings(spec.get("selector") or {}),
            {
                "action": "keep",
                "source_labels": [port_label],
                "regex": re.escape(ep["port"]),
            },
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
            {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
            {"target_label": "endpoint", "replacement": ep["port"]},
            *_snake(ep.get("relabelings") or []),
        ]
        job: dict[str, Any] = {
            "job_name": f"serviceMonitor/{meta['namespace']}/{meta['name']}/{i}",
            "honor_labels": bool(ep.get("honorLabels", False)),
            "kubernetes_sd_configs": [sd],
            "metrics_path": ep.get("path", "/metrics"),
            "scheme": ep.get("scheme", "http"),
            "relabel_configs": relabel,
        }
        if "interval" in ep:
            job["scrape_interval"] = ep["interval"]
        if "scrapeTimeout" in ep:
            job["scrape_timeout"] = ep["scrapeTimeout"]
        if ep.get("params"):
            job["params"] = ep["params"]
        if ep.get("metricRelabelings"):
            job["metric_relabel_configs"] = _snake(ep["metricRelabelings"])
        jobs.append(job)
    return jobs


def rule_file(rule: dict[str, Any]) -> dict[str, Any]:
    """The Prometheus rule file prometheus-operator writes for one PrometheusRule: its
    ``spec.groups`` as they are (pkg/prometheus/operator's ``generateContent`` marshals the spec
    unchanged; the CRD's group and rule fields are the rule file's own names: ``name``,
    ``interval``, ``rules[].record|alert``, ``expr``, ``for``, ``labels``, ``annotations``)."""
    return {"groups": list((rule.get("spec") or {}).get("groups") or [])}


def rule_file_name(rule: dict[str, Any]) -> str:
    """``<namespace>-<name>-<uid>.yaml``, the key prometheus-operator uses in its rules ConfigMap."""
    meta = rule["metadata"]
    return f"{meta['namespace']}-{meta['name']}-{meta.get('uid', '')}.yaml"


def selects(selector: dict[str, str], labels: dict[str, str] | None) -> bool:
    """Whether ``labels`` carry every ``key=value`` of a matchLabels ``selector``."""
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def config(
    monitors: list[dict[str, Any]],
    *,
    kubeconfig: str | None = None,
    scrape_interval: str = "30s",
    evaluation_interval: str = "30s",
    role: str = "endpointslice",
) -> dict[str, Any]:
    """A whole prometheus.yml (as a dict) for these ServiceMonitors, sorted by namespace/name."""
    jobs: list[dict[str, Any]] = []
    for m in sorted(monitors, key=lambda m: (m["metadata"]["namespace"], m["metadata"]["name"])):
        jobs.extend(scrape_configs(m, kubeconfig=kubeconfig, role=role))
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
        "scrape_configs": jobs,
    }


def find_prometheus(bin_dirs: list[str]) -> str:
    """The ``prometheus`` binary built by ``hack/cluster build --real-node``.

    ``bin_dirs`` is ``hack/cluster env --json``'s ``bin_dirs``. Debian's package cannot serve:
    its 2.42 build has no Kubernetes service discovery. Raises RuntimeError when it is missing.
    """
    for d in bin_dirs:
        candidate = Path(d) / "prometheus"
        if candidate.exists():
            return str(candidate)
    raise RuntimeError(f"no prometheus in {bin_dirs}: run `hack/cluster build --real-node`")


class LocalPrometheus:
    """A Prometheus on this machine (``binary``), configured from the cluster's ServiceMonitors.

    ``listen`` is ``host:port`` (the pods reach it when ``host`` is an address of this machine
    they can route to, e.g. the local cluster's API server address). ``kubectl`` + ``kubeconfig``
    list the ServiceMonitors; ``sd_kubeconfig`` is what Prometheus' discovery authenticates
    with (ideally a ServiceAccount allowed only to list/watch services, endpoints and pods).
    ``selector`` is the serviceMonitorSelector (matchLabels); ``rule_selector`` the ruleSelector
    (matchLabels; None: no PrometheusRules are loaded), whose PrometheusRules become rule files
    under ``<workdir>/rules`` (:func:`rule_file`). ``start()`` runs it and a thread that re-syncs
    the configuration every ``sync_period`` seconds; ``stop()`` ends both.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        binary: str,
        listen: str,
        kubectl: str,
        kubeconfig: str,
        sd_kubeconfig: str,
        selector: dict[str, str],
        scrape_interval: str = "5s",
        sync_period: float = 1.0,
        rule_selector: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.binary = binary
        self.listen = listen
        self.address = f"http://{listen}"
        self.kubectl = kubectl
        self.kubeconfig = kubeconfig
        self.sd_kubeconfig = sd_kubeconfig
        self.selector = selector
        self.scrape_interval = scrape_interval
        self.sync_period = sync_period
        self.rule_selector = rule_selector
        self.rules_dir = workdir / "rules"
        self.config_file = workdir / "prometheus.yml"
        self.log_file = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.jobs: list[str] = []
        self.sync_errors = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _list(self, resource: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        out = subprocess.run(
            [self.kubectl, f"--kubeconfig={self.kubeconfig}", "get", resource, "-A", "-o", "json"],
            check=True,
            capture_output=True,
            text=True,
        )
        items = json.loads(out.stdout)["items"]
        return [m for m in items if selects(selector, m["metadata"].get("labels"))]

    def monitors(self) -> list[dict[str, Any]]:
        """The ServiceMonitors in all namespaces that the selector matches."""
        return self._list("servicemonitors", self.selector)

    def rules(self) -> list[dict[str, Any]]:
        """The PrometheusRules in all namespaces that the rule selector matches (none without one)."""
        return [] if self.rule_selector is None else self._list("prometheusrules", self.rule_selector)

    def render(self) -> dict[str, Any]:
        """The configuration for the ServiceMonitors selected now."""
        cfg = config(
            self.monitors(),
            kubeconfig=self.sd_kubeconfig,
            scrape_interval=self.scrape_interval,
            evaluation_interval=self.scrape_interval,
        )
        if self.rule_selector is not None:
            cfg["rule_files"] = [str(self.rules_dir / "*.yaml")]
        return cfg

    def _sync_rules(self) -> bool:
        """Write one rule file per selected PrometheusRule, remove the others; True if any changed."""
        self.rules_dir.mkdir(parents=True, exist_ok=True)
        wanted = {rule_file_name(r): json.dumps(rule_file(r), indent=1, sort_keys=True) for r in self.rules()}
        changed = False
        for f in self.rules_dir.glob("*.yaml"):
            if f.name not in wanted:
                f.unlink()
                changed = True
        for name, text in wanted.items():
            f = self.rules_dir / name
            if not f.exists() or f.read_text() != text:
                f.write_text(text)
                changed = True
        return changed

    def sync(self) -> bool:
        """Rewrite the configuration and rule files if they changed and have Prometheus reload
        them; True if it did."""
        text = json.dumps(self.render(), indent=1, sort_keys=True)  # JSON is YAML
        rules_changed = self._sync_rules()
        if self.config_file.exists() and self.config_file.read_text() == text and not rules_changed:
            return False
        self.config_file.write_text(text)
        if self.proc is not None:
            req = urllib.request.Request(f"{self.address}/-/reload", method="POST")
            with urllib.request.urlopen(req, timeout=10) as r:
                if r.status != 200:
                    raise RuntimeError(f"prometheus reload answered {r.status}")
        self.jobs = [j["job_name"] for j in json.loads(text)["scrape_configs"]]
        return True

    def start(self, timeout: float = 60) -> None:
        """Start Prometheus and the sync thread; raises RuntimeError if it is not ready in time."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sync()
        log = open(self.log_file, "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.config_file}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address={self.listen}",
                "--web.enable-lifecycle",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_file.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready after {timeout}s: {self.log_file}")
            time.sleep(0.2)
        self._thread = threading.Thread(target=self._loop, name="prometheus-sync", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.sync_period):
            try:
                self.sync()
            except Exception as e:  # keep syncing; the caller sees errors through sync_errors
                self.sync_errors += 1
                self.last_error = str(e)

    def ready(self) -> bool:
        """Whether /-/ready answers 200."""
        try:
            with urllib.request.urlopen(f"{self.address}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector (``data.result``)."""
        url = f"{self.address}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as r:
            return list(json.loads(r.read())["data"]["result"])

    def alerts(self) -> list[dict[str, Any]]:
        """``/api/v1/alerts``: every pending and firing alert (labels, annotations, state...)."""
        with urllib.request.urlopen(f"{self.address}/api/v1/alerts", timeout=10) as r:
            return list(json.loads(r.read())["data"]["alerts"])

    def active_targets(self) -> list[dict[str, Any]]:
        """``/api/v1/targets`` active targets (labels, health, scrapeUrl...)."""
        with urllib.request.urlopen(f"{self.address}/api/v1/targets?state=active", timeout=10) as r:
            return list(json.loads(r.read())["data"]["activeTargets"])

    def stop(self) -> None:
        """Stop the sync thread and Prometheus (SIGTERM, then SIGKILL after 10 s)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
