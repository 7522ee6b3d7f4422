"""Tables (CSV, Parquet) ingested out of core: Dask tasks stream blocks of rows, and no
process ever holds the whole table.

Three passes over blocks of about `data.block_mb` each:
1. **scan**: parse each block once (CSV: a byte range, or chunks of a compressed stream;
   Parquet: batches of a row group), keep it as a scratch Arrow file and count, per column,
   the values present and the values that are numbers. The driver then types every column
   for the whole table (`decide_schema`), so all blocks are cleaned alike.
2. **profile**: clean each block, hash each good row to its split and sum what the checks
   and the encoder need: rows per split, label counts, category counts and a hash-ranked
   sample of the training rows' numbers (their median fills missing values).
3. **write**: encode each block and write its rows into the split arrays at the offsets
   the profile pass fixed.

Every decision depends on row contents only, never on block boundaries: changing
`data.block_mb` or re-partitioning the source changes nothing in the output. Limits: a
quoted CSV field may not contain a line break (byte ranges split at line ends), and a
compressed CSV is read by one task as a stream (still in bounded memory).
"""

from __future__ import annotations

import heapq
import io
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conf.schema import DataConfig
from tasks.cluster import checked, data_task
from tasks.encoding import MISSING, Encoder, as_text, fit_encoder
from tasks.readers import CSV_COMPRESSION, DataError, csv_header, filesystem, open_text_stream
from tasks.splitting import assign_splits, row_uniforms
from tasks.stage import StageDir

NUMERIC_SHARE = 0.95  # a column whose values are at least this share numbers is numeric
FILL_SAMPLE_ROWS = 20_000  # hash-ranked training rows whose median fills missing numbers
FILL_SAMPLE_VALUES = 2_000_000  # ... fewer rows for very wide tables: bounded task results
EXAMPLE_ROWS = 5
# Measured on this stack: a task holds about 10x its block while it works (pandas frame,
# typed copies, hashes, encoded rows), on top of a worker's ~200 MiB at rest.
TASK_MEMORY_PER_BLOCK = 10
WORKER_AT_REST = 200 * 2**20
SPLITS = ("train", "val", "test")


@dataclass
class Schema:
    """The column types decided for the whole table; every block is cleaned with them."""

    label: str
    columns: list[str]  # feature columns, file order
    numeric: list[str]
    categorical: list[str]
    label_kind: str  # "int", "float" or "text"
    integers: list[str] = field(
        default_factory=list
    )  # numeric columns stored as integers everywhere
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- pass 1: scan


def profile_raw(frame) -> dict[str, Any]:
    """Per column: values present, values that are numbers, and whether the block's parser
    typed it as numbers. What `decide_schema` needs, summed over blocks."""
    import pandas as pd

    present = frame.notna().sum()
    columns = {}
    for name in frame.columns:
        values = frame[name]
        typed = bool(pd.api.types.is_numeric_dtype(values))
        numbers = int(present[name]) if typed else int(to_numbers(values).notna().sum())
        fractional = (
            typed and pd.api.types.is_float_dtype(values) and bool((values.dropna() % 1 != 0).any())
        )
        columns[name] = {
            "present": int(present[name]),
            "numbers": numbers,
            "typed": typed,
            "fractional": fractional,
            "integer": bool(pd.api.types.is_integer_dtype(values)),
        }
    return {"rows": len(frame), "names": [str(c) for c in frame.columns], "columns": columns}


def to_numbers(values):
    """Text → float64 (NaN where a value is not a number), parsing each distinct value once:
    text columns repeat their values, and parsing is what costs."""
    import pandas as pd

    if pd.api.types.is_numeric_dtype(values):
        return values.astype(np.float64)
    codes, uniques = pd.factorize(values)
    parsed = pd.to_numeric(pd.Series(np.asarray(uniques, dtype=object)), errors="coerce").to_numpy(
        dtype=np.float64
    )
    return pd.Series(np.where(codes >= 0, parsed[codes], np.nan), index=values.index)


