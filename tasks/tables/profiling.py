"""The profile half of pass 1, run by the scan's tasks on the blocks they parse: each block cleaned,
hashed and summarised in a bounded result; and the plan the driver fixes from all of them:
classes, encoder, rows per block and split, checks."""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conf.schema import DataConfig
from tasks.encoding import MISSING, Encoder, fit_encoder, value_counts
from tasks.errors import DataError
from tasks.tables.blocks import keep_clean, number_rows, run_parts, scan_parts
from tasks.tables.cleaning import good_rows
from tasks.tables.schema import Schema, block_schema, decide_schema

FILL_SAMPLE_ROWS = 20_000  # hash-ranked training rows whose median fills missing numbers
FILL_SAMPLE_VALUES = 2_000_000  # ... fewer rows for very wide tables: bounded task results
EXAMPLE_ROWS = 5
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Profiler:
    """The profile half of pass 1, run by the scan task on each block it has just parsed
    (no scratch file of raw rows written and read back): the block is typed by its own
    counts, as if it were the whole table, and profiled with those types. Where the table's
    counts type a column otherwise, the driver has the block's task run again with the
    table's `schema`, and profiles `only` the blocks concerned."""

    cfg: DataConfig
    quarantine: bool  # keep the rejected rows (data.on_bad_rows: quarantine)
    schema: Schema | None = None
    only: frozenset[str] | None = None

    def wants(self, name: str) -> bool:
        return self.only is None or name in self.only

    def __call__(self, frame, block: dict) -> None:
        """Adds to `block` the key of the types it was cleaned with and the profile."""
        schema = self.schema or block_schema(block, self.cfg)
        if schema is None:
            return  # profiled again with the table's types
        quarantine = f"{block['path']}.quarantine.csv" if self.quarantine else None
        block["schema"] = schema.key()
        block["profile"] = profile_block(frame, block, schema, self.cfg, quarantine)


