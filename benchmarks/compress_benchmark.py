"""Pruning and quantization on Fashion-MNIST: what each recipe buys against the unpruned model.

    .venv/bin/python benchmarks/compress_benchmark.py            # MLP and CNN, ~10 min
    .venv/bin/python benchmarks/compress_benchmark.py --skip-cnn

Each point is a real pipeline run (`accelflow run`, one shared workdir and MLflow store, so
ingest → train run once per model and only prune + evaluate run per point). The evaluate
stage measures the unpruned model and the point's model side by side in one process: test
accuracy, network latency at batch 1 and 256 (median, one thread), served latency
(`mlflow.pyfunc` predict on raw rows), weights and zstd size. Ratios are baseline ÷ point
within one run. Prints a table and writes benchmarks/results/compress.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MLP_POINTS = {
    "magnitude 50%": ["prune.method=magnitude", "prune.sparsity=0.5"],
    "magnitude 90% (3 rounds × 4 epochs)": [
        "prune.method=magnitude",
        "prune.sparsity=0.9",
        "prune.rounds=3",
        "prune.finetune_epochs=4",
    ],
    "magnitude 90% (3 rounds × 4 epochs) + cluster 5 bits": [
        "prune.method=magnitude",
        "prune.sparsity=0.9",
        "prune.rounds=3",
        "prune.finetune_epochs=4",
        "prune.cluster_bits=5",
    ],
    "cluster 5 bits (no pruning)": ["prune.method=none", "prune.cluster_bits=5"],
    "structured 50%": ["prune.method=structured", "prune.sparsity=0.5"],
    "structured 70%": ["prune.method=structured", "prune.sparsity=0.7"],
    "int8 (no pruning)": ["prune.method=none", "prune.quantize=dynamic_int8"],
    "structured 50% + int8": [
        "prune.method=structured",
        "prune.sparsity=0.5",
        "prune.quantize=dynamic_int8",
    ],
}
CNN_POINTS = {
    "structured 50%": ["prune.method=structured", "prune.sparsity=0.5"],
    "structured 50% + int8": [
        "prune.method=structured",
        "prune.sparsity=0.5",
        "prune.quantize=dynamic_int8",
    ],
}
CNN = ["train.model=cnn", "train.epochs=5", "tune.enabled=false"]


def run_point(workdir: Path, overrides: list[str]) -> dict:
    """One `accelflow run`; returns its evaluate manifest (read back from MLflow), with the
    prune stage's metrics under `prune`."""
    import mlflow

    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    sets = [f"workdir={workdir / 'work'}", f"tracking.uri={tracking}", *overrides]
    argv = [str(ROOT / ".venv" / "bin" / "accelflow"), "run"]
    argv += [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "ACCELFLOW_PROGRESS": "off"}
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{overrides} failed:\n{done.stderr[-3000:]}")
    parent = done.stdout.strip().splitlines()[-1].rsplit("/runs/", 1)[1]
    client = mlflow.MlflowClient(tracking)
    stages = {
        run.info.run_name: run
        for run in client.search_runs(
            [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
        )
    }
    path = client.download_artifacts(
        stages["evaluate"].info.run_id, "evaluate/manifest.json", str(workdir)
    )
    return {**json.loads(Path(path).read_text()), "prune": stages["prune"].data.metrics}


def row(name: str, manifest: dict) -> dict:
    base, point = manifest["results"]["baseline"], manifest["results"]["pruned"]
    return {
        "point": name,
        "accuracy": point["accuracy"],
        "accuracy_drop_pt": 100 * (base["accuracy"] - point["accuracy"]),
        "speedup_b1": base["latency_b1_ms"] / point["latency_b1_ms"],
        "speedup_b256": base["latency_b256_ms"] / point["latency_b256_ms"],
        "latency_b256_ms": point["latency_b256_ms"],
        "served_b256_ms": point["served_b256_ms"],
        "served_over_network": point["served_b256_ms"] / point["latency_b256_ms"],
        "weights": point["parameters"],
        "nonzero": point["nonzero_parameters"],
        "size_zstd_kib": point["size_zstd_bytes"] / 1024,
        "size_ratio": base["size_zstd_bytes"] / point["size_zstd_bytes"],
        # k-means points: codebooks + packed indices (+ non-zero maps) vs the float32 file
        "encoded_kib": manifest["prune"].get("prune/encoded_bytes", float("nan")) / 1024,
        "encoded_ratio": base["size_bytes"] / manifest["prune"]["prune/encoded_bytes"]
        if "prune/encoded_bytes" in manifest["prune"]
        else float("nan"),
        "bits_per_weight": manifest["prune"].get("prune/bits_per_weight", float("nan")),
        "baseline": {
            k: base[k]
            for k in (
                "accuracy",
                "latency_b1_ms",
                "latency_b256_ms",
                "served_b256_ms",
                "size_zstd_bytes",
            )
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-cnn", action="store_true")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"mlp": [], "cnn": []}
    with tempfile.TemporaryDirectory(prefix="accelflow-compress-bench-") as tmp:
        for name, overrides in MLP_POINTS.items():
            results["mlp"].append(row(name, run_point(Path(tmp), overrides)))
            print(f"mlp  {name}: done", flush=True)
        if not args.skip_cnn:
            for name, overrides in CNN_POINTS.items():
                results["cnn"].append(row(name, run_point(Path(tmp), [*CNN, *overrides])))
                print(f"cnn  {name}: done", flush=True)
    for model, rows in results.items():
        if not rows:
            continue
        b = rows[0]["baseline"]
        print(
            f"\n{model}: unpruned float32 baseline accuracy {b['accuracy']:.4f}, "
            f"batch-256 {b['latency_b256_ms']:.2f} ms, served {b['served_b256_ms']:.2f} ms, "
            f"{b['size_zstd_bytes'] / 1024:.0f} KiB zstd"
        )
        print(
            "| point | accuracy (drop, pt) | speed-up b1 | speed-up b256 | served b256 ms "
            "(÷ network) | weights (non-zero) | zstd KiB (ratio) | encoded KiB (ratio to float32 "
            "file), bits/weight |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['point']} | {r['accuracy']:.4f} ({r['accuracy_drop_pt']:+.2f}) "
                f"| {r['speedup_b1']:.2f}× | {r['speedup_b256']:.2f}× "
                f"| {r['served_b256_ms']:.2f} ({r['served_over_network']:.1f}×) "
                f"| {r['weights']:,} ({r['nonzero']:,}) | {r['size_zstd_kib']:.0f} ({r['size_ratio']:.1f}×) "
                + (
                    f"| {r['encoded_kib']:.0f} ({r['encoded_ratio']:.1f}×), {r['bits_per_weight']:.2f} |"
                    if r["encoded_kib"] == r["encoded_kib"]
                    else "| — |"
                )
            )
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compress.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'compress.json'}")


if __name__ == "__main__":
    sys.exit(main())
