"""Models chosen by name in config. Imports torch only (the DDP worker and serving use it).

Every model starts with a `Standardize` layer whose mean/std buffers are fitted on the
training split, so raw-scale features (pixels 0..255, PCA scores, CSV columns) train well
and the saved weights carry their own preprocessing to serving.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Standardize(nn.Module):
    def __init__(self, n_features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MLP(nn.Module):
    def __init__(self, n_features: int, n_classes: int, hidden: list[int], dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.standardize = Standardize(n_features)
        self.body = nn.Sequential(*layers, nn.Linear(width, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.standardize(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The learned representation: the last hidden layer's activations."""
        return self.body[:-1](self.standardize(x))


class CNN(nn.Module):
    """Two conv blocks and a small head, for images flattened to rows (C·H·W features)."""

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        image_shape: list[int],
        hidden: list[int],
        dropout: float,
    ):
        super().__init__()
        channels, height, width = image_shape
        if channels * height * width != n_features:
            raise ValueError(f"image_shape {image_shape} does not match {n_features} features")
        self.image_shape = list(image_shape)
        self.standardize = Standardize(n_features)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 64 * (height // 4) * (width // 4)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(flat, hidden[0]),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden[0], n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.standardize(x).view(-1, *self.image_shape)
        return self.head(self.features(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The learned representation: the head's hidden activations."""
        x = self.standardize(x).view(-1, *self.image_shape)
        return self.head[:-1](self.features(x))


def build_model(arch: dict[str, Any]) -> nn.Module:
    """`arch` is the JSON-able description saved beside the weights (model.json)."""
    name = arch["model"]
    if name == "mlp":
        return MLP(arch["n_features"], arch["n_classes"], arch["hidden"], arch["dropout"])
    if name == "cnn":
        if not arch.get("image_shape"):
            raise ValueError(
                "train.model 'cnn' needs image data (an IDX source or 3-D .npz X) "
                "and reduce.method: none"
            )
        return CNN(
            arch["n_features"],
            arch["n_classes"],
            arch["image_shape"],
            arch["hidden"],
            arch["dropout"],
        )
    raise ValueError(f"train.model: unknown model '{name}'; choose mlp or cnn")
