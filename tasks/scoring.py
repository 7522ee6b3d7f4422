"""Batch scoring: a table of new rows through a registered model, out of core on Dask.

The source is cut into blocks exactly as ingest cuts it (CSV byte ranges, compressed
streams, Parquet row groups); each Dask task scores one block with the model's own
`Predictor` (the bundle the registered pyfunc wraps: encoder, reduction, network) and writes
a Parquet part: an id column passed through (or the row number), the predicted class and
one probability column per class. The parts are joined, in row order, into one Parquet file
written atomically. Before any scoring, the source's columns are checked against the
model's data contract (a missing column, text where the model was trained on numbers:
refused, naming the column); rows with a value that is not a number in a numeric column
follow `data.on_bad_rows`. Each task also counts its rows on the contract's bins, so drift
against the training data comes out of the same pass.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from conf.schema import DataConfig
from tasks.cluster import checked, data_task
from tasks.errors import ConfigError, DataError
from tasks.monitor import check_columns, count_bins, layout, merge_counts, scored_drift
from tasks.readers import detect_format, filesystem
from tasks.tables.blocks import (
    TASK_MEMORY_PER_BLOCK,
    block_size,
    read_block,
    scan,
    worker_memory_limit,
)
from tasks.tables.schema import to_numbers
from tasks.tables.writing import join_csv_parts

SCORED_FORMATS = ("csv", "parquet")
# Measured here: a worker that has imported torch and loaded the bundle holds ~360 MiB
# before its first block (pandas, Arrow and Dask alone: ~200 MiB).
SCORING_AT_REST = 400 * 2**20


@data_task
def score_block(
    block: dict,
    bundle: str,
    parts: str,
    id_column: str | None,
    on_bad_rows: str,
    contract: dict[str, Any],
) -> dict[str, Any]:
    """One block: bad rows out (or an error), the rest scored into a Parquet part; its
    rows on the contract's bins and its predicted classes counted."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from tasks.served.predictor import Predictor

    torch.set_num_threads(1)  # one task per worker thread: the cluster is the parallelism
    frame = read_block(block)
    predictor = Predictor(bundle)
    first = block["first_row"]
    bad = np.zeros(len(frame), dtype=bool)
    reasons: dict[int, str] = {}
    for column in predictor.encoder.numeric if predictor.encoder else []:
        if column not in frame.columns:
            continue  # the contract check names it before any task runs
        values = frame[column]
        parsed = to_numbers(values)
        wrong = (values.notna() & parsed.isna()).to_numpy() | np.isinf(parsed.to_numpy())
        for i in np.flatnonzero(wrong & ~bad)[:1]:  # the first per column is enough to name
            reasons.setdefault(
                first + int(i), f"column '{column}': {values.iloc[i]!r} is not a number"
            )
        bad |= wrong
    if bad.any() and on_bad_rows == "error":
        row, reason = min(reasons.items())
        raise DataError(
            f"{block['where']}: {int(bad.sum())} row(s) cannot be scored, first at row {row}: "
            f"{reason}. Fix them, or set data.on_bad_rows to drop or quarantine"
        )
    good = frame[~bad]
    X = predictor.encode(good)
    proba = predictor.predict_proba(X) if len(good) else np.zeros((0, len(predictor.classes)))
    codes = proba.argmax(1)
    ids = (
        good[id_column].to_numpy() if id_column else (first + np.flatnonzero(~bad)).astype(np.int64)
    )
    columns = {
        id_column or "row": pa.array(ids),
        "prediction": pa.array(np.asarray([str(c) for c in predictor.classes])[codes]),
        **{
            f"proba_{c}": pa.array(proba[:, i].astype(np.float32))
            for i, c in enumerate(predictor.classes)
        },
    }
    part = f"{parts}/part-{first:015d}.parquet"
    pq.write_table(pa.table(columns), part)
    rejected = None
    if bad.any() and on_bad_rows == "quarantine":
        rejected = f"{parts}/rejected-{first:015d}.csv"
        frame[bad].assign(_row=first + np.flatnonzero(bad)).to_csv(rejected, index=False)
    encoder = predictor.encoder
    counts = (  # on the raw numbers: a mapped column's scores stop at its training range
        count_bins(
            [encoder.transform(good, quantile_map=False) if encoder.quantiles else X],
            contract,
            layout(encoder),
            encoder,
            mapped=False,
        )
        if encoder and contract.get("columns")
        else {}
    )
    return {
        "part": part,
        "rows": int(len(good)),
        "bad": int(bad.sum()),
        "rejected": rejected,
        "counts": counts,
        "predicted": np.bincount(codes, minlength=len(predictor.classes)),
    }


