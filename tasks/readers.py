"""Reading sources from a local path or any fsspec URL: IDX folders and NumPy `.npz` (whole
arrays), format detection and the cheap checks before a run. Tables (CSV, Parquet) are read
block by block on the cluster by `tasks.tables`.
"""

from __future__ import annotations

import gzip
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conf.schema import DataConfig
from tasks.errors import DataError

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
CSV_COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".xz": "xz"}


@dataclass
class Table:
    """An array source (IDX, .npz), small enough to hold: tables go through `tasks.tables`."""

    X: np.ndarray  # (rows, features)
    y: np.ndarray  # (rows,), raw labels
    feature_names: list[str]
    image_shape: list[int] | None = None  # (channels, height, width) for image data
    test: tuple[np.ndarray, np.ndarray] | None = None  # a test set shipped with the data


def filesystem(source: str):
    """Any fsspec URL (file://, s3://, gs://, …) or a plain path → (filesystem, path)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(
            str(Path(source).expanduser()) if "://" not in source else source
        )
    except (ImportError, ValueError) as exc:
        raise DataError(
            f"{source}: no filesystem for this URL ({exc}); install its fsspec package "
            "(e.g. s3fs for s3://)"
        ) from None


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
    files = (
        sorted(fs.find(path, detail=True).items()) if fs.isdir(path) else [(path, fs.info(path))]
    )
    return [
        [
            name.rsplit("/", 1)[-1],
            info.get("size"),
            str(info.get("mtime") or info.get("LastModified") or ""),
        ]
        for name, info in files
    ]


def read_idx(path: Path | str, fs=None) -> np.ndarray:
    """Parse one IDX file (optionally gzip'd): magic, dims, then the raw array."""
    try:
        with fs.open(str(path), "rb") if fs else open(path, "rb") as fh:
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
        raise DataError(
            f"{folder}: an IDX source must be a folder holding train-images-idx3-ubyte[.gz] etc."
        )
    pairs = {}
    for prefix in ("train", "t10k"):
        images, labels = (
            _find_idx(fs, folder, prefix, "images"),
            _find_idx(fs, folder, prefix, "labels"),
        )
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
                raise DataError(
                    f"{path}: missing array(s) {sorted(missing)}; an .npz source needs X and y"
                )
            X, y = data["X"], data["y"]
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot read .npz ({exc})") from None
    if X.ndim < 2 or len(X) != len(y):
        raise DataError(
            f"{path}: X must be (rows, features...) with one y per row; got X{X.shape}, y{y.shape}"
        )
    shape = [1, *X.shape[1:]] if X.ndim == 3 else (list(X.shape[1:]) if X.ndim == 4 else None)
    flat = X.reshape(len(X), -1)
    return Table(flat, y, [f"f{i}" for i in range(flat.shape[1])], image_shape=shape)


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
            columns = (
                pq.read_schema(path, filesystem=fs).names
                if fmt == "parquet"
                else csv_header(fs, path)
            )
        except Exception as exc:
            raise DataError(
                f"{path}: cannot read as {fmt} ({type(exc).__name__}: {exc}); is the file complete?"
            ) from None
        twice = sorted({c for c in columns if columns.count(c) > 1})
        if twice:
            raise DataError(
                f"{path}: column name(s) {twice} appear more than once in the header; rename "
                "them so that every column has its own name"
            )
        if columns and cfg.label not in columns:
            raise DataError(
                f"{path}: label column '{cfg.label}' not found; columns are {columns[:20]}. "
                "Set data.label to the right column."
            )
    return fmt


class _CheckedZstd(io.RawIOBase):
    """A .zst stream that fails like gzip, bz2 and xz do when it is cut short: zstandard's
    own stream reader just stops at a truncated frame, and the half row at the cut would
    pass as one bad row while the rest of the file went missing without a word."""

    def __init__(self, raw):
        import zstandard

        self.raw, self.new_frame = raw, zstandard.ZstdDecompressor().decompressobj
        self.frame, self.started = self.new_frame(), False
        self.pending, self.offset = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.offset == len(self.pending):
            chunk = self.raw.read(1 << 20)
            if not chunk:
                if self.started and not self.frame.eof:
                    raise EOFError("zstd stream ended before the end of its frame")
                return 0
            self.pending, self.offset = self._decompress(chunk), 0
        n = min(len(buffer), len(self.pending) - self.offset)
        buffer[:n] = self.pending[self.offset : self.offset + n]
        self.offset += n
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            if self.frame.eof:  # concatenated frames: the next one starts here
                self.frame = self.new_frame()
            self.started = True
            out.append(self.frame.decompress(chunk))
            chunk = self.frame.unused_data if self.frame.eof else b""
        return b"".join(out)

    def close(self) -> None:
        self.raw.close()
        super().close()


def open_text_stream(fs, path: str):
    """A (possibly compressed) CSV as a binary stream that raises EOFError if it was cut off."""
    if Path(path).suffix == ".zst":
        return io.BufferedReader(_CheckedZstd(fs.open(path, "rb")), buffer_size=1 << 20)
    return fs.open(path, "rb", compression="infer")


def csv_header(fs, path: str) -> list[str]:
    import pandas as pd

    # the header as a row of text: read as a header, pandas would rename a repeated name
    with open_text_stream(fs, path) as fh:
        head = pd.read_csv(fh, nrows=1, header=None, dtype=str, keep_default_na=False)
    return [str(c) for c in head.iloc[0]] if len(head) else []


# ---------------------------------------------------------------- stage outputs, in chunks

NPY_CHUNK = 65_536  # rows per read: bounded memory whatever the array's size


def npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """An .npy file's shape, dtype and where its data begin."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(fh)
        if fortran:  # np.save writes C order; a Fortran array cannot be read by rows
            raise ValueError(f"{path}: a Fortran-ordered array")
        return shape, dtype, fh.tell()


def npy_chunks(path: str, rows: int = NPY_CHUNK, begin: int = 0, end: int | None = None):
    """An .npy file's rows (from `begin` up to `end`) a chunk at a time, read (not
    memory-mapped: mapped pages would stay in the process's resident memory until the map
    closes)."""
    shape, dtype, offset = npy_header(path)
    width = int(np.prod(shape[1:], dtype=np.int64))
    end = shape[0] if end is None else min(end, shape[0])
    with open(path, "rb") as fh:
        fh.seek(offset + begin * width * dtype.itemsize)
        for start in range(begin, end, rows):
            n = min(rows, end - start)
            yield np.fromfile(fh, dtype=dtype, count=n * width).reshape(n, *shape[1:])


def npy_put(path: str, start: int, rows: np.ndarray) -> None:
    """Write `rows` into an existing .npy file from row `start` on, in one positioned write.
    Tasks of a stage fill one array this way side by side; a memory map's flush instead
    made each task write back every dirty page of the file, its neighbours' too."""
    shape, dtype, offset = npy_header(path)
    rows = np.ascontiguousarray(rows, dtype=dtype)
    if rows.shape[1:] != shape[1:] or start + len(rows) > shape[0]:
        raise ValueError(
            f"{path}: rows {start}-{start + len(rows)} of shape {rows.shape} do not fit {shape}"
        )
    with open(path, "r+b") as fh:
        fh.seek(offset + start * dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64)))
        fh.write(rows.data)


def npy_take(path: str, rows: np.ndarray) -> np.ndarray:
    """The rows at sorted indices `rows`, in one chunked pass."""
    picked, start = [], 0
    for block in npy_chunks(path):
        inside = rows[(rows >= start) & (rows < start + len(block))]
        picked.append(block[inside - start])
        start += len(block)
    shape, dtype, _ = npy_header(path)
    return np.concatenate(picked) if picked else np.empty((0, *shape[1:]), dtype)


def npy_sample(path: str, rows: int, size: int) -> np.ndarray:
    """`size` rows evenly spaced over the file (all when it has fewer)."""
    return npy_take(
        path, np.unique(np.linspace(0, max(rows - 1, 0), min(rows, size)).astype(np.int64))
    )
