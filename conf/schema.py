"""The typed pipeline config: one YAML document, one section per stage.

Every key here is also an MLflow param name (`section.key`). Unknown keys and bad values
are errors that name the key, so a typo never silently falls back to a default.

    from conf.schema import load_config
    cfg = load_config("conf/pipeline.yaml", ["train.epochs=3", "data.source=/data/x.csv"])
    cfg = load_config(profile="cluster")   # conf/profiles/cluster.yaml laid over the defaults
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from tasks.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).with_name("pipeline.yaml")
PROFILES = Path(__file__).with_name("profiles")


@dataclass(frozen=True)
class ModelFamily:
    """What a `train.model` reads and what compression can do to it: one row per family;
    validation, reduce's pass-through, the auto sweep and the builders read this table."""

    reads: Literal["features", "images", "images or features"]
    narrowable: bool  # structured pruning removes whole neurons / channels (a real speed-up)


MODEL_FAMILIES = {
    "mlp": ModelFamily(reads="features", narrowable=True),
    "cnn": ModelFamily(reads="images", narrowable=True),
    # an image's rows (rnn) or patches (transformer), or a table's features as a sequence
    "rnn": ModelFamily(reads="images or features", narrowable=False),
    "transformer": ModelFamily(reads="images or features", narrowable=False),
}
ModelName = Literal[tuple(MODEL_FAMILIES)]  # type: ignore[valid-type]


def reads_images(model: str, image_shape: Any) -> bool:
    """Whether `model` takes the pixels whole: always for an images-only family, and for
    one that reads either when the data are images."""
    reads = MODEL_FAMILIES[model].reads
    return reads == "images" or (reads == "images or features" and bool(image_shape))


def needs_images(model: str) -> bool:
    return MODEL_FAMILIES[model].reads == "images"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    source: str = Field(
        "/usr/share/datasets/fashion-mnist",
        description="a path or fsspec URL: an IDX folder, a CSV (also .gz/.zst/.bz2/.xz), "
        "Parquet (a file or a folder) or .npz with X and y",
    )
    format: Literal["auto", "idx", "csv", "parquet", "npz"] = Field(
        "auto", description="the source's format; auto: guessed from the path"
    )
    label: str = Field("label", description="the label column (CSV, Parquet)")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of rows for validation")
    test_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="share of rows for test (an IDX folder's own t10k test set is kept instead)",
    )
    seed: int = Field(0, description="salts each row's hash, which decides its split")
    max_rows: int | None = Field(None, ge=10, description="deterministic subsample per split")
    missing: Literal["fill", "error"] = Field(
        "fill", description="fill: the training median / a <missing> category; error: refuse"
    )
    on_bad_rows: Literal["error", "drop", "quarantine"] = Field(
        "error",
        description="rows with a missing label or a stray string in a number column: error "
        "names them, drop skips them, quarantine keeps them with a reason in the ingest output",
    )
    max_onehot: int = Field(16, ge=1, description="categoricals with more values get integer codes")
    columns: dict[str, Literal["numeric", "categorical"]] | None = Field(
        None,
        description="a declared schema, e.g. {age: numeric, plan: categorical}: only these "
        "feature columns, with these types; null: inferred",
    )
    block_mb: float = Field(
        32.0,
        gt=0,
        description="tables are read in blocks of about this size, one Dask task each (made "
        "smaller when dask.memory_limit calls for it; the output does not depend on it)",
    )

    @model_validator(mode="after")
    def _room_for_training(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"data.val_fraction ({self.val_fraction}) + data.test_fraction "
                f"({self.test_fraction}) leave no rows for training; keep their sum below 1"
            )
        return self


class DaskConfig(Section):
    address: str | None = Field(
        None,
        description="a Dask scheduler (tcp://host:8786); null: a LocalCluster for the flow run",
    )
    n_workers: int = Field(2, ge=1, description="LocalCluster: worker processes")
    threads_per_worker: int = Field(1, ge=1, description="LocalCluster: threads per worker")
    memory_limit: str = Field("2GiB", description="LocalCluster: memory cap per worker")


