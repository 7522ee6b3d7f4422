"""partition: Dask writes each split as compressed Parquet files of a target size.

Each Dask task memory-maps its row range of the ingest `.npy`, transposes it once into
contiguous columns and writes one Parquet file with pyarrow: no pandas round trip and no
process ever holds a whole split. (Measured on this stack, going through dask.dataframe's
writer halves throughput against plain pyarrow; this path keeps both cores busy instead.)

Before writing, a codec report measures every candidate codec on a sample of the training
split (ratio, write and read speed); `partition.codec: auto` picks by a stated rule.
Dictionary encoding is enabled per column only where the sample shows it pays (few distinct
values, or a distinct count that stops growing): on dense high-cardinality floats it
inflates files (~50% measured) and halves write speed.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np

from conf.schema import PartitionConfig, PipelineConfig
from tasks.cluster import dask_client, map_shared
from tasks.progress import Progress, gather
from tasks.spec import Hooks, Inputs, StageSpec
from tasks.store import Manifest, StageDir, describe_files

LABEL = "label"
CANDIDATES = [
    ("none", None),
    ("snappy", None),
    ("lz4", None),
    ("gzip", 1),
    ("gzip", 6),
    ("zstd", 1),
    ("zstd", 3),
    ("zstd", 9),
    ("zstd", 15),
]
READ_TOLERANCE = 0.8  # auto: best ratio among codecs reading at >= 80% of the fastest


def rows_per_partition(row_bytes: int, target_mb: float) -> int:
    return max(1, int(target_mb * 2**20 // max(row_bytes, 1)))


def to_table(X: np.ndarray, y: np.ndarray, names: list[str], storage_dtype: str | None = None):
    """Rows → an Arrow table, one contiguous column each (one transpose copy per chunk)."""
    import pyarrow as pa

    columns = np.ascontiguousarray(X.T)
    if storage_dtype == "float16" and columns.dtype.kind == "f":
        columns = columns.astype(np.float16)  # lossy by request: halves float storage
    arrays = [pa.array(col) for col in columns]
    return pa.table([*arrays, pa.array(np.asarray(y))], names=[*names, LABEL])


def write_options(
    codec: str,
    level: int | None,
    dictionary: list[str],
    row_group_rows: int,
    byte_stream_split: list[str] | None = None,
) -> dict:
    return {
        "compression": None if codec == "none" else codec,
        "compression_level": level,
        "use_dictionary": dictionary,
        "use_byte_stream_split": byte_stream_split or False,
        "row_group_size": row_group_rows,
    }


def write_chunk(
    bounds: tuple[int, int],
    dest: str,
    x_path: str,
    y_path: str,
    names: list[str],
    options: dict,
    storage_dtype: str | None,
) -> dict[str, Any]:
    """Write one file and describe it (size, digest) here, so hashing runs in parallel too."""
    import pyarrow.parquet as pq

    start, stop = bounds
    X = np.load(x_path, mmap_mode="r")[start:stop]
    y = np.load(y_path, mmap_mode="r")[start:stop]
    pq.write_table(to_table(X, y, names, storage_dtype), dest, **options)
    return describe_files([Path(dest)])[0]


def float_columns(table, exclude: list[str]) -> list[str]:
    """Float columns stored plainly: byte-stream-split groups their exponent bytes, which
    compresses better and encodes faster (measured: ratio +1.4%, write speed +30%)."""
    import pyarrow as pa

    return [f.name for f in table.schema if pa.types.is_floating(f.type) and f.name not in exclude]


# ---------------------------------------------------------------- codec report


def dictionary_columns(
    table, max_distinct_fraction: float = 0.05, saturation: float = 1.6
) -> list[str]:
    """Columns where dictionary encoding pays, judged on the sample: few distinct values, or
    a distinct count that stops growing with more rows (prices in cents: a bounded set of
    values that a large row group repeats many times). A dense float column's distinct count
    doubles with twice the rows, and it stays plain: there dictionary encoding inflates files
    (~50% measured) and halves write speed. On the benchmark table, adding the saturating
    columns took the ratio from 1.84 to 2.06 at 64 MB row groups, for 6% slower writes."""
    import pyarrow.compute as pc

    limit = max(2, int(table.num_rows * max_distinct_fraction))
    half = table.slice(0, table.num_rows // 2)
    chosen = []
    for name in table.column_names:
        distinct = pc.count_distinct(table[name]).as_py()
        saturating = (
            table.num_rows >= 2000 and distinct < saturation * pc.count_distinct(half[name]).as_py()
        )
        if distinct <= limit or saturating:
            chosen.append(name)
    return chosen


def measure(table, codec: str, level: int | None, dictionary, repeats: int = 2) -> dict[str, Any]:
    """Ratio against Arrow's in-memory size, best-of-N write and read speed in MB/s. Slow
    codecs are timed once: a single write of several MB is already a steady measurement."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw_mb = table.nbytes / 2**20
    writes, reads, size = [], [], 0
    started = time.perf_counter()
    for _ in range(repeats):
        sink = io.BytesIO()
        start = time.perf_counter()
        pq.write_table(table, sink, **write_options(codec, level, dictionary, table.num_rows))
        writes.append(time.perf_counter() - start)
        size = sink.tell()
        start = time.perf_counter()
        pq.read_table(pa.BufferReader(sink.getbuffer()))
        reads.append(time.perf_counter() - start)
        if writes[-1] > 0.1:
            break
    return {
        "codec": codec,
        "level": level,
        "ratio": table.nbytes / size,
        "bytes": size,
        "write_mb_s": raw_mb / min(writes),
        "read_mb_s": raw_mb / min(reads),
        "seconds": time.perf_counter() - started,
    }


