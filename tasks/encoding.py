"""Raw table columns → numeric features, fitted on the training split and reused when serving.

Numeric columns keep their values (missing ones take the training median); string columns
are categorical: one-hot up to `max_onehot` categories, else an integer code per category
(most frequent first), which the MLP turns into a learned embedding. Values with fewer than
`min_frequency` training rows share the last code, `<rare>`, with values unseen in training,
so scoring never fails on a value the training data lacked. The fitted state is plain JSON (no pickle) and
travels with the registered model.

`data.numeric_transform` may map numeric columns through their training quantiles to normal
scores (quantile-normal): a heavy-tailed column (word counts, amounts of money) otherwise
reaches the network as a few huge values and a crowd near zero, which standardising leaves
as it is. The map is piecewise linear between the sample's percentiles, clipped at the ends,
so an outlier at scoring time lands on the last score instead of far outside what the
network saw.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

MISSING = "<missing>"
# The quantile-normal map's bucket lookup (`Encoder.bucket_knots`): at most this many
# buckets (4 bytes each), and used from this many values on (below, np.interp is faster)
LOOKUP_ENTRIES = 1 << 22
LOOKUP_FROM = 4096


@dataclass
class Encoder:
    numeric: list[str]
    fills: dict[str, float]
    categorical: dict[str, list[str]] = field(default_factory=dict)  # column → vocabulary
    onehot: list[str] = field(default_factory=list)  # categorical columns expanded one-hot
    pooled: dict[str, int] = field(default_factory=dict)  # column → rare values in <rare>
    # column → [knots, normal scores]: the quantile-normal map (data.numeric_transform)
    quantiles: dict[str, list[list[float]]] = field(default_factory=dict)
    unscaled: bool = False  # data.numeric_transform: none, the network must not standardise

    @cached_property
    def numeric_index(self):
        """The numeric columns as a pandas Index: compared with an input's columns in C."""
        import pandas as pd

        return pd.Index(self.numeric)

    @cached_property
    def indexes(self) -> dict[str, dict[str, int]]:
        """Each categorical column's value → code, built once (not on every served call)."""
        return {c: {v: i for i, v in enumerate(vocab)} for c, vocab in self.categorical.items()}

    @cached_property
    def quantile_map(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The quantile-normal columns as one interpolation: column j's values, clipped to its
        knots, are moved to [2j, 2j+1], so a single np.interp over every column's knots (each
        moved the same way) maps them all in one C call, whatever the number of columns."""
        where = np.array([self.numeric.index(c) for c in self.quantiles], dtype=np.int64)
        low = np.array([k[0][0] for k in self.quantiles.values()])
        high = np.array([k[0][-1] for k in self.quantiles.values()])
        xp = np.concatenate(
            [
                2 * j + (np.array(k) - low[j]) / (high[j] - low[j])
                for j, (k, _) in enumerate(self.quantiles.values())
            ]
        )
        fp = np.concatenate([np.array(scores) for _, scores in self.quantiles.values()])
        return where, low, high, xp, fp

    @cached_property
    def bucket_knots(self) -> tuple[int, np.ndarray, np.ndarray]:
        """A lookup that finds np.interp's knot without its binary search: the moved values
        (`quantile_map`) cut into `per_unit` buckets per unit, a power of two (so a bucket's
        start, b / per_unit, is exact), and for each bucket the last knot at or below its
        start; with the slope of every knot's segment, as np.interp computes it."""
        _, _, _, xp, fp = self.quantile_map
        columns = len(self.quantiles)
        per_unit = 1 << int(np.clip(np.log2(LOOKUP_ENTRIES / (2 * columns)), 6, 16))
        # knot i is at or below the start of every bucket from ceil(xp[i] * per_unit) on
        firsts = np.ceil(xp * per_unit).astype(np.int64)
        buckets = 2 * columns * per_unit + 2
        last = np.cumsum(np.bincount(firsts, minlength=buckets)[:buckets]) - 1
        with np.errstate(divide="ignore", invalid="ignore"):  # tied knots: a slope never used
            slopes = np.append(np.diff(fp) / np.diff(xp), 0.0)  # the last knot's: 0
        return per_unit, last.astype(np.int32), slopes

    def moved(self, values: np.ndarray) -> np.ndarray:
        """Rows of the numeric columns (missing filled) → the quantile-normal columns'
        values moved onto the map's axis (`quantile_map`), one column per row, computed in
        place (no temporary array per operation)."""
        where, low, high, _, _ = self.quantile_map
        moved = values.T[where]
        np.clip(moved, low[:, None], high[:, None], out=moved)
        moved -= low[:, None]
        moved /= (high - low)[:, None]
        moved += 2 * np.arange(len(where))[:, None]
        return moved

    def normal_scores(self, values: np.ndarray) -> np.ndarray:
        """Rows of the numeric columns (missing filled) → the same with the quantile-normal
        columns mapped."""
        where, _, _, xp, fp = self.quantile_map
        moved = self.moved(values)
        x = moved.ravel()
        # a served call: one C call is faster (and a NaN, which no bucket holds, is np.interp's)
        if len(x) < LOOKUP_FROM or np.isnan(x).any():
            scores = np.interp(x, xp, fp)
        else:
            scores = self._interp_by_buckets(x)
        values[:, where] = scores.reshape(moved.shape).T
        return values

    def _interp_by_buckets(self, x: np.ndarray) -> np.ndarray:
        """np.interp(x, xp, fp) to the last bit (its knot: the last at or below x; its
        formula), 3.5x as fast on a block of the ingest benchmark (2.6 M values, 8 columns
        of 101 knots: 29-31 against 109-111 ms; its 1M buckets take 2 ms to build).
        np.interp's binary search was the cost: here a value's bucket names its knot, and
        only values whose bucket holds a knot (4% there) are searched."""
        _, _, _, xp, fp = self.quantile_map
        per_unit, last, slopes = self.bucket_knots
        scores = np.empty_like(x)
        for start in range(0, len(x), LOOKUP_FROM * 64):  # a chunk's temporaries stay small
            chunk = x[start : start + LOOKUP_FROM * 64]
            bucket = (chunk * per_unit).astype(np.int64)  # x >= 0: the bucket holding x
            knot = last[bucket].astype(np.int64)
            inside = np.flatnonzero(last[bucket + 1] != knot)
            knot[inside] = np.searchsorted(xp, chunk[inside], side="right") - 1
            # np.interp's formula. Its special cases give the same: on a knot, x - xp[knot]
            # is 0 (the last knot's slope is 0 here), and a knot is the last of any tied
            # with it, so its slope, to the next knot, is finite
            scores[start : start + len(chunk)] = slopes[knot] * (chunk - xp[knot]) + fp[knot]
        return scores

    @property
    def raw_columns(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    def code_sizes(self) -> dict[str, int]:
        """Each coded feature's number of codes (its vocabulary plus <rare>), for embeddings."""
        return {
            code_feature(column): len(vocab) + 1
            for column, vocab in self.categorical.items()
            if column not in self.onehot
        }

    @property
    def feature_names(self) -> list[str]:
        names = list(self.numeric)
        for column, vocab in self.categorical.items():
            if column in self.onehot:
                names += [f"{column}={v}" for v in vocab] + [f"{column}=<other>"]
            else:
                names.append(code_feature(column))
        return names

    def raw_numbers(self, column: str, values: np.ndarray) -> np.ndarray:
        """A numeric feature column back in the raw column's units: a quantile-normal
        column's scores through its map's inverse (exact between its end knots, the sample's
        extremes; beyond them the scores were clipped), any other column as it is. The data
        contract and drift are about the raw numbers, whatever the network was fed."""
        if column not in self.quantiles:
            return values
        knots, scores = self.quantiles[column]
        # the splits hold float32 scores: a value on a knot (a pixel's 0, an integer code)
        # comes back exactly only from the knot's score as float32 stored it
        return np.interp(values, np.float32(scores).astype(np.float64), knots)

    def numeric_values(self, frame) -> np.ndarray:
        """The numeric columns of a DataFrame as a new float64 array, NaN where a value is
        missing or is text that is not a number."""
        import pandas as pd

        # a numbers-only frame in training order (the usual served call) is used as it
        # is: selecting columns builds a new DataFrame, most of a one-row call's time
        exact = not self.categorical and frame.columns.equals(self.numeric_index)
        block = frame if exact else frame[self.numeric]
        try:  # the usual case: numbers (or numeric text) throughout, one conversion
            return block.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
        except (TypeError, ValueError):  # some text that is not a number: it counts as missing
            return np.column_stack(
                [
                    pd.to_numeric(block[c], errors="coerce").to_numpy(np.float64, na_value=np.nan)
                    for c in self.numeric
                ]
            )

    def transform(self, frame, quantile_map: bool = True, numbers=None) -> np.ndarray:
        """A DataFrame with the raw columns → float32 features (same order as feature_names).
        The serving hot path: the numeric columns convert in one call, and each categorical
        column writes its codes or one-hot block straight into the output (no per-row Python,
        no per-numeric-column pandas work, which made a 3,000-column row take seconds).
        `numbers`: the frame's `numeric_values`, where the caller has them already; they are
        filled and mapped in place."""
        missing = [c for c in self.raw_columns if c not in frame.columns]
        if missing:
            raise ValueError(
                f"input is missing column(s) {missing[:10]}; send the raw columns the model was trained on"
            )
        out = np.empty((len(frame), len(self.feature_names)), dtype=np.float32)
        width = len(self.numeric)
        if width:
            values = self.numeric_values(frame) if numbers is None else numbers
            fills = np.array([self.fills[c] for c in self.numeric], dtype=np.float64)
            np.copyto(values, fills, where=np.isnan(values))
            mapped = self.quantiles and quantile_map  # off: raw numbers, for monitoring
            out[:, :width] = self.normal_scores(values) if mapped else values
        rows = np.arange(len(frame))
        for column, vocab in self.categorical.items():
            codes = self.codes(column, frame[column])
            if column in self.onehot:
                out[:, width : width + len(vocab) + 1] = 0
                out[rows, width + codes] = 1
                width += len(vocab) + 1
            else:
                out[:, width] = codes
                width += 1
        return out

    def codes(self, column: str, values) -> np.ndarray:
        """A categorical column's vocabulary index per row; missing values take the
        <missing> category's where it has one, and anything unseen the last slot."""
        vocab, index = self.categorical[column], self.indexes[column]
        unseen = len(vocab)
        if arrow_text(values):
            # Arrow-backed text (what ingest reads back): looked up by Arrow, without
            # making a Python string of every value
            import pyarrow as pa
            import pyarrow.compute as pc

            text = pa.array(values.array)
            found = pc.index_in(text, value_set=pa.array(vocab, pa.string())).fill_null(unseen)
            missing = pa.scalar(index.get(MISSING, unseen), found.type)
            return pc.if_else(text.is_null(), missing, found).to_numpy().astype(np.int64)
        text = as_text(values).fillna(MISSING)
        return text.map(index).fillna(unseen).to_numpy(dtype=np.int64)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Encoder:
        return cls(**json.loads(Path(path).read_text()))


def code_feature(column: str) -> str:
    """The feature name of a coded categorical column (one integer code per value)."""
    return f"{column}#code"


def arrow_text(values) -> bool:
    """Whether a Series holds Arrow-backed text (what pandas' CSV parser and Parquet give):
    Arrow can count, look up and hash it without a Python string per value."""
    import pandas as pd

    return isinstance(values.dtype, pd.StringDtype) and values.dtype.storage == "pyarrow"


def value_counts(values, rows: np.ndarray | None = None) -> dict:
    """A column's values (those in `rows`, a mask, where given) with their counts, missing
    ones as MISSING. Arrow-backed text is counted by Arrow, without pandas' filtered copy:
    half the time on a 41 MB CSV block's text columns."""
    if not arrow_text(values):
        return dict((values if rows is None else values[rows]).fillna(MISSING).value_counts())
    import pyarrow as pa
    import pyarrow.compute as pc

    text = pa.array(values.array)
    counted = pc.value_counts(text if rows is None else text.filter(pa.array(rows)))
    counts: dict = {}
    for value, n in zip(*(counted.field(f).to_pylist() for f in ("values", "counts")), strict=True):
        key = MISSING if value is None else value
        counts[key] = counts.get(key, 0) + n
    return counts


def as_text(values):
    """Categorical values as strings, identical for every block of a table and at serving time.
    Whole numbers print without a decimal point: a CSV block where a code column has a gap
    reads 12 as 12.0, and both must be the category "12". Missing values stay None, except in
    Arrow-backed text, which is returned as it is (missing values NaN there: the rows hash
    the same, and Arrow counts, stores and looks it up without a Python string per value)."""
    import pandas as pd

    if arrow_text(values):
        return values
    present = values.notna()
    if isinstance(values.dtype, pd.StringDtype) or (
        values.dtype == object and pd.api.types.infer_dtype(values, skipna=True) == "string"
    ):  # already text (the usual case): no per-value work
        return values.astype(object).where(present, None)
    if pd.api.types.is_float_dtype(values):
        finite = present & np.isfinite(values.to_numpy(dtype=np.float64, na_value=np.nan))
        whole = finite & (values == np.floor(values.where(finite, 0)))
        text = pd.Series(None, index=values.index, dtype=object)
        text[whole] = values[whole].astype(np.int64).astype(str)
        text[present & ~whole] = values[present & ~whole].astype(str)
        return text.where(present, None)  # None, as every other branch: row hashes must agree
    if pd.api.types.is_integer_dtype(values) or pd.api.types.is_bool_dtype(values):
        return values.astype(str).astype(object).where(present, None)  # vectorised; e.g. zip codes
    return values.astype(object).where(present, None).map(lambda v: v if v is None else str(v))


QUANTILE_LEVELS = np.linspace(0, 1, 101)  # the map's knots: every percentile of the sample
EXTREME_LEVEL = 1e-3  # the end knots map to ±3.09, not to ±inf
HEAVY_TAIL_SKEW = 2.0  # numeric_transform auto: |skewness| from here on is quantile-mapped
OUTLIER_SHARE = 1e-3  # that skewness with values beyond the 0.1st / 99.9th percentiles clipped


def quantile_normal(values: np.ndarray) -> list[list[float]] | None:
    """[knots, scores]: the column's percentiles and the standard-normal quantiles of their
    levels. Percentiles that tie (a value many rows share, such as zero) become one knot at
    their mean level, so the knots rise strictly. None for a constant column."""
    from scipy.special import ndtri

    knots = np.quantile(values, QUANTILE_LEVELS)
    unique, inverse = np.unique(knots, return_inverse=True)
    if len(unique) < 2:
        return None
    levels = np.bincount(inverse, weights=QUANTILE_LEVELS) / np.bincount(inverse)
    scores = ndtri(np.clip(levels, EXTREME_LEVEL, 1 - EXTREME_LEVEL))
    return [unique.tolist(), scores.tolist()]


def heavy_tailed(values: np.ndarray) -> bool:
    """Skewed enough that standardising leaves most rows crowded near one value; a column of
    one or two values is a flag, for which a map changes nothing. Skewness of the values
    clipped to their 0.1st and 99.9th percentiles: a few wild values make a column skewed
    without its bulk being so (diamonds' `y`: widths of 4-11 mm, seven of 0 and two of 32
    and 59: skewness 2.4, 0.4 clipped), and quantile-mapping that column cost 2 points of test
    accuracy there (0.7649 → 0.7458 with `data.numeric_transform` standard vs auto, tuning off)."""
    if len(np.unique(values[:1000])) < 3:
        return False
    bulk = np.clip(values, *np.quantile(values, [OUTLIER_SHARE, 1 - OUTLIER_SHARE]))
    if bulk.std() == 0:
        return False
    z = (bulk - bulk.mean()) / bulk.std()
    return abs(float(np.mean(z**3))) >= HEAVY_TAIL_SKEW


def fit_quantiles(sample: dict[str, np.ndarray], mode: str) -> dict[str, list[list[float]]]:
    """The quantile-normal map of each column `mode` picks, from its training sample."""
    if mode not in ("auto", "quantile"):
        return {}
    chosen = {
        c: quantile_normal(v)
        for c, v in sample.items()
        if len(v) and (mode == "quantile" or heavy_tailed(v))
    }
    return {c: m for c, m in chosen.items() if m}


def fit_encoder(
    fills: dict[str, float],
    counts: dict[str, dict[str, int]],
    max_onehot: int,
    min_frequency: int = 1,
    numeric_transform: str = "standard",
    sample: dict[str, np.ndarray] | None = None,
) -> Encoder:
    """From statistics of the training rows only (no leakage from val/test): the median of
    each numeric column, a sample of its values and the value counts of each categorical one.
    A coded column keeps the values seen at least `min_frequency` times; the rest share the
    <rare> code (an embedding row trained on a handful of rows would be noise)."""
    # most frequent first; ties broken by the value itself, so the order is deterministic
    vocabularies = {
        column: sorted(c, key=lambda v, c=c: (-c[v], v)) for column, c in counts.items()
    }
    onehot = [c for c, vocab in vocabularies.items() if len(vocab) <= max_onehot]
    pooled = {}
    for column, vocab in vocabularies.items():
        if column not in onehot:
            kept = [v for v in vocab if counts[column][v] >= min_frequency]
            if len(kept) < len(vocab):
                pooled[column] = len(vocab) - len(kept)
                vocabularies[column] = kept
    return Encoder(
        numeric=list(fills),
        fills=fills,
        categorical=vocabularies,
        onehot=onehot,
        pooled=pooled,
        quantiles=fit_quantiles(sample or {}, numeric_transform),
        unscaled=numeric_transform == "none",
    )
