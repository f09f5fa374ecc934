"""Drift statistics between a reference sample and a current one, as Evidently computes them.

Pure functions of two :class:`Sample` objects (a multiset of finite numbers: sorted distinct
values and their counts), numpy only. Every number is the one Evidently 0.7 reports for the
same two columns (``evidently.legacy.calculations.stattests``, which ``ValueDrift`` and
``DataDriftPreset`` use), and where Evidently calls scipy, the one scipy 1.17 returns; the
cross-check tests (``tests/unit/monitoring``) compare to 1e-6. Sources:

- Method choice (Evidently's "data drift algorithm",
  https://docs.evidentlyai.com/reference/data-drift-algorithm, and ``_get_default_stattest``):
  with <= 1000 reference rows, numerical columns with more than 5 distinct values (reference and
  current together) get the two-sample Kolmogorov-Smirnov test, other columns chi-squared (more
  than 2 distinct values) or the two-proportion Z-test; with more rows, numerical columns with
  more than 5 distinct values get the Wasserstein distance normed by the reference's standard
  deviation, others the Jensen-Shannon distance. Thresholds (Evidently's defaults): p-values
  0.05 (drift when ``p <= 0.05`` for K-S, ``p < 0.05`` for chi-squared and Z), distances 0.1
  (drift when ``>= 0.1``).
- PSI and Jensen-Shannon bin as Evidently's ``get_binned_data``: a numerical column whose
  reference has more than 20 distinct values is cut into ``numpy.histogram_bin_edges(reference
  + current, "sturges")`` bins; any other column is counted per distinct value. PSI replaces
  empty bins by ``min(non-zero share) / 1e6`` when that minimum is <= 1e-4, else by 1e-4
  (each side separately), then ``PSI = sum((ref - cur) * ln(ref / cur))``. Jensen-Shannon
  distance (natural log) is ``scipy.spatial.distance.jensenshannon`` of the raw shares.
- Kolmogorov-Smirnov: ``scipy.stats.ks_2samp(method="auto")``, two-sided: the statistic and
  the exact p-value (scipy's ``_compute_prob_outside_square`` when both sizes are equal, else
  Hodges' inside method as in scipy's ``_compute_outer_prob_inside_method``, Viehmann's 1 - p
  recursion), evaluated here along anti-diagonals so the loop runs in numpy. Exact is what
  ``auto`` does up to 10,000 rows a side; larger samples are refused (:class:`ValueError`).
- Wasserstein: ``scipy.stats.wasserstein_distance`` (the L1 distance of the empirical CDFs)
  divided by ``max(std(reference), 0.001)`` (population standard deviation).
- Chi-squared: ``scipy.stats.chisquare`` of the current counts against the reference counts
  scaled to the current total (a category new in the current window has an expected count of 0,
  so the statistic is infinite and the p-value 0, as in Evidently).
- Z-test: the pooled two-proportion test of "not the smallest value", two-sided, p-value
  ``2 * (1 - Phi(|z|))``; 1 when both samples hold the same single value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: Evidently's small-reference rule: at most this many reference rows use the statistical tests.
SMALL_REFERENCE_ROWS = 1000
#: scipy's ``ks_2samp`` ``auto`` computes the exact p-value up to this many rows a side.
KS_EXACT_MAX_ROWS = 10_000

KS = "ks"
CHISQUARE = "chisquare"
Z = "z"
WASSERSTEIN = "wasserstein"
JENSENSHANNON = "jensenshannon"
PSI = "psi"
#: Method -> (Evidently's default threshold, whether the score is a p-value: low means drift).
METHODS: dict[str, tuple[float, bool]] = {
    KS: (0.05, True),
    CHISQUARE: (0.05, True),
    Z: (0.05, True),
    WASSERSTEIN: (0.1, False),
    JENSENSHANNON: (0.1, False),
    PSI: (0.1, False),
}

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class Sample:
    """A multiset of finite numbers: ``values`` sorted and distinct (float64), ``counts`` (int64,
    each >= 1) aligned with them. Equivalent, for every statistic here, to the column holding
    each value ``count`` times."""

    values: FloatArray
    counts: IntArray

    @property
    def n(self) -> int:
        """Number of rows."""
        return int(self.counts.sum())

    @classmethod
    def of(cls, column: npt.ArrayLike) -> Sample:
        """The finite values of ``column`` (NaN and +-inf dropped, as Evidently drops them)."""
        x = np.asarray(column, dtype=np.float64).ravel()
        values, counts = np.unique(x[np.isfinite(x)], return_counts=True)
        return cls(values, counts.astype(np.int64))

    @classmethod
    def from_counts(cls, values: npt.ArrayLike, counts: npt.ArrayLike) -> Sample:
        """From distinct values and their counts (any order; zero counts dropped).

        Raises:
            ValueError: lengths differ, a value repeats or is not finite, a count is negative.
        """
        v = np.asarray(values, dtype=np.float64).ravel()
        c = np.asarray(counts, dtype=np.int64).ravel()
        if v.shape != c.shape:
            raise ValueError(f"{v.size} values but {c.size} counts")
        if not np.isfinite(v).all() or (c < 0).any():
            raise ValueError("values must be finite and counts >= 0")
        order = np.argsort(v, kind="stable")
        v, c = v[order], c[order]
        if v.size > 1 and (np.diff(v) == 0).any():
            raise ValueError("values must be distinct")
        keep = c > 0
        return cls(v[keep], c[keep])

    def cumulative(self, at: FloatArray) -> IntArray:
        """Number of rows ``<= x`` for each ``x`` in ``at``."""
        cum = np.concatenate(([0], np.cumsum(self.counts)))
        return cum[np.searchsorted(self.values, at, side="right")]

    def counts_at(self, keys: FloatArray) -> IntArray:
        """Count of each of ``keys`` (sorted) in this sample, 0 for absent ones."""
        i = np.searchsorted(keys, self.values)
        out = np.zeros(keys.size, dtype=np.int64)
        out[i] = self.counts
        return out

    def std(self) -> float:
        """Population standard deviation (``numpy.std``, ddof 0)."""
        n = self.n
        mean = float(np.dot(self.values, self.counts)) / n
        return math.sqrt(float(np.dot((self.values - mean) ** 2, self.counts)) / n)


def _check(ref: Sample, cur: Sample) -> None:
    if ref.n == 0 or cur.n == 0:
        raise ValueError("drift needs at least one finite value on each side")


# --- Kolmogorov-Smirnov --------------------------------------------------------------------


def ks_2samp(ref: Sample, cur: Sample) -> tuple[float, float]:
    """Two-sided two-sample Kolmogorov-Smirnov test: ``(statistic, p-value)`` as
    ``scipy.stats.ks_2samp(ref, cur)`` returns them (exact method; the statistic is rounded to
    a multiple of ``1 / lcm(n1, n2)`` as scipy's exact branch does).

    Raises:
        ValueError: an empty sample, or more than :data:`KS_EXACT_MAX_ROWS` rows on a side.
    """
    return ks_2samp_pairs([(ref, cur)])[0]


def ks_2samp_pairs(pairs: list[tuple[Sample, Sample]]) -> list[tuple[float, float]]:
    """:func:`ks_2samp` of each ``(reference, current)`` pair; pairs of equal sizes share one
    vectorised p-value computation (what the monitor does for many features at once).

    Raises:
        ValueError: as :func:`ks_2samp`, for any pair.
    """
    stats: list[tuple[int, int, int]] = []  # (n1, n2, h) per pair
    for ref, cur in pairs:
        _check(ref, cur)
        n1, n2 = ref.n, cur.n
        if max(n1, n2) > KS_EXACT_MAX_ROWS:
            raise ValueError(f"K-S exact p-value: at most {KS_EXACT_MAX_ROWS} rows a side, got {n1} and {n2}")
        pts = np.union1d(ref.values, cur.values)
        diffs = ref.cumulative(pts) / n1 - cur.cumulative(pts) / n2
        max_s = float(diffs.max())
        min_s = float(np.clip(-diffs.min(), 0, 1))
        d = min_s if min_s > max_s else max_s
        g = math.gcd(n1, n2)
        lcm = (n1 // g) * n2
        stats.append((n1, n2, int(np.round(d * lcm))))
    p = np.ones(len(pairs))
    groups: dict[tuple[int, int], list[int]] = {}
    for k, (n1, n2, h) in enumerate(stats):
        if h > 0:
            groups.setdefault((n1, n2), []).append(k)
    for (n1, n2), idx in groups.items():
        hs = [stats[k][2] for k in idx]
        if n1 == n2:
            p[idx] = [_prob_outside_square(n1, h) for h in hs]
        else:
            p[idx] = _prob_outside_band(n1, n2, np.asarray(hs, dtype=np.int64))
    out = []
    for k, (n1, n2, h) in enumerate(stats):
        lcm = (n1 // math.gcd(n1, n2)) * n2
        out.append((h * 1.0 / lcm, float(np.clip(p[k], 0.0, 1.0))))
    return out


def _prob_outside_square(n: int, h: int) -> float:
    """P(D_{n,n} >= h/n): scipy's ``_compute_prob_outside_square`` (Horner form of the
    alternating binomial sum), term for term."""
    p = 0.0
    k = int(np.floor(n / h))
    while k >= 0:
        p1 = 1.0
        for j in range(h):
            p1 = (n - k * h - j) * p1 / (n + k * h + j + 1)
        p = p1 * (1.0 - p)
        k -= 1
    return 2 * p


def _prob_outside_band(n1: int, n2: int, hs: npt.NDArray[np.int64]) -> FloatArray:
    """For each ``h`` of ``hs``: the share of lattice paths from (0, 0) to (m, n) that leave the
    band ``|x/m - y/n| < h/lcm(m, n)`` (m >= n), i.e. the exact two-sided p-value.

    The recursion of scipy's ``_compute_outer_prob_inside_method`` (Hodges' inside method in
    Viehmann's 1 - p form): ``q(x, y) = (q(x-1, y) x + q(x, y-1) y) / (x + y)`` inside the band,
    1 outside, ``q(0, 0) = 0``. scipy walks columns; this walks anti-diagonals ``x + y = s`` so
    each step is a few numpy operations over every ``h`` at once. Each value is computed with
    the same floating-point operations in the same order as scipy's.
    """
    m, n = max(n1, n2), min(n1, n2)
    g = math.gcd(m, n)
    mg, ng = m // g, n // g
    band = mg + ng
    hmax = int(hs.max())
    q = np.ones((hs.size, m + 2))  # q[:, x + 1] on the current diagonal; column 0 is x = -1
    q[:, 1] = 0.0  # (0, 0) is inside the band (h >= 1)
    prev = (0, 0)
    xf = np.arange(m + 1, dtype=np.float64)
    offset = band * np.arange(m + 1, dtype=np.int64)
    h_col = hs[:, None]
    for s in range(1, m + n + 1):
        lo = max(0, s - n, (mg * s - hmax) // band + 1)
        hi = min(m, s, -((-(mg * s + hmax)) // band) - 1)
        if lo > hi:  # every path leaves the band here
            return np.ones(hs.size)
        x = xf[lo : hi + 1]
        new = q[:, lo : hi + 1] * x  # q(x-1, y) x + q(x, y-1) y, then / (x + y), as scipy
        new += q[:, lo + 1 : hi + 2] * (s - x)
        new /= s
        inside = np.abs(offset[lo : hi + 1] - mg * s) < h_col
        q[:, prev[0] + 1 : prev[1] + 2] = 1.0
        np.copyto(q[:, lo + 1 : hi + 2], new, where=inside)
        prev = (lo, hi)
    return q[:, m + 1].copy()


# --- distances -------------------------------------------------------------------------------


def wasserstein_distance(ref: Sample, cur: Sample) -> float:
    """First Wasserstein distance of the two empirical distributions
    (``scipy.stats.wasserstein_distance``), in the data's units."""
    _check(ref, cur)
    pts = np.union1d(ref.values, cur.values)
    cdf_r = ref.cumulative(pts[:-1]) / ref.n
    cdf_c = cur.cumulative(pts[:-1]) / cur.n
    return float(np.dot(np.abs(cdf_r - cdf_c), np.diff(pts)))


