"""reduce: standardised out-of-core PCA fitted on the training split, where it pays.

Each Dask task reduces one Parquet partition to its moments (row count, column sums, XᵀX in
float64); the driver adds them up and eigendecomposes the d×d covariance — or, for tables,
the correlation matrix: columns in unrelated units (metres next to one-hot flags) would
otherwise hand every component to the widest-ranging column. That is one read pass and
exact — measured on this stack as far faster than randomized or incremental PCA for tall
data. The fitted reduction is an `.npz` (no pickle) that the served model reuses.

`reduce.method: auto` decides per dataset and says why: narrow inputs pass through (PCA of
nine columns saves nothing), and a fitted PCA is used only when it keeps few components.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from conf.schema import ReduceConfig
from tasks.progress import Progress, gather
from tasks.stage import Manifest, StageDir, describe_files

# the code whose output this stage stores: its digest is part of the cache key
SOURCES = ("tasks.reduce", "tasks.reduce_sweep", "tasks.train", "tasks.training")
CURVE_TARGETS = (0.5, 0.8, 0.9, 0.95, 0.99, 1.0)  # rows of the explained-variance table


def standardizes(cfg: ReduceConfig, partitions: Manifest) -> bool:
    """auto: tables yes (their columns have unrelated units), images no (one pixel scale)."""
    return (
        cfg.standardize if isinstance(cfg.standardize, bool) else not partitions.get("image_shape")
    )


def passes_through(cfg: ReduceConfig, partitions: Manifest, image_model: bool) -> str | None:
    """Why no PCA is fitted at all (no cluster, no pass over the data), or None."""
    d = len(partitions["feature_names"])
    if cfg.method == "none":
        return "reduce.method: none"
    if cfg.method == "auto" and image_model:
        return "reduce.method auto: the image model needs the raw pixels"
    if cfg.method == "auto" and d < cfg.auto_min_features and not cfg.sweep:
        return (
            f"reduce.method auto: {d} features is fewer than reduce.auto_min_features "
            f"({cfg.auto_min_features}); PCA would save nothing"
        )
    return None


def read_features(path: str, columns: list[str]) -> np.ndarray:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=columns, memory_map=True)
    return np.column_stack([c.to_numpy(zero_copy_only=False) for c in table.columns]).astype(
        np.float64, copy=False
    )


BATCH_BYTES = 8 * 2**20  # rows read at a time by the PCA pass: a worker never holds more


def partition_moments(path: str, columns: list[str]) -> tuple[int, np.ndarray, np.ndarray]:
    """Row count, column sums and XᵀX (float64) of one partition, for PCA in one pass.

    Read a batch of rows at a time, so a worker's memory is one batch, not the partition.
    Each batch is centred on its own mean and multiplied in float32 (single-precision GEMM,
    twice float64's speed, and no cancellation: the raw sums of squares are never formed in
    float32), then shifted back in float64: Σxxᵀ = Σ(x-m)(x-m)ᵀ + n·m·mᵀ."""
    import pyarrow.parquet as pq

    d = len(columns)
    n, total, gram = 0, np.zeros(d), np.zeros((d, d))
    batch_rows = max(1024, BATCH_BYTES // (4 * max(d, 1)))
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns):
        X = np.column_stack([c.to_numpy(zero_copy_only=False) for c in batch.columns]).astype(
            np.float32, copy=False
        )
        if not len(X):
            continue
        sums = X.sum(axis=0, dtype=np.float64)
        mean = sums / len(X)
        X -= mean.astype(np.float32)
        gram += (X.T @ X).astype(np.float64) + len(X) * np.outer(mean, mean)
        n, total = n + len(X), total + sums
    return n, total, gram


def fit_pca(
    moments: list[tuple[int, np.ndarray, np.ndarray]], cfg: ReduceConfig, standardize: bool
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The reduction (mean, scale when standardised, components) and the whole spectrum of
    explained-variance ratios, from the summed moments of the training rows."""
    n = sum(m[0] for m in moments)
    if n < 2:
        raise ValueError("PCA needs at least 2 training rows")
    total = sum(m[1] for m in moments)
    gram = sum(m[2] for m in moments)
    mean = total / n
    cov = (gram - n * np.outer(mean, mean)) / (n - 1)
    fitted = {"mean": mean.astype(np.float32)}
    if standardize:  # the correlation matrix: PCA of the columns scaled to unit variance
        std = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        scale = np.where(std > 1e-12, std, 1.0)  # a constant column stays 0 after centring
        cov = cov / np.outer(scale, scale)
        fitted["scale"] = scale.astype(np.float32)
    eigenvalues, eigenvectors = np.linalg.eigh(cov)  # ascending
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues = np.clip(eigenvalues[order], 0.0, None)
    eigenvectors = eigenvectors[:, order]
    ratio = eigenvalues / max(eigenvalues.sum(), 1e-300)
    k = components_for(ratio, cfg.variance_target)
    k = min(k, cfg.max_components or len(ratio))
    fitted["components"] = eigenvectors[:, :k].T.astype(np.float32)
    fitted["explained_variance_ratio"] = ratio[:k]
    return fitted, ratio


