"""prune: global magnitude pruning of the trained model, fine-tuned with the mask held.

With `rounds > 1` the sparsity ramps geometrically (e.g. 0.5 → 0.75 → 0.875 towards 0.875),
fine-tuning after each round: measured on this stack, one-shot pruning to high sparsity
collapses an MLP while gradual rounds keep most of its accuracy.
"""

from __future__ import annotations

from typing import Any

from conf.schema import PruneConfig, TrainConfig
from tasks.stage import Manifest, StageDir
from tasks.train import OPTIM_KEYS, model_files, split_files
from tasks.training.launch import launch, resolve_world_size

# the code whose output this stage stores: its digest is part of the cache key
SOURCES = (
    "tasks.prune",
    "tasks.train",
    "tasks.training.launch",
    "tasks.training.worker",
    "tasks.training.models",
    "tasks.training.sparsity",
)


def sparsity_schedule(target: float, rounds: int) -> list[float]:
    """Each round removes the same fraction of what is left; the last hits `target` exactly."""
    keep = (1.0 - target) ** (1.0 / rounds)
    return [round(1.0 - keep ** (i + 1), 6) for i in range(rounds - 1)] + [target]


def prune_model(
    features: Manifest,
    trained: Manifest,
    cfg: PruneConfig,
    train_cfg: TrainConfig,
    out: StageDir,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Prune (and fine-tune) the trained weights; return the manifest body."""
    phases = [
        {"sparsity": s, "epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr}
        for s in sparsity_schedule(cfg.sparsity, cfg.rounds)
    ]
    spec = {
        "train_files": split_files(features, "train"),
        "val_files": split_files(features, "val") or split_files(features, "train"),
        "features": features["feature_names"],
        "label": features["label"],
        "arch": trained["arch"],
        "phases": phases,
        **{k: getattr(train_cfg, k) for k in OPTIM_KEYS},
        # fine-tuning restarts from a low LR; a warm-up cycle would undo the pruned model's fit
        "scheduler": "cosine" if train_cfg.scheduler == "onecycle" else train_cfg.scheduler,
        "warmup_epochs": 0,
        "early_stopping_patience": None,  # every round's epochs, so the mask schedule holds
        "init_from": trained["model"]["weights"]["path"],
        "out_dir": str(out.tmp),
        "checkpoint_dir": str(out.path("checkpoints")),
        "metric_prefix": "prune",
    }
    world = resolve_world_size(train_cfg)
    result = launch(
        spec,
        world,
        out.tmp,
        run_id,
        nnodes=train_cfg.nnodes,
        endpoint=train_cfg.rdzv_endpoint,
        max_restarts=train_cfg.max_restarts,
    )
    return {
        "model": model_files(out),
        "arch": trained["arch"],
        "result": result,
        "schedule": phases,
        "metrics": {
            "prune/sparsity": result["sparsity"],
            "prune/val_accuracy": result["val_accuracy"],
            "prune/nonzero_parameters": result["nonzero_parameters"],
            "prune/seconds": result["seconds"],
        },
        "summary": f"magnitude pruning to {result['sparsity']:.1%} in {cfg.rounds} round(s), "
        f"{cfg.finetune_epochs} fine-tune epoch(s) each: val accuracy {result['val_accuracy']:.4f}",
    }


def skip_pruning(trained: Manifest) -> dict[str, Any]:
    """`prune.method: none`: the pruned model is the trained one, unchanged."""
    result = trained["result"]
    return {
        "model": trained["model"],
        "arch": trained["arch"],
        "result": result,
        "schedule": [],
        "metrics": {
            "prune/sparsity": result["sparsity"],
            "prune/val_accuracy": result["val_accuracy"],
        },
        "summary": "pruning disabled (prune.method: none)",
    }
