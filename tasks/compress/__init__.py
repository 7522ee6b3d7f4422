"""compress: make the trained model faster or smaller, by one recipe or a swept Pareto front.

A recipe is an ordered list of steps (`conf.schema.recipe_problem` says which orders work):
- `magnitude`: global magnitude pruning of the hidden layers (the classifier stays dense),
  fine-tuned with the mask held. With `rounds > 1` the sparsity ramps geometrically
  (0.5 → 0.75 → 0.875), fine-tuning after each round: one-shot pruning to high sparsity
  collapses an MLP where gradual rounds keep most of its accuracy. Zeros make no dense kernel
  faster; they make the file smaller (`encoded.npz`: a 1-bit non-zero map + the values).
- `structured`: remove `sparsity` of every hidden layer's neurons (MLP) or channels (CNN),
  ranked by the L2 norm of each coupled group. Torch-Pruning's dependency graph finds what
  shrinks together (a conv's filters, its BatchNorm, the head's inputs after the flatten).
  The result is a smaller dense model, described by its widths in the JSON spec and a
  weights-only state dict, so serving never needs the pruning library.
- `cluster`: k-means weight sharing (Deep Compression): 2^bits values per layer, fine-tuned
  with each value's gradient the sum of its weights' gradients; `encoded.npz` holds the
  codebooks and packed indices.
- `quantize`: dynamic int8 Linear weights (CPU serving), no fine-tuning.

A sweep (`compress.sweep`: recipes × levels; `recipe: auto` picks one) fine-tunes each
distinct point as a task on the Dask cluster (the same Trainer, one process per point; int8
needs no fine-tune, so structured and structured+int8 share one). A single fine-tune runs
with the train stage's DDP launcher on every core instead. Then the baseline and every
point are measured here, one after the other, so their latencies are side by side on an
otherwise idle machine. The choice: the best point on `evaluate.objective` whose
validation accuracy is within `evaluate.max_accuracy_drop` of the baseline's (the test
split stays for evaluate).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from conf.schema import (
    COMPRESSION_STEPS,
    CompressConfig,
    EvaluateConfig,
    PipelineConfig,
    TrainConfig,
)
from tasks.cluster import dask_client
from tasks.compress.choice import BASELINE, choose, pareto, pareto_markdown, plot_pareto
from tasks.compress.measure import measure, served_context, split_batches
from tasks.compress.points import (
    finetune_point,
    finetune_spec,
    finish_point,
    phases,
    point_name,
    slim_model,
    sweep_points,
    teacher,
)
from tasks.progress import Progress, gather
from tasks.spec import ChildRun, Hooks, Inputs, StageSpec
from tasks.store import Manifest, StageDir
from tasks.train import model_files, train_key, tuned_config
from tasks.training.launch import EpochHook, launch, resolve_world_size


def compress_model(
    partitions: Manifest,
    features: Manifest,
    trained: Manifest,
    cfg: CompressConfig,
    train_cfg: TrainConfig,
    evaluate_cfg: EvaluateConfig,
    out: StageDir,
    on_epoch: EpochHook | None = None,
    client=None,
) -> dict[str, Any]:
    """Fine-tune and measure every point and the baseline, choose; the manifest body.
    `client` (a Dask client) runs a sweep's fine-tunes; a single one uses the DDP launcher."""
    if not cfg.sweep and not cfg.recipe:  # (conf.schema turned `recipe: auto` into a sweep)
        return keep_trained(trained)
    start = time.perf_counter()
    points = sweep_points(cfg)
    trunks = plan_finetunes(points, features, trained, cfg, train_cfg, out)
    specs = {name: trunk["spec"] for name, trunk in trunks.items()}
    results = run_finetunes(specs, train_cfg, on_epoch, client)
    arches = place_weights(points, trunks, trained, out)
    served = served_context(partitions, features) if cfg.sweep else None
    rows = measure_points(points, arches, results, features, trained, evaluate_cfg, served, out)
    chosen, why = choose(rows, evaluate_cfg)
    baseline = rows[0]
    pick = chosen or baseline
    recipe, encoded = list(pick["recipe"]), pick.get("encoded", {})
    fronts = {"L": pareto(rows, "latency_b1_p50_ms"), "S": pareto(rows, "size_encoded_bytes")}
    for r in rows:  # flat rows: one table, one nested run each
        r["recipe"] = "+".join(r["recipe"])
        r |= r.pop("encoded", {})
        r["pareto"] = "".join(k for k, names in fronts.items() if r["name"] in names)
        r["chosen"] = r["name"] == pick["name"]
    (out.path("pareto.md")).write_text(pareto_markdown(rows, why))
    plot_pareto(
        rows, out.path("pareto.png"), baseline["val_accuracy"] - evaluate_cfg.max_accuracy_drop
    )
    body: dict[str, Any] = {"model": trained["model"], "arch": trained["arch"], "result": {}}
    if chosen:
        folder = out.path(f"points/{chosen['name']}")
        for name in ("model.pt", "model.json", "encoded.npz"):
            if (folder / name).is_file():
                shutil.copy(folder / name, out.path(name))
        body = {
            "model": model_files(out),
            "arch": arches[chosen["name"]],
            "result": results.get(chosen["trunk"], {}),
        }
    # the chosen files are copied up; the fine-tunes' checkpoints can go
    shutil.rmtree(out.path("finetune"), ignore_errors=True)
    removed = 1.0 - pick["nonzero_parameters"] / trained["result"]["parameters"]
    metrics = {
        "prune/sparsity": removed,
        "compress/points": float(len(points)),
        "compress/val_accuracy": pick["val_accuracy"],
        "compress/baseline_val_accuracy": baseline["val_accuracy"],
        "compress/speedup_b256": baseline["latency_b256_p50_ms"] / pick["latency_b256_p50_ms"],
        "compress/speedup_b1": baseline["latency_b1_p50_ms"] / pick["latency_b1_p50_ms"],
        "compress/size_ratio": baseline["size_zstd_bytes"] / pick["size_zstd_bytes"],
        "compress/encoded_ratio": baseline["size_bytes"] / pick["size_encoded_bytes"],
        "compress/parameters": float(pick["parameters"]),
        "compress/nonzero_parameters": float(pick["nonzero_parameters"]),
        "compress/seconds": time.perf_counter() - start,
        **{f"compress/{k}": v for k, v in encoded.items()},
    }
    return {
        **body,
        "recipe": recipe,
        "chosen": pick["name"],
        "why": why,
        "table": rows,
        "metrics": metrics,
        "plots": [out.final_path("pareto.png")],
        "report": out.final_path("pareto.md"),
        "summary": f"{pick['name']} chosen of {len(points)} point(s): {why}; "
        f"{metrics['compress/speedup_b256']:.2f}× batch-256 latency, "
        f"{metrics['compress/size_ratio']:.2f}× smaller (zstd), "
        f"{removed:.1%} of the weights removed or zeroed",
    }


