"""Optimizers, learning-rate schedules, L1 and early stopping, chosen by name in the spec.

Imports torch only (the DDP worker uses it). Every schedule steps per batch, so short runs
still see all of it; `plateau` also drops the rate once per epoch when the validation loss
stalls. A linear warm-up can precede any schedule (for `onecycle` it sets the length of the
rise the schedule has anyway).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def build_optimizer(spec: dict[str, Any], params, lr: float) -> torch.optim.Optimizer:
    name, wd, momentum = spec["optimizer"], spec["weight_decay"], spec["momentum"]
    if name == "sgd":
        nesterov = bool(spec.get("nesterov", False)) and momentum > 0  # torch refuses it without
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=wd)
    raise ValueError(f"train.optimizer: unknown optimizer '{name}'")


class Schedule:
    """The learning rate over one training phase of `epochs` × `steps` batches."""

    def __init__(self, spec: dict[str, Any], opt, lr: float, epochs: int, steps: int):
        sched = torch.optim.lr_scheduler
        name, total = spec["scheduler"], max(epochs * steps, 1)
        warm = min(spec.get("warmup_epochs", 0) * steps, total - 1)
        self.plateau = None
        if name == "onecycle":  # it rises by itself: a warm-up sets how long
            self.batch = sched.OneCycleLR(
                opt, max_lr=lr, total_steps=total, pct_start=warm / total if warm else 0.3
            )
            return
        if name == "cosine":
            main = sched.CosineAnnealingLR(opt, T_max=max(total - warm, 1))
        elif name == "step":
            main = sched.StepLR(opt, step_size=spec["step_size"] * steps, gamma=spec["gamma"])
        elif name == "exponential":  # gamma per epoch, spread over its batches
            main = sched.ExponentialLR(opt, gamma=spec["gamma"] ** (1.0 / steps))
        elif name in ("none", "plateau"):  # a chainable no-op: plateau's drops must persist
            main = sched.ConstantLR(opt, factor=1.0, total_iters=0)
        else:
            raise ValueError(f"train.scheduler: unknown scheduler '{name}'")
        self.batch = main
        if warm:
            warmup = sched.LinearLR(opt, start_factor=0.01, total_iters=warm)
            self.batch = sched.SequentialLR(opt, [warmup, main], milestones=[warm])
        if name == "plateau":
            self.plateau = sched.ReduceLROnPlateau(
                opt, factor=spec["gamma"], patience=spec.get("plateau_patience", 2)
            )

    def step(self) -> None:
        """After every batch."""
        self.batch.step()

    def epoch_end(self, val_loss: float) -> None:
        """After every epoch's validation."""
        if self.plateau is not None:
            self.plateau.step(val_loss)

    def state_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch.state_dict(),
            "plateau": self.plateau.state_dict() if self.plateau else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch.load_state_dict(state["batch"])
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Σ|w| over the weight matrices and kernels (not biases, norms or buffers)."""
    return sum(p.abs().sum() for p in model.parameters() if p.dim() > 1)


class EarlyStopping:
    """Stops a phase after `patience` epochs without a better validation score and keeps the
    best epoch's weights (on the CPU) to restore at the end. Better is a higher accuracy, or
    the same accuracy at a lower validation loss: on a small validation split many epochs tie
    (57 rows: every one at 1.0), and the first of them is rarely the best model. Every rank
    sees the same all-reduced figures, so all ranks stop at the same epoch."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best, self.best_loss = -math.inf, math.inf
        self.best_epoch, self.stopped_epoch = -1, None
        self.best_state: dict[str, torch.Tensor] | None = None

    def update(self, accuracy: float, loss: float, epoch: int, model: nn.Module) -> bool:
        """Record an epoch; True when training should stop."""
        if (accuracy, -loss) > (self.best, -self.best_loss):
            self.best, self.best_loss, self.best_epoch = accuracy, loss, epoch
            self.best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
            }
        elif epoch - self.best_epoch >= self.patience:
            self.stopped_epoch = epoch
        return self.stopped_epoch is not None

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "stopped_epoch": self.stopped_epoch,
            "best_state": self.best_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.best_loss = state.get("best_loss", math.inf)  # a checkpoint from before the rule
        self.stopped_epoch, self.best_state = state["stopped_epoch"], state["best_state"]
