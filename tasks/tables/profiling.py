"""Pass 2 (profile): each block summarised in a bounded result, and the plan the driver
fixes from all of them: classes, encoder, rows per block and split, checks."""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conf.schema import DataConfig
from tasks.cluster import checked, data_task
from tasks.encoding import MISSING, Encoder, fit_encoder
from tasks.errors import DataError
from tasks.tables.blocks import keep_clean, read_block
from tasks.tables.cleaning import good_rows
from tasks.tables.schema import Schema

FILL_SAMPLE_ROWS = 20_000  # hash-ranked training rows whose median fills missing numbers
FILL_SAMPLE_VALUES = 2_000_000  # ... fewer rows for very wide tables: bounded task results
EXAMPLE_ROWS = 5
SPLITS = ("train", "val", "test")


@data_task
def profile_block(block: dict, schema: Schema, cfg: DataConfig, quarantine: str | None) -> dict:
    """Everything the driver needs from one block, in a result of bounded size."""
    frame = read_block(block)
    features, labels, bad, reasons, u, split = good_rows(frame, schema, cfg, block["first_row"])
    result: dict[str, Any] = {
        "rows": [int((split == s).sum()) for s in range(3)],
        "bad": int(bad.sum()),
        "first_bad": None,
        "quarantine": None,
    }
    if reasons:
        first = min(reasons)
        result["first_bad"] = (first, reasons[first])
        if quarantine:
            rejected = frame[bad]
            rejected.insert(0, "_row", sorted(reasons))
            rejected.assign(_reason=[reasons[row] for row in sorted(reasons)]).to_csv(
                quarantine, index=False
            )
            result["quarantine"] = quarantine
    del frame
    missing = features.isna().to_numpy()
    result["missing"] = int(missing.sum())
    if result["missing"]:
        rows, cols = np.nonzero(missing)
        result["first_missing"] = (int(features.index[rows[0]]), features.columns[cols[0]])
    del missing
    result["labels"] = [dict(labels[split == s].value_counts()) for s in range(3)]
    train = np.flatnonzero(split == 0)
    result["categories"] = {
        c: dict(features[c].iloc[train].fillna(MISSING).value_counts()) for c in schema.categorical
    }
    # bottom-k by hash: merging blocks' bottom-k gives the table's bottom-k, whatever the blocks
    k = min(FILL_SAMPLE_ROWS, max(100, FILL_SAMPLE_VALUES // max(len(schema.numeric), 1)))
    sample = lowest(u, train, k)
    result["fill_sample"] = (u[sample], features[schema.numeric].iloc[sample].to_numpy())
    result["distinct"] = {c: _two_values(features[c]) for c in schema.columns}
    example = {}
    for s in (0, 2):
        pick = lowest(u, np.flatnonzero(split == s), EXAMPLE_ROWS)
        example[s] = (u[pick].tolist(), features.iloc[pick].to_dict("records"))
    result["example"] = example
    if cfg.max_rows:
        result["lowest_u"] = [np.sort(u[split == s])[: cfg.max_rows] for s in range(3)]
    # last, as it deletes the raw block: a task Dask starts again (its worker died) finds it
    keep_clean(block, features, labels, u)
    return result


def lowest(u: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """The `k` of `rows` with the lowest hashes `u`, lowest first, by a partial sort. Rows
    tied at the k-th hash are duplicates (the hash is of the row's content): whichever is
    taken, the values are the same."""
    if len(rows) > k:
        rows = np.sort(rows[np.argpartition(u[rows], k - 1)[:k]])
    return rows[np.argsort(u[rows], kind="stable")]


def _two_values(values) -> list:
    """Up to two distinct values (enough to tell a constant column), without hashing them all."""
    if values.dtype == np.float64:  # a numeric column: its extremes, without a filtered copy
        array = values.to_numpy()
        if np.isnan(array).all():
            return []
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        return [low] if low == high else [low, high]
    present = values.dropna()
    if present.empty:
        return []
    first = present.iloc[0]
    other = present[present != first]
    return [first, *other.iloc[:1].tolist()]


# Fewer distinct labels than this is a classification, however few the rows.
CONTINUOUS_LABEL_MIN = 20


@dataclass
class Plan:
    """What the driver fixed after the profile pass, for the write pass."""

    classes: list[Any]
    encoder: Encoder
    counts: list[list[int]]  # per block, rows per split (after max_rows)
    cutoffs: list[float]  # per split: rows with a hash at or below it are kept (max_rows)
    rejected: int
    missing: int
    quarantine: list[str]
    example: list[dict]
    warnings: list[str]
    sample: np.ndarray  # hash-ranked training rows' numeric columns (raw, NaN where missing)


@dataclass
class TableProfile:
    """The profile pass's results merged as they arrive: bounded, whatever the table's size."""

    max_rows: int | None
    per_block: dict[int, dict] = field(default_factory=dict)
    labels: list[Counter] = field(default_factory=lambda: [Counter() for _ in SPLITS])
    categories: dict[str, Counter] = field(default_factory=dict)
    distinct: dict[str, set] = field(default_factory=dict)
    fill_u: np.ndarray = field(default_factory=lambda: np.empty(0))
    fill_x: np.ndarray | None = None
    examples: dict[int, list] = field(default_factory=lambda: {0: [], 2: []})
    lowest: list[np.ndarray] = field(default_factory=lambda: [np.empty(0) for _ in SPLITS])
    bad: list[tuple[int, str]] = field(default_factory=list)
    missing: list[tuple[int, str]] = field(default_factory=list)

    def add(self, i: int, r: dict) -> None:
        keep = ("rows", "quarantine", "bad", "missing", "lowest_u")
        self.per_block[i] = {k: r.get(k) for k in keep}
        if r["first_bad"]:
            self.bad.append(r["first_bad"])
        if r["missing"]:
            self.missing.append(r["first_missing"])
        for total, counts in zip(self.labels, r["labels"], strict=True):
            total.update(counts)
        for c, counts in r["categories"].items():
            self.categories.setdefault(c, Counter()).update(counts)
        for c, values in r["distinct"].items():
            seen = self.distinct.setdefault(c, set())
            if len(seen) < 2:
                seen.update(values)
        self._add_fill_sample(*r["fill_sample"])
        for s in self.examples:  # the table's lowest-hash rows, whatever the blocks
            pairs = self.examples[s] + list(zip(*r["example"][s], strict=True))
            self.examples[s] = heapq.nsmallest(EXAMPLE_ROWS, pairs, key=lambda pair: pair[0])
        if self.max_rows:
            self.lowest = [
                np.sort(np.concatenate([a, b]))[: self.max_rows]
                for a, b in zip(self.lowest, r["lowest_u"], strict=True)
            ]

    def _add_fill_sample(self, u: np.ndarray, x: np.ndarray) -> None:
        """Keep the training rows with the lowest hashes: the same sample for any blocking."""
        fill_x = x if self.fill_x is None else np.concatenate([self.fill_x, x])
        fill_u = np.concatenate([self.fill_u, u])
        keep = np.argsort(fill_u, kind="stable")[:FILL_SAMPLE_ROWS]
        self.fill_u, self.fill_x = fill_u[keep], fill_x[keep]

    def total(self, what: str) -> int:
        return sum(b[what] for b in self.per_block.values())

    def check(self, cfg: DataConfig, schema: Schema) -> tuple[list[Any], list[str]]:
        """The table's classes and warnings, or the DataError that says what is wrong."""
        where = cfg.source
        if self.bad and cfg.on_bad_rows == "error":
            row, reason = min(self.bad)
            raise DataError(
                f"{where}: {self.total('bad')} bad row(s), first at row {row}: {reason}. Fix the "
                "data, or set data.on_bad_rows to drop or quarantine to continue without them"
            )
        if self.missing and cfg.missing == "error":
            row, column = min(self.missing)
            raise DataError(
                f"{where}: {self.total('missing')} missing value(s), first in column '{column}' at "
                f"row {row}; fill or drop them first, or set data.missing: fill"
            )
        everything = self.labels[0] + self.labels[1] + self.labels[2]
        rows = sum(everything.values())
        if len(everything) > max(CONTINUOUS_LABEL_MIN, rows / 2):  # most rows, a value of their own
            raise DataError(
                f"{where}: the label column '{cfg.label}' looks continuous ({len(everything):,} "
                f"distinct values in {rows:,} rows); accelflow classifies. Bin it into classes "
                "first, or set data.label to a column of classes"
            )
        if len(everything) < 2:
            raise DataError(
                f"{where}: the label has a single class "
                f"({next(iter(everything), None)!r}); nothing to learn"
            )
        classes = sorted(self.labels[0])
        for s, name in ((1, "val"), (2, "test")):
            unseen = set(self.labels[s]) - set(classes)
            if unseen:
                raise DataError(
                    f"{where}: the {name} split has label(s) {sorted(unseen)[:5]} never "
                    "seen in training; rare classes need more rows"
                )
        constant = [
            f"column '{c}' is constant ({next(iter(v))!r}): it carries no signal"
            for c in schema.columns
            if len(v := self.distinct.get(c, set())) == 1
        ]
        return classes, [*schema.warnings, *constant]

    def fills(self, schema: Schema) -> dict[str, float]:
        """Each numeric column's median over the hash-ranked sample of training rows."""
        fills = {}
        for j, c in enumerate(schema.numeric):
            values = self.fill_x[:, j] if self.fill_x is not None else np.empty(0)
            values = values[~np.isnan(values)]
            fills[c] = float(np.median(values)) if len(values) else 0.0
        return fills

    def sample(self, schema: Schema) -> dict[str, np.ndarray]:
        """Each numeric column's present values in the same sample (its quantiles' sketch)."""
        if self.fill_x is None:
            return {}
        columns = {c: self.fill_x[:, j] for j, c in enumerate(schema.numeric)}
        return {c: v[~np.isnan(v)] for c, v in columns.items()}

    def cutoffs(self) -> list[float]:
        """Per split, the highest row hash kept under data.max_rows (1.0: keep all)."""
        return [
            float(low[-1]) if self.max_rows and len(low) >= self.max_rows else 1.0
            for low in self.lowest
        ]

    def counts(self, cutoffs: list[float]) -> list[list[int]]:
        """Per block, the rows of each split it writes."""
        if not self.max_rows:
            return [self.per_block[i]["rows"] for i in range(len(self.per_block))]
        return [
            [int((self.per_block[i]["lowest_u"][s] <= cutoffs[s]).sum()) for s in range(3)]
            for i in range(len(self.per_block))
        ]


def profile_blocks(
    blocks: list[dict], schema: Schema, cfg: DataConfig, scratch: str | None, client
):
    """Pass 2 on the cluster: (block index, result) as each block's task finishes, so the
    driver holds a few results at a time."""
    from dask.distributed import as_completed

    futures = {
        client.submit(
            profile_block,
            b,
            schema,
            cfg,
            f"{scratch}/quarantine-{i:06d}.csv" if scratch else None,
            pure=False,
        ): i
        for i, b in enumerate(blocks)
    }
    for future in as_completed(futures):
        result = checked(future.result())
        future.release()
        yield futures[future], result


def plan(blocks: list[dict], schema: Schema, cfg: DataConfig, scratch: str | None, client) -> Plan:
    """Profile every block, check the table, and fix what the write pass needs."""
    profile = TableProfile(cfg.max_rows, categories={c: Counter() for c in schema.categorical})
    for i, result in profile_blocks(blocks, schema, cfg, scratch, client):
        profile.add(i, result)
    classes, warnings = profile.check(cfg, schema)
    categories = {c: dict(profile.categories[c]) for c in schema.categorical}
    encoder = fit_encoder(
        profile.fills(schema),
        categories,
        cfg.max_onehot,
        cfg.min_frequency,
        cfg.numeric_transform,
        profile.sample(schema),
    )
    cutoffs = profile.cutoffs()
    quarantine = [b["quarantine"] for _, b in sorted(profile.per_block.items()) if b["quarantine"]]
    example = [row for _, row in profile.examples[2] or profile.examples[0]]
    return Plan(
        classes,
        encoder,
        profile.counts(cutoffs),
        cutoffs,
        profile.total("bad"),
        profile.total("missing"),
        quarantine,
        example,
        warnings,
        profile.fill_x if profile.fill_x is not None else np.empty((0, len(schema.numeric))),
    )
