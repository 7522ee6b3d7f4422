"""The gradient-boosting reference: what five lines of scikit-learn reach on the same rows.

Every run with `evaluate.reference` on fits `HistGradientBoostingClassifier` (default
settings, seeded, its own early stopping) on the training split's encoded features, a
seeded sample of up to `evaluate.reference_rows` read row group by row group, and scores it
on the same test rows as the network, a chunk at a time. The evaluate table shows it beside
the baseline and the compressed model, so a network that loses to it says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from tasks.store import Manifest


def fit_and_score(
    partitions: Manifest,
    rows: int,
    test_batches: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]],
) -> dict[str, Any]:
    from sklearn.ensemble import HistGradientBoostingClassifier

    from tasks.evaluate import class_figures, confusion_of
    from tasks.training.data import load_rows, split_rows

    files = [f["path"] for f in partitions["splits"]["train"]["files"]]
    total = split_rows(files)
    keep = np.sort(np.random.default_rng(0).permutation(total)[: min(rows, total)])
    X, y = load_rows(files, partitions["feature_names"], partitions["label"], keep)
    start = time.perf_counter()
    model = HistGradientBoostingClassifier(random_state=0).fit(X.numpy(), y.numpy())
    seconds = time.perf_counter() - start
    n = len(partitions["classes"])
    confusion = np.zeros((n, n), dtype=np.int64)
    for Xb, yb in test_batches():
        codes = model.predict(Xb).astype(np.int64)
        confusion += confusion_of(yb, codes, n)
    figures = class_figures(confusion)
    return {
        "accuracy": figures["accuracy"],
        "macro_f1": figures["macro_f1"],
        "seconds": seconds,
        "rows": int(len(keep)),
        "iterations": int(model.n_iter_),
    }
