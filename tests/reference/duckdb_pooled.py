"""Runs SQL on the pooled exports of every hospital in DuckDB, without noise: the reference
that renkei's exact (pre-noise) engine results are checked against.

Usage: python duckdb_pooled.py SPEC.json  (prints one JSON result per query on stdout,
then one per survival curve, fitted by lifelines' KaplanMeierFitter, then one per
regression, fitted by statsmodels' OLS or Logit)

SPEC.json names each hospital's export files, the schema's columns with their DuckDB types,
and the queries. Patients who did not consent to secondary use are left out, as every node
leaves them out. `timepoints` is the join of a hospital's timepoint tables on
(patient_id, timepoint), with the patient's own columns alongside (a timepoint column of the
same name wins), as a node's timepoint view has them.
"""

import decimal
import json
import sys
import time

import duckdb

FLAG_TRUE = ("true", "yes", "1", "y", "t")
FLAG_FALSE = ("false", "no", "0", "n", "f")


def quoted(name):
    return '"' + name.replace('"', '""') + '"'


def literal(text):
    return "'" + text.replace("'", "''") + "'"


def cast(column, kind):
    cell = f"NULLIF(trim({quoted(column)}), '')"
    if kind["type"] == "boolean":
        yes = ", ".join(literal(w) for w in FLAG_TRUE)
        no = ", ".join(literal(w) for w in FLAG_FALSE)
        return (
            f"CASE WHEN lower({cell}) IN ({yes}) THEN true "
            f"WHEN lower({cell}) IN ({no}) THEN false END"
        )
    if kind["type"] == "integer":
        return f"CAST({cell} AS BIGINT)"
    if kind["type"] == "decimal":
        return f"CAST({cell} AS DECIMAL(18, {kind['scale']}))"
    if kind["type"] == "categorical":
        return f"CAST({cell} AS {quoted(kind['enum'])})"
    raise ValueError(f"unknown column type {kind}")


def files(paths):
    return "[" + ", ".join(literal(p) for p in paths) + "]"


def load(con, spec):
    for view in ("patients", "timepoints"):
        for column, kind in spec["schema"][view]:
            if kind["type"] == "categorical":
                kind["enum"] = f"levels_{view}_{column}"
                levels = ", ".join(literal(level) for level in kind["levels"])
                con.execute(f"CREATE TYPE {quoted(kind['enum'])} AS ENUM ({levels})")
    exports = spec["exports"]
    con.execute(
        "CREATE TABLE raw_patients AS SELECT * FROM read_csv("
        f"{files([e['patients'] for e in exports])}, all_varchar = true, header = true)"
    )
    tables = len(exports[0]["timepoints"])
    for j in range(tables):
        con.execute(
            f"CREATE TABLE raw_tp{j} AS SELECT * FROM read_csv("
            f"{files([e['timepoints'][j] for e in exports])}, all_varchar = true, header = true)"
        )
    joined = "raw_tp0" + "".join(
        f" FULL OUTER JOIN raw_tp{j} USING (patient_id, timepoint)" for j in range(1, tables)
    )
    consented = cast("consent_secondary_use", {"type": "boolean"})
    patient_columns = [c for c, _ in spec["schema"]["patients"]]
    casts = ", ".join(f"{cast(c, k)} AS {quoted(c)}" for c, k in spec["schema"]["patients"])
    con.execute(
        f"CREATE TABLE patients AS SELECT patient_id, {casts} FROM raw_patients "
        f"WHERE {consented}"
    )
    timepoint_columns = [c for c, _ in spec["schema"]["timepoints"]]
    casts = ", ".join(f"{cast(c, k)} AS {quoted(c)}" for c, k in spec["schema"]["timepoints"])
    con.execute(
        "CREATE TABLE own_timepoints AS SELECT patient_id, "
        f"CAST(timepoint AS BIGINT) AS timepoint, {casts} FROM {joined}"
    )
    alongside = ", ".join(
        f"p.{quoted(c)}" for c in patient_columns if c not in timepoint_columns
    )
    con.execute(
        f"CREATE VIEW timepoints AS SELECT t.*, {alongside} FROM own_timepoints t "
        "JOIN patients p USING (patient_id)"
    )


def plain(value):
    if isinstance(value, decimal.Decimal):
        return str(value)
    return value


def curves(con, curve):
    """Kaplan-Meier curves by lifelines, one per group: `curve["sql"]` returns the group
    columns, then each patient's time and event; times are clamped to [0, horizon] and a
    patient later than the horizon is censored at it, as renkei bins them."""
    from lifelines import KaplanMeierFitter

    horizon = curve["horizon"]
    by_group = {}
    for row in con.execute(curve["sql"]).fetchall():
        *group, time, event = row
        if time is None:
            continue
        day = min(max(int(time), 0), horizon)
        had_event = bool(event) and int(time) <= horizon
        by_group.setdefault(tuple(plain(g) for g in group), []).append((day, had_event))
    out = []
    for group, patients in sorted(by_group.items(), key=lambda kv: [str(g) for g in kv[0]]):
        fitter = KaplanMeierFitter()
        fitter.fit([d for d, _ in patients], [e for _, e in patients])
        days = list(range(horizon + 1))
        survival = fitter.survival_function_at_times(days).tolist()
        out.append({"group": list(group), "survival": survival, "patients": len(patients)})
    return out


def fit(con, model):
    """A regression by statsmodels on the pooled rows `model["sql"]` returns: the outcome,
    then each covariate, as numbers (a row with any NULL left out, as renkei leaves it
    out), with an intercept. `model["model"]` is `ols` or `logit`."""
    import numpy
    import statsmodels.api as sm

    rows = [
        [float(v) for v in row]
        for row in con.execute(model["sql"]).fetchall()
        if all(v is not None for v in row)
    ]
    data = numpy.array(rows, dtype=float)
    outcome, design = data[:, 0], sm.add_constant(data[:, 1:], has_constant="add")
    started = time.perf_counter()
    if model["model"] == "ols":
        result = sm.OLS(outcome, design).fit()
    elif model["model"] == "logit":
        result = sm.Logit(outcome, design).fit(disp=0, maxiter=100, tol=1e-12)
    else:
        raise ValueError(f"unknown model {model['model']}")
    bse = result.bse.tolist()
    seconds = time.perf_counter() - started
    return {
        "params": result.params.tolist(),
        "bse": bse,
        "n": len(rows),
        "seconds": seconds,
    }


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    con = duckdb.connect()
    load(con, spec)
    results = []
    for query in spec["queries"]:
        cursor = con.execute(query)
        columns = [d[0] for d in cursor.description]
        rows = [[plain(v) for v in row] for row in cursor.fetchall()]
        results.append({"columns": columns, "rows": rows})
    for curve in spec.get("curves", []):
        results.append({"curves": curves(con, curve)})
    for model in spec.get("fits", []):
        results.append({"fit": fit(con, model)})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
