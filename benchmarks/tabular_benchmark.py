"""accelflow's default config on every real table we can load offline, beside the references.

    .venv/bin/python benchmarks/tabular_benchmark.py                 # all tables, ~15 min
    .venv/bin/python benchmarks/tabular_benchmark.py --only wine,spam --set train.epochs=30

Per table, one real pipeline run (`accelflow run`, default config plus any `--set`), and on
the very same train / test splits (the partition stage's Parquet, encoded as the network
sees them): the run's own gradient-boosting reference (`evaluate.reference`, scikit-learn's
HistGradientBoostingClassifier with early stopping) and a plain logistic regression
(standardised numbers, one-hot codes). Test accuracy, macro-F1 and seconds per table; checks
the issue's goals (within 1 point of the reference's accuracy and 2 of its macro-F1 on
every table, ahead on at least half) and writes benchmarks/results/tabular.json.

Tables: scikit-learn's bundled classification tables and every table in ../shared/data
(its README says what each is; GPL-2 via Debian's r-cran-mlbench and r-cran-kernlab).
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

from common import ROOT, accelflow_run, benchmark_args, write_json  # noqa: E402  (sets the path)

SHARED = ROOT.parent / "shared" / "data"  # beside the project, as in every checkout
SKLEARN = ("iris", "wine", "breast_cancer", "digits")


def tables(folder: Path, shared: Path) -> dict[str, tuple[Path, str]]:
    """name → (CSV, label column): scikit-learn's written to `folder`, and the shared ones,
    whose label is named in their README's table (the one place it is written)."""
    from sklearn import datasets

    found = {}
    for name in SKLEARN:
        frame = getattr(datasets, f"load_{name}")(as_frame=True).frame
        path = folder / f"{name}.csv"
        frame.rename(columns={"target": "label"}).to_csv(path, index=False)
        found[name] = (path, "label")
    readme = (shared / "README.md").read_text() if shared.exists() else ""
    for file, label in re.findall(r"^\| (\S+\.csv\.gz) \| (\S+) \|", readme, re.M):
        found[file.split(".")[0].removesuffix("indiansdiabetes2")] = (shared / file, label)
    return found


def logistic_regression(partitions: dict) -> dict[str, float]:
    """A plain logistic regression on the network's own splits: numbers standardised,
    coded categoricals one-hot; fitted on train, scored on test."""
    import numpy as np
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from tasks.training.data import load_split

    def split(name):
        files = [f["path"] for f in partitions["splits"][name]["files"]]
        X, y = load_split(files, partitions["feature_names"], partitions["label"])
        return X.numpy(), y.numpy()

    (X, y), (Xt, yt) = split("train"), split("test")
    coded = [i for i, f in enumerate(partitions["feature_names"]) if f.endswith("#code")]
    dense = [i for i in range(X.shape[1]) if i not in set(coded)]
    prep = ColumnTransformer(
        [("n", StandardScaler(), dense), ("c", OneHotEncoder(handle_unknown="ignore"), coded)]
    )
    start = time.perf_counter()
    model = make_pipeline(prep, LogisticRegression(max_iter=2000)).fit(X, y)
    pred = model.predict(Xt)
    return {
        "accuracy": float(accuracy_score(yt, pred)),
        "macro_f1": float(f1_score(yt, pred, average="macro", labels=np.unique(y))),
        "seconds": time.perf_counter() - start,
    }


