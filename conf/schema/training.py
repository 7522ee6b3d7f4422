"""The model sections: train, and tune's search space over train's keys."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    PositiveInt,
    field_validator,
    model_serializer,
    model_validator,
)

from conf.schema.base import Section
from conf.schema.catalog import MODEL_FAMILIES, ModelChoice


class TrainConfig(Section):
    model: ModelChoice = Field(
        "auto",
        description="mlp: features; cnn: images; rnn, transformer: an image's rows / patches, "
        "or a table's features (the table MODEL_FAMILIES says which reads what); auto: cnn "
        "for images, mlp for tables and PCA features, decided after ingest",
    )
    hidden: list[int] = Field(
        default_factory=lambda: [512, 256],
        description="mlp: layer widths; cnn: the head's width; rnn, transformer: len(hidden) "
        "layers of hidden[0]",
    )
    channels: list[PositiveInt] = Field(
        default_factory=lambda: [16, 32],
        min_length=2,
        max_length=2,
        description="cnn: the two conv blocks' widths",
    )
    cell: Literal["gru", "lstm"] = Field("gru", description="rnn: the recurrent cell")
    heads: int = Field(4, ge=1, description="transformer: attention heads (divide hidden[0])")
    patch: int = Field(4, ge=1, description="transformer on images: patch side in pixels")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout after each hidden layer")
    numeric_embedding: Literal["none", "periodic"] = Field(
        "none",
        description="mlp: periodic: each numeric feature enters as a learned embedding of "
        "sin/cos at learned frequencies (PLR, Gorishniy et al. 2022) instead of one number",
    )
    periodic_scale: float = Field(
        0.1, gt=0, description="numeric_embedding periodic: the frequencies' initial spread σ"
    )
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
    class_weight: Literal["auto", "balanced", "none"] = Field(
        "auto",
        description="weight each class's loss by n / (classes × its rows) (balanced); auto: "
        "when the rarest training class has under a tenth of the largest's rows, by each "
        "class's effective rows (Cui et al. 2019): a class of a handful of rows weighs as "
        "balanced would have it, classes of thousands alike",
    )
    sampler: Literal["shuffle", "balanced"] = Field(
        "shuffle",
        description="shuffle: every row once per epoch; balanced: rows drawn with replacement "
        "so every class is drawn equally often (instead of class weights)",
    )
    epochs: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="training epochs; auto: the model family's own (15; the cnn 8: each "
        "epoch costs ~10x an MLP's and it converges sooner)",
    )
    min_steps: int = Field(
        500,
        ge=0,
        description="a small table trains more epochs, until each process has taken this "
        "many optimizer steps (15 epochs of 700 rows are 30 steps: an MLP barely starts)",
    )
    warm_restart: bool | Literal["auto"] = Field(
        "auto",
        description="a second cycle of the schedule, twice as long, from the trained weights "
        "(a warm restart, Loshchilov & Hutter 2017); its best validation epoch replaces the "
        "first cycle's only where it answers more validation rows right at 80% confidence "
        "(paired bootstrap). auto: where train.min_steps raised the epochs (a small table: "
        "cheap cycles, and some tables need the longer one, others overfit in it)",
    )
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
    def _one_imbalance_remedy(self) -> TrainConfig:
        if self.sampler == "balanced" and self.class_weight == "balanced":
            raise ValueError(
                "train.sampler: balanced already draws every class equally often; with "
                "train.class_weight: balanced the rare classes would count twice. Keep one"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _family_epochs(cls, data: Any) -> Any:
        """epochs: auto becomes the family's number once the model is known (with model auto:
        after ingest, when PipelineConfig.with_model_for validates the config again)."""
        if isinstance(data, dict) and data.get("epochs", "auto") == "auto":
            model = data.get("model", "auto")
            if model in MODEL_FAMILIES:
                data = {**data, "epochs": MODEL_FAMILIES[model].epochs}
        return data

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        epochs = self.epochs
        if epochs == "auto":  # train.model auto: the family is known after ingest (checked
            epochs = max(f.epochs for f in MODEL_FAMILIES.values())  # again then)
        if self.warmup_epochs >= epochs:
            raise ValueError(
                f"train.warmup_epochs ({self.warmup_epochs}) must be shorter than train.epochs "
                f"({epochs})"
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
    timeout_s: float | None = Field(
        60,
        gt=0,
        description="start no new trial after this many seconds (a cnn trial takes ~20 s on 2 "
        "cores: make run stays within its 10 minutes); null: every one of tune.trials",
    )
    parallel: int | Literal["auto"] = Field(
        "auto", description="concurrent trials; auto: one per Dask worker"
    )
    epochs: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="epochs of a trial that runs to its end; auto: under asha, rungs of 1, 3, "
        "9 (27) epochs until the longest trials see every training row (tune.max_rows an "
        "epoch), at least 9 and at most 27; under median or none, 3",
    )
    min_steps: int = Field(
        100,
        ge=0,
        description="small tables: more epochs per trial, until it takes this many optimizer "
        "steps (3 epochs of a 455-row table at batch 128 are 12 steps: trials that short rank "
        "settings by how fast they start, not where they end)",
    )
    max_rows: int | None = Field(
        10000,
        ge=10,
        description="training rows per trial epoch: each epoch the next rows of a seeded walk "
        "over the split, so a trial the pruner keeps sees epochs × max_rows rows",
    )
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler (seeded)")
    pruner: Literal["median", "asha", "none"] = Field(
        "asha",
        description="asha: successive halving, a trial goes on past 1, 3, 9 epochs only in the "
        "best third of those that reached it; median: stops a trial below the median after any "
        "epoch; none",
    )
    metric: Literal["val_accuracy", "val_loss", "val_macro_f1"] = Field(
        "val_accuracy",
        description="what the search optimises, on the validation split (val_macro_f1: every "
        "class weighs alike, for imbalanced tables)",
    )
    confidence: float | None = Field(
        None,
        gt=0.5,
        lt=1,
        description="e.g. 0.9: the best trial replaces train.*'s own settings only when its "
        "lead over the default trial holds at this confidence (a paired bootstrap on the "
        "validation rows: a lead of a few rows may be chance); null: the best trial, and the "
        "summary says whether its lead holds at 90%",
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
