"""ingest: read a source, validate it, split it deterministically, write the split arrays.

Tables (CSV, Parquet) stream through Dask in blocks (`tasks.tables`): typed, cleaned and
encoded out of core. Arrays (IDX, `.npz`) are read whole: they are images that fit.
The split is a seeded hash of each row's content, so it does not depend on row order or on
how the data is partitioned, and duplicate rows always land in the same split (no leakage).
IDX folders that ship a `t10k-*` test set keep it as the test split.

Outputs (`<workdir>/ingest/<key>/`): `<split>_X.npy` (float32 features for tables, the
source dtype for arrays) and `<split>_y.npy` (class codes) per split, and the manifest
with feature names, classes and per-file digests. The input is only ever read.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from conf.schema import DaskConfig, DataConfig, PipelineConfig
from tasks.monitor import build_contract
from tasks.readers import (
    DataError,
    Table,
    detect_format,
    filesystem,
    preflight,
    read_idx_folder,
    read_npz,
    source_fingerprint,
)
from tasks.spec import Hooks, Inputs, StageSpec
from tasks.splitting import array_row_uniforms, assign_splits
from tasks.store import StageDir

SPLITS = ("train", "val", "test")
TABLE_FORMATS = ("csv", "parquet")


def read_source(cfg: DataConfig) -> Table:
    """An array source (IDX folder or .npz), read whole and validated."""
    fmt = preflight(cfg)
    fs, path = filesystem(cfg.source)
    if fmt not in ("idx", "npz"):
        raise ValueError(f"{cfg.source}: read_source reads arrays; tables go through tasks.tables")
    table = read_idx_folder(fs, path) if fmt == "idx" else read_npz(fs, path)
    validate(table, cfg.source)
    return table


# ---------------------------------------------------------------- validation and split


def validate(table: Table, where: str) -> None:
    if len(table.X) == 0:
        raise DataError(f"{where}: the dataset is empty (0 rows)")
    for X, y, part in [
        (table.X, table.y, "data"),
        *([(*table.test, "test set")] if table.test else []),
    ]:
        if X.dtype.kind not in "biuf":
            raise DataError(f"{where}: features must be numeric, got dtype {X.dtype}")
        if X.dtype.kind == "f":
            bad = ~np.isfinite(X)
            if bad.any():
                row, col = map(int, np.argwhere(bad)[0])
                raise DataError(
                    f"{where} ({part}): {int(bad.sum())} missing or infinite value(s), first in column "
                    f"'{table.feature_names[col]}' at row {row}; fill or drop them first"
                )
        y_missing = _missing_labels(y)
        if y_missing.any():
            raise DataError(f"{where} ({part}): label missing at row {int(np.argmax(y_missing))}")
    if len(np.unique(table.y)) < 2:
        raise DataError(f"{where}: the label has a single class ({table.y[0]!r}); nothing to learn")


def _missing_labels(y: np.ndarray) -> np.ndarray:
    if y.dtype.kind == "f":
        return np.isnan(y)
    if y.dtype == object:
        return np.array([v is None or (isinstance(v, float) and np.isnan(v)) for v in y])
    return np.zeros(len(y), dtype=bool)


def split_table(table: Table, cfg: DataConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    u = array_row_uniforms(table.X, cfg.seed)
    test_fraction = 0.0 if table.test is not None else cfg.test_fraction
    split = assign_splits(u, cfg.val_fraction, test_fraction)
    masks = {"test": split == 2, "val": split == 1, "train": split == 0}
    splits = {}
    for name, mask in masks.items():
        index = np.flatnonzero(mask)
        index = index[np.argsort(u[index], kind="stable")]  # a subsample keeps the same rows
        splits[name] = (table.X[index], table.y[index])
    if table.test is not None:
        Xt, yt = table.test
        order = np.argsort(array_row_uniforms(Xt, cfg.seed), kind="stable")
        splits["test"] = (Xt[order], yt[order])
    if cfg.max_rows:
        head = np.arange(cfg.max_rows)
        splits = {k: (X[head[: len(y)]], y[: cfg.max_rows]) for k, (X, y) in splits.items()}
    for name in SPLITS:
        if len(splits[name][0]) == 0 and (name == "train" or getattr(cfg, f"{name}_fraction") > 0):
            raise DataError(
                f"{cfg.source}: the {name} split is empty; use more rows or a larger data.{name}_fraction"
            )
    return splits


def encode_labels(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[list[Any], dict]:
    """Map raw labels to 0..k-1 codes; classes come from the training split, sorted."""
    classes = sorted(np.unique(splits["train"][1]).tolist())
    lookup = {c: i for i, c in enumerate(classes)}
    encoded = {}
    for name, (X, y) in splits.items():
        unseen = set(np.unique(y).tolist()) - lookup.keys()
        if unseen:
            raise DataError(
                f"{name} split has label(s) {sorted(unseen)[:5]} never seen in training"
            )
        encoded[name] = (X, np.array([lookup[v] for v in y.tolist()], dtype=np.int64))
    return classes, encoded


# ---------------------------------------------------------------- the stage


def quantiled_note(cfg: DataConfig, columns: list[str]) -> str:
    why = "heavy-tailed, |skew| ≥ 2; " if cfg.numeric_transform == "auto" else ""
    shown = ", ".join(columns[:8]) + (f" and {len(columns) - 8} more" if len(columns) > 8 else "")
    return (
        f"data.numeric_transform {cfg.numeric_transform}: {len(columns)} column(s) mapped to "
        f"normal scores through their training quantiles ({why}{shown})"
    )


def ingest_dataset(
    cfg: DataConfig, out: StageDir, client=None, dask: DaskConfig | None = None
) -> dict[str, Any]:
    """Read, validate, split and save; return the manifest body. Tables run on `client`, or
    on a cluster started from `dask` for the stage when no client is given."""
    fmt = preflight(cfg)
    if fmt in TABLE_FORMATS:
        from tasks.cluster import dask_client
        from tasks.tables import ingest_table

        with contextlib.nullcontext(client) if client else dask_client(dask or DaskConfig()) as c:
            table = ingest_table(cfg, fmt, out, c)
        extras = {
            "encoder": out.describe("encoder.json")[0],
            "codes": table["codes"],  # coded categoricals → their number of codes (embeddings)
            "unscaled": table["unscaled"],  # data.numeric_transform: none
            "raw_example": out.describe("raw_example.parquet")[0],
            "quarantine": out.describe("quarantine.csv")[0] if table["quarantined"] else None,
            # the test split's cleaned raw rows (Parquet parts in row order), for scoring any
            # model, the champion included, on exactly these rows
            "test_rows": out.describe(*table["test_rows"]),
        }
        notes = (
            [
                f"{table['rejected']} bad row(s) {'quarantined' if table['quarantined'] else 'dropped'}"
            ]
            if table["rejected"]
            else []
        )
        if table["missing_values"]:
            notes.append(
                f"{table['missing_values']} missing value(s) filled from the training split"
            )
        if table["quantiled"]:
            notes.append(quantiled_note(cfg, table["quantiled"]))
        notes.append(
            f"{len(table['numeric'])} numeric and {len(table['categorical'])} categorical column(s) "
            f"→ {len(table['feature_names'])} features; read in {table['blocks']} block(s) of "
            f"≤ {table['block_mb']} MB on Dask"
        )
        if table["blocks_read_twice"]:
            notes.append(
                f"{table['blocks_read_twice']} block(s) read twice: their own values typed "
                "some column otherwise than the whole table's"
            )
        image_shape, blocks = None, table["blocks"]
        table_metrics = {f"data/ingest_{name}_seconds": v for name, v in table["seconds"].items()}
        table_metrics["data/blocks_read_twice"] = table["blocks_read_twice"]
    else:
        arrays = read_source(cfg)
        classes, splits = encode_labels(split_table(arrays, cfg))
        for name, (X, y) in splits.items():
            np.save(out.path(f"{name}_X.npy"), X)
            np.save(out.path(f"{name}_y.npy"), y)
        _example(splits, arrays.feature_names).to_parquet(out.path("raw_example.parquet"))
        extras = {
            "encoder": None,
            "quarantine": None,
            "test_rows": None,  # an array's raw rows are the test split's X itself
            "raw_example": out.describe("raw_example.parquet")[0],
        }
        table = {
            "classes": classes,
            "feature_names": arrays.feature_names,
            "raw_columns": arrays.feature_names,
            "rejected": 0,
            "missing_values": 0,
            "warnings": [],
        }
        notes, image_shape, blocks, table_metrics = [], arrays.image_shape, 1, {}
    files: dict[str, Any] = {}
    for name in SPLITS:
        X_file, y_file = out.describe(f"{name}_X.npy", f"{name}_y.npy")
        files[name] = {
            "X": X_file,
            "y": y_file,
            "rows": int(np.load(out.path(f"{name}_y.npy"), mmap_mode="r").shape[0]),
        }
    rows = {name: files[name]["rows"] for name in files}
    feature_names, classes = table["feature_names"], table["classes"]
    # the contract of this training data: registered with the model, checked by later runs
    written = {  # (the manifest's paths are where the files will be once the stage lands)
        name: {
            "rows": files[name]["rows"],
            **{part: {"path": str(out.path(f"{name}_{part}.npy"))} for part in ("X", "y")},
        }
        for name in SPLITS
    }
    contract = build_contract(
        {"splits": written, "classes": classes, "image_shape": image_shape},
        str(out.path("encoder.json")) if extras["encoder"] else None,
        table.get("contract_columns"),
        table.get("contract_counts"),
    )
    out.path("contract.json").write_text(json.dumps(contract, indent=1))
    extras["contract"] = out.describe("contract.json")[0]
    return {
        "source": cfg.source
        if "://" in cfg.source
        else str(Path(cfg.source).expanduser().resolve()),
        "format": detect_format(cfg.source, cfg.format),
        "splits": files,
        "feature_names": feature_names,
        "raw_columns": table["raw_columns"],
        "feature_dtype": str(np.load(out.path("train_X.npy"), mmap_mode="r").dtype),
        "classes": classes,
        "image_shape": image_shape,
        "warnings": table["warnings"],
        **extras,
        "metrics": {f"data/{k}_rows": v for k, v in rows.items()}
        | {
            "data/features": len(feature_names),
            "data/classes": len(classes),
            "data/rejected_rows": table["rejected"],
            "data/missing_values_filled": table["missing_values"],
            "data/source_blocks": blocks,
        }
        | table_metrics,
        "summary": f"{sum(rows.values())} rows ({rows}), {len(feature_names)} features, {len(classes)} classes"
        + "".join(f"; {n}" for n in notes)
        + "".join(f"\n- warning: {w}" for w in table["warnings"]),
    }


def check_source(cfg: DataConfig, dask: DaskConfig | None = None) -> str:
    """Every check ingest makes, without writing the splits (`accelflow validate`)."""
    fmt = preflight(cfg)
    if fmt in TABLE_FORMATS:
        import tempfile

        from tasks.cluster import dask_client
        from tasks.tables import survey

        with tempfile.TemporaryDirectory() as scratch, dask_client(dask or DaskConfig()) as client:
            _, _, fixed, *_ = survey(cfg, fmt, scratch, client)
        rows = np.asarray(fixed.counts).sum(axis=0).tolist()
        features, notes = (
            len(fixed.encoder.feature_names),
            [f"{fixed.rejected} bad row(s)", *fixed.warnings],
        )
    else:
        splits = split_table(read_source(cfg), cfg)
        rows = [len(splits[name][1]) for name in SPLITS]
        features, notes = splits["train"][0].shape[1], []
    sizes = ", ".join(f"{name} {n}" for name, n in zip(SPLITS, rows, strict=True))
    return f"{features} features, splits: {sizes}" + "".join(f"; {n}" for n in notes)


def _example(splits: dict[str, tuple[np.ndarray, np.ndarray]], columns: list[str], rows: int = 5):
    """A few test rows: the registered model's input example and signature."""
    import pandas as pd

    X = splits["test"][0] if len(splits["test"][1]) else splits["train"][0]
    return pd.DataFrame(np.asarray(X[:rows], dtype=np.float64), columns=columns)


def ingest_key(cfg: PipelineConfig, inputs: Inputs) -> dict[str, Any]:
    """The data section and the source files' fingerprint (data edited in place is read
    again); block_mb only changes how the work is cut, never the output."""
    return {
        **cfg.data.model_dump(mode="json", exclude={"block_mb"}),
        "source_files": source_fingerprint(cfg.data),
    }


def build_ingest(cfg: PipelineConfig, inputs: Inputs, out: StageDir, hooks: Hooks) -> dict:
    body = ingest_dataset(cfg.data, out, dask=cfg.dask)
    # the raw source, logged as the run's input with its fingerprint
    return {**body, "source": {"uri": cfg.data.source, "fingerprint": source_fingerprint(cfg.data)}}


SPEC = StageSpec(
    name="ingest",
    section="data",
    inputs=(),
    key=ingest_key,
    build=build_ingest,
    figure=lambda m: f"{sum(s['rows'] for s in m['splits'].values())} rows",
)
