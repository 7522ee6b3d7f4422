"""The sweep's points: names, levels, fine-tuning phases, and each step's own work on the
saved weights (structured slimming before the fine-tune, encoding or int8 after it)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from conf.schema import (
    COMPRESSION_STEPS,
    CompressConfig,
    DistillConfig,
    TrainConfig,
    converts_to_int8,
)
from tasks.store import Manifest
from tasks.train import train_spec


def point_name(recipe: list[str], sparsity: float | None, bits: int | None) -> str:
    shown = {
        "sparsity": lambda step: f"{step}-{sparsity:g}",
        "bits": lambda step: f"{step}-{bits}b",
    }
    return "+".join(
        shown[level](step) if (level := COMPRESSION_STEPS[step].level) else step for step in recipe
    )


def sweep_points(cfg: CompressConfig) -> list[dict[str, Any]]:
    """Every recipe at every level it uses: sparsity for a pruning step, bits for cluster."""
    if cfg.sweep:
        recipes, sparsities, bit_levels = cfg.sweep.recipes, cfg.sweep.sparsity, cfg.sweep.bits
    else:
        recipes, sparsities, bit_levels = [cfg.recipe], [cfg.sparsity], [cfg.bits]
    points = []
    for recipe in recipes:
        levels = {COMPRESSION_STEPS[step].level for step in recipe}
        for sparsity in sparsities if "sparsity" in levels else [None]:
            for bits in bit_levels if "bits" in levels else [None]:
                points.append(
                    {
                        "name": point_name(recipe, sparsity, bits),
                        "recipe": list(recipe),
                        "sparsity": sparsity,
                        "bits": bits,
                    }
                )
    return points


def sparsity_schedule(target: float, rounds: int) -> list[float]:
    """Each round removes the same fraction of what is left; the last hits `target` exactly."""
    keep = (1.0 - target) ** (1.0 / rounds)
    return [round(1.0 - keep ** (i + 1), 6) for i in range(rounds - 1)] + [target]


def phases(point: dict[str, Any], cfg: CompressConfig) -> list[dict[str, Any]]:
    """The fine-tuning phases the worker runs for this point (none for int8 alone)."""
    tune = {"epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr}
    recipe, out = point["recipe"], []
    if "magnitude" in recipe:
        out += [{"sparsity": s, **tune} for s in sparsity_schedule(point["sparsity"], cfg.rounds)]
    if "structured" in recipe:
        out.append({"sparsity": None, **tune})
    if "cluster" in recipe:  # share the surviving weights, the zeros kept by the last mask
        last = out[-1]["sparsity"] if out else None
        out.append({"sparsity": last, "cluster_bits": point["bits"], **tune})
    if "qat" in recipe:  # the pruning's own fine-tune runs in simulated int8 (or one of its own)
        out = [{**p, "fake_int8": True} for p in out] or [
            {"sparsity": None, "fake_int8": True, **tune}
        ]
    return out


def stretched(
    point_phases: list[dict[str, Any]], min_steps: int, per_epoch: int
) -> list[dict[str, Any]]:
    """A small split fine-tunes more epochs, until each phase takes `min_steps` optimizer
    steps (compress.min_steps); a phase of 0 epochs (no fine-tune asked for) stays 0."""
    need = math.ceil(min_steps / per_epoch)
    return [{**p, "epochs": max(p["epochs"], need) if p["epochs"] else 0} for p in point_phases]


def slim_model(
    arch: dict[str, Any], weights: str, ratio: float | list[float], dest: Path
) -> dict[str, Any]:
    """Structured pruning: remove `ratio` of each hidden layer's width (a list: each layer's
    own share, in `narrowable_layers`' order; a GRU/LSTM/transformer takes its first, their
    specs having one width for every layer); save the slim weights to `dest` and return the
    slim spec (rebuilt from JSON and checked against the pruned module, so what is saved is
    exactly what serving will build)."""
    import warnings

    import torch
    import torch_pruning as tp

    from tasks.training.models import build_model, classifier, narrowable_layers, widths

    state = torch.load(weights, map_location="cpu", weights_only=True)
    if arch["model"] in NARROWERS:  # not Torch-Pruning's: sliced here
        one = ratio[0] if isinstance(ratio, list) else ratio
        slim, state = NARROWERS[arch["model"]](arch, state, one)
        build_model(slim).load_state_dict(state)  # strict: every sliced shape fits the spec
        torch.save(state, dest)
        return slim
    model = build_model(arch)
    model.load_state_dict(state)
    model.eval()
    example = torch.zeros(2, arch["n_features"])
    with warnings.catch_warnings():  # the periodic embedding's frequencies: ignored below
        warnings.filterwarnings("ignore", "Unwrapped parameters detected")
        pruner = tp.pruner.BasePruner(
            model,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=0.0 if isinstance(ratio, list) else ratio,
            pruning_ratio_dict=dict(zip(narrowable_layers(model), ratio, strict=True))
            if isinstance(ratio, list)
            else None,
            # the classes keep their outputs; embedding widths are part of the spec, not pruned
            ignored_layers=[
                classifier(model),
                *getattr(model, "embeddings", []),
                *([model.periodic] if getattr(model, "periodic", None) else []),
            ],
        )
    pruner.step()
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


def kept_units(score, keep: int):
    """The indices of the `keep` highest-scoring units, in their original order."""
    return score.topk(keep).indices.sort().values


def narrow_recurrent(arch: dict[str, Any], state: dict, ratio: float) -> tuple[dict, dict]:
    """Structured pruning of a GRU / LSTM (Torch-Pruning does not cover recurrent cells): each
    layer keeps the (1 - ratio) share of its hidden units with the largest weights (in, out
    and recurrent). A unit is one row in each gate's block of weight_ih / weight_hh and the
    biases, one column of weight_hh, and one input column of the next layer (or the head).
    Returns the slim spec and its state dict."""
    import torch

    cell, layers, width = arch.get("cell", "gru"), len(arch["hidden"]), arch["hidden"][0]
    gates = 4 if cell == "lstm" else 3
    keep = max(1, round(width * (1.0 - ratio)))
    state = dict(state)
    below = None  # the units the layer below kept: this layer's input columns
    for layer in range(layers):
        w_ih, w_hh = state[f"rnn.weight_ih_l{layer}"], state[f"rnn.weight_hh_l{layer}"]
        after = state[f"rnn.weight_ih_l{layer + 1}"] if layer + 1 < layers else None
        after = state["head.1.weight"] if after is None else after

        def rows_of(t):  # (gates·H, n) → (H,): each unit's squares summed over its gate rows
            return t.reshape(gates, width, -1).pow(2).sum(dim=(0, 2))

        score = rows_of(w_ih) + rows_of(w_hh) + w_hh.pow(2).sum(0) + after.pow(2).sum(0)
        kept = kept_units(score, keep)
        rows = (torch.arange(gates).unsqueeze(1) * width + kept).flatten()
        w_ih = w_ih[rows]
        state[f"rnn.weight_ih_l{layer}"] = w_ih if below is None else w_ih[:, below]
        state[f"rnn.weight_hh_l{layer}"] = w_hh[rows][:, kept]
        for bias in ("bias_ih", "bias_hh"):
            state[f"rnn.{bias}_l{layer}"] = state[f"rnn.{bias}_l{layer}"][rows]
        below = kept
    state["head.1.weight"] = state["head.1.weight"][:, below]
    return {**arch, "hidden": [keep] * layers}, state


def narrow_transformer(arch: dict[str, Any], state: dict, ratio: float) -> tuple[dict, dict]:
    """Structured pruning of the transformer: each encoder layer keeps the (1 - ratio) share
    of its attention heads and of its feed-forward units with the largest weights (a head:
    its rows of q, k and v and its columns of the output projection; a unit: linear1's row,
    linear2's column). Attention over 50 tokens is most of a small transformer's time, so
    narrowing the feed-forward blocks alone bought 1.17× (benchmarks/README.md). Returns the
    slim spec (`kept_heads`, `ff`) and its state dict."""
    import torch

    width, heads = arch["hidden"][0], arch.get("heads", 4)
    had = arch.get("kept_heads") or heads
    head_dim = width // heads
    ff = arch.get("ff") or 2 * width
    keep_ff, keep_heads = max(1, round(ff * (1.0 - ratio))), max(1, round(had * (1.0 - ratio)))
    state = dict(state)
    for layer in range(len(arch["hidden"])):
        up, down = f"encoder.layers.{layer}.linear1", f"encoder.layers.{layer}.linear2"
        score = state[f"{up}.weight"].pow(2).sum(1) + state[f"{down}.weight"].pow(2).sum(0)
        kept = kept_units(score, keep_ff)
        state[f"{up}.weight"] = state[f"{up}.weight"][kept]
        state[f"{up}.bias"] = state[f"{up}.bias"][kept]
        state[f"{down}.weight"] = state[f"{down}.weight"][:, kept]

        attn = f"encoder.layers.{layer}.self_attn"
        fused = f"{attn}.in_proj_weight" in state  # nn.MultiheadAttention's, or already kept
        w_in = state.pop(f"{attn}.in_proj_weight" if fused else f"{attn}.qkv.weight")
        b_in = state.pop(f"{attn}.in_proj_bias" if fused else f"{attn}.qkv.bias")
        w_in, b_in = w_in.view(3, had, head_dim, width), b_in.view(3, had, head_dim)
        w_out = state[f"{attn}.out_proj.weight"].view(width, had, head_dim)
        score = w_in.pow(2).sum(dim=(0, 2, 3)) + w_out.pow(2).sum(dim=(0, 2))
        kept = kept_units(score, keep_heads)
        state[f"{attn}.qkv.weight"] = w_in[:, kept].reshape(-1, width)
        state[f"{attn}.qkv.bias"] = b_in[:, kept].reshape(-1)
        state[f"{attn}.out_proj.weight"] = w_out[:, kept].reshape(width, -1)
    slim = {**arch, "ff": keep_ff, "kept_heads": keep_heads}
    if keep_heads == heads:  # every head kept: nn.MultiheadAttention's own layout again
        slim.pop("kept_heads")
        for layer in range(len(arch["hidden"])):
            attn = f"encoder.layers.{layer}.self_attn"
            state[f"{attn}.in_proj_weight"] = state.pop(f"{attn}.qkv.weight")
            state[f"{attn}.in_proj_bias"] = state.pop(f"{attn}.qkv.bias")
    return slim, {k: torch.as_tensor(v).contiguous() for k, v in state.items()}


# the families Torch-Pruning does not narrow, and the slicing that does
NARROWERS = {"rnn": narrow_recurrent, "transformer": narrow_transformer}


def teacher(trained: Manifest, distill: DistillConfig) -> dict[str, Any]:
    """The worker's `teacher` entry: the trained model, which every point starts from and
    whose outputs a fine-tune learns again (compress.distill); none when switched off."""
    if not distill.enabled:
        return {"teacher": None}
    return {
        "teacher": {
            "arch": trained["arch"],
            "weights": trained["model"]["weights"]["path"],
            "alpha": distill.alpha,
            "temperature": distill.temperature,
        }
    }


def finetune_spec(
    features: Manifest,
    arch: dict[str, Any],
    init_from: str,
    point_phases: list[dict[str, Any]],
    train_cfg: TrainConfig,
    folder: Path,
) -> dict[str, Any]:
    return {
        **train_spec(features, train_cfg, str(folder), str(folder / "checkpoints")),
        "arch": arch,
        "phases": point_phases,
        # fine-tuning restarts from a low LR; a warm-up cycle would undo the pruned model's fit
        "scheduler": "cosine" if train_cfg.scheduler == "onecycle" else train_cfg.scheduler,
        "warmup_epochs": 0,
        "early_stopping_patience": None,  # every round's epochs, so the mask schedule holds
        "init_from": init_from,
        "metric_prefix": "compress",
    }


def finetune_point(spec: dict[str, Any], index: int, threads: int) -> dict[str, Any]:
    """One sweep point's fine-tune in this (Dask worker) process, on GPU `index` modulo the
    GPUs when there are any (as tuning trials do). Never raises: a point that fails comes
    back with its reason and is left out of the choice."""
    import torch

    from tasks.training.worker import Rank, Trainer

    torch.set_num_threads(max(1, threads))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", index % torch.cuda.device_count())
    try:
        return Trainer(spec, Rank(0, 1, device), on_epoch=lambda *_: None).run()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def finish_point(point: dict[str, Any], arch: dict[str, Any], folder: Path) -> dict[str, Any]:
    """After fine-tuning: encode the sparse or shared weights (`encoded.npz`), or convert to
    int8 (quantize; qat after its simulated-int8 fine-tune); return the arch the saved
    weights need."""
    from tasks.training.clustering import encode
    from tasks.training.models import load_model

    weights = folder / "model.pt"
    (folder / "model.json").write_text(json.dumps(arch, indent=2))
    if "cluster" in point["recipe"]:
        point["encoded"] = encode(
            load_model(arch, str(weights)), point["bits"], folder / "encoded.npz"
        )
    elif "magnitude" in point["recipe"] and not converts_to_int8(point["recipe"]):
        point["encoded"] = encode(load_model(arch, str(weights)), None, folder / "encoded.npz")
    if converts_to_int8(point["recipe"]):
        # the float weights stay beside the int8 ones: onnxruntime quantizes their export
        shutil.copy(weights, folder / "model_float.pt")
        arch = quantize_saved(arch, weights, folder / "model.json")
    return arch


def quantize_saved(arch: dict[str, Any], weights: Path, spec: Path) -> dict[str, Any]:
    """Replace the saved float32 weights by int8 ones (weights-only state dict) and mark the
    spec, so `load_model` rebuilds the int8 model without pickled modules."""
    import torch

    from tasks.training.models import QUANTIZE, load_model, quantize_dynamic_int8

    model = quantize_dynamic_int8(load_model(arch, str(weights)))
    torch.save(model.state_dict(), weights)
    quantized = {**arch, "quantize": QUANTIZE}
    spec.write_text(json.dumps(quantized, indent=2))
    return quantized
