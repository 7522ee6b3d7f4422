"""Batch scoring as a Prefect flow: new rows through a registered model, out of core on Dask.

    accelflow score --source new.csv --out predictions.parquet [--model champion|3]
    prefect deployment run 'accelflow/score' --param source=/data/new.csv \
        --param out=/data/predictions.parquet --watch

The same config as `accelflow run` (tracking store, model name, Dask cluster, bad-row
policy). Logged as an MLflow run `score` in the pipeline's experiment: input digest, model
version, rows, seconds, drift against the model's training data.
"""

from __future__ import annotations

import tempfile
from typing import Any

from prefect import flow, get_run_logger

from conf.schema import PipelineConfig, config_digest
from flows.pipeline import resolve_config
from tasks import cluster, registry, scoring, tracking
from tasks.errors import UserError
from tasks.readers import source_fingerprint


def score_run_name() -> str:
    from prefect.runtime import flow_run

    return f"score-{flow_run.parameters.get('model', 'champion')}"


# Named like the pipeline so the deployment reads `accelflow/score` beside `accelflow/nightly`
@flow(name="accelflow", flow_run_name=score_run_name, log_prints=True)
def score(
    source: str,
    out: str,
    model: str = "champion",
    id_column: str | None = None,
    config: PipelineConfig | None = None,
    config_path: str | None = None,
    profile: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Score `source` (CSV or Parquet) with registered `model` (alias or version) into the
    Parquet file `out`: the row number (or `id_column`), the predicted class, one
    probability per class, in the source's row order."""
    from prefect.states import Failed

    tracking.user_errors_without_traceback()
    try:
        cfg = resolve_config(config, config_path, profile, overrides)
        return score_source(cfg, source, out, model, id_column)
    except UserError as exc:
        return Failed(message=f"accelflow: error: {exc}", data=exc)


def score_source(
    cfg: PipelineConfig, source: str, out: str, model: str, id_column: str | None
) -> dict[str, Any]:
    import mlflow

    logger = get_run_logger()
    tracking.check_tracking(cfg.tracking.uri)
    tracking.configure(cfg)
    data = cfg.data.model_copy(update={"source": source})
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_name="score") as run:
        fetched = registry.fetch_model(cfg.registry, model, tmp)
        logger.info("scoring %s with %s", source, fetched["name"])
        mlflow.set_tags({"accelflow.stage": "score", "accelflow.model": fetched["name"]})
        mlflow.log_params(
            {
                "score.source": source,
                "score.out": out,
                "score.model": model,
                "score.version": fetched["version"],
            }
        )
        mlflow.set_tag("accelflow.input_digest", config_digest(source_fingerprint(data)))
        with cluster.dask_client(cfg.dask) as client:
            result = scoring.score_source(
                data,
                fetched["bundle"],
                fetched["contract"],
                out,
                client,
                id_column,
                cfg.monitor.max_psi,
            )
        mlflow.log_metrics(
            {
                "score/rows": result["rows"],
                "score/bad_rows": result["bad_rows"],
                "score/seconds": result["seconds"],
                "score/rows_per_second": result["rows"] / max(result["seconds"], 1e-9),
            }
        )
        drift = result["drift"]
        if drift:
            mlflow.log_metric("drift/max_psi", drift["max_psi"])
            mlflow.set_tag("accelflow.drift", ",".join(drift["drifted"]))
            mlflow.log_dict(drift, "score/drift.json")
        result |= {"model": fetched["name"], "run_id": run.info.run_id}
    logger.info(
        "%s rows scored into %s (%s bad row(s)) in %.1f s",
        result["rows"],
        out,
        result["bad_rows"],
        result["seconds"],
    )
    return result
