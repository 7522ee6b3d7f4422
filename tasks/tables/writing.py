"""Pass 2 (write): each block encoded and written into the split arrays at the offsets
the plan fixed; and the whole table, both passes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from conf.schema import DataConfig
from tasks.cluster import checked, data_task
from tasks.encoding import Encoder
from tasks.errors import DataError
from tasks.monitor import count_rows, merge_counts, numeric_specs
from tasks.readers import npy_put
from tasks.splitting import assign_splits
from tasks.store import StageDir
from tasks.tables.blocks import block_size, drop_clean, read_clean
from tasks.tables.profiling import SPLITS, plan, scan_and_profile


@data_task
def write_block(
    block: dict,
    cfg: DataConfig,
    encoder_path: str,
    classes: list[Any],
    cutoffs: list[float],
    counts: list[int],
    offsets: list[int],
    targets: dict[str, tuple[str, str]],
    test_rows: str,
    contract_columns: dict[str, dict[str, Any]],
) -> tuple[list[int], dict[str, dict[str, Any]]]:
    """Encode one block and write its rows of each split into that split's arrays, and its
    test rows, cleaned but not encoded, as a Parquet part in `test_rows`. Returns the rows
    written per split and its training rows' counts on the data contract's bins."""
    features, labels, u = read_clean(block)
    split = assign_splits(u, cfg.val_fraction, cfg.test_fraction)
    encoder = Encoder.load(encoder_path)
    lookup = {c: i for i, c in enumerate(classes)}
    picked = []
    for s in range(len(SPLITS)):
        rows = np.flatnonzero((split == s) & (u <= cutoffs[s]))
        if (
            len(rows) > counts[s]
        ):  # duplicate rows tied at a max_rows cutoff: keep as many as counted
            rows = np.sort(rows[np.argsort(u[rows], kind="stable")[: counts[s]]])
        picked.append(rows)
    # the block encoded in one call, then cut by split (a call per split copied the frame
    # for each); only the kept rows when data.max_rows leaves some out
    kept = np.concatenate(picked)
    every = len(kept) == len(u)
    numbers = encoder.numeric_values(features)
    # the training rows' raw numbers, for the data contract's counts (a pass over the
    # written training split took the driver 8 s on a 4 GiB CSV), column by column in
    # memory, as they are counted: in row order, counting them took 4x as long
    train_numbers = np.take(np.asfortranarray(numbers).T, picked[0], axis=1).T
    X_kept = encoder.transform(
        features if every else features.iloc[kept],
        numbers=numbers if every else numbers[kept],
    )
    del numbers  # mapped in place: of no further use
    y_kept = (labels if every else labels.iloc[kept]).map(lookup).to_numpy(dtype=np.int64)
    at = np.cumsum([0, *map(len, picked)])  # each split's rows in X_kept, y_kept
    where = [rows if every else slice(at[s], at[s + 1]) for s, rows in enumerate(picked)]
    written = []
    for s, (name, rows) in enumerate(zip(SPLITS, picked, strict=True)):
        if len(rows):
            X_path, y_path = targets[name]
            npy_put(X_path, offsets[s], X_kept[where[s]])
            npy_put(y_path, offsets[s], y_kept[where[s]])
            if name == "test":  # the test rows as cleaned raw values: what a champion scores
                part = Path(test_rows) / f"part-{offsets[s]:012d}.parquet"
                features.iloc[rows].to_parquet(part)
        written.append(len(rows))
    on_bins = count_rows(encoder, contract_columns, train_numbers, X_kept[where[0]])
    drop_clean(block)  # last: a task Dask starts again (its worker died) finds the block
    return written, on_bins


def join_csv_parts(parts: list[str], dest: Path, first_rows: list[int] | None = None) -> None:
    """CSV parts with the same header into one CSV: the first part's header, every part's
    rows, in order (bad rows set aside by ingest's or batch scoring's tasks). With
    `first_rows`, each part's first column holds row numbers counted from its block's first
    row, and the block's first row in the table is added to them."""
    import csv
    import sys

    if first_rows is None:
        with open(dest, "wb") as sink:
            for i, part in enumerate(parts):
                with open(part, "rb") as src:
                    if i:
                        src.readline()
                    shutil.copyfileobj(src, sink)
        return
    # the csv module reads and writes a quoted field as pandas' to_csv wrote it; a rejected
    # row may hold a field longer than its default limit (128 KiB): lifted while it reads
    limit = csv.field_size_limit(sys.maxsize)
    try:
        with open(dest, "w", newline="") as sink:
            writer = csv.writer(sink, lineterminator="\n")
            for i, (part, first_row) in enumerate(zip(parts, first_rows, strict=True)):
                with open(part, newline="") as src:
                    reader = csv.reader(src)
                    header = next(reader)
                    if not i:
                        writer.writerow(header)
                    writer.writerows([str(int(row[0]) + first_row), *row[1:]] for row in reader)
    finally:
        csv.field_size_limit(limit)


