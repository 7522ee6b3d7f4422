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
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from conf.schema import (
    COMPRESSION_STEPS,
    CompressConfig,
    EvaluateConfig,
    PipelineConfig,
    TrainConfig,
)
from tasks.cluster import dask_client
from tasks.progress import Progress, gather
from tasks.spec import ChildRun, Hooks, Inputs, StageSpec
from tasks.store import Manifest, StageDir
from tasks.train import model_files, split_files, train_key, train_spec, tuned_config
from tasks.training.launch import EpochHook, launch, resolve_world_size

BASELINE = "baseline"
# what `evaluate.objective` minimises, per point (1 thread: a typical serving replica)
OBJECTIVE_KEY = {"latency": "latency_b256_p50_ms", "size": "size_zstd_bytes"}


# ---------------------------------------------------------------- the points


def point_name(recipe: list[str], sparsity: float | None, bits: int | None) -> str:
    shown = {
        "sparsity": lambda step: f"{step}-{sparsity:g}",
        "bits": lambda step: f"{step}-{bits}b",
    }
    return "+".join(
        shown[level](step) if (level := COMPRESSION_STEPS[step].level) else step for step in recipe
    )


def sweep_points(cfg: CompressConfig) -> list[dict[str, Any]]:
    """Every recipe at every level it uses: sparsity for a pruning step, bits for cluster."""
    if cfg.sweep:
        recipes, sparsities, bit_levels = cfg.sweep.recipes, cfg.sweep.sparsity, cfg.sweep.bits
    else:
        recipes, sparsities, bit_levels = [cfg.recipe], [cfg.sparsity], [cfg.bits]
    points = []
    for recipe in recipes:
        levels = {COMPRESSION_STEPS[step].level for step in recipe}
        for sparsity in sparsities if "sparsity" in levels else [None]:
            for bits in bit_levels if "bits" in levels else [None]:
                points.append(
                    {
                        "name": point_name(recipe, sparsity, bits),
                        "recipe": list(recipe),
                        "sparsity": sparsity,
                        "bits": bits,
                    }
                )
    return points


def sparsity_schedule(target: float, rounds: int) -> list[float]:
    """Each round removes the same fraction of what is left; the last hits `target` exactly."""
    keep = (1.0 - target) ** (1.0 / rounds)
    return [round(1.0 - keep ** (i + 1), 6) for i in range(rounds - 1)] + [target]


def phases(point: dict[str, Any], cfg: CompressConfig) -> list[dict[str, Any]]:
    """The fine-tuning phases the worker runs for this point (none for int8 alone)."""
    tune = {"epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr}
    recipe, out = point["recipe"], []
    if "magnitude" in recipe:
        out += [{"sparsity": s, **tune} for s in sparsity_schedule(point["sparsity"], cfg.rounds)]
    if "structured" in recipe:
        out.append({"sparsity": None, **tune})
    if "cluster" in recipe:  # share the surviving weights, the zeros kept by the last mask
        last = out[-1]["sparsity"] if out else None
        out.append({"sparsity": last, "cluster_bits": point["bits"], **tune})
    return out


def slim_model(arch: dict[str, Any], weights: str, ratio: float, dest: Path) -> dict[str, Any]:
    """Structured pruning: remove `ratio` of each hidden layer's width; save the slim weights
    to `dest` and return the slim spec (rebuilt from JSON and checked against the pruned
    module, so what is saved is exactly what serving will build)."""
    import torch
    import torch_pruning as tp

    from tasks.training.models import build_model, classifier, widths

    model = build_model(arch)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    example = torch.zeros(2, arch["n_features"])
    tp.pruner.BasePruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[classifier(model)],  # the classes keep their outputs
    ).step()
    slim = {**arch, **widths(model)}
    rebuilt = build_model(slim)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    probe = torch.randn(4, arch["n_features"])
    with torch.inference_mode():
        if not torch.allclose(rebuilt(probe), model(probe), atol=1e-5):
            raise RuntimeError(
                "structured pruning: the slim spec does not rebuild the pruned model"
            )
    torch.save(rebuilt.state_dict(), dest)
    return slim


def finetune_spec(
    features: Manifest,
    arch: dict[str, Any],
    init_from: str,
    point_phases: list[dict[str, Any]],
    train_cfg: TrainConfig,
    folder: Path,
) -> dict[str, Any]:
    return {
        **train_spec(features, train_cfg, str(folder), str(folder / "checkpoints")),
        "arch": arch,
        "phases": point_phases,
        # fine-tuning restarts from a low LR; a warm-up cycle would undo the pruned model's fit
        "scheduler": "cosine" if train_cfg.scheduler == "onecycle" else train_cfg.scheduler,
        "warmup_epochs": 0,
        "early_stopping_patience": None,  # every round's epochs, so the mask schedule holds
        "init_from": init_from,
        "metric_prefix": "compress",
    }


