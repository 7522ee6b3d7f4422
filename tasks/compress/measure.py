"""Every figure of one model, measured the same way for the baseline and each point."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from tasks.compress.choice import ANSWERS
from tasks.compress.export import PARITY_ATOL, export_point, parity, served_network
from tasks.evaluate import class_figures, confusion_of
from tasks.served.predictor import torch_weights, write_bundle
from tasks.served.pyfunc import served_latency, timed_ms, timing_rows
from tasks.served.runtime import OnnxNetwork, torch_network
from tasks.store import Manifest
from tasks.train import split_files


def split_batches(
    manifest: Manifest, split: str
) -> Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]:
    """A split's features and label codes as the stage stored them, a Parquet part at a
    time (never the whole split in memory)."""

    def batches():
        import pyarrow.parquet as pq

        from tasks.reduce.pca import read_features

        for f in split_files(manifest, split):
            X = read_features(f, manifest["feature_names"]).astype(np.float32)
            yield X, pq.read_table(f, columns=[manifest["label"]]).column(0).to_numpy()

    return batches


def count_macs(arch: dict[str, Any]) -> int:
    """Multiply-accumulates of one row through the float network (matmuls, convolutions,
    attention; int8 keeps the count, zeros do not lower it on a dense kernel)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tasks.training.models import build_model

    model = build_model({k: v for k, v in arch.items() if k != "quantize"}).eval()
    counter = FlopCounterMode(display=False)
    # with gradients on: in inference mode a transformer layer takes PyTorch's fused kernel,
    # which the counter cannot see into (it counted the unpruned transformer's attention as 0)
    with counter:
        model(torch.zeros(1, arch["n_features"]))
    return counter.get_total_flops() // 2


def measure(
    arch: dict[str, Any],
    folder: Path,
    batches: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]],
    repeats: int,
    runtimes: tuple[str, ...],
    calibration: np.ndarray | None = None,
) -> dict[str, Any]:
    """Every figure of one model, the same way for all, in each of `runtimes` (torch; the
    ONNX export in onnxruntime, its float logits checked against torch's on every row):
    validation quality, network latency (p50/p95, batch 1 and 256, 1 thread and all cores)
    and file size, as `<runtime>_<figure>`; parameters and work once. An export that fails
    or breaks parity leaves `onnx_error` and no onnxruntime figures."""
    import torch

    from tasks.training.models import load_model, weight_counts

    weights = folder / "model.pt"
    model = load_model(arch, str(weights))
    networks: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    files: dict[str, Path] = {}
    row: dict[str, Any] = {}
    if "torch" in runtimes:
        # sized as registered: a pruned or clustered model's compact encoding
        networks["torch"], files["torch"] = torch_network(model), torch_weights(folder)
    quantized = False
    if "onnxruntime" in runtimes:
        try:
            files["onnxruntime"], quantized = export_point(arch, folder, calibration)
            networks["onnxruntime"] = OnnxNetwork(files["onnxruntime"], threads=1)
        except Exception as exc:  # an unexportable model is served by torch
            row["onnx_error"] = f"export: {type(exc).__name__}: {exc}"[:500]
    check = "onnxruntime" in networks and not quantized
    n = arch["n_classes"]
    confusions = {r: np.zeros((n, n), dtype=np.int64) for r in networks}
    answers: dict[str, list[np.ndarray]] = {r: [] for r in networks}  # right or wrong, per row
    worst, differ, Z = 0.0, 0, None  # Z: 256 first rows (repeated if fewer), timed on
    for X, y in batches():
        outputs = {}
        for r, network in networks.items():
            outputs[r] = np.concatenate([network(X[i : i + 4096]) for i in range(0, len(X), 4096)])
            predicted = outputs[r].argmax(1)
            confusions[r] += confusion_of(y, predicted, n)
            answers[r].append(predicted == y)
        if check:
            # the float export against torch (computed here when torch is not measured)
            expected = outputs["torch"] if "torch" in outputs else torch_network(model)(X)
            diff, wrong = parity(expected, outputs["onnxruntime"])
            worst, differ = max(worst, diff), differ + wrong
        Z = timing_rows(X) if Z is None else Z
    if check:
        row["onnx_max_abs_diff"], row["onnx_differing_rows"] = worst, differ
        if worst > PARITY_ATOL or differ:
            row["onnx_error"] = (
                f"parity: ONNX logits differ from torch's by up to {worst:.2g} "
                f"(tolerance {PARITY_ATOL:g}), {differ} validation row(s) answered differently"
            )
            del networks["onnxruntime"], confusions["onnxruntime"], answers["onnxruntime"]
    for r, network in networks.items():
        figures = class_figures(confusions[r])
        raw = files[r].read_bytes()
        row |= {
            f"{r}_val_accuracy": figures["accuracy"],
            f"{r}_val_macro_f1": figures["macro_f1"],
            **{f"{r}_{k}": v for k, v in latencies(network, r, files[r], Z, repeats).items()},
            f"{r}_size_bytes": len(raw),
            f"{r}_size_zstd_bytes": len(zstandard.ZstdCompressor(level=19).compress(raw)),
        }
    if torch.cuda.is_available() and not arch.get("quantize"):  # int8 here is CPU-only
        # the Timer synchronises the device around each call, so these are kernel times
        on_gpu = load_model(arch, str(weights)).cuda()
        with torch.inference_mode():
            for batch in (1, 256):
                x = torch.from_numpy(Z[:batch]).cuda()
                p50, p95 = timed_ms(lambda x=x: on_gpu(x), repeats)
                row[f"latency_b{batch}_p50_ms_cuda"] = p50
                row[f"latency_b{batch}_p95_ms_cuda"] = p95
    parameters, nonzero = weight_counts(model)
    return {
        **row,
        ANSWERS: {r: np.concatenate(a) for r, a in answers.items() if a},
        "parameters": parameters,
        "nonzero_parameters": nonzero,
        "macs": count_macs(arch),
        "size_encoded_bytes": torch_weights(folder).stat().st_size,
    }


