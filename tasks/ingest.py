"""ingest: read a source (see `tasks.readers`), clean and validate it, split it deterministically.

The split is a seeded hash of each row's content, so it does not depend on row order or on
how the data is partitioned, and duplicate rows always land in the same split (no leakage).
IDX folders that ship a `t10k-*` test set keep it as the test split.

Outputs (`<workdir>/ingest/<key>/`): `<split>_X.npy`, `<split>_y.npy` per split, and the
manifest with feature names, classes and per-file digests. The input is only ever read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from conf.schema import DataConfig
from tasks.encoding import fit_encoder
from tasks.readers import (
    DataError,
    Table,
    detect_format,
    filesystem,
    preflight,
    read_frame,
    read_idx_folder,
    read_npz,
)
from tasks.stage import StageDir

VERSION = "2"
SPLITS = ("train", "val", "test")


def clean_frame(frame, cfg: DataConfig, where: str) -> Table:
    """Type every column, apply the bad-row policy and the missing-value policy.

    A string column whose values are ≥ 95% numbers is a numeric column with stray values
    (those rows are bad rows); other string columns are categorical.
    """
    import pandas as pd

    features = frame.drop(columns=[cfg.label])
    declared = cfg.columns or {}
    warnings = []
    if declared:
        unknown = [c for c in declared if c not in features.columns]
        if unknown:
            raise DataError(f"{where}: declared column(s) {unknown[:10]} (data.columns) are not in the file; "
                            f"its columns are {list(features.columns)[:20]}")
        ignored = [c for c in features.columns if c not in declared]
        if ignored:
            warnings.append(f"{len(ignored)} column(s) not declared in data.columns are ignored: {ignored[:10]}")
        features = features[list(declared)]
    if features.shape[1] == 0:
        raise DataError(f"{where}: no feature columns besides the label '{cfg.label}'")
    if len(frame) == 0:
        raise DataError(f"{where}: the dataset is empty (0 rows)")
    reasons = pd.Series("", index=frame.index, dtype=object)

    def flag(mask, reason):
        fresh = mask & (reasons == "")
        reasons[fresh] = [reason(i) for i in fresh[fresh].index]

    flag(frame[cfg.label].isna(), lambda i: "label missing")
    numeric, categorical = [], []
    for column in features.columns:
        values = features[column]
        present = values.notna()
        if not present.any():
            raise DataError(f"{where}: column '{column}' has no values (all missing); drop it or fill it")
        if values.nunique(dropna=True) == 1:
            warnings.append(f"column '{column}' is constant ({values[present].iloc[0]!r}): it carries no signal")
        kind = declared.get(column)
        if kind == "categorical":  # declared: e.g. zip codes, which look numeric
            features[column] = values.astype("object").where(present, None).map(lambda v: v if v is None else str(v))
            categorical.append(column)
            continue
        if pd.api.types.is_numeric_dtype(values):
            numeric.append(column)
            continue
        parsed = pd.to_numeric(values, errors="coerce")
        parsed_ok = parsed.notna() & present
        if kind == "numeric" or parsed_ok.sum() >= 0.95 * present.sum():  # numbers with stray strings
            flag(present & ~parsed_ok, lambda i, c=column: f"column '{c}': {features.at[i, c]!r} is not a number")
            features[column] = parsed
            numeric.append(column)
        else:
            categorical.append(column)
    for column in numeric:
        flag(pd.Series(np.isinf(features[column].to_numpy(dtype=float)), index=frame.index),
             lambda i, c=column: f"column '{c}': infinite value")

    bad = reasons != ""
    rejected = None
    if bad.any():
        first = int(bad.idxmax())
        if cfg.on_bad_rows == "error":
            raise DataError(
                f"{where}: {int(bad.sum())} bad row(s), first at row {first}: {reasons[first]}. Fix the data, "
                "or set data.on_bad_rows to drop or quarantine to continue without them"
            )
        rejected = frame[bad].assign(_reason=reasons[bad])
        features, frame = features[~bad], frame[~bad]
    missing = features.isna()
    if cfg.missing == "error" and missing.to_numpy().any():
        rows, cols = np.nonzero(missing.to_numpy())
        raise DataError(
            f"{where}: {int(missing.to_numpy().sum())} missing value(s), first in column "
            f"'{features.columns[cols[0]]}' at row {int(features.index[rows[0]])}; fill or drop them first, "
            "or set data.missing: fill"
        )
    return Table(features.reset_index(drop=True), frame[cfg.label].to_numpy(), list(features.columns),
                 numeric=numeric, categorical=categorical, rejected=rejected, warnings=warnings,
                 missing_values=int(missing.to_numpy().sum()))


def read_source(cfg: DataConfig) -> Table:
    fmt = preflight(cfg)
    fs, path = filesystem(cfg.source)
    if fmt == "idx":
        table = read_idx_folder(fs, path)
    elif fmt == "npz":
        table = read_npz(fs, path)
    else:
        table = clean_frame(read_frame(fs, path, fmt, cfg.label), cfg, path)
    validate(table, cfg.source)
    return table


# ---------------------------------------------------------------- validation and split


def validate(table: Table, where: str) -> None:
    if len(table.X) == 0:
        raise DataError(f"{where}: the dataset is empty (0 rows)")
    if not table.is_frame:  # arrays (IDX, .npz); tables were checked column by column
        for X, y, part in [(table.X, table.y, "data"), *([(*table.test, "test set")] if table.test else [])]:
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


def row_uniforms(X, seed: int) -> np.ndarray:
    """A number in [0, 1) per row from a seeded hash of its content: order-independent."""
    if not isinstance(X, np.ndarray):  # a DataFrame: pandas hashes rows vectorised
        import pandas as pd

        key = f"{seed & (2**53 - 1):016d}"[-16:]
        return pd.util.hash_pandas_object(X, index=False, hash_key=key).to_numpy() / 2**64
    rows = np.ascontiguousarray(X)
    salt = seed.to_bytes(8, "little", signed=True)
    out = np.empty(len(rows), dtype=np.float64)
    for i, row in enumerate(rows):
        digest = hashlib.blake2b(row.tobytes(), digest_size=8, salt=salt[:8]).digest()
        out[i] = int.from_bytes(digest, "little") / 2**64
    return out


def split_table(table: Table, cfg: DataConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    u = row_uniforms(table.X, cfg.seed)
    test_fraction = 0.0 if table.test is not None else cfg.test_fraction
    masks = {
        "test": u < test_fraction,
        "val": (u >= test_fraction) & (u < test_fraction + cfg.val_fraction),
        "train": u >= test_fraction + cfg.val_fraction,
    }
    splits = {}
    for name, mask in masks.items():
        index = np.flatnonzero(mask)
        index = index[np.argsort(u[index], kind="stable")]  # a subsample keeps the same rows
        splits[name] = (_take(table.X, index), table.y[index])
    if table.test is not None:
        Xt, yt = table.test
        order = np.argsort(row_uniforms(Xt, cfg.seed), kind="stable")
        splits["test"] = (Xt[order], yt[order])
    if cfg.max_rows:
        head = np.arange(cfg.max_rows)
        splits = {k: (_take(X, head[: len(y)]), y[: cfg.max_rows]) for k, (X, y) in splits.items()}
    for name in SPLITS:
        if len(splits[name][0]) == 0 and (name == "train" or getattr(cfg, f"{name}_fraction") > 0):
            raise DataError(
                f"{cfg.source}: the {name} split is empty; use more rows or a larger data.{name}_fraction"
            )
    return splits


def _take(rows, index: np.ndarray):
    return rows[index] if isinstance(rows, np.ndarray) else rows.iloc[index].reset_index(drop=True)


def encode_labels(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[list[Any], dict]:
    """Map raw labels to 0..k-1 codes; classes come from the training split, sorted."""
    classes = sorted(np.unique(splits["train"][1]).tolist())
    lookup = {c: i for i, c in enumerate(classes)}
    encoded = {}
    for name, (X, y) in splits.items():
        unseen = set(np.unique(y).tolist()) - lookup.keys()
        if unseen:
            raise DataError(f"{name} split has label(s) {sorted(unseen)[:5]} never seen in training")
        encoded[name] = (X, np.array([lookup[v] for v in y.tolist()], dtype=np.int64))
    return classes, encoded


# ---------------------------------------------------------------- the stage


def ingest_dataset(cfg: DataConfig, out: StageDir) -> dict[str, Any]:
    """Read, validate, split and save; return the manifest body."""
    table = read_source(cfg)
    classes, splits = encode_labels(split_table(table, cfg))
    raw_example = _example(splits, table.feature_names)
    extras: dict[str, Any] = {"encoder": None, "quarantine": None}
    feature_names = table.feature_names
    if table.is_frame:  # tables: fit fills and vocabularies on train, encode every split
        encoder = fit_encoder(splits["train"][0], table.numeric, table.categorical, cfg.max_onehot)
        splits = {name: (encoder.transform(frame), y) for name, (frame, y) in splits.items()}
        feature_names = encoder.feature_names
        encoder.save(out.path("encoder.json"))
        extras["encoder"] = out.describe("encoder.json")[0]
        if table.rejected is not None and cfg.on_bad_rows == "quarantine":
            table.rejected.to_csv(out.path("quarantine.csv"), index=False)
            extras["quarantine"] = out.describe("quarantine.csv")[0]
    raw_example.to_parquet(out.path("raw_example.parquet"))
    extras["raw_example"] = out.describe("raw_example.parquet")[0]
    files: dict[str, Any] = {}
    for name, (X, y) in splits.items():
        np.save(out.path(f"{name}_X.npy"), X)
        np.save(out.path(f"{name}_y.npy"), y)
        X_file, y_file = out.describe(f"{name}_X.npy", f"{name}_y.npy")
        files[name] = {"X": X_file, "y": y_file, "rows": len(y)}
    rows = {name: files[name]["rows"] for name in files}
    rejected = 0 if table.rejected is None else len(table.rejected)
    notes = [f"{rejected} bad row(s) {'quarantined' if extras['quarantine'] else 'dropped'}"] if rejected else []
    if table.missing_values:
        notes.append(f"{table.missing_values} missing value(s) filled from the training split")
    if table.is_frame:
        notes.append(f"{len(table.numeric)} numeric and {len(table.categorical)} categorical column(s) "
                     f"→ {len(feature_names)} features")
    return {
        "source": cfg.source if "://" in cfg.source else str(Path(cfg.source).expanduser().resolve()),
        "format": detect_format(cfg.source, cfg.format),
        "splits": files,
        "feature_names": feature_names,
        "raw_columns": table.feature_names,
        "feature_dtype": str(splits["train"][0].dtype),
        "classes": classes,
        "image_shape": table.image_shape,
        "warnings": table.warnings,
        **extras,
        "metrics": {f"data/{k}_rows": v for k, v in rows.items()}
        | {"data/features": len(feature_names), "data/classes": len(classes), "data/rejected_rows": rejected,
           "data/missing_values_filled": table.missing_values},
        "summary": f"{sum(rows.values())} rows ({rows}), {len(feature_names)} features, {len(classes)} classes"
        + "".join(f"; {n}" for n in notes) + "".join(f"\n- warning: {w}" for w in table.warnings),
    }


def _example(splits: dict[str, tuple[Any, np.ndarray]], columns: list[str], rows: int = 5):
    """A few raw test rows: the registered model's input example and signature."""
    import pandas as pd

    X = splits["test"][0] if len(splits["test"][1]) else splits["train"][0]
    if isinstance(X, np.ndarray):
        return pd.DataFrame(np.asarray(X[:rows], dtype=np.float64), columns=columns)
    return X.head(rows).reset_index(drop=True)