# ---------------------------------------------------------------- the whole table


def survey(cfg: DataConfig, fmt: str, scratch: str, client, keep_rejected: bool = False):
    """Pass 1 (scan and profile): every check ingest makes, and the plan for writing. `accelflow
    validate` stops here. Returns (blocks, schema, plan, block bytes, start times, blocks
    profiled twice)."""
    import time

    seconds = {"scan": time.perf_counter()}  # and profile: one task per block does both
    block_bytes = block_size(cfg.block_mb, client)
    blocks, schema, profile, again = scan_and_profile(
        cfg, fmt, scratch, client, block_bytes, keep_rejected
    )
    seconds["plan"] = time.perf_counter()
    return blocks, schema, plan(schema, cfg, profile), block_bytes, seconds, again


def ingest_table(cfg: DataConfig, fmt: str, out: StageDir, client) -> dict[str, Any]:
    """Scan, profile, write; returns what the ingest manifest needs."""
    import time

    import pandas as pd

    scratch = out.path("scratch")
    scratch.mkdir()
    blocks, schema, p, block_bytes, seconds, again = survey(
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
    out.path("test_rows").mkdir()
    # the contract's numeric bins, fixed from the profile's sample of training rows
    contract_columns = numeric_specs(p.encoder, p.sample)
    results = [
        checked(r)
        for r in client.gather(
            [
                client.submit(
                    write_block,
                    b,
                    cfg,
                    str(out.path("encoder.json")),
                    p.classes,
                    p.cutoffs,
                    p.counts[i],
                    offsets[i].tolist(),
                    targets,
                    str(out.path("test_rows")),
                    contract_columns,
                    pure=False,
                )
                for i, b in enumerate(blocks)
            ]
        )
    ]
    written = [rows for rows, _ in results]
    contract_counts = merge_counts([on_bins for _, on_bins in results])
    if np.asarray(written).tolist() != sizes.tolist():  # the two passes must agree row for row
        raise RuntimeError(
            f"ingest wrote {written} rows per block and split, the profile pass counted {sizes}"
        )

    test_rows = sorted(f"test_rows/{f.name}" for f in out.path("test_rows").glob("*.parquet"))
    if p.quarantine:
        parts, first_rows = zip(*p.quarantine, strict=True)
        join_csv_parts(list(parts), out.path("quarantine.csv"), list(first_rows))
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
        "codes": p.encoder.code_sizes(),
        "quantiled": list(p.encoder.quantiles),  # data.numeric_transform mapped these
        "unscaled": p.encoder.numeric if p.encoder.unscaled else [],
        "raw_columns": schema.columns,
        "numeric": schema.numeric,
        "categorical": schema.categorical,
        "rejected": p.rejected,
        "quarantined": bool(p.quarantine),
        "missing_values": p.missing,
        "warnings": p.warnings,
        "blocks": len(blocks),
        "blocks_read_twice": again,  # their types differed from the table's
        "contract_columns": contract_columns,
        "contract_counts": contract_counts,
        "test_rows": test_rows,  # in row order: the offsets in their names sort as the rows do
    }
