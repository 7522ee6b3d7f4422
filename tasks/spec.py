"""A stage, declared once beside its logic (`SPEC` at the end of each stage module).

`tasks.stages.STAGES` lists the specs in DAG order; the flow, the Prefect wrappers, the
CLI's stage table, run-over-run comparison, the HTML report and the tests all read that
list, so adding a stage is its module, its config section and one line there (see
docs/extending.md). Pure declarations: no Prefect, no MLflow here (ground floor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Manifest = dict[str, Any]
Inputs = dict[str, Manifest]  # upstream stage name → its manifest


@dataclass(frozen=True)
class ChildRun:
    """A nested run under the stage's run (a trial, a sweep point), as plain data. A child
    that is a model (a compress point) names its `model_type`: it is also logged as a model
    of its own, its metrics measured on the split `measured_on`."""

    name: str
    params: dict[str, Any]
    metrics: list[tuple[str, float, int]]  # (key, value, step)
    tags: dict[str, str]
    status: str = "FINISHED"
    model_type: str | None = None
    measured_on: str | None = None  # "train" | "val" | "test"
    # the figures linked to the model (the Models tab's columns); all of them when empty
    model_metrics: tuple[str, ...] = ()


@dataclass
class Hooks:
    """What the orchestration floor hands a build so its work is seen live: a sink for
    rank 0's epoch rows, one for finished children (tuning trials) as they come. A stage
    never knows where they go (MLflow, in the Prefect wrapper)."""

    on_epoch: Callable[[dict[str, Any]], None] | None = None
    on_child: Callable[[ChildRun], None] | None = None


@dataclass(frozen=True)
class StageSpec:
    """What the rest of accelflow needs to know of one stage.

    `key(cfg, inputs)` is the config that goes into its cache key (the stage's code digest
    and its inputs' digests are added by the store); `build(cfg, inputs, out, hooks)` writes
    the outputs into `out.tmp` and returns the manifest body. Both are pure stage logic.
    """

    name: str
    section: str  # its config section: MLflow params `<section>.<key>`
    inputs: tuple[str, ...]  # upstream stages whose manifests it reads
    key: Callable[[Any, Inputs], dict[str, Any]]
    build: Callable[[Any, Inputs, Any, Hooks], Manifest]
    figure: Callable[[Manifest], str]  # the one figure of the CLI's stage table
    # manifest metrics the parent run carries, and which direction is better
    headline: dict[str, str] = field(default_factory=dict)
    params: Callable[[Any, Inputs], Any] | None = None  # logged config (default: the section)
    tables: dict[str, str] = field(default_factory=dict)  # artifact name → manifest key (rows)
    reports: dict[str, str] = field(default_factory=dict)  # artifact name → manifest key (a .md)
    # splits logged as the run's MLflow inputs: (stage whose manifest holds it, split, context)
    datasets: tuple[tuple[str, str, str], ...] = ()
    # the manifest's rows as nested runs (a cached stage's are under the run that made them)
    children: Callable[[Manifest], list[ChildRun]] | None = None
    resumable: bool = False  # keeps its partial folder (checkpoints, trials) when killed
    uses_dask: bool = False  # retried once after a lost worker

    def logged_config(self, cfg: Any, inputs: Inputs) -> Any:
        return self.params(cfg, inputs) if self.params else getattr(cfg, self.section)