def plan_finetunes(
    points: list[dict[str, Any]],
    features: Manifest,
    trained: Manifest,
    cfg: CompressConfig,
    train_cfg: TrainConfig,
    out: StageDir,
) -> dict[str, dict[str, Any]]:
    """One fine-tune per distinct trunk: a point's recipe without int8 (which needs none), so
    structured and structured+quantize share one; int8 alone starts from the trained weights.
    Sets each point's `trunk`; returns each trunk's arch and worker spec."""
    trunks: dict[str, dict[str, Any]] = {}
    for point in points:
        trunk = [step for step in point["recipe"] if COMPRESSION_STEPS[step].finetunes]
        point["trunk"] = point_name(trunk, point["sparsity"], point["bits"]) if trunk else None
        if not trunk or point["trunk"] in trunks:
            continue
        folder = out.path(f"finetune/{point['trunk']}")
        folder.mkdir(parents=True, exist_ok=True)
        arch, init_from = trained["arch"], trained["model"]["weights"]["path"]
        if "structured" in trunk:
            init_from = str(folder / "slim_init.pt")
            slim_from = trained["model"]["weights"]["path"]
            arch = slim_model(arch, slim_from, point["sparsity"], Path(init_from))
        trunks[point["trunk"]] = {
            "arch": arch,
            "spec": finetune_spec(features, arch, init_from, phases(point, cfg), train_cfg, folder)
            | teacher(trained, cfg.distill),
        }
    return trunks


def run_finetunes(
    specs: dict[str, dict[str, Any]], train_cfg: TrainConfig, on_epoch: EpochHook | None, client
) -> dict[str, dict[str, Any]]:
    """Several fine-tunes in parallel on the cluster, one process each; a single one with
    DDP on every core. Each trunk's result (or its error)."""
    if len(specs) > 1:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        threads = min(w["nthreads"] for w in workers)
        futures = client.map(
            finetune_point, list(specs.values()), range(len(specs)), threads=threads, pure=False
        )
        with Progress("compress", "fine-tunes", len(futures)) as progress:
            done = gather(
                client,
                futures,
                progress,
                lambda r: r.get("error") or f"val accuracy {r['val_accuracy']:.4f}",
            )
        return dict(zip(specs, done, strict=True))
    if specs:
        ((name, spec),) = specs.items()
        return {
            name: launch(
                spec,
                resolve_world_size(train_cfg),
                Path(spec["out_dir"]),
                on_epoch,
                nnodes=train_cfg.nnodes,
                endpoint=train_cfg.rdzv_endpoint,
                max_restarts=train_cfg.max_restarts,
            )
        }
    return {}


def place_weights(
    points: list[dict[str, Any]],
    trunks: dict[str, dict[str, Any]],
    trained: Manifest,
    out: StageDir,
) -> dict[str, dict[str, Any]]:
    """Each point's own folder with its starting weights (its trunk's fine-tuned ones, or the
    trained ones); the arch of each."""
    arches = {}
    for point in points:
        folder = out.path(f"points/{point['name']}")
        folder.mkdir(parents=True, exist_ok=True)
        if point["trunk"]:
            arches[point["name"]] = trunks[point["trunk"]]["arch"]
            weights = out.path(f"finetune/{point['trunk']}/model.pt")
            if weights.is_file():  # not when the fine-tune failed
                shutil.copy(weights, folder / "model.pt")
        else:
            arches[point["name"]] = trained["arch"]
            shutil.copy(trained["model"]["weights"]["path"], folder / "model.pt")
    return arches


