"""The served model: raw feature rows in, class labels out.

`Predictor` bundles the fitted reduction (if any), the network and the class names. The
evaluate stage scores the test split through the very same `Predictor` that the MLflow
pyfunc wraps, so the accuracy in MLflow is the accuracy a user of the registered model gets.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.encoding import Encoder
from tasks.reduce.pca import apply_reduction, load_reduction
from tasks.training.models import load_model


class Predictor:
    def __init__(self, bundle: str | Path):
        self.bundle = bundle = Path(bundle)
        meta = json.loads((bundle / "meta.json").read_text())
        self.feature_names: list[str] = meta["feature_names"]
        self.raw_columns: list[str] = meta.get("raw_columns", self.feature_names)
        self.classes: list[Any] = meta["classes"]
        encoder = bundle / "encoder.json"
        self.encoder = Encoder.load(encoder) if encoder.exists() else None
        reduction = bundle / "reduction.npz"
        self.reduction = load_reduction(reduction) if reduction.exists() else None
        self.model = load_model(
            json.loads((bundle / "model.json").read_text()), bundle / "model.pt"
        )

    def features(self, X: np.ndarray) -> torch.Tensor:
        X = np.asarray(X, dtype=np.float32)
        if self.reduction is not None:
            X = apply_reduction(X, self.reduction)
        return torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))

    @torch.inference_mode()
    def logits(self, X: np.ndarray, batch: int = 8192) -> torch.Tensor:
        Z = self.features(X)
        return torch.cat([self.model(Z[i : i + batch]) for i in range(0, len(Z), batch)])

    def predict_codes(self, X: np.ndarray, batch: int = 8192) -> np.ndarray:
        return self.logits(X, batch).argmax(1).numpy()  # no softmax on the serving path

    def predict_proba(self, X: np.ndarray, batch: int = 8192) -> np.ndarray:
        """Class probabilities (softmax of the logits), one row per input row."""
        return self.logits(X, batch).softmax(1).numpy()

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.classes)[self.predict_codes(X)]

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
            import pandas as pd

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
    """Copy weights, architecture, encoder, reduction and metadata into one self-contained folder."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(model["weights"]["path"], dest / "model.pt")
    shutil.copy(model["arch"]["path"], dest / "model.json")
    if reduction_path:
        shutil.copy(reduction_path, dest / "reduction.npz")
    if encoder_path:
        shutil.copy(encoder_path, dest / "encoder.json")
    (dest / "meta.json").write_text(json.dumps(meta, indent=2))
    return dest