class PartitionConfig(Section):
    codec: Literal["auto", "zstd", "snappy", "gzip", "lz4", "none"] = Field(
        "zstd",
        description="Parquet codec; auto: the best ratio among codecs reading within 20% of "
        "the fastest, by the codec report",
    )
    compression_level: int = Field(
        3, ge=1, le=22, description="zstd 1-22, gzip 1-9; others have none"
    )
    target_partition_mb: float = Field(32.0, gt=0, description="size of each Parquet file")
    row_group_mb: float = Field(
        64.0, gt=0, description="capped by the file size; large groups let dictionaries pay"
    )
    sample_mb: float = Field(4.0, gt=0, description="training rows the codec report measures")
    storage_dtype: Literal["native", "float16"] = Field(
        "native", description="float16 halves float columns (lossy; evaluate reports the cost)"
    )

    @model_validator(mode="after")
    def _level_fits_codec(self) -> PartitionConfig:
        if self.codec == "gzip" and self.compression_level > 9:
            raise ValueError("partition.compression_level: gzip takes 1-9")
        return self

    @property
    def level(self) -> int | None:
        return self.compression_level if self.codec in ("zstd", "gzip") else None


class ReduceConfig(Section):
    method: Literal["auto", "pca", "none"] = Field(
        "auto",
        description="auto: fit PCA when the input is wide enough and use it only when it "
        "keeps few components",
    )
    standardize: bool | Literal["auto"] = Field(
        "auto",
        description="auto: on for tables (columns in unrelated units), off for images "
        "(pixels share one scale)",
    )
    variance_target: float = Field(
        0.95, gt=0.0, le=1.0, description="keep the fewest components explaining this share"
    )
    max_components: int | None = Field(None, ge=1, description="at most this many components")
    auto_min_features: int = Field(
        32, ge=1, description="auto: inputs narrower than this are never reduced"
    )
    auto_max_kept: float = Field(
        0.5, gt=0.0, le=1.0, description="auto: reduce only when PCA keeps at most this share"
    )
    sweep: list[float | Literal["none"]] | None = Field(
        None,
        description="measure instead of assume, e.g. [0.8, 0.9, 0.99, none]: a proxy "
        "training per variance target (none: the raw features), in parallel",
    )
    pick: Literal["smallest_within", "best"] = Field(
        "smallest_within",
        description="sweep: the fewest features within reduce.tolerance of the best, or the best",
    )
    tolerance: float = Field(
        0.005, ge=0.0, le=1.0, description="smallest_within: accuracy this close to the best"
    )
    sweep_epochs: int = Field(3, ge=1, description="epochs of each sweep point's proxy training")
    sweep_rows: int = Field(10000, ge=10, description="training rows each point trains on")

    @field_validator("sweep")
    @classmethod
    def _targets(cls, v: list | None) -> list | None:
        if v is None:
            return v
        if len(v) < 2:
            raise ValueError("a sweep needs at least two targets, e.g. [0.9, 0.99, none]")
        bad = [t for t in v if t != "none" and not 0 < t <= 1]
        if bad:
            raise ValueError(f"variance targets must be in (0, 1] or 'none'; got {bad}")
        return v