def _keep(frame, scratch: str, name: str, where: str) -> dict[str, Any]:
    """Save a parsed block as an Arrow file (fast to re-read) and profile it."""
    import pyarrow as pa
    import pyarrow.feather as feather

    frame.columns = [str(c) for c in frame.columns]
    for column in frame.columns:  # Parquet dictionary columns arrive as pandas categoricals
        if frame[column].dtype == "category":
            frame[column] = frame[column].astype(object)
    block = {**profile_raw(frame), "where": where, "path": None}
    if len(frame):
        path = f"{scratch}/{name}.arrow"
        feather.write_feather(
            pa.Table.from_pandas(frame, preserve_index=False), path, compression="lz4"
        )
        block["path"] = path
    return block


@data_task
def scan_csv_range(
    source: str, offset: int, length: int, header: list[str], scratch: str
) -> list[dict]:
    """One byte range of an uncompressed CSV, cut at line ends (fsspec's read_block)."""
    import pandas as pd
    from fsspec.utils import read_block

    fs, path = filesystem(source)
    with fs.open(path, "rb") as fh:
        data = read_block(fh, offset, length, delimiter=b"\n")
    if offset == 0:  # the header line
        data = data.split(b"\n", 1)[1] if b"\n" in data else b""
    where = f"{path} (bytes {offset}-{offset + len(data)})"
    try:
        frame = (
            pd.read_csv(
                io.BytesIO(data), header=None, names=header, index_col=False, low_memory=False
            )
            if data.strip()
            else pd.DataFrame(columns=header)
        )
    except Exception as exc:  # pandas raises several types for malformed text
        raise DataError(
            f"{where}: cannot parse as CSV ({type(exc).__name__}: {str(exc).strip()}; lines are "
            "counted from the start of this byte range). Fix that line, or quote fields that "
            "hold the delimiter"
        ) from None
    del data
    return [_keep(frame, scratch, f"csv-{offset:015d}", where)]


@data_task
def scan_csv_stream(source: str, rows_per_block: int, scratch: str) -> list[dict]:
    """A compressed CSV cannot be cut by bytes: one task streams it in blocks of rows."""
    import pandas as pd

    fs, path = filesystem(source)
    blocks = []
    try:
        with open_text_stream(fs, path) as fh:
            reader = pd.read_csv(fh, chunksize=rows_per_block, index_col=False, low_memory=False)
            for i, frame in enumerate(reader):
                blocks.append(
                    _keep(
                        frame,
                        scratch,
                        f"stream-{i:06d}",
                        f"{path} (rows from {i * rows_per_block})",
                    )
                )
    except DataError:
        raise
    except Exception as exc:  # truncated streams, bad compression, malformed text
        raise DataError(
            f"{path}: cannot read as CSV ({type(exc).__name__}: {exc}); is it complete?"
        ) from None
    return blocks or [
        _keep(pd.DataFrame(columns=csv_header(fs, path)), scratch, "stream-empty", path)
    ]


@data_task
def scan_parquet(
    source: str, path: str, row_group: int, rows_per_block: int, scratch: str, name: str
) -> list[dict]:
    import pyarrow.parquet as pq

    fs, _ = filesystem(source)
    blocks = []
    try:
        with fs.open(path, "rb") as fh:
            batches = pq.ParquetFile(fh).iter_batches(
                batch_size=rows_per_block, row_groups=[row_group]
            )
            for i, batch in enumerate(batches):
                blocks.append(
                    _keep(
                        batch.to_pandas(),
                        scratch,
                        f"{name}-{i:05d}",
                        f"{path} (row group {row_group})",
                    )
                )
    except Exception as exc:
        raise DataError(f"{path}: cannot read as parquet ({type(exc).__name__}: {exc})") from None
    return blocks


