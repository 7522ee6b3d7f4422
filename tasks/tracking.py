"""The thin MLflow + Prefect layer: one parent run per pipeline run, one nested run per stage.

Stage logic never imports this module; the `@task` wrappers do. Each stage run gets the
stage's config slice as params (`section.key`), its metrics (`stage/metric`), tags saying
whether it was a cache hit and why it ran, its manifest and summary as artifacts, and the
same summary as a Prefect markdown artifact.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conf.schema import (
    DEFAULT_CONFIG,
    PipelineConfig,
    config_digest,
    flatten,
    mask_secrets,
    mask_text,
    run_link,
)
from tasks.errors import ConfigError, user_error_in
from tasks.spec import ChildRun
from tasks.store import Manifest, StageOutcome, file_lock, files_digest


def _env_file(path: Path) -> dict[str, str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


# one file, also handed to every container by docker/compose.yaml
TELEMETRY_OFF = _env_file(DEFAULT_CONFIG.with_name("telemetry.env"))


def quiet_environment() -> None:
    """Offline-friendly defaults; a value the user already set wins."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


class _UserErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failed task or flow with its traceback. For a user error (bad data,
    config, a failed training run) the traceback only buries the one paragraph that says
    what to do: keep the paragraph, drop the traceback. Bugs keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = user_error_in(record.exc_info[1]) if record.exc_info else None
        if error is not None:
            record.msg, record.args = "stopped by a user error: %s", (str(error),)
            record.exc_info = record.exc_text = None
        return True


def user_errors_without_traceback() -> None:
    """Install the filter on the loggers Prefect's engines report failures through."""
    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UserErrorsWithoutTraceback) for f in logger.filters):
            logger.addFilter(_UserErrorsWithoutTraceback())


def check_tracking(uri: str) -> None:
    """Fail in seconds, before any expensive work, when the tracking store cannot be reached
    (MLflow's own client would retry for minutes and then print a traceback)."""
    where = f"tracking.uri {mask_text(uri)}"
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
        except Exception as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(
                f"{where}: no MLflow server answers ({reason}); start it (make serve, or the "
                "docker/ stack) or point tracking.uri at a running server"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent
        if not folder.is_dir():
            raise ConfigError(
                f"{where}: folder {folder} does not exist; create it or change tracking.uri"
            )
    elif uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql"):
        import sqlalchemy

        try:
            engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 10})
            with engine.connect():
                pass
            engine.dispose()
        except Exception as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(
                f"{where}: cannot connect to the database ({first}); check that "
                "it runs and the URL is right"
            ) from None


def configure(cfg: PipelineConfig) -> str:
    """Point MLflow at the configured store; return the experiment id (created if new)."""
    import mlflow

    quiet_environment()
    mlflow.set_tracking_uri(cfg.tracking.uri)
    os.environ["MLFLOW_TRACKING_URI"] = cfg.tracking.uri  # training workers inherit it
    lock = contextlib.nullcontext()
    if cfg.tracking.uri.startswith("sqlite:///"):
        # a new sqlite store is created by migrations and the experiment by an insert: two
        # runs starting at once on one store would collide in both, so they take turns
        db = Path(cfg.tracking.uri.removeprefix("sqlite:///")).expanduser().resolve()
        lock = file_lock(db.with_name(f".{db.name}.lock"))
    with lock:
        return _experiment_id(cfg)


def _experiment_id(cfg: PipelineConfig) -> str:
    import mlflow

    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if cfg.tracking.uri.startswith("sqlite:///"):
        # keep artifacts beside the sqlite file, not in whatever folder the run starts from
        db = Path(cfg.tracking.uri.removeprefix("sqlite:///")).resolve()
        artifact_location = (db.parent / "mlartifacts").as_uri()
    # Without this tag MLflow 3's UI opens the experiment in its GenAI mode.
    return mlflow.create_experiment(
        cfg.tracking.experiment,
        artifact_location=artifact_location,
        tags={"mlflow.experimentKind": "custom_model_development"},
    )


