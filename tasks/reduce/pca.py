"""Out-of-core PCA, the reduce stage's arithmetic: per-partition moments (one read pass),
their sum eigendecomposed on the driver, the fitted reduction as an `.npz` (no pickle),
and the projection that training, evaluation and the served model apply."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from conf.schema import ReduceConfig
from tasks.store import describe_files

CURVE_TARGETS = (0.5, 0.8, 0.9, 0.95, 0.99, 1.0)  # rows of the explained-variance table


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


def projection(reduction: dict[str, np.ndarray]) -> np.ndarray:
    """The (components × features) matrix centred rows are multiplied by: the components,
    divided by the scale when standardised (one matmul, no scaled copy of the rows)."""
    if "projection" in reduction:
        return reduction["projection"]
    components = reduction["components"]
    return components / reduction["scale"] if "scale" in reduction else components


def apply_reduction(X: np.ndarray, reduction: dict[str, np.ndarray]) -> np.ndarray:
    """Raw features → principal components (float32). Used by training data and serving."""
    return (np.asarray(X, dtype=np.float32) - reduction["mean"]) @ projection(reduction).T


def load_reduction(path: str | Path) -> dict[str, np.ndarray]:
    """The saved reduction, its projection folded once (not on every served call)."""
    with np.load(path, allow_pickle=False) as data:
        reduction = {k: data[k] for k in data.files}
    reduction["projection"] = projection(reduction).astype(np.float32)
    return reduction


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