def finetune_point(spec: dict[str, Any], index: int, threads: int) -> dict[str, Any]:
    """One sweep point's fine-tune in this (Dask worker) process, on GPU `index` modulo the
    GPUs when there are any (as tuning trials do). Never raises: a point that fails comes
    back with its reason and is left out of the choice."""
    import torch

    from tasks.training.worker import Rank, Trainer

    torch.set_num_threads(max(1, threads))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", index % torch.cuda.device_count())
    try:
        return Trainer(spec, Rank(0, 1, device), on_epoch=lambda *_: None).run()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def finish_point(point: dict[str, Any], arch: dict[str, Any], folder: Path) -> dict[str, Any]:
    """After fine-tuning: encode the sparse or shared weights (`encoded.npz`), or convert to
    int8; return the arch the saved weights need."""
    from tasks.training.clustering import encode
    from tasks.training.models import load_model

    weights = folder / "model.pt"
    (folder / "model.json").write_text(json.dumps(arch, indent=2))
    if "cluster" in point["recipe"]:
        point["encoded"] = encode(
            load_model(arch, str(weights)), point["bits"], folder / "encoded.npz"
        )
    elif "magnitude" in point["recipe"] and "quantize" not in point["recipe"]:
        point["encoded"] = encode(load_model(arch, str(weights)), None, folder / "encoded.npz")
    if "quantize" in point["recipe"]:
        arch = quantize_saved(arch, weights, folder / "model.json")
    return arch


def quantize_saved(arch: dict[str, Any], weights: Path, spec: Path) -> dict[str, Any]:
    """Replace the saved float32 weights by int8 ones (weights-only state dict) and mark the
    spec, so `load_model` rebuilds the int8 model without pickled modules."""
    import torch

    from tasks.training.models import QUANTIZE, load_model, quantize_dynamic_int8

    model = quantize_dynamic_int8(load_model(arch, str(weights)))
    torch.save(model.state_dict(), weights)
    quantized = {**arch, "quantize": QUANTIZE}
    spec.write_text(json.dumps(quantized, indent=2))
    return quantized


# ---------------------------------------------------------------- measuring


