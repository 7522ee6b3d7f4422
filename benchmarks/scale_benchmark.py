"""Every stage out of core in one flow: a table several times larger than the Dask workers'
total memory through ingest → evaluate, then batch scoring, with capped workers.

Builds the table from a real one (scikit-learn's digits: each copy of its 1,797 rows gets
its own small jitter, so no two rows repeat), then runs `accelflow run` (2 Dask workers
limited to `--worker-memory` each, training streamed from Parquet row groups, one epoch)
and `accelflow score` on the same file. While they run, every process they start is
sampled from /proc (its peak resident memory, VmHWM) and named by its role. Reports each
role's peak against the workers' cap and the table's size in memory.

    .venv/bin/python benchmarks/scale_benchmark.py --gb 6 --worker-memory 1GiB
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import ROOT, benchmark_args, write_json  # noqa: E402  (sets the path)

ROLES = (  # first match wins: how each process started by the CLI is named
    ("tasks.training.worker", "DDP rank"),
    ("torch.distributed.run", "DDP launcher"),
    ("uvicorn", "Prefect API server"),
    ("multiprocessing", "Dask worker"),
)


def write_table(path: Path, gb: float, seed: int = 0) -> dict:
    """Copies of digits with jitter until the CSV reaches `gb`; returns rows and bytes."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    from sklearn.datasets import load_digits

    digits = load_digits(as_frame=True).frame
    features = digits.drop(columns=["target"]).to_numpy(np.float32)
    labels = digits["target"].to_numpy()
    names = [c for c in digits.columns if c != "target"]
    rng = np.random.default_rng(seed)
    rows, writer = 0, None
    with open(path, "wb") as sink:
        while sink.tell() < gb * 2**30:
            jitter = np.round(features + rng.normal(0, 0.5, features.shape), 2)
            columns = {n: pa.array(jitter[:, i]) for i, n in enumerate(names)}
            columns["target"] = pa.array(labels)
            table = pa.table(columns)
            if writer is None:
                writer = pacsv.CSVWriter(sink, table.schema)
            writer.write_table(table)
            rows += len(labels)
        writer.close()
    return {"rows": rows, "bytes": path.stat().st_size, "features": len(names)}


def role(cmdline: str, root: int, pid: int) -> str:
    if pid == root:
        return "driver (accelflow CLI, the flow)"
    return next((name for key, name in ROLES if key in cmdline), "other")


def watch(root: int, peaks: dict[int, tuple[str, float]], stop: threading.Event) -> None:
    """Every 0.2 s: each descendant of `root` with its role and peak RSS (VmHWM, MiB)."""
    while not stop.is_set():
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                text = status.read_text()
                pid = int(status.parent.name)
                ppid = int(re.search(r"PPid:\s+(\d+)", text)[1])
                hwm = re.search(r"VmHWM:\s+(\d+)", text)
                cmd = (status.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, TypeError, ValueError):
                continue
            if hwm and (pid == root or ppid == root or ppid in peaks):
                peaks[pid] = (role(cmd, root, pid), int(hwm[1]) / 1024)
        stop.wait(0.2)


def run_watched(argv: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, dict]:
    process = subprocess.Popen(
        argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peaks: dict[int, tuple[str, float]] = {}
    stop = threading.Event()
    thread = threading.Thread(target=watch, args=(process.pid, peaks, stop), daemon=True)
    thread.start()
    out, _ = process.communicate()
    stop.set()
    thread.join()
    return subprocess.CompletedProcess(argv, process.returncode, out, ""), peaks


def by_role(peaks: dict[int, tuple[str, float]]) -> dict[str, dict]:
    roles: dict[str, dict] = {}
    for name, mib in peaks.values():
        entry = roles.setdefault(name, {"processes": 0, "peak_mib": 0.0})
        entry["processes"] += 1
        entry["peak_mib"] = max(entry["peak_mib"], round(mib, 1))
    return roles


def main() -> None:
    parser = benchmark_args(__doc__, "scale_benchmark")
    parser.add_argument("--gb", type=float, default=1.5, help="CSV size to build")
    parser.add_argument(
        "--worker-memory", default="1GiB", help="each Dask worker's limit (scoring needs 1GiB)"
    )
    parser.add_argument("--work", type=Path, default=None, help="folder (default: a temporary one)")
    args = parser.parse_args()
    cli = str(Path(sys.executable).with_name("accelflow"))
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        source = work / "digits-scaled.csv"
        start = time.perf_counter()
        table = write_table(source, args.gb)
        table["seconds"] = round(time.perf_counter() - start, 1)
        in_memory = table["rows"] * (table["features"] * 4 + 8) / 2**20  # float32 + label
        sets = [
            f"data.source={source}",
            "data.label=target",
            f"workdir={work / 'w'}",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
            "dask.n_workers=2",
            f"dask.memory_limit={args.worker_memory}",
            "train.resident_max_gb=0.001",  # streamed from its row groups, whatever its size
            "train.epochs=1",
            "tune.enabled=false",
            "compress.recipe=[magnitude]",
            "compress.finetune_epochs=1",
            "evaluate.latency_repeats=3",
        ]
        results = {}
        for step, argv in (
            ("run", [cli, "run", *[a for s in sets for a in ("--set", s)]]),
            (
                "score",
                [cli, "score", "--source", str(source), "--out", str(work / "scored.parquet")]
                + [a for s in sets for a in ("--set", s)],
            ),
        ):
            start = time.perf_counter()
            done, peaks = run_watched(argv, ROOT)
            if done.returncode:
                sys.exit(f"accelflow {step} failed:\n{done.stdout[-4000:]}")
            results[step] = {
                "seconds": round(time.perf_counter() - start, 1),
                "roles": by_role(peaks),
                "workers_restarted": "Restarting worker" in done.stdout,
                "tail": done.stdout.strip().splitlines()[-12:],
            }
        import pyarrow.parquet as pq

        scored = pq.ParquetFile(work / "scored.parquet").metadata.num_rows
        (trained,) = (work / "w" / "train").glob("*/manifest.json")
        metrics = json.loads(trained.read_text())["metrics"]
        streamed = bool(metrics["train/streamed"])
        (evaluated,) = (work / "w" / "evaluate").glob("*/manifest.json")
        accuracy = json.loads(evaluated.read_text())["metrics"]["test/accuracy"]
        result = {
            "table": table,
            "table_in_memory_mib": round(in_memory, 1),
            "worker_memory": args.worker_memory,
            **results,
            "train_streamed": streamed,
            "rows_scored": scored,
            "test_accuracy": accuracy,
        }
    cap = args.worker_memory
    print(
        f"table: {table['rows']:,} rows, {table['bytes'] / 2**30:.2f} GiB CSV, "
        f"{in_memory:,.0f} MiB as float32; Dask workers capped at {cap} each"
    )
    print(f"{'step':<6} {'role':<34} {'processes':>9} {'peak MiB':>9}")
    for step in ("run", "score"):
        for name, entry in sorted(results[step]["roles"].items()):
            print(f"{step:<6} {name:<34} {entry['processes']:>9} {entry['peak_mib']:>9.0f}")
        print(f"{step:<6} {'(wall seconds)':<34} {'':>9} {results[step]['seconds']:>9.1f}")
        print(
            f"{step:<6} {'(a Dask worker restarted)':<34} {'':>9} {str(results[step]['workers_restarted']):>9}"
        )
    write_json(args.json, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
