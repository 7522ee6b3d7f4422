"""prune: make the trained model smaller, then fine-tune it.

- `magnitude`: global magnitude pruning, fine-tuned with the mask held. With `rounds > 1`
  the sparsity ramps geometrically (e.g. 0.5 → 0.75 → 0.875 towards 0.875), fine-tuning
  after each round: measured on this stack, one-shot pruning to high sparsity collapses an
  MLP while gradual rounds keep most of its accuracy. Zeros alone make no dense kernel faster.
- `structured`: remove `sparsity` of every hidden layer's neurons (MLP) or channels (CNN),
  ranked by the L2 norm of each coupled group. Torch-Pruning's dependency graph finds what
  shrinks together (a conv's filters, its BatchNorm, the head's matching inputs after the
  flatten). The result is a smaller dense model, described by its layer widths in the JSON
  spec and a weights-only state dict, so serving never needs the pruning library.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from conf.schema import PruneConfig, TrainConfig
from tasks.stage import Manifest, StageDir
from tasks.train import OPTIM_KEYS, model_files, split_files
from tasks.training.launch import launch, resolve_world_size

QUANTIZE = "dynamic_int8"  # prune.quantize's one method (tasks.training.models.QUANTIZE)

# the code whose output this stage stores: its digest is part of the cache key
SOURCES = (
    "tasks.prune",
    "tasks.training.clustering",
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


def slim_model(arch: dict[str, Any], weights: str, ratio: float, dest: Path) -> dict[str, Any]:
    """Structured pruning: remove `ratio` of each hidden layer's width; save the slim weights
    to `dest` and return the slim spec (rebuilt from JSON and checked against the pruned
    module, so what is saved is exactly what serving will build)."""
    import torch
    import torch_pruning as tp

    from tasks.training.models import build_model, classifier, widths

    model = build_model(arch)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    example = torch.zeros(2, arch["n_features"])
    tp.pruner.BasePruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[classifier(model)],  # the classes keep their outputs
    ).step()
    slim = {**arch, **widths(model)}
    rebuilt = build_model(slim)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    probe = torch.randn(4, arch["n_features"])
    with torch.inference_mode():
        if not torch.allclose(rebuilt(probe), model(probe), atol=1e-5):
            raise RuntimeError(
                "structured pruning: the slim spec does not rebuild the pruned model"
            )
    torch.save(rebuilt.state_dict(), dest)
    return slim


def prune_model(
    features: Manifest,
    trained: Manifest,
    cfg: PruneConfig,
    train_cfg: TrainConfig,
    out: StageDir,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Prune (and fine-tune) the trained weights; return the manifest body."""
    arch, init_from = trained["arch"], trained["model"]["weights"]["path"]
    if cfg.method == "structured":
        init_from = str(out.path("slim_init.pt"))
        arch = slim_model(arch, trained["model"]["weights"]["path"], cfg.sparsity, Path(init_from))
        phases = [{"sparsity": None, "epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr}]
    elif cfg.method == "magnitude":
        phases = [
            {"sparsity": s, "epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr}
            for s in sparsity_schedule(cfg.sparsity, cfg.rounds)
        ]
    else:  # none: weight sharing alone
        phases = []
    if cfg.cluster_bits:  # then share the surviving weights, the zeros kept by the last mask
        phases.append(
            {
                "sparsity": phases[-1]["sparsity"] if phases else None,
                "cluster_bits": cfg.cluster_bits,
                "epochs": cfg.finetune_epochs,
                "lr": cfg.finetune_lr,
            }
        )
    spec = {
        "train_files": split_files(features, "train"),
        "val_files": split_files(features, "val") or split_files(features, "train"),
        "features": features["feature_names"],
        "label": features["label"],
        "arch": arch,
        "phases": phases,
        **{k: getattr(train_cfg, k) for k in OPTIM_KEYS},
        # fine-tuning restarts from a low LR; a warm-up cycle would undo the pruned model's fit
        "scheduler": "cosine" if train_cfg.scheduler == "onecycle" else train_cfg.scheduler,
        "warmup_epochs": 0,
        "early_stopping_patience": None,  # every round's epochs, so the mask schedule holds
        "init_from": init_from,
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
    encoded: dict[str, float] = {}
    if cfg.cluster_bits:
        encoded = encode_shared(arch, out.tmp / "model.pt", cfg.cluster_bits, out.tmp)
        then = (
            f"; k-means weight sharing at {cfg.cluster_bits} bits, fine-tuned: "
            f"{encoded['bits_per_weight']:.2f} bits per prunable weight, encoded "
            f"{encoded['encoded_bytes'] / 1024:.0f} KiB (`encoded.npz`)"
        )
    elif cfg.quantize == QUANTIZE:
        arch = quantize_saved(arch, out.tmp / "model.pt", out.tmp / "model.json")
        then = "; then dynamic int8 quantization of the Linear layers"
    else:
        then = ""
    # the headline: the share of the trained model's weights removed or zeroed
    removed = 1.0 - result["nonzero_parameters"] / trained["result"]["parameters"]
    if cfg.method == "structured":
        shape = ", ".join(f"{k} {trained['arch'].get(k)} → {arch[k]}" for k in widths_keys(arch))
        how = (
            f"structured pruning of {cfg.sparsity:.0%} of each hidden layer's width ({shape}): "
            f"{result['parameters']:,} of {trained['result']['parameters']:,} weights left, "
            f"{cfg.finetune_epochs} fine-tune epoch(s)"
        )
    elif cfg.method == "magnitude":
        how = (
            f"magnitude pruning to {result['sparsity']:.1%} in {cfg.rounds} round(s), "
            f"{cfg.finetune_epochs} fine-tune epoch(s) each"
        )
    else:
        how = "no pruning"
    return {
        "model": model_files(out),
        "arch": arch,
        "method": cfg.method,
        "result": result,
        "schedule": phases,
        "metrics": {
            "prune/sparsity": removed,
            "prune/val_accuracy": result["val_accuracy"],
            "prune/nonzero_parameters": result["nonzero_parameters"],
            "prune/parameters": result["parameters"],
            "prune/seconds": result["seconds"],
            **{f"prune/{k}": v for k, v in encoded.items()},
        },
        "summary": f"{how}: val accuracy {result['val_accuracy']:.4f}{then}",
    }


def encode_shared(arch: dict[str, Any], weights: Path, bits: int, folder: Path) -> dict[str, float]:
    """The weight-shared model as codebooks + packed indices (`encoded.npz`)."""
    from tasks.training.clustering import encode
    from tasks.training.models import load_model

    return encode(load_model(arch, str(weights)), bits, folder / "encoded.npz")


def quantize_saved(arch: dict[str, Any], weights: Path, spec: Path) -> dict[str, Any]:
    """Replace the saved float32 weights by int8 ones (weights-only state dict) and mark the
    spec, so `load_model` rebuilds the int8 model without pickled modules."""
    import torch

    from tasks.training.models import load_model, quantize_dynamic_int8

    model = quantize_dynamic_int8(load_model(arch, str(weights)))
    torch.save(model.state_dict(), weights)
    quantized = {**arch, "quantize": QUANTIZE}
    spec.write_text(json.dumps(quantized, indent=2))
    return quantized


def widths_keys(arch: dict[str, Any]) -> list[str]:
    return [k for k in ("channels", "hidden") if k in arch]


def skip_pruning(trained: Manifest, cfg: PruneConfig, out: StageDir) -> dict[str, Any]:
    """`prune.method: none`: the pruned model is the trained one, unchanged, or only
    quantized (`prune.quantize`)."""
    result = trained["result"]
    body = {
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
    if cfg.quantize == QUANTIZE:
        shutil.copy(trained["model"]["weights"]["path"], out.tmp / "model.pt")
        arch = quantize_saved(trained["arch"], out.tmp / "model.pt", out.tmp / "model.json")
        body |= {
            "model": model_files(out),
            "arch": arch,
            "summary": "no pruning (prune.method: none); dynamic int8 quantization of the "
            "Linear layers",
        }
    return body
