"""What one block of a CSV costs ingest: its scan and write tasks, in this one process.

The stage's wall time on two workers moves by a few percent between runs of
`ingest_benchmark.py`; a change worth 2% of a block hides in that. Here the scan task
(`scan_csv_range`, profile included) runs on each of the first blocks of a CSV, then the
plan, then the write task (`write_block`) on each, as a worker runs them, one after the
other: per block, the median seconds of each task, and the CPU time in user space and in
the kernel and the minor page faults (getrusage), the first block (imports) left out. Also the quantile-normal
map on one block's numbers, np.interp against the bucket lookup, and a digest of the split
arrays and test rows written, so two commits' outputs can be compared.

    .venv/bin/python benchmarks/ingest_benchmark.py --variant generate --gb 1 --source one.csv
    .venv/bin/python benchmarks/ingest_blocks.py --csv one.csv                  # about 30 s
    .venv/bin/python benchmarks/ingest_blocks.py --csv one.csv --memory kept
"""

from __future__ import annotations

import hashlib
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import benchmark_args, write_json  # noqa: E402  (sets the path)


def usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def per_block(before: tuple, after: tuple, blocks: int) -> dict:
    return {
        "user_s": (after[0] - before[0]) / blocks,
        "kernel_s": (after[1] - before[1]) / blocks,
        "minor_faults": (after[2] - before[2]) / blocks,
    }


def quantile_map_ms(encoder, features) -> dict:
    """np.interp and the bucket lookup on one block's moved numbers: best of 5 each."""
    values = encoder.numeric_values(features)
    np.copyto(values, np.array([encoder.fills[c] for c in encoder.numeric]), where=np.isnan(values))
    where, low, high, xp, fp = encoder.quantile_map
    moved = (np.clip(values.T[where], low[:, None], high[:, None]) - low[:, None]) / (high - low)[
        :, None
    ] + 2 * np.arange(len(where))[:, None]
    x = moved.ravel()
    timings = {}
    for name, call in (
        ("interp", lambda: np.interp(x, xp, fp)),
        ("buckets", lambda: encoder._interp_by_buckets(x)),
    ):
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - start)
        timings[f"{name}_ms"] = best * 1000
    same = np.array_equal(np.interp(x, xp, fp), encoder._interp_by_buckets(x))
    return {"values": len(x), **timings, "same_scores": bool(same)}


def main() -> None:
    parser = benchmark_args(__doc__, "ingest_blocks")
    parser.add_argument("--csv", type=Path, required=True, help="a CSV ingest_benchmark wrote")
    parser.add_argument("--blocks", type=int, default=9, help="the first this many (2 or more)")
    parser.add_argument("--block-mb", type=float, default=41, help="a 1 GiB worker's block")
    parser.add_argument(
        "--memory",
        choices=["handed-back", "kept"],
        default="handed-back",
        help="after each task, as outside a worker (handed back), or as a worker under its limit",
    )
    args = parser.parse_args()

    import tasks.cluster
    from conf.schema import DataConfig
    from tasks.encoding import Encoder
    from tasks.monitor import numeric_specs
    from tasks.readers import csv_header, filesystem
    from tasks.tables.blocks import number_rows, read_clean, scan_csv_range
    from tasks.tables.profiling import Profiler, TableProfile, plan
    from tasks.tables.schema import decide_schema
    from tasks.tables.writing import write_block

    if args.memory == "kept":  # data tasks look the function up when they end
        tasks.cluster.hand_back_memory = lambda always=False: False
    source, size = str(args.csv), int(args.block_mb * 2**20)
    cfg = DataConfig(source=source, label="label", on_bad_rows="quarantine")
    with tempfile.TemporaryDirectory() as scratch:
        header = csv_header(*filesystem(source))
        scans, blocks = [], []
        for i in range(args.blocks):
            if i == 1:  # the first block pays for imports and first calls: counted apart
                start = usage()
            began = time.perf_counter()
            block = scan_csv_range(
                source, i * size, size, header, scratch, "uncompressed", Profiler(cfg, True)
            )
            scans.append(time.perf_counter() - began)
            blocks.append(tasks.cluster.checked(block)[0])
        scanned = usage()
        results = [block.pop("profile") for block in blocks]
        blocks = number_rows(blocks)
        schema = decide_schema(blocks, cfg)
        profile = TableProfile.of(schema.key(), None)
        for block, result in zip(blocks, results, strict=True):
            profile.add(block["name"], result)
        profile.place(blocks)
        p = plan(schema, cfg, profile)
        encoder_path = Path(scratch) / "encoder.json"
        p.encoder.save(encoder_path)
        mapped = quantile_map_ms(Encoder.load(encoder_path), read_clean(blocks[0])[0])
        sizes = np.array(p.counts)
        offsets = np.vstack([np.zeros(3, dtype=np.int64), np.cumsum(sizes, axis=0)[:-1]])
        targets = {}
        for s, name in enumerate(("train", "val", "test")):
            X, y = f"{scratch}/{name}_X.npy", f"{scratch}/{name}_y.npy"
            width = len(p.encoder.feature_names)
            np.lib.format.open_memmap(X, "w+", np.float32, (int(sizes[:, s].sum()), width))
            np.lib.format.open_memmap(y, "w+", np.int64, (int(sizes[:, s].sum()),))
            targets[name] = (X, y)
        (Path(scratch) / "test_rows").mkdir()
        contract = numeric_specs(p.encoder, p.sample)
        writes = []
        for i, block in enumerate(blocks):
            if i == 1:
                before_writes = usage()
            began = time.perf_counter()
            tasks.cluster.checked(
                write_block(
                    block,
                    cfg,
                    str(encoder_path),
                    p.classes,
                    p.cutoffs,
                    p.counts[i],
                    offsets[i].tolist(),
                    targets,
                    f"{scratch}/test_rows",
                    contract,
                )
            )
            writes.append(time.perf_counter() - began)
        written = usage()
        digest = hashlib.sha256()
        for file in [*(f for pair in targets.values() for f in pair)] + sorted(
            str(f) for f in (Path(scratch) / "test_rows").iterdir()
        ):
            digest.update(Path(file).read_bytes())
    result = {  # every figure leaves the first block out
        "csv": str(args.csv),
        "blocks": args.blocks,
        "block_mb": args.block_mb,
        "memory": args.memory,
        "scan_s": statistics.median(scans[1:]),
        "write_s": statistics.median(writes[1:]),
        "scan": per_block(start, scanned, args.blocks - 1),
        "write": per_block(before_writes, written, args.blocks - 1),
        "quantile_map": mapped,
        "digest": digest.hexdigest()[:16],
    }
    print(
        f"| task ({args.blocks} blocks of {args.block_mb:g} MB, memory {args.memory}) "
        "| median s | user s | kernel s | minor faults |"
    )
    print("|---|---|---|---|---|")
    for task in ("scan", "write"):
        r = result[task]
        print(
            f"| {task} | {result[f'{task}_s']:.3f} | {r['user_s']:.3f} | {r['kernel_s']:.3f} "
            f"| {r['minor_faults']:,.0f} |"
        )
    print(
        f"quantile map on {mapped['values']:,} values: np.interp {mapped['interp_ms']:.1f} ms, "
        f"bucket lookup {mapped['buckets_ms']:.1f} ms, the same scores: {mapped['same_scores']}"
    )
    print(f"outputs digest: {result['digest']}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
