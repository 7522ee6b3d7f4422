"""The compress section: one recipe or a sweep of recipes × levels."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from conf.schema.base import Section
from conf.schema.catalog import COMPRESSION_STEPS, STRUCTURED_MODELS, CompressStep, recipe_problem


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
    sparsity 0.5: narrower layers, int8, and both; magnitude zeros for a family whose layers
    cannot be narrowed (MODEL_FAMILIES: every family today can)."""
    if model in STRUCTURED_MODELS:
        return CompressSweep(recipes=[["structured"], ["quantize"], ["structured", "quantize"]])
    return CompressSweep(recipes=[["magnitude"], ["quantize"], ["magnitude", "quantize"]])


class DistillConfig(Section):
    enabled: bool = Field(
        True,
        description="fine-tune with the trained model as teacher: the loss mixes the labels' "
        "cross-entropy with the KL divergence to its softened outputs (Hinton et al. 2015)",
    )
    alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="the teacher's weight in the loss (1: the teacher only)"
    )
    temperature: float = Field(
        4.0, gt=0, description="softens both outputs; the KL term is scaled by its square"
    )


class CompressSearch(Section):
    """An Optuna NSGA-II study over each layer's width and int8 (and, under the size
    objective, magnitude sparsity and k-means bits), beside the sweep's points: objectives
    evaluate.objective's cost and validation accuracy, the accuracy budget a constraint
    (tasks/compress/search.py)."""

    enabled: bool = Field(
        False,
        description="search per-layer widths and int8 beside the sweep (off by default: a cnn "
        "trial's fine-tune takes ~40 s on 2 cores, beyond make run's 10 minutes)",
    )
    trials: int = Field(12, ge=1, description="trials in the study")
    timeout_s: float | None = Field(
        None, gt=0, description="start no new generation of trials after this many seconds"
    )
    max_ratio: float = Field(
        0.75,
        gt=0.0,
        lt=1.0,
        description="the largest share of one layer's neurons/channels a trial may remove "
        "(in steps of 0.125)",
    )
    quantize: bool = Field(True, description="whether a trial may also convert to int8")
    cluster_bits: list[Annotated[int, Field(ge=1, le=8)]] = Field(
        default_factory=lambda: [4, 5, 6],
        description="evaluate.objective size: the k-means bits a trial may cluster its "
        "weights to instead (clustering makes a model smaller, not faster); [] never",
    )
    magnitude: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(
        default_factory=lambda: [0.5, 0.7, 0.8, 0.9],
        description="evaluate.objective size: the magnitude sparsities a trial may prune to "
        "instead of narrowing (zeroed weights store small, they do not run faster); [] never",
    )
    seed: int = Field(0, description="the sampler's seed")


class CompressConfig(Section):
    recipe: list[CompressStep] | Literal["auto"] = Field(
        "auto",
        description="steps in order: magnitude | structured, then cluster | quantize | qat; [] "
        "keeps the trained model; auto: sweep the recipes that make train.model faster "
        "(auto_sweep)",
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
    finetune_epochs: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="fine-tuning epochs after each pruning or sharing step; auto: the "
        "family's (ModelFamily.finetune_epochs): 6 for mlp, 5 for rnn and transformer, 2 for "
        "cnn (narrowed by half on Fashion-MNIST, the mlp, rnn and transformer were within "
        "half a point after theirs; a cnn epoch costs ~40 s on 2 cores)",
    )
    finetune_lr: float = Field(1e-3, gt=0, description="fine-tuning learning rate")
    min_steps: int = Field(
        100,
        ge=0,
        description="a small table fine-tunes more epochs, until each phase takes this many "
        "optimizer steps per process (2 epochs of 1,400 rows are 6 steps: a GRU narrowed by "
        "half scored 0.50 val accuracy after them, 0.94 after 100)",
    )
    calibration_rows: int = Field(
        512,
        ge=0,
        description="static int8 (a cnn in onnxruntime): training rows that calibrate the "
        "activations' ranges",
    )
    qat: bool = Field(
        True,
        description="when post-training int8 puts a swept point outside "
        "evaluate.max_accuracy_drop while the same point in float is within it, fine-tune it "
        "again in simulated int8 (the qat step) and keep whichever is better",
    )
    distill: DistillConfig = Field(
        default_factory=DistillConfig, description="distillation from the trained model"
    )
    sweep: CompressSweep | None = Field(
        None, description="recipes × levels instead of one recipe, the best point chosen"
    )
    search: CompressSearch = Field(
        default_factory=CompressSearch,
        description="a multi-objective search over per-layer widths, beside the sweep",
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
        if self.search.enabled and self.recipe == []:
            raise ValueError(
                "compress.search.enabled is true, but compress.recipe is [] (keep the trained "
                "model): set compress.recipe to auto, or compress.search.enabled to false"
            )
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
