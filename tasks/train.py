"""train: fit the configured model on the reduced features with DDP workers.

Resumable: the stage folder is built under a stable `.partial-<key>` name, so a killed run
restarts from the last epoch's checkpoint instead of from scratch.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from conf.schema import PipelineConfig, TrainConfig, needs_images
from tasks.errors import ConfigError
from tasks.spec import Hooks, Inputs, StageSpec
from tasks.store import Manifest, StageDir
from tasks.training.launch import EpochHook, launch, resolve_world_size

OPTIM_KEYS = (
    "optimizer",
    "momentum",
    "weight_decay",
    "scheduler",
    "step_size",
    "gamma",
    "label_smoothing",
    "nesterov",
    "l1",
    "clip_grad_norm",
    "warmup_epochs",
    "plateau_patience",
    "early_stopping_patience",
    "batch_size",
    "precision",
    "compile",
    "seed",
    "resident_max_gb",
)


def split_files(features: Manifest, split: str) -> list[str]:
    return [f["path"] for f in features["splits"][split]["files"]]


def embeddings(features: Manifest) -> list[list[int]]:
    """[feature index, codes, width] per coded categorical the MLP embeds (entity embeddings,
    Guo & Berkhahn 2016): width from the cardinality by fast.ai's rule of thumb
    (1.6·n^0.56), capped at 32 so a CPU forward pass stays cheap."""
    names = features["feature_names"]
    return [
        [names.index(name), n, min(32, round(1.6 * n**0.56))]
        for name, n in (features.get("codes") or {}).items()
        if name in names  # none after PCA: the projection mixed them into its components
    ]


def unscaled_features(features: Manifest) -> list[int]:
    names = features["feature_names"]
    return [names.index(f) for f in features.get("unscaled", []) if f in names]


def model_arch(features: Manifest, cfg: TrainConfig) -> dict[str, Any]:
    if cfg.model == "auto":  # a caller outside the flow, which decides it after ingest
        raise ValueError("train.model auto: decide it first (PipelineConfig.with_model_for)")
    if needs_images(cfg.model) and not features.get("image_shape"):
        raise ConfigError(
            f"train.model: '{cfg.model}' needs image data (an IDX folder or 3-D .npz X) with "
            "reduce.method: none; use train.model: mlp for tables or PCA features"
        )
    return {
        "model": cfg.model,
        "n_features": len(features["feature_names"]),
        "n_classes": len(features["classes"]),
        "hidden": cfg.hidden,
        "dropout": cfg.dropout,
        "image_shape": features.get("image_shape"),
        **({"embeddings": embeddings(features)} if cfg.model == "mlp" else {}),
        **(
            {"periodic": cfg.periodic_scale}
            if cfg.model == "mlp" and cfg.numeric_embedding == "periodic"
            else {}
        ),
        # data.numeric_transform: none: features the input layer leaves unstandardised
        **({"unscaled": unscaled} if (unscaled := unscaled_features(features)) else {}),
        **({"channels": cfg.channels} if cfg.model == "cnn" else {}),
        **({"cell": cfg.cell} if cfg.model == "rnn" else {}),
        **({"heads": cfg.heads, "patch": cfg.patch} if cfg.model == "transformer" else {}),
    }


def model_files(out: StageDir) -> dict[str, Any]:
    weights, arch = out.describe("model.pt", "model.json")
    return {"weights": weights, "arch": arch}


DATA_BOUND_PCT = 30.0  # above this share of step time spent waiting for batches: data-bound


def bottleneck(result: dict[str, Any]) -> str:
    """One sentence: was the run compute-bound or data-bound, and which data mode ran."""
    if "data_wait_pct" not in result:
        return "No epochs trained in this run (resumed at its end)."
    wait, step = result["data_wait_pct"], result["step_ms"]
    kind = "data-bound" if wait > DATA_BOUND_PCT else "compute-bound"
    mode = (
        "was streamed from its Parquet row groups (larger than train.resident_max_gb)"
        if result.get("data_mode") == "streaming"
        else "was resident in memory"
    )
    return (
        f"The split {mode} and training was {kind}: {wait:.1f}% of each "
        f"{step:.1f} ms step waited for its batch"
    )


IMBALANCED = 10  # class_weight auto: weighted when the largest class has 10x the rarest's rows
# auto's weights: a class's effective number of rows (1 - β^rows) / (1 - β) saturates near
# 1 / (1 - β) = 1,000 rows (Cui et al. 2019)
EFFECTIVE_BETA = 0.999


def class_counts(features: Manifest, split: str = "train") -> np.ndarray:
    """A split's rows per class, from the label column of each Parquet part."""
    import pyarrow.parquet as pq

    counts = np.zeros(len(features["classes"]), dtype=np.int64)
    for f in split_files(features, split):
        labels = pq.read_table(f, columns=[features["label"]]).column(0).to_numpy()
        counts += np.bincount(labels, minlength=len(counts))
    return counts