def run_table(name: str, source: Path, label: str, folder: Path, sets: list[str]) -> dict:
    workdir = folder / f"work-{name}"
    tracking = f"sqlite:///{folder / f'{name}.db'}"
    start = time.perf_counter()
    done = accelflow_run(
        [
            f"data.source={source}",
            f"data.label={label}",
            f"workdir={workdir}",
            f"tracking.uri={tracking}",
            *sets,
        ]
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return {"table": name, "error": done.stderr.strip().splitlines()[-1:]}
    # one run per workdir: one folder per stage, whose manifest holds what it measured
    partitions = json.loads(next(workdir.glob("partition/*/manifest.json")).read_text())
    metrics = json.loads(next(workdir.glob("evaluate/*/manifest.json")).read_text())["metrics"]
    trained = json.loads(next(workdir.glob("train/*/manifest.json")).read_text())
    tuned = json.loads(next(workdir.glob("tune/*/manifest.json")).read_text())
    reduced = json.loads(next(workdir.glob("reduce/*/manifest.json")).read_text())
    return {
        "table": name,
        "rows": sum(s["rows"] for s in partitions["splits"].values()),
        "features": len(partitions["feature_names"]),
        "classes": len(partitions["classes"]),
        # how the run got there: what reduce kept, what the search chose, how long it trained
        "components": reduced["metrics"]["reduce/components"],
        "best_params": tuned.get("best_params"),
        # the best trial's lead over the default (below 0: train kept its own settings)
        "lead_lower_bound": tuned.get("metrics", {}).get("tune/lead_lower_bound"),
        "kept_default": tuned.get("kept_default"),
        "epochs": trained["metrics"].get("train/epochs"),
        # train.warm_restart: the restart's val gain and its bound (kept where the bound > 0)
        "restart_gain": trained["metrics"].get("train/restart_gain"),
        "restart_gain_bound": trained["metrics"].get("train/restart_gain_bound"),
        "val_accuracy": trained["metrics"]["train/val_accuracy"],
        "accelflow": {
            "accuracy": metrics["test/accuracy"],
            "macro_f1": metrics["test/macro_f1"],
            "seconds": seconds,
        },
        "reference": {
            "accuracy": metrics["reference/accuracy"],
            "macro_f1": metrics["reference/macro_f1"],
            "seconds": metrics["reference/seconds"],
        },
        "logistic": logistic_regression(partitions),
    }


def goals(rows: list[dict]) -> dict[str, object]:
    ok = [r for r in rows if "error" not in r]
    acc_gap = {r["table"]: r["accelflow"]["accuracy"] - r["reference"]["accuracy"] for r in ok}
    f1_gap = {r["table"]: r["accelflow"]["macro_f1"] - r["reference"]["macro_f1"] for r in ok}
    return {
        "within 1 pt accuracy": sorted(t for t, g in acc_gap.items() if g >= -0.01),
        "within 2 pt macro-F1": sorted(t for t, g in f1_gap.items() if g >= -0.02),
        "ahead on accuracy": sorted(t for t, g in acc_gap.items() if g > 0),
        "tables": len(rows),
        "failed": sorted(r["table"] for r in rows if "error" in r),
    }


def print_table(rows: list[dict]) -> None:
    head = f"{'table':<14}{'rows':>7}{'feat':>6}{'cls':>5}"
    for who in ("accelflow", "gbm", "logreg"):
        head += f"{who + ' acc':>14}{'F1':>8}{'s':>7}"
    print(head)
    for r in rows:
        if "error" in r:
            print(f"{r['table']:<14} failed: {r['error']}")
            continue
        line = f"{r['table']:<14}{r['rows']:>7}{r['features']:>6}{r['classes']:>5}"
        for who in ("accelflow", "reference", "logistic"):
            m = r[who]
            line += f"{m['accuracy']:>14.4f}{m['macro_f1']:>8.4f}{m['seconds']:>7.1f}"
        print(line, flush=True)


def main() -> None:
    parser = benchmark_args(__doc__, "tabular")
    parser.add_argument("--only", help="comma-separated table names")
    parser.add_argument("--set", action="append", default=[], help="config override, key=value")
    parser.add_argument("--data", type=Path, default=SHARED, help="the shared tables' folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tabular-") as tmp:
        folder = Path(tmp)
        found = tables(folder, args.data)
        chosen = args.only.split(",") if args.only else list(found)
        unknown = sorted(set(chosen) - set(found))
        if unknown:
            raise SystemExit(f"--only: unknown table(s) {unknown}; choose from {sorted(found)}")
        rows = []
        for name in chosen:
            rows.append(run_table(name, *found[name], folder, args.set))
            print(f"{name}: done", flush=True)
    print()
    print_table(rows)
    summary = goals(rows)
    print()
    for what, value in summary.items():
        print(f"{what}: {value}")
    write_json(args.json, {"sets": args.set, "tables": rows, "goals": summary})


if __name__ == "__main__":
    main()
