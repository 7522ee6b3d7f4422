"""Out-of-core ingest: a CSV several times larger than the Dask workers' memory.

Generates a realistic table (prices and measurements with 2 decimals, counts, a few string
categoricals, some missing values and a few stray strings in a number column), then, side
by side in one run:
- accelflow's ingest stage on a LocalCluster of 2 workers with a memory limit each, and
- pandas.read_csv of the whole file in one process (what ingest did before it was out of core).
Reports wall time, MB/s, peak memory of every process, and that no worker was restarted.

    .venv/bin/python benchmarks/ingest_benchmark.py --gb 4 --worker-memory 1GiB
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
from common import benchmark_args, write_json  # noqa: E402  (sets the path)

CATEGORIES = {
    "region": ["north", "south", "east", "west", "centre"],
    "channel": ["web", "store", "phone", "partner"],
    "plan": [f"plan-{i:02d}" for i in range(40)],
}  # 40 values: integer codes, not one-hot


def write_csv(path: Path, rows: int, seed: int = 0, chunk: int = 200_000) -> int:
    """A table of `rows` rows, written in chunks with pyarrow's CSV writer; returns its size.
    The label depends on a few columns, so a model can learn it."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    writer = None
    with open(path, "wb") as sink:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            columns: dict[str, pa.Array] = {}
            prices = np.round(rng.lognormal(3, 1, (n, 8)), 2)
            measures = np.round(rng.normal(0, 1, (n, 8)), 3)
            counts = rng.poisson(3, (n, 4))
            for i in range(8):
                columns[f"price_{i}"] = pa.array(
                    prices[:, i], mask=rng.random(n) < 0.002
                )  # some missing
                columns[f"measure_{i}"] = pa.array(measures[:, i])
            for i in range(3):
                columns[f"count_{i}"] = pa.array(counts[:, i])
            stray = counts[:, 3].astype(str).astype(object)
            stray[rng.random(n) < 1e-5] = "unknown"  # a stray string in a number column: a bad row
            columns["count_3"] = pa.array(stray)
            codes = {name: rng.integers(0, len(values), n) for name, values in CATEGORIES.items()}
            for name, values in CATEGORIES.items():
                columns[name] = pa.array(np.asarray(values, dtype=object)[codes[name]])
            score = measures[:, 0] + 0.5 * np.log(prices[:, 0]) + 0.3 * (codes["region"] == 1) - 1.5
            columns["label"] = pa.array(np.digitize(score, [-0.5, 0.5]))
            table = pa.table(columns)
            if writer is None:
                writer = pacsv.CSVWriter(sink, table.schema)
            writer.write_table(table)
        writer.close()
    return path.stat().st_size


def run_accelflow(source: Path, work: Path, worker_memory: str, block_mb: float) -> dict:
    from conf.schema import DaskConfig, DataConfig
    from tasks.cluster import dask_client, peak_memory_mib
    from tasks.ingest import ingest_dataset
    from tasks.store import run_stage

    cfg = DataConfig(source=str(source), label="label", on_bad_rows="quarantine", block_mb=block_mb)
    with dask_client(DaskConfig(n_workers=2, memory_limit=worker_memory)) as client:
        workers = set(client.scheduler_info()["workers"])
        start = time.perf_counter()
        manifest = run_stage(
            work,
            "ingest",
            "bench",
            cfg.model_dump(mode="json"),
            [],
            lambda out: ingest_dataset(cfg, out, client),
        ).manifest
        seconds = time.perf_counter() - start
        peaks = client.run(peak_memory_mib)
        restarted = set(client.scheduler_info()["workers"]) != workers
    return {
        "seconds": seconds,
        "rows": {k: v["rows"] for k, v in manifest["splits"].items()},
        "blocks": manifest["metrics"]["data/source_blocks"],
        # the three passes over the blocks (the rest: the data contract, the manifest)
        "passes": {
            name: manifest["metrics"][f"data/ingest_{name}_seconds"]
            for name in ("scan", "profile", "write")
        },
        "rejected": manifest["metrics"]["data/rejected_rows"],
        "worker_peak_mib": max(peaks.values()),
        "workers_restarted": restarted,
        "driver_peak_mib": peak_memory_mib(),
    }


def run_pandas(source: Path) -> dict:
    import pandas as pd

    from tasks.cluster import peak_memory_mib

    start = time.perf_counter()
    frame = pd.read_csv(source)
    return {
        "seconds": time.perf_counter() - start,
        "rows": len(frame),
        "peak_mib": peak_memory_mib(),
    }


def in_subprocess(*args: str) -> dict:
    """Each contender in a fresh process, so peak memory is its own."""
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = benchmark_args(__doc__, "ingest")
    parser.add_argument("--gb", type=float, default=4.0, help="CSV size to generate")
    parser.add_argument("--worker-memory", default="1GiB")
    parser.add_argument("--block-mb", type=float, default=64)
    parser.add_argument("--dir", default=None, help="where to put the CSV (default: a temp folder)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant == "generate":  # also used by the out-of-core test
        rows = int(args.gb * 2**30 / 134)  # ~134 bytes per row
        print(json.dumps({"rows": rows, "bytes": write_csv(Path(args.source), rows)}))
        return
    if args.variant == "accelflow":
        print(
            json.dumps(
                run_accelflow(Path(args.source), Path(args.work), args.worker_memory, args.block_mb)
            )
        )
        return
    if args.variant == "pandas":
        print(json.dumps(run_pandas(Path(args.source))))
        return

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        source = Path(tmp) / "table.csv"
        start = time.perf_counter()
        rows = int(args.gb * 2**30 / 134)  # ~134 bytes per row
        size = write_csv(source, rows)
        print(
            f"generated {size / 2**30:.2f} GiB CSV ({rows:,} rows x 24 columns + label) "
            f"in {time.perf_counter() - start:.0f} s"
        )
        ours = in_subprocess(
            "--variant",
            "accelflow",
            "--source",
            str(source),
            "--work",
            f"{tmp}/work",
            "--worker-memory",
            args.worker_memory,
            "--block-mb",
            str(args.block_mb),
        )
        whole = in_subprocess("--variant", "pandas", "--source", str(source))

    mb = size / 2**20
    result = {
        "csv_mib": round(mb, 1),
        "rows": rows,
        "worker_memory": args.worker_memory,
        "block_mb": args.block_mb,
        "accelflow": {**ours, "mb_s": mb / ours["seconds"]},
        "pandas_read_csv": {**whole, "mb_s": mb / whole["seconds"]},
    }
    a, p = result["accelflow"], result["pandas_read_csv"]
    print(f"\n| reader ({mb:,.0f} MiB CSV) | seconds | MB/s | peak MiB | note |")
    print("|---|---|---|---|---|")
    print(
        f"| accelflow ingest (2 workers x {args.worker_memory}) | {a['seconds']:.1f} | {a['mb_s']:.0f} | "
        f"{a['worker_peak_mib']:.0f} per worker, {a['driver_peak_mib']:.0f} driver | "
        f"{a['blocks']} blocks, split + encoded + written; workers restarted: {a['workers_restarted']} |"
    )
    print(
        f"| pandas.read_csv, one process | {p['seconds']:.1f} | {p['mb_s']:.0f} | {p['peak_mib']:.0f} | "
        "parse only |"
    )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
