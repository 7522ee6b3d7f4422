"""The reduce stage's sweep: which variance target pays, measured rather than assumed.

For each target in `reduce.sweep` (e.g. 0.8, 0.9, 0.95, 0.99 and `none`, the raw features) a
short proxy training (an MLP for `reduce.sweep_epochs` on at most `reduce.sweep_rows`
training rows, the same rows and seed for every point) runs as a task on the Dask cluster,
one point per worker at a time. `reduce.pick: smallest_within` then takes the target with
the fewest features whose validation accuracy is within `reduce.tolerance` of the best;
`best` takes the best. Pure stage logic: the wrapper logs each point as a nested run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from conf.schema import ReduceConfig, TrainConfig
from tasks.progress import Progress, gather
from tasks.reduce.pca import apply_reduction, fit_pca, read_features
from tasks.store import Manifest, StageDir

NONE = "none"  # the raw features


def sample_rows(files: list[str], columns: list[str], label: str, rows: int):
    """The first `rows` rows of a split (its rows are already in seeded random order)."""
    import pyarrow.parquet as pq

    X, y, have = [], [], 0
    for path in files:
        if have >= rows:
            break
        X.append(read_features(path, columns)[: rows - have])
        y.append(pq.read_table(path, columns=[label]).column(0).to_numpy()[: rows - have])
        have += len(X[-1])
    return np.concatenate(X).astype(np.float32), np.concatenate(y)


def write_point(folder: Path, X: np.ndarray, y: np.ndarray, label: str) -> tuple[str, list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    names = [f"f{i}" for i in range(X.shape[1])]
    table = pa.table(
        [*(pa.array(X[:, i]) for i in range(X.shape[1])), pa.array(y)], names=[*names, label]
    )
    path = folder / "rows.parquet"
    pq.write_table(table, path)
    return str(path), names


def proxy_train(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """One point's short training in this (Dask worker) process."""
    import torch

    from tasks.training.worker import Rank, Trainer

    torch.set_num_threads(max(1, threads))
    start = time.perf_counter()
    result = Trainer(spec, Rank(0, 1, torch.device("cpu")), on_epoch=lambda *_: None).run()
    return {"val_accuracy": result["val_accuracy"], "seconds": time.perf_counter() - start}


def pick(points: list[dict[str, Any]], cfg: ReduceConfig) -> tuple[dict[str, Any], str]:
    """The chosen point and why, by `reduce.pick`."""
    best = max(points, key=lambda p: p["val_accuracy"])
    if cfg.pick == "best":
        return best, f"best validation accuracy {best['val_accuracy']:.4f}"
    within = [p for p in points if p["val_accuracy"] >= best["val_accuracy"] - cfg.tolerance]
    chosen = min(within, key=lambda p: (p["features"], -p["val_accuracy"]))
    return chosen, (
        f"the fewest features ({chosen['features']}) within reduce.tolerance {cfg.tolerance} of "
        f"the best validation accuracy {best['val_accuracy']:.4f} (target {best['target']}, "
        f"{best['features']} features): {chosen['val_accuracy']:.4f}"
    )


def run_sweep(
    partitions: Manifest, cfg: ReduceConfig, moments, standardize: bool, out: StageDir, client
) -> dict[str, Any]:
    """Every point trained and measured; returns the points, the pick and its reason."""
    from tasks import train

    columns, label = partitions["feature_names"], partitions["label"]
    files = {s: [f["path"] for f in partitions["splits"][s]["files"]] for s in ("train", "val")}
    files["val"] = files["val"] or files["train"]
    X, y = sample_rows(files["train"], columns, label, cfg.sweep_rows)
    Xv, yv = sample_rows(files["val"], columns, label, cfg.sweep_rows)
    proxy = TrainConfig(model="mlp", hidden=[256], epochs=cfg.sweep_epochs, dropout=0.1)
    points, specs = [], []
    for target in cfg.sweep:
        if target == NONE:
            Z, Zv, features = X, Xv, len(columns)
        else:
            reduction, _ = fit_pca(
                moments, cfg.model_copy(update={"variance_target": target}), standardize
            )
            Z, Zv = apply_reduction(X, reduction), apply_reduction(Xv, reduction)
            features = Z.shape[1]
        folder = out.path(f"sweep/{target}")
        train_file, names = write_point(folder / "train", Z, y, label)
        val_file, _ = write_point(folder / "val", Zv, yv, label)
        manifest = {
            "splits": {
                "train": {"files": [{"path": train_file}]},
                "val": {"files": [{"path": val_file}]},
            },
            "feature_names": names,
            "label": label,
            "classes": partitions["classes"],
            "image_shape": None,
        }
        specs.append(train.train_spec(manifest, proxy, None, None))
        points.append({"target": target, "features": features})
    threads = min(w["nthreads"] for w in client.scheduler_info(n_workers=-1)["workers"].values())
    start = time.perf_counter()
    futures = client.map(proxy_train, specs, threads=threads, pure=False)
    with Progress("reduce", "sweep points", len(futures)) as progress:
        results = gather(
            client,
            futures,
            progress,
            lambda r: f"val accuracy {r['val_accuracy']:.4f} in {r['seconds']:.1f} s",
        )
    for point, result in zip(points, results, strict=True):
        point.update(result)
    chosen, why = pick(points, cfg)
    for point in points:
        point["chosen"] = point is chosen
    plot_sweep(points, out.path("reduce-sweep.png"))
    return {
        "points": points,
        "chosen": chosen["target"],
        "why": why,
        "seconds": time.perf_counter() - start,
        "plot": out.final_path("reduce-sweep.png"),
    }


def plot_sweep(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, sec) = plt.subplots(1, 2, figsize=(10, 4))
    ordered = sorted(points, key=lambda p: p["features"])
    xs = [p["features"] for p in ordered]
    acc.plot(xs, [p["val_accuracy"] for p in ordered], marker="o", color="tab:blue")
    sec.plot(xs, [p["seconds"] for p in ordered], marker="o", color="tab:gray")
    for p in ordered:
        label = "raw" if p["target"] == NONE else f"{p['target']:g}"
        acc.annotate(
            label, (p["features"], p["val_accuracy"]), textcoords="offset points", xytext=(4, 4)
        )
        if p["chosen"]:
            acc.scatter(
                [p["features"]],
                [p["val_accuracy"]],
                s=120,
                facecolors="none",
                edgecolors="tab:red",
                label="picked",
            )
    acc.set(
        xscale="log",
        xlabel="features (PCA components; raw = none)",
        ylabel="proxy validation accuracy",
        title="Accuracy vs components",
    )
    acc.legend()
    sec.set(
        xscale="log",
        xlabel="features",
        ylabel="proxy training seconds",
        title="Training seconds vs components",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
