"""What one block of a CSV costs ingest, on one worker: its two tasks and the CPU under them.

The stage's wall time on two workers moves by a few percent between runs of
`ingest_benchmark.py`; a change worth 2% of a block hides in that. Here the stage runs as
that script runs it (`run_accelflow`), on one worker process, so its tasks run one after
the other: per block, the median seconds of the scan task (`scan_csv_range`, profile
included) and of the write task (`write_block`), and the worker's CPU time in user space
and in the kernel and its minor page faults (getrusage). `--hand-back always` makes every
data task give its freed memory back, as before 7390019. Also the quantile-normal map on
the first 320,000 rows' numbers, np.interp against the bucket lookup; four more pieces,
each beside what it replaced (best of 5): a block's row hashes against pandas'
`hash_pandas_object`, a block streamed to the parser against read into one bytes object
first, the training split's digest by pieces on every core against one sha256, and the
data contract's one-hot counts by column sums against an argmax per row; and the digest
of the stage's outputs (`ingest_benchmark.output_digest`), so two runs can be compared.

    .venv/bin/python benchmarks/ingest_benchmark.py --variant generate --gb 1 --source one.csv
    .venv/bin/python benchmarks/ingest_blocks.py --csv one.csv                  # about 45 s
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


def best_ms(call, runs: int = 5) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best * 1000


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
    timings = {f"{name}_ms": best_ms(call) for name, call in calls.items()}
    same = np.array_equal(calls["interp"](), calls["buckets"]())
    return {"values": len(x), **timings, "same_scores": bool(same)}


def pieces_ms(stage: Path, csv: Path) -> dict[str, dict[str, float]]:
    """Each piece beside what it replaced, in ms (best of 5), on a block's worth of rows and
    on the training split the stage wrote."""
    import hashlib
    import io

    import pandas as pd
    from fsspec.utils import read_block

    from conf.schema import DataConfig
    from tasks.encoding import Encoder
    from tasks.monitor import _category_bins, layout
    from tasks.readers import csv_header, filesystem
    from tasks.splitting import row_hashes
    from tasks.store import file_digest
    from tasks.tables import clean_block, profile_raw
    from tasks.tables.blocks import _ByteRange
    from tasks.tables.schema import block_schema

    encoder = Encoder.load(stage / "encoder.json")
    # the rows a scan task hashes: a block's, typed and cleaned as the task does
    raw = pd.read_csv(csv, nrows=MAP_ROWS, low_memory=False)
    schema = block_schema(profile_raw(raw), DataConfig(source=str(csv), label="label"))
    features = clean_block(raw, schema)[0]
    header = csv_header(*filesystem(str(csv)))
    length = int(csv.stat().st_size / 25)  # about a block of the generated 1 GiB CSV

    def parse(rows):
        return pd.read_csv(rows, header=None, names=header, index_col=False, low_memory=False)

    def parse_bytes():
        with open(csv, "rb") as fh:
            parse(io.BytesIO(read_block(fh, length, length, delimiter=b"\n")))

    def parse_stream():
        with open(csv, "rb") as fh:
            fh.seek(2 * length)
            fh.readline()
            end = fh.tell()
            fh.seek(length)
            fh.readline()
            parse(_ByteRange(fh, end))

    def one_sha256(path):
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
        return digest.hexdigest()

    train = stage / "train_X.npy"
    encoded = np.load(train, mmap_mode="r")[:MAP_ROWS].copy()
    spans = [(c, *layout(encoder)[c]) for c in encoder.onehot]

    def argmax_counts():
        for _, lo, hi in spans:
            np.bincount(encoded[:, lo:hi].argmax(axis=1), minlength=hi - lo)

    def sum_counts():
        for column, lo, hi in spans:
            _category_bins(encoded[:, lo:hi], column, encoder)

    pairs = {
        "row hashes": (
            lambda: pd.util.hash_pandas_object(features, index=False),
            lambda: row_hashes(features),
        ),
        "a block's parse": (parse_bytes, parse_stream),
        f"the training split's digest ({train.stat().st_size / 2**20:,.0f} MiB)": (
            lambda: one_sha256(train),
            lambda: file_digest(train),
        ),
        f"one-hot contract counts ({len(spans)} columns)": (argmax_counts, sum_counts),
    }
    return {
        name: {"before_ms": best_ms(old), "now_ms": best_ms(new)}
        for name, (old, new) in pairs.items()
    }


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
        stage = next(work.glob("ingest/*/encoder.json")).parent
        mapped = quantile_map_ms(stage / "encoder.json", args.csv)
        pieces = pieces_ms(stage, args.csv)
    blocks = run["blocks"]
    result = {
        "csv": str(args.csv),
        "hand_back": args.hand_back,
        "blocks": blocks,
        "seconds": run["seconds"],
        "tasks": run["tasks"],
        "per_block": {what: v / blocks for what, v in run["workers_cpu"].items()},
        "quantile_map": mapped,
        "pieces": pieces,
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
    print("| piece | before ms | now ms |\n|---|---|---|")
    for name, ms in pieces.items():
        print(f"| {name} | {ms['before_ms']:.1f} | {ms['now_ms']:.1f} |")
    print(f"outputs digest: {digest}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
