"""ingest: read IDX / CSV / Parquet / NumPy data, validate it, split it deterministically.

The split is a seeded hash of each row's content, so it does not depend on row order or on
how the data is partitioned, and duplicate rows always land in the same split (no leakage).
IDX folders that ship a `t10k-*` test set keep it as the test split.

Outputs (`<workdir>/ingest/<key>/`): `<split>_X.npy`, `<split>_y.npy` per split, and the
manifest with feature names, classes and per-file digests. The input is only ever read.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conf.schema import DataConfig
from tasks.encoding import fit_encoder
from tasks.stage import StageDir, describe_files

VERSION = "2"
SPLITS = ("train", "val", "test")
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """Bad input data; the message names the file, column or row and what to do."""


@dataclass
class Table:
    X: Any  # (rows, features): a numeric array, or for tables the cleaned raw-column DataFrame
    y: np.ndarray  # (rows,), raw labels (ints or strings)
    feature_names: list[str]  # raw column names
    image_shape: list[int] | None = None  # (channels, height, width) for image data
    test: tuple[np.ndarray, np.ndarray] | None = None  # a test set shipped with the data
    numeric: list[str] | None = None  # tables only: numeric and categorical raw columns
    categorical: list[str] | None = None
    rejected: Any = None  # tables only: bad rows with a `_reason` column
    warnings: list[str] = field(default_factory=list)
    missing_values: int = 0

    @property
    def is_frame(self) -> bool:
        return self.numeric is not None


# ---------------------------------------------------------------- readers


CSV_COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".xz": "xz"}


def filesystem(source: str):
    """Any fsspec URL (file://, s3://, gs://, …) or a plain path → (filesystem, path)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(Path(source).expanduser()) if "://" not in source else source)
    except (ImportError, ValueError) as exc:
        raise DataError(f"{source}: no filesystem for this URL ({exc}); install its fsspec package "
                        "(e.g. s3fs for s3://)") from None


def detect_format(source: str, declared: str) -> str:
    if declared != "auto":
        return declared
    fs, path = filesystem(source)
    name = path.rsplit("/", 1)[-1].lower()
    if fs.isdir(path):
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        if any("idx" in n for n in names):
            return "idx"
        if any(n.endswith(".parquet") for n in names):
            return "parquet"
    stem = name.removesuffix(Path(name).suffix) if Path(name).suffix in CSV_COMPRESSION else name
    for suffix, fmt in ((".csv", "csv"), (".parquet", "parquet"), (".npz", "npz")):
        if stem.endswith(suffix):
            return fmt
    if "idx" in name:
        return "idx"
    raise DataError(
        f"{source}: cannot tell the data format from the name; set data.format to one of "
        "idx, csv, parquet, npz"
    )


def source_fingerprint(cfg: DataConfig) -> list[list]:
    """Name, size and modification time of every source file: a cheap content proxy that
    goes into ingest's cache key, so data edited in place is read again."""
    fs, path = filesystem(cfg.source)
    files = sorted(fs.find(path, detail=True).items()) if fs.isdir(path) else [(path, fs.info(path))]
    return [[name.rsplit("/", 1)[-1], info.get("size"), str(info.get("mtime") or info.get("LastModified") or "")]
            for name, info in files]


def read_idx(path: Path | str, fs=None) -> np.ndarray:
    """Parse one IDX file (optionally gzip'd): magic, dims, then the raw array."""
    try:
        with (fs.open(str(path), "rb") if fs else open(path, "rb")) as fh:
            raw = fh.read()
        if str(path).endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc}); is it complete?") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise DataError(
            f"{path}: IDX header promises {dims} ({expected} bytes) but the file holds "
            f"{len(raw) - offset}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)


def _find_idx(fs, folder: str, prefix: str, kind: str) -> str | None:
    hits = sorted(fs.glob(f"{folder.rstrip('/')}/{prefix}-{kind}-idx*"))
    return hits[0] if hits else None


def read_idx_folder(fs, folder: str) -> Table:
    if not fs.isdir(folder):
        raise DataError(f"{folder}: an IDX source must be a folder holding train-images-idx3-ubyte[.gz] etc.")
    pairs = {}
    for prefix in ("train", "t10k"):
        images, labels = _find_idx(fs, folder, prefix, "images"), _find_idx(fs, folder, prefix, "labels")
        if images and labels:
            X, y = read_idx(images, fs), read_idx(labels, fs)
            if len(X) != len(y):
                raise DataError(f"{images}: {len(X)} images but {labels} has {len(y)} labels")
            pairs[prefix] = (X, y)
    if "train" not in pairs:
        raise DataError(
            f"{folder}: no train-images-idx3-ubyte[.gz] + train-labels-idx1-ubyte[.gz] pair found"
        )
    X, y = pairs["train"]
    shape = [1, *X.shape[1:]] if X.ndim == 3 else list(X.shape[1:])
    flat = X.reshape(len(X), -1)
    test = None
    if "t10k" in pairs:
        Xt, yt = pairs["t10k"]
        test = (Xt.reshape(len(Xt), -1), yt)
    names = [f"pixel_{i}" for i in range(flat.shape[1])]
    return Table(flat, y, names, image_shape=shape, test=test)


