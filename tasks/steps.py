"""The Prefect tasks: one thin wrapper, the same for every stage, driven by its `StageSpec`.

`run_step` opens the stage's nested MLflow run, lets `run_stage` decide between a cache hit
and a build, and publishes what the spec names (tables, reports, nested runs, datasets,
plots). Prefect's own result caching is off (`NO_CACHE`): stage folders keyed by content
digests are the cache, so it also survives across flow runs and processes. The one thing
not every stage has, registration and the champion gate after evaluate, is `AFTER`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.schema import PipelineConfig, config_digest, mask_text
from tasks import evaluate, monitor, registry
from tasks.compress import MODEL_METRICS, point_figures
from tasks.errors import DataError, user_error_in
from tasks.progress import observe
from tasks.spec import Hooks, Inputs, StageSpec
from tasks.stages import STAGES
from tasks.store import StageOutcome, code_version, run_stage, stage_lock
from tasks.tracking import (
    epoch_logger,
    link_registered_model,
    log_child,
    log_dataset,
    log_source,
    progress_artifact,
    publish,
    publish_markdown,
    publish_table,
    stage_run,
)

observe(progress_artifact)  # each stage's progress as a Prefect artifact in its task run
SPECS = {spec.name: spec for spec in STAGES}


def not_a_user_error(task, task_run, state) -> bool:
    """Retry a Dask stage after a lost worker, never after bad input: that fails the same."""
    return user_error_in(state.data if isinstance(state.data, BaseException) else None) is None


RETRY_DASK = {"retries": 1, "retry_delay_seconds": 5, "retry_condition_fn": not_a_user_error}


def run_step(stage: str, cfg: PipelineConfig, parent: str, inputs: Inputs) -> StageOutcome:
    """Run one stage (cache hit or build) inside its nested MLflow run and publish it."""
    spec = SPECS[stage]
    with stage_run(parent, stage, spec.section, spec.logged_config(cfg, inputs)) as run_id:
        hooks = Hooks(epoch_logger(run_id), lambda child: log_child(run_id, child))
        outcome = run_stage(
            cfg.workdir,
            stage,
            code_version(spec.build.__module__),  # the stage module's import closure
            spec.key(cfg, inputs),
            [inputs[name] for name in spec.inputs],
            lambda out: spec.build(cfg, inputs, out, hooks),
            resumable=spec.resumable,
        )
        publish_extras(spec, outcome, inputs, run_id)
        if stage in AFTER:
            AFTER[stage](cfg, inputs, outcome)
        publish(stage, outcome)
    return outcome


def lookup(manifest: dict[str, Any], key: str) -> Any:
    """`manifest["a"]["b"]` for key "a.b"; None where a level is missing."""
    node: Any = manifest
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def publish_extras(spec: StageSpec, outcome: StageOutcome, inputs: Inputs, run_id: str) -> None:
    """What the spec names beyond the summary: inputs, tags, nested runs, reports, tables, plots."""
    import mlflow

    m = outcome.manifest
    if m.get("source"):
        log_source(m["source"]["uri"], m["source"]["fingerprint"])
    for stage, split, context in spec.datasets:
        log_dataset(m if stage == spec.name else inputs[stage], split, context=context)
    if m.get("tags"):
        mlflow.set_tags(m["tags"])
    if spec.children and not outcome.cached:  # a cached stage's are under the run that made them
        for child in spec.children(m):
            log_child(run_id, child, inputs.get("partition"))
    for name, key in spec.reports.items():
        if m.get(key):
            publish_markdown(spec.name, name, Path(m[key]).read_text())
    for name, key in spec.tables.items():
        if rows := lookup(m, key):
            publish_table(spec.name, name, rows)
    for plot in m.get("plots", []):
        mlflow.log_artifact(plot, spec.name)


def card_facts(cfg: PipelineConfig, inputs: Inputs) -> dict[str, str]:
    """What the model card says about the data, features, model and compression."""
    partitions, trained = inputs["partition"], inputs["train"]
    rows = {s: partitions["splits"][s]["rows"] for s in ("train", "val", "test")}
    arch = trained["arch"]
    return {
        "data": f"{mask_text(cfg.data.source)}: {rows['train']:,} train / {rows['val']:,} val / "
        f"{rows['test']:,} test rows, {len(partitions['classes'])} classes",
        "features": inputs["reduce"]["summary"],
        "model": f"{arch['model']} {arch['hidden']}, trained {trained['summary'].split(':')[0]}",
        "compression": inputs["compress"].get("summary", "none"),
        "config digest": cfg.digest(),
    }


# the registered model's test figures in the Models tab (the evaluate run keeps them all)
TESTED_MODEL_METRICS = ("test/accuracy", "test/macro_f1", "test/latency_b256_ms")


def register_and_gate(cfg: PipelineConfig, inputs: Inputs, outcome: StageOutcome) -> None:
    """Register the evaluated model and gate it against the champion (in evaluate's run)."""
    import mlflow

    # one registration at a time per workdir: two runs of one model register one version
    with stage_lock(
        Path(cfg.workdir).resolve() / "registry", config_digest(cfg.registry.model_name)
    ):
        promotion = registry.register_and_promote(
            outcome.manifest,
            evaluate.input_example(inputs["partition"]),
            cfg.registry,
            cfg.evaluate,
            card_facts(cfg, inputs),
            test_rows=lambda: evaluate.raw_test_batches(inputs["partition"]),
            classes=inputs["partition"]["classes"],
            contract=(inputs["partition"].get("contract") or {}).get("path"),
        )
    gate = promotion.pop("markdown")
    if promotion["model_id"]:  # the registered model's own figures, on the test split
        metrics = outcome.manifest["metrics"]
        figures = {"test": {k: metrics[k] for k in TESTED_MODEL_METRICS if k in metrics}}
        # and, beside the compress points in the Models tab, the chosen point's (validation)
        chosen = [row for row in inputs["compress"].get("table", []) if row.get("chosen")]
        if chosen:
            point = point_figures(chosen[0])
            figures["val"] = {k: point[k] for k in MODEL_METRICS if k in point}
        link_registered_model(promotion["model_id"], figures, inputs["partition"])
    mlflow.set_tags({f"accelflow.registry.{k}": str(v) for k, v in promotion.items()})
    publish_markdown("evaluate", "gate", gate)
    outcome.manifest["promotion"] = promotion


def check_data(cfg: PipelineConfig, inputs: Inputs, outcome: StageOutcome) -> None:
    """Today's ingested data against the champion's contract, before anything expensive
    (in ingest's run): findings whose kind is `error` stop the run, one line each; the
    drift table and plot are logged here and the result kept for the flow's summary."""
    import mlflow

    found = registry.champion_contract(cfg.registry) if cfg.monitor.enabled else None
    if found is None or not outcome.manifest.get("contract"):
        outcome.manifest["monitor"] = None
        return
    champion, name = found
    result = monitor.compare(champion, outcome.manifest, cfg.monitor, name)
    outcome.manifest["monitor"] = result
    mlflow.log_metrics(
        {"drift/max_psi": result["max_psi"], "monitor/findings": len(result["findings"])}
    )
    mlflow.set_tags(
        {
            "accelflow.monitor.findings": "; ".join(f["line"] for f in result["findings"])[:5000],
            "accelflow.drift": monitor.first_few(result["drifted"]),
        }
    )
    publish_markdown("ingest", "drift", monitor.drift_markdown(result))
    with tempfile.TemporaryDirectory() as tmp:
        monitor.plot_drift(result, Path(tmp) / "drift.png")
        mlflow.log_artifact(str(Path(tmp) / "drift.png"), "ingest")
    if result["errors"]:
        raise DataError(
            f"{cfg.data.source} breaks the data contract of {name} "
            "(monitor.on_violation says which findings stop a run):\n- "
            + "\n- ".join(result["errors"])
        )


AFTER: dict[str, Callable[[PipelineConfig, Inputs, StageOutcome], None]] = {
    "ingest": check_data,
    "evaluate": register_and_gate,
}
# one Prefect task per stage, named for it; Dask stages retry once after a lost worker
TASKS = {
    spec.name: task(
        run_step, name=spec.name, cache_policy=NO_CACHE, **(RETRY_DASK if spec.uses_dask else {})
    )
    for spec in STAGES
}