def class_weights(features: Manifest, mode: str) -> list[float] | None:
    """The loss weight of each class, or None for an unweighted loss. balanced:
    scikit-learn's n / (classes × rows of the class). auto, when the rarest class has under a
    tenth of the largest's rows: inversely to each class's *effective* number of rows (Cui
    et al. 2019, "Class-Balanced Loss Based on Effective Number of Samples"), scaled so a
    training row weighs 1 on average: a class of a handful of rows weighs about as balanced
    would have it (it would never be predicted), while classes of thousands of rows weigh
    alike, since each has enough to be learned (balanced weights there trade accuracy and
    macro-F1 for nothing: diamonds' 3% `Fair` cut)."""
    return None if mode == "none" else weights_for(class_counts(features), mode)


def weights_for(counts: np.ndarray, mode: str) -> list[float] | None:
    """class_weights from a split's rows per class."""
    present = counts[counts > 0]
    if mode == "auto" and (len(present) < 2 or present.max() < IMBALANCED * present.min()):
        return None
    rows = np.maximum(counts, 1)
    if mode == "balanced":
        return [float(w) for w in counts.sum() / (len(counts) * rows)]
    inverse = (1 - EFFECTIVE_BETA) / (1 - EFFECTIVE_BETA**rows)
    return [float(w) for w in inverse * counts.sum() / (counts * inverse).sum()]


def class_draws(features: Manifest) -> list[float]:
    """train.sampler: balanced: each training row's chance to be drawn, by its class
    (1 / the class's rows), so every class is drawn equally often."""
    counts = class_counts(features)
    return [1.0 / c if c else 0.0 for c in counts.tolist()]


def train_spec(
    features: Manifest, cfg: TrainConfig, out_dir: str | None, checkpoint_dir: str | None
) -> dict[str, Any]:
    """The worker's spec for plain training with `cfg` (the train stage, a tuning trial)."""
    return {
        "train_files": split_files(features, "train"),
        "val_files": split_files(features, "val") or split_files(features, "train"),
        "features": features["feature_names"],
        "label": features["label"],
        "arch": model_arch(features, cfg),
        "phases": [{"sparsity": None, "epochs": cfg.epochs, "lr": cfg.lr}],
        **{k: getattr(cfg, k) for k in OPTIM_KEYS},
        # one remedy for imbalance: a balanced sampler replaces the loss weights
        "class_weights": class_weights(
            features, "none" if cfg.sampler == "balanced" else cfg.class_weight
        ),
        "class_draws": class_draws(features) if cfg.sampler == "balanced" else None,
        "init_from": None,
        "out_dir": out_dir,
        "checkpoint_dir": checkpoint_dir,
        "metric_prefix": "train",
    }


def peak_lr(cfg: TrainConfig, processes: int) -> float:
    """train.lr, times the processes with train.scale_lr: the linear scaling rule (Goyal et
    al.) keeps each sample's step size as the global batch grows with the world size."""
    return cfg.lr * processes if cfg.scale_lr else cfg.lr


def cycles_note(cfg: TrainConfig, phases: list[dict], rows: int, result: dict) -> str:
    """How many epochs, why, and which one was kept, for the stage's summary."""
    kept = result.get("best_epoch")
    first, epochs = phases[0]["epochs"], sum(phase["epochs"] for phase in phases)
    note = f"{epochs} epochs"
    why = []
    if first > cfg.epochs:
        why.append(
            f"train.epochs {cfg.epochs}, raised to {first} for train.min_steps {cfg.min_steps} "
            f"on {rows:,} training rows"
        )
    if len(phases) > 1:
        why.append(
            f"then a warm restart of {phases[1]['epochs']} (train.warm_restart: {cfg.warm_restart})"
        )
    if kept is not None and epochs > cfg.epochs:
        why.append(f"the best validation epoch is kept: {kept}")
    if "restart_gain" in result:
        why.append(
            f"the restart's best {result['restart_gain']:+.2%} val accuracy over the first "
            f"cycle's, at least {result['restart_gain_bound']:+.2%} at {RESTART_CONFIDENCE:.0%} "
            f"confidence: the {'restart' if result['kept_cycle'] == 'restart' else 'first cycle'}"
            "'s is kept"
        )
    return note + (f" ({'; '.join(why)})" if why else "")


