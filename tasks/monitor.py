"""The data contract and drift: what the champion was trained on, and how today's data differ.

Ingest writes `contract.json` beside its splits: the raw columns and their kinds, for each
numeric column its range, quantiles and the share of training rows in each of its decile
bins, for each categorical column its categories with their shares, the label set with its
shares, and the row count; for images, their shape and the same deciles of two statistics of
each image (its brightness and contrast), since no single pixel column means much.
Registration logs it with the model, so the champion carries the contract of the data it
learned from.

`compare` checks today's ingested data against the champion's contract: missing or new
columns, type changes, the share of unseen categories and of numbers out of range, new or
vanished labels (each finding one line naming the column), and measures drift as the
population stability index (PSI) on the contract's own bins, per column (per image
statistic) and for the label. Everything reads the training split a chunk at a time
(memory-mapped), never whole; a table's contract is even counted by ingest's write pass,
from the rows it encodes (a table's numbers are binned as the encoder sees them: missing
values filled, a quantile-mapped column clipped to its map's range).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from conf.schema import MonitorConfig
from tasks.encoding import Encoder
from tasks.readers import npy_chunks, npy_header, npy_sample
from tasks.store import Manifest

BINS = 10  # deciles: enough for a stable PSI on a few thousand rows
SAMPLE = 20_000  # images, evenly spaced, that fix an image statistic's decile edges
OTHER = "<other>"  # a category the encoder pooled or never saw
LABEL = "<label>"  # the label's row in the drift table
IMAGE = "<image>"  # an image's shape, in findings


def _layout(encoder: Encoder) -> dict[str, tuple[int, int]]:
    """Each raw column's span of encoded feature columns, as `Encoder.transform` lays them out."""
    spans, at = {}, 0
    for column in encoder.numeric:
        spans[column], at = (at, at + 1), at + 1
    for column, vocab in encoder.categorical.items():
        width = len(vocab) + 1 if column in encoder.onehot else 1
        spans[column], at = (at, at + width), at + width
    return spans


def _category_bins(block: np.ndarray, column: str, encoder: Encoder) -> np.ndarray:
    """Rows per vocabulary entry (the last: pooled or unseen) from the encoded span. A
    one-hot span holds a single 1 per row: its column sums are the counts, in less time
    than an argmax per row (`benchmarks/ingest_blocks.py`)."""
    if column in encoder.onehot:
        return block.sum(axis=0, dtype=np.int64)
    return np.bincount(block[:, 0].astype(np.int64), minlength=len(encoder.categorical[column]) + 1)


def _shares(counts: np.ndarray) -> list[float]:
    total = counts.sum()
    return (counts / total).tolist() if total else [0.0] * len(counts)