def profile_block(frame, block: dict, schema: Schema, cfg: DataConfig, quarantine: str | None):
    """Everything the driver needs from one block, in a result of bounded size; rows are
    counted from the block's first (its place in the table is known once all are counted).
    Keeps the cleaned rows as the block's scratch file."""
    features, labels, bad, reasons, u, split = good_rows(frame, schema, cfg, 0)
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
    result["first_missing"] = None
    if result["missing"]:  # the first in row order: argmax finds the first True
        row = int(np.argmax(missing.any(axis=1)))
        result["first_missing"] = (
            int(features.index[row]),
            features.columns[np.argmax(missing[row])],
        )
    del missing
    result["labels"] = [dict(labels[split == s].value_counts()) for s in range(3)]
    train = np.flatnonzero(split == 0)
    result["categories"] = {c: value_counts(features[c], split == 0) for c in schema.categorical}
    # bottom-k by hash: merging blocks' bottom-k gives the table's bottom-k, whatever the blocks
    k = min(FILL_SAMPLE_ROWS, max(100, FILL_SAMPLE_VALUES // max(len(schema.numeric), 1)))
    sample = lowest(u, train, k)
    result["fill_sample"] = (u[sample], features[schema.numeric].iloc[sample].to_numpy())
    result["distinct"] = {c: _two_values(features[c]) for c in schema.numeric}
    for c, counts in result["categories"].items():  # two values seen in training will do
        seen = [value for value in counts if value != MISSING][:2]
        result["distinct"][c] = seen if len(seen) == 2 else _two_values(features[c])
    example = {}
    for s in (0, 2):
        pick = lowest(u, np.flatnonzero(split == s), EXAMPLE_ROWS)
        example[s] = (u[pick].tolist(), features.iloc[pick].to_dict("records"))
    result["example"] = example
    if cfg.max_rows:
        result["lowest_u"] = [np.sort(u[split == s])[: cfg.max_rows] for s in range(3)]
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
    quarantine: list[tuple[str, int]]  # parts of rejected rows, each with its first row
    example: list[dict]
    warnings: list[str]
    sample: np.ndarray  # hash-ranked training rows' numeric columns (raw, NaN where missing)


@dataclass
class TableProfile:
    """The profile pass's results merged as they arrive: bounded, whatever the table's size."""

    max_rows: int | None
    per_block: dict[str, dict] = field(default_factory=dict)  # by block name, as they come
    placed: list[dict] = field(default_factory=list)  # the same in table order (`place`)
    labels: list[Counter] = field(default_factory=lambda: [Counter() for _ in SPLITS])
    categories: dict[str, Counter] = field(default_factory=dict)
    distinct: dict[str, set] = field(default_factory=dict)
    fill_u: np.ndarray = field(default_factory=lambda: np.empty(0))
    fill_x: np.ndarray | None = None
    examples: dict[int, list] = field(default_factory=lambda: {0: [], 2: []})
    lowest: list[np.ndarray] = field(default_factory=lambda: [np.empty(0) for _ in SPLITS])

    @classmethod
    def of(cls, schema_key: tuple, max_rows: int | None) -> TableProfile:
        """An empty profile for blocks cleaned with the types of `Schema.key()` (whose last
        item is the categorical columns)."""
        return cls(max_rows, categories={c: Counter() for c in schema_key[-1]})

    def add(self, name: str, r: dict) -> None:
        keep = ("rows", "quarantine", "bad", "missing", "lowest_u", "first_bad", "first_missing")
        self.per_block[name] = {k: r.get(k) for k in keep}
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

    def place(self, blocks: list[dict]) -> None:
        """Put the blocks' results in table order, their row numbers counted from the table's
        first row; every block must have been added."""
        self.placed = [{**self.per_block[b["name"]], "first_row": b["first_row"]} for b in blocks]

    def first(self, what: str) -> list[tuple[int, str]]:
        """Per block with any, its first bad row or missing value ("first_bad" or
        "first_missing"), as (the table's row number, reason or column)."""
        return [(b["first_row"] + b[what][0], b[what][1]) for b in self.placed if b[what]]

    def total(self, what: str) -> int:
        return sum(b[what] for b in self.placed)

    def check(self, cfg: DataConfig, schema: Schema) -> tuple[list[Any], list[str]]:
        """The table's classes and warnings, or the DataError that says what is wrong."""
        where = cfg.source
        if (bad := self.first("first_bad")) and cfg.on_bad_rows == "error":
            row, reason = min(bad)
            raise DataError(
                f"{where}: {self.total('bad')} bad row(s), first at row {row}: {reason}. Fix the "
                "data, or set data.on_bad_rows to drop or quarantine to continue without them"
            )
        if (missing := self.first("first_missing")) and cfg.missing == "error":
            row, column = min(missing)
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
            return [b["rows"] for b in self.placed]
        return [
            [int((b["lowest_u"][s] <= cutoffs[s]).sum()) for s in range(3)] for b in self.placed
        ]


def scan_and_profile(
    cfg: DataConfig, fmt: str, scratch: str, client, block_bytes: int, keep_rejected: bool
) -> tuple[list[dict], Schema, TableProfile, int]:
    """Pass 1 (scan and profile) on the cluster, in one task per part of the source: returns the
    blocks in table order, the table's schema, its profile and how many blocks were
    profiled a second time because the table's types overruled their own. Results are
    merged as tasks finish, so the driver holds a few at a time, by the types each block
    was cleaned with (nearly always one set), so that a block cleaned otherwise than the
    table has its result dropped, not merged."""
    profiles: dict[tuple, TableProfile] = {}

    def take(block: dict) -> None:
        if (result := block.pop("profile", None)) is not None:
            key = block["schema"]
            profiles.setdefault(key, TableProfile.of(key, cfg.max_rows)).add(block["name"], result)

    parts = scan_parts(cfg, fmt, scratch, block_bytes)
    blocks = number_rows(
        run_parts(parts, range(len(parts)), client, Profiler(cfg, keep_rejected), take)
    )
    schema = decide_schema(blocks, cfg)
    key = schema.key()
    again = [b for b in blocks if b.get("schema") != key]
    if again:
        only = frozenset(b["name"] for b in again)
        which = sorted({b["part"] for b in again})
        run_parts(parts, which, client, Profiler(cfg, keep_rejected, schema, only), take)
    profile = profiles.get(key) or TableProfile.of(key, cfg.max_rows)
    profile.place(blocks)
    return blocks, schema, profile, len(again)


def plan(schema: Schema, cfg: DataConfig, profile: TableProfile) -> Plan:
    """Check the table, and fix what the write pass needs."""
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
    quarantine = [(b["quarantine"], b["first_row"]) for b in profile.placed if b["quarantine"]]
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
