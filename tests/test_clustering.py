"""k-means weight sharing: at most 2^bits values per layer, zeros kept, tied gradients, a
fine-tune by the real trainer that keeps the sharing, and the encoded file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_spec

from tasks.training.clustering import (
    cluster_weights,
    decoded_state,
    encode,
    kmeans_1d,
    tie_gradients,
)
from tasks.training.models import build_model
from tasks.training.sparsity import global_magnitude_masks, prunable_weights
from tasks.training.worker import Rank, Trainer

ARCH = {"model": "mlp", "n_features": 64, "n_classes": 10, "hidden": [64], "dropout": 0.0}


def distinct_nonzero(weight: torch.Tensor) -> int:
    return len(torch.unique(weight[weight != 0]))


def test_kmeans_finds_the_clusters_of_well_separated_values():
    values = torch.cat([torch.full((50,), v) + 0.01 * torch.randn(50) for v in (-1.0, 0.5, 2.0)])
    centroids = kmeans_1d(values, 3)
    assert torch.allclose(centroids, torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64), atol=0.01)


def test_each_layer_holds_at_most_2_to_the_bits_values_and_keeps_its_zeros():
    torch.manual_seed(0)
    model = build_model(ARCH)
    masks = global_magnitude_masks(model, 0.5)
    for name, weight in prunable_weights(model).items():
        weight.data.mul_(masks[name])
    clusters = cluster_weights(model, 3)
    for name, weight in prunable_weights(model).items():
        assert distinct_nonzero(weight) <= 8
        assert torch.equal(weight != 0, masks[name])  # the pruned zeros stay, nothing else is 0
        assert ((clusters[name] >= 0) == masks[name]).all()


def test_tied_gradients_are_the_cluster_sums_and_zeros_get_none():
    torch.manual_seed(0)
    model = build_model(ARCH)
    weight = prunable_weights(model)["body.0.weight"]
    weight.data[:, :8] = 0  # some pruned zeros
    clusters = cluster_weights(model, 2)
    weight.grad = torch.randn_like(weight)
    raw = weight.grad.clone()
    tie_gradients(model, clusters)
    index = clusters["body.0.weight"]
    for c in range(4):
        members = index == c
        if members.any():
            assert torch.allclose(weight.grad[members], raw[members].sum().expand(members.sum()))
    assert (weight.grad[index < 0] == 0).all()


@pytest.mark.parametrize("optimizer", ["adamw"])  # Adam: the case where tied moments matter
def test_fine_tuning_keeps_the_weights_shared(digits_parquet, tmp_path, optimizer):
    trained = tmp_path / "trained"
    Trainer(make_spec(digits_parquet, trained), Rank(0, 1, torch.device("cpu"))).run()
    phases = [
        {"sparsity": 0.5, "epochs": 1, "lr": 0.003},
        {"sparsity": 0.5, "cluster_bits": 3, "epochs": 2, "lr": 0.003},
    ]
    out = tmp_path / "shared"
    spec = make_spec(
        digits_parquet, out, phases=phases, optimizer=optimizer, init_from=str(trained / "model.pt")
    )
    result = Trainer(spec, Rank(0, 1, torch.device("cpu"))).run()
    assert result["val_accuracy"] > 0.85
    model = build_model(spec["arch"])
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    weights = prunable_weights(model).values()
    assert all(distinct_nonzero(w) <= 8 for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.5, abs=0.01)  # global magnitude pruning held through it
    stats = encode(model, 3, tmp_path / "encoded.npz")
    assert stats["bits_per_weight"] < 3 * 0.55 + 1 + 0.5  # 3-bit indices for half, a 1-bit map
    packed = np.load(tmp_path / "encoded.npz")
    assert len(packed["body.0.weight.codebook"]) <= 8
    assert stats["encoded_bytes"] < 0.4 * (out / "model.pt").stat().st_size  # the head stays fp32
    # decoded (as the registered model loads it), the weights are the fine-tuned ones, bit
    # for bit: the sparse 3-bit layers and the dense head alike
    decoded = decoded_state(tmp_path / "encoded.npz")
    assert decoded.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert np.array_equal(decoded[name], tensor.numpy()), name
    encode(model, None, tmp_path / "values.npz")  # magnitude pruning alone: values + map
    for name, tensor in model.state_dict().items():
        assert np.array_equal(decoded_state(tmp_path / "values.npz")[name], tensor.numpy())
