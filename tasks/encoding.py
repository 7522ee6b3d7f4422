"""Raw table columns → numeric features, fitted on the training split and reused when serving.

Numeric columns keep their values (missing ones take the training median); string columns
are categorical: one-hot up to `max_onehot` categories, else an integer code per category
(most frequent first). Missing and unseen categories have their own slot, so scoring never
fails on a value the training data lacked. The fitted state is plain JSON (no pickle) and
travels with the registered model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

MISSING = "<missing>"


@dataclass
class Encoder:
    numeric: list[str]
    fills: dict[str, float]
    categorical: dict[str, list[str]] = field(default_factory=dict)  # column → vocabulary
    onehot: list[str] = field(default_factory=list)  # categorical columns expanded one-hot

    @property
    def raw_columns(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    @property
    def feature_names(self) -> list[str]:
        names = list(self.numeric)
        for column, vocab in self.categorical.items():
            if column in self.onehot:
                names += [f"{column}={v}" for v in vocab] + [f"{column}=<other>"]
            else:
                names.append(f"{column}#code")
        return names

    def transform(self, frame) -> np.ndarray:
        """A DataFrame with the raw columns → float32 features (same order as feature_names)."""
        import pandas as pd

        missing = [c for c in self.raw_columns if c not in frame.columns]
        if missing:
            raise ValueError(f"input is missing column(s) {missing[:10]}; send the raw columns the model was trained on")
        parts = []
        for column in self.numeric:
            values = pd.to_numeric(frame[column], errors="coerce").astype("float64")
            parts.append(values.fillna(self.fills[column]).to_numpy(dtype=np.float32)[:, None])
        for column, vocab in self.categorical.items():
            index = {v: i for i, v in enumerate(vocab)}
            raw = frame[column].astype("object").where(frame[column].notna(), MISSING)
            codes = np.array([index.get(str(v), len(vocab)) for v in raw], dtype=np.int64)  # unseen → last slot
            if column in self.onehot:
                parts.append(np.eye(len(vocab) + 1, dtype=np.float32)[codes])
            else:
                parts.append(codes.astype(np.float32)[:, None])
        return np.hstack(parts) if parts else np.empty((len(frame), 0), dtype=np.float32)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Encoder:
        return cls(**json.loads(Path(path).read_text()))


def fit_encoder(train, numeric: list[str], categorical: list[str], max_onehot: int) -> Encoder:
    """Medians and vocabularies from the training rows only (no leakage from val/test)."""
    import pandas as pd

    fills = {}
    for column in numeric:
        median = pd.to_numeric(train[column], errors="coerce").median()
        fills[column] = float(median) if pd.notna(median) else 0.0
    vocabularies = {}
    for column in categorical:
        values = train[column].astype("object").where(train[column].notna(), MISSING).map(str)
        counts = values.value_counts(sort=False)
        # most frequent first; ties broken by the value itself, so the order is deterministic
        vocabularies[column] = sorted(counts.index, key=lambda v: (-counts[v], v))
    onehot = [c for c, vocab in vocabularies.items() if len(vocab) <= max_onehot]
    return Encoder(numeric=numeric, fills=fills, categorical=vocabularies, onehot=onehot)

