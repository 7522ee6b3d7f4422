"""The served model: raw feature rows in, class labels out.

`Predictor` bundles the fitted reduction (if any), the network and the class names. The
evaluate stage scores the test split through the very same `Predictor` that the MLflow
pyfunc wraps, so the accuracy in MLflow is the accuracy a user of the registered model gets.
The network runs in torch or, when the bundle says `runtime: onnxruntime`, from its ONNX
export in onnxruntime (then torch is not imported to score).
"""

from __future__ import annotations

import json
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.encoding import Encoder
from tasks.reduce.pca import apply_reduction, load_reduction
from tasks.served.runtime import OnnxNetwork, torch_network


def torch_weights(folder: Path) -> Path:
    """A model's torch weights in `folder`: a pruned or clustered model's compact
    `encoded.npz` (decoded when loaded: the file registered is the small one), else the
    state dict `model.pt`."""
    encoded = folder / "encoded.npz"
    return encoded if encoded.is_file() else folder / "model.pt"


class Predictor:
    def __init__(self, bundle: str | Path, threads: int | None = None):
        self.bundle = bundle = Path(bundle)
        meta = json.loads((bundle / "meta.json").read_text())
        self.feature_names: list[str] = meta["feature_names"]
        self.raw_columns: list[str] = meta.get("raw_columns", self.feature_names)
        # compared with each input's columns: an Index compares in C, a list in Python
        self.feature_index = pd.Index(self.feature_names)
        self.classes: list[Any] = meta["classes"]
        self.class_array = np.asarray(self.classes)
        self.runtime: str = meta.get("runtime", "torch")
        encoder = bundle / "encoder.json"
        self.encoder = Encoder.load(encoder) if encoder.exists() else None
        reduction = bundle / "reduction.npz"
        self.reduction = load_reduction(reduction) if reduction.exists() else None
        # onnxruntime bundles carry the reduction inside model.onnx: rows go in encoded
        self.reduction_in_graph = bool(meta.get("reduction_in_graph"))
        if self.runtime == "onnxruntime":
            self.network = OnnxNetwork(bundle / "model.onnx", threads)
        else:
            self.network = torch_network(self.model)

    @cached_property
    def model(self):
        """The torch network (weights, embeddings; torch's own runtime)."""
        from tasks.training.models import load_model

        spec = json.loads((self.bundle / "model.json").read_text())
        return load_model(spec, self.weights_file)

    @property
    def weights_file(self) -> Path:
        return torch_weights(self.bundle)

    @property
    def network_files(self) -> list[Path]:
        """What takes encoded rows to logits, as a replica loads it: model.onnx (the
        reduction inside), or the weights and the reduction beside them."""
        if self.runtime == "onnxruntime":
            return [self.bundle / "model.onnx"]
        reduction = self.bundle / "reduction.npz"
        return [self.weights_file, *([reduction] if reduction.exists() else [])]

    def encoded_to_logits(self, X: np.ndarray) -> np.ndarray:
        """One call from encoded rows: the reduction (in numpy or in the graph) and the network."""
        return self.network(self.features(X))

    def reduced(self, X: np.ndarray) -> np.ndarray:
        """Encoded rows → what the torch network reads (the reduction applied, if any)."""
        X = np.asarray(X, dtype=np.float32)
        if self.reduction is not None:
            X = apply_reduction(X, self.reduction)
        return np.ascontiguousarray(X, dtype=np.float32)

    def features(self, X: np.ndarray) -> np.ndarray:
        """Encoded rows → what `network` takes: as they are when the graph reduces them."""
        if self.reduction_in_graph:
            return np.ascontiguousarray(X, dtype=np.float32)
        return self.reduced(X)

    def logits(self, X: np.ndarray, batch: int = 8192) -> np.ndarray:
        Z = self.features(X)
        if not len(Z):
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return np.concatenate([self.network(Z[i : i + batch]) for i in range(0, len(Z), batch)])

    def predict_codes(self, X: np.ndarray, batch: int = 8192) -> np.ndarray:
        return self.logits(X, batch).argmax(1)  # no softmax on the serving path

    def predict_proba(self, X: np.ndarray, batch: int = 8192) -> np.ndarray:
        """Class probabilities (softmax of the logits), one row per input row."""
        logits = self.logits(X, batch).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        odds = np.exp(logits)
        return (odds / odds.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.class_array[self.predict_codes(X)]

    def encode(self, frame) -> np.ndarray:
        """Raw rows (a DataFrame; for numeric features also an array in column order) → the
        features the reduction and network expect. This is the served model's input check
        (a wide model's MLflow signature leaves it out: see served.pyfunc.WIDE_INPUT)."""
        if self.encoder is not None:
            return self.encoder.transform(frame)
        if isinstance(frame, np.ndarray):
            if frame.ndim != 2 or frame.shape[1] != len(self.feature_names):
                raise ValueError(
                    f"input array has shape {frame.shape}; send rows of "
                    f"{len(self.feature_names)} features in training column order, or a DataFrame"
                )
            return frame.astype(np.float32, copy=False)
        if frame.columns.equals(self.feature_index):  # the usual case: no reordering copy
            selected = frame
        else:
            try:
                selected = frame[self.feature_names]
            except KeyError:
                missing = [c for c in self.feature_names if c not in frame.columns]
                raise ValueError(
                    f"input is missing feature column(s) {missing[:10]}; send raw rows "
                    "with the columns the model was trained on"
                ) from None
        try:  # one vectorised conversion, not a column-by-column rebuild
            return selected.to_numpy(dtype=np.float32)
        except (TypeError, ValueError):

            def not_numbers(column) -> bool:
                if pd.api.types.is_numeric_dtype(column):
                    return False
                return bool((pd.to_numeric(column, errors="coerce").isna() & column.notna()).any())

            bad = [c for c in self.feature_names if not_numbers(selected[c])]
            raise ValueError(
                f"input column(s) {bad[:10]} hold values that are not numbers; this model "
                "takes a number in every feature column"
            ) from None

    def predict_frame(self, frame) -> np.ndarray:
        return self.predict(self.encode(frame))


def write_bundle(
    dest: Path,
    model: dict[str, Any],
    reduction_path: str | None,
    meta: dict[str, Any],
    encoder_path: str | None = None,
) -> Path:
    """Copy weights, architecture, encoder, reduction and metadata into one self-contained
    folder; the ONNX export too when the model has one (`model["onnx"]`), served by
    onnxruntime when `meta["runtime"]` says so. A model with a compact encoding
    (`model["encoded"]`: pruned or clustered weights) travels as that, not as model.pt."""
    dest.mkdir(parents=True, exist_ok=True)
    if model.get("encoded"):
        shutil.copy(model["encoded"]["path"], dest / "encoded.npz")
    else:
        shutil.copy(model["weights"]["path"], dest / "model.pt")
    shutil.copy(model["arch"]["path"], dest / "model.json")
    if model.get("onnx"):
        shutil.copy(model["onnx"]["path"], dest / "model.onnx")
    if meta.get("runtime") == "onnxruntime" and not model.get("onnx"):
        raise ValueError("runtime onnxruntime, but the model has no ONNX export")
    if reduction_path:
        shutil.copy(reduction_path, dest / "reduction.npz")
    if encoder_path:
        shutil.copy(encoder_path, dest / "encoder.json")
    (dest / "meta.json").write_text(json.dumps(meta, indent=2))
    return dest