def wasserstein_normed(ref: Sample, cur: Sample) -> float:
    """Evidently's ``wasserstein``: :func:`wasserstein_distance` / ``max(std(ref), 0.001)``."""
    return wasserstein_distance(ref, cur) / max(ref.std(), 0.001)


def sturges_edges(ref: Sample, cur: Sample) -> FloatArray:
    """``numpy.histogram_bin_edges(reference + current, bins="sturges")`` of the rows of both."""
    lo = float(min(ref.values[0], cur.values[0]))
    hi = float(max(ref.values[-1], cur.values[-1]))
    size = ref.n + cur.n
    ptp = np.float64(hi) - np.float64(lo)
    first, last = (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)
    width = ptp / (np.log2(size) + 1.0)
    bins = int(np.ceil((np.float64(last) - np.float64(first)) / width)) if width else 1
    return np.linspace(first, last, bins + 1, endpoint=True, dtype=np.float64)


def binned_shares(
    ref: Sample, cur: Sample, numerical: bool, fill_zeroes: bool
) -> tuple[FloatArray, FloatArray]:
    """Evidently's ``get_binned_data``: the shares of rows per bin (Sturges bins of both
    samples for a numerical column with more than 20 distinct reference values, else one bin
    per distinct value of either side), with empty bins filled as PSI does when ``fill_zeroes``."""
    _check(ref, cur)
    if numerical and ref.values.size > 20:
        edges = sturges_edges(ref, cur)
        r = np.histogram(ref.values, edges, weights=ref.counts)[0] / ref.n
        c = np.histogram(cur.values, edges, weights=cur.counts)[0] / cur.n
    else:
        keys = np.union1d(ref.values, cur.values)
        r = ref.counts_at(keys) / ref.n
        c = cur.counts_at(keys) / cur.n
    if fill_zeroes:
        r, c = _fill_zeroes(r), _fill_zeroes(c)
    return r, c


