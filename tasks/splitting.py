"""The one rule that puts a row in train, val or test, for every source format.

A row's place is a seeded hash of its cleaned content: independent of row order, of block
boundaries and of the file format (the same numbers as CSV, Parquet, .npz or IDX land in
the same split), and duplicate rows always share a split, so nothing leaks across.
"""

from __future__ import annotations

import numpy as np

ARRAY_CHUNK_ROWS = 8192  # arrays are hashed a chunk at a time: a float64 copy of a chunk only


def row_uniforms(features, seed: int) -> np.ndarray:
    """A number in [0, 1) per row of a DataFrame (numbers as float64, categories as text)."""
    # pandas' hash_key salts text columns only: mix the seed into every row's hash as well,
    # or data.seed would not change the split of an all-numeric table
    hashes = row_hashes(features)
    return _mix(hashes ^ _mix(np.array([seed & (2**64 - 1)], dtype=np.uint64))) / 2**64


HASH_CHUNK_ROWS = 32_768  # a float column's slice and its temporaries stay in the core's cache
_FINAL = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def row_hashes(frame) -> np.ndarray:
    """`pandas.util.hash_pandas_object(frame, index=False)`, to the bit, in 62-86 against
    89-112 ms on a 41 MB CSV block (`benchmarks/ingest_blocks.py`). pandas hashes a whole
    column at a time, a dozen passes over arrays too large for the cache; here float
    columns are hashed a slice of rows at a time, in place. Other columns are pandas' own
    (text: a hash per distinct value)."""
    import pandas as pd

    columns = [frame.iloc[:, j] for j in range(frame.shape[1])]
    floats = {j: c.to_numpy() for j, c in enumerate(columns) if c.dtype == np.float64}
    others = {
        j: pd.util.hash_pandas_object(c, index=False).to_numpy()
        for j, c in enumerate(columns)
        if j not in floats
    }
    # pandas' combine_hash_arrays (CPython's tuple hash): a multiplier per column position
    multipliers, mult = [], np.uint64(1000003)
    for j in range(len(columns)):
        multipliers.append(mult)
        mult += np.uint64(82520 + 2 * (len(columns) - j))
    out = np.full(len(frame), 0x345678, dtype=np.uint64)
    bits, spare = np.empty((2, min(len(frame), HASH_CHUNK_ROWS)), dtype=np.uint64)
    mask = np.empty(len(bits), dtype=bool)
    nan = np.array(np.nan).view(np.uint64)
    for start in range(0, len(frame), HASH_CHUNK_ROWS):
        hashed = out[start : start + HASH_CHUNK_ROWS]
        v, tmp, m = bits[: len(hashed)], spare[: len(hashed)], mask[: len(hashed)]
        for j, multiplier in enumerate(multipliers):
            if j in others:
                hashed ^= others[j][start : start + len(hashed)]
            else:  # pandas' _hash_ndarray: -0.0 and every NaN hash as 0.0 and NaN do
                values = floats[j][start : start + len(hashed)]
                np.copyto(v, values.view(np.uint64))
                np.copyto(v, 0, where=np.equal(values, 0, out=m))
                np.copyto(v, nan, where=np.isnan(values, out=m))
                for shift, factor in zip((30, 27), _FINAL, strict=True):
                    v ^= np.right_shift(v, shift, out=tmp)
                    v *= factor
                v ^= np.right_shift(v, 31, out=tmp)
                hashed ^= v
            hashed *= multiplier
    out += np.uint64(97531)
    return out


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit moves every output bit (uint64, wrapping)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def array_row_uniforms(X: np.ndarray, seed: int) -> np.ndarray:
    """The same numbers for the rows of a numeric array (IDX, .npz): each row hashes as the
    table row holding the same values would."""
    import pandas as pd

    parts = [
        row_uniforms(pd.DataFrame(np.asarray(X[i : i + ARRAY_CHUNK_ROWS], dtype=np.float64)), seed)
        for i in range(0, len(X), ARRAY_CHUNK_ROWS)
    ]
    return np.concatenate(parts) if parts else np.empty(0)


def assign_splits(u: np.ndarray, val_fraction: float, test_fraction: float) -> np.ndarray:
    """0 train, 1 val, 2 test, by where each row's hash falls."""
    return np.where(u < test_fraction, 2, np.where(u < test_fraction + val_fraction, 1, 0))
