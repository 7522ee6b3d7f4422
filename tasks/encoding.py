"""Raw table columns → numeric features, fitted on the training split and reused when serving.

Numeric columns keep their values (missing ones take the training median); string columns
are categorical: one-hot up to `max_onehot` categories, else an integer code per category
(most frequent first), which the MLP turns into a learned embedding. Values with fewer than
`min_frequency` training rows share the last code, `<rare>`, with values unseen in training,
so scoring never fails on a value the training data lacked. The fitted state is plain JSON (no pickle) and
travels with the registered model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

MISSING = "<missing>"


@dataclass
class Encoder:
    numeric: list[str]
    fills: dict[str, float]
    categorical: dict[str, list[str]] = field(default_factory=dict)  # column → vocabulary
    onehot: list[str] = field(default_factory=list)  # categorical columns expanded one-hot
    pooled: dict[str, int] = field(default_factory=dict)  # column → rare values in <rare>

    @cached_property
    def numeric_index(self):
        """The numeric columns as a pandas Index: compared with an input's columns in C."""
        import pandas as pd

        return pd.Index(self.numeric)

    @cached_property
    def indexes(self) -> dict[str, dict[str, int]]:
        """Each categorical column's value → code, built once (not on every served call)."""
        return {c: {v: i for i, v in enumerate(vocab)} for c, vocab in self.categorical.items()}

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

    def transform(self, frame) -> np.ndarray:
        """A DataFrame with the raw columns → float32 features (same order as feature_names).
        The serving hot path: the numeric columns convert in one call, and each categorical
        column writes its codes or one-hot block straight into the output (no per-row Python,
        no per-numeric-column pandas work, which made a 3,000-column row take seconds)."""
        import pandas as pd

        missing = [c for c in self.raw_columns if c not in frame.columns]
        if missing:
            raise ValueError(
                f"input is missing column(s) {missing[:10]}; send the raw columns the model was trained on"
            )
        out = np.empty((len(frame), len(self.feature_names)), dtype=np.float32)
        width = len(self.numeric)
        if width:
            # a numbers-only frame in training order (the usual served call) is used as it
            # is: selecting columns builds a new DataFrame, most of a one-row call's time
            exact = not self.categorical and frame.columns.equals(self.numeric_index)
            block = frame if exact else frame[self.numeric]
            try:  # the usual case: numbers (or numeric text) throughout, one conversion
                values = block.to_numpy(dtype=np.float64, na_value=np.nan)
            except (TypeError, ValueError):  # some text that is not a number: it counts as missing
                values = np.column_stack(
                    [
                        pd.to_numeric(block[c], errors="coerce").to_numpy(
                            np.float64, na_value=np.nan
                        )
                        for c in self.numeric
                    ]
                )
            fills = np.array([self.fills[c] for c in self.numeric], dtype=np.float64)
            out[:, :width] = np.where(np.isnan(values), fills, values)
        rows = np.arange(len(frame))
        for column, vocab in self.categorical.items():
            index = self.indexes[column]
            text = as_text(frame[column]).fillna(MISSING)
            codes = (
                text.map(index).fillna(len(vocab)).to_numpy(dtype=np.int64)
            )  # unseen → last slot
            if column in self.onehot:
                out[:, width : width + len(vocab) + 1] = 0
                out[rows, width + codes] = 1
                width += len(vocab) + 1
            else:
                out[:, width] = codes
                width += 1
        return out

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Encoder:
        return cls(**json.loads(Path(path).read_text()))


def code_feature(column: str) -> str:
    """The feature name of a coded categorical column (one integer code per value)."""
    return f"{column}#code"


def as_text(values):
    """Categorical values as strings, identical for every block of a table and at serving time.
    Whole numbers print without a decimal point: a CSV block where a code column has a gap
    reads 12 as 12.0, and both must be the category "12". Missing values stay None."""
    import pandas as pd

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


def fit_encoder(
    fills: dict[str, float],
    counts: dict[str, dict[str, int]],
    max_onehot: int,
    min_frequency: int = 1,
) -> Encoder:
    """From statistics of the training rows only (no leakage from val/test): the median of
    each numeric column and the value counts of each categorical one. A coded column keeps
    the values seen at least `min_frequency` times; the rest share the <rare> code (an
    embedding row trained on a handful of rows would be noise)."""
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
        numeric=list(fills), fills=fills, categorical=vocabularies, onehot=onehot, pooled=pooled
    )