def scan(cfg: DataConfig, fmt: str, scratch: str, client, block_bytes: int) -> list[dict]:
    """Pass 1 on the cluster; returns the non-empty blocks in source order (and one empty
    block for an empty source, so its columns are still known)."""
    import pyarrow.parquet as pq

    fs, path = filesystem(cfg.source)
    if fmt == "csv" and Path(path).suffix not in CSV_COMPRESSION:
        header = csv_header(fs, path)
        size = fs.size(path)
        futures = [
            client.submit(
                scan_csv_range, cfg.source, offset, block_bytes, header, scratch, pure=False
            )
            for offset in range(0, max(size, 1), block_bytes)
        ]
    elif fmt == "csv":
        futures = [
            client.submit(
                scan_csv_stream,
                cfg.source,
                _rows_per_block(fs, path, block_bytes),
                scratch,
                pure=False,
            )
        ]
    else:
        files = (
            sorted(p for p in fs.find(path) if p.endswith(".parquet")) if fs.isdir(path) else [path]
        )
        futures = []
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
                futures.append(
                    client.submit(
                        scan_parquet,
                        cfg.source,
                        file,
                        group,
                        max(1, int(block_bytes / row_bytes)),
                        scratch,
                        f"pq-{number:05d}-{group:05d}",
                        pure=False,
                    )
                )
        if not futures:
            raise DataError(f"{path}: no .parquet files, or only empty ones")
    blocks = [block for result in client.gather(futures) for block in checked(result)]
    blocks = [b for b in blocks if b["rows"]] or blocks[:1]
    first_row = 0
    for block in blocks:  # rows are numbered across the whole table, as the user counts them
        block["first_row"], first_row = first_row, first_row + block["rows"]
    return blocks


def block_size(block_mb: float, client) -> int:
    """`data.block_mb`, made smaller where the workers' memory limit calls for it: a task
    should stay under 60% of the limit (Dask pauses a worker at 80%)."""
    limits = [w.get("memory_limit") or 0 for w in client.scheduler_info()["workers"].values()]
    wanted = int(block_mb * 2**20)
    if not limits or min(limits) == 0:  # no limit set
        return wanted
    fits = int((0.6 * min(limits) - WORKER_AT_REST) / TASK_MEMORY_PER_BLOCK)
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


def decide_schema(blocks: list[dict], cfg: DataConfig) -> Schema:
    """Type each column from the counts of all blocks, with the rules of a careful reader:
    a declared type wins; a column that is at least 95% numbers is numeric (the rest of its
    values are bad rows); anything else is categorical."""
    where = cfg.source
    names = blocks[0]["names"]
    for block in blocks[1:]:
        if block["names"] != names:
            raise DataError(
                f"{block['where']}: columns {block['names'][:20]} differ from the first part's "
                f"{names[:20]}; every file of a table needs the same columns"
            )
    if cfg.label not in names:
        raise DataError(
            f"{where}: label column '{cfg.label}' not found; columns are {names[:20]}. "
            "Set data.label to the right column."
        )
    totals = {name: Counter() for name in names}
    typed = {name: True for name in names}
    integer = {name: True for name in names}
    for block in blocks:
        for name, stats in block["columns"].items():
            totals[name].update({k: int(stats[k]) for k in ("present", "numbers", "fractional")})
            typed[name] &= stats["typed"] or stats["present"] == 0
            integer[name] &= stats["integer"]
    features = [n for n in names if n != cfg.label]
    declared = cfg.columns or {}
    warnings = []
    if declared:
        unknown = [c for c in declared if c not in features]
        if unknown:
            raise DataError(
                f"{where}: declared column(s) {unknown[:10]} (data.columns) are not in the file; "
                f"its columns are {features[:20]}"
            )
        ignored = [c for c in features if c not in declared]
        if ignored:
            warnings.append(
                f"{len(ignored)} column(s) not declared in data.columns are ignored: {ignored[:10]}"
            )
        features = list(declared)
    if not features:
        raise DataError(f"{where}: no feature columns besides the label '{cfg.label}'")
    if sum(b["rows"] for b in blocks) == 0:
        raise DataError(f"{where}: the dataset is empty (0 rows)")
    numeric, categorical = [], []
    for name in features:
        t = totals[name]
        if t["present"] == 0:
            raise DataError(
                f"{where}: column '{name}' has no values (all missing); drop it or fill it"
            )
        kind = declared.get(name)
        if kind == "categorical":  # declared: e.g. zip codes, which look numeric
            categorical.append(name)
        elif kind == "numeric" or typed[name] or t["numbers"] >= NUMERIC_SHARE * t["present"]:
            numeric.append(name)
        else:
            categorical.append(name)
    label = totals[cfg.label]
    label_kind = "text" if not typed[cfg.label] else ("float" if label["fractional"] else "int")
    if label["present"] == 0:
        raise DataError(f"{where}: label column '{cfg.label}' has no values")
    integers = [n for n in numeric if integer[n]]
    return Schema(cfg.label, features, numeric, categorical, label_kind, integers, warnings)


