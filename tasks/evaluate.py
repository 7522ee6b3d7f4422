"""evaluate: quality, latency and size of the uncompressed baseline and the compressed model.

Both are scored on the raw test split through `served.predictor.Predictor` (reduction +
network), exactly what the registered pyfunc does. The compress stage chose its model on the
validation split and that choice stands: the test split is scored once per model and
reported, never used to choose (a choice made on the rows it is scored on would report an
optimistic figure). The registry step then gates the result against the current champion.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zstandard

from conf.schema import EvaluateConfig, PipelineConfig
from tasks.errors import DataError
from tasks.readers import npy_chunks, npy_take
from tasks.reduce.pca import read_features
from tasks.served.pyfunc import served_latency, timed_ms, timing_rows
from tasks.spec import Hooks, Inputs, StageSpec
from tasks.store import Manifest, StageDir, files_digest

if TYPE_CHECKING:  # torch loads only when a model is scored: a cached run never imports it
    from tasks.served.predictor import Predictor


Batches = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]


def test_batches(partitions: Manifest) -> Batches:
    """The test rows as the served model sees them, a chunk at a time: what its encoder
    makes of the raw rows (pixels, or encoded table rows) at full precision, not the (maybe
    float16) Parquet. Never the whole split in memory."""
    split = partitions["served_test"]
    if not split["rows"]:
        raise DataError("evaluate: the test split is empty; set data.test_fraction > 0")
    return lambda: zip(npy_chunks(split["X"]["path"]), npy_chunks(split["y"]["path"]), strict=True)


def stored_test_batches(partitions: Manifest) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The test rows as partition stored them (lossy with storage_dtype: float16), a
    Parquet part at a time."""
    import pyarrow.parquet as pq

    for part in partitions["splits"]["test"]["files"]:
        X = read_features(part["path"], partitions["feature_names"])
        y = pq.read_table(part["path"], columns=[partitions["label"]]).column(0).to_numpy()
        yield X, y


def raw_test_batches(partitions: Manifest, rows: int = 8192) -> Iterator[tuple[Any, np.ndarray]]:
    """Today's test rows as a user sends them (a DataFrame of the raw columns) with their
    label codes, a batch at a time: any registered model, the champion included, scores
    these. Tables: the cleaned raw rows ingest kept, in row order; arrays: the split's X."""
    import pandas as pd

    y = np.load(partitions["served_test"]["y"]["path"], mmap_mode="r")
    if partitions.get("test_rows"):
        start = 0
        for part in partitions["test_rows"]:
            frame = pd.read_parquet(part["path"])
            yield frame, np.asarray(y[start : start + len(frame)])
            start += len(frame)
        return
    X = np.load(partitions["served_test"]["X"]["path"], mmap_mode="r")
    columns = partitions.get("raw_columns", partitions["feature_names"])
    for start in range(0, len(y), rows):
        frame = pd.DataFrame(np.asarray(X[start : start + rows]), columns=columns)
        yield frame, np.asarray(y[start : start + rows])


def test_rows_digest(partitions: Manifest) -> str:
    """The test rows' identity: a digest of their content (the rows as ingest wrote them,
    labels included), whatever codec, level or row groups partition stored them with."""
    served = partitions["served_test"]
    return files_digest([served["X"], served["y"]])


def input_example(partitions: Manifest):
    """A few raw test rows (as ingest saw them): the registered model's input example."""
    import pandas as pd

    return pd.read_parquet(partitions["raw_example"]["path"])


def latency_ms(network: Callable[[np.ndarray], np.ndarray], Z, batch: int, repeats: int) -> float:
    """The model without MLflow and the encoder (in its runtime): one call on `batch`
    encoded rows, the reduction included."""
    return timed_ms(lambda: network(Z[:batch]), repeats)[0]


