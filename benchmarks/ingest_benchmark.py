"""Out-of-core ingest: a CSV several times larger than the Dask workers' memory.

Generates a realistic table (prices and measurements with 2 decimals, counts, a few string
categoricals, some missing values and a few stray strings in a number column), then, side
by side in one run:
- accelflow's ingest stage on a LocalCluster of 2 workers with a memory limit each, and
- pandas.read_csv of the whole file in one process (what ingest did before it was out of core).
Reports wall time, MB/s, peak memory of every process, and that no worker was restarted.
`--baseline` adds another checkout's ingest (an older commit's, say) to the same run.

    .venv/bin/python benchmarks/ingest_benchmark.py --gb 4 --worker-memory 1GiB
    git worktree add /tmp/base b1de912
    cp benchmarks/ingest_*.py /tmp/base/benchmarks/   # both timed alike (the baseline runs
    .venv/bin/python benchmarks/ingest_benchmark.py --gb 4 --baseline /tmp/base   # its copy)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
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


def run_accelflow(
    source: Path,
    work: Path,
    worker_memory: str,
    block_mb: float,
    n_workers: int = 2,
    hand_back: str = "policy",
) -> dict:
    """accelflow's ingest stage on a LocalCluster of `n_workers`; with `hand_back="always"`,
    its data tasks give their memory back after every task, as before 7390019."""
    from dask.distributed import get_task_stream

    from conf.schema import DaskConfig, DataConfig
    from tasks.cluster import dask_client, peak_memory_mib
    from tasks.ingest import ingest_dataset
    from tasks.store import run_stage

    cfg = DataConfig(source=str(source), label="label", on_bad_rows="quarantine", block_mb=block_mb)
    with dask_client(DaskConfig(n_workers=n_workers, memory_limit=worker_memory)) as client:
        if hand_back == "always":
            client.run(hand_back_always)
        workers = set(client.scheduler_info()["workers"])
        client.run(import_pandas)  # as the pandas contender does before its clock starts
        before = client.run(cpu_usage)
        start = time.perf_counter()
        with get_task_stream(client) as stream:
            manifest = run_stage(
                work,
                "ingest",
                "bench",
                cfg.model_dump(mode="json"),
                [],
                lambda out: ingest_dataset(cfg, out, client),
            ).manifest
        seconds = time.perf_counter() - start
        after = client.run(cpu_usage)
        peaks = client.run(peak_memory_mib)
        restarted = set(client.scheduler_info()["workers"]) != workers
    return {
        "seconds": seconds,
        "rows": {k: v["rows"] for k, v in manifest["splits"].items()},
        "blocks": manifest["metrics"]["data/source_blocks"],
        # the passes over the blocks as the stage times them (the rest: the contract, the
        # manifest): scan / profile / write before the profile ran in the scan's tasks
        "passes": {
            key.removeprefix("data/ingest_").removesuffix("_seconds"): seconds
            for key, seconds in manifest["metrics"].items()
            if key.startswith("data/ingest_") and key.endswith("_seconds")
        },
        "read_twice": manifest["metrics"].get("data/blocks_read_twice", 0),
        "rejected": manifest["metrics"]["data/rejected_rows"],
        "worker_peak_mib": max(peaks.values()),
        "workers_restarted": restarted,
        "driver_peak_mib": peak_memory_mib(),
        # the workers' CPU time in user space and in the kernel, and their minor page faults
        "workers_cpu": {
            what: sum(after[w][what] - before[w][what] for w in after if w in before)
            for what in ("user_s", "kernel_s", "minor_faults")
        },
        **task_figures(stream.data, len(workers), seconds),
    }


def import_pandas() -> None:
    """In a worker: import pandas (and the pyarrow it loads), which pandas' own contender has
    imported before its clock starts; otherwise each worker's first task pays for it."""
    import pandas  # noqa: F401


