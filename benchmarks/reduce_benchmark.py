"""The reduce stage's PCA vs scikit-learn, from the same zstd Parquet files.

    .venv/bin/python benchmarks/reduce_benchmark.py                 # 1M x 128 and 200k x 784
    .venv/bin/python benchmarks/reduce_benchmark.py --scale 0.1     # a quicker look

Each shape is generated as float32 with a decaying spectrum (a low-rank signal plus noise,
columns on different scales), written by the partition stage itself into zstd Parquet
files, and fitted by three contenders, each in a fresh process, one after the other:

- accelflow: the reduce stage's one pass (per-partition sums and XᵀX as Dask tasks on 2
  worker processes, summed on the driver, one eigendecomposition); the cluster is started
  before the clock, as in the pipeline;
- scikit-learn `PCA(svd_solver="covariance_eigh")`, its fastest solver for tall data, on
  the files read into one in-memory array (the read is timed: it is part of the job);
- scikit-learn `IncrementalPCA`, fed one file at a time with `partial_fit` (its own
  out-of-core mode).

Memory: peak resident memory (VmHWM) of every process involved (the driver and each Dask
worker; sklearn's one process), and the same above each process's idle footprint after
its imports, which is the memory the fit itself needs. Agreement with sklearn's PCA:
explained-variance ratios of the leading components and the largest principal angle
between the subspaces. Prints a table and writes benchmarks/results/reduce.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, benchmark_args, write_json  # noqa: E402  (sets the path)

SHAPES = ((1_000_000, 128), (200_000, 784))
COMPARED = 20  # leading components compared for agreement


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def generate(folder: Path, rows: int, columns: int, seed: int = 0) -> dict:
    """X = signal (rank columns//8, decaying) + noise, columns scaled over 3 decades; written
    in blocks to an .npy, then partitioned by the partition stage into zstd Parquet."""
    from conf.schema import DaskConfig, PartitionConfig
    from tasks.cluster import dask_client
    from tasks.partition import partition_dataset
    from tasks.store import StageDir

    rng = np.random.default_rng(seed)
    rank = max(columns // 8, 4)
    basis = rng.normal(size=(rank, columns)) * np.geomspace(10, 0.1, rank)[:, None]
    scales = np.geomspace(1, 1000, columns)[rng.permutation(columns)]
    X = np.lib.format.open_memmap(
        folder / "X.npy", mode="w+", dtype=np.float32, shape=(rows, columns)
    )
    y = np.lib.format.open_memmap(folder / "y.npy", mode="w+", dtype=np.int64, shape=(rows,))
    block = 100_000
    for start in range(0, rows, block):
        n = min(block, rows - start)
        signal = rng.normal(size=(n, rank)) @ basis
        X[start : start + n] = (signal + rng.normal(scale=0.5, size=(n, columns))) * scales
        y[start : start + n] = signal[:, 0] > 0
    X.flush()
    y.flush()
    names = [f"x{i}" for i in range(columns)]
    files = {k: {"path": str(folder / f"{k}.npy"), "bytes": 0} for k in "Xy"}
    empty = {**files, "rows": 0}
    ingest = {
        "feature_names": names,
        "classes": [0, 1],
        "image_shape": None,
        "splits": {"train": {**files, "rows": rows}, "val": empty, "test": empty},
    }
    out = folder / "partitioned"
    out.mkdir()
    with dask_client(DaskConfig(n_workers=2, threads_per_worker=1, memory_limit="4GiB")) as c:
        body = partition_dataset(ingest, PartitionConfig(codec="zstd"), StageDir(out, out), c)
    (folder / "X.npy").unlink()
    return {
        "files": [f["path"] for f in body["splits"]["train"]["files"]],
        "columns": names,
        "parquet_mib": sum(f["bytes"] for f in body["splits"]["train"]["files"]) / 2**20,
    }


def run_accelflow(data: dict) -> dict:
    from conf.schema import DaskConfig, ReduceConfig
    from tasks.cluster import dask_client, peak_memory_mib
    from tasks.reduce.pca import fit_pca, partition_moments

    cfg = ReduceConfig(variance_target=0.99)
    with dask_client(DaskConfig(n_workers=2, threads_per_worker=1, memory_limit="4GiB")) as c:
        c.wait_for_workers(2)
        c.run(lambda: __import__("pyarrow.parquet"))  # imports before the clock, as in a run
        idle = sum(c.run(rss_mib).values()) + rss_mib()
        start = time.perf_counter()
        moments = c.gather(
            c.map(partition_moments, data["files"], columns=data["columns"], pure=False)
        )
        fitted, ratio = fit_pca(moments, cfg, standardize=False)
        seconds = time.perf_counter() - start
        peak = sum(c.run(peak_memory_mib).values()) + peak_memory_mib()
    return {
        "seconds": seconds,
        "peak_mib": peak,
        "above_idle_mib": peak - idle,
        "ratio": ratio[:COMPARED].tolist(),
        "components": fitted["components"][:COMPARED].tolist(),
    }


def read_all(data: dict) -> np.ndarray:
    import pyarrow.parquet as pq

    parts = []
    for path in data["files"]:
        table = pq.read_table(path, columns=data["columns"])
        parts.append(np.column_stack([c.to_numpy() for c in table.columns]))
        del table
    return np.concatenate(parts)


def run_sklearn(data: dict) -> dict:
    import pyarrow.parquet  # noqa: F401
    from sklearn.decomposition import PCA

    from tasks.cluster import peak_memory_mib

    idle = rss_mib()
    start = time.perf_counter()
    X = read_all(data)
    pca = PCA(n_components=COMPARED, svd_solver="covariance_eigh").fit(X)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_mib": peak_memory_mib(),
        "above_idle_mib": peak_memory_mib() - idle,
        "ratio": pca.explained_variance_ratio_.tolist(),
        "components": pca.components_.tolist(),
    }


def run_incremental(data: dict) -> dict:
    import pyarrow.parquet as pq
    from sklearn.decomposition import IncrementalPCA

    from tasks.cluster import peak_memory_mib

    idle = rss_mib()
    start = time.perf_counter()
    ipca = IncrementalPCA(n_components=COMPARED)
    for path in data["files"]:
        table = pq.read_table(path, columns=data["columns"])
        ipca.partial_fit(np.column_stack([c.to_numpy() for c in table.columns]))
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_mib": peak_memory_mib(),
        "above_idle_mib": peak_memory_mib() - idle,
        "ratio": ipca.explained_variance_ratio_.tolist(),
        "components": ipca.components_.tolist(),
    }


CONTENDERS = {"accelflow": run_accelflow, "sklearn": run_sklearn, "incremental": run_incremental}


def in_subprocess(contender: str, data_path: Path) -> dict:
    cmd = [sys.executable, __file__, "--contender", contender, "--data", str(data_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{contender} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def largest_angle_degrees(a: list, b: list, k: int) -> float:
    from scipy.linalg import subspace_angles

    return float(np.degrees(subspace_angles(np.asarray(a)[:k].T, np.asarray(b)[:k].T).max()))


def main() -> None:
    parser = benchmark_args(__doc__, "reduce")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the rows")
    parser.add_argument("--rounds", type=int, default=2, help="runs per contender (best kept)")
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        data = json.loads(Path(args.data).read_text())
        print(json.dumps(CONTENDERS[args.contender](data)))
        return

    results = []
    for rows, columns in SHAPES:
        rows = int(rows * args.scale)
        with tempfile.TemporaryDirectory(prefix="accelflow-reduce-bench-") as tmp:
            folder = Path(tmp)
            data = generate(folder, rows, columns)
            (folder / "data.json").write_text(json.dumps(data))
            runs = {name: [] for name in CONTENDERS}
            for _ in range(
                args.rounds
            ):  # alternating, each contender's fastest kept: noisy machine
                for name in CONTENDERS:
                    runs[name].append(in_subprocess(name, folder / "data.json"))
        best = {name: min(r, key=lambda x: x["seconds"]) for name, r in runs.items()}
        reference = best["sklearn"]
        k = 10  # the subspace compared: the leading 10 components
        row = {"rows": rows, "columns": columns, "parquet_mib": data["parquet_mib"]}
        for name, r in best.items():
            row[name] = {
                "seconds": r["seconds"],
                "seconds_all": [x["seconds"] for x in runs[name]],
                "peak_mib": r["peak_mib"],
                "above_idle_mib": r["above_idle_mib"],
                "ratio_top10": r["ratio"][:k],
                "max_ratio_difference": float(
                    np.abs(np.subtract(r["ratio"][:k], reference["ratio"][:k])).max()
                ),
                "largest_angle_deg": largest_angle_degrees(
                    r["components"], reference["components"], k
                ),
            }
        ours, theirs = row["accelflow"], row["sklearn"]
        row["time_vs_sklearn"] = ours["seconds"] / theirs["seconds"]
        row["memory_vs_sklearn"] = ours["above_idle_mib"] / theirs["above_idle_mib"]
        results.append(row)

    for row in results:
        print(
            f"\n{row['rows']:,} x {row['columns']} float32 ({row['parquet_mib']:.0f} MiB of zstd Parquet)"
        )
        print(
            "| contender | seconds | peak RSS MiB (all processes) | above idle MiB "
            "| max |Δ explained ratio| (top 10) | largest angle to sklearn (top 10) |"
        )
        print("|---|---|---|---|---|---|")
        labels = {
            "accelflow": "accelflow reduce (Dask, 2 workers, one XᵀX pass)",
            "sklearn": "sklearn PCA covariance_eigh (read + fit)",
            "incremental": "sklearn IncrementalPCA (partial_fit per file)",
        }
        for name, label in labels.items():
            r = row[name]
            print(
                f"| {label} | {r['seconds']:.2f} | {r['peak_mib']:.0f} | {r['above_idle_mib']:.0f} "
                f"| {r['max_ratio_difference']:.1e} | {r['largest_angle_deg']:.2e}° |"
            )
        print(
            f"accelflow / sklearn: {row['time_vs_sklearn']:.2f}x the time, "
            f"{row['memory_vs_sklearn']:.2f}x the memory above idle"
        )
    write_json(args.json, {"shapes": results})


if __name__ == "__main__":
    main()
