"""Shared data for the drift tests: the cross-check cases (reference, current, column type).

Each case is a pair of columns Kiln and the peers (Evidently, scipy) score independently:
identical, shifted and scaled distributions, categories new in the current window, few distinct
values, binary columns, NaN and infinities, and references on both sides of Evidently's
1,000-row rule (500, exactly 1,000, 1,001 and thousands of rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Case:
    id: str
    reference: np.ndarray
    current: np.ndarray
    numerical: bool
    #: Evidently's default method for it (what the documentation's rule gives).
    expected_method: str


def _digits_pixel() -> tuple[np.ndarray, np.ndarray]:
    """A real feature: pixel (2, 3) of sklearn's 8x8 digits, 0..16; current: inverted images."""
    from sklearn.datasets import load_digits

    x = load_digits().data[:, 2 * 8 + 3]
    return x[:1400], 16.0 - x[1400:]


def cases() -> list[Case]:
    rng = np.random.default_rng(20261201)
    n = rng.normal
    cat = rng.integers
    ref_nan = n(size=1500)
    ref_nan[::50] = np.nan
    ref_nan[7] = np.inf
    cur_nan = n(0.1, size=600)
    cur_nan[::20] = np.nan
    cur_nan[3] = -np.inf
    pixel_ref, pixel_cur = _digits_pixel()
    classes = cat(0, 10, 1437).astype(float)
    return [
        Case("identical-small", n(size=500), n(size=300), True, "ks"),
        Case("shifted-small", n(size=800), n(0.5, size=400), True, "ks"),
        Case("scaled-small-equal-sizes", n(size=1000), n(0, 2.0, size=1000), True, "ks"),
        Case("ties-small", np.round(n(size=600), 1), np.round(n(0.1, size=450), 1), True, "ks"),
        Case("identical-large", n(size=5000), n(size=1000), True, "wasserstein"),
        Case("shifted-large-1001", n(size=1001), n(0.3, size=700), True, "wasserstein"),
        Case("scaled-large", n(5, 2, size=3000), n(5, 3, size=1000), True, "wasserstein"),
        Case("nan-and-inf-large", ref_nan, cur_nan, True, "wasserstein"),
        Case(
            "few-values-small", cat(0, 4, 700).astype(float), cat(0, 4, 300).astype(float), True, "chisquare"
        ),
        Case(
            "few-values-large",
            cat(0, 5, 2000).astype(float),
            cat(1, 5, 500).astype(float),
            True,
            "jensenshannon",
        ),
        Case("digits-pixel-inverted", pixel_ref, pixel_cur, True, "wasserstein"),
        Case(
            "categorical-small",
            cat(0, 4, 500).astype(float),
            cat(0, 4, 400).astype(float),
            False,
            "chisquare",
        ),
        Case(
            "categorical-new-small",
            cat(0, 4, 500).astype(float),
            cat(0, 6, 400).astype(float),
            False,
            "chisquare",
        ),
        Case(
            "categorical-new-large",
            cat(0, 7, 2000).astype(float),
            cat(2, 9, 800).astype(float),
            False,
            "jensenshannon",
        ),
        Case(
            "binary-small",
            (rng.random(300) < 0.3).astype(float),
            (rng.random(200) < 0.5).astype(float),
            False,
            "z",
        ),
        Case("binary-one-value", np.ones(200), np.ones(100), False, "z"),
        Case("predicted-classes", classes, cat(0, 10, 400).astype(float), False, "jensenshannon"),
    ]


def methods_for(case: Case) -> list[str]:
    """The methods to cross-check for a case: Evidently's default, PSI and Jensen-Shannon for
    every column, plus K-S and Wasserstein for numerical ones (what Evidently allows per type)."""
    extra = ["ks", "wasserstein"] if case.numerical else []
    return ["default", "psi", "jensenshannon", *extra]
