"""Pass 1 (scan): a source cut into blocks, each parsed once by a Dask task and counted per
column, then profiled there and then (ingest) or kept as parsed (batch scoring) in a
scratch Arrow file; and reading a block's scratch file back."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from conf.schema import DataConfig
from tasks.cluster import checked, data_task
from tasks.errors import DataError
from tasks.readers import CSV_COMPRESSION, csv_header, filesystem, open_text_stream
from tasks.tables.schema import count_numbers

# Measured on this stack: a task holds about 10x its block while it works (pandas frame,
# typed copies, hashes, encoded rows), on top of a worker's ~200 MiB at rest.
TASK_MEMORY_PER_BLOCK = 10
WORKER_AT_REST = 200 * 2**20


def profile_raw(frame) -> dict[str, Any]:
    """Per column: values present, values that are numbers, and whether the block's parser
    typed it as numbers. What `decide_schema` needs, summed over blocks."""
    import pandas as pd

    present = frame.count()
    columns = {}
    for name in frame.columns:
        values = frame[name]
        typed = bool(pd.api.types.is_numeric_dtype(values))
        numbers = int(present[name]) if typed else count_numbers(values)
        fractional = typed and pd.api.types.is_float_dtype(values) and _fractional(values)
        columns[name] = {
            "present": int(present[name]),
            "numbers": numbers,
            "typed": typed,
            "fractional": fractional,
            "integer": bool(pd.api.types.is_integer_dtype(values)),
        }
    return {"rows": len(frame), "names": [str(c) for c in frame.columns], "columns": columns}


def _fractional(values) -> bool:
    """Whether a float column holds a number that is not whole, missing values aside (an
    infinity counts: it is no class code). Numpy, without pandas' filtered copy and modulo."""
    array = values.to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        not_whole = (array != np.floor(array)) & ~np.isnan(array)
    return bool(not_whole.any() or np.isinf(array).any())


def _keep(frame, scratch: str, name: str, where: str, compression: str, profiler=None) -> dict:
    """Count a parsed block per column, then either profile it there and then (ingest: the
    `profiler` keeps its cleaned rows, `profiling.Profiler`) or keep it as it is, as an
    Arrow file (batch scoring)."""
    import pyarrow as pa
    import pyarrow.feather as feather

    frame.columns = [str(c) for c in frame.columns]
    for column in frame.columns:  # Parquet dictionary columns arrive as pandas categoricals
        if frame[column].dtype == "category":
            frame[column] = frame[column].astype(object)
    block = {**profile_raw(frame), "where": where, "name": name, "path": None}
    block["compression"] = compression
    if not len(frame):
        return block
    block["path"] = f"{scratch}/{name}.arrow"
    if profiler is None:
        feather.write_feather(
            pa.Table.from_pandas(frame, preserve_index=False),
            block["path"],
            compression=compression,
        )
    elif profiler.wants(name):
        profiler(frame, block)
    return block


@data_task
def scan_csv_range(
    source: str,
    offset: int,
    length: int,
    header: list[str],
    scratch: str,
    compression: str,
    profiler=None,
) -> list[dict]:
    """One byte range of an uncompressed CSV, cut at line ends as fsspec's read_block cuts
    it: from the end of the line holding byte `offset` (the header's, at 0) to the end of
    the line holding byte `offset + length`."""
    import pandas as pd

    fs, path = filesystem(source)
    with fs.open(path, "rb") as fh:
        fh.seek(min(offset + length, fs.size(path)))
        fh.readline()
        end = fh.tell()
        fh.seek(offset)
        fh.readline()
        start = fh.tell()
        where = f"{path} (bytes {start}-{end})"
        # streamed to the parser from the file: reading the block into one bytes object
        # first cost a copy and the page faults of a fresh 40 MB buffer
        rows = _ByteRange(fh, end)
        try:
            frame = pd.read_csv(rows, header=None, names=header, index_col=False, low_memory=False)
        except Exception as exc:  # pandas raises several types for malformed text
            raise DataError(
                f"{where}: cannot parse as CSV ({type(exc).__name__}: {str(exc).strip()}; lines "
                "are counted from the start of this byte range). Fix that line, or quote "
                "fields that hold the delimiter"
            ) from None
    return [_keep(frame, scratch, f"csv-{offset:015d}", where, compression, profiler)]


class _ByteRange(io.RawIOBase):
    """An open binary file read from where it stands up to byte `end`, as a stream."""

    def __init__(self, fh, end: int):
        self.fh, self.end = fh, end

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        left = max(0, self.end - self.fh.tell())
        return self.fh.read(left if size is None or size < 0 else min(size, left))


