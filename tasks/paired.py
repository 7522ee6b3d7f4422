"""Two models' answers on the same validation rows, compared with their noise.

On a few thousand rows a point of accuracy is a few dozen rows: a difference that size is
as likely chance as skill. The compress stage's accuracy budget and the tune stage's choice
of its best trial both judge a difference by a paired bootstrap: each draw resamples the
rows once and scores both models on that resample, so what the two get right (or wrong)
together cancels, and the interval is that of the difference itself.
"""

from __future__ import annotations

import numpy as np

DRAWS = 2000
WEIGHTS_PER_CHUNK = 2**24  # draws × rows in one float32 weight matrix: 64 MiB on any split


def drop_and_bound(base: np.ndarray, point: np.ndarray, confidence: float) -> tuple[float, float]:
    """A point's validation accuracy drop against the baseline, answered on the same rows
    (per-row correctness), and its one-sided upper bound at `confidence` by a paired
    bootstrap. Only the rows one of the two got right move the difference, so each
    resample is drawn as multinomial counts of those rows (the same distribution as
    resampling rows, without an index array per draw); seeded."""
    lost, won = int(np.sum(base & ~point)), int(np.sum(~base & point))
    return counted_drop_and_bound(lost, won, len(base), confidence)


def counted_drop_and_bound(lost: int, won: int, n: int, confidence: float) -> tuple[float, float]:
    """drop_and_bound from its counts: of `n` rows, `lost` the base got right and the point
    wrong, `won` the other way round (counts summed over DDP ranks' shards)."""
    drop = (lost - won) / n
    shares = [lost / n, won / n, max(0.0, 1.0 - (lost + won) / n)]
    counts = np.random.default_rng(0).multinomial(n, shares, size=4000)
    return drop, float(np.quantile((counts[:, 0] - counts[:, 1]) / n, confidence))


def scored(metric: str, label: np.ndarray, answers: dict[str, np.ndarray], weights: np.ndarray):
    """`metric` (val_accuracy | val_loss | val_macro_f1) of one model's `answers`
    (`predicted`, `loss` per row) under each row of `weights` (draws × rows: how often
    each row is drawn). Macro-F1 averages the classes present in the draw, as sklearn does."""
    total = weights.sum(1)
    if metric == "val_loss":
        return weights @ answers["loss"] / total
    hit = (answers["predicted"] == label).astype(np.float32)
    if metric == "val_accuracy":
        return weights @ hit / total
    k = int(max(label.max(), answers["predicted"].max())) + 1
    actual = np.eye(k, dtype=np.float32)[label]
    true_positive = weights @ (actual * hit[:, None])
    predicted = weights @ np.eye(k, dtype=np.float32)[answers["predicted"]]
    present = weights @ actual
    f1 = 2 * true_positive / np.maximum(predicted + present, 1)
    return np.nanmean(np.where(present > 0, f1, np.nan), axis=1)


def gain_and_bound(
    metric: str,
    label: np.ndarray,
    base: dict[str, np.ndarray],
    point: dict[str, np.ndarray],
    confidence: float,
) -> tuple[float, float]:
    """How much better `point` scores than `base` on the same rows (in `metric`'s better
    direction: a lower loss is a gain), and the one-sided lower bound of that gain at
    `confidence` by a paired (Poisson) bootstrap; seeded, so the same answers give the same
    bound."""
    sign = -1.0 if metric == "val_loss" else 1.0
    ones = np.ones((1, len(label)), dtype=np.float32)
    gain = sign * float(
        scored(metric, label, point, ones)[0] - scored(metric, label, base, ones)[0]
    )
    rng, diffs, done = np.random.default_rng(0), [], 0
    chunk = max(1, min(DRAWS, WEIGHTS_PER_CHUNK // len(label)))
    while done < DRAWS:
        draws = min(chunk, DRAWS - done)
        done += draws
        weights = rng.poisson(1.0, (draws, len(label))).astype(np.float32)
        diffs.append(
            sign * (scored(metric, label, point, weights) - scored(metric, label, base, weights))
        )
    return gain, float(np.quantile(np.concatenate(diffs), 1.0 - confidence))