def _fill_zeroes(p: FloatArray) -> FloatArray:
    smallest = float(p[p != 0].min())
    return np.where(p == 0, smallest / 10**6 if smallest <= 0.0001 else 0.0001, p)


def psi(ref: Sample, cur: Sample, numerical: bool) -> float:
    """Population stability index, Evidently's ``psi`` (binning and empty-bin rule above)."""
    r, c = binned_shares(ref, cur, numerical, fill_zeroes=True)
    return float(np.sum((r - c) * np.log(r / c)))


def jensenshannon(ref: Sample, cur: Sample, numerical: bool) -> float:
    """Jensen-Shannon distance (natural log), Evidently's ``jensenshannon``: scipy's
    ``jensenshannon`` of :func:`binned_shares` without filling."""
    p, q = binned_shares(ref, cur, numerical, fill_zeroes=False)
    p, q = p / np.sum(p), q / np.sum(q)
    m = (p + q) / 2.0
    js = float(np.sum(_rel_entr(p, m)) + np.sum(_rel_entr(q, m)))
    return math.sqrt(js / 2.0)


def _rel_entr(x: FloatArray, y: FloatArray) -> FloatArray:
    """``scipy.special.rel_entr``: x log(x/y) for x, y > 0; 0 for x = 0, y >= 0; inf else."""
    with np.errstate(divide="ignore", invalid="ignore"):
        v = x * np.log(x / y)
    return np.where((x > 0) & (y > 0), v, np.where((x == 0) & (y >= 0), 0.0, np.inf))