def measure_points(
    points: list[dict[str, Any]],
    arches: dict[str, dict[str, Any]],
    results: dict[str, dict[str, Any]],
    features: Manifest,
    trained: Manifest,
    evaluate_cfg: EvaluateConfig,
    served: dict[str, Any] | None,
    out: StageDir,
) -> list[dict[str, Any]]:
    """The baseline, then every point, measured here one after the other: side by side, on a
    machine the fine-tunes have left. Finishing a point (encoding, int8) updates `arches`."""
    batches = split_batches(features, "val" if features["splits"]["val"]["rows"] else "train")
    repeats = evaluate_cfg.latency_repeats
    base_folder = out.path(f"points/{BASELINE}")
    base_folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(trained["model"]["weights"]["path"], base_folder / "model.pt")
    (base_folder / "model.json").write_text(json.dumps(trained["arch"], indent=2))
    rows = [
        {
            "name": BASELINE,
            "recipe": [],
            **measure(trained["arch"], base_folder, batches, repeats, served),
        }
    ]
    with Progress("compress", "points measured", len(points)) as progress:
        for i, point in enumerate(points, 1):
            folder = out.path(f"points/{point['name']}")
            result = results.get(point["trunk"], {})
            if "error" in result:
                rows.append({**point, "error": result["error"]})
            else:
                arches[point["name"]] = finish_point(point, arches[point["name"]], folder)
                rows.append(
                    {**point, **measure(arches[point["name"]], folder, batches, repeats, served)}
                )
            progress.step(i, point["name"])
    return rows


def keep_trained(trained: Manifest) -> dict[str, Any]:
    """`compress.recipe: []`: the trained model, unchanged and not re-measured."""
    return {
        "model": trained["model"],
        "arch": trained["arch"],
        "result": {},
        "recipe": [],
        "chosen": BASELINE,
        "why": "compress.recipe is []: the trained model is kept",
        "table": [],
        "metrics": {
            "prune/sparsity": trained["result"]["sparsity"],
            "compress/points": 0.0,
            "compress/speedup_b256": 1.0,
            "compress/size_ratio": 1.0,
        },
        "plots": [],
        "summary": "no compression (compress.recipe: [])",
    }


def compress_key(cfg: PipelineConfig, inputs: Inputs) -> dict[str, Any]:
    # the fine-tunes use train's (tuned) optimizer settings, the choice evaluate's rule
    return {
        **cfg.compress.model_dump(mode="json"),
        "train": train_key(cfg, inputs),
        "choice": cfg.evaluate.model_dump(
            mode="json", include={"max_accuracy_drop", "objective", "latency_repeats"}
        ),
    }


def build_compression(cfg: PipelineConfig, inputs: Inputs, out: StageDir, hooks: Hooks) -> dict:
    # a sweep fine-tunes its points on the cluster; one recipe needs none
    cluster = dask_client(cfg.dask) if cfg.compress.sweep else contextlib.nullcontext()
    with cluster as client:
        return compress_model(
            inputs["partition"],
            inputs["reduce"],
            inputs["train"],
            cfg.compress,
            tuned_config(cfg, inputs),
            cfg.evaluate,
            out,
            hooks.on_epoch,
            client,
        )


def point_runs(manifest: Manifest) -> list[ChildRun]:
    """Each point (and the baseline) as a nested run: its recipe and levels, every measured
    figure, whether it is on a Pareto front and chosen; a failed one with its reason."""
    runs = []
    for row in manifest["table"]:
        params = {"compress.recipe": row["recipe"] or "none"}
        params |= {f"compress.{k}": row[k] for k in ("sparsity", "bits") if row.get(k) is not None}
        figures = [
            (f"point/{k}", v, 0)
            for k, v in row.items()
            if isinstance(v, int | float)
            and not isinstance(v, bool)
            and k not in ("sparsity", "bits")
        ]
        tags = {
            "accelflow.stage": "compress-point",
            "accelflow.point.pareto": row.get("pareto", ""),
            "accelflow.point.chosen": str(row.get("chosen", False)).lower(),
        }
        if "error" in row:
            tags["accelflow.point.error"] = row["error"]
        status = "FAILED" if "error" in row else "FINISHED"
        runs.append(ChildRun(row["name"], params, figures, tags, status))
    return runs


SPEC = StageSpec(
    name="compress",
    section="compress",
    inputs=("partition", "reduce", "tune", "train"),
    key=compress_key,
    build=build_compression,
    figure=lambda m: (
        f"{m['chosen']}: ×{m['metrics']['compress/speedup_b256']:.2f} b256, "
        f"×{m['metrics']['compress/size_ratio']:.2f} smaller"
    ),
    headline={
        "prune/sparsity": "higher",
        "compress/speedup_b256": "higher",
        "compress/size_ratio": "higher",
    },
    tables={"points": "table"},
    reports={"pareto": "report"},
    children=point_runs,
    resumable=True,
    uses_dask=True,
)
