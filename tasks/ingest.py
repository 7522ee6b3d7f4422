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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conf.schema import DataConfig
from tasks.stage import StageDir, describe_files

VERSION = "1"
SPLITS = ("train", "val", "test")
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """Bad input data; the message names the file, column or row and what to do."""


@dataclass
class Table:
    X: np.ndarray  # (rows, features), numeric
    y: np.ndarray  # (rows,), raw labels (ints or strings)
    feature_names: list[str]
    image_shape: list[int] | None = None  # (channels, height, width) for image data
    test: tuple[np.ndarray, np.ndarray] | None = None  # a test set shipped with the data


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


def read_frame(fs, path: str, fmt: str, label: str) -> Table:
    """CSV (optionally .gz/.zst/.bz2/.xz) or Parquet (a file or a folder) → Table; every
    feature column must be numeric."""
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
    if label not in frame.columns:
        raise DataError(
            f"{path}: label column '{label}' not found; columns are {list(frame.columns)[:20]}. "
            "Set data.label to the right column."
        )
    features = frame.drop(columns=[label])
    bad = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if bad:
        raise DataError(
            f"{path}: feature column(s) {bad[:10]} are not numeric; accelflow needs numeric "
            "features (encode or drop these columns first)"
        )
    if features.shape[1] == 0:
        raise DataError(f"{path}: no feature columns besides the label '{label}'")
    X = features.to_numpy()
    if X.dtype.kind == "f" or X.dtype == object:
        X = X.astype(np.float32)
    return Table(X, frame[label].to_numpy(), [str(c) for c in features.columns])


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
        table = read_frame(fs, path, fmt, cfg.label)
    validate(table, cfg.source)
    return table


# ---------------------------------------------------------------- validation and split


def validate(table: Table, where: str) -> None:
    if len(table.X) == 0:
        raise DataError(f"{where}: the dataset is empty (0 rows)")
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


def row_uniforms(X: np.ndarray, seed: int) -> np.ndarray:
    """A number in [0, 1) per row from a seeded hash of its bytes: order-independent."""
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
        splits[name] = (table.X[index], table.y[index])
    if table.test is not None:
        Xt, yt = table.test
        order = np.argsort(row_uniforms(Xt, cfg.seed), kind="stable")
        splits["test"] = (Xt[order], yt[order])
    if cfg.max_rows:
        splits = {k: (X[: cfg.max_rows], y[: cfg.max_rows]) for k, (X, y) in splits.items()}
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
            raise DataError(f"{name} split has label(s) {sorted(unseen)[:5]} never seen in training")
        encoded[name] = (X, np.array([lookup[v] for v in y.tolist()], dtype=np.int64))
    return classes, encoded


# ---------------------------------------------------------------- the stage


def ingest_dataset(cfg: DataConfig, out: StageDir) -> dict[str, Any]:
    """Read, validate, split and save; return the manifest body."""
    table = read_source(cfg)
    classes, splits = encode_labels(split_table(table, cfg))
    files: dict[str, Any] = {}
    for name, (X, y) in splits.items():
        np.save(out.path(f"{name}_X.npy"), X)
        np.save(out.path(f"{name}_y.npy"), y)
        described = describe_files([out.path(f"{name}_X.npy"), out.path(f"{name}_y.npy")])
        for d in described:
            d["path"] = out.final_path(Path(d["path"]).name)
        files[name] = {"X": described[0], "y": described[1], "rows": len(y)}
    rows = {name: files[name]["rows"] for name in files}
    return {
        "source": cfg.source if "://" in cfg.source else str(Path(cfg.source).expanduser().resolve()),
        "format": detect_format(cfg.source, cfg.format),
        "splits": files,
        "feature_names": table.feature_names,
        "feature_dtype": str(table.X.dtype),
        "classes": classes,
        "image_shape": table.image_shape,
        "metrics": {f"data/{k}_rows": v for k, v in rows.items()}
        | {"data/features": len(table.feature_names), "data/classes": len(classes)},
        "summary": f"{sum(rows.values())} rows ({rows}), {len(table.feature_names)} features, "
        f"{len(classes)} classes",
    }
