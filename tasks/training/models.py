"""Models chosen by name in config (`mlp`, `cnn`, `rnn`, `transformer`). Imports torch only
(the DDP worker and serving use it).

Every model starts with a `Standardize` layer whose mean/std buffers are fitted on the
training split, so raw-scale features (pixels 0..255, PCA scores, CSV columns) train well
and the saved weights carry their own preprocessing to serving.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Standardize(nn.Module):
    def __init__(self, n_features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Periodic(nn.Module):
    """PLR numeric embeddings, "lite" (Gorishniy et al. 2022, "On Embeddings for Numerical
    Features in Tabular Deep Learning"): each standardised feature x becomes
    ReLU(W·[cos 2πcx, sin 2πcx]) with its own learned frequencies c (initial spread `scale`)
    and one W shared by all features. An MLP on one number per feature fits smooth functions
    of it; the frequencies let it fit the sharp, multi-modal ones trees find."""

    FREQUENCIES, WIDTH = 16, 16

    def __init__(self, n_features: int, scale: float):
        super().__init__()
        self.frequencies = nn.Parameter(
            torch.nn.init.trunc_normal_(
                torch.empty(n_features, self.FREQUENCIES), 0.0, scale, -3 * scale, 3 * scale
            )
        )
        self.linear = nn.Linear(2 * self.FREQUENCIES, self.WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * self.frequencies * x.unsqueeze(-1)  # (batch, features, k)
        waves = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return torch.relu(self.linear(waves)).flatten(1)


class MLP(nn.Module):
    """`embeddings`: [feature index, codes, width] for each coded categorical: its integer
    code picks a learned vector (entity embedding) instead of entering as a number whose
    order means nothing. Code n-1 is <rare> (rare and unseen values). `periodic`: the
    numeric features' Periodic embedding's initial scale (train.numeric_embedding)."""

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        hidden: list[int],
        dropout: float,
        embeddings: list[list[int]] | None = None,
        periodic: float | None = None,
    ):
        super().__init__()
        embeddings = embeddings or []
        coded = [i for i, _, _ in embeddings]
        dense = [i for i in range(n_features) if i not in set(coded)]
        self.register_buffer("coded", torch.tensor(coded, dtype=torch.long), persistent=False)
        self.register_buffer("dense", torch.tensor(dense, dtype=torch.long), persistent=False)
        self.embeddings = nn.ModuleList(nn.Embedding(n, w) for _, n, w in embeddings)
        self.periodic = Periodic(len(dense), periodic) if periodic and dense else None
        layers: list[nn.Module] = []
        numeric = len(dense) * (Periodic.WIDTH if self.periodic else 1)
        width = numeric + sum(w for _, _, w in embeddings)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.standardize = Standardize(n_features)
        self.body = nn.Sequential(*layers, nn.Linear(width, n_classes))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        z = self.standardize(x)
        if not len(self.embeddings):
            return self.periodic(z) if self.periodic else z
        codes = x[:, self.coded].round().long()
        looked_up = [
            table(codes[:, j].clamp(0, table.num_embeddings - 1))  # out of range: <rare>
            for j, table in enumerate(self.embeddings)
        ]
        numbers = z[:, self.dense]
        return torch.cat([self.periodic(numbers) if self.periodic else numbers, *looked_up], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.inputs(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The learned representation: the last hidden layer's activations."""
        return self.body[:-1](self.inputs(x))


CNN_CHANNELS = [32, 64]


class CNN(nn.Module):
    """Two conv blocks and a small head, for images flattened to rows (C·H·W features).
    `channels` are the blocks' widths (structured pruning narrows them)."""

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        image_shape: list[int],
        hidden: list[int],
        dropout: float,
        channels: list[int] | None = None,
    ):
        super().__init__()
        widths = channels
        channels, height, width = image_shape
        if channels * height * width != n_features:
            raise ValueError(f"image_shape {image_shape} does not match {n_features} features")
        self.image_shape = list(image_shape)
        self.standardize = Standardize(n_features)
        c1, c2 = widths or CNN_CHANNELS
        self.features = nn.Sequential(
            nn.Conv2d(channels, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = c2 * (height // 4) * (width // 4)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(flat, hidden[0]),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden[0], n_classes),
        )
        # NHWC weights and inputs: the layout oneDNN's (CPU) and cuDNN's fast conv kernels
        # read; on 2 cores a batch of 256 trains 1.4x and scores 1.7-2.2x faster than in
        # NCHW (benchmarks/train_benchmark.py --layout)
        self.features.to(memory_format=torch.channels_last)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        x = self.standardize(x).view(-1, *self.image_shape)
        return x.contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.images(x)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The learned representation: the head's hidden activations."""
        return self.head[:-1](self.features(self.images(x)))


class Sequencer(nn.Module):
    """Rows as a sequence of steps: an image's pixel rows (C·W values per step), or a table's
    features in equal chunks (zero-padded), so sequence models read either."""

    def __init__(self, n_features: int, image_shape: list[int] | None, chunk: int | None = None):
        super().__init__()
        if image_shape:
            channels, height, width = image_shape
            if channels * height * width != n_features:
                raise ValueError(f"image_shape {image_shape} does not match {n_features} features")
            self.shape, self.pad = [channels, height, width], 0
            self.steps, self.step_size = height, channels * width
        else:
            self.step_size = chunk or max(1, math.ceil(math.sqrt(n_features)))
            self.steps = math.ceil(n_features / self.step_size)
            self.shape, self.pad = None, self.steps * self.step_size - n_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape:  # (B, C, H, W) → (B, H, C·W): row h holds every channel's row h
            c, h, w = self.shape
            return x.view(-1, c, h, w).permute(0, 2, 1, 3).reshape(-1, h, c * w)
        if self.pad:
            x = F.pad(x, (0, self.pad))
        return x.view(-1, self.steps, self.step_size)


class RNN(nn.Module):
    """A GRU or LSTM (`train.cell`) over the rows of an image or chunks of a table's
    features; `len(hidden)` stacked layers of `hidden[0]` units; the last step's state
    feeds the classifier."""

    def __init__(self, n_features, n_classes, hidden, dropout, image_shape=None, cell="gru"):
        super().__init__()
        self.standardize = Standardize(n_features)
        self.sequence = Sequencer(n_features, image_shape)
        kind = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.rnn = kind(
            self.sequence.step_size,
            hidden[0],
            num_layers=len(hidden),
            batch_first=True,
            dropout=dropout if len(hidden) > 1 else 0.0,
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden[0], n_classes))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.sequence(self.standardize(x)))
        return out[:, -1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class KeptHeadsAttention(nn.Module):
    """Self-attention that keeps only some of the heads a layer was trained with (structured
    pruning removes the others): q, k and v project the width to `heads` × `head_dim`, the
    output projects back to the width. `nn.MultiheadAttention` cannot: its heads must fill
    the width. Called as `nn.TransformerEncoderLayer` calls its attention; a layer holding
    it takes the layer's standard path, not the fused one (which needs
    `nn.MultiheadAttention`'s own weights)."""

    batch_first = True
    _qkv_same_embed_dim = False  # what the layer's fused-path check reads to step aside

    def __init__(self, width: int, heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.num_heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.qkv = nn.Linear(width, 3 * heads * head_dim)  # [q heads | k heads | v heads]
        self.out_proj = nn.Linear(heads * head_dim, width)

    @property
    def in_proj_bias(self) -> torch.Tensor:  # read by the layer's fused-path check
        return self.qkv.bias

    def forward(self, query, key, value, attn_mask=None, key_padding_mask=None, **_):
        if attn_mask is not None or key_padding_mask is not None:
            raise ValueError("KeptHeadsAttention: masks are not supported (none is used here)")
        batch, tokens, _ = query.shape
        q, k, v = (
            self.qkv(query)
            .view(batch, tokens, 3, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
        )
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, -1)), None


class Transformer(nn.Module):
    """A small self-attention encoder: an image cut into `patch`×`patch` patches, or each
    feature of a table as a token (its value times a learned vector plus a learned bias,
    as in FT-Transformer); a class token, learned positions, pre-norm encoder layers
    (`len(hidden)` of width `hidden[0]`, `heads` heads); the class token is classified.
    A pruned one keeps `kept_heads` of each layer's heads and a feed-forward width `ff`."""

    def __init__(
        self,
        n_features,
        n_classes,
        hidden,
        dropout,
        image_shape=None,
        heads=4,
        patch=4,
        ff=None,
        kept_heads=None,
    ):
        super().__init__()
        width = hidden[0]
        if width % heads:
            raise ValueError(
                f"train.hidden[0] ({width}) must be a multiple of train.heads ({heads})"
            )
        self.standardize = Standardize(n_features)
        self.image_shape = list(image_shape) if image_shape else None
        if self.image_shape:
            channels, height, w = self.image_shape
            if height % patch or w % patch:
                raise ValueError(f"train.patch ({patch}) must divide the image size {height}x{w}")
            self.embed_tokens = nn.Conv2d(channels, width, patch, stride=patch)
            tokens = (height // patch) * (w // patch)
        else:
            self.value_weight = nn.Parameter(torch.randn(n_features, width) * 0.02)
            self.value_bias = nn.Parameter(torch.zeros(n_features, width))
            tokens = n_features
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(  # ff: the feed-forward width (structured pruning
            width,  # narrows it; 2 × width as trained)
            heads,
            ff or 2 * width,
            dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, len(hidden), enable_nested_tensor=False)
        if kept_heads is not None and kept_heads < heads:
            for encoder_layer in self.encoder.layers:
                encoder_layer.self_attn = KeptHeadsAttention(
                    width, kept_heads, width // heads, dropout
                )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.standardize(x)
        if self.image_shape:
            patches = self.embed_tokens(x.view(-1, *self.image_shape))  # (B, D, h, w)
            return patches.flatten(2).transpose(1, 2)
        return x.unsqueeze(-1) * self.value_weight + self.value_bias

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        # t.shape[0], not len(t): torch.export keeps the batch dynamic only so
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.position
        return self.norm(self.encoder(t)[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


MODELS = ("mlp", "cnn", "rnn", "transformer")


def build_model(arch: dict[str, Any]) -> nn.Module:
    """`arch` is the JSON-able description saved beside the weights (model.json)."""
    name = arch["model"]
    if name == "mlp":
        return MLP(
            arch["n_features"],
            arch["n_classes"],
            arch["hidden"],
            arch["dropout"],
            arch.get("embeddings"),
            arch.get("periodic"),
        )
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
            arch.get("channels"),
        )
    if name == "rnn":
        return RNN(
            arch["n_features"],
            arch["n_classes"],
            arch["hidden"],
            arch["dropout"],
            arch.get("image_shape"),
            arch.get("cell", "gru"),
        )
    if name == "transformer":
        return Transformer(
            arch["n_features"],
            arch["n_classes"],
            arch["hidden"],
            arch["dropout"],
            arch.get("image_shape"),
            arch.get("heads", 4),
            arch.get("patch", 4),
            arch.get("ff"),
            arch.get("kept_heads"),
        )
    raise ValueError(f"train.model: unknown model '{name}'; choose one of {', '.join(MODELS)}")


# structured pruning (tasks.compress) narrows hidden layers in place; these say which layer
# must keep its width (the classes) and read the narrowed widths back into the JSON spec


def classifier(model: nn.Module) -> nn.Linear:
    return model.body[-1] if isinstance(model, MLP) else model.head[-1]


def narrowable_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose outputs structured pruning removes (an MLP's hidden layers; a CNN's
    convolutions, then its head's hidden layer), in the order `widths` lists them."""
    if isinstance(model, MLP):
        return [m for m in model.body if isinstance(m, nn.Linear)][:-1]
    if isinstance(model, CNN):
        return [*(m for m in model.features if isinstance(m, nn.Conv2d)), model.head[2]]
    raise ValueError(f"no layer widths for {type(model).__name__}")


def widths(model: nn.Module) -> dict[str, list[int]]:
    """The layer widths of an MLP or CNN, as `build_model` takes them from the spec."""
    layers = narrowable_layers(model)
    if isinstance(model, MLP):
        return {"hidden": [m.out_features for m in layers]}
    return {"channels": [m.out_channels for m in layers[:-1]], "hidden": [layers[-1].out_features]}


# post-training dynamic int8 (tasks.compress, the `quantize` step): Linear weights stored as int8,
# activations quantized on the fly; convolutions and recurrent cells stay float32
QUANTIZE = "dynamic_int8"


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    import warnings

    with warnings.catch_warnings():  # torch.ao.quantization is deprecated but ships in 2.13
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(
            model.eval(), {nn.Linear}, dtype=torch.qint8
        )
    # the fused inference path reads linear1.weight as a tensor, and an int8 Linear's weight
    # is a method (it failed on every call)
    return without_fused_encoder(quantized)


def without_fused_encoder(model: nn.Module) -> nn.Module:
    """Send every transformer encoder layer down PyTorch's standard path in inference too:
    the fused one reads its Linear layers' weights itself, past their own forward (which int8
    and simulated-int8 layers replace). The flag set is read only by that path's checks."""
    for layer in model.modules():
        if isinstance(layer, nn.TransformerEncoderLayer):
            layer.activation_relu_or_gelu = 0
    return model


def load_model(arch: dict[str, Any], weights: str | Path, map_location: str = "cpu") -> nn.Module:
    """The model `arch` describes with its saved weights-only state dict, in eval mode; an
    int8 model is rebuilt as float32, converted, then given its int8 weights. `weights` may
    also be the compact `encoded.npz` of a pruned or clustered model (decoded here)."""
    import warnings

    model = build_model(arch)
    if arch.get("quantize") == QUANTIZE:
        model = quantize_dynamic_int8(model)
    if str(weights).endswith(".npz"):
        from tasks.training.clustering import decoded_state

        state = {k: torch.from_numpy(v) for k, v in decoded_state(Path(weights)).items()}
    else:
        with warnings.catch_warnings():  # int8 packed weights load through TypedStorage
            warnings.filterwarnings("ignore", "TypedStorage is deprecated")
            state = torch.load(weights, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def weight_counts(model: nn.Module) -> tuple[int, int]:
    """(weights, non-zero weights) of a model, its int8 Linear layers included (their packed
    weights and biases are not `parameters()`)."""
    tensors = list(model.parameters())
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            weight, bias = packed._weight_bias()
            tensors += [weight.dequantize(), *([bias] if bias is not None else [])]
    return sum(t.numel() for t in tensors), int(sum((t != 0).sum() for t in tensors))