def score_source(
    cfg: DataConfig,
    bundle: str,
    contract: dict[str, Any],
    out: Path,
    client,
    id_column: str | None = None,
    max_psi: float = 0.2,
) -> dict[str, Any]:
    """Score `cfg.source` with the model in `bundle` into the Parquet file `out` (written
    atomically); returns rows, bad rows, seconds and drift against the training data."""
    import pyarrow.parquet as pq

    start = time.perf_counter()
    fmt = detect_format(cfg.source, cfg.format)
    fs, path = filesystem(cfg.source)
    if not fs.exists(path):
        raise DataError(f"{cfg.source}: the file to score does not exist")
    if fmt not in SCORED_FORMATS:
        raise DataError(f"{cfg.source}: batch scoring reads tables (CSV or Parquet), not {fmt}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work:
        scratch, parts = Path(work) / "scratch", Path(work) / "parts"
        scratch.mkdir(), parts.mkdir()
        limit = worker_memory_limit(client)
        if limit and 0.6 * limit < SCORING_AT_REST + TASK_MEMORY_PER_BLOCK * 2**20:
            raise ConfigError(
                f"dask.memory_limit ({limit / 2**20:.0f} MiB per worker) leaves no room to score: "
                f"each worker loads torch and the model (~{SCORING_AT_REST // 2**20} MiB) before its "
                "first block; set dask.memory_limit to 1GiB or more"
            )
        blocks = scan(
            cfg, fmt, str(scratch), client, block_size(cfg.block_mb, client, SCORING_AT_REST)
        )
        names = blocks[0]["names"]
        if id_column and id_column not in names:
            raise DataError(
                f"{cfg.source}: id column '{id_column}' not found; columns are {names[:20]}"
            )
        present, numbers = {n: 0 for n in names}, {n: 0 for n in names}
        for block in blocks:
            for name, stats in block["columns"].items():
                present[name] += stats["present"]
                numbers[name] += stats["numbers"]
        numeric = {n for n in names if numbers[n] >= 0.95 * present[n]}
        if problems := check_columns(contract, names, numeric, cfg.source):
            raise DataError("; ".join(problems) + ". The source breaks the model's data contract")
        futures = [
            client.submit(
                score_block, b, bundle, str(parts), id_column, cfg.on_bad_rows, contract, pure=False
            )
            for b in blocks
        ]
        done = [checked(r) for r in client.gather(futures)]
        schema = pq.read_schema(done[0]["part"])
        tmp = Path(work) / out.name
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for result in done:  # in row order: blocks come back in source order
                writer.write_table(pq.read_table(result["part"]))
        rejected = [r["rejected"] for r in done if r["rejected"]]
        if rejected:
            join_csv_parts(rejected, out.with_suffix(".rejected.csv"))
        os.replace(tmp, out)
    predicted = np.sum([r["predicted"] for r in done], axis=0)
    drift = (
        scored_drift(contract, merge_counts([r["counts"] for r in done]), predicted, max_psi)
        if contract.get("columns")
        else None
    )
    return {
        "rows": sum(r["rows"] for r in done),
        "bad_rows": sum(r["bad"] for r in done),
        "blocks": len(blocks),
        "seconds": time.perf_counter() - start,
        "out": str(out),
        "quarantine": str(out.with_suffix(".rejected.csv")) if rejected else None,
        "drift": drift,
    }
