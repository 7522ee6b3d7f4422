"""Column types decided once for the whole table, from every block's counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from conf.schema import DataConfig
from tasks.encoding import value_counts
from tasks.errors import DataError

NUMERIC_SHARE = 0.95  # a column whose values are at least this share numbers is numeric


@dataclass
class Schema:
    """The column types decided for the whole table; every block is cleaned with them."""

    label: str
    columns: list[str]  # feature columns, file order
    numeric: list[str]
    categorical: list[str]
    label_kind: str  # "int", "float" or "text"
    integers: list[str] = field(
        default_factory=list
    )  # numeric columns stored as integers everywhere
    warnings: list[str] = field(default_factory=list)

    def key(self) -> tuple:
        """What cleaning a block depends on: two schemas with one key clean rows alike."""
        columns, numeric, categorical = map(tuple, (self.columns, self.numeric, self.categorical))
        return (self.label, self.label_kind, columns, numeric, categorical)


def block_schema(block: dict, cfg: DataConfig) -> Schema | None:
    """The types one block's own counts give, as `decide_schema` would give them for a table
    of that block alone; None where they cannot decide (a column without values, say)."""
    try:
        return decide_schema([block], cfg)
    except DataError:
        return None


def to_numbers(values):
    """Text → float64 (NaN where a value is not a number), parsing each distinct value once:
    text columns repeat their values, and parsing is what costs."""
    import pandas as pd

    if pd.api.types.is_numeric_dtype(values):
        return values.astype(np.float64)
    codes, uniques = pd.factorize(values)
    parsed = pd.to_numeric(pd.Series(np.asarray(uniques, dtype=object)), errors="coerce").to_numpy(
        dtype=np.float64
    )
    return pd.Series(np.where(codes >= 0, parsed[codes], np.nan), index=values.index)


def count_numbers(values) -> int:
    """How many of a column's values are numbers (as `to_numbers` reads them), from its
    distinct values, each parsed once."""
    import pandas as pd

    counts = value_counts(values)
    distinct = pd.Series(list(counts), dtype=object)
    numbers = pd.to_numeric(distinct, errors="coerce").notna().to_numpy()
    return int(np.array(list(counts.values()), dtype=np.int64)[numbers].sum())


def decide_schema(blocks: list[dict], cfg: DataConfig) -> Schema:
    """Type each column from the counts of all blocks, with the rules of a careful reader:
    a declared type wins; a column that is at least 95% numbers is numeric (the rest of its
    values are bad rows); anything else is categorical."""
    where = cfg.source
    names = blocks[0]["names"]
    for block in blocks[1:]:
        if block["names"] != names:
            raise DataError(
                f"{block['where']}: columns {block['names'][:20]} differ from the first part's "
                f"{names[:20]}; every file of a table needs the same columns"
            )
    if cfg.label not in names:
        raise DataError(
            f"{where}: label column '{cfg.label}' not found; columns are {names[:20]}. "
            "Set data.label to the right column."
        )
    totals = {name: Counter() for name in names}
    typed = {name: True for name in names}
    integer = {name: True for name in names}
    for block in blocks:
        for name, stats in block["columns"].items():
            totals[name].update({k: int(stats[k]) for k in ("present", "numbers", "fractional")})
            typed[name] &= stats["typed"] or stats["present"] == 0
            integer[name] &= stats["integer"]
    features = [n for n in names if n != cfg.label]
    declared = cfg.columns or {}
    warnings = []
    if declared:
        unknown = [c for c in declared if c not in features]
        if unknown:
            raise DataError(
                f"{where}: declared column(s) {unknown[:10]} (data.columns) are not in the file; "
                f"its columns are {features[:20]}"
            )
        ignored = [c for c in features if c not in declared]
        if ignored:
            warnings.append(
                f"{len(ignored)} column(s) not declared in data.columns are ignored: {ignored[:10]}"
            )
        features = list(declared)
    if not features:
        raise DataError(f"{where}: no feature columns besides the label '{cfg.label}'")
    if sum(b["rows"] for b in blocks) == 0:
        raise DataError(f"{where}: the dataset is empty (0 rows)")
    numeric, categorical = [], []
    for name in features:
        t = totals[name]
        if t["present"] == 0:
            raise DataError(
                f"{where}: column '{name}' has no values (all missing); drop it or fill it"
            )
        kind = declared.get(name)
        if kind == "categorical":  # declared: e.g. zip codes, which look numeric
            categorical.append(name)
        elif kind == "numeric" or typed[name] or t["numbers"] >= NUMERIC_SHARE * t["present"]:
            numeric.append(name)
        else:
            categorical.append(name)
    label = totals[cfg.label]
    label_kind = "text" if not typed[cfg.label] else ("float" if label["fractional"] else "int")
    if label["present"] == 0:
        raise DataError(f"{where}: label column '{cfg.label}' has no values")
    integers = [n for n in numeric if integer[n]]
    return Schema(cfg.label, features, numeric, categorical, label_kind, integers, warnings)


# ---------------------------------------------------------------- cleaning and splitting one block
