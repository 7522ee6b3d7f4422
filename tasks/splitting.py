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
    import pandas as pd

    # pandas' hash_key salts text columns only: mix the seed into every row's hash as well,
    # or data.seed would not change the split of an all-numeric table
    hashes = pd.util.hash_pandas_object(features, index=False).to_numpy()
    return _mix(hashes ^ _mix(np.array([seed & (2**64 - 1)], dtype=np.uint64))) / 2**64


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