def build_contract(
    manifest: Manifest,
    encoder_path: str | None,
    columns: dict[str, dict[str, Any]] | None = None,
    counts: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The contract of an ingested training split (see the module docstring). A table's
    numeric `columns` (`numeric_specs`) and the training rows' `counts` on them
    (`count_rows`) come from ingest's write pass, which has the rows at hand."""
    train = manifest["splits"]["train"]
    rows = int(train["rows"])
    label_counts = np.zeros(len(manifest["classes"]), dtype=np.int64)
    for labels in npy_chunks(train["y"]["path"]):
        label_counts += np.bincount(labels, minlength=len(label_counts))
    contract: dict[str, Any] = {
        "rows": rows,
        "labels": {
            str(c): s for c, s in zip(manifest["classes"], _shares(label_counts), strict=True)
        },
        "columns": {},
    }
    if encoder_path is None:  # images or arrays: the shape, and an image's pixel statistics
        contract["image_shape"] = manifest.get("image_shape")
        if contract["image_shape"]:
            contract["images"] = _image_contract(train["X"]["path"], rows)
        return contract
    if columns is None or counts is None:
        raise ValueError("a table's contract needs its numeric columns' specs and row counts")
    encoder = Encoder.load(Path(encoder_path))
    contract["columns"] = {c: dict(columns[c]) for c in encoder.numeric}
    for column, vocab in encoder.categorical.items():
        contract["columns"][column] = {"kind": "categorical", "vocabulary": list(vocab)}
    for column, spec in contract["columns"].items():
        if spec["kind"] == "numeric":
            spec["min"], spec["max"] = counts[column]["range"]
            spec["shares"] = _shares(counts[column]["bins"])
        else:
            names = [*spec.pop("vocabulary"), OTHER]
            spec["categories"] = dict(zip(names, _shares(counts[column]["bins"]), strict=True))
    return contract


def encoder_view(encoder: Encoder, column: str, values: np.ndarray) -> np.ndarray:
    """A numeric column's raw values as the encoder sees them: missing ones filled, and a
    quantile-normal column's clipped to its map's end knots (beyond them the scores are
    clipped). What the encoded rows say in raw units, without mapping them back."""
    values = np.where(np.isnan(values), encoder.fills[column], values)
    if column in encoder.quantiles:
        knots = encoder.quantiles[column][0]
        values = np.clip(values, knots[0], knots[-1])
    return values


def numeric_specs(encoder: Encoder, sample: np.ndarray) -> dict[str, dict[str, Any]]:
    """Each numeric column's decile edges and quantiles, from a sample of training rows
    (raw, rows × `encoder.numeric`, NaN where missing) as the encoder sees them."""
    return {
        column: _deciles(encoder_view(encoder, column, sample[:, j].astype(np.float64)))
        for j, column in enumerate(encoder.numeric)
    }


def count_rows(
    encoder: Encoder,
    columns: dict[str, dict[str, Any]],
    numbers: np.ndarray,
    encoded: np.ndarray,
) -> dict[str, dict[str, Any]]:
    """Training rows on the contract's bins: each numeric column of `numbers` (raw, rows ×
    `encoder.numeric`, NaN where missing) as the encoder sees it, on `columns`' edges (with
    its range); each categorical column's vocabulary entries (and the pooled slot) read
    from its span of `encoded`. Sums over blocks with `merge_counts`."""
    out: dict[str, dict[str, Any]] = {}
    for j, column in enumerate(encoder.numeric):
        out[column] = _numeric_counter(columns[column])
        _count(out[column], columns[column], encoder_view(encoder, column, numbers[:, j]))
    spans = _layout(encoder)
    for column in encoder.categorical:
        lo, hi = spans[column]
        out[column] = {"bins": _category_bins(encoded[:, lo:hi], column, encoder)}
    return out


def _deciles(values: np.ndarray) -> dict[str, Any]:
    """A numeric column's (or image statistic's) decile edges, its bins, and quantiles, from
    a sample of its values."""
    edges = np.unique(np.quantile(values, np.linspace(0, 1, BINS + 1)[1:-1])) if len(values) else []
    return {
        "kind": "numeric",
        "edges": [float(e) for e in edges],
        "quantiles": {
            f"p{q:02d}": float(np.quantile(values, q / 100)) if len(values) else None
            for q in (1, 25, 50, 75, 99)
        },
    }


# An image has hundreds of pixels, none of which means much alone: drift is read from what
# each image's pixels say together, its brightness (mean) and its contrast (spread). A
# re-exposed camera, another scanner or a normalised feed moves these whatever the labels.
IMAGE_STATISTICS = ("<brightness>", "<contrast>")


def image_statistics(block: np.ndarray) -> dict[str, np.ndarray]:
    """Per image of `block` (rows first, any shape after): its pixels' mean and spread."""
    pixels = block.reshape(len(block), -1).astype(np.float32)
    return dict(zip(IMAGE_STATISTICS, (pixels.mean(axis=1), pixels.std(axis=1)), strict=True))


def _image_contract(path: str, rows: int) -> dict[str, dict[str, Any]]:
    """Each image statistic's deciles, range and shares, from a sample then one pass."""
    sample = image_statistics(npy_sample(path, rows, SAMPLE))
    specs = {name: _deciles(values) for name, values in sample.items()}
    for name, acc in image_counts(path, specs).items():
        specs[name].update(
            {"min": acc["range"][0], "max": acc["range"][1], "shares": _shares(acc["bins"])}
        )
    return specs


def image_counts(path: str, specs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One pass over an image split on disk: per statistic, images per bin of `specs`' edges,
    the range seen, and the images outside `specs`' min and max where they have them."""
    out = {name: _numeric_counter(spec) for name, spec in specs.items()}
    for block in npy_chunks(path):
        for name, values in image_statistics(block).items():
            _count(out[name], specs[name], values.astype(np.float64))
    return out


def _numeric_counter(spec: dict[str, Any]) -> dict[str, Any]:
    """An empty count of a numeric column on `spec`'s bins (one below the first edge and one
    above the last), its range and its values outside `spec`'s min and max."""
    return {
        "bins": np.zeros(len(spec["edges"]) + 1, np.int64),
        "outside": 0,
        "range": [math.inf, -math.inf],
    }


def _own_counts(spec: dict[str, Any], rows: int) -> dict[str, Any]:
    """The count `_count` makes of the very rows `spec` was built from: its shares as rows,
    its own range, none outside it."""
    bins = np.rint(np.asarray(spec["shares"]) * rows).astype(np.int64)
    return {"bins": bins, "outside": 0, "range": [spec["min"], spec["max"]]}


def _count(acc: dict[str, Any], spec: dict[str, Any], values: np.ndarray) -> None:
    """Add `values` to a numeric column's bins, range and out-of-range count."""
    # the values at or above each edge, counted edge by edge: a value's bin is the number of
    # edges at or below it (NaN after the last, as a sorted search puts it). On a few edges
    # this is ten times as fast as a sorted search and a bincount, and the data contract
    # counts every training row
    above = np.array([np.count_nonzero(values >= edge) for edge in spec["edges"]], np.int64)
    above += np.count_nonzero(np.isnan(values))
    acc["bins"] -= np.diff(above, prepend=len(values), append=0)
    if len(values):
        acc["range"] = [
            min(acc["range"][0], float(values.min())),
            max(acc["range"][1], float(values.max())),
        ]
    if "min" in spec:
        acc["outside"] += int(((values < spec["min"]) | (values > spec["max"])).sum())


def _bin_counts(
    path: str, contract: dict[str, Any], spans: dict[str, tuple[int, int]], encoder: Encoder
) -> dict[str, dict[str, Any]]:
    """`count_bins` over an encoded split on disk (today's training split on the champion's
    bins), a chunk at a time, its rows cut into one range per core: numpy's binning runs
    outside the GIL, so threads count side by side."""
    from concurrent.futures import ThreadPoolExecutor

    rows, threads = npy_header(path)[0][0], os.cpu_count() or 1
    cuts = np.linspace(0, rows, threads + 1).astype(np.int64).tolist()

    def count(begin: int, end: int) -> dict[str, dict[str, Any]]:
        return count_bins(npy_chunks(path, begin=begin, end=end), contract, spans, encoder)

    with ThreadPoolExecutor(threads) as pool:
        return merge_counts(list(pool.map(count, cuts[:-1], cuts[1:])))


def count_bins(
    blocks,
    contract: dict[str, Any],
    spans: dict[str, tuple[int, int]],
    encoder: Encoder,
    mapped: bool = True,
) -> dict[str, dict[str, Any]]:
    """One pass over encoded rows (`blocks`, arrays; `mapped`: their quantile-normal columns
    as scores, turned back into raw numbers here): per numeric column, rows per bin of
    `contract`'s edges (with a bin below the first and above the last edge) and the range
    seen, as well as the rows below `min` and above `max` where the contract has them; per
    categorical column, rows per vocabulary entry of `encoder` (and the pooled slot)."""
    out: dict[str, dict[str, Any]] = {}
    for column in encoder.numeric:
        spec = contract["columns"].get(column)
        if spec is None or spec["kind"] != "numeric":
            continue
        out[column] = _numeric_counter(spec)
    for column, vocab in encoder.categorical.items():
        out[column] = {"bins": np.zeros(len(vocab) + 1, np.int64)}
    for block in blocks:
        for column, acc in out.items():
            lo, hi = spans[column]
            if column in encoder.categorical:
                acc["bins"] += _category_bins(block[:, lo:hi], column, encoder)
                continue
            values = block[:, lo].astype(np.float64)
            if mapped:
                values = encoder.raw_numbers(column, values)
            _count(acc, contract["columns"][column], values)
    return out


def layout(encoder: Encoder) -> dict[str, tuple[int, int]]:
    return _layout(encoder)


def merge_counts(parts: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per-block `count_bins` results summed (ranges widened)."""
    total: dict[str, dict[str, Any]] = {}
    for part in parts:
        for column, acc in part.items():
            into = total.setdefault(
                column,
                {"bins": np.zeros_like(acc["bins"]), "outside": 0, "range": [math.inf, -math.inf]},
            )
            into["bins"] = into["bins"] + acc["bins"]
            into["outside"] += acc.get("outside", 0)
            if "range" in acc:
                into["range"] = [
                    min(into["range"][0], acc["range"][0]),
                    max(into["range"][1], acc["range"][1]),
                ]
    return total


def scored_drift(
    contract: dict[str, Any],
    counts: dict[str, dict[str, Any]],
    predicted: np.ndarray,
    max_psi: float,
) -> dict[str, Any]:
    """Drift of rows scored in batch against the training data: PSI per column on the
    contract's bins (the model's own encoder laid them out, so its categories are the
    contract's), the share of numbers out of range, and the predicted classes against the
    training labels."""
    drift, outside = [], {}
    for column, spec in contract["columns"].items():
        acc = counts.get(column)
        if acc is None:
            continue
        shares = _shares(acc["bins"])
        expected = (
            spec["shares"] if spec["kind"] == "numeric" else list(spec["categories"].values())
        )
        rows = int(acc["bins"].sum())
        drift.append({"column": column, "kind": spec["kind"], "psi": psi(expected, shares, rows)})
        if spec["kind"] == "numeric":
            outside[column] = acc["outside"] / max(int(acc["bins"].sum()), 1)
    labels = list(contract["labels"])
    drift.append(
        {
            "column": "<prediction>",
            "kind": "label",
            "psi": psi(
                [contract["labels"][c] for c in labels], _shares(predicted), int(predicted.sum())
            ),
        }
    )
    drift.sort(key=lambda row: -row["psi"])
    return {
        "drift": drift,
        "drifted": [row["column"] for row in drift if row["psi"] > max_psi],
        "max_psi": drift[0]["psi"],
        "out_of_range": outside,
    }


def check_columns(
    contract: dict[str, Any], names: list[str], numeric: set[str], where: str
) -> list[str]:
    """What stops a batch from being scored: a column the model needs is missing, or holds
    text where the model was trained on numbers. One line each, naming the column."""
    problems = []
    for column, spec in contract["columns"].items():
        if column not in names:
            problems.append(
                f"{where}: column '{column}' ({spec['kind']}) is missing; the model needs it"
            )
        elif spec["kind"] == "numeric" and column not in numeric:
            problems.append(
                f"{where}: column '{column}' holds text, but the model was trained on numbers there"
            )
    return problems


MIN_EXPECTED_ROWS = 10  # a bin needs this many of today's rows expected to weigh alone


def psi(expected: list[float], actual: list[float], rows: int | None = None) -> float:
    """Population stability index of two share vectors over the same bins (empty bins count
    as 1e-4, the usual floor, so a bin that appears or vanishes weighs but is finite).
    With today's `rows`, bins expected to hold fewer than 10 of them are first merged in
    order into groups that do: PSI under no change grows as (bins - 1) / rows, so 180 rows
    over 40 categories read as drift from sampling noise alone (0.31 measured)."""
    e, a = np.asarray(expected, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if rows is not None:
        bins, pending = [], np.zeros(2)
        for pair in zip(e, a, strict=True):
            if pair[0] * rows >= MIN_EXPECTED_ROWS:
                bins.append(pair)
                continue
            pending += pair
            if pending[0] * rows >= MIN_EXPECTED_ROWS:
                bins.append(tuple(pending))
                pending = np.zeros(2)
        if pending.any():  # the last few: into the last bin rather than alone
            bins = [*bins[:-1], tuple(np.add(bins[-1], pending))] if bins else [tuple(pending)]
        e, a = np.array(bins).T
    e, a = np.maximum(e, 1e-4), np.maximum(a, 1e-4)
    return float(((a - e) * np.log(a / e)).sum())


def compare(
    champion: dict[str, Any], today: Manifest, cfg: MonitorConfig, champion_name: str
) -> dict[str, Any]:
    """Today's ingested data (`today`, an ingest manifest with its contract) against the
    champion's contract: findings (one line each, with the action `cfg` gives their kind)
    and drift (PSI per column and for the label, on the champion's bins)."""
    mine = json.loads(Path(today["contract"]["path"]).read_text())
    findings: list[dict[str, str]] = []

    def find(kind: str, column: str, line: str) -> None:
        action = cfg.on_violation.get(kind, "warn")
        findings.append({"kind": kind, "column": column, "action": action, "line": line})

    def numeric_drift(column: str, spec: dict[str, Any], today: dict[str, Any]) -> dict:
        """PSI of a numeric column (or image statistic) on the champion's bins; a finding
        when too many of today's rows lie outside the champion's range."""
        rows = int(today["bins"].sum())
        share = today["outside"] / max(rows, 1)
        if share > cfg.max_out_of_range_share:
            find(
                "out_of_range",
                column,
                f"column '{column}': {share:.1%} of today's rows lie outside "
                f"[{spec['min']:.4g}, {spec['max']:.4g}], {champion_name}'s training "
                f"range (monitor.max_out_of_range_share {cfg.max_out_of_range_share})",
            )
        shares = _shares(today["bins"])
        return {"column": column, "kind": "numeric", "psi": psi(spec["shares"], shares, rows)}

    theirs_cols, my_cols = champion["columns"], mine["columns"]
    for column in theirs_cols.keys() - my_cols.keys():
        find(
            "missing_column",
            column,
            f"column '{column}' ({theirs_cols[column]['kind']}) is missing: {champion_name} was "
            "trained on it and needs it to score",
        )
    for column in my_cols.keys() - theirs_cols.keys():
        find(
            "new_column",
            column,
            f"column '{column}' ({my_cols[column]['kind']}) is new: {champion_name} never saw it",
        )
    common = [c for c in theirs_cols if c in my_cols]
    for column in common:
        if theirs_cols[column]["kind"] != my_cols[column]["kind"]:
            find(
                "type_change",
                column,
                f"column '{column}' is {my_cols[column]['kind']} today but was "
                f"{theirs_cols[column]['kind']} for {champion_name}",
            )
    theirs_labels, my_labels = set(champion["labels"]), set(mine["labels"])
    if my_labels - theirs_labels or theirs_labels - my_labels:
        parts = []
        if new := sorted(my_labels - theirs_labels):
            parts.append(f"new label(s) {new[:5]}")
        if gone := sorted(theirs_labels - my_labels):
            parts.append(f"label(s) {gone[:5]} vanished")
        find("labels", LABEL, f"the label: {' and '.join(parts)} against {champion_name}")

    drift = []
    # Today's contract is the champion's (a rerun on the data it was trained on): today's
    # rows on its bins are then its own counts, exactly (same edges, same shares, nothing
    # beyond its range), and the pass over today's training split is skipped.
    unchanged = mine == champion
    same_kind = [c for c in common if theirs_cols[c]["kind"] == my_cols[c]["kind"]]
    numeric = [c for c in same_kind if theirs_cols[c]["kind"] == "numeric"]
    if numeric:  # today's rows on the champion's bins: one pass over today's training split
        if unchanged:
            counts = {c: _own_counts(theirs_cols[c], mine["rows"]) for c in numeric}
        else:
            encoder = Encoder.load(Path(today["encoder"]["path"]))
            spans = _layout(encoder)
            counts = _bin_counts(today["splits"]["train"]["X"]["path"], champion, spans, encoder)
        for column in numeric:
            drift.append(numeric_drift(column, theirs_cols[column], counts[column]))
    theirs_shape, my_shape = champion.get("image_shape"), mine.get("image_shape")
    if theirs_shape != my_shape and (theirs_shape or my_shape):
        find(
            "type_change",
            IMAGE,
            f"images are {_shape(my_shape)} today but were {_shape(theirs_shape)} for "
            f"{champion_name}",
        )
    elif champion.get("images"):  # today's images on the champion's bins: one pass
        counts = (
            {name: _own_counts(spec, mine["rows"]) for name, spec in champion["images"].items()}
            if unchanged
            else image_counts(today["splits"]["train"]["X"]["path"], champion["images"])
        )
        for name, spec in champion["images"].items():
            drift.append({**numeric_drift(name, spec, counts[name]), "kind": "image"})
    for column in (c for c in same_kind if theirs_cols[c]["kind"] == "categorical"):
        known = theirs_cols[column]["categories"]
        today_on_theirs = dict.fromkeys(known, 0.0)
        unseen = 0.0
        for category, share in my_cols[column]["categories"].items():
            if category in known and category != OTHER:
                today_on_theirs[category] += share
            else:
                today_on_theirs[OTHER] += share
                unseen += share if category != OTHER else 0.0
        if unseen > cfg.max_unseen_share:
            find(
                "unseen_categories",
                column,
                f"column '{column}': {unseen:.1%} of today's rows hold categories "
                f"{champion_name} never saw (monitor.max_unseen_share {cfg.max_unseen_share})",
            )
        drift.append(
            {
                "column": column,
                "kind": "categorical",
                "psi": psi(list(known.values()), list(today_on_theirs.values()), mine["rows"]),
            }
        )
    labels = list(champion["labels"])
    drift.append(
        {
            "column": LABEL,
            "kind": "label",
            "psi": psi(
                [champion["labels"][c] for c in labels],
                [mine["labels"].get(c, 0.0) for c in labels],
                mine["rows"],
            ),
        }
    )
    drift.sort(key=lambda row: -row["psi"])
    drifted = [row["column"] for row in drift if row["psi"] > cfg.max_psi]
    return {
        "champion": champion_name,
        "findings": findings,
        "errors": [f["line"] for f in findings if f["action"] == "error"],
        "drift": drift,
        "drifted": drifted,
        "max_psi": drift[0]["psi"] if drift else 0.0,
        "max_psi_allowed": cfg.max_psi,
    }


def _shape(shape: list[int] | None) -> str:
    return "×".join(map(str, shape)) if shape else "not images"


def first_few(names: list[str], limit: int = 10) -> str:
    """The first `limit` names (the most drifted: the lists are sorted by PSI) and how many
    more: an image's hundreds of pixel columns would overflow a tag (MLflow keeps 8,000
    characters) and bury a summary line. The tables and the event carry every column."""
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def drift_markdown(result: dict[str, Any]) -> str:
    """The findings and the drift table, as the markdown artifact a reviewer reads."""
    lines = [f"## Data against {result['champion']}'s contract", ""]
    if result["findings"]:
        lines += [f"- **{f['action']}** ({f['kind']}): {f['line']}" for f in result["findings"]]
    else:
        lines.append("No findings: the columns, types, categories, ranges and labels hold.")
    verdict = (
        f"**drift** in {first_few(result['drifted'])}"
        if result["drifted"]
        else "no column beyond the limit"
    )
    lines += [
        "",
        f"Drift (PSI on the contract's bins; limit monitor.max_psi {result['max_psi_allowed']}): {verdict}.",
        "",
        "| column | kind | PSI |",
        "|---|---|---|",
        *(
            f"| {r['column']} | {r['kind']} | {r['psi']:.4f}{' ⚠' if r['column'] in result['drifted'] else ''} |"
            for r in result["drift"]
        ),
    ]
    return "\n".join(lines)


def plot_drift(result: dict[str, Any], path: Path, top: int = 20) -> None:
    """PSI per column (the `top` largest), the limit drawn across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["drift"][:top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.5))
    colours = ["tab:red" if r["column"] in result["drifted"] else "tab:blue" for r in rows]
    ax.barh([r["column"] for r in rows], [r["psi"] for r in rows], color=colours)
    ax.axvline(result["max_psi_allowed"], color="black", linestyle="--", label="monitor.max_psi")
    ax.set_xlabel("population stability index")
    ax.set_title(f"Drift against {result['champion']}'s training data")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