def plot_curves(history: list[dict[str, Any]], path) -> str | None:
    """Loss, validation accuracy and learning rate per epoch, from the worker's history."""
    rows = [h for h in history if "val/accuracy" in h]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in rows]
    fig, (loss, acc, lr) = plt.subplots(1, 3, figsize=(13, 3.6))
    for key in ("train/loss", "val/loss"):
        loss.plot(epochs, [h.get(key, float("nan")) for h in rows], marker="o", ms=3, label=key)
    acc.plot(epochs, [h["val/accuracy"] for h in rows], marker="o", ms=3, color="tab:green")
    lr.plot(
        epochs, [h.get("train/lr", float("nan")) for h in rows], marker="o", ms=3, color="tab:gray"
    )
    loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    loss.legend()
    acc.set(xlabel="epoch", ylabel="accuracy", title="Validation accuracy")
    lr.set(xlabel="epoch", ylabel="learning rate", title="Learning rate (end of epoch)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def steps_per_epoch(rows: int, processes: int, batch_size: int) -> int:
    """Optimizer steps one process takes per epoch: a step per batch_size rows of its share."""
    return max(1, math.ceil(math.ceil(rows / processes) / batch_size))


def epochs_for(cfg: TrainConfig, rows: int, processes: int) -> int:
    """train.epochs, or more on a small split: enough for train.min_steps optimizer steps per
    process."""
    per_epoch = steps_per_epoch(rows, processes, cfg.batch_size)
    return max(cfg.epochs, math.ceil(cfg.min_steps / per_epoch))


# The restart's best epoch replaces the first cycle's only when it is more accurate on the
# validation rows at this confidence (a paired bootstrap, as compress's accuracy budget):
# picked on a lead of a row or a tie in accuracy, it lost test rows on DNA, spam and vehicle.
RESTART_CONFIDENCE = 0.8


def training_phases(cfg: TrainConfig, rows: int, processes: int, lr: float) -> list[dict]:
    """The train stage's phases: one cycle of the schedule over epochs_for's epochs, then
    with train.warm_restart a second cycle twice as long from the trained weights (a warm
    restart; auto: where train.min_steps raised the epochs, so both cycles are cheap). The
    restart's best validation epoch is kept where it beats the first cycle's beyond the
    noise: a small table that needs the longer training gets it, one that overfits in it
    keeps the first cycle's best."""
    first = epochs_for(cfg, rows, processes)
    phases = [{"sparsity": None, "epochs": first, "lr": lr}]
    if cfg.warm_restart is True or (cfg.warm_restart == "auto" and first > cfg.epochs):
        restart = {"epochs": 2 * first, "lr": lr, "restart_confidence": RESTART_CONFIDENCE}
        phases.append({"sparsity": None, **restart})
    return phases


def patience_for(cfg: TrainConfig, epochs: int) -> int | None:
    """train.early_stopping_patience; when train.min_steps lengthened the schedule, one that
    never stops but keeps the best validation epoch: settings a short tuning trial liked can
    diverge over hundreds of epochs (seen: RMSprop at lr 0.028 on the soybean table fell to
    the majority class by the last epoch)."""
    if epochs > cfg.epochs and not cfg.early_stopping_patience:
        return epochs + 1
    return cfg.early_stopping_patience


def train_model(
    features: Manifest, cfg: TrainConfig, out: StageDir, on_epoch: EpochHook | None = None
) -> dict[str, Any]:
    """Launch the workers on train/val; return the manifest body with the model files.
    `on_epoch` gets rank 0's row for each epoch as it arrives."""
    spec = train_spec(features, cfg, str(out.tmp), str(out.path("checkpoints")))
    world = resolve_world_size(cfg)
    processes = world * cfg.nnodes
    lr = peak_lr(cfg, processes)
    rows = features["splits"]["train"]["rows"]
    spec["phases"] = training_phases(cfg, rows, processes, lr)
    epochs = sum(phase["epochs"] for phase in spec["phases"])
    spec["early_stopping_patience"] = patience_for(cfg, epochs)
    result = launch(
        spec,
        world,
        out.tmp,
        on_epoch,
        nnodes=cfg.nnodes,
        endpoint=cfg.rdzv_endpoint,
        max_restarts=cfg.max_restarts,
    )
    history = json.loads(out.path("history.json").read_text())
    curves = plot_curves(history, out.path("training_curves.png"))
    return {
        "model": model_files(out),
        "plots": [out.final_path("training_curves.png")] if curves else [],
        "arch": spec["arch"],
        "result": result,
        "metrics": {
            "train/val_accuracy": result["val_accuracy"],
            "train/val_macro_f1": result["val_macro_f1"],
            "train/seconds": result["seconds"],
            "train/world_size": world,
            "train/epochs": epochs,
            "train/cycles": len(spec["phases"]),  # 2: a warm restart (train.warm_restart)
            "train/global_batch": cfg.batch_size * processes,
            "train/peak_lr": lr,
            "train/streamed": float(result.get("data_mode") == "streaming"),
            "train/class_weighted": float(spec["class_weights"] is not None),
            "train/parameters": result["parameters"],
            **{
                f"train/{k}": result[k]
                for k in (
                    "best_epoch",
                    "stopped_epoch",
                    "restart_gain",  # val accuracy, the restart's best over the first cycle's
                    "restart_gain_bound",  # its lower bound at RESTART_CONFIDENCE
                    "step_ms",
                    "data_wait_pct",
                    "peak_rss_mib",
                )
                if result.get(k) is not None
            },
        },
        "summary": f"{cfg.model} {cfg.optimizer}/{cfg.scheduler}, "
        + cycles_note(cfg, spec["phases"], rows, result)
        + f" on {world} "
        f"{result['device']} process(es), global batch {cfg.batch_size * processes} "
        f"(train.batch_size × processes), peak LR {lr:g}"
        + (f" (train.lr × {processes}, train.scale_lr)" if cfg.scale_lr else "")
        + (
            f"; loss weighted by class (train.class_weight: {cfg.class_weight}, weights "
            f"{min(spec['class_weights']):.2f}–{max(spec['class_weights']):.2f})"
            if spec["class_weights"]
            else ""
        )
        + (
            "; classes drawn equally often (train.sampler: balanced)"
            if cfg.sampler == "balanced"
            else ""
        )
        + f": val accuracy {result['val_accuracy']:.4f} in "
        f"{result['seconds']:.1f} s"
        + (
            f"; early stopping at epoch {result['stopped_epoch']}, kept epoch {result['best_epoch']}"
            if result.get("stopped_epoch") is not None
            else ""
        )
        + f". {bottleneck(result)}"
        + (
            f". torch.compile: {result['compile']}"
            + (f" ({result['compile_error']})" if result.get("compile_error") else "")
            if result.get("compile", "off") != "off"
            else ""
        ),
    }


def tuned_config(cfg: PipelineConfig, inputs: Inputs) -> TrainConfig:
    """train.* with the search's best values laid over it (unchanged when tuning is off)."""
    best = inputs["tune"].get("best_params") or {}
    return TrainConfig.model_validate({**cfg.train.model_dump(), **best}) if best else cfg.train


def train_key(cfg: PipelineConfig, inputs: Inputs) -> dict[str, Any]:
    """The training settings that shape the model; how often a dead worker may restart
    does not, so changing it reuses what was trained."""
    return tuned_config(cfg, inputs).model_dump(mode="json", exclude={"max_restarts"})


def build_training(cfg: PipelineConfig, inputs: Inputs, out: StageDir, hooks: Hooks) -> dict:
    body = train_model(inputs["reduce"], tuned_config(cfg, inputs), out, hooks.on_epoch)
    # which values came from the search, not from the config
    return {
        **body,
        "tags": {f"accelflow.tuned.{k}": "search" for k in inputs["tune"]["best_params"]},
    }


SPEC = StageSpec(
    name="train",
    section="train",
    inputs=("reduce", "tune"),
    key=train_key,
    build=build_training,
    figure=lambda m: f"val acc {m['metrics']['train/val_accuracy']:.4f}",
    params=tuned_config,
    resumable=True,
)
