"""Global magnitude pruning as plain masks (torch only).

Masks instead of torch.nn.utils.prune's re-parametrisation: the state dict keeps plain
`weight` tensors (zeros where pruned), DDP sees ordinary parameters, and re-applying the
mask after each optimizer step keeps pruned weights at exactly zero during fine-tuning.
"""

from __future__ import annotations

import torch
from torch import nn

PRUNABLE = (nn.Linear, nn.Conv2d)


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every Linear/Conv weight but the classifier's (the last Linear: every model here ends
    with it). A global threshold would strip the classifier first: its weights are the
    smallest, and at 70% global sparsity the Fashion-MNIST MLP lost 98% of them and fell
    from 0.90 to 0.64 validation accuracy. It is a few thousand weights; it stays dense."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE)]
    last_linear = max(
        (i for i, (_, m) in enumerate(layers) if isinstance(m, nn.Linear)), default=None
    )
    return {f"{name}.weight": m.weight for i, (name, m) in enumerate(layers) if i != last_linear}


@torch.no_grad()
def global_magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Masks that zero the `sparsity` fraction of smallest-|w| prunable weights, globally."""
    weights = prunable_weights(model)
    if sparsity <= 0:
        return {k: torch.ones_like(w, dtype=torch.bool) for k, w in weights.items()}
    scores = torch.cat([w.detach().abs().flatten().float() for w in weights.values()])
    k = int(round(sparsity * scores.numel()))
    threshold = torch.kthvalue(scores.cpu(), max(k, 1)).values.item()
    masks = {}
    for name, w in weights.items():
        mask = w.detach().abs() > threshold
        masks[name] = mask
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    weights = prunable_weights(model)
    for name, mask in masks.items():
        weights[name].mul_(mask.to(weights[name].device))


def sparsity_report(model: nn.Module) -> dict[str, float]:
    weights = prunable_weights(model)
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return {
        "sparsity": zeros / max(total, 1),
        "parameters": params,
        "nonzero_parameters": nonzero,
    }
