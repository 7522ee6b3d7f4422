"""k-means weight sharing, after Deep Compression (Han et al.), in torch only.

Each prunable layer's non-zero weights are clustered into 2^bits centroids (linear
initialisation between the layer's min and max, then Lloyd iterations); every weight is
replaced by its centroid. Fine-tuning keeps the sharing: after each backward pass, every
weight's gradient is replaced by the sum of its cluster's gradients (the centroid's
gradient), so all weights of a cluster get the same update — with SGD, momentum and Adam
alike, since equal values and equal gradients keep equal optimizer state — and a snap back
to the cluster mean after each step removes float drift. Pruned zeros form a cluster of
their own that stays at zero. The layer is stored as its codebook plus `bits`-bit indices
(and a 1-bit map of the non-zeros when the layer is sparse).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.training.sparsity import prunable_weights

Clusters = dict[str, torch.Tensor]  # weight name → cluster index per weight (-1: a pruned zero)


@torch.no_grad()
def kmeans_1d(values: torch.Tensor, k: int, iterations: int = 30) -> torch.Tensor:
    """Centroids (sorted) of 1-D `values`: linear initialisation, then Lloyd iterations."""
    lo, hi = values.min().item(), values.max().item()
    centroids = torch.linspace(lo, hi, k, dtype=torch.float64)
    x = values.double()
    for _ in range(iterations):
        index = assign(x, centroids)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, index, x)
        counts = torch.bincount(index, minlength=k).double()
        moved = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        if torch.allclose(moved, centroids):
            break
        centroids = moved.sort().values
    return centroids


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted `centroids` for each value."""
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    return torch.bucketize(x.to(boundaries.dtype), boundaries)


@torch.no_grad()
def cluster_weights(model: nn.Module, bits: int) -> Clusters:
    """Share each prunable layer's non-zero weights among 2^bits values, in place."""
    clusters = {}
    for name, weight in prunable_weights(model).items():
        nonzero = weight != 0
        index = torch.full(weight.shape, -1, dtype=torch.long, device=weight.device)
        if nonzero.any():
            values = weight[nonzero].detach().cpu()
            centroids = kmeans_1d(values, min(2**bits, values.numel()))
            chosen = assign(values.double(), centroids)
            index[nonzero] = chosen.to(weight.device)
            weight[nonzero] = centroids[chosen].to(weight.dtype).to(weight.device)
        clusters[name] = index
    return clusters


def cluster_sums(values: torch.Tensor, flat: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Per cluster, the sum of `values` (flat) over its members (`kept`: not a pruned zero)."""
    k = int(flat.max().item()) + 1
    sums = torch.zeros(k, dtype=values.dtype, device=values.device)
    return sums.index_add_(0, flat[kept], values[kept])


@torch.no_grad()
def tie_gradients(model: nn.Module, clusters: Clusters) -> None:
    """Each weight's gradient ← its cluster's summed gradient; pruned zeros get none."""
    weights = prunable_weights(model)
    for name, index in clusters.items():
        weight = weights[name]
        if weight.grad is None:
            continue
        grad, flat = weight.grad.view(-1), index.view(-1)
        kept = flat >= 0
        if kept.any():
            grad[kept] = cluster_sums(grad, flat, kept)[flat[kept]]
        grad[~kept] = 0


@torch.no_grad()
def snap(model: nn.Module, clusters: Clusters) -> None:
    """Every weight back to its cluster's mean (a no-op but for float drift); zeros to zero."""
    weights = prunable_weights(model)
    for name, index in clusters.items():
        weight, flat = weights[name].view(-1), index.view(-1)
        kept = flat >= 0
        if kept.any():
            sums = cluster_sums(weight, flat, kept)
            counts = torch.bincount(flat[kept], minlength=len(sums)).clamp(min=1)
            weight[kept] = (sums / counts.to(weight.dtype))[flat[kept]]
        weight[~kept] = 0


def encode(model: nn.Module, bits: int | None, path: Path) -> dict[str, float]:
    """Write the prunable layers compactly to `path` (.npz): shared layers as codebooks +
    packed `bits`-bit indices, or (`bits` None) their non-zero values as float32; either way
    with a 1-bit non-zero map for sparse layers. The other parameters stay float32. Returns
    the encoded size and bits per prunable weight."""
    arrays: dict[str, np.ndarray] = {}
    shared = dict(prunable_weights(model))
    encoded_bits = 0
    prunable = 0
    for name, weight in shared.items():
        w = weight.detach().cpu().numpy().ravel()
        nonzero = w != 0
        arrays[f"{name}.shape"] = np.asarray(weight.shape)
        if bits is None:
            arrays[f"{name}.values"] = w[nonzero].astype(np.float32)
            layer_bits = 32 * int(nonzero.sum())
        else:
            codebook, index = np.unique(w[nonzero], return_inverse=True)
            if len(codebook) > 2**bits:
                raise ValueError(
                    f"{name} holds {len(codebook)} distinct values, more than 2^{bits}"
                )
            planes = ((index[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
            arrays[f"{name}.codebook"] = codebook.astype(np.float32)
            arrays[f"{name}.indices"] = np.packbits(planes.ravel())
            arrays[f"{name}.bits"] = np.asarray(bits)
            layer_bits = len(index) * bits + 32 * len(codebook)
        if not nonzero.all():
            arrays[f"{name}.nonzero"] = np.packbits(nonzero)
            layer_bits += len(w)
        encoded_bits += layer_bits
        prunable += len(w)
    for name, tensor in model.state_dict().items():
        if name not in shared:
            arrays[name] = tensor.detach().cpu().numpy()
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return {
        "encoded_bytes": path.stat().st_size,
        "bits_per_weight": encoded_bits / max(prunable, 1),
    }


def decoded_state(path: Path) -> dict[str, np.ndarray]:
    """The state dict `encode` wrote to `path`, dense again: each shared layer's indices
    looked up in its codebook (or its non-zero values) scattered back through the non-zero
    map. Bit for bit the weights that were encoded, so the decoded model answers exactly
    as the fine-tuned one did."""
    state: dict[str, np.ndarray] = {}
    with np.load(path) as packed:
        arrays = {k: packed[k] for k in packed.files}
    for key in [k for k in arrays if k.endswith(".shape")]:
        name = key.removesuffix(".shape")
        shape = tuple(int(d) for d in arrays.pop(key))
        size = int(np.prod(shape))
        mask = arrays.pop(f"{name}.nonzero", None)
        nonzero = np.ones(size, bool) if mask is None else np.unpackbits(mask)[:size].astype(bool)
        count = int(nonzero.sum())
        if f"{name}.codebook" in arrays:
            bits = int(arrays.pop(f"{name}.bits"))
            planes = np.unpackbits(arrays.pop(f"{name}.indices"))[: count * bits]
            index = (planes.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(1)
            values = arrays.pop(f"{name}.codebook")[index]
        else:
            values = arrays.pop(f"{name}.values")
        weight = np.zeros(size, np.float32)
        weight[nonzero] = values
        state[name] = weight.reshape(shape)
    return state | arrays  # the other parameters and buffers, as they were saved
