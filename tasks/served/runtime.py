"""The network in either runtime (`serve.runtime`), numpy in and out: torch, or its ONNX
export in onnxruntime.

Each runtime is imported only when used, and never the export tooling (torch.onnx, onnx,
onnxscript): a replica that serves an exported model needs onnxruntime alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

RUNTIMES = ("torch", "onnxruntime")
# the onnxruntime session's threads where the Predictor does not say (0: onnxruntime's
# default, one per physical core); a replica pinned to one core sets it to 1
THREADS_ENV = "ACCELFLOW_THREADS"


def torch_network(model) -> Callable[[np.ndarray], np.ndarray]:
    """Features → logits by a torch model, numpy in and out like `OnnxNetwork`."""
    import torch

    def network(Z: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(Z, dtype=np.float32))).numpy()

    return network


class OnnxNetwork:
    """Features (float32 rows) → logits, by an onnxruntime CPU session on `model.onnx`."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = (
            threads if threads is not None else int(os.environ.get(THREADS_ENV, "0"))
        )
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: no per-session warnings in a log
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, Z: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(Z, dtype=np.float32)})[0]