def codec_report(sample, dictionary, candidates, client) -> list:
    """Futures measuring each candidate on the cluster, one task each, so the report runs
    on all workers and, for a fixed codec, alongside the writes."""
    [shared] = client.scatter([sample], broadcast=True)
    return [
        client.submit(measure, shared, codec, level, dictionary, pure=False)
        for codec, level in candidates
    ]


def choose_codec(report: list[dict[str, Any]]) -> dict[str, Any]:
    """The stated rule: best ratio among codecs that read within 20% of the fastest reader;
    ties go to the faster writer."""
    fastest = max(r["read_mb_s"] for r in report)
    eligible = [r for r in report if r["read_mb_s"] >= READ_TOLERANCE * fastest]
    return max(eligible, key=lambda r: (round(r["ratio"], 3), r["write_mb_s"]))


def sample_rows(
    split: dict[str, Any], row_bytes: int, sample_mb: float, runs: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Rows from `runs` evenly spaced stretches of a split: a sample of the whole file,
    whatever order its rows are in. Stretches, not single rows: one row per page would
    fault in a page per row (measured: 0.33 s for 4 MB, before any task could start)."""
    n = rows_per_partition(row_bytes, sample_mb)
    X, y = np.load(split["X"]["path"], mmap_mode="r"), np.load(split["y"]["path"], mmap_mode="r")
    if len(y) <= n:
        return np.asarray(X), np.asarray(y)
    run = max(1, n // runs)
    starts = np.linspace(0, len(y) - run, num=max(1, n // run)).astype(np.int64)
    index = (starts[:, None] + np.arange(run)).ravel()
    return X[index], y[index]


def plot_report(report: list[dict[str, Any]], chosen: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report:
        label = r["codec"] + (f"-{r['level']}" if r["level"] is not None else "")
        ax.scatter(
            r["read_mb_s"],
            r["ratio"],
            s=20 + r["write_mb_s"] / 5,
            color="tab:red" if r is chosen else "tab:blue",
        )
        ax.annotate(
            label,
            (r["read_mb_s"], r["ratio"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("read MB/s (in-memory, one thread)")
    ax.set_ylabel("compression ratio")
    ax.set_title("codec report on a sample of the training split (marker size: write speed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_markdown(report: list[dict[str, Any]], chosen: dict[str, Any], sample_mb: float) -> str:
    lines = [
        f"Codec report on {sample_mb:.1f} MB of training rows. Rule: best ratio among codecs whose "
        f"read speed is within {100 - READ_TOLERANCE * 100:.0f}% of the fastest.",
        "",
        "| codec | level | ratio | write MB/s | read MB/s | |",
        "|---|---|---|---|---|---|",
    ]
    for r in report:
        mark = "**chosen**" if r is chosen else ""
        lines.append(
            f"| {r['codec']} | {r['level'] if r['level'] is not None else ''} | {r['ratio']:.2f} | "
            f"{r['write_mb_s']:.0f} | {r['read_mb_s']:.0f} | {mark} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- the stage


def partition_dataset(
    ingest: Manifest, cfg: PartitionConfig, out: StageDir, client
) -> dict[str, Any]:
    """Measure codecs, then write every split on the Dask cluster; return the manifest body."""
    started = time.perf_counter()
    names = ingest["feature_names"]
    train = ingest["splits"]["train"]
    item = np.load(train["X"]["path"], mmap_mode="r")
    row_bytes = item.shape[1] * item.dtype.itemsize
    Xs, ys = sample_rows(train, row_bytes, cfg.sample_mb)
    sample = to_table(np.asarray(Xs), np.asarray(ys), names, cfg.storage_dtype)
    dictionary = dictionary_columns(sample)
    candidates = list(CANDIDATES)
    if cfg.codec != "auto" and (cfg.codec, cfg.level) not in candidates:
        candidates.append((cfg.codec, cfg.level))  # the configured level is always measured
    measuring = codec_report(sample, dictionary, candidates, client)
    if cfg.codec == "auto":  # the writes wait for the report; a fixed codec need not
        chosen = choose_codec(client.gather(measuring))
        codec, level = chosen["codec"], chosen["level"]
    else:
        codec, level = cfg.codec, cfg.level
    options = write_options(
        codec,
        level,
        dictionary,
        rows_per_partition(row_bytes, cfg.row_group_mb),
        float_columns(sample, dictionary),
    )

    writing: dict[str, list] = {}
    for name, split in ingest["splits"].items():
        out.path(name).mkdir()
        step = rows_per_partition(row_bytes, cfg.target_partition_mb)
        bounds = [(i, min(i + step, split["rows"])) for i in range(0, split["rows"], step)] or [
            (0, 0)
        ]
        targets = [str(out.path(f"{name}/part-{i:05d}.parquet")) for i in range(len(bounds))]
        writing[name] = map_shared(
            client,
            write_chunk,
            bounds,
            targets,
            x_path=split["X"]["path"],
            y_path=split["y"]["path"],
            names=names,
            options=options,
            storage_dtype=cfg.storage_dtype,
        )
    report = client.gather(measuring)
    chosen = next(r for r in report if (r["codec"], r["level"]) == (codec, level))
    plot_report(report, chosen, out.path("codec_report.png"))
    every = [f for futures in writing.values() for f in futures]
    written_as = codec + (f"-{level}" if level is not None else "")
    with Progress("partition", f"partitions written ({written_as})", len(every)) as progress:
        written = iter(gather(client, every, progress, lambda d: f"{d['bytes'] / 2**20:.1f} MiB"))

    splits: dict[str, Any] = {}
    bytes_in = bytes_out = 0
    for name, split in ingest["splits"].items():
        described = [out.moved(next(written)) for _ in writing[name]]
        splits[name] = {"files": described, "rows": split["rows"]}
        bytes_in += split["X"]["bytes"] + split["y"]["bytes"]
        bytes_out += sum(d["bytes"] for d in described)
    ratio = bytes_in / max(bytes_out, 1)
    codec = chosen["codec"] + (f"-{chosen['level']}" if chosen["level"] is not None else "")
    summary = (
        f"{bytes_in / 2**20:.1f} MiB → {bytes_out / 2**20:.1f} MiB with {codec} (ratio {ratio:.2f}); "
        f"dictionary encoding on {len(dictionary)}/{len(names) + 1} columns\n\n"
        + report_markdown(report, chosen, sample.nbytes / 2**20)
    )
    return {
        "splits": splits,
        "feature_names": names,
        "label": LABEL,
        "classes": ingest["classes"],
        "image_shape": ingest["image_shape"],
        # what serving needs to score raw rows: the raw columns, the fitted encoder, an example
        "raw_columns": ingest.get("raw_columns", names),
        "encoder": ingest.get("encoder"),
        "codes": ingest.get("codes", {}),
        "unscaled": ingest.get("unscaled", []),  # numeric features the network leaves as they are
        "contract": ingest.get("contract"),  # the training data's contract (tasks/monitor.py)
        "raw_example": ingest.get("raw_example"),
        # the test rows exactly as the served model's encoder makes them from raw rows (full
        # precision): evaluate scores these, so test/accuracy is what a user of the model gets
        "served_test": ingest["splits"]["test"],
        "test_rows": ingest.get("test_rows"),  # the same rows, raw (tables only)
        "codec": {
            "codec": chosen["codec"],
            "level": chosen["level"],
            "dictionary_columns": len(dictionary),
            "storage_dtype": cfg.storage_dtype,
        },
        "codec_report": report,
        "plots": [out.final_path("codec_report.png")],
        "metrics": {
            "data/bytes_in": bytes_in,
            "data/bytes_out": bytes_out,
            "data/compression_ratio": round(ratio, 4),
            "data/partitions": sum(len(s["files"]) for s in splits.values()),
            "data/codec_ratio_on_sample": chosen["ratio"],
            "data/codec_read_mb_s": chosen["read_mb_s"],
            "data/codec_write_mb_s": chosen["write_mb_s"],
            "data/codec_report_seconds": sum(
                r["seconds"] for r in report
            ),  # task time, on the workers
            "data/seconds": time.perf_counter() - started,
        },
        "summary": summary,
    }


def build_partitions(cfg: PipelineConfig, inputs: Inputs, out: StageDir, hooks: Hooks) -> dict:
    with dask_client(cfg.dask) as client:
        return partition_dataset(inputs["ingest"], cfg.partition, out, client)


SPEC = StageSpec(
    name="partition",
    section="partition",
    inputs=("ingest",),
    key=lambda cfg, inputs: cfg.partition.model_dump(mode="json"),
    build=build_partitions,
    figure=lambda m: f"compression ×{m['metrics']['data/compression_ratio']:.2f}",
    headline={"data/compression_ratio": "higher"},
    tables={"codec-report": "codec_report"},
    datasets=tuple(("partition", split, split) for split in ("train", "val", "test")),
    uses_dask=True,
)