class TrainConfig(Section):
    model: ModelName = Field(
        "mlp",
        description="mlp: features; cnn: images; rnn, transformer: an image's rows / patches, "
        "or a table's features (the table MODEL_FAMILIES says which reads what)",
    )
    hidden: list[int] = Field(
        default_factory=lambda: [512, 256],
        description="mlp: layer widths; cnn: the head's width; rnn, transformer: len(hidden) "
        "layers of hidden[0]",
    )
    cell: Literal["gru", "lstm"] = Field("gru", description="rnn: the recurrent cell")
    heads: int = Field(4, ge=1, description="transformer: attention heads (divide hidden[0])")
    patch: int = Field(4, ge=1, description="transformer on images: patch side in pixels")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout after each hidden layer")
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = Field(
        "adamw", description="the optimizer, by name"
    )
    lr: float = Field(3e-3, gt=0, description="the (peak) learning rate")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd, rmsprop: momentum")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd with momentum > 0)")
    weight_decay: float = Field(1e-4, ge=0.0, description="L2 (decoupled for adamw)")
    l1: float = Field(
        0.0, ge=0.0, description="L1 penalty on the weight matrices, added to the loss"
    )
    clip_grad_norm: float | None = Field(None, gt=0.0, description="clip the gradient norm to this")
    scheduler: Literal["none", "step", "exponential", "cosine", "onecycle", "plateau"] = Field(
        "onecycle", description="the learning-rate schedule (plateau: on the validation loss)"
    )
    warmup_epochs: int = Field(0, ge=0, description="linear LR warm-up before the schedule")
    plateau_patience: int = Field(
        2, ge=1, description="plateau: epochs without a better val loss before the LR drops"
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many epochs without a better val accuracy"
    )
    step_size: int = Field(5, ge=1, description="epochs between decays (step)")
    gamma: float = Field(
        0.5, gt=0.0, le=1.0, description="decay factor (step, exponential, plateau)"
    )
    label_smoothing: float = Field(0.05, ge=0.0, lt=1.0, description="of the cross-entropy")
    epochs: int = Field(15, ge=1, description="training epochs")
    batch_size: int = Field(256, ge=1, description="rows per step and process")
    resident_max_gb: float | Literal["auto"] = Field(
        "auto",
        description="a split larger than this (GiB, as float32) is streamed from its Parquet "
        "row groups instead of loaded whole; auto: half the memory free per process (or GPU)",
    )
    scale_lr: bool = Field(
        False, description="linear LR scaling: lr × processes × nodes (the global batch grows)"
    )
    world_size: int | Literal["auto"] = Field(
        "auto", description="DDP processes per node; auto: one per GPU, else 2 gloo on CPU"
    )
    nnodes: int = Field(1, ge=1, description="nodes in the torchrun rendezvous")
    rdzv_endpoint: str | None = Field(
        None, description="host:port of the c10d rendezvous (nnodes > 1)"
    )
    max_restarts: int = Field(
        2, ge=0, description="times a dead worker group restarts from its last checkpoint"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 autocast on GPUs (fp16 + GradScaler without bf16), fp32 on CPU",
    )
    compile: bool = Field(
        False, description="torch.compile (falls back to eager where compilation fails)"
    )
    seed: int = Field(0, description="initialisation and shuffling seed")

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, v: list[int]) -> list[int]:
        if not v or any(w < 1 for w in v):
            raise ValueError("hidden must list at least one positive layer width")
        return v

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"train.warmup_epochs ({self.warmup_epochs}) must be shorter than train.epochs "
                f"({self.epochs})"
            )
        return self

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TrainConfig:
        if self.model == "transformer" and self.hidden[0] % self.heads:
            raise ValueError(
                f"train.hidden[0] ({self.hidden[0]}) must be a multiple of train.heads "
                f"({self.heads}) for the transformer"
            )
        return self

    @model_validator(mode="after")
    def _rendezvous_for_many_nodes(self) -> TrainConfig:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(
                "train.nnodes > 1 needs train.rdzv_endpoint (host:port reachable from every node)"
            )
        return self

    @field_validator("resident_max_gb")
    @classmethod
    def _positive_memory(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and v <= 0:
            raise ValueError("resident_max_gb must be 'auto' or a positive number of GiB")
        return v

    @field_validator("world_size")
    @classmethod
    def _positive_world(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("world_size must be 'auto' or a positive integer")
        return v


# train.* keys a search may not set: they shape where and how long it runs, not the model
UNTUNABLE = (
    "epochs",
    "world_size",
    "nnodes",
    "rdzv_endpoint",
    "max_restarts",
    "compile",
    "seed",
    "scale_lr",
    "resident_max_gb",
)


class SearchDimension(Section):
    """One axis of the search: a float or int range (log-scaled if `log`), or choices."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _well_formed(self) -> SearchDimension:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None or self.log:
                raise ValueError("categorical takes 'choices' only, not low/high/log")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs 'low' and 'high'")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log needs low > 0 (got {self.low})")
        if self.choices is not None:
            raise ValueError(f"{self.type} takes low/high, not choices")
        return self

    @model_serializer(mode="wrap")
    def _only_what_is_set(self, handler) -> dict[str, Any]:
        """`{type: float, low: 0.001, high: 0.1, log: true}` as written, no unset keys (they
        would clutter the MLflow params and the digest's readers)."""
        return {k: v for k, v in handler(self).items() if v is not None and v is not False}

    def values_to_check(self) -> list[Any]:
        """The values train.* must accept for this axis to be valid."""
        if self.type == "categorical":
            return list(self.choices or [])
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]


def default_space() -> dict[str, SearchDimension]:
    dims = {
        "optimizer": {"type": "categorical", "choices": ["sgd", "adam", "adamw", "rmsprop"]},
        "lr": {"type": "float", "low": 3e-4, "high": 3e-2, "log": True},
        "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
        "momentum": {"type": "float", "low": 0.8, "high": 0.98},
        "nesterov": {"type": "categorical", "choices": [False, True]},
        "batch_size": {"type": "categorical", "choices": [128, 256, 512]},
        "scheduler": {"type": "categorical", "choices": ["none", "cosine", "onecycle"]},
        "dropout": {"type": "float", "low": 0.0, "high": 0.4},
        "label_smoothing": {"type": "float", "low": 0.0, "high": 0.15},
        "hidden": {"type": "categorical", "choices": [[256, 128], [512, 256], [1024, 512]]},
    }
    return {k: SearchDimension(**v) for k, v in dims.items()}


class TuneConfig(Section):
    enabled: bool = Field(
        True, description="an Optuna search over train.* before training; false: train.* as given"
    )
    trials: int = Field(16, ge=1, description="trials in the study, the default trial included")
    timeout_s: float | None = Field(None, gt=0, description="start no new trial after this")
    parallel: int | Literal["auto"] = Field(
        "auto", description="concurrent trials; auto: one per Dask worker"
    )
    epochs: int = Field(3, ge=1, description="training epochs per trial")
    max_rows: int | None = Field(
        10000, ge=10, description="training rows per trial (a seeded subsample)"
    )
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler (seeded)")
    pruner: Literal["median", "asha", "none"] = Field(
        "median", description="stops poor trials after an epoch"
    )
    metric: Literal["val_accuracy", "val_loss"] = Field(
        "val_accuracy", description="what the search optimises, on the validation split"
    )
    seed: int = Field(0, description="the sampler's seed")
    storage: str | None = Field(
        None,
        description="null: Optuna's journal file in the stage folder; else a database URL "
        "(postgresql+psycopg2://user:pass@host/optuna)",
    )
    space: dict[str, SearchDimension] = Field(
        default_factory=default_space,
        description="train.* key → {type: float|int, low, high, log} or {type: categorical, "
        "choices}; the default covers optimizer, lr, weight decay, momentum, batch size, "
        "schedule, dropout, label smoothing and widths",
    )

    @field_validator("storage")
    @classmethod
    def _empty_is_the_journal(cls, v: str | None) -> str | None:
        return v or None  # an unset ${OPTUNA_STORAGE:-} in a profile

    @field_validator("parallel")
    @classmethod
    def _positive_parallel(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("parallel must be 'auto' or a positive integer")
        return v


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


COMPRESSION_STEPS = {
    "magnitude": CompressionStep(rank=0, level="sparsity", finetunes=True),
    "structured": CompressionStep(
        rank=0, level="sparsity", finetunes=True, families=STRUCTURED_MODELS
    ),
    "cluster": CompressionStep(rank=1, level="bits", finetunes=True),
    "quantize": CompressionStep(rank=2, level=None, finetunes=False),
}
CompressStep = Literal[tuple(COMPRESSION_STEPS)]  # type: ignore[valid-type]
PRUNING_STEPS = tuple(name for name, step in COMPRESSION_STEPS.items() if step.rank == 0)


def recipe_problem(recipe: list[str], key: str, rounds: int = 1) -> str | None:
    """Why a compression recipe cannot run in that order, naming its key; None if it can.
    Order: at most one pruning step first, then k-means sharing or int8 (not both: int8
    would undo the shared values)."""
    rank = {name: step.rank for name, step in COMPRESSION_STEPS.items()}
    if len(set(recipe)) != len(recipe):
        return f"{key} {recipe} repeats a step: each step once"
    if sum(step in PRUNING_STEPS for step in recipe) > 1:
        return f"{key} {recipe}: choose one pruning step, magnitude or structured"
    if [rank[s] for s in recipe] != sorted(rank[s] for s in recipe):
        return (
            f"{key} {recipe} is out of order: pruning (magnitude | structured) first, then "
            "cluster or quantize"
        )
    if "cluster" in recipe and "quantize" in recipe:
        return (
            f"{key} {recipe}: cluster and quantize both re-encode the weights (int8 would undo "
            "the shared values); choose one"
        )
    if "structured" in recipe and rounds != 1:
        return (
            f"compress.rounds is {rounds}, but structured pruning ({key}) is one-shot: set "
            "compress.rounds to 1 (rounds ramp magnitude pruning)"
        )
    return None


class CompressSweep(Section):
    """Recipes × levels: every recipe at every level it uses (sparsity for a pruning step,
    bits for cluster), each point fine-tuned and measured, in parallel on the Dask cluster."""

    recipes: list[list[CompressStep]] = Field(
        default_factory=lambda: [["magnitude"], ["structured"], ["quantize"]]
    )
    sparsity: list[float] = Field(
        default_factory=lambda: [0.5],
        description="magnitude: share of weights zeroed; structured: share of each hidden "
        "layer's neurons/channels removed",
    )
    bits: list[int] = Field(default_factory=lambda: [5], description="cluster: 2^bits values")

    @field_validator("sparsity")
    @classmethod
    def _sparsity_levels(cls, v: list[float]) -> list[float]:
        if any(not 0 <= s < 1 for s in v):
            raise ValueError(f"every sparsity must be in [0, 1), got {v}")
        return v

    @field_validator("bits")
    @classmethod
    def _bit_levels(cls, v: list[int]) -> list[int]:
        if any(not 1 <= b <= 8 for b in v):
            raise ValueError(f"every bits level must be 1-8, got {v}")
        return v

    @model_validator(mode="after")
    def _a_sweep_with_points(self) -> CompressSweep:
        if not self.recipes:
            raise ValueError("compress.sweep.recipes is empty: list at least one recipe")
        for i, recipe in enumerate(self.recipes):
            if not recipe:
                raise ValueError(
                    f"compress.sweep.recipes[{i}] is empty: the uncompressed baseline is "
                    "always measured; remove it"
                )
            if problem := recipe_problem(recipe, f"compress.sweep.recipes[{i}]"):
                raise ValueError(problem)
        used = {COMPRESSION_STEPS[step].level for recipe in self.recipes for step in recipe}
        if not self.sparsity and "sparsity" in used:
            raise ValueError("compress.sweep.sparsity is empty, but a recipe prunes")
        if not self.bits and "bits" in used:
            raise ValueError("compress.sweep.bits is empty, but a recipe clusters")
        return self


def auto_sweep(model: str) -> CompressSweep:
    """`compress.recipe: auto`: the recipes that can make this model faster on a CPU at
    sparsity 0.5: narrower layers (mlp, cnn), int8 Linear layers, and both; magnitude zeros
    where layers cannot be narrowed (rnn, transformer: then the gain is the file size)."""
    if model in STRUCTURED_MODELS:
        return CompressSweep(recipes=[["structured"], ["quantize"], ["structured", "quantize"]])
    return CompressSweep(recipes=[["magnitude"], ["quantize"], ["magnitude", "quantize"]])


class CompressConfig(Section):
    recipe: list[CompressStep] | Literal["auto"] = Field(
        "auto",
        description="steps in order: magnitude | structured, then cluster | quantize; [] keeps "
        "the trained model; auto: sweep the recipes that make train.model faster (auto_sweep)",
    )
    sparsity: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="magnitude: share of weights zeroed; structured: share of each hidden "
        "layer's neurons/channels removed",
    )
    bits: int = Field(
        5, ge=1, le=8, description="cluster: k-means weight sharing, 2^bits values per layer"
    )
    rounds: int = Field(1, ge=1, description="magnitude: pruning rounds, fine-tuned after each")
    finetune_epochs: int = Field(2, ge=0, description="fine-tuning epochs after pruning")
    finetune_lr: float = Field(1e-3, gt=0, description="fine-tuning learning rate")
    sweep: CompressSweep | None = Field(
        None, description="recipes × levels instead of one recipe, the best point chosen"
    )

    @model_validator(mode="after")
    def _a_recipe_that_composes(self) -> CompressConfig:
        if self.recipe != "auto" and self.sweep:
            raise ValueError(
                "compress.recipe and compress.sweep are both set: set compress.recipe to auto "
                "to sweep, or compress.sweep to null to run the one recipe"
            )
        if self.recipe != "auto" and (
            problem := recipe_problem(self.recipe, "compress.recipe", self.rounds)
        ):
            raise ValueError(problem)
        if self.sweep:
            # (in a sweep, compress.rounds ramps the magnitude points; structured is one-shot)
            for i, recipe in enumerate(self.sweep.recipes):
                if problem := recipe_problem(recipe, f"compress.sweep.recipes[{i}]"):
                    raise ValueError(problem)
        return self

    def recipes(self) -> list[tuple[str, list[str]]]:
        """(key, recipe) for every recipe this config runs (after `auto` is resolved)."""
        if self.sweep:
            return [(f"compress.sweep.recipes[{i}]", r) for i, r in enumerate(self.sweep.recipes)]
        return [("compress.recipe", self.recipe)]


class EvaluateConfig(Section):
    max_accuracy_drop: float = Field(
        0.005,
        ge=0.0,
        le=1.0,
        description="a compressed model is chosen, and a new model may replace the "
        "champion, only within this accuracy drop of the baseline",
    )
    latency_repeats: int = Field(30, ge=3, description="timed calls per latency figure")
    objective: Literal["latency", "size"] = Field(
        "latency",
        description="what the compress choice and the champion gate reward: batch-256 "
        "latency or zstd size",
    )
    objective_margin: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="an objective counts as better only beyond this share (latency is noisy)",
    )


class AlertsConfig(Section):
    """When a run is flagged as a regression against the previous run on the same data."""

    max_accuracy_drop: float = Field(
        0.01, ge=0.0, le=1.0, description="test accuracy lower than the last run's by more"
    )
    max_slowdown: float = Field(
        0.5, ge=0.0, description="batch-256 latency more than this much slower (0.5 = +50%)"
    )


class TrackingConfig(Section):
    uri: str = Field(
        "sqlite:///mlflow.db",
        description="the MLflow tracking store: sqlite:///file.db, postgresql://…, http://host:5000",
    )
    experiment: str = Field("accelflow", description="the MLflow experiment")


class RegistryConfig(Section):
    model_name: str = Field(
        "accelflow-classifier", description="the registered model (aliases champion, challenger)"
    )


class PipelineConfig(Section):
    workdir: str = Field(
        ".accelflow", description="stage outputs: <workdir>/<stage>/<key>/, written atomically"
    )
    data: DataConfig = Field(default_factory=DataConfig)
    dask: DaskConfig = Field(default_factory=DaskConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    reduce: ReduceConfig = Field(default_factory=ReduceConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)

    @model_validator(mode="before")
    @classmethod
    def _renamed_sections(cls, tree: Any) -> Any:
        if isinstance(tree, dict) and "prune" in tree:
            raise ValueError(
                "the prune section is now compress: prune.method X → compress.recipe [X] "
                "(none → []), prune.cluster_bits N → compress.bits N with cluster in the "
                "recipe, prune.quantize dynamic_int8 → quantize in the recipe; sparsity, "
                "rounds, finetune_epochs and finetune_lr keep their names"
            )
        return tree

    @model_validator(mode="after")
    def _compatible_sections(self) -> PipelineConfig:
        images = needs_images(self.train.model)
        if self.reduce.sweep and (self.reduce.method == "none" or images):
            raise ValueError(
                "reduce.sweep compares PCA targets, but "
                + (
                    "reduce.method is 'none'"
                    if self.reduce.method == "none"
                    else f"train.model '{self.train.model}' needs the raw images"
                )
                + ": remove reduce.sweep or change that key"
            )
        if self.compress.recipe == "auto" and not self.compress.sweep:
            self.compress.sweep = auto_sweep(self.train.model)  # logged as the real grid
        for key, recipe in self.compress.recipes():
            for step in recipe:
                families = COMPRESSION_STEPS[step].families
                if self.train.model not in families:
                    raise ValueError(
                        f"{key} {recipe}: {step} pruning narrows the layers of "
                        f"{' and '.join(families)} models, but train.model is "
                        f"'{self.train.model}': use magnitude instead"
                    )
        if images and self.reduce.method == "pca":
            readers = [m for m, f in MODEL_FAMILIES.items() if f.reads != "images"]
            raise ValueError(
                f"train.model '{self.train.model}' works on raw images, but reduce.method is "
                f"'pca': set reduce.method to 'auto' or 'none' ({', '.join(readers)} can read "
                "PCA features)"
            )
        return self

    @model_validator(mode="after")
    def _space_fits_train(self) -> PipelineConfig:
        """Every axis of tune.space names a train.* key and only values train.* accepts."""
        tunable = sorted(set(TrainConfig.model_fields) - set(UNTUNABLE))
        base = self.train.model_dump()
        for key, dim in self.tune.space.items():
            if key not in tunable:
                raise ValueError(
                    f"tune.space.{key}: not a train.* key a search can set; tunable keys: "
                    + ", ".join(tunable)
                )
            for value in dim.values_to_check():
                try:
                    TrainConfig.model_validate({**base, key: value})
                except ValidationError as exc:
                    reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
                    raise ValueError(
                        f"tune.space.{key}: train.{key} would reject {value!r} ({reason})"
                    ) from None
        return self

    def digest(self) -> str:
        return config_digest(self.model_dump(mode="json"))

    def flat(self) -> dict[str, Any]:
        """`section.key` → value, the form MLflow params take, secrets masked."""
        return flatten(self.public())

    def public(self) -> dict[str, Any]:
        """The config as it may be shown (MLflow, Prefect, reports): secrets masked."""
        return mask_secrets(self.model_dump(mode="json"))


SECRET_KEY = re.compile(r"pass(word)?|secret|token|api_?key|credential", re.IGNORECASE)
URL_PASSWORD = re.compile(
    r"(?P<head>[a-z][a-z0-9+.\-]*://[^:/@\s]*):(?P<secret>[^@/\s]+)@", re.IGNORECASE
)
QUERY_SECRET = re.compile(
    r"(?P<head>[?&;](?:pass(?:word)?|secret|token|api_?key|sig|signature)=)(?P<secret>[^&;\s]+)",
    re.IGNORECASE,
)
MASK = "***"


def mask_text(text: str) -> str:
    """A URL's password and secret query values replaced by ***: what MLflow and Prefect
    may show (postgresql+psycopg2://user:***@db/mlflow)."""
    text = URL_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@", text)
    return QUERY_SECRET.sub(lambda m: f"{m['head']}{MASK}", text)


def mask_secrets(node: Any, key: str = "") -> Any:
    """A copy of a config or manifest tree safe to publish: values under secret-looking keys
    masked whole, passwords inside URLs and query strings masked in place."""
    if isinstance(node, dict):
        return {k: mask_secrets(v, str(k)) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [mask_secrets(v, key) for v in node]
    if isinstance(node, str):
        return MASK if SECRET_KEY.search(key) and node else mask_text(node)
    return node


def config_digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (3 → int, [1,2] → list)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc})") from None


ENV_REFERENCE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_env(node: Any, key: str = "") -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in string values, so endpoints and secrets
    come from the environment (or docker/.env), never from committed files."""
    if isinstance(node, dict):
        return {k: expand_env(v, f"{key}{k}.") for k, v in node.items()}
    if isinstance(node, list):
        return [expand_env(v, key) for v in node]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ConfigError(
                f"'{key.rstrip('.')}' needs environment variable {name}; set it or give "
                f"a default as ${{{name}:-value}}"
            )
        return default

    expanded = ENV_REFERENCE.sub(substitute, node)
    return yaml.safe_load(expanded) if expanded != node and expanded.strip() else expanded


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass -c with a YAML file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections, not {type(tree).__name__}"
        )
    return tree


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = (
            merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def profile_path(profile: str) -> Path:
    path = Path(profile)
    if path.suffix in (".yaml", ".yml"):
        return path
    found = PROFILES / f"{profile}.yaml"
    if not found.is_file():
        known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise ConfigError(f"profile '{profile}' not found in {PROFILES}; known profiles: {known}")
    return found


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, profile: str | None = None
) -> PipelineConfig:
    """Read YAML, lay a profile over it, expand ${ENV} references, apply `--set` overrides,
    validate. Raises ConfigError naming the key."""
    path = Path(path) if path else DEFAULT_CONFIG
    tree = read_yaml(path)
    source = str(path)
    if profile:
        tree = merge(tree, read_yaml(profile_path(profile)))
        source = f"{path} + profile {profile}"
    tree = expand_env(tree)
    for assignment in overrides or []:
        apply_override(tree, assignment)
    return validate_config(tree, source=source)


def validate_config(tree: dict[str, Any], source: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key '{key}' (check the spelling; see conf/pipeline.yaml)")
            elif not key or isinstance(err.get("input"), dict):  # a rule that names its keys
                problems.append(message)
            else:
                problems.append(f"'{key}': {message} (got {err.get('input')!r})")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None