# --- tests on counts -----------------------------------------------------------------------


def chisquare_pvalue(ref: Sample, cur: Sample) -> float:
    """Evidently's ``chisquare``: ``scipy.stats.chisquare(f_obs=current counts, f_exp=reference
    counts * n_cur / n_ref)`` over the distinct values of both, its p-value.

    Raises:
        ValueError: an empty sample or a single distinct value (no degree of freedom).
    """
    _check(ref, cur)
    keys = np.union1d(ref.values, cur.values)
    if keys.size < 2:
        raise ValueError("chi-squared needs at least two distinct values")
    k_norm = cur.n / ref.n
    f_exp = ref.counts_at(keys) * k_norm
    f_obs = cur.counts_at(keys).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = float(np.sum((f_obs - f_exp) ** 2 / f_exp))
    return chi2_sf(stat, keys.size - 1)


def z_pvalue(ref: Sample, cur: Sample) -> float:
    """Evidently's ``z``: two-proportion Z-test (pooled) of "not the smallest value"."""
    _check(ref, cur)
    if ref.values.size == 1 and cur.values.size == 1 and ref.values[0] == cur.values[0]:
        return 1.0
    key = min(ref.values[0], cur.values[0])
    n1, n2 = ref.n, cur.n
    p1 = float(n1 - int(ref.counts[ref.values == key].sum())) / n1
    p2 = float(n2 - int(cur.counts[cur.values == key].sum())) / n2
    pooled = float(p1 * n1 + p2 * n2) / (n1 + n2)
    z = (p1 - p2) / math.sqrt(pooled * (1 - pooled) * (1.0 / n1 + 1.0 / n2))
    return 2 * (1 - normal_cdf(abs(z)))