def git_commit(checkout: Path | None = None) -> str:
    """The commit of this code's checkout (or of another `checkout`), "unknown" outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=checkout or Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_label(source: str) -> str:
    """`digits` for /data/digits.csv.gz, `fashion-mnist` for an IDX folder: the last part of
    the source's path without its extensions (a URL's query and credentials never shown)."""
    from urllib.parse import urlsplit

    path = urlsplit(source).path if "://" in source else source
    name = Path(path.rstrip("/")).name or "data"
    return name.split(".")[0] or name


def readable_run_name(cfg: PipelineConfig, experiment_id: str) -> str:
    """`digits · mlp · 1a2b3c4d`: the data, the model family and the config digest, with
    ` #2`, ` #3`... for later runs of the same config, so each name in the runs table is unique."""
    import mlflow

    name = f"{source_label(cfg.data.source)} · {cfg.train.model} · {cfg.digest()[:8]}"
    same = mlflow.search_runs(
        [experiment_id],
        f"tags.`accelflow.config_digest` = '{cfg.digest()}' AND tags.`accelflow.stage` = 'pipeline'",
        output_format="list",
    )
    return f"{name} #{len(same) + 1}" if same else name


def name_model(parent_run_id: str, model: str) -> None:
    """`train.model: auto` decided: the run's name and a tag say which model it trains."""
    import mlflow

    client = mlflow.MlflowClient()
    name = client.get_run(parent_run_id).info.run_name
    client.set_tag(parent_run_id, "mlflow.runName", name.replace(" · auto · ", f" · {model} · ", 1))
    client.set_tag(parent_run_id, "accelflow.model", model)


def flow_run_page(flow_run_id) -> str:
    """The flow run's page in the Prefect UI; "none" on the CLI's temporary server (no UI,
    and gone after the run) or outside a flow run."""
    from prefect.utilities.urls import url_for

    if flow_run_id is None or os.environ.get("ACCELFLOW_PREFECT_TEMPORARY"):
        return "none"
    return str(url_for("flow-run", obj_id=flow_run_id) or "none")


@contextlib.contextmanager
def pipeline_run(cfg: PipelineConfig, experiment_id: str) -> Iterator[str]:
    """The parent run: tags link it to the Prefect flow run, the code and the config."""
    import mlflow
    from prefect.runtime import deployment, flow_run

    tags = {
        "accelflow.stage": "pipeline",  # what the runs table filters on to hide nested runs
        "accelflow.model": cfg.train.model,  # auto: replaced by the model ingest's data decides
        "accelflow.flow_run_id": str(flow_run.id or "none"),
        "accelflow.flow_run_name": str(flow_run.name or "none"),
        "accelflow.flow_run_url": flow_run_page(flow_run.id),
        "accelflow.deployment": str(deployment.name or "none"),
        "accelflow.config_digest": cfg.digest(),
        "mlflow.source.git.commit": git_commit(),
        "mlflow.source.name": "flows/pipeline.py",  # not Prefect's engine module
    }
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=readable_run_name(cfg, experiment_id), tags=tags
    ) as run:
        mlflow.log_params(cfg.flat())
        mlflow.log_text(_yaml(cfg), "config/pipeline.yaml")
        yield run.info.run_id


@contextlib.contextmanager
def stage_run(parent_run_id: str, stage: str, section: str, config: Any) -> Iterator[str]:
    """A nested run for one stage, named after it, carrying its config slice as params."""
    import mlflow

    # Tasks may run in other threads than the flow, where MLflow's active experiment is
    # unset: take the parent's experiment explicitly or the run lands in "Default".
    experiment_id = mlflow.MlflowClient().get_run(parent_run_id).info.experiment_id
    with mlflow.start_run(
        run_name=stage, nested=True, parent_run_id=parent_run_id, experiment_id=experiment_id
    ) as run:
        mlflow.set_tag("accelflow.stage", stage)
        params = flatten(
            mask_secrets(
                config.model_dump(mode="json") if hasattr(config, "model_dump") else config
            )
        )
        mlflow.log_params({f"{section}.{k}": v for k, v in params.items()})
        yield run.info.run_id


