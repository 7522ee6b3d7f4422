"""The accelflow DAG: ingest → partition → reduce → tune → train → compress → evaluate + register.

Wiring only; each stage's logic lives in `tasks/`. The flow takes the validated config as
its one parameter, so the CLI, a deployment and a test all run the same code path:

    accelflow run --set train.epochs=3                    # CLI, embedded defaults
    python -m flows.pipeline                              # the same, default config
    prefect deployment run 'accelflow/adhoc' --watch      # via a deployment (prefect.yaml)
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed

from conf.schema import PipelineConfig, load_config
from tasks import cluster, steps, tracking
from tasks.errors import UserError
from tasks.stages import STAGES
from tasks.steps import SPECS
from tasks.store import StageOutcome, check_workdir


def resolve_config(
    config: PipelineConfig | dict | None,
    config_path: str | None,
    profile: str | None,
    overrides: list[str] | None,
) -> PipelineConfig:
    """A validated config given directly (CLI, tests) or by path + profile + overrides (deployments)."""
    if config is not None:
        return (
            config if isinstance(config, PipelineConfig) else PipelineConfig.model_validate(config)
        )
    return load_config(config_path, overrides, profile)


def run_name() -> str:
    p = flow_run.parameters
    try:
        digest = resolve_config(
            p.get("config"), p.get("config_path"), p.get("profile"), p.get("overrides")
        ).digest()
    except Exception:  # a bad config fails the run itself with a clear message; name it plainly
        digest = "invalid-config"
    return f"accelflow-{digest[:8]}"


@flow(name="accelflow", flow_run_name=run_name, log_prints=True)
def pipeline(
    config: PipelineConfig | None = None,
    config_path: str | None = None,
    profile: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run every stage; return the parent MLflow run id and a row per stage.

    Pass a validated `config`, or (as deployments do) a `config_path` relative to the
    working directory, an optional `profile` from conf/profiles and `overrides` such as
    ["train.epochs=3"].
    """
    tracking.user_errors_without_traceback()
    try:
        return run_stages(resolve_config(config, config_path, profile, overrides))
    except UserError as exc:
        # The run fails with the user's paragraph as its state message (what a deployment's
        # UI and `prefect deployment run --watch` show); calling the flow re-raises `exc`.
        return Failed(message=f"accelflow: error: {exc}", data=exc)


def run_stages(config: PipelineConfig) -> dict[str, Any]:
    """The DAG itself, inside the flow run."""
    logger = get_run_logger()
    logger.info("config %s", config.digest())
    check_workdir(config.workdir)
    tracking.check_tracking(config.tracking.uri)
    experiment_id = tracking.configure(config)
    with cluster.one_cluster_per_run(), tracking.pipeline_run(config, experiment_id) as parent:
        outcomes: dict[str, StageOutcome] = {}
        for spec in STAGES:  # in DAG order: every stage's inputs have run before it
            inputs = {name: outcomes[name].manifest for name in spec.inputs}
            outcomes[spec.name] = steps.TASKS[spec.name](spec.name, config, parent, inputs)
            if spec.name == "ingest" and config.train.model == "auto":  # now the data is known
                config = config.with_model_for(outcomes["ingest"].manifest.get("image_shape"))
                tracking.name_model(parent, config.train.model)
        headline = {
            metric: outcomes[spec.name].manifest["metrics"][metric]
            for spec in STAGES
            for metric in spec.headline
            if metric in outcomes[spec.name].manifest["metrics"]  # tune's only when it searched
        }
        evaluated = outcomes["evaluate"]
        import mlflow

        promotion = evaluated.manifest["promotion"]
        if promotion.get("champion_accuracy") is not None:  # the champion on today's rows
            headline["gate/champion_accuracy"] = promotion["champion_accuracy"]
        mlflow.log_metrics(headline)
        tracking.log_pipeline_inputs(outcomes["ingest"].manifest, outcomes["partition"].manifest)
        mlflow.set_tags(
            {
                "accelflow.registered_version": promotion["version"],
                "accelflow.alias": promotion["alias"],
                "accelflow.data_digest": evaluated.manifest["test_digest"],
                # the registered network is the trained one, as torch runs it (the report
                # says so rather than "1.00× faster than the trained model")
                "accelflow.kept_trained": str(
                    evaluated.manifest["metrics"].get("evaluate/chosen_compressed") == 0.0
                ).lower(),
            }
        )
        rows = stage_rows(outcomes)
        for row in rows:
            logger.info("%s: %s (%s)", row["stage"], row["status"], row["reason"])
        regression = tracking.flag_regression(parent, config)
        if regression["regressed"]:
            logger.warning("REGRESSION: %s", regression["why"])
        monitored = outcomes["ingest"].manifest.get("monitor")
        drift = tracking.flag_drift(parent, config, monitored)
        if monitored and monitored["drifted"]:
            logger.warning("DRIFT: %s", drift)
        for finding in (monitored or {}).get("findings", []):  # errors stopped the run already
            logger.warning("data contract (%s): %s", finding["kind"], finding["line"])
        tracking.describe_run(parent, rows, headline, promotion, regression, drift)
        report = tracking.publish_report(parent)
    return {
        "parent_run_id": parent,
        "experiment_id": experiment_id,
        "stages": rows,
        "headline": headline,
        "promotion": promotion,
        "regression": regression,
        "monitor": monitored,
        "drift": drift,
        "report": report,
    }


def stage_rows(outcomes: dict[str, StageOutcome]) -> list[dict[str, Any]]:
    return [
        {
            "stage": stage,
            "status": "cached" if outcome.cached else "ran",
            "seconds": round(outcome.seconds, 1),
            "figure": SPECS[stage].figure(outcome.manifest),
            "reason": outcome.reason,
        }
        for stage, outcome in outcomes.items()
    ]


if __name__ == "__main__":
    tracking.quiet_environment()
    print(pipeline(load_config()))