def latencies(
    network: Callable[[np.ndarray], np.ndarray], runtime: str, file: Path, Z, repeats: int
) -> dict[str, float]:
    """p50/p95 at batch 1 and 256, on 1 thread (a typical serving replica) and on every
    core. torch's thread count is the Timer's; onnxruntime's is its session's."""
    out = {}
    for threads in dict.fromkeys((1, os.cpu_count() or 1)):
        tag = "" if threads == 1 else f"_t{threads}"
        if runtime == "onnxruntime" and threads > 1:
            network = OnnxNetwork(file, threads=threads)
        for batch in (1, 256):
            p50, p95 = timed_ms(lambda b=batch, f=network: f(Z[:b]), repeats, threads)
            out[f"latency_b{batch}_p50_ms{tag}"] = p50
            out[f"latency_b{batch}_p95_ms{tag}"] = p95
    return out


def served_figures(
    arch_file: Path, folder: Path, runtime: str, served: dict[str, Any], repeats: int
) -> dict[str, float]:
    """The served path of one point in its chosen runtime: `mlflow.pyfunc` predict on raw
    rows, batch 1 and 256 (a sweep's table; with one recipe, evaluate measures it)."""
    encoded = folder / "encoded.npz"
    model = {
        "weights": {"path": str(folder / "model.pt")},
        "arch": {"path": str(arch_file)},
        "onnx": {"path": str(folder / "model.onnx")} if runtime == "onnxruntime" else None,
        "encoded": {"path": str(encoded)} if encoded.is_file() else None,
    }
    scratch = folder / "served.onnx"
    model, meta = served_network(model, runtime, served["reduction"], scratch)
    bundle = write_bundle(
        folder / "bundle", model, served["reduction"], served["meta"] | meta, served["encoder"]
    )
    try:
        return served_latency(bundle, served["example"], folder / "served", repeats)
    finally:
        shutil.rmtree(folder / "bundle")
        shutil.rmtree(folder / "served", ignore_errors=True)
        scratch.unlink(missing_ok=True)


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