def confusion_of(y: np.ndarray, codes: np.ndarray, n: int) -> np.ndarray:
    """The confusion matrix of one chunk (rows: true class, columns: predicted); chunks add."""
    return np.bincount(y * n + codes, minlength=n * n).reshape(n, n)


def class_figures(confusion: np.ndarray) -> dict[str, Any]:
    """Accuracy, per-class precision / recall / support and macro-F1 from a confusion
    matrix (rows: true class, columns: predicted), as scikit-learn defines them: macro-F1
    averages over the classes that occur in the labels or the predictions."""
    tp = np.diag(confusion).astype(np.float64)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(tp), where=both > 0)
    seen = (support > 0) | (predicted > 0)
    return {
        "accuracy": float(tp.sum() / max(confusion.sum(), 1)),
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "precision": precision,
        "recall": recall,
        "support": support,
    }


def score(predictor: Predictor, batches: Batches, cfg: EvaluateConfig) -> dict[str, Any]:
    """Quality over the test rows, a chunk at a time (confusion and log-loss summed), and
    the model's latency and size from encoded rows (the reduction included)."""
    from tasks.training.models import weight_counts

    n = len(predictor.classes)
    confusion = np.zeros((n, n), dtype=np.int64)
    loss, first = 0.0, None
    for X, y in batches():
        proba = predictor.predict_proba(X)
        codes = proba.argmax(1)
        confusion += confusion_of(y, codes, n)
        # log-loss as scikit-learn computes it on probabilities clipped to [1e-7, 1]
        clipped = np.clip(proba, 1e-7, 1)
        clipped /= clipped.sum(axis=1, keepdims=True)
        loss -= float(np.log(clipped[np.arange(len(y)), y]).sum())
        first = timing_rows(X) if first is None else first
    figures = class_figures(confusion)
    precision, recall, support = figures["precision"], figures["recall"], figures["support"]
    parameters, nonzero = weight_counts(predictor.model)
    # both runtimes alike: the reduction's bytes and time count, in the graph or beside it
    raw = b"".join(f.read_bytes() for f in predictor.network_files)
    return {
        "accuracy": figures["accuracy"],
        "macro_f1": figures["macro_f1"],
        "log_loss": loss / max(int(confusion.sum()), 1),
        "per_class": [
            {"class": str(c), "precision": float(p), "recall": float(r), "support": int(n)}
            for c, p, r, n in zip(predictor.classes, precision, recall, support, strict=True)
        ],
        "latency_b1_ms": latency_ms(predictor.encoded_to_logits, first, 1, cfg.latency_repeats),
        "latency_b256_ms": latency_ms(predictor.encoded_to_logits, first, 256, cfg.latency_repeats),
        "parameters": parameters,
        "nonzero_parameters": nonzero,
        "size_bytes": len(raw),
        "size_zstd_bytes": len(zstandard.ZstdCompressor(level=19).compress(raw)),
        "confusion": confusion.tolist(),
    }


def storage_impact(
    partitions: Manifest, predictor: Predictor, served_accuracy: float
) -> dict[str, float]:
    """With lossy storage (float16), the chosen model's accuracy on the stored test features
    too: the model trained on those, so the cost of the smaller files is a number."""
    if partitions["codec"]["storage_dtype"] == "native":
        return {}
    right = total = 0
    for X, y in stored_test_batches(partitions):
        right += int((predictor.predict_codes(X) == y).sum())
        total += len(y)
    stored = right / max(total, 1)
    return {
        "evaluate/stored_features_accuracy": stored,
        "evaluate/storage_accuracy_delta": stored - served_accuracy,
    }


