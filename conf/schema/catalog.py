"""The two tables every stage reads: model families (what a `train.model` reads, whether
structured pruning can narrow it) and compression steps (rank in a recipe, the level a sweep
varies, whether it fine-tunes, which families it applies to)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class ModelFamily:
    """What a `train.model` reads and what compression can do to it: one row per family;
    validation, reduce's pass-through, the auto sweep and the builders read this table."""

    reads: Literal["features", "images", "images or features"]
    narrowable: bool  # structured pruning removes whole neurons / channels (a real speed-up)
    # train.epochs: auto. A CNN's epoch costs ~10x an MLP's on CPU and it converges sooner:
    # 8 epochs reach 0.92 on Fashion-MNIST, within make run's 10-minute budget on 2 cores
    epochs: int = 15
    # compress.finetune_epochs: auto. Narrowed by half on Fashion-MNIST, a GRU and a
    # transformer were ~2 points down after 2 epochs, within half a point after 5; the MLP
    # narrowed by half + int8 0.63 / 0.50 / 0.38 point down after 2 / 4 / 6 (a few seconds
    # an epoch); the CNN's stay 2: ~40 s an epoch on 2 cores, within make run's budget
    finetune_epochs: int = 2


MODEL_FAMILIES = {
    "mlp": ModelFamily(reads="features", narrowable=True, finetune_epochs=6),
    "cnn": ModelFamily(reads="images", narrowable=True, epochs=8),
    # an image's rows (rnn) or patches (transformer), or a table's features as a sequence
    # (narrowed: a GRU / LSTM's hidden units, a transformer's heads and feed-forward width)
    "rnn": ModelFamily(reads="images or features", narrowable=True, finetune_epochs=5),
    "transformer": ModelFamily(reads="images or features", narrowable=True, finetune_epochs=5),
}
ModelName = Literal[tuple(MODEL_FAMILIES)]  # type: ignore[valid-type]
# train.model: a family, or auto (decided after ingest: PipelineConfig.with_model_for)
ModelChoice = Literal[("auto", *MODEL_FAMILIES)]  # type: ignore[valid-type]


def reads_images(model: str, image_shape: Any) -> bool:
    """Whether `model` takes the pixels whole: always for an images-only family, and for
    one that reads either when the data are images."""
    reads = MODEL_FAMILIES[model].reads
    return reads == "images" or (reads == "images or features" and bool(image_shape))


def needs_images(model: str) -> bool:
    return MODEL_FAMILIES[model].reads == "images"


# the models structured pruning knows how to narrow
STRUCTURED_MODELS = tuple(name for name, family in MODEL_FAMILIES.items() if family.narrowable)


@dataclass(frozen=True)
class CompressionStep:
    """One compression step: where it goes in a recipe, which level the sweep varies for it,
    whether it needs fine-tuning, and which model families it applies to. One row per step;
    validation, the sweep grid, point names and the fine-tune plan read this table."""

    rank: int  # a recipe's steps in rising rank: prune (0), then share or quantize
    level: Literal["sparsity", "bits"] | None  # the knob a sweep varies for it
    finetunes: bool  # needs training after it (int8 is applied to the fine-tuned weights)
    families: tuple[str, ...] = tuple(MODEL_FAMILIES)
    int8: bool = False  # ends in the int8 conversion


COMPRESSION_STEPS = {
    "magnitude": CompressionStep(rank=0, level="sparsity", finetunes=True),
    "structured": CompressionStep(
        rank=0, level="sparsity", finetunes=True, families=STRUCTURED_MODELS
    ),
    "cluster": CompressionStep(rank=1, level="bits", finetunes=True),
    "quantize": CompressionStep(rank=2, level=None, finetunes=False, int8=True),
    # int8 after a quantization-aware fine-tune (simulated int8 in the forward pass)
    "qat": CompressionStep(rank=2, level=None, finetunes=True, int8=True),
}
CompressStep = Literal[tuple(COMPRESSION_STEPS)]  # type: ignore[valid-type]
PRUNING_STEPS = tuple(name for name, step in COMPRESSION_STEPS.items() if step.rank == 0)


def converts_to_int8(recipe: list[str]) -> bool:
    return any(COMPRESSION_STEPS[step].int8 for step in recipe)


def recipe_problem(recipe: list[str], key: str, rounds: int = 1) -> str | None:
    """Why a compression recipe cannot run in that order, naming its key; None if it can.
    Order: at most one pruning step first, then k-means sharing or int8 (quantize, or qat:
    one of them, not both: int8 would undo the shared values)."""
    rank = {name: step.rank for name, step in COMPRESSION_STEPS.items()}
    if len(set(recipe)) != len(recipe):
        return f"{key} {recipe} repeats a step: each step once"
    if sum(step in PRUNING_STEPS for step in recipe) > 1:
        return f"{key} {recipe}: choose one pruning step, magnitude or structured"
    if [rank[s] for s in recipe] != sorted(rank[s] for s in recipe):
        return (
            f"{key} {recipe} is out of order: pruning (magnitude | structured) first, then "
            "cluster, quantize or qat"
        )
    encoders = [s for s in recipe if s == "cluster" or COMPRESSION_STEPS[s].int8]
    if len(encoders) > 1:
        return (
            f"{key} {recipe}: {' and '.join(encoders)} each re-encode the weights (int8 would "
            "undo shared values; qat is quantize after a quantization-aware fine-tune); "
            "choose one"
        )
    if "structured" in recipe and rounds != 1:
        return (
            f"compress.rounds is {rounds}, but structured pruning ({key}) is one-shot: set "
            "compress.rounds to 1 (rounds ramp magnitude pruning)"
        )
    return None