def components_for(ratio: np.ndarray, target: float) -> int:
    """The fewest leading components whose explained variance reaches `target`."""
    return min(int(np.searchsorted(np.cumsum(ratio), target - 1e-12) + 1), len(ratio))


def apply_reduction(X: np.ndarray, reduction: dict[str, np.ndarray]) -> np.ndarray:
    """Raw features → principal components (float32). Used by training data and serving."""
    components = reduction["components"]
    if "scale" in reduction:  # standardising folded into the projection: one matmul, no copy
        components = components / reduction["scale"]
    return (np.asarray(X, dtype=np.float32) - reduction["mean"]) @ components.T


def load_reduction(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def project_partition(
    src: str, dest: str, columns: list[str], label: str, reduction_path: str
) -> dict[str, Any]:
    """Project one partition and describe the written file here, so hashing runs in parallel too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    reduction = load_reduction(reduction_path)
    Z = apply_reduction(read_features(src, columns), reduction)
    labels = pq.read_table(src, columns=[label]).column(0)
    names = [f"pc_{i}" for i in range(Z.shape[1])]
    table = pa.table(
        [*(pa.array(Z[:, i]) for i in range(Z.shape[1])), labels], names=[*names, label]
    )
    pq.write_table(table, dest, compression="zstd", use_dictionary=False)
    return describe_files([Path(dest)])[0]


def variance_table(ratio: np.ndarray) -> list[dict[str, Any]]:
    cumulative = np.cumsum(ratio)
    return [
        {
            "variance_target": t,
            "components": components_for(ratio, t),
            "explained": round(float(cumulative[components_for(ratio, t) - 1]), 4),
        }
        for t in CURVE_TARGETS
    ]


def plot_variance(ratio: np.ndarray, k: int, standardized: bool, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cumulative = np.cumsum(ratio)
    ranks = np.arange(1, len(ratio) + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(ranks, cumulative, color="tab:blue", label="cumulative")
    ax.bar(ranks, ratio, color="tab:gray", alpha=0.5, label="per component")
    ax.axvline(k, color="tab:red", linestyle="--", label=f"kept: {k} ({cumulative[k - 1]:.3f})")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("principal components (log scale)")
    ax.set_ylabel("share of the training variance")
    scaled = "standardised features" if standardized else "raw features"
    ax.set_title(f"explained variance of the training split ({scaled})")
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fit_reduction(partitions: Manifest, cfg: ReduceConfig, out: StageDir, client) -> dict[str, Any]:
    """Fit PCA on train; if it pays (or is asked for), project every split on the Dask
    cluster. Return the manifest body, which says why it reduced or not."""
    columns, label = partitions["feature_names"], partitions["label"]
    train_files = [f["path"] for f in partitions["splits"]["train"]["files"]]
    passing = client.map(partition_moments, train_files, columns=columns, pure=False)
    with Progress("reduce", "PCA pass over train partitions", len(passing)) as progress:
        moments = gather(client, passing, progress, lambda m: f"{m[0]:,} rows")
    standardize = standardizes(cfg, partitions)
    sweep = None
    if cfg.sweep:  # measured: the target the sweep picks replaces reduce.variance_target
        from tasks.reduce_sweep import NONE, run_sweep

        sweep = run_sweep(partitions, cfg, moments, standardize, out, client)
        if sweep["chosen"] != NONE:
            cfg = cfg.model_copy(update={"variance_target": sweep["chosen"]})
    reduction, ratio = fit_pca(moments, cfg, standardize)
    k, d = reduction["components"].shape
    explained = float(reduction["explained_variance_ratio"].sum())
    plot_variance(ratio, k, standardize, out.path("explained_variance.png"))
    curve = {
        "variance_table": variance_table(ratio),
        "plots": [out.final_path("explained_variance.png"), *([sweep["plot"]] if sweep else [])],
        "sweep": sweep,
    }
    scaled = "standardised " if standardize else ""
    if sweep and sweep["chosen"] == NONE:
        why = f"reduce.sweep picked the raw features: {sweep['why']}"
        return {**skip_reduction(partitions, why), **curve}
    if cfg.method == "auto" and k > cfg.auto_max_kept * d and not sweep:
        why = (
            f"reduce.method auto: {scaled}PCA keeps {k} of {d} features for "
            f"{cfg.variance_target:.0%} of the variance, more than reduce.auto_max_kept "
            f"({cfg.auto_max_kept:.0%}); training on the raw features instead"
        )
        return {**skip_reduction(partitions, why), **curve}

    np.savez(out.path("reduction.npz"), **reduction)
    reduction_path = str(out.path("reduction.npz"))
    splits: dict[str, Any] = {}
    for name, split in partitions["splits"].items():
        out.path(name).mkdir()
        sources = [f["path"] for f in split["files"]]
        targets = [str(out.path(f"{name}/{Path(s).name}")) for s in sources]
        projecting = client.map(
            project_partition,
            sources,
            targets,
            columns=columns,
            label=label,
            reduction_path=reduction_path,
            pure=False,
        )
        with Progress("reduce", f"{name} partitions projected", len(projecting)) as progress:
            written = gather(
                client, projecting, progress, lambda d: f"{d['bytes'] / 2**20:.1f} MiB"
            )
        splits[name] = {"files": [out.moved(d) for d in written], "rows": split["rows"]}
    why = (
        f"reduce.sweep picked variance target {cfg.variance_target}: {sweep['why']}"
        if sweep
        else "reduce.method: pca"
        if cfg.method == "pca"
        else (
            f"reduce.method auto: {k} of {d} features is within reduce.auto_max_kept ({cfg.auto_max_kept:.0%})"
        )
    )
    return {
        "splits": splits,
        "feature_names": [f"pc_{i}" for i in range(k)],
        "raw_feature_names": columns,
        "label": label,
        "classes": partitions["classes"],
        "image_shape": None,
        "reduction": out.describe("reduction.npz")[0],
        "standardized": standardize,
        "why": why,
        "metrics": {
            "reduce/components": k,
            "reduce/input_features": d,
            "reduce/explained_variance": explained,
            "reduce/standardized": float(standardize),
        },
        "summary": f"{scaled}PCA {d} → {k} components, {explained:.3f} of the variance ({why})",
        **curve,
    }


def skip_reduction(partitions: Manifest, why: str) -> dict[str, Any]:
    """No reduction: the model trains on the partitioned raw features."""
    n = len(partitions["feature_names"])
    return {
        "splits": partitions["splits"],
        "feature_names": partitions["feature_names"],
        "raw_feature_names": partitions["feature_names"],
        "label": partitions["label"],
        "classes": partitions["classes"],
        "image_shape": partitions["image_shape"],
        "reduction": None,
        "standardized": False,
        "why": why,
        "variance_table": [],
        "plots": [],
        "sweep": None,
        "metrics": {
            "reduce/components": n,
            "reduce/input_features": n,
            "reduce/explained_variance": 1.0,
            "reduce/standardized": 0.0,
        },
        "summary": f"no reduction: {n} raw features ({why})",
    }