def _parsed(frames, message):
    """The frames a lazy reader yields, its errors (whatever their type) turned into a
    DataError saying `message(exc)`; an error in what the caller does with a frame is no
    parsing error and passes as it is."""
    frames = iter(frames)
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except Exception as exc:  # truncated streams, bad compression, malformed text
            raise DataError(message(exc)) from None
        yield frame


@data_task
def scan_csv_stream(
    source: str, rows_per_block: int, scratch: str, compression: str, profiler=None
) -> list[dict]:
    """A compressed CSV cannot be cut by bytes: one task streams it in blocks of rows."""
    import pandas as pd

    fs, path = filesystem(source)

    def frames():
        with open_text_stream(fs, path) as fh:
            yield from pd.read_csv(fh, chunksize=rows_per_block, index_col=False, low_memory=False)

    blocks = [
        _keep(
            frame,
            scratch,
            f"stream-{i:06d}",
            f"{path} (rows from {i * rows_per_block})",
            compression,
            profiler,
        )
        for i, frame in enumerate(
            _parsed(
                frames(),
                lambda e: f"{path}: cannot read as CSV ({type(e).__name__}: {e}); is it complete?",
            )
        )
    ]
    return blocks or [
        _keep(
            pd.DataFrame(columns=csv_header(fs, path)), scratch, "stream-empty", path, compression
        )
    ]


@data_task
def scan_parquet(
    source: str,
    path: str,
    row_group: int,
    rows_per_block: int,
    scratch: str,
    name: str,
    compression: str,
    profiler=None,
) -> list[dict]:
    import pyarrow.parquet as pq

    fs, _ = filesystem(source)

    def frames():
        with fs.open(path, "rb") as fh:
            batches = pq.ParquetFile(fh).iter_batches(
                batch_size=rows_per_block, row_groups=[row_group]
            )
            yield from (batch.to_pandas() for batch in batches)

    return [
        _keep(
            frame,
            scratch,
            f"{name}-{i:05d}",
            f"{path} (row group {row_group})",
            compression,
            profiler,
        )
        for i, frame in enumerate(
            _parsed(frames(), lambda e: f"{path}: cannot read as parquet ({type(e).__name__}: {e})")
        )
    ]