def publish(stage: str, outcome: StageOutcome) -> None:
    """Log a stage's outcome to the active MLflow run and as a Prefect artifact."""
    import mlflow

    m = outcome.manifest
    mlflow.set_tags(
        {
            "accelflow.cached": str(outcome.cached).lower(),
            "accelflow.reason": outcome.reason[:5000],
            "accelflow.stage_key": m["key"],
        }
    )
    # a stage's own `stage/seconds` (the workers' training time) is kept; this call's wall
    # time, cache check and MLflow included, is `stage/wall_seconds`
    metrics = {
        **m.get("metrics", {}),
        f"{stage}/wall_seconds": outcome.seconds,
        f"{stage}/cached": float(outcome.cached),
    }
    metrics.setdefault(f"{stage}/seconds", outcome.seconds)
    # not again what a hook logged already (the registered model's figures, linked to it)
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.metrics
    mlflow.log_metrics({k: v for k, v in metrics.items() if logged.get(k) != v})
    mlflow.log_dict(mask_secrets(m), f"{stage}/manifest.json")
    ran = "cached" if outcome.cached else "ran"
    summary = mask_text(f"### {stage}\n\n{ran}: {outcome.reason}\n\n{m.get('summary', '')}\n")
    mlflow.log_text(summary, f"{stage}/summary.md")
    run = mlflow.active_run().info
    link = run_link(mlflow.get_tracking_uri(), run.experiment_id, run.run_id)
    _prefect_artifact(
        "create_markdown_artifact",
        markdown=f"{summary}\n[This stage's MLflow run]({link})\n",
        key=f"accelflow-{stage}",
        description=f"{stage} summary",
    )


def publish_table(stage: str, name: str, rows: list[dict[str, Any]], plots: list[str] = ()) -> None:
    """A table (and its plots) in the active MLflow run and as a Prefect table artifact."""
    import mlflow
    import pandas as pd

    mlflow.log_table(pd.DataFrame(rows), artifact_file=f"{stage}/{name}.json")
    for plot in plots:
        mlflow.log_artifact(plot, stage)
    _prefect_artifact(
        "create_table_artifact",
        table=rows,
        key=f"accelflow-{stage}-{name}",
        description=f"{stage}: {name}",
    )


def publish_markdown(stage: str, name: str, text: str) -> None:
    """A markdown note in the active MLflow run (`<stage>/<name>.md`) and as a Prefect artifact."""
    import mlflow

    mlflow.log_text(text, f"{stage}/{name}.md")
    _prefect_artifact(
        "create_markdown_artifact",
        markdown=text,
        key=f"accelflow-{stage}-{name}",
        description=f"{stage}: {name}",
    )


def split_identity(manifest: Manifest, split: str) -> tuple[str, str]:
    """(name, digest) of a stage's split as MLflow knows it: `partition-val`, its files' digest."""
    return f"{manifest['stage']}-{split}", files_digest(manifest["splits"][split]["files"])