def read_split(manifest: Manifest, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's features and label codes as the stage stored them."""
    import pyarrow.parquet as pq

    from tasks.reduce.pca import read_features

    files = split_files(manifest, split)
    X = np.concatenate([read_features(f, manifest["feature_names"]) for f in files])
    y = np.concatenate(
        [pq.read_table(f, columns=[manifest["label"]]).column(0).to_numpy() for f in files]
    )
    return X.astype(np.float32), y


def count_macs(arch: dict[str, Any]) -> int:
    """Multiply-accumulates of one row through the float network (matmuls, convolutions,
    attention; int8 keeps the count, zeros do not lower it on a dense kernel)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tasks.training.models import build_model

    model = build_model({k: v for k, v in arch.items() if k != "quantize"}).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, arch["n_features"]))
    return counter.get_total_flops() // 2


def measure(
    arch: dict[str, Any],
    folder: Path,
    X: np.ndarray,
    y: np.ndarray,
    repeats: int,
    served: dict[str, Any] | None,
) -> dict[str, Any]:
    """Every figure of one model, the same way for all: validation quality, network latency
    (p50/p95, batch 1 and 256, 1 thread and all cores), served latency, size and work."""
    import torch
    from sklearn.metrics import f1_score

    from tasks.served.predictor import write_bundle
    from tasks.served.pyfunc import served_latency, timed_ms
    from tasks.training.models import load_model, weight_counts

    weights = folder / "model.pt"
    model = load_model(arch, str(weights))
    Z = torch.from_numpy(X)
    row: dict[str, Any] = {}
    with torch.inference_mode():
        codes = torch.cat([model(Z[i : i + 4096]).argmax(1) for i in range(0, len(Z), 4096)])
        codes = codes.numpy()
        for threads in dict.fromkeys((1, os.cpu_count() or 1)):
            tag = "" if threads == 1 else f"_t{threads}"
            for batch in (1, 256):
                p50, p95 = timed_ms(lambda b=batch: model(Z[:b]), repeats, threads)
                row[f"latency_b{batch}_p50_ms{tag}"] = p50
                row[f"latency_b{batch}_p95_ms{tag}"] = p95
        if torch.cuda.is_available() and not arch.get("quantize"):  # int8 here is CPU-only
            # the Timer synchronises the device around each call, so these are kernel times
            on_gpu = load_model(arch, str(weights)).cuda()
            for batch in (1, 256):
                x = Z[:batch].cuda()
                p50, p95 = timed_ms(lambda x=x: on_gpu(x), repeats)
                row[f"latency_b{batch}_p50_ms_cuda"] = p50
                row[f"latency_b{batch}_p95_ms_cuda"] = p95
    served_ms = {}
    if served:  # a sweep's table; with one recipe, evaluate measures the served path
        bundle = write_bundle(
            folder / "bundle",
            {"weights": {"path": str(weights)}, "arch": {"path": str(folder / "model.json")}},
            served["reduction"],
            served["meta"],
            served["encoder"],
        )
        served_ms = served_latency(bundle, served["example"], folder / "served", repeats)
        shutil.rmtree(folder / "bundle")
        shutil.rmtree(folder / "served")
    parameters, nonzero = weight_counts(model)
    raw = weights.read_bytes()
    encoded = folder / "encoded.npz"
    return {
        "val_accuracy": float((codes == y).mean()),
        "val_macro_f1": float(f1_score(y, codes, average="macro")),
        **row,
        **served_ms,
        "parameters": parameters,
        "nonzero_parameters": nonzero,
        "macs": count_macs(arch),
        "size_bytes": len(raw),
        "size_zstd_bytes": len(zstandard.ZstdCompressor(level=19).compress(raw)),
        "size_encoded_bytes": encoded.stat().st_size if encoded.is_file() else len(raw),
    }


# ---------------------------------------------------------------- choosing


def choose(rows: list[dict[str, Any]], cfg: EvaluateConfig) -> tuple[dict[str, Any] | None, str]:
    """The best point on the objective within the accuracy tolerance of the baseline (the
    first row); None (keep the baseline) when no point is. Returns the point and why."""
    baseline, points = rows[0], [r for r in rows[1:] if "error" not in r]
    failed = f" ({len(rows) - 1 - len(points)} failed)" if len(points) < len(rows) - 1 else ""
    key = OBJECTIVE_KEY[cfg.objective]
    floor = baseline["val_accuracy"] - cfg.max_accuracy_drop
    within = [p for p in points if p["val_accuracy"] >= floor]
    if not within:
        return None, (
            f"no point is within evaluate.max_accuracy_drop {cfg.max_accuracy_drop} of the "
            f"baseline's validation accuracy {baseline['val_accuracy']:.4f}: the trained model "
            "is kept"
        )
    best = min(within, key=lambda p: (p[key], -p["val_accuracy"]))
    shown = "{:.3f} ms" if cfg.objective == "latency" else "{:,.0f} bytes"
    return best, (
        f"**{best['name']}**: the lowest {key} ({shown.format(best[key])}, baseline "
        f"{shown.format(baseline[key])}: {baseline[key] / max(best[key], 1e-12):.2f}×) of the "
        f"{len(within)} of {len(points)} measured points{failed} whose validation accuracy is within "
        f"evaluate.max_accuracy_drop {cfg.max_accuracy_drop} of the baseline's "
        f"{baseline['val_accuracy']:.4f} (this point: {best['val_accuracy']:.4f})"
    )


def pareto(rows: list[dict[str, Any]], cost: str) -> set[str]:
    """Names of the rows no other row beats on both validation accuracy and `cost`."""
    ok = [r for r in rows if "error" not in r]
    return {
        r["name"]
        for r in ok
        if not any(
            o["val_accuracy"] >= r["val_accuracy"]
            and o[cost] <= r[cost]
            and (o["val_accuracy"] > r["val_accuracy"] or o[cost] < r[cost])
            for o in ok
        )
    }


TABLE_COLUMNS = [
    "name",
    "val_accuracy",
    "val_macro_f1",
    "latency_b1_p50_ms",
    "latency_b256_p50_ms",
    "served_b1_ms",
    "served_b256_ms",
    "parameters",
    "nonzero_parameters",
    "macs",
    "size_zstd_bytes",
    "size_encoded_bytes",
    "pareto",
    "chosen",
]


def pareto_markdown(rows: list[dict[str, Any]], why: str) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if v < 10 else f"{v:,.1f}"
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|---" * len(TABLE_COLUMNS) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |")
        else:
            lines.append("| " + " | ".join(cell(r.get(c, "")) for c in TABLE_COLUMNS) + " |")
    return (
        "\n".join(lines)
        + "\n\nChosen: "
        + why
        + "\n\nValidation split; latencies are medians of one-thread calls (p95 and all-core "
        "figures in the JSON table). pareto: L = on the accuracy/batch-1 latency front, "
        "S = on the accuracy/encoded size front.\n"
    )


def plot_pareto(rows: list[dict[str, Any]], path: Path, floor: float) -> None:
    """Accuracy against three costs, fronts dashed, baseline ★, chosen circled and the
    accuracy floor (baseline − evaluate.max_accuracy_drop) dotted unless far below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    for ax, cost, label in (
        (axes[0], "latency_b1_p50_ms", "batch-1 latency p50, ms (1 thread)"),
        # the latency objective's own axis, so the choice can be read off a picture
        (axes[1], "latency_b256_p50_ms", "batch-256 latency p50, ms (1 thread)"),
        (axes[2], "size_encoded_bytes", "encoded size, bytes"),
    ):
        front = pareto(rows, cost)
        on_front = sorted((r for r in ok if r["name"] in front), key=lambda r: r[cost])
        ax.plot(
            [r[cost] for r in on_front],
            [r["val_accuracy"] for r in on_front],
            color="tab:gray",
            linestyle="--",
            label="Pareto front",
        )
        for r in ok:
            marker, color = ("*", "black") if r["name"] == BASELINE else ("o", "tab:blue")
            ax.scatter([r[cost]], [r["val_accuracy"]], marker=marker, s=90, color=color)
            ax.annotate(
                r["name"],
                (r[cost], r["val_accuracy"]),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
            if r["chosen"]:
                ax.scatter(
                    [r[cost]],
                    [r["val_accuracy"]],
                    s=220,
                    facecolors="none",
                    edgecolors="tab:red",
                    label="chosen",
                )
        low, high = ax.get_ylim()
        if floor >= low - (high - low) / 2:  # in view, or near enough to widen the view
            ax.axhline(floor, color="tab:red", linestyle=":", label="accuracy floor")
            ax.set_ylim(min(low, floor - (high - low) / 20), high)
        ax.set(
            xscale="log",
            xlabel=label,
            ylabel="validation accuracy",
            title=f"Accuracy vs {label.split(',')[0]} (★ baseline)",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- the stage


def served_context(partitions: Manifest, features: Manifest) -> dict[str, Any]:
    """What the served path needs besides the network: encoder, reduction, raw rows."""
    from tasks.evaluate import input_example

    return {
        "reduction": features["reduction"]["path"] if features.get("reduction") else None,
        "encoder": partitions["encoder"]["path"] if partitions.get("encoder") else None,
        "meta": {
            "feature_names": partitions["feature_names"],
            "classes": partitions["classes"],
            "raw_columns": partitions.get("raw_columns", partitions["feature_names"]),
        },
        "example": input_example(partitions),
    }


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
    # a point's fine-tune is its recipe without int8 (which needs none): structured and
    # structured+quantize share one; int8 alone starts from the trained weights
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
            "spec": finetune_spec(features, arch, init_from, phases(point, cfg), train_cfg, folder),
        }
    specs = {name: trunk["spec"] for name, trunk in trunks.items()}
    results: dict[str, dict[str, Any]] = {}
    if len(specs) > 1:  # in parallel on the cluster, one process each
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
        results = dict(zip(specs, done, strict=True))
    elif specs:  # one fine-tune (one recipe, or a sweep's only one): DDP on every core
        ((name, spec),) = specs.items()
        results[name] = launch(
            spec,
            resolve_world_size(train_cfg),
            Path(spec["out_dir"]),
            on_epoch,
            nnodes=train_cfg.nnodes,
            endpoint=train_cfg.rdzv_endpoint,
            max_restarts=train_cfg.max_restarts,
        )
    arches = {}
    for point in points:  # each point's own folder: the fine-tuned (or trained) weights
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
    # measured one after the other, here: side by side, on a machine the fine-tunes have left
    X, y = read_split(features, "val" if features["splits"]["val"]["rows"] else "train")
    served = served_context(partitions, features) if cfg.sweep else None
    repeats = evaluate_cfg.latency_repeats
    base_folder = out.path(f"points/{BASELINE}")
    base_folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(trained["model"]["weights"]["path"], base_folder / "model.pt")
    (base_folder / "model.json").write_text(json.dumps(trained["arch"], indent=2))
    rows = [
        {
            "name": BASELINE,
            "recipe": [],
            **measure(trained["arch"], base_folder, X, y, repeats, served),
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
                    {**point, **measure(arches[point["name"]], folder, X, y, repeats, served)}
                )
            progress.step(i, point["name"])
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
