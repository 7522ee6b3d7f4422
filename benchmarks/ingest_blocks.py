"""What one block of a CSV costs ingest, on one worker: its two tasks and the CPU under them.

The stage's wall time on two workers moves by a few percent between runs of
`ingest_benchmark.py`; a change worth 2% of a block hides in that. Here the stage runs as
that script runs it (`run_accelflow`), on one worker process, so its tasks run one after
the other: per block, the median seconds of the scan task (`scan_csv_range`, profile
included) and of the write task (`write_block`), and the worker's CPU time in user space
and in the kernel and its minor page faults (getrusage). `--hand-back always` makes every
data task give its freed memory back, as before 7390019. Also the quantile-normal map on
the first 320,000 rows' numbers, np.interp against the bucket lookup, and the digest of
the stage's outputs (`ingest_benchmark.output_digest`), so two runs can be compared.

    .venv/bin/python benchmarks/ingest_benchmark.py --variant generate --gb 1 --source one.csv
    .venv/bin/python benchmarks/ingest_blocks.py --csv one.csv                  # about 30 s
    .venv/bin/python benchmarks/ingest_blocks.py --csv one.csv --hand-back always
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from common import benchmark_args, write_json  # noqa: E402  (sets the path)
from ingest_benchmark import output_digest, run_accelflow

MAP_ROWS = 320_000  # about a 41 MB block of the generated CSV


def quantile_map_ms(encoder_path: Path, csv: Path) -> dict:
    """np.interp and the bucket lookup on the first rows' moved numbers: best of 5 each."""
    import pandas as pd

    from tasks.encoding import Encoder

    encoder = Encoder.load(encoder_path)
    values = encoder.numeric_values(pd.read_csv(csv, nrows=MAP_ROWS, low_memory=False))
    fills = np.array([encoder.fills[c] for c in encoder.numeric])
    np.copyto(values, fills, where=np.isnan(values))
    x = encoder.moved(values).ravel()
    _, _, _, xp, fp = encoder.quantile_map
    calls = {
        "interp": lambda: np.interp(x, xp, fp),
        "buckets": lambda: encoder._interp_by_buckets(x),
    }
    timings = {}
    for name, call in calls.items():
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - start)
        timings[f"{name}_ms"] = best * 1000
    same = np.array_equal(calls["interp"](), calls["buckets"]())
    return {"values": len(x), **timings, "same_scores": bool(same)}


def main() -> None:
    parser = benchmark_args(__doc__, "ingest_blocks")
    parser.add_argument("--csv", type=Path, required=True, help="a CSV ingest_benchmark wrote")
    parser.add_argument("--worker-memory", default="1GiB")
    parser.add_argument("--block-mb", type=float, default=64, help="capped by the memory")
    parser.add_argument(
        "--hand-back",
        choices=["policy", "always"],
        default="policy",
        help="freed memory: kept while the worker holds under 70%% of its limit, or always "
        "handed back after a task",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run = run_accelflow(
            args.csv, work, args.worker_memory, args.block_mb, n_workers=1, hand_back=args.hand_back
        )
        digest = output_digest(work)
        mapped = quantile_map_ms(next(work.glob("ingest/*/encoder.json")), args.csv)
    blocks = run["blocks"]
    result = {
        "csv": str(args.csv),
        "hand_back": args.hand_back,
        "blocks": blocks,
        "seconds": run["seconds"],
        "tasks": run["tasks"],
        "per_block": {what: v / blocks for what, v in run["workers_cpu"].items()},
        "quantile_map": mapped,
        "output_digest": digest,
    }
    print(
        f"{blocks} blocks on one worker ({args.worker_memory}, memory handed back: "
        f"{args.hand_back}), {run['seconds']:.1f} s"
    )
    print("| task | median s |\n|---|---|")
    for kind, t in run["tasks"].items():
        print(f"| {kind} | {t['median_s']:.3f} |")
    cpu = result["per_block"]
    print(
        f"the worker, per block: user {cpu['user_s']:.3f} s, kernel {cpu['kernel_s']:.3f} s, "
        f"{cpu['minor_faults']:,.0f} minor page faults"
    )
    print(
        f"quantile map on {mapped['values']:,} values: np.interp {mapped['interp_ms']:.1f} ms, "
        f"bucket lookup {mapped['buckets_ms']:.1f} ms, the same scores: {mapped['same_scores']}"
    )
    print(f"outputs digest: {digest}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
