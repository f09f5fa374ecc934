"""kiln.monitoring.drift against scipy (the functions Evidently calls) and numpy, to 1e-6.

scipy is in the project's venv through scikit-learn (the train extra), never a dependency of
kiln-serve: Kiln carries its own numpy versions and these tests pin them to scipy's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kiln.monitoring import drift
from kiln.monitoring.drift import Sample

from .conftest import Case, cases

stats = pytest.importorskip("scipy.stats")
distance = pytest.importorskip("scipy.spatial.distance")

TOLERANCE = 1e-6


def close(a: float, b: float) -> bool:
    """Within 1e-6 absolutely and relatively (so that tiny p-values are checked too)."""
    return a == b or abs(a - b) <= TOLERANCE * min(1.0, abs(b))


def _finite(x: np.ndarray) -> np.ndarray:
    return x[np.isfinite(x)]


@pytest.mark.parametrize("case", [c for c in cases() if c.numerical], ids=lambda c: c.id)
def test_ks_and_wasserstein_equal_scipy_on_the_cases(case: Case) -> None:
    a, b = _finite(case.reference), _finite(case.current)
    ref, cur = Sample.of(case.reference), Sample.of(case.current)
    theirs = stats.ks_2samp(a, b)
    ours = drift.ks_2samp(ref, cur)
    assert close(ours[0], float(theirs.statistic)) and close(ours[1], float(theirs.pvalue)), (ours, theirs)
    assert close(drift.wasserstein_distance(ref, cur), stats.wasserstein_distance(a, b))
    assert close(drift.wasserstein_normed(ref, cur), stats.wasserstein_distance(a, b) / max(np.std(a), 0.001))


def test_ks_exact_p_values_over_many_sizes_equal_scipy() -> None:
    """Both exact branches (equal sizes; Hodges' inside method), ties, p from ~1 to ~1e-300,
    sizes 1..1500 with common divisors and coprime ones."""
    rng = np.random.default_rng(7)
    for trial in range(150):
        n1, n2 = int(rng.integers(1, 1500)), int(rng.integers(1, 1500))
        if trial % 5 == 0:
            n2 = n1
        a = rng.normal(size=n1)
        b = rng.normal(rng.choice([0.0, 0.05, 0.3, 2.0]), rng.choice([1.0, 1.5]), size=n2)
        if trial % 3 == 0:
            a, b = np.round(a, 1), np.round(b, 1)
        theirs = stats.ks_2samp(a, b)
        ours = drift.ks_2samp(Sample.of(a), Sample.of(b))
        assert close(ours[0], float(theirs.statistic)), (n1, n2)
        assert close(ours[1], float(theirs.pvalue)), (n1, n2, ours, theirs)


def test_ks_batches_equal_one_by_one() -> None:
    rng = np.random.default_rng(3)
    ref = Sample.of(rng.normal(size=700))
    curs = [Sample.of(rng.normal(s, size=1000)) for s in (0.0, 0.1, 0.5, 1.0, 3.0)]
    curs.append(Sample.of(rng.normal(size=300)))  # another size: another group
    assert drift.ks_2samp_pairs([(ref, c) for c in curs]) == [drift.ks_2samp(ref, c) for c in curs]


def test_ks_refuses_more_rows_than_scipy_computes_exactly() -> None:
    with pytest.raises(ValueError, match="10000 rows"):
        drift.ks_2samp(Sample.of(np.arange(10_001.0)), Sample.of(np.arange(5.0)))


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
def test_jensenshannon_of_the_binned_shares_equals_scipy(case: Case) -> None:
    ref, cur = Sample.of(case.reference), Sample.of(case.current)
    p, q = drift.binned_shares(ref, cur, case.numerical, fill_zeroes=False)
    assert close(drift.jensenshannon(ref, cur, case.numerical), float(distance.jensenshannon(p, q)))


@pytest.mark.parametrize("case", [c for c in cases() if c.numerical], ids=lambda c: c.id)
def test_sturges_edges_equal_numpy(case: Case) -> None:
    both = np.concatenate([_finite(case.reference), _finite(case.current)])
    ours = drift.sturges_edges(Sample.of(case.reference), Sample.of(case.current))
    assert np.array_equal(ours, np.histogram_bin_edges(both, bins="sturges"))


@pytest.mark.parametrize("case", [c for c in cases() if c.expected_method == "chisquare"], ids=lambda c: c.id)
def test_chisquare_equals_scipy(case: Case) -> None:
    ref, cur = Sample.of(case.reference), Sample.of(case.current)
    keys = np.union1d(ref.values, cur.values)
    f_exp = ref.counts_at(keys) * (cur.n / ref.n)
    with np.errstate(divide="ignore", invalid="ignore"):
        theirs = float(stats.chisquare(cur.counts_at(keys), f_exp).pvalue)
    assert close(drift.chisquare_pvalue(ref, cur), theirs)


@pytest.mark.parametrize("dof", [1, 2, 3, 5, 9, 30, 200])
def test_chi2_survival_function_equals_scipy(dof: int) -> None:
    for x in [1e-6, 0.01, 0.5, 1.0, dof - 0.5, dof, dof + 2.0, 3.0 * dof, 50.0, 400.0, 2000.0]:
        if x > 0:
            assert close(drift.chi2_sf(x, dof), float(stats.chi2.sf(x, dof))), (x, dof)
    assert drift.chi2_sf(math.inf, dof) == 0.0


def test_normal_cdf_equals_scipy() -> None:
    for x in np.linspace(-9, 9, 181):
        assert close(drift.normal_cdf(float(x)), float(stats.norm.cdf(x))), x


def test_z_test_equals_the_formula_with_scipy_normal() -> None:
    rng = np.random.default_rng(5)
    a, b = (rng.random(400) < 0.3).astype(float), (rng.random(250) < 0.4).astype(float)
    p1, p2 = a.mean(), b.mean()
    pooled = (a.sum() + b.sum()) / (a.size + b.size)
    z = (p1 - p2) / math.sqrt(pooled * (1 - pooled) * (1 / a.size + 1 / b.size))
    assert close(drift.z_pvalue(Sample.of(a), Sample.of(b)), float(2 * (1 - stats.norm.cdf(abs(z)))))


def test_default_method_follows_evidentlys_rule() -> None:
    small, large = np.arange(1000.0) % 7, np.arange(1001.0) % 7
    few = Sample.of(np.arange(1000.0) % 3)
    assert drift.default_method(Sample.of(small), Sample.of(small), True) == "ks"
    assert drift.default_method(Sample.of(large), Sample.of(large), True) == "wasserstein"
    assert drift.default_method(few, few, True) == "chisquare"
    assert drift.default_method(Sample.of(np.arange(2000.0) % 3), few, True) == "jensenshannon"
    assert drift.default_method(Sample.of(small), Sample.of(small), False) == "chisquare"
    assert drift.default_method(Sample.of(np.arange(500.0) % 2), Sample.of(np.ones(3)), False) == "z"
    # the distinct values of both sides count: 5 in the reference, 6 with the current window
    five = Sample.of(np.arange(2000.0) % 5)
    assert drift.default_method(five, five, True) == "jensenshannon"
    assert drift.default_method(five, Sample.of(np.arange(6.0)), True) == "wasserstein"


def test_verdicts_use_evidentlys_thresholds_and_directions() -> None:
    assert drift.is_drift("ks", 0.05) and not drift.is_drift("chisquare", 0.05) and drift.is_drift("z", 0.049)
    assert drift.is_drift("wasserstein", 0.1) and not drift.is_drift("psi", 0.099)
    assert drift.is_drift("jensenshannon", 0.3, threshold=0.2) and not drift.is_drift(
        "ks", 0.3, threshold=0.2
    )


def test_samples_are_multisets_without_non_finite_values() -> None:
    s = Sample.of([3.0, 1.0, np.nan, 3.0, np.inf, -np.inf, 2.0])
    assert s.values.tolist() == [1.0, 2.0, 3.0] and s.counts.tolist() == [1, 1, 2] and s.n == 4
    m = Sample.from_counts([3.0, 1.0, 2.0], [2, 1, 0])
    assert m.values.tolist() == [1.0, 3.0] and m.counts.tolist() == [1, 2]
    assert s.std() == pytest.approx(np.std([1.0, 2.0, 3.0, 3.0]))
    for bad in (([1.0, 1.0], [1, 1]), ([1.0], [1, 2]), ([np.nan], [1]), ([1.0], [-1])):
        with pytest.raises(ValueError):
            Sample.from_counts(*bad)
    with pytest.raises(ValueError, match="finite value"):
        drift.score(Sample.of([np.nan]), Sample.of([1.0]), True)
    with pytest.raises(ValueError, match="unknown drift method"):
        drift.score(Sample.of([1.0]), Sample.of([1.0]), True, "kl")
