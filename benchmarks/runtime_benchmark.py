"""torch against onnxruntime, and the served path against the network, in real pipeline runs.

    .venv/bin/python benchmarks/runtime_benchmark.py        # three runs, ~8 min on 2 cores
    .venv/bin/python benchmarks/runtime_benchmark.py --only fmnist-cnn \
        --set 'train.channels=[32, 64]'                     # one run, on a wider CNN

Three `accelflow run`s on embedded defaults (`serve.runtime: auto`): Fashion-MNIST with the
MLP, Fashion-MNIST with the CNN (so its int8 point is onnxruntime's static int8),
and the 9-column Pima table from ../shared/data. In each, the compress stage measures the
baseline and every point in both runtimes one after the other in one process (p50 at batch
1 and 256 on one thread, validation accuracy), and the served path (`mlflow.pyfunc` predict
on raw rows, one thread) of each point in the runtime it is served by. Ratios are within
one run. Prints the tables, checks the issue's goals (those of the runs made), writes
benchmarks/results/runtime.json. `--only` picks runs; `--set` adds overrides to each.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from common import ROOT, benchmark_args, write_json  # noqa: E402  (sets the path)
from compress_benchmark import run_sweep

RUNS = {
    "fmnist-mlp": ["train.model=mlp"],  # auto, the default, picks the CNN for images
    "fmnist-cnn": ["train.model=cnn", "train.epochs=4", "tune.enabled=false"],
    "pima-table": [
        f"data.source={ROOT.parent / 'shared' / 'data' / 'pimaindiansdiabetes2.csv.gz'}",
        "data.label=diabetes",
    ],
}


def runtime_rows(table: list[dict]) -> list[dict]:
    """Per measured row: each runtime's p50s and accuracy, onnxruntime's speed-up over
    torch, the served path over the network, and which runtime serves it."""
    rows = []
    for r in table:
        if "error" in r:
            rows.append({"point": r["name"], "error": r["error"]})
            continue
        row = {"point": r["name"], "runtime": r["runtime"], "chosen": r["chosen"]}
        for runtime in ("torch", "onnxruntime"):
            for key in ("val_accuracy", "latency_b1_p50_ms", "latency_b256_p50_ms"):
                row[f"{runtime}_{key}"] = r.get(f"{runtime}_{key}", float("nan"))
        for batch in (1, 256):
            row[f"ort_speedup_b{batch}"] = (
                row[f"torch_latency_b{batch}_p50_ms"] / row[f"onnxruntime_latency_b{batch}_p50_ms"]
            )
            row[f"served_over_network_b{batch}"] = (
                r.get(f"served_b{batch}_ms", float("nan")) / r[f"latency_b{batch}_p50_ms"]
            )
            row[f"served_b{batch}_ms"] = r.get(f"served_b{batch}_ms", float("nan"))
        row["onnx_max_abs_diff"] = r.get("onnx_max_abs_diff", float("nan"))
        rows.append(row)
    return rows


def print_table(name: str, rows: list[dict], manifest: dict) -> None:
    print(f"\n{name}: {manifest['why']}")
    print(
        "| point | served by | val acc torch / ort | b1 ms torch / ort (×) | b256 ms torch / ort (×) "
        "| served b1 ms (÷ network) | served b256 ms (÷ network) | max logit diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['point']} | failed: {r['error']} |")
            continue
        print(
            f"| {r['point']}{' **chosen**' if r['chosen'] else ''} | {r['runtime']} "
            f"| {r['torch_val_accuracy']:.4f} / {r['onnxruntime_val_accuracy']:.4f} "
            f"| {r['torch_latency_b1_p50_ms']:.3f} / {r['onnxruntime_latency_b1_p50_ms']:.3f} "
            f"({r['ort_speedup_b1']:.2f}×) "
            f"| {r['torch_latency_b256_p50_ms']:.2f} / {r['onnxruntime_latency_b256_p50_ms']:.2f} "
            f"({r['ort_speedup_b256']:.2f}×) "
            f"| {r['served_b1_ms']:.2f} ({r['served_over_network_b1']:.1f}×) "
            f"| {r['served_b256_ms']:.2f} ({r['served_over_network_b256']:.1f}×) "
            f"| {r['onnx_max_abs_diff']:.1e} |"
        )
    h = manifest["headline"]
    print(
        f"registered model: test accuracy {h['test/accuracy']:.4f}, served b1 "
        f"{h['test/served_latency_b1_ms']:.2f} ms, b256 {h['test/served_latency_b256_ms']:.2f} ms"
        f" (network b256 {h['test/latency_b256_ms']:.2f} ms)"
    )


def goals(results: dict[str, dict]) -> list[tuple[str, bool]]:
    """The issue's goals that the runs made can check."""

    def row(run: str, point: str) -> dict:
        return next(r for r in results[run]["rows"] if r["point"] == point)

    def chosen(run: str) -> dict:
        return next(r for r in results[run]["rows"] if r.get("chosen"))

    out = []
    if "fmnist-mlp" in results:
        mlp = chosen("fmnist-mlp")
        out.append(
            (
                f"MLP (chosen: {mlp['point']}): onnxruntime ≥ 1.5× torch at batch 1, one "
                f"thread ({mlp['ort_speedup_b1']:.2f}×)",
                mlp["ort_speedup_b1"] >= 1.5,
            )
        )
    if "fmnist-cnn" in results:
        base, int8 = row("fmnist-cnn", "baseline"), row("fmnist-cnn", "quantize")
        speedup = base["onnxruntime_latency_b256_p50_ms"] / int8["onnxruntime_latency_b256_p50_ms"]
        drop = base["onnxruntime_val_accuracy"] - int8["onnxruntime_val_accuracy"]
        out.append(
            (
                "CNN static int8 (onnxruntime) ≥ 1.5× its float baseline in onnxruntime at "
                f"batch 256 ({speedup:.2f}×) at ≤ 0.5 pt ({100 * drop:+.2f})",
                speedup >= 1.5 and drop <= 0.005,
            )
        )
    for run, limit in (("fmnist-mlp", 2), ("fmnist-cnn", 2), ("pima-table", 3)):
        if run not in results:
            continue
        r = chosen(run)
        out.append(
            (
                f"{run}: served ≤ {limit}× the network at batch 256 "
                f"({r['served_over_network_b256']:.1f}×)",
                r["served_over_network_b256"] <= limit,
            )
        )
    if "pima-table" in results:
        r = chosen("pima-table")
        out.append(
            (
                f"pima-table: served batch 1 ≤ 0.5 ms ({r['served_b1_ms']:.2f} ms)",
                r["served_b1_ms"] <= 0.5,
            )
        )
    return out


def main() -> None:
    parser = benchmark_args(__doc__, "runtime")
    parser.add_argument("--only", help=f"comma-separated runs of {', '.join(RUNS)}")
    parser.add_argument("--set", action="append", default=[], help="override, key=value")
    args = parser.parse_args()
    runs = args.only.split(",") if args.only else list(RUNS)
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        parser.error(f"--only: unknown runs {unknown}; the runs are {', '.join(RUNS)}")
    results: dict[str, dict] = {"sets": args.set}
    with tempfile.TemporaryDirectory(prefix="accelflow-runtime-bench-") as tmp:
        for name in runs:
            manifest = run_sweep(Path(tmp) / name, RUNS[name] + args.set)
            rows = runtime_rows(manifest["table"])
            results[name] = {"rows": rows, "why": manifest["why"], "headline": manifest["headline"]}
            print_table(name, rows, manifest)
    print("\ngoals (side by side within each run):")
    results["goals"] = []
    for what, met in goals(results):
        print(f"  {what}: {'met' if met else 'NOT met'}")
        results["goals"].append({"what": what, "met": met})
    write_json(args.json, results)


if __name__ == "__main__":
    sys.exit(main())
