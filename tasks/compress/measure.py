"""Every figure of one model, measured the same way for the baseline and each point."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

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
    with counter, torch.inference_mode():
        model(torch.zeros(1, arch["n_features"]))
    return counter.get_total_flops() // 2


def measure(
    arch: dict[str, Any],
    folder: Path,
    batches: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]],
    repeats: int,
    served: dict[str, Any] | None,
) -> dict[str, Any]:
    """Every figure of one model, the same way for all: validation quality, network latency
    (p50/p95, batch 1 and 256, 1 thread and all cores), served latency, size and work."""
    import torch

    from tasks.evaluate import class_figures, confusion_of
    from tasks.served.predictor import write_bundle
    from tasks.served.pyfunc import served_latency, timed_ms
    from tasks.training.models import load_model, weight_counts

    weights = folder / "model.pt"
    model = load_model(arch, str(weights))
    n = arch["n_classes"]
    confusion = np.zeros((n, n), dtype=np.int64)
    row: dict[str, Any] = {}
    Z = None  # the first rows: what the timings run on
    with torch.inference_mode():
        for X, y in batches():
            part = torch.from_numpy(X)
            codes = torch.cat(
                [model(part[i : i + 4096]).argmax(1) for i in range(0, len(part), 4096)]
            )
            confusion += confusion_of(y, codes.numpy(), n)
            Z = part[:256] if Z is None else Z
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
    figures = class_figures(confusion)
    parameters, nonzero = weight_counts(model)
    raw = weights.read_bytes()
    encoded = folder / "encoded.npz"
    return {
        "val_accuracy": figures["accuracy"],
        "val_macro_f1": figures["macro_f1"],
        **row,
        **served_ms,
        "parameters": parameters,
        "nonzero_parameters": nonzero,
        "macs": count_macs(arch),
        "size_bytes": len(raw),
        "size_zstd_bytes": len(zstandard.ZstdCompressor(level=19).compress(raw)),
        "size_encoded_bytes": encoded.stat().st_size if encoded.is_file() else len(raw),
    }


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
