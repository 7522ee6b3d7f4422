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

from conf.schema import PipelineConfig, ReduceConfig, reads_images
from tasks.cluster import dask_client, map_shared
from tasks.progress import Progress, gather
from tasks.reduce.pca import (
    apply_reduction,
    fit_pca,
    load_reduction,
    partition_moments,
    plot_variance,
    project_partition,
    read_features,
    variance_table,
)
from tasks.reduce.sweep import NONE, run_sweep
from tasks.spec import ChildRun, Hooks, Inputs, StageSpec
from tasks.store import Manifest, StageDir

__all__ = ["apply_reduction", "load_reduction", "read_features"]  # what other rooms use


def standardizes(cfg: ReduceConfig, partitions: Manifest) -> bool:
    """auto: tables yes (their columns have unrelated units), images no (one pixel scale)."""
    return (
        cfg.standardize if isinstance(cfg.standardize, bool) else not partitions.get("image_shape")
    )


def passes_through(
    cfg: ReduceConfig, partitions: Manifest, image_model: bool, embeds: bool = False
) -> str | None:
    """Why no PCA is fitted at all (no cluster, no pass over the data), or None."""
    d = len(partitions["feature_names"])
    if cfg.method == "none":
        return "reduce.method: none"
    if cfg.method == "auto" and image_model:
        return "reduce.method auto: the image model needs the raw pixels"
    if cfg.method == "auto" and embeds and partitions.get("codes") and not cfg.sweep:
        return (
            "reduce.method auto: the MLP learns an embedding for each coded categorical "
            f"({', '.join(partitions['codes'])}); PCA would mix its codes into the numbers"
        )
    if cfg.method == "auto" and d < cfg.auto_min_features and not cfg.sweep:
        return (
            f"reduce.method auto: {d} features is fewer than reduce.auto_min_features "
            f"({cfg.auto_min_features}); PCA would save nothing"
        )
    # measured (benchmarks/tabular_benchmark.py): PCA to 95% of the variance cost the
    # satellite table 1.4 points and the DNA one 0.9; a network on 36 or 180 columns is cheap
    if (
        cfg.method == "auto"
        and partitions.get("encoder")
        and d < cfg.auto_min_table_features
        and not cfg.sweep
    ):
        return (
            f"reduce.method auto: a table of {d} features, fewer than "
            f"reduce.auto_min_table_features ({cfg.auto_min_table_features}); the variance PCA "
            "drops may hold signal, and the network is cheap on this few"
        )
    return None


def fit_reduction(partitions: Manifest, cfg: ReduceConfig, out: StageDir, client) -> dict[str, Any]:
    """Fit PCA on train; if it pays (or is asked for), project every split on the Dask
    cluster. Return the manifest body, which says why it reduced or not."""
    columns, label = partitions["feature_names"], partitions["label"]
    train_files = [f["path"] for f in partitions["splits"]["train"]["files"]]
    passing = map_shared(client, partition_moments, train_files, columns=columns)
    with Progress("reduce", "PCA pass over train partitions", len(passing)) as progress:
        moments = gather(client, passing, progress, lambda m: f"{m[0]:,} rows")
    standardize = standardizes(cfg, partitions)
    sweep = None
    if cfg.sweep:  # measured: the target the sweep picks replaces reduce.variance_target
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
        projecting = map_shared(
            client,
            project_partition,
            sources,
            targets,
            columns=columns,
            label=label,
            reduction_path=reduction_path,
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
        "codes": partitions.get("codes", {}),  # the model embeds these columns' codes
        "unscaled": partitions.get("unscaled", []),  # data.numeric_transform: none
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


def image_model(cfg: PipelineConfig, partitions: Manifest) -> bool:
    """Whether the model reads images whole: the cnn always, rnn and transformer an image's
    rows / patches when there is one. Then auto passes pixels through untouched."""
    return reads_images(cfg.train.model, partitions.get("image_shape"))


def embeds_codes(cfg: PipelineConfig) -> bool:
    """Whether the model learns embeddings from coded categoricals (then auto keeps them)."""
    return cfg.train.model == "mlp"


def reduce_key(cfg: PipelineConfig, inputs: Inputs) -> dict[str, Any]:
    # auto passes images through for an image model: the model is part of the decision
    return {
        **cfg.reduce.model_dump(mode="json"),
        "image_model": image_model(cfg, inputs["partition"]),
        "embeds": embeds_codes(cfg),
    }


def build_reduction(cfg: PipelineConfig, inputs: Inputs, out: StageDir, hooks: Hooks) -> dict:
    partitions = inputs["partition"]
    skip = passes_through(cfg.reduce, partitions, image_model(cfg, partitions), embeds_codes(cfg))
    if skip:
        return skip_reduction(partitions, skip)
    with dask_client(cfg.dask) as client:
        return fit_reduction(partitions, cfg.reduce, out, client)


def sweep_runs(manifest: Manifest) -> list[ChildRun]:
    """Each reduce-sweep point as a nested run: its target, features, proxy accuracy, seconds."""
    return [
        ChildRun(
            f"sweep-{point['target']}",
            {"reduce.variance_target": point["target"]},
            [
                ("sweep/features", point["features"], 0),
                ("sweep/val_accuracy", point["val_accuracy"], 0),
                ("sweep/seconds", point["seconds"], 0),
            ],
            {
                "accelflow.stage": "reduce-sweep",
                "accelflow.sweep.chosen": str(point["chosen"]).lower(),
            },
        )
        for point in (manifest.get("sweep") or {}).get("points", [])
    ]


SPEC = StageSpec(
    name="reduce",
    section="reduce",
    inputs=("partition",),
    key=reduce_key,
    build=build_reduction,
    figure=lambda m: f"{m['metrics']['reduce/components']} features",
    tables={"sweep": "sweep.points", "explained-variance": "variance_table"},
    children=sweep_runs,
    uses_dask=True,
)
