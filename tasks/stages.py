"""The stages in DAG order: the one list the flow, the Prefect wrappers, the CLI's stage
table, run-over-run comparison, the report and the tests read (each stage's `SPEC` sits at
the end of its module). Adding a stage: its module with a `SPEC`, its config section in
conf/schema/pipeline.py, and one line here (docs/extending.md walks through it)."""

from __future__ import annotations

from tasks import compress, evaluate, ingest, partition, reduce, train, tune
from tasks.spec import StageSpec

STAGES: tuple[StageSpec, ...] = (
    ingest.SPEC,
    partition.SPEC,
    reduce.SPEC,
    tune.SPEC,
    train.SPEC,
    compress.SPEC,
    evaluate.SPEC,
)
NAMES = tuple(spec.name for spec in STAGES)
# parent-run metrics (the ones a reviewer sorts by) and which direction is better
HEADLINE = {metric: better for spec in STAGES for metric, better in spec.headline.items()}


def check_order(stages: tuple[StageSpec, ...]) -> None:
    """Every stage's inputs come before it: the flow runs the list top to bottom."""
    seen: set[str] = set()
    for spec in stages:
        missing = [name for name in spec.inputs if name not in seen]
        if missing:
            raise RuntimeError(f"stage {spec.name} reads {missing}, which do not run before it")
        seen.add(spec.name)


check_order(STAGES)