# ---------------------------------------------------------------- cleaning and splitting one block


def read_block(block: dict):
    import pyarrow.feather as feather

    return feather.read_table(block["path"], memory_map=True).to_pandas()


def clean_block(frame, schema: Schema, first_row: int = 0):
    """Raw block → (typed features, labels, bad, reasons): numeric columns as float64,
    categorical ones as text; `bad` marks the rows to leave out and `reasons` says why, by
    the table's row number (counted from 0 after the header; the first reason found)."""
    import pandas as pd

    bad = np.zeros(len(frame), dtype=bool)
    reasons: dict[int, str] = {}

    def flag(mask, reason):
        fresh = np.flatnonzero(np.asarray(mask) & ~bad)
        bad[fresh] = True
        reasons.update({first_row + int(i): reason(int(i)) for i in fresh})

    raw_label = frame[schema.label]
    flag(raw_label.isna(), lambda i: "label missing")
    if schema.label_kind == "text":
        labels = as_text(raw_label)
    else:
        labels = to_numbers(raw_label)
        flag(
            raw_label.notna() & labels.isna(),
            lambda i: f"label {raw_label.iloc[i]!r} is not a number",
        )
        if schema.label_kind == "int":
            labels = labels.fillna(0).astype(np.int64)
    features = {}
    for name in schema.columns:
        values = frame[name]
        if name in schema.categorical:
            features[name] = as_text(values)
            continue
        parsed = to_numbers(values)
        flag(
            values.notna() & parsed.isna(),
            lambda i, v=values, c=name: f"column '{c}': {v.iloc[i]!r} is not a number",
        )
        flag(np.isinf(parsed.to_numpy()), lambda i, c=name: f"column '{c}': infinite value")
        features[name] = parsed
    index = pd.RangeIndex(first_row, first_row + len(frame))
    features = pd.DataFrame(features).set_axis(index)
    return features, labels.set_axis(index), bad, reasons


def _good_rows(frame, schema: Schema, cfg: DataConfig, first_row: int):
    features, labels, bad, reasons = clean_block(frame, schema, first_row)
    if bad.any():  # a copy only when there is something to leave out
        features, labels = features[~bad], labels[~bad]
    u = row_uniforms(features, cfg.seed)
    return features, labels, bad, reasons, u, assign_splits(u, cfg.val_fraction, cfg.test_fraction)


# ---------------------------------------------------------------- pass 2: profile