def log_dataset(manifest: Manifest, split: str, context: str) -> None:
    """`mlflow.log_input` from a manifest: name, digest, source, row count — no data loaded."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    files = manifest["splits"][split]["files"]
    if not files:
        return
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local files
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(files[0]["path"]).parent.as_uri())
    name, digest = split_identity(manifest, split)
    _log_input(MetaDataset(source=source, name=name, digest=digest), context)


def log_source(source: str, fingerprint: list[list]) -> None:
    """The raw source as an MLflow input: its location and a digest of its fingerprint (every
    file's name, size and modification time), so a run says which data it read."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    uri = mask_text(source) if "://" in source else Path(source).expanduser().resolve().as_uri()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            located = resolve_dataset_source(uri)
    except Exception as exc:  # a scheme MLflow has no source type for: lineage, not a failure
        print(f"note: the source {uri} is not logged as an MLflow input ({exc})")
        return
    dataset = MetaDataset(source=located, name="source", digest=config_digest(fingerprint))
    _log_input(dataset, "source")


def log_pipeline_inputs(ingested: Manifest, partitions: Manifest) -> None:
    """On the parent run, the run a reviewer opens first: the source it read and the three
    splits it made, with their digests (the stage runs carry the same)."""
    if ingested.get("source"):
        log_source(ingested["source"]["uri"], ingested["source"]["fingerprint"])
    for split in ("train", "val", "test"):
        log_dataset(partitions, split, context=split)


def _log_input(dataset, context: str) -> None:
    """`mlflow.log_input`, once more if another run registered the same dataset at the same
    moment: MLflow's get-or-create of a dataset is not atomic, and the loser of that race
    sees a unique-constraint error although the dataset is there for it to use."""
    import mlflow

    try:
        mlflow.log_input(dataset, context=context)
    except mlflow.exceptions.MlflowException as exc:
        if "UNIQUE constraint" not in str(exc) and "duplicate key" not in str(exc):
            raise
        mlflow.log_input(dataset, context=context)


def _prefect_artifact(factory: str, **kwargs: Any) -> None:
    """Create a Prefect artifact (`create_markdown_artifact`, `create_table_artifact`) for the
    current task run; outside a task run there is nowhere to attach it."""
    try:
        import prefect.artifacts
        from prefect.context import TaskRunContext

        if TaskRunContext.get() is not None:
            getattr(prefect.artifacts, factory)(**kwargs)
    except Exception as exc:  # an artifact is a convenience: never fail a stage over it
        print(f"note: could not publish the Prefect artifact {kwargs.get('key')}: {exc}")


def progress_artifact(stage: str, what: str):
    """A `tasks.progress` observer: inside a Prefect task run, a progress artifact that
    follows the stage's work (`progress.observe(progress_artifact)`); elsewhere none."""
    try:
        import prefect.artifacts
        from prefect.context import TaskRunContext

        if TaskRunContext.get() is None:
            return None
        artifact = prefect.artifacts.create_progress_artifact(
            0.0, key=f"accelflow-{stage}-progress", description=f"{stage}: {what}"
        )
    except Exception as exc:  # a convenience: never fail a stage over it
        print(f"note: no Prefect progress artifact for {stage}: {exc}")
        return None

    def follow(done: int, total: int) -> None:
        try:
            prefect.artifacts.update_progress_artifact(
                artifact, min(100.0, 100.0 * done / max(total, 1))
            )
        except Exception as exc:
            print(f"note: could not update the Prefect progress artifact: {exc}")

    return follow


def epoch_logger(run_id: str):
    """A training launcher's `on_epoch`: rank 0's row for each epoch, logged to the stage's
    MLflow run as it arrives (the workers themselves never talk to MLflow)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient()

    def log(row: dict[str, Any]) -> None:
        stamp = int(time.time() * 1000)
        step = int(row["epoch"])
        metrics = [
            Metric(k, float(v), stamp, step)
            for k, v in row.items()
            if k not in ("epoch", "phase") and isinstance(v, int | float)
        ]
        client.log_batch(run_id, metrics=metrics, synchronous=True)

    return log


def _yaml(cfg: PipelineConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.public(), sort_keys=False)


def log_child_run(
    stage_run_id: str,
    name: str,
    params: dict[str, Any],
    metrics: list[tuple[str, float, int]],
    tags: dict[str, str],
    status: str = "FINISHED",
    model_type: str | None = None,
    dataset: tuple[str, str] | None = None,
    model_metrics: tuple[str, ...] = (),
) -> str:
    """A finished run nested under a stage's run (a tuning trial, a sweep point), opened
    with the client so the stage's own active run is left alone. `metrics` are
    (key, value, step); non-finite values are left out. With a `model_type` the child is also
    an MLflow logged model (the Models tab lists it beside the others, and the pipeline's
    parent run shows it among its logged models): its params, and its metrics (those in
    `model_metrics`, when given) linked to it and to `dataset` (name, digest), the split
    they were measured on."""
    import mlflow
    from mlflow.entities import LoggedModelOutput, Metric, Param, RunTag

    client = mlflow.MlflowClient()
    stage = client.get_run(stage_run_id)
    run = client.create_run(
        stage.info.experiment_id, run_name=name, tags={"mlflow.parentRunId": stage_run_id}
    )
    model_id = None
    if model_type:
        model_id = client.create_logged_model(
            stage.info.experiment_id,
            name=re.sub(r"[/:.%\"']", "_", name),  # MLflow refuses these in a model's name
            source_run_id=run.info.run_id,
            params={k: str(v) for k, v in params.items()},
            tags={k: v[:5000] for k, v in tags.items()},
            model_type=model_type,
        ).model_id
    dataset_name, dataset_digest = dataset or (None, None)
    stamp = int(time.time() * 1000)
    client.log_batch(
        run.info.run_id,
        metrics=[
            Metric(k, float(v), stamp, step, model_id, dataset_name, dataset_digest)
            if not model_metrics or k in model_metrics
            else Metric(k, float(v), stamp, step)
            for k, v, step in metrics
            if isinstance(v, int | float) and math.isfinite(v)
        ],
        params=[Param(k, str(v)) for k, v in params.items()],
        tags=[RunTag(k, v[:5000]) for k, v in tags.items()],
        synchronous=True,
    )
    client.set_terminated(run.info.run_id, status=status)
    if model_id:
        client.finalize_logged_model(model_id, "READY" if status == "FINISHED" else "FAILED")
        pipeline_run = stage.data.tags.get("mlflow.parentRunId")
        for output_of in filter(None, (run.info.run_id, stage_run_id, pipeline_run)):
            client.log_outputs(output_of, [LoggedModelOutput(model_id, 0)])
    return run.info.run_id


def link_registered_model(
    model_id: str, figures: dict[str, dict[str, float]], partitions: Manifest
) -> None:
    """The registered version's logged model on the pipeline's run page (among its logged
    models), and `figures` (split → metrics), logged in the active run, linked to it and to
    the split they were measured on: the Models tab shows them on the model."""
    import mlflow
    from mlflow.entities import LoggedModelOutput, Metric

    client = mlflow.MlflowClient()
    run = client.get_run(mlflow.active_run().info.run_id)
    if pipeline_run := run.data.tags.get("mlflow.parentRunId"):
        client.log_outputs(pipeline_run, [LoggedModelOutput(model_id, 0)])
    stamp = int(time.time() * 1000)
    identities = {split: split_identity(partitions, split) for split in figures}
    rows = [
        Metric(k, float(v), stamp, 0, model_id, *identities[split])
        for split, metrics in figures.items()
        for k, v in metrics.items()
        if math.isfinite(v)
    ]
    client.log_batch(run.info.run_id, metrics=rows, synchronous=True)


def log_child(stage_run_id: str, child: ChildRun, partitions: Manifest | None = None) -> str:
    """A stage's nested run (a tuning trial, a sweep or compress point) from its spec; a
    model's metrics are linked to the split of `partitions` it was measured on."""
    dataset = None
    if child.model_type and child.measured_on and partitions:
        dataset = split_identity(partitions, child.measured_on)
    return log_child_run(
        stage_run_id,
        child.name,
        child.params,
        child.metrics,
        child.tags,
        child.status,
        child.model_type,
        dataset,
        child.model_metrics,
    )


def flag_regression(parent_run_id: str, cfg: PipelineConfig) -> dict[str, Any]:
    """Compare this run with the previous finished one on the same test data; tag the run
    (`accelflow.regression`) and, when it got worse, emit the Prefect event
    `accelflow.run.regressed` that an automation can act on."""
    import mlflow

    from tasks import alerts

    client = mlflow.MlflowClient()
    result = alerts.check_regression(
        client, parent_run_id, cfg.alerts.max_accuracy_drop, cfg.alerts.max_slowdown
    )
    mlflow.set_tags(
        {
            alerts.TAG: str(result["regressed"]).lower(),
            f"{alerts.TAG}.why": result["why"][:5000],
            f"{alerts.TAG}.previous_run": str(result["previous"]),
        }
    )
    if result["regressed"]:
        emit(
            "accelflow.run.regressed",
            cfg,
            {
                "run_id": parent_run_id,
                "run_url": parent_link(parent_run_id),
                "previous_run_id": result["previous"],
                "why": result["why"],
                "accuracy_drop": result["accuracy_drop"],
                "slowdown": result["slowdown"],
            },
        )
    return result


def parent_link(parent_run_id: str) -> str:
    """The pipeline run's page in the MLflow UI (model-training view), for alert messages."""
    import mlflow

    run = mlflow.MlflowClient().get_run(parent_run_id).info
    return run_link(mlflow.get_tracking_uri(), run.experiment_id, parent_run_id)


def emit(event: str, cfg: PipelineConfig, payload: dict[str, Any]) -> None:
    """A Prefect event about this experiment, for an automation (conf/automations/) to act
    on. Never fails the run: the tags and the summary line say the same."""
    try:
        from prefect.events import emit_event

        emit_event(
            event=event,
            resource={
                "prefect.resource.id": f"accelflow.experiment.{cfg.tracking.experiment}",
                "prefect.resource.name": cfg.tracking.experiment,
            },
            payload=payload,
        )
    except Exception as exc:
        print(f"note: could not emit the Prefect event {event}: {exc}")


def flag_drift(parent_run_id: str, cfg: PipelineConfig, result: dict[str, Any] | None) -> str:
    """Tag the parent run with the drifted columns (`accelflow.drift`) and, when any column
    drifted beyond `monitor.max_psi`, emit the Prefect event `accelflow.data.drifted` (an
    automation in conf/automations/ can act on it); returns the summary line."""
    import mlflow

    from tasks.monitor import first_few

    if result is None:
        return "drift: not measured (no champion with a data contract yet)"
    drifted = result["drifted"]
    mlflow.set_tags(
        {"accelflow.drift": first_few(drifted), "accelflow.drift.champion": result["champion"]}
    )
    mlflow.log_metric("drift/max_psi", result["max_psi"])
    if not drifted:
        return (
            f"no drift against {result['champion']}'s training data "
            f"(largest PSI {result['max_psi']:.3f} ≤ {result['max_psi_allowed']})"
        )
    psi = {row["column"]: row["psi"] for row in result["drift"]}
    line = f"drift against {result['champion']}'s training data in " + first_few(
        [f"{c} (PSI {psi[c]:.2f})" for c in drifted]
    )
    emit(
        "accelflow.data.drifted",
        cfg,
        {
            "run_id": parent_run_id,
            "run_url": parent_link(parent_run_id),
            "champion": result["champion"],
            "columns": drifted,
            "psi": {c: psi[c] for c in drifted},
            "why": line,
        },
    )
    return line


def describe_run(
    parent_run_id: str,
    rows: list[dict[str, Any]],
    headline: dict[str, float],
    promotion: dict[str, Any],
    regression: dict[str, Any],
    drift: str = "",
) -> None:
    """The parent run's description (`mlflow.note.content`, markdown on the run page): the
    headline figures, the regression check, the registered model and the stage table."""
    import mlflow

    figures = " · ".join(f"**{k}** {v:.4g}" for k, v in headline.items())
    verdict = ("⚠ **regression**: " if regression["regressed"] else "no regression: ") + regression[
        "why"
    ]
    table = ["| stage | status | seconds | key figure | why it ran |", "|---|---|---|---|---|"]
    table += [
        f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['figure']} | {r['reason']} |"
        for r in rows
    ]
    note = "\n".join(
        [
            figures,
            "",
            verdict,
            "",
            *([("⚠ " if drift.startswith("drift against") else "") + drift, ""] if drift else []),
            f"Registered **{promotion['model_name']} v{promotion['version']}** as "
            f"`{promotion['alias']}` ({promotion['why']}).",
            "",
            *table,
        ]
    )
    mlflow.set_tag("mlflow.note.content", mask_text(note))


def publish_report(parent_run_id: str) -> str:
    """The run's HTML report (tasks/report.py) on the parent run, linked from Prefect."""
    import mlflow

    from tasks.report import build_report

    mlflow.log_text(build_report(mlflow.MlflowClient(), parent_run_id), "report.html")
    uri = mlflow.get_artifact_uri("report.html")
    try:
        from prefect.artifacts import create_link_artifact

        create_link_artifact(uri, link_text="accelflow run report", key="accelflow-report")
    except Exception as exc:  # a convenience: the report is in MLflow either way
        print(f"note: no Prefect link artifact for the report: {exc}")
    return uri