def cpu_usage() -> dict:
    """This process's CPU time and minor page faults so far (run on each worker)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": usage.ru_utime, "kernel_s": usage.ru_stime, "minor_faults": usage.ru_minflt}


def hand_back_always() -> None:
    """In a worker: every data task hands its freed memory back, whatever the worker holds."""
    import tasks.cluster

    hand_back = tasks.cluster.hand_back_memory
    tasks.cluster.hand_back_memory = lambda always=False: hand_back(True)


def task_figures(stream: list[dict], workers: int, seconds: float) -> dict:
    """Each kind of task's count and median seconds as the workers ran them, and the share
    of the stage's wall time the workers spent computing: near 1, the stage is as fast as
    its tasks; well below, time goes to the driver, transfers or waiting."""
    from dask.utils import key_split

    computed: dict[str, list[float]] = {}
    for task in stream:
        kind = key_split(task["key"])  # "scan_csv_range-<token>" → "scan_csv_range"
        for span in task["startstops"]:
            if span["action"] == "compute":
                computed.setdefault(kind, []).append(span["stop"] - span["start"])
    return {
        "tasks": {
            kind: {"n": len(s), "median_s": float(np.median(s)), "total_s": sum(s)}
            for kind, s in computed.items()
        },
        "workers_busy": sum(sum(s) for s in computed.values()) / (workers * seconds),
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


def output_digest(work: Path) -> str:
    """One digest of what an ingest wrote for the stages after it (split arrays, test rows,
    encoder, quarantined rows), by each file's path within the stage's folder: contenders
    that read the CSV alike give the same, whatever their cache keys."""
    digest = hashlib.sha256()
    for file in sorted((work / "ingest").glob("*/**/*")):
        if file.suffix in (".npy", ".parquet", ".csv") or file.name == "encoder.json":
            digest.update(file.relative_to(work / "ingest").as_posix().split("/", 1)[1].encode())
            with open(file, "rb") as fh:
                while chunk := fh.read(2**24):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def in_subprocess(script: Path, *args: str) -> dict:
    """Each contender in a fresh process, so peak memory is its own; bytecode written as
    `make` lets it be (without it every process compiles the stack on import)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, check=False, env=env
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
    parser.add_argument("--csv", type=Path, help="a CSV this script generated before (kept)")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout of accelflow (e.g. a git worktree of an older commit): its "
        "ingest runs too, alternating with this one's",
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs of each contender")
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

    from tasks.tracking import git_commit

    here = Path(__file__).resolve()
    contenders = {f"accelflow {git_commit(here.parents[1])[:7]}": here}
    if args.baseline:
        label = f"accelflow {git_commit(args.baseline.resolve())[:7]}"
        if label in contenders:  # the same commit, changed by hand: tell them apart by folder
            label = f"accelflow {args.baseline}"
        contenders[label] = args.baseline / "benchmarks" / here.name
    runs: dict[str, list[dict]] = {name: [] for name in [*contenders, "pandas"]}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        source = args.csv or Path(tmp) / "table.csv"
        if not args.csv:
            start = time.perf_counter()
            rows = int(args.gb * 2**30 / 134)  # ~134 bytes per row
            write_csv(source, rows)
            print(
                f"generated {source.stat().st_size / 2**30:.2f} GiB CSV ({rows:,} rows x 24 columns + label) in {time.perf_counter() - start:.0f} s"
            )
        for _ in range(args.rounds):  # alternating, so a slower spell of the machine hits all
            for name, script in contenders.items():
                work = Path(tmp) / "work"
                runs[name].append(
                    in_subprocess(
                        script,
                        *("--variant", "accelflow", "--source", str(source), "--work", str(work)),
                        *("--worker-memory", args.worker_memory, "--block-mb", str(args.block_mb)),
                    )
                )
                runs[name][-1]["output_digest"] = output_digest(work)
                shutil.rmtree(work, ignore_errors=True)
                print(f"{name}: {runs[name][-1]['seconds']:.1f} s", flush=True)
            runs["pandas"].append(
                in_subprocess(here, "--variant", "pandas", "--source", str(source))
            )
            print(f"pandas.read_csv: {runs['pandas'][-1]['seconds']:.1f} s", flush=True)
        mb = source.stat().st_size / 2**20

    best = {name: min(r, key=lambda run: run["seconds"]) for name, r in runs.items()}
    result = {
        "csv_mib": round(mb, 1),
        "worker_memory": args.worker_memory,
        "block_mb": args.block_mb,
        "rounds": args.rounds,
        "runs": runs,
        "best": {name: {**run, "mb_s": mb / run["seconds"]} for name, run in best.items()},
    }
    pandas = result["best"]["pandas"]
    print(f"\n| reader ({mb:,.0f} MiB CSV) | seconds | MB/s | × pandas | peak MiB | note |")
    print("|---|---|---|---|---|---|")
    for name in contenders:
        a = result["best"][name]
        passes = " / ".join(f"{k} {v:.1f}" for k, v in a["passes"].items())
        print(
            f"| {name} ingest (2 workers x {args.worker_memory}) | {a['seconds']:.1f} | "
            f"{a['mb_s']:.0f} | {pandas['seconds'] / a['seconds']:.2f} | "
            f"{a['worker_peak_mib']:.0f} per worker, {a['driver_peak_mib']:.0f} driver | "
            f"{a['blocks']} blocks, {passes} s, split + encoded + "
            f"written; workers restarted: {a['workers_restarted']} |"
        )
    print(
        f"| pandas.read_csv, one process | {pandas['seconds']:.1f} | {pandas['mb_s']:.0f} "
        f"| 1.00 | {pandas['peak_mib']:.0f} | parse only |"
    )
    digests = {run["output_digest"] for name in contenders for run in runs[name]}
    print(f"outputs: {'the same in every run' if len(digests) == 1 else 'DIFFER: ' + str(digests)}")
    for name in contenders:  # where the time goes (a baseline from before has no figures)
        a = result["best"][name]
        if "tasks" in a:
            kinds = ", ".join(
                f"{kind} {t['n']} x {t['median_s']:.2f} s" for kind, t in a["tasks"].items()
            )
            print(f"{name}: workers computing {a['workers_busy']:.0%} of the time; {kinds}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