def normal_cdf(x: float) -> float:
    """Standard normal CDF (cephes ``ndtr``: erf near 0, erfc in the tails)."""
    t = x / math.sqrt(2.0)
    if abs(t) < 1 / math.sqrt(2.0):
        return 0.5 + 0.5 * math.erf(t)
    y = 0.5 * math.erfc(abs(t))
    return 1.0 - y if t > 0 else y


def chi2_sf(x: float, dof: int) -> float:
    """Survival function of the chi-squared distribution: the regularised upper incomplete
    gamma ``Q(dof/2, x/2)`` (series below ``a + 1``, Lentz's continued fraction above;
    Numerical Recipes 6.2). ``inf`` gives 0."""
    if math.isinf(x):
        return 0.0
    return _gammaincc(dof / 2.0, x / 2.0)


def _gammaincc(a: float, x: float) -> float:
    if x <= 0:
        return 1.0
    log_prefix = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:  # P(a, x) by its series
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-17:
                break
        return 1.0 - total * math.exp(log_prefix)
    tiny = 1e-300  # Q(a, x) by its continued fraction (modified Lentz)
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-17:
            break
    return math.exp(log_prefix) * h


# --- method choice -------------------------------------------------------------------------


def default_method(ref: Sample, cur: Sample, numerical: bool) -> str:
    """Evidently's default method for a column (module docstring): ``ks``, ``chisquare``,
    ``z``, ``wasserstein`` or ``jensenshannon``."""
    n_values = np.union1d(ref.values, cur.values).size
    if ref.n <= SMALL_REFERENCE_ROWS:
        if numerical and n_values > 5:
            return KS
        return CHISQUARE if n_values > 2 else Z
    return WASSERSTEIN if numerical and n_values > 5 else JENSENSHANNON


@dataclass(frozen=True)
class DriftScore:
    """One method's result: ``score`` (a p-value or a distance, see :data:`METHODS`), the
    ``threshold`` it was compared with, and whether that means drift."""

    method: str
    score: float
    threshold: float
    drifted: bool


def is_drift(method: str, score: float, threshold: float | None = None) -> bool:
    """Evidently's verdict: ``p <= t`` (K-S), ``p < t`` (chi-squared, Z), ``d >= t`` (distances)."""
    default, is_p = METHODS[method]
    t = default if threshold is None else threshold
    if method == KS:
        return score <= t
    return score < t if is_p else score >= t


_SCORERS: dict[str, Callable[[Sample, Sample, bool], float]] = {
    KS: lambda r, c, _: ks_2samp(r, c)[1],
    CHISQUARE: lambda r, c, _: chisquare_pvalue(r, c),
    Z: lambda r, c, _: z_pvalue(r, c),
    WASSERSTEIN: lambda r, c, _: wasserstein_normed(r, c),
    JENSENSHANNON: jensenshannon,
    PSI: psi,
}


def score(ref: Sample, cur: Sample, numerical: bool, method: str | None = None) -> DriftScore:
    """Drift of ``cur`` against ``ref`` by ``method`` (default: :func:`default_method`) with
    Evidently's default threshold.

    Raises:
        ValueError: an empty sample, an unknown method, or one that does not apply (K-S over
            10,000 rows, chi-squared of a single value).
    """
    _check(ref, cur)
    m = method or default_method(ref, cur, numerical)
    if m not in _SCORERS:
        raise ValueError(f"unknown drift method {m!r} (known: {', '.join(_SCORERS)})")
    value = _SCORERS[m](ref, cur, numerical)
    threshold = METHODS[m][0]
    return DriftScore(m, value, threshold, is_drift(m, value, threshold))