def scan_parts(cfg: DataConfig, fmt: str, scratch: str, block_bytes: int) -> list[tuple]:
    """The scan's tasks, in source order, as (function, arguments): a byte range of a CSV
    per task, one task for a compressed CSV, a row group of a Parquet file per task."""
    import pyarrow.parquet as pq

    fs, path = filesystem(cfg.source)
    packed = fmt != "csv" or Path(path).suffix in CSV_COMPRESSION
    compression = scratch_compression(fs.du(path), packed, shutil.disk_usage(scratch).free)
    if fmt == "csv" and Path(path).suffix not in CSV_COMPRESSION:
        header = csv_header(fs, path)
        return [
            (scan_csv_range, (cfg.source, offset, block_bytes, header, scratch, compression))
            for offset in range(0, max(fs.size(path), 1), block_bytes)
        ]
    if fmt == "csv":
        rows = _rows_per_block(fs, path, block_bytes)
        return [(scan_csv_stream, (cfg.source, rows, scratch, compression))]
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet")) if fs.isdir(path) else [path]
    parts = []
    for number, file in enumerate(files):
        try:
            with fs.open(file, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
        except Exception as exc:
            raise DataError(
                f"{file}: cannot read as parquet ({type(exc).__name__}: {exc})"
            ) from None
        for group in range(meta.num_row_groups):
            row_group = meta.row_group(group)
            row_bytes = max(row_group.total_byte_size / max(row_group.num_rows, 1), 1)
            rows = max(1, int(block_bytes / row_bytes))
            name = f"pq-{number:05d}-{group:05d}"
            parts.append(
                (scan_parquet, (cfg.source, file, group, rows, scratch, name, compression))
            )
    if not parts:
        raise DataError(f"{path}: no .parquet files, or only empty ones")
    return parts


def run_parts(parts: list[tuple], which, client, profiler=None, take=None) -> list[dict]:
    """Run the scan tasks `which` (indices into `parts`) on the cluster; returns their blocks
    in source order, each with its task's index as `part`. `take(block)` sees each block as
    its task finishes, so the driver can fold in and drop a profiled block's result."""
    from dask.distributed import as_completed

    futures = {client.submit(parts[i][0], *parts[i][1], profiler, pure=False): i for i in which}
    blocks = []
    for future in as_completed(futures):
        for j, block in enumerate(checked(future.result())):
            block["part"], block["order"] = futures[future], (futures[future], j)
            if take:
                take(block)
            blocks.append(block)
        future.release()
    return sorted(blocks, key=lambda block: block["order"])


def number_rows(blocks: list[dict]) -> list[dict]:
    """The non-empty blocks (or one empty block for an empty source, so its columns are still
    known), each with its first row's number in the table, as the user counts rows."""
    blocks = [b for b in blocks if b["rows"]] or blocks[:1]
    first_row = 0
    for block in blocks:
        block["first_row"], first_row = first_row, first_row + block["rows"]
    return blocks


def scan(cfg: DataConfig, fmt: str, scratch: str, client, block_bytes: int) -> list[dict]:
    """Pass 1 alone, each block kept as parsed (batch scoring); blocks in source order."""
    parts = scan_parts(cfg, fmt, scratch, block_bytes)
    return number_rows(run_parts(parts, range(len(parts)), client))


# Scratch blocks hold a table's parsed, then cleaned, rows as Arrow files. Uncompressed,
# they are faster to write and read back (a 4 GiB CSV ingested in 72.4 s against 95.3 with
# lz4: benchmarks/README.md), but as large as the values' types (64-bit numbers, whatever
# the CSV's digits). So they are written uncompressed where the scratch disk has room for
# this many times the source's size, and lz4 halves them otherwise. A compressed source (a
# .gz CSV, Parquet) counts five times its size.
SCRATCH_ROOM = 8
PACKED_SOURCE = 5


def scratch_compression(source_bytes: int, packed: bool, free_bytes: int) -> str:
    """How scratch blocks are written: "uncompressed" where the disk has room, else "lz4"."""
    need = SCRATCH_ROOM * source_bytes * (PACKED_SOURCE if packed else 1)
    return "uncompressed" if free_bytes > need else "lz4"


def worker_memory_limit(client) -> int:
    """The smallest memory limit of the cluster's workers in bytes; 0 when none is set."""
    limits = [w.get("memory_limit") or 0 for w in client.scheduler_info()["workers"].values()]
    return min(limits) if limits and min(limits) else 0


def block_size(block_mb: float, client, at_rest: int = WORKER_AT_REST) -> int:
    """`data.block_mb`, made smaller where the workers' memory limit calls for it: a task
    should stay under 60% of the limit (Dask pauses a worker at 80%), on top of what a
    worker holds at rest (`at_rest`: more when its tasks load torch and a model)."""
    limit, wanted = worker_memory_limit(client), int(block_mb * 2**20)
    if not limit:
        return wanted
    fits = int((0.6 * limit - at_rest) / TASK_MEMORY_PER_BLOCK)
    return min(wanted, max(2**20, fits))


def _rows_per_block(fs, path: str, block_bytes: int) -> int:
    """Rows of a compressed CSV that make about one block: from the first decompressed MiB."""
    try:
        with open_text_stream(fs, path) as fh:
            head = fh.read(2**20)
    except (OSError, EOFError, ValueError) as exc:  # a file cut short before its first MiB
        raise DataError(
            f"{path}: cannot read as CSV ({type(exc).__name__}: {exc}); is it complete?"
        ) from None
    lines = max(head.count(b"\n"), 1)
    return max(1000, int(block_bytes / (len(head) / lines)))


def read_block(block: dict):
    import pyarrow.feather as feather

    return feather.read_table(block["path"], memory_map=True).to_pandas()


# A cleaned block's extra columns: names no CSV header can hold
ROW, LABEL, HASH = "\0row", "\0label", "\0hash"


def keep_clean(block: dict, features, labels, u) -> None:
    """Keep a block's cleaned good rows (typed features, labels, row numbers within the
    block, hashes) as its scratch file: the write pass encodes them without parsing,
    cleaning or hashing again."""
    import pyarrow as pa
    import pyarrow.feather as feather

    extra = {ROW: features.index.to_numpy(), LABEL: labels.to_numpy(), HASH: u}
    table = pa.Table.from_pandas(features.assign(**extra), preserve_index=False)
    feather.write_feather(table, block["path"], compression=block["compression"])


def drop_clean(block: dict) -> None:
    """A block's scratch file, deleted once its rows are written: the scratch space (the
    whole table's cleaned rows after the profile pass) shrinks as the outputs grow."""
    Path(block["path"]).unlink(missing_ok=True)


def read_clean(block: dict):
    """(features indexed by the table's row numbers, labels, hashes) as `keep_clean` left
    them; the block's first row is known once every block before it is counted."""
    import pyarrow.feather as feather

    frame = feather.read_table(block["path"], memory_map=True).to_pandas()
    index = frame.pop(ROW).to_numpy() + block["first_row"]
    labels, u = frame.pop(LABEL), frame.pop(HASH).to_numpy()
    return frame.set_axis(index), labels.set_axis(index), u
