"""Runs in Evidently's own virtualenv (``hack/peer-venv evidently``), never in Kiln's.

Reads ``{"cases": [{"id", "reference", "current", "numerical", "methods"}]}`` (JSON, ``null`` for
NaN) on stdin; for each case and each method (``"default"``: Evidently's own choice) runs
Evidently's public ``Report([ValueDrift(column, method)])`` on the two columns and writes
``{id: {method: {"method": <Evidently's method>, "value": <score>}}}`` on stdout.
"""

from __future__ import annotations

import json
import sys
import warnings

import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.metrics import ValueDrift

#: Evidently's display names (StatTest.display_name) -> method names.
DISPLAY = {
    "K-S p_value": "ks",
    "chi-square p_value": "chisquare",
    "Z-test p_value": "z",
    "Wasserstein distance (normed)": "wasserstein",
    "Jensen-Shannon distance": "jensenshannon",
    "PSI": "psi",
}


def run_case(case: dict) -> dict:
    kind = "numerical_columns" if case["numerical"] else "categorical_columns"
    definition = DataDefinition(**{kind: ["x"]})
    ref = pd.DataFrame({"x": pd.Series(case["reference"], dtype="float64")})
    cur = pd.DataFrame({"x": pd.Series(case["current"], dtype="float64")})
    methods = case["methods"]
    metrics = [ValueDrift(column="x", method=None if m == "default" else m) for m in methods]
    snapshot = Report(metrics).run(
        Dataset.from_pandas(cur, data_definition=definition),
        Dataset.from_pandas(ref, data_definition=definition),
    )
    out = {}
    for m, result in zip(methods, snapshot.dict()["metrics"], strict=True):
        name = result["config"]["method"]
        out[m] = {"method": DISPLAY.get(name, name), "value": float(result["value"])}
    return out


def main() -> None:
    warnings.simplefilter("ignore")  # division by zero of a new category, pandas notices
    cases = json.load(sys.stdin)["cases"]
    json.dump({c["id"]: run_case(c) for c in cases}, sys.stdout)


if __name__ == "__main__":
    main()