def plot_confusion(matrix: list[list[int]], classes: list[Any], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(classes)), [str(c) for c in classes], rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), [str(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), v in np.ndenumerate(m):
        ax.text(
            j,
            i,
            str(v),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if v > m.max() / 2 else "black",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


TSNE_MIN_ROWS = 10  # fewer rows make no map (t-SNE's perplexity needs neighbours)


def plot_tsne(predictor: Predictor, X: np.ndarray, y: np.ndarray, path: Path) -> None:
    """A 2-D t-SNE map of a test sample in the model's learned representation (its last
    hidden layer, PCA to 50 dimensions first, as t-SNE's authors advise), coloured by the
    true class: classes the model separates form islands, confused ones share a shore."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    with torch.inference_mode():
        H = predictor.model.embed(torch.from_numpy(predictor.reduced(X))).numpy()
    dims = min(50, *H.shape)  # a small test split (wine: 21 rows) allows fewer than 50
    if H.shape[1] > dims:
        H = PCA(dims, random_state=0).fit_transform(H)
    perplexity = min(30.0, (len(X) - 1) / 3)
    Z = TSNE(
        2, init="pca", learning_rate="auto", perplexity=perplexity, random_state=0
    ).fit_transform(H)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10" if len(predictor.classes) <= 10 else "tab20")
    for code, name in enumerate(predictor.classes):
        mask = y == code
        ax.scatter(Z[mask, 0], Z[mask, 1], s=6, color=cmap(code % cmap.N), label=str(name))
    ax.set_title(f"t-SNE of {len(X)} test rows in the model's last hidden layer")
    ax.set_xlabel("t-SNE 1 (no unit)")
    ax.set_ylabel("t-SNE 2 (no unit)")
    ax.legend(markerscale=3, fontsize=7, loc="best", title="true class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(rows: dict[str, dict[str, Any]], keys: list[str]) -> str:
    names = list(rows)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in keys:
        cells = [
            f"{rows[n][k]:.4f}" if isinstance(rows[n][k], float) else str(rows[n][k]) for n in names
        ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


WEAK_RECALL = 0.5  # a class the model finds less than half of the time


def weak_classes(per_class: list[dict[str, Any]]) -> str:
    """A line above the tables naming the classes the model mostly misses (rare classes
    hide behind a high accuracy: 0.997 with two classes never predicted), or nothing."""
    weak = [r for r in per_class if r["support"] and r["recall"] < WEAK_RECALL]
    if not weak:
        return ""
    named = ", ".join(
        f"`{r['class']}` {r['recall']:.2f} of {r['support']:,} rows"
        for r in sorted(weak, key=lambda r: r["recall"])
    )
    return (
        f"**Missed classes** (test recall under {WEAK_RECALL:.0%}): {named}. More rows of "
        "them, or train.class_weight: balanced, usually help.\n\n"
    )


def per_class_table(results: dict[str, dict[str, Any]]) -> str:
    """Precision and recall of every class, for each scored model side by side."""
    names = list(results)
    head = " | ".join(f"{n} precision | {n} recall" for n in names)
    lines = [f"| class | support | {head} |", "|---|---|" + "---|---|" * len(names)]
    for i, row in enumerate(results[names[0]]["per_class"]):
        cells = " | ".join(
            f"{results[n]['per_class'][i]['precision']:.4f} | "
            f"{results[n]['per_class'][i]['recall']:.4f}"
            for n in names
        )
        lines.append(f"| {row['class']} | {row['support']} | {cells} |")
    return "\n".join(lines)


TABLE_KEYS = [
    "accuracy",
    "macro_f1",
    "log_loss",
    "latency_b1_ms",
    "latency_b256_ms",
    "served_b1_ms",
    "served_b256_ms",
    "parameters",
    "nonzero_parameters",
    "size_bytes",
    "size_zstd_bytes",
]


def evaluate_model(
    partitions: Manifest,
    features: Manifest,
    trained: Manifest,
    compressed: Manifest,
    cfg: EvaluateConfig,
    out: StageDir,
) -> dict[str, Any]:
    """Score baseline and compressed side by side, choose one; return the manifest body."""
    from tasks.compress.export import served_network
    from tasks.served.predictor import Predictor, write_bundle

    batches = test_batches(partitions)
    reduction = features["reduction"]["path"] if features.get("reduction") else None
    encoder = partitions["encoder"]["path"] if partitions.get("encoder") else None
    meta = {
        "feature_names": partitions["feature_names"],
        "classes": partitions["classes"],
        "raw_columns": partitions.get("raw_columns", partitions["feature_names"]),
    }
    example = input_example(partitions)
    results, predictors = {}, {}
    # the baseline as torch runs it; the compressed model in the runtime compress chose
    runtimes = {"baseline": "torch", "compressed": compressed.get("runtime", "torch")}
    # validation chooses, test reports: compress picked its point on the validation split;
    # the test split is scored once per model here and never changes that choice
    kept = compressed.get("chosen", "baseline") == "baseline" and runtimes["compressed"] == "torch"
    for name, manifest in (("baseline", trained), ("compressed", compressed)):
        if name == "compressed" and kept:
            # compress kept the trained network (its weights, as torch runs them): the
            # same model, scored and timed once
            results[name], predictors[name] = results["baseline"], predictors["baseline"]
        else:
            scratch = out.path(f"{name}.onnx")
            model, served = served_network(manifest["model"], runtimes[name], reduction, scratch)
            bundle = write_bundle(out.path(name), model, reduction, meta | served, encoder)
            scratch.unlink(missing_ok=True)
            predictors[name] = Predictor(bundle, threads=1)
            results[name] = score(predictors[name], batches, cfg)
            results[name] |= served_latency(
                bundle, example, out.path(f"served_{name}"), cfg.latency_repeats
            )
        plot_confusion(
            results[name]["confusion"],
            partitions["classes"],
            f"{name} (test)",
            out.path(f"confusion_{name}.png"),
        )
    drop = results["baseline"]["accuracy"] - results["compressed"]["accuracy"]
    chosen = "baseline" if kept else "compressed"
    storage = storage_impact(partitions, predictors[chosen], results[chosen]["accuracy"])
    served = partitions["served_test"]  # t-SNE draws a sample: only those rows are read
    pick = np.sort(np.random.default_rng(0).permutation(served["rows"])[: cfg.tsne_rows])
    mapped = len(pick) >= TSNE_MIN_ROWS
    if mapped:
        plot_tsne(
            predictors[chosen],
            npy_take(served["X"]["path"], pick),
            npy_take(served["y"]["path"], pick),
            out.path("tsne.png"),
        )
    weights = (compressed if chosen == "compressed" else trained)["model"]["weights"]["digest"]
    model_digest = (
        weights
        + (features["reduction"]["digest"] if reduction else "")
        + (partitions["encoder"]["digest"] if encoder else "")
    )
    speedup = results["baseline"]["latency_b256_ms"] / max(
        results["compressed"]["latency_b256_ms"], 1e-9
    )
    table = markdown_table(results, TABLE_KEYS) + "\n\n" + per_class_table(results)
    reference = None
    if cfg.reference == "gbm" or (cfg.reference == "auto" and encoder):
        from tasks.gbm import fit_and_score

        reference = fit_and_score(partitions, cfg.reference_rows, batches)
        gap = results[chosen]["accuracy"] - reference["accuracy"]
        table += (
            f"\n\nGradient-boosting reference (scikit-learn's HistGradientBoostingClassifier on "
            f"{reference['rows']:,} training rows, {reference['iterations']} iterations, "
            f"{reference['seconds']:.1f} s): test accuracy {reference['accuracy']:.4f}, macro-F1 "
            f"{reference['macro_f1']:.4f}; the {chosen} network is "
            f"{abs(gap):.4f} {'ahead' if gap >= 0 else 'behind'}"
        )
    overhead = results[chosen]["served_b256_ms"] / max(results[chosen]["latency_b256_ms"], 1e-9)
    summary = (
        f"{weak_classes(results[chosen]['per_class'])}{table}\n\nChosen: **{chosen}**, by compress on the validation split (the test "
        f"split only reports: accuracy change {-drop:+.4f} on test), its network run by "
        f"{runtimes[chosen]}; batch-256 latency ratio baseline (torch)/compressed "
        f"{speedup:.2f}×. "
        f"Served (`mlflow.pyfunc` predict on raw rows, 1 thread) at batch 256: "
        f"{results[chosen]['served_b256_ms']:.2f} ms, {overhead:.1f}× the model alone (reduction and network, no MLflow, no encoder)"
    )
    metrics = {
        f"evaluate/{n}_{k}": float(v)
        for n, r in results.items()
        for k, v in r.items()
        if k in TABLE_KEYS
    }
    if storage:
        metrics |= storage
        summary += (
            f"\n\nLossy storage ({partitions['codec']['storage_dtype']}): accuracy "
            f"{storage['evaluate/stored_features_accuracy']:.4f} on the stored test features vs "
            f"{results[chosen]['accuracy']:.4f} on the rows a user sends "
            f"({storage['evaluate/storage_accuracy_delta']:+.4f})"
        )
    (out.path("summary.md")).write_text(summary + "\n")
    metrics |= {
        "test/accuracy": results[chosen]["accuracy"],
        "test/macro_f1": results[chosen]["macro_f1"],
        "test/min_recall": min(r["recall"] for r in results[chosen]["per_class"] if r["support"]),
        "test/log_loss": results[chosen]["log_loss"],
        "test/latency_b1_ms": results[chosen]["latency_b1_ms"],
        "test/latency_b256_ms": results[chosen]["latency_b256_ms"],
        "test/served_latency_b1_ms": results[chosen]["served_b1_ms"],
        "test/served_latency_b256_ms": results[chosen]["served_b256_ms"],
        "test/size_zstd_bytes": float(results[chosen]["size_zstd_bytes"]),
        "baseline/accuracy": results["baseline"]["accuracy"],
        "evaluate/accuracy_drop": drop,
        "evaluate/chosen_compressed": float(chosen == "compressed"),
    }
    if reference:
        metrics |= {f"reference/{k}": float(v) for k, v in reference.items()}
    return {
        "chosen": chosen,
        # what the registry gets, in words: compress's point (or the trained model) and runtime
        "served": f"{compressed.get('chosen', 'baseline')} by {runtimes[chosen]}",
        "bundle": out.final_path(chosen),
        "model_digest": model_digest,
        "results": results,
        "reference": reference,
        "test_digest": test_rows_digest(partitions),
        "plots": [
            *(out.final_path(f"confusion_{n}.png") for n in results),
            *([out.final_path("tsne.png")] if mapped else []),
        ],
        "report": out.final_path("summary.md"),
        "metrics": metrics,
        "summary": summary,
    }


def build_evaluation(cfg: PipelineConfig, inputs: Inputs, out: StageDir, hooks: Hooks) -> dict:
    return evaluate_model(
        inputs["partition"],
        inputs["reduce"],
        inputs["train"],
        inputs["compress"],
        cfg.evaluate,
        out,
    )


SPEC = StageSpec(
    name="evaluate",
    section="evaluate",
    inputs=("partition", "reduce", "train", "compress"),
    key=lambda cfg, inputs: cfg.evaluate.model_dump(mode="json"),
    build=build_evaluation,
    figure=lambda m: (
        f"test acc {m['metrics']['test/accuracy']:.4f} ({m.get('served', m['chosen'])})"
    ),
    headline={
        "test/accuracy": "higher",
        "test/macro_f1": "higher",
        "test/min_recall": "higher",
        "test/log_loss": "lower",
        "baseline/accuracy": "higher",
        "reference/accuracy": "higher",
        "test/latency_b1_ms": "lower",
        "test/latency_b256_ms": "lower",
        "test/served_latency_b1_ms": "lower",
        "test/served_latency_b256_ms": "lower",
        "test/size_zstd_bytes": "lower",
    },
    datasets=(("partition", "test", "evaluation"),),
)
