"""Data drift of what kiln-serve serves, against the artifact's reference profile.

:class:`DriftMonitor` keeps the last ``window_rows`` served rows in fixed-size ring buffers
(float64: ``window_rows x features`` numbers, plus one column for the prediction), so memory is
constant per feature whatever the traffic. :meth:`DriftMonitor.observe` only copies a batch into
them (one slice assignment per input tensor under a lock held for microseconds); the statistics
(:mod:`kiln.monitoring.drift`) run every ``period_seconds`` in a background thread
(:meth:`DriftMonitor.start`) on a copy of the window, never on the request path.

Prometheus (the monitor is a collector: :meth:`DriftMonitor.collect` reads the last results;
labels ``model``, ``version``, ``namespace`` on every series):

- ``kiln_drift_reference_present``: 1 when the artifact has a reference profile, else 0 and no
  drift series at all ("no reference": nothing is invented);
- ``kiln_drift_window_rows``: rows in the window when drift was last computed;
- ``kiln_feature_drift{feature,method}``: the score of Evidently's default method for the
  feature (``ks``, ``chisquare``, ``z``: a p-value, low means drift; ``wasserstein``,
  ``jensenshannon``: a distance) and, for every feature, ``psi``;
- ``kiln_drift_detected{feature}``: 1 when the default method says drift (Evidently's threshold);
- ``kiln_prediction_drift{method}``, ``kiln_prediction_drift_detected``: the same for the
  prediction;
- ``kiln_drift_share``: the share of scored features that drifted (Evidently's dataset drift is
  a share >= 0.5);
- ``kiln_drift_computation_seconds``, ``kiln_drift_last_computed_timestamp_seconds``;
- ``kiln_drift_observed_rows_total``, ``kiln_drift_skipped_batches_total`` (batches whose
  tensors do not match the profile, not tracked).

Drift series appear once the window holds ``min_rows`` rows; a feature without finite values in
the window (or in the reference) has none (:meth:`DriftMonitor.snapshot` says why).

Settings (:class:`DriftSettings`, from the environment with :meth:`DriftSettings.from_env`):
``KILN_DRIFT_ENABLED`` (default true), ``KILN_DRIFT_WINDOW_ROWS`` (1000; at most 10,000, where
scipy's K-S stops being exact), ``KILN_DRIFT_PERIOD_SECONDS`` (30), ``KILN_DRIFT_MIN_ROWS`` (100).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kiln.monitoring import drift
from kiln.monitoring.drift import Sample
from kiln.monitoring.profile import ColumnProfile, Profile, ProfileError, load_profile, prediction_column

log = logging.getLogger("kiln.monitoring")

ENV_ENABLED = "KILN_DRIFT_ENABLED"
ENV_WINDOW_ROWS = "KILN_DRIFT_WINDOW_ROWS"
ENV_PERIOD_SECONDS = "KILN_DRIFT_PERIOD_SECONDS"
ENV_MIN_ROWS = "KILN_DRIFT_MIN_ROWS"


@dataclass(frozen=True)
class DriftSettings:
    """How the monitor samples and how often it computes (module docstring).

    Raises:
        ValueError: a value out of range (the message names the setting).
    """

    enabled: bool = True
    window_rows: int = 1000
    period_seconds: float = 30.0
    min_rows: int = 100

    def __post_init__(self) -> None:
        if not 1 <= self.window_rows <= drift.KS_EXACT_MAX_ROWS:
            raise ValueError(
                f"{ENV_WINDOW_ROWS} must be in [1, {drift.KS_EXACT_MAX_ROWS}], got {self.window_rows}"
            )
        if not 1 <= self.min_rows <= self.window_rows:
            raise ValueError(f"{ENV_MIN_ROWS} must be in [1, {ENV_WINDOW_ROWS}], got {self.min_rows}")
        if not (math.isfinite(self.period_seconds) and self.period_seconds > 0):
            raise ValueError(f"{ENV_PERIOD_SECONDS} must be a positive number, got {self.period_seconds}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DriftSettings:
        """Settings from ``KILN_DRIFT_*`` (unset: the defaults).

        Raises:
            ValueError: a value that is not a number of the right kind or is out of range.
        """
        env = os.environ if environ is None else environ
        d = cls()

        def get(name: str, conv: type, default: Any) -> Any:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            if conv is bool:
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(f"{name} must be true or false, got {raw!r}")
                return raw.lower() in ("1", "true", "yes", "on")
            try:
                return conv(raw)
            except ValueError:
                raise ValueError(f"{name} must be a {conv.__name__}, got {raw!r}") from None

        return cls(
            enabled=get(ENV_ENABLED, bool, d.enabled),
            window_rows=get(ENV_WINDOW_ROWS, int, d.window_rows),
            period_seconds=get(ENV_PERIOD_SECONDS, float, d.period_seconds),
            min_rows=get(ENV_MIN_ROWS, int, d.min_rows),
        )


@dataclass(frozen=True)
class ColumnDrift:
    """Drift of one column (feature or prediction) in one computation.

    ``method``/``score``/``threshold``/``drifted``: Evidently's default method for it (None with
    ``reason`` when there is no score); ``psi``: its PSI; ``rows``/``missing``: finite and
    dropped (NaN, inf) values in the window; ``quantiles``: the window's rows in the reference's
    quantile bins (``outside``: beyond the reference's range).
    """

    name: str
    rows: int
    missing: int
    method: str | None = None
    score: float | None = None
    threshold: float | None = None
    drifted: bool | None = None
    psi: float | None = None
    reason: str = ""
    quantiles: dict[str, Any] | None = None


@dataclass(frozen=True)
class DriftReport:
    """One computation: the window and every column's drift (see :class:`ColumnDrift`)."""

    reference: bool
    reason: str = ""
    window_rows: int = 0
    computed_at: float = 0.0
    seconds: float = 0.0
    features: tuple[ColumnDrift, ...] = ()
    prediction: ColumnDrift | None = None

    @property
    def drift_share(self) -> float | None:
        """Share of scored features that drifted; None when none was scored."""
        scored = [f.drifted for f in self.features if f.drifted is not None]
        return sum(scored) / len(scored) if scored else None


class _Window:
    """Ring buffers of the last ``rows`` served rows: one float64 ``(rows, columns)`` array per
    tracked input tensor and one ``(rows,)`` for the prediction. Not thread-safe (the monitor
    locks)."""

    def __init__(self, profile: Profile, rows: int) -> None:
        self.rows = rows
        self.pos = 0
        self.filled = 0
        widths = {i.name: i.width for i in profile.inputs}
        self.inputs: list[tuple[str, int, npt.NDArray[np.intp] | None, npt.NDArray[np.float64]]] = []
        self.columns: list[tuple[int, int]] = []  # per feature: (input slot, buffer column)
        for name in dict.fromkeys(f.input for f in profile.features):
            idx = np.asarray([f.index for f in profile.features if f.input == name], dtype=np.intp)
            cols = None if np.array_equal(idx, np.arange(widths[name])) else idx
            self.inputs.append((name, widths[name], cols, np.full((rows, idx.size), np.nan)))
        slot = {name: k for k, (name, *_rest) in enumerate(self.inputs)}
        seen: dict[str, int] = {}
        for f in profile.features:
            self.columns.append((slot[f.input], seen.get(f.input, 0)))
            seen[f.input] = seen.get(f.input, 0) + 1
        p = profile.prediction
        self.prediction = (p.output, p.transform) if p is not None else None
        self.pred = np.full(rows, np.nan)

    def rows_of(self, inputs: Mapping[str, Any]) -> list[npt.NDArray[Any]] | None:
        """Each tracked input as ``(k, columns)``; None when one is missing or misshapen."""
        out, k = [], None
        for name, width, cols, _ in self.inputs:
            a = inputs.get(name)
            if not isinstance(a, np.ndarray) or a.ndim == 0 or a.size != a.shape[0] * width:
                return None
            if k is not None and a.shape[0] != k:
                return None
            k = a.shape[0]
            flat = a.reshape(k, width)
            out.append(flat if cols is None else flat[:, cols])
        return out

    def append(self, batch: list[npt.NDArray[Any]], pred: npt.NDArray[Any] | None) -> int:
        """Write a batch (from :meth:`rows_of`) and its predictions; returns its row count."""
        k = batch[0].shape[0] if batch else (pred.shape[0] if pred is not None else 0)
        start = max(0, k - self.rows)  # a batch larger than the window: its last rows
        n = k - start
        for (_, _, _, buf), src in zip(self.inputs, batch, strict=True):
            self._put(buf, src[start:])
        if pred is not None and pred.shape[0] == k:
            self._put(self.pred, pred[start:])
        else:
            self._put(self.pred, np.full(n, np.nan))
        self.pos = (self.pos + n) % self.rows
        self.filled = min(self.rows, self.filled + n)
        return k

    def _put(self, buf: npt.NDArray[np.float64], src: npt.NDArray[Any]) -> None:
        n, first = src.shape[0], min(src.shape[0], self.rows - self.pos)
        buf[self.pos : self.pos + first] = src[:first]
        if first < n:
            buf[: n - first] = src[first:]

    def copy(self) -> tuple[list[npt.NDArray[np.float64]], npt.NDArray[np.float64]]:
        """The filled rows of every buffer (row order does not matter to the statistics)."""
        return [buf[: self.filled].copy() for *_, buf in self.inputs], self.pred[: self.filled].copy()


def _current_quantiles(ref: ColumnProfile, cur: Sample) -> dict[str, Any] | None:
    if ref.quantiles is None:
        return None
    edges = np.asarray(ref.quantiles.edges)
    inside = (cur.values >= edges[0]) & (cur.values <= edges[-1])
    if edges[0] < edges[-1]:
        counts = np.histogram(cur.values[inside], edges, weights=cur.counts[inside])[0]
    else:
        counts = np.asarray([cur.counts[inside].sum()])
    return {
        "edges": ref.quantiles.edges,
        "reference": ref.quantiles.counts,
        "current": [int(c) for c in counts],
        "outside": int(cur.counts[~inside].sum()),
    }


def column_drift(ref_profile: ColumnProfile, ref: Sample, cur: Sample, window_rows: int) -> ColumnDrift:
    """Drift of one column: ``cur`` holds the finite values among the window's
    ``window_rows``. A K-S score is left to :func:`_score_ks` (batched over columns)."""
    base = ColumnDrift(ref_profile.name, rows=cur.n, missing=window_rows - cur.n)
    if ref.n == 0:
        return replace(base, reason="the reference has no finite values")
    if cur.n == 0:
        return replace(base, reason="no finite values in the window")
    numerical = ref_profile.numerical
    method = drift.default_method(ref, cur, numerical)
    quantiles = _current_quantiles(ref_profile, cur)
    psi = drift.psi(ref, cur, numerical)
    if method == drift.KS:  # scored in one batch for all features
        return replace(base, method=method, psi=psi, quantiles=quantiles)
    s = drift.score(ref, cur, numerical, method)
    return replace(
        base,
        method=method,
        score=s.score,
        threshold=s.threshold,
        drifted=s.drifted,
        psi=psi,
        quantiles=quantiles,
    )


class DriftMonitor:
    """Tracks served rows against a reference :class:`~kiln.monitoring.profile.Profile`.

    Args:
        profile: the artifact's profile; None: "no reference" (observe does nothing, the
            gauges say so).
        model, version, namespace: label values of every series.
        settings: window, period, minimum rows (:class:`DriftSettings`).
        registry: where to register as a collector (None: not registered).
        reason: why there is no profile (shown by :meth:`snapshot`), when ``profile`` is None.
    """

    def __init__(
        self,
        profile: Profile | None,
        *,
        model: str,
        version: str,
        namespace: str = "",
        settings: DriftSettings | None = None,
        registry: CollectorRegistry | None = None,
        reason: str = "",
    ) -> None:
        self.settings = settings or DriftSettings()
        self.profile = profile if self.settings.enabled else None
        self.labels = (model, version, namespace)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observed = 0
        self._skipped = 0
        self._errors = 0
        self._window = _Window(self.profile, self.settings.window_rows) if self.profile is not None else None
        self._refs = [f.sample() for f in self.profile.features] if self.profile is not None else []
        self._pred_ref = (
            self.profile.prediction.sample() if self.profile and self.profile.prediction is not None else None
        )
        why = reason or (
            "drift monitoring is disabled"
            if not self.settings.enabled
            else "the artifact has no reference profile"
        )
        self._report = DriftReport(reference=self.profile is not None, reason="" if self.profile else why)
        if registry is not None:
            registry.register(self)

    @classmethod
    def from_artifact(cls, artifact_dir: str | Path, **kwargs: Any) -> DriftMonitor:
        """A monitor for the artifact at ``artifact_dir``: its ``profile.json``, or "no
        reference" when it has none or it is invalid (logged; never raises for that).
        ``kwargs``: as the constructor."""
        try:
            profile = load_profile(artifact_dir)
            reason = "" if profile is not None else "the artifact has no reference profile (profile.json)"
        except (ProfileError, OSError) as e:
            log.error("drift: ignoring the reference profile: %s", e)
            profile, reason = None, f"the reference profile is invalid: {e}"
        return cls(profile, reason=reason, **kwargs)

    # --- request path ---------------------------------------------------------------------

    def observe(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any] | None = None) -> None:
        """Record a served batch: ``inputs`` as given to the model (``{name: array (rows,
        ...)}``) and its ``outputs``. Copies the rows into the window and returns; never
        raises (a batch that does not match the profile is counted as skipped)."""
        w = self._window
        if w is None:
            return
        try:
            batch = w.rows_of(inputs)
            if batch is None:
                with self._lock:
                    self._skipped += 1
                return
            pred = None
            if w.prediction is not None and outputs is not None:
                out = outputs.get(w.prediction[0])
                if isinstance(out, np.ndarray) and out.ndim >= 1 and out.shape[0] > 0:
                    pred = prediction_column(out, w.prediction[1])
            with self._lock:
                self._observed += w.append(batch, pred)
        except Exception:  # never fail a request for monitoring
            self._errors += 1
            if self._errors == 1:
                log.exception("drift: could not record a batch (logged once)")

    # --- computation -----------------------------------------------------------------------

    def compute(self) -> DriftReport:
        """Compute drift over the current window now (the background thread calls this every
        ``period_seconds``) and keep the result for :meth:`collect` and :meth:`snapshot`."""
        if self.profile is None or self._window is None:
            return self._report
        started = time.perf_counter()
        with self._lock:
            columns, pred = self._window.copy()
        rows = int(pred.size)
        if rows < self.settings.min_rows:
            report = DriftReport(
                reference=True,
                reason=f"the window holds {rows} rows; drift is computed from {self.settings.min_rows}",
                window_rows=rows,
                computed_at=time.time(),
            )
        else:
            feats, prediction = self._score(columns, pred)
            report = DriftReport(
                reference=True,
                window_rows=rows,
                computed_at=time.time(),
                seconds=time.perf_counter() - started,
                features=tuple(feats),
                prediction=prediction,
            )
        self._report = report
        return report

    def _score(
        self, columns: list[npt.NDArray[np.float64]], pred: npt.NDArray[np.float64]
    ) -> tuple[list[ColumnDrift], ColumnDrift | None]:
        """Every feature's and the prediction's drift over a copy of the window."""
        assert self.profile is not None and self._window is not None
        rows = int(pred.size)
        items = []
        for f, ref, (slot, col) in zip(self.profile.features, self._refs, self._window.columns, strict=True):
            cur = Sample.of(columns[slot][:, col])
            items.append((column_drift(f, ref, cur, rows), ref, cur))
        if self.profile.prediction is not None and self._pred_ref is not None:
            cur = Sample.of(pred)
            items.append(
                (column_drift(self.profile.prediction, self._pred_ref, cur, rows), self._pred_ref, cur)
            )
        scored = _score_ks(items)
        n = len(self.profile.features)
        return scored[:n], (scored[n] if len(scored) > n else None)

    def start(self) -> None:
        """Compute every ``period_seconds`` in a daemon thread until :meth:`stop`."""
        if self._thread is not None or self.profile is None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kiln-drift", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the background thread (waits up to ``timeout`` seconds for a computation)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.settings.period_seconds):
            try:
                self.compute()
            except Exception:
                log.exception("drift: computation failed")

    # --- results ------------------------------------------------------------------------------

    @property
    def report(self) -> DriftReport:
        """The last computation's result."""
        return self._report

    def snapshot(self) -> dict[str, Any]:
        """The last result as a JSON-able dict (for a debug endpoint): settings, window,
        per-column scores with the reasons for missing ones, and the quantile histograms."""
        r = self._report
        return _finite(
            {
                "model": self.labels[0],
                "version": self.labels[1],
                "namespace": self.labels[2],
                "reference": r.reference,
                "reason": r.reason,
                "settings": asdict(self.settings),
                "observedRows": self._observed,
                "skippedBatches": self._skipped,
                "windowRows": r.window_rows,
                "computedAt": r.computed_at or None,
                "computationSeconds": r.seconds,
                "driftShare": r.drift_share,
                "features": [asdict(f) for f in r.features],
                "prediction": asdict(r.prediction) if r.prediction is not None else None,
            }
        )

    def describe(self) -> list[Metric]:
        """No description: the series depend on the data (prometheus_client then skips the
        duplicate check at registration instead of calling :meth:`collect`)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The Prometheus series of the last result (module docstring); no computation."""
        yield from _families(self._report, self.labels, self._observed, self._skipped)