@data_task
def profile_block(block: dict, schema: Schema, cfg: DataConfig, quarantine: str | None) -> dict:
    """Everything the driver needs from one block, in a result of bounded size."""
    frame = read_block(block)
    features, labels, bad, reasons, u, split = _good_rows(frame, schema, cfg, block["first_row"])
    result: dict[str, Any] = {
        "rows": [int((split == s).sum()) for s in range(3)],
        "bad": int(bad.sum()),
        "first_bad": None,
        "quarantine": None,
    }
    if reasons:
        first = min(reasons)
        result["first_bad"] = (first, reasons[first])
        if quarantine:
            rejected = frame[bad]
            rejected.insert(0, "_row", sorted(reasons))
            rejected.assign(_reason=[reasons[row] for row in sorted(reasons)]).to_csv(
                quarantine, index=False
            )
            result["quarantine"] = quarantine
    del frame
    missing = features.isna().to_numpy()
    result["missing"] = int(missing.sum())
    if result["missing"]:
        rows, cols = np.nonzero(missing)
        result["first_missing"] = (int(features.index[rows[0]]), features.columns[cols[0]])
    del missing
    result["labels"] = [dict(labels[split == s].value_counts()) for s in range(3)]
    train = np.flatnonzero(split == 0)
    result["categories"] = {
        c: dict(features[c].iloc[train].fillna(MISSING).value_counts()) for c in schema.categorical
    }
    # bottom-k by hash: merging blocks' bottom-k gives the table's bottom-k, whatever the blocks
    k = min(FILL_SAMPLE_ROWS, max(100, FILL_SAMPLE_VALUES // max(len(schema.numeric), 1)))
    sample = train[np.argsort(u[train], kind="stable")[:k]]
    result["fill_sample"] = (u[sample], features[schema.numeric].iloc[sample].to_numpy())
    result["distinct"] = {c: _two_values(features[c]) for c in schema.columns}
    example = {}
    for s in (0, 2):
        rows = np.flatnonzero(split == s)
        pick = rows[np.argsort(u[rows], kind="stable")[:EXAMPLE_ROWS]]
        example[s] = (u[pick].tolist(), features.iloc[pick].to_dict("records"))
    result["example"] = example
    if cfg.max_rows:
        result["lowest_u"] = [np.sort(u[split == s])[: cfg.max_rows] for s in range(3)]
    return result


def _two_values(values) -> list:
    """Up to two distinct values (enough to tell a constant column), without hashing them all."""
    present = values.dropna()
    if present.empty:
        return []
    first = present.iloc[0]
    other = present[present != first]
    return [first, *other.iloc[:1].tolist()]


@dataclass
class Plan:
    """What the driver fixed after the profile pass, for the write pass."""

    classes: list[Any]
    encoder: Encoder
    counts: list[list[int]]  # per block, rows per split (after max_rows)
    cutoffs: list[float]  # per split: rows with a hash at or below it are kept (max_rows)
    rejected: int
    missing: int
    quarantine: list[str]
    example: list[dict]
    warnings: list[str]


def plan(blocks: list[dict], schema: Schema, cfg: DataConfig, scratch: str | None, client) -> Plan:
    """Pass 2 on the cluster; results are merged as they arrive, so the driver holds a few
    at a time."""
    from dask.distributed import as_completed

    futures = {
        client.submit(
            profile_block,
            b,
            schema,
            cfg,
            f"{scratch}/quarantine-{i:06d}.csv" if scratch else None,
            pure=False,
        ): i
        for i, b in enumerate(blocks)
    }
    per_block: dict[int, dict] = {}
    labels = [Counter() for _ in SPLITS]
    categories = {c: Counter() for c in schema.categorical}
    distinct = {c: set() for c in schema.columns}
    fill_u, fill_x = np.empty(0), np.empty((0, len(schema.numeric)))
    examples: dict[int, list] = {0: [], 2: []}
    lowest = [np.empty(0) for _ in SPLITS]
    bad, missing = [], []
    for future in as_completed(futures):
        i, r = futures[future], checked(future.result())
        future.release()
        per_block[i] = {
            "rows": r["rows"],
            "quarantine": r["quarantine"],
            "bad": r["bad"],
            "missing": r["missing"],
            "lowest_u": r.get("lowest_u"),
        }
        if r["first_bad"]:
            bad.append(r["first_bad"])
        if r["missing"]:
            missing.append(r["first_missing"])
        for total, counts in zip(labels, r["labels"], strict=True):
            total.update(counts)
        for c in schema.categorical:
            categories[c].update(r["categories"][c])
        for c in schema.columns:
            if len(distinct[c]) < 2:
                distinct[c].update(r["distinct"][c])
        u, x = r["fill_sample"]
        fill_u, fill_x = np.concatenate([fill_u, u]), np.concatenate([fill_x, x])
        keep = np.argsort(fill_u, kind="stable")[:FILL_SAMPLE_ROWS]
        fill_u, fill_x = fill_u[keep], fill_x[keep]
        for s in examples:
            examples[s] = heapq.nsmallest(
                EXAMPLE_ROWS,
                examples[s] + list(zip(*r["example"][s], strict=True)),
                key=lambda pair: pair[0],
            )
        if cfg.max_rows:
            lowest = [
                np.sort(np.concatenate([a, b]))[: cfg.max_rows]
                for a, b in zip(lowest, r["lowest_u"], strict=True)
            ]

    where = cfg.source
    rejected = sum(b["bad"] for b in per_block.values())
    if bad and cfg.on_bad_rows == "error":
        row, reason = min(bad)
        raise DataError(
            f"{where}: {rejected} bad row(s), first at row {row}: {reason}. Fix the data, "
            "or set data.on_bad_rows to drop or quarantine to continue without them"
        )
    if missing and cfg.missing == "error":
        row, column = min(missing)
        raise DataError(
            f"{where}: {sum(b['missing'] for b in per_block.values())} missing value(s), first in "
            f"column '{column}' at row {row}; fill or drop them first, or set data.missing: fill"
        )
    warnings = [*schema.warnings]
    warnings += [
        f"column '{c}' is constant ({next(iter(v))!r}): it carries no signal"
        for c, v in distinct.items()
        if len(v) == 1
    ]
    all_labels = labels[0] + labels[1] + labels[2]
    if len(all_labels) < 2:
        raise DataError(
            f"{where}: the label has a single class ({next(iter(all_labels), None)!r}); nothing to learn"
        )
    classes = sorted(labels[0])
    for s, name in ((1, "val"), (2, "test")):
        unseen = set(labels[s]) - set(classes)
        if unseen:
            raise DataError(
                f"{where}: the {name} split has label(s) {sorted(unseen)[:5]} never seen in training; "
                "rare classes need more rows"
            )
    fills = {}
    for j, c in enumerate(schema.numeric):
        values = fill_x[:, j][~np.isnan(fill_x[:, j])]
        fills[c] = float(np.median(values)) if len(values) else 0.0
    encoder = fit_encoder(
        fills, {c: dict(categories[c]) for c in schema.categorical}, cfg.max_onehot
    )
    cutoffs = [
        float(low[-1]) if cfg.max_rows and len(low) >= cfg.max_rows else 1.0 for low in lowest
    ]
    counts = []
    for i in range(len(blocks)):
        b = per_block[i]
        if cfg.max_rows:
            counts.append([int((b["lowest_u"][s] <= cutoffs[s]).sum()) for s in range(3)])
        else:
            counts.append(b["rows"])
    example = [row for _, row in examples[2] or examples[0]]
    return Plan(
        classes,
        encoder,
        counts,
        cutoffs,
        rejected,
        sum(b["missing"] for b in per_block.values()),
        [per_block[i]["quarantine"] for i in sorted(per_block) if per_block[i]["quarantine"]],
        example,
        warnings,
    )


# ---------------------------------------------------------------- pass 3: write


@data_task
def write_block(
    block: dict,
    schema: Schema,
    cfg: DataConfig,
    encoder_path: str,
    classes: list[Any],
    cutoffs: list[float],
    counts: list[int],
    offsets: list[int],
    targets: dict[str, tuple[str, str]],
) -> list[int]:
    """Encode one block and write its rows of each split into that split's arrays."""
    features, labels, _, _, u, split = _good_rows(
        read_block(block), schema, cfg, block["first_row"]
    )
    encoder = Encoder.load(encoder_path)
    lookup = {c: i for i, c in enumerate(classes)}
    written = []
    for s, name in enumerate(SPLITS):
        rows = np.flatnonzero((split == s) & (u <= cutoffs[s]))
        if (
            len(rows) > counts[s]
        ):  # duplicate rows tied at a max_rows cutoff: keep as many as counted
            rows = np.sort(rows[np.argsort(u[rows], kind="stable")[: counts[s]]])
        if len(rows):
            X_path, y_path = targets[name]
            X = np.load(X_path, mmap_mode="r+")
            y = np.load(y_path, mmap_mode="r+")
            X[offsets[s] : offsets[s] + len(rows)] = encoder.transform(features.iloc[rows])
            y[offsets[s] : offsets[s] + len(rows)] = (
                labels.iloc[rows].map(lookup).to_numpy(dtype=np.int64)
            )
            X.flush(), y.flush()
            del X, y
        written.append(len(rows))
    return written


# ---------------------------------------------------------------- the whole table


def survey(cfg: DataConfig, fmt: str, scratch: str, client, keep_rejected: bool = False):
    """Passes 1 and 2: every check ingest makes, and the plan for writing. `accelflow
    validate` stops here. Returns (blocks, schema, plan, block bytes, start times)."""
    import time

    seconds = {"scan": time.perf_counter()}
    block_bytes = block_size(cfg.block_mb, client)
    blocks = scan(cfg, fmt, scratch, client, block_bytes)
    schema = decide_schema(blocks, cfg)
    seconds["profile"] = time.perf_counter()
    fixed = plan(blocks, schema, cfg, scratch if keep_rejected else None, client)
    return blocks, schema, fixed, block_bytes, seconds


def ingest_table(cfg: DataConfig, fmt: str, out: StageDir, client) -> dict[str, Any]:
    """Scan, profile, write; returns what the ingest manifest needs."""
    import time

    import pandas as pd

    scratch = out.path("scratch")
    scratch.mkdir()
    blocks, schema, p, block_bytes, seconds = survey(
        cfg, fmt, str(scratch), client, cfg.on_bad_rows == "quarantine"
    )
    seconds["write"] = time.perf_counter()
    p.encoder.save(out.path("encoder.json"))
    sizes = np.array(p.counts, dtype=np.int64).reshape(len(blocks), 3)
    for s, name in enumerate(SPLITS):
        if not sizes[:, s].sum() and (name == "train" or getattr(cfg, f"{name}_fraction") > 0):
            raise DataError(
                f"{cfg.source}: the {name} split is empty; use more rows or a larger "
                f"data.{name}_fraction"
            )

    offsets = np.vstack([np.zeros(3, dtype=np.int64), np.cumsum(sizes, axis=0)[:-1]])
    width = len(p.encoder.feature_names)
    targets = {}
    for s, name in enumerate(SPLITS):
        X_path, y_path = out.path(f"{name}_X.npy"), out.path(f"{name}_y.npy")
        # sized once here; each task writes its own rows into these files
        np.lib.format.open_memmap(
            X_path, mode="w+", dtype=np.float32, shape=(int(sizes[:, s].sum()), width)
        )
        np.lib.format.open_memmap(
            y_path, mode="w+", dtype=np.int64, shape=(int(sizes[:, s].sum()),)
        )
        targets[name] = (str(X_path), str(y_path))
    written = [
        checked(r)
        for r in client.gather(
            [
                client.submit(
                    write_block,
                    b,
                    schema,
                    cfg,
                    str(out.path("encoder.json")),
                    p.classes,
                    p.cutoffs,
                    p.counts[i],
                    offsets[i].tolist(),
                    targets,
                    pure=False,
                )
                for i, b in enumerate(blocks)
            ]
        )
    ]
    if np.asarray(written).tolist() != sizes.tolist():  # the two passes must agree row for row
        raise RuntimeError(
            f"ingest wrote {written} rows per block and split, the profile pass counted {sizes}"
        )

    if p.quarantine:  # one CSV: the first part's header, every part's rows
        with open(out.path("quarantine.csv"), "wb") as sink:
            for i, part in enumerate(p.quarantine):
                with open(part, "rb") as src:
                    if i:
                        src.readline()
                    shutil.copyfileobj(src, sink)
    # the served model's input example and signature: integer columns stay integers
    example = pd.DataFrame(p.example, columns=schema.columns)
    example = example.astype({c: "int64" for c in schema.integers if example[c].notna().all()})
    example.to_parquet(out.path("raw_example.parquet"))
    shutil.rmtree(scratch)
    seconds["end"] = time.perf_counter()
    marks = list(seconds.values())
    return {
        "seconds": {
            name: round(end - start, 3)
            for name, start, end in zip(seconds, marks, marks[1:], strict=False)
        },
        "block_mb": round(block_bytes / 2**20, 1),
        "classes": p.classes,
        "feature_names": p.encoder.feature_names,
        "raw_columns": schema.columns,
        "numeric": schema.numeric,
        "categorical": schema.categorical,
        "rejected": p.rejected,
        "quarantined": bool(p.quarantine),
        "missing_values": p.missing,
        "warnings": p.warnings,
        "blocks": len(blocks),
    }