def read_npz(fs, path: str) -> Table:
    try:
        with fs.open(path, "rb") as fh, np.load(fh, allow_pickle=False) as data:
            missing = {"X", "y"} - set(data.files)
            if missing:
                raise DataError(f"{path}: missing array(s) {sorted(missing)}; an .npz source needs X and y")
            X, y = data["X"], data["y"]
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot read .npz ({exc})") from None
    if X.ndim < 2 or len(X) != len(y):
        raise DataError(f"{path}: X must be (rows, features...) with one y per row; got X{X.shape}, y{y.shape}")
    shape = [1, *X.shape[1:]] if X.ndim == 3 else (list(X.shape[1:]) if X.ndim == 4 else None)
    flat = X.reshape(len(X), -1)
    return Table(flat, y, [f"f{i}" for i in range(flat.shape[1])], image_shape=shape)


def read_frame(fs, path: str, fmt: str, cfg: DataConfig) -> Table:
    """CSV (optionally .gz/.zst/.bz2/.xz) or Parquet (a file or a folder) → a cleaned Table."""
    import pandas as pd
    import pyarrow.parquet as pq

    try:
        if fmt == "csv":
            with fs.open(path, "rb") as fh:
                frame = pd.read_csv(fh, compression=CSV_COMPRESSION.get(Path(path).suffix))
        else:
            frame = pq.read_table(path, filesystem=fs).to_pandas()
    except Exception as exc:  # pandas/pyarrow raise many types for unreadable files
        raise DataError(f"{path}: cannot read as {fmt} ({type(exc).__name__}: {exc})") from None
    if cfg.label not in frame.columns:
        raise DataError(
            f"{path}: label column '{cfg.label}' not found; columns are {list(frame.columns)[:20]}. "
            "Set data.label to the right column."
        )
    frame.columns = [str(c) for c in frame.columns]
    return clean_frame(frame.reset_index(drop=True), cfg, path)


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


def preflight(cfg: DataConfig) -> str:
    """Cheap checks before any stage starts: the source exists, its format is known and
    (for tables) the label column is there. Returns the format."""
    fs, path = filesystem(cfg.source)
    if not fs.exists(path):
        raise DataError(
            f"{path}: data source does not exist. For Fashion-MNIST install Debian's "
            "'dataset-fashion-mnist' (or copy its four IDX .gz files there), or point "
            "data.source at your own CSV / Parquet / .npz file."
        )
    fmt = detect_format(cfg.source, cfg.format)
    if fmt in ("csv", "parquet") and fs.isfile(path):
        import pyarrow.parquet as pq

        try:
            columns = pq.read_schema(path, filesystem=fs).names if fmt == "parquet" else _csv_header(fs, path)
        except Exception as exc:
            raise DataError(f"{path}: cannot read as {fmt} ({type(exc).__name__}: {exc})") from None
        if columns and cfg.label not in columns:
            raise DataError(
                f"{path}: label column '{cfg.label}' not found; columns are {columns[:20]}. "
                "Set data.label to the right column."
            )
    return fmt


def _csv_header(fs, path: str) -> list[str]:
    import pandas as pd

    with fs.open(path, "rb") as fh:
        return [str(c) for c in pd.read_csv(fh, nrows=0, compression=CSV_COMPRESSION.get(Path(path).suffix)).columns]


def read_source(cfg: DataConfig) -> Table:
    fmt = preflight(cfg)
    fs, path = filesystem(cfg.source)
    if fmt == "idx":
        table = read_idx_folder(fs, path)
    elif fmt == "npz":
        table = read_npz(fs, path)
    else:
        table = read_frame(fs, path, fmt, cfg)
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
        extras["encoder"] = describe_files([out.path("encoder.json")])[0] | {"path": out.final_path("encoder.json")}
        if table.rejected is not None and cfg.on_bad_rows == "quarantine":
            table.rejected.to_csv(out.path("quarantine.csv"), index=False)
            extras["quarantine"] = describe_files([out.path("quarantine.csv")])[0] | {
                "path": out.final_path("quarantine.csv")}
    raw_example.to_parquet(out.path("raw_example.parquet"))
    extras["raw_example"] = describe_files([out.path("raw_example.parquet")])[0] | {
        "path": out.final_path("raw_example.parquet")}
    files: dict[str, Any] = {}
    for name, (X, y) in splits.items():
        np.save(out.path(f"{name}_X.npy"), X)
        np.save(out.path(f"{name}_y.npy"), y)
        described = describe_files([out.path(f"{name}_X.npy"), out.path(f"{name}_y.npy")])
        for d in described:
            d["path"] = out.final_path(Path(d["path"]).name)
        files[name] = {"X": described[0], "y": described[1], "rows": len(y)}
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