def _score_ks(items: list[tuple[ColumnDrift, Sample, Sample]]) -> list[ColumnDrift]:
    """The columns of ``items`` (result, reference, current) with their K-S scores filled in,
    computed in one batch (columns of equal sizes share the p-value computation)."""
    todo = [k for k, (c, _, _) in enumerate(items) if c.method == drift.KS]
    out = [c for c, _, _ in items]
    if not todo:
        return out
    results = drift.ks_2samp_pairs([(items[k][1], items[k][2]) for k in todo])
    threshold = drift.METHODS[drift.KS][0]
    for k, (_, p) in zip(todo, results, strict=True):
        out[k] = replace(out[k], score=p, threshold=threshold, drifted=drift.is_drift(drift.KS, p))
    return out


def _finite(v: Any) -> Any:
    """``v`` with non-finite floats replaced by None (JSON has no NaN)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def _gauge(name: str, doc: str, labels: list[str], values: list[tuple[list[str], float]]) -> Metric:
    g = GaugeMetricFamily(name, doc, labels=labels)
    for lv, v in values:
        g.add_metric(lv, v)
    return g


def _families(r: DriftReport, labels: tuple[str, str, str], observed: int, skipped: int) -> Iterator[Metric]:
    """The series of the module docstring, from the last report and the counters."""
    base, lv = ["model", "version", "namespace"], list(labels)
    yield _gauge(
        "kiln_drift_reference_present",
        "1 when the served artifact has a reference profile.",
        base,
        [(lv, float(r.reference))],
    )
    rows = CounterMetricFamily("kiln_drift_observed_rows", "Served rows recorded for drift.", labels=base)
    rows.add_metric(lv, float(observed))
    skip = CounterMetricFamily(
        "kiln_drift_skipped_batches", "Served batches not matching the reference profile.", labels=base
    )
    skip.add_metric(lv, float(skipped))
    yield from (rows, skip)
    if not r.reference:
        return
    yield _gauge(
        "kiln_drift_window_rows",
        "Rows in the drift window at the last computation.",
        base,
        [(lv, float(r.window_rows))],
    )
    if r.computed_at:
        yield _gauge(
            "kiln_drift_last_computed_timestamp_seconds",
            "Unix time of the last drift computation.",
            base,
            [(lv, r.computed_at)],
        )
        yield _gauge(
            "kiln_drift_computation_seconds",
            "Duration of the last drift computation.",
            base,
            [(lv, r.seconds)],
        )
    scores, verdicts = [], []
    for f in r.features:
        if f.score is not None and f.method is not None:
            scores.append(([*lv, f.name, f.method], f.score))
            verdicts.append(([*lv, f.name], float(bool(f.drifted))))
        if f.psi is not None:
            scores.append(([*lv, f.name, drift.PSI], f.psi))
    yield _gauge(
        "kiln_feature_drift",
        "Drift score of a feature by method (p-value for ks/chisquare/z, else a distance).",
        [*base, "feature", "method"],
        scores,
    )
    yield _gauge(
        "kiln_drift_detected",
        "1 when the feature drifted by its default method and threshold.",
        [*base, "feature"],
        verdicts,
    )
    p = r.prediction
    scores, verdicts = [], []
    if p is not None and p.score is not None and p.method is not None:
        scores.append(([*lv, p.method], p.score))
        verdicts.append((lv, float(bool(p.drifted))))
    if p is not None and p.psi is not None:
        scores.append(([*lv, drift.PSI], p.psi))
    yield _gauge(
        "kiln_prediction_drift", "Drift score of the prediction by method.", [*base, "method"], scores
    )
    yield _gauge("kiln_prediction_drift_detected", "1 when the prediction drifted.", base, verdicts)
    if r.drift_share is not None:
        yield _gauge("kiln_drift_share", "Share of features that drifted.", base, [(lv, r.drift_share)])
