"""A block's rows typed by the schema, its bad rows with their reasons, and each good
row's split: the same for every block, so nothing depends on where blocks begin."""

from __future__ import annotations

import numpy as np

from conf.schema import DataConfig
from tasks.encoding import as_text
from tasks.splitting import assign_splits, row_uniforms
from tasks.tables.schema import Schema, to_numbers


def clean_block(frame, schema: Schema, first_row: int = 0):
    """Raw block → (typed features, labels, bad, reasons): the good rows' numeric columns
    as float64 and categorical ones as text, indexed by the table's row numbers (counted
    from 0 after the header); `bad` marks the block's rows left out and `reasons` says why,
    by row number (the first reason found)."""
    import pandas as pd

    bad = np.zeros(len(frame), dtype=bool)
    reasons: dict[int, str] = {}

    def flag(mask, reason):
        fresh = np.flatnonzero(np.asarray(mask) & ~bad)
        bad[fresh] = True
        reasons.update({first_row + int(i): reason(int(i)) for i in fresh})

    raw_label = frame[schema.label]
    flag(raw_label.isna(), lambda i: "label missing")
    if schema.label_kind == "text":
        labels = as_text(raw_label)
    else:
        labels = to_numbers(raw_label)
        flag(
            raw_label.notna() & labels.isna(),
            lambda i: f"label {raw_label.iloc[i]!r} is not a number",
        )
        if schema.label_kind == "int":
            labels = labels.fillna(0).astype(np.int64)
    features = {}
    for name in schema.columns:
        values = frame[name]
        if name in schema.categorical:
            features[name] = as_text(values).array  # Arrow-backed text stays so
            continue
        parsed = to_numbers(values)
        if not pd.api.types.is_numeric_dtype(values):  # the parser's numbers are all numbers
            flag(
                values.notna() & parsed.isna(),
                lambda i, v=values, c=name: f"column '{c}': {v.iloc[i]!r} is not a number",
            )
        flag(np.isinf(parsed.to_numpy()), lambda i, c=name: f"column '{c}': infinite value")
        features[name] = parsed.to_numpy()
    index = pd.RangeIndex(first_row, first_row + len(frame))
    labels = labels.set_axis(index)
    if bad.any():  # the bad rows left out column by column, before the frame is built
        good = ~bad
        features = {name: values[good] for name, values in features.items()}
        index, labels = index[good], labels[good]
    # built from arrays it may keep (they are the block's own), not Series: pandas then
    # neither aligns 20-odd indexes nor copies every column (and no bad row costs a copy
    # of the whole frame)
    features = pd.DataFrame(features, index=index, copy=False)
    return features, labels, bad, reasons


def good_rows(frame, schema: Schema, cfg: DataConfig, first_row: int):
    features, labels, bad, reasons = clean_block(frame, schema, first_row)
    u = row_uniforms(features, cfg.seed)
    return features, labels, bad, reasons, u, assign_splits(u, cfg.val_fraction, cfg.test_fraction)
