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
- `quantize`: int8, no fine-tuning: in torch, dynamic int8 Linear weights; in onnxruntime,
  its own quantization of the float export (dynamic; static and calibrated for the CNN, so
  its convolutions run in int8 too: `export`).
- `qat`: int8 as `quantize` converts it, after a quantization-aware fine-tune: the recipe's
  fine-tune (or one of its own, for int8 alone) runs with every Linear layer computing in
  simulated int8 (`tasks.training.fake_int8`), so the weights learn the rounding. With
  `compress.qat` (default on) a swept int8 point that post-training int8 put outside the
  accuracy budget, while the same point in float is within it, is retried this way
  (`choice.qat_retries`) and measured beside it; the choice keeps the better.

Every model measured (the baseline and each point) is measured in both runtimes that
`serve.runtime` allows: torch, and its ONNX export in onnxruntime, whose float logits must
match torch's on every validation row. Each row is then served by the runtime that is
best on the objective within the accuracy budget (`choice.settle_runtimes`).

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

import numpy as np

from conf.schema import (
    COMPRESSION_STEPS,
    CompressConfig,
    EvaluateConfig,
    PipelineConfig,
    TrainConfig,
    converts_to_int8,
)
from tasks.cluster import dask_client
from tasks.compress.choice import (
    ANSWERS,
    BASELINE,
    choose,
    pareto,
    pareto_markdown,
    plot_pareto,
    qat_retries,
    settle_runtimes,
)
from tasks.compress.measure import measure, served_context, served_figures, split_batches
from tasks.compress.points import (
    finetune_point,
    finetune_spec,
    finish_point,
    phases,
    point_name,
    slim_model,
    stretched,
    sweep_points,
    teacher,
)
from tasks.compress.search import search
from tasks.progress import Progress, gather
from tasks.served.runtime import RUNTIMES
from tasks.spec import ChildRun, Hooks, Inputs, StageSpec
from tasks.store import Manifest, StageDir
from tasks.train import model_files, steps_per_epoch, train_key, tuned_config
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
    runtime: str = "auto",
) -> dict[str, Any]:
    """Fine-tune and measure every point and the baseline, choose; the manifest body.
    `client` (a Dask client) runs a sweep's fine-tunes; a single one uses the DDP launcher.
    `runtime` (serve.runtime): where the points' networks may run when served."""
    if not cfg.sweep and not cfg.recipe:  # (conf.schema turned `recipe: auto` into a sweep)
        return keep_trained(trained, features, runtime, out)
    start = time.perf_counter()
    points = sweep_points(cfg)
    trunks = plan_finetunes(points, features, trained, cfg, train_cfg, out)
    specs = {name: trunk["spec"] for name, trunk in trunks.items()}
    results = run_finetunes(specs, train_cfg, on_epoch, client)
    arches = place_weights(points, trunks, trained, out)
    runtimes = RUNTIMES if runtime == "auto" else (runtime,)
    calibration = None
    static_int8 = trained["arch"]["model"] == "cnn" and (
        any(converts_to_int8(p["recipe"]) for p in points)
        or (cfg.search.enabled and cfg.search.quantize)
    )
    if "onnxruntime" in runtimes and static_int8:
        calibration = training_rows(features, cfg.calibration_rows)
    baseline = measure_baseline(trained, features, evaluate_cfg, runtimes, out)
    rows = [
        baseline,
        *measure_points(
            points, arches, results, features, evaluate_cfg, runtimes, calibration, out
        ),
    ]
    settle_runtimes(rows, evaluate_cfg, runtime)
    if "error" in baseline:
        raise RuntimeError(
            f"serve.runtime is {runtime}, but the trained model cannot run there "
            f"({baseline['error']}): set serve.runtime to auto or torch"
        )

    def run_points(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """More points (a search generation, QAT retries), fine-tuned on the cluster and
        measured here."""
        trunks = plan_finetunes(batch, features, trained, cfg, train_cfg, out)
        specs = {name: trunk["spec"] for name, trunk in trunks.items()}
        results.update(run_finetunes(specs, train_cfg, None, client))
        arches.update(place_weights(batch, trunks, trained, out))
        return measure_points(
            batch, arches, results, features, evaluate_cfg, runtimes, calibration, out
        )

    searched = ""
    if cfg.search.enabled:
        parallel = len(client.scheduler_info(n_workers=-1)["workers"])
        search_start = time.perf_counter()
        found, searched = search(
            baseline, trained["arch"], cfg.search, evaluate_cfg, runtime, parallel, out, run_points
        )
        points += found
        rows += found
        search_seconds = time.perf_counter() - search_start
    if cfg.qat and (retries := qat_retries(rows, evaluate_cfg)):
        retried = run_points(retries)
        settle_runtimes([baseline, *retried], evaluate_cfg, runtime)
        points += retries
        rows += retried
    if cfg.sweep:  # a sweep's table shows each point's served path; with one recipe,
        served = served_context(partitions, features)  # evaluate measures it
        for row in rows:
            if "error" not in row:
                folder = out.path(f"points/{row['name']}")
                row |= served_figures(
                    folder / "model.json",
                    folder,
                    row["runtime"],
                    served,
                    evaluate_cfg.latency_repeats,
                )
    chosen, why = choose(rows, evaluate_cfg)
    for row in rows:  # the per-row answers judged the budget; the table keeps the figures
        row.pop(ANSWERS, None)
    pick = chosen or baseline
    recipe, encoded = list(pick["recipe"]), pick.get("encoded", {})
    fronts = {"L": pareto(rows, "latency_b1_p50_ms"), "S": pareto(rows, "size_encoded_bytes")}
    for r in rows:  # flat rows: one table, one nested run each
        r["recipe"] = "+".join(r["recipe"])
        r.pop("ratios", None)  # (a search point's shares: `layer_removed` shows them)
        r |= r.pop("encoded", {})
        r["pareto"] = "".join(k for k, names in fronts.items() if r["name"] in names)
        r["chosen"] = r["name"] == pick["name"]
    (out.path("pareto.md")).write_text(pareto_markdown(rows, why))
    plot_pareto(
        rows, out.path("pareto.png"), baseline["val_accuracy"] - evaluate_cfg.max_accuracy_drop
    )
    # the chosen model's files, its ONNX export too when onnxruntime serves it
    folder = out.path(f"points/{pick['name']}")
    served_files = ["model.pt", "model.json", "encoded.npz"]
    if pick["runtime"] == "onnxruntime":
        served_files.append("model.onnx")
    for name in served_files:
        if (folder / name).is_file():
            shutil.copy(folder / name, out.path(name))
    body = {
        "model": served_model(out, pick["runtime"]),
        "arch": arches[chosen["name"]] if chosen else trained["arch"],
        "result": results.get(chosen["trunk"], {}) if chosen else {},
        "runtime": pick["runtime"],
    }
    # the chosen files are copied up; the fine-tunes' checkpoints can go
    shutil.rmtree(out.path("finetune"), ignore_errors=True)
    removed = 1.0 - pick["nonzero_parameters"] / trained["result"]["parameters"]
    # speed-ups against the trained model as torch runs it: what compressing and the
    # runtime bought together (the table has each runtime's own figures)
    torch_base = {
        k: baseline.get(f"torch_{k}", baseline[k])
        for k in ("latency_b256_p50_ms", "latency_b1_p50_ms")
    }
    metrics = {
        "prune/sparsity": removed,
        "compress/points": float(len(points)),
        "compress/val_accuracy": pick["val_accuracy"],
        "compress/baseline_val_accuracy": baseline["val_accuracy"],
        "compress/speedup_b256": torch_base["latency_b256_p50_ms"] / pick["latency_b256_p50_ms"],
        "compress/speedup_b1": torch_base["latency_b1_p50_ms"] / pick["latency_b1_p50_ms"],
        "compress/onnxruntime": float(pick["runtime"] == "onnxruntime"),
        "compress/size_ratio": baseline["size_zstd_bytes"] / pick["size_zstd_bytes"],
        "compress/encoded_ratio": baseline["size_bytes"] / pick["size_encoded_bytes"],
        "compress/parameters": float(pick["parameters"]),
        "compress/nonzero_parameters": float(pick["nonzero_parameters"]),
        "compress/seconds": time.perf_counter() - start,
        **({"compress/search_seconds": search_seconds} if cfg.search.enabled else {}),
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
        "summary": f"{pick['name']} chosen of {len(points)} point(s)"
        + (f" ({searched})" if searched else "")
        + ", served by "
        f"{pick['runtime']}: {why}; "
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
    # optimizer steps per epoch and process (DDP's when one fine-tune gets every core)
    per_epoch = steps_per_epoch(
        features["splits"]["train"]["rows"],
        resolve_world_size(train_cfg) * train_cfg.nnodes,
        train_cfg.batch_size,
    )
    for point in points:
        trunk = [step for step in point["recipe"] if COMPRESSION_STEPS[step].finetunes]
        point["trunk"] = trunk_name(point, trunk)
        if not trunk or point["trunk"] in trunks:
            continue
        folder = out.path(f"finetune/{point['trunk']}")
        folder.mkdir(parents=True, exist_ok=True)
        arch, init_from = trained["arch"], trained["model"]["weights"]["path"]
        if "structured" in trunk:
            init_from = str(folder / "slim_init.pt")
            slim_from = trained["model"]["weights"]["path"]
            arch = slim_model(
                arch, slim_from, point.get("ratios") or point["sparsity"], Path(init_from)
            )
        trunks[point["trunk"]] = {
            "arch": arch,
            "spec": finetune_spec(
                features,
                arch,
                init_from,
                stretched(phases(point, cfg), cfg.min_steps, per_epoch),
                train_cfg,
                folder,
            )
            | teacher(trained, cfg.distill),
        }
    return trunks


def trunk_name(point: dict[str, Any], trunk: list[str]) -> str | None:
    """The fine-tune a point needs, named by what it trains (None: it needs none); a
    search point's per-layer shares name its narrowing, so equal points share one (and a
    point that also clusters, or clusters at other bits, does not)."""
    if not trunk:
        return None
    if point.get("ratios") is not None:
        shares = "structured-r" + "-".join(f"{r:g}" for r in point["ratios"])
        return "+".join([shares, *(point_name([step], None, point["bits"]) for step in trunk[1:])])
    return point_name(trunk, point["sparsity"], point["bits"])


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


def choice_batches(features: Manifest):
    """What every point is measured and judged on: validation (training on a table with none)."""
    return split_batches(features, "val" if features["splits"]["val"]["rows"] else "train")


def measure_baseline(
    trained: Manifest,
    features: Manifest,
    evaluate_cfg: EvaluateConfig,
    runtimes: tuple[str, ...],
    out: StageDir,
) -> dict[str, Any]:
    """The trained model measured in each runtime, as every point is."""
    folder = out.path(f"points/{BASELINE}")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(trained["model"]["weights"]["path"], folder / "model.pt")
    (folder / "model.json").write_text(json.dumps(trained["arch"], indent=2))
    figures = measure(
        trained["arch"], folder, choice_batches(features), evaluate_cfg.latency_repeats, runtimes
    )
    return {"name": BASELINE, "recipe": [], **figures}


def measure_points(
    points: list[dict[str, Any]],
    arches: dict[str, dict[str, Any]],
    results: dict[str, dict[str, Any]],
    features: Manifest,
    evaluate_cfg: EvaluateConfig,
    runtimes: tuple[str, ...],
    calibration: np.ndarray | None,
    out: StageDir,
) -> list[dict[str, Any]]:
    """Every point measured here one after the other in each runtime (after the baseline):
    side by side, on a machine the fine-tunes have left. Finishing a point (encoding, int8)
    updates `arches`."""
    batches = choice_batches(features)
    repeats = evaluate_cfg.latency_repeats
    rows = []
    with Progress("compress", "points measured", len(points)) as progress:
        for i, point in enumerate(points, 1):
            folder = out.path(f"points/{point['name']}")
            result = results.get(point["trunk"], {})
            if "error" in result:
                rows.append({**point, "error": result["error"]})
            else:
                arch = arches[point["name"]] = finish_point(point, arches[point["name"]], folder)
                figures = measure(arch, folder, batches, repeats, runtimes, calibration)
                rows.append({**point, **figures})
            progress.step(i, point["name"])
    return rows


def training_rows(features: Manifest, n: int) -> np.ndarray:
    """The first `n` rows of the training split (it was shuffled when split): what static
    int8 calibrates its activation ranges on, never validation or test rows."""
    taken, have = [], 0
    for X, _ in split_batches(features, "train")():
        taken.append(X[: n - have])
        have += len(taken[-1])
        if have >= n:
            break
    return np.concatenate(taken)


def served_model(out: StageDir, runtime: str) -> dict[str, Any]:
    """The manifest's model files (written in `out`): weights, spec, the compact encoding
    of pruned or clustered weights (what the registered model carries) and, when
    onnxruntime serves it, the ONNX export."""
    files = model_files(out)
    if out.path("encoded.npz").is_file():
        (files["encoded"],) = out.describe("encoded.npz")
    if runtime == "onnxruntime":
        (files["onnx"],) = out.describe("model.onnx")
    return files


def keep_trained(
    trained: Manifest, features: Manifest, runtime: str, out: StageDir
) -> dict[str, Any]:
    """`compress.recipe: []`: the trained model, unchanged and not re-measured; exported
    (its logits checked on the validation rows) when serve.runtime is onnxruntime."""
    model = trained["model"]
    if runtime == "onnxruntime":
        shutil.copy(trained["model"]["weights"]["path"], out.path("model.pt"))
        (out.path("model.json")).write_text(json.dumps(trained["arch"], indent=2))
        split = "val" if features["splits"]["val"]["rows"] else "train"
        batches = split_batches(features, split)
        row = measure(trained["arch"], out.path(""), batches, 3, ("onnxruntime",))
        if "onnx_error" in row:
            raise RuntimeError(
                f"serve.runtime is onnxruntime, but the trained model cannot run there "
                f"({row['onnx_error']}): set serve.runtime to auto or torch"
            )
        model = served_model(out, runtime)
    return {
        "model": model,
        "arch": trained["arch"],
        "result": {},
        "recipe": [],
        "chosen": BASELINE,
        "runtime": "onnxruntime" if runtime == "onnxruntime" else "torch",
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
        "runtime": cfg.serve.runtime,
        "choice": cfg.evaluate.model_dump(
            mode="json",
            include={"max_accuracy_drop", "budget_confidence", "objective", "latency_repeats"},
        ),
    }


def build_compression(cfg: PipelineConfig, inputs: Inputs, out: StageDir, hooks: Hooks) -> dict:
    # a sweep and a search fine-tune their points on the cluster; one recipe needs none
    on_cluster = cfg.compress.sweep or cfg.compress.search.enabled
    cluster = dask_client(cfg.dask) if on_cluster else contextlib.nullcontext()
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
            cfg.serve.runtime,
        )


# what the Models tab shows for each point and the registered model (one column each, the
# figures a reviewer compares): the nested runs keep every measured figure
MODEL_METRICS = tuple(
    f"point/{k}" for k in ("val_accuracy", "val_macro_f1", "latency_b256_p50_ms", "size_zstd_bytes")
)


def point_figures(row: dict[str, Any]) -> dict[str, float]:
    """A point's measured figures as metrics (`point/<figure>`)."""
    return {
        f"point/{k}": v
        for k, v in row.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("sparsity", "bits")
    }


def point_runs(manifest: Manifest) -> list[ChildRun]:
    """Each point (and the baseline) as a nested run and a model of its own: its recipe and
    levels, every measured figure, whether it is on a Pareto front and chosen; a failed one
    with its reason."""
    runs = []
    for row in manifest["table"]:
        params = {"compress.recipe": row["recipe"] or "none"}
        params |= {
            f"compress.{k}": row[k]
            for k in ("sparsity", "bits", "layer_removed")
            if row.get(k) is not None
        }
        figures = [(k, v, 0) for k, v in point_figures(row).items()]
        tags = {
            "accelflow.stage": "compress-point",
            "accelflow.point.pareto": row.get("pareto", ""),
            "accelflow.point.chosen": str(row.get("chosen", False)).lower(),
        }
        if row.get("runtime"):
            tags["accelflow.point.runtime"] = row["runtime"]
        for key in ("error", "onnx_error"):
            if key in row:
                tags[f"accelflow.point.{key}"] = row[key]
        status = "FAILED" if "error" in row else "FINISHED"
        # every point is measured on the validation split (the test split chooses nothing)
        runs.append(
            ChildRun(
                row["name"], params, figures, tags, status, "compress-point", "val", MODEL_METRICS
            )
        )
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
