"""The Prefect tasks: one thin wrapper per stage around the pure logic in `tasks/*.py`.

Each wrapper opens the stage's nested MLflow run, lets `run_stage` decide between a cache
hit and a build, and publishes the outcome. Prefect's own result caching is off
(`NO_CACHE`): stage folders keyed by content digests are the cache, so it also survives
across flow runs and processes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.schema import PipelineConfig, TrainConfig, config_digest, mask_text
from tasks import compress, evaluate, ingest, partition, readers, reduce, registry, train, tune
from tasks.cluster import dask_client
from tasks.errors import user_error_in
from tasks.progress import Progress, observe
from tasks.store import Manifest, StageOutcome, code_version, run_stage, stage_lock
from tasks.tracking import (
    epoch_logger,
    log_compress_point,
    log_dataset,
    log_source,
    log_sweep_point,
    log_trial,
    progress_artifact,
    publish,
    publish_markdown,
    publish_table,
    stage_run,
)

observe(progress_artifact)  # each stage's progress as a Prefect artifact in its task run


def not_a_user_error(task, task_run, state) -> bool:
    """Retry a Dask stage after a lost worker, never after bad input: that fails the same."""
    return user_error_in(state.data if isinstance(state.data, BaseException) else None) is None


RETRY_DASK = {"retries": 1, "retry_delay_seconds": 5, "retry_condition_fn": not_a_user_error}


def train_key(train_cfg: TrainConfig) -> dict:
    """The training settings that shape the model; how often a dead worker may restart
    does not, so changing it reuses what was trained."""
    return train_cfg.model_dump(mode="json", exclude={"max_restarts"})


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_data(cfg: PipelineConfig, parent: str) -> StageOutcome:
    """Read, validate and split the source data."""
    with stage_run(parent, "ingest", "data", cfg.data):
        # the source files' fingerprint is part of the key: data edited in place is re-read
        # block_mb only changes how the work is cut, never the output: not part of the key
        fingerprint = readers.source_fingerprint(cfg.data)
        key = {
            **cfg.data.model_dump(mode="json", exclude={"block_mb"}),
            "source_files": fingerprint,
        }
        log_source(cfg.data.source, fingerprint)
        outcome = run_stage(
            cfg.workdir,
            "ingest",
            code_version(ingest.__name__),
            key,
            [],
            lambda out: ingest.ingest_dataset(cfg.data, out, dask=cfg.dask),
        )
        publish("ingest", outcome)
    return outcome


@task(name="partition", cache_policy=NO_CACHE, **RETRY_DASK)
def partition_data(cfg: PipelineConfig, parent: str, ingested: Manifest) -> StageOutcome:
    """Write the splits as compressed Parquet partitions on a Dask cluster."""

    def build(out):
        with dask_client(cfg.dask) as client:
            return partition.partition_dataset(ingested, cfg.partition, out, client)

    with stage_run(parent, "partition", "partition", cfg.partition):
        outcome = run_stage(
            cfg.workdir,
            "partition",
            code_version(partition.__name__),
            cfg.partition.model_dump(mode="json"),
            [ingested],
            build,
        )
        for split in ("train", "val", "test"):
            log_dataset(outcome.manifest, split, context=split)
        publish_table(
            "partition", "codec-report", outcome.manifest["codec_report"], outcome.manifest["plots"]
        )
        publish("partition", outcome)
    return outcome


@task(name="reduce", cache_policy=NO_CACHE, **RETRY_DASK)
def reduce_features(cfg: PipelineConfig, parent: str, partitions: Manifest) -> StageOutcome:
    """Fit standardised PCA on the training split where it pays, and project every split."""
    # cnn needs pixels; rnn and transformer read an image's rows / patches when there is one
    image_model = cfg.train.model == "cnn" or (
        cfg.train.model in ("rnn", "transformer") and bool(partitions.get("image_shape"))
    )
    skip = reduce.passes_through(cfg.reduce, partitions, image_model)

    def build(out):
        if skip:
            return reduce.skip_reduction(partitions, skip)
        with dask_client(cfg.dask) as client:
            return reduce.fit_reduction(partitions, cfg.reduce, out, client)

    with stage_run(parent, "reduce", "reduce", cfg.reduce) as run_id:
        # auto passes images through for an image model: the model is part of the decision
        key = {**cfg.reduce.model_dump(mode="json"), "image_model": image_model}
        outcome = run_stage(
            cfg.workdir, "reduce", code_version(reduce.__name__), key, [partitions], build
        )
        sweep = outcome.manifest.get("sweep")
        if sweep:
            if not outcome.cached:  # a cached sweep's points are under the run that made them
                for point in sweep["points"]:
                    log_sweep_point(run_id, point)
            publish_table("reduce", "sweep", sweep["points"])
        if outcome.manifest["variance_table"]:
            publish_table(
                "reduce",
                "explained-variance",
                outcome.manifest["variance_table"],
                outcome.manifest["plots"],
            )
        publish("reduce", outcome)
    return outcome


@task(name="tune", cache_policy=NO_CACHE, **RETRY_DASK)
def tune_settings(cfg: PipelineConfig, parent: str, features: Manifest) -> StageOutcome:
    """Search train.* settings with Optuna, trials in parallel on the Dask cluster."""

    def build(out):
        if not cfg.tune.enabled:
            return tune.skip_tuning()
        progress = Progress("tune", "trials", cfg.tune.trials)

        def on_trial(trial, finished, budget):
            log_trial(run_id, trial, cfg.tune.metric)
            value = trial[cfg.tune.metric]
            shown = f"{cfg.tune.metric} {value:.4f}" if value is not None else trial["reason"]
            progress.step(finished, f"trial {trial['trial']} {trial['state']}, {shown}")

        with dask_client(cfg.dask) as client, progress:
            return tune.search(features, cfg.tune, cfg.train, out, client, on_trial)

    with stage_run(parent, "tune", "tune", cfg.tune) as run_id:
        key: dict = {"enabled": False}
        if cfg.tune.enabled:  # trials start from train.* (their length is tune.epochs)
            key = {
                **cfg.tune.model_dump(mode="json"),
                "storage": mask_text(cfg.tune.storage or ""),
                "train": cfg.train.model_dump(mode="json", exclude={"max_restarts", "epochs"}),
            }
        outcome = run_stage(
            cfg.workdir, "tune", code_version(tune.__name__), key, [features], build, resumable=True
        )
        if outcome.manifest["leaderboard"]:
            publish_table(
                "tune", "leaderboard", outcome.manifest["leaderboard"], outcome.manifest["plots"]
            )
        publish("tune", outcome)
    return outcome


def tuned_train(cfg: PipelineConfig, tuned: Manifest) -> TrainConfig:
    return tune.tuned_train_config(cfg.train, tuned)


@task(name="train", cache_policy=NO_CACHE)
def train_network(
    cfg: PipelineConfig, parent: str, features: Manifest, tuned: Manifest
) -> StageOutcome:
    """Train the configured model (with the search's best settings) with DDP workers;
    resumes from its last checkpoint."""
    train_cfg = tuned_train(cfg, tuned)
    with stage_run(parent, "train", "train", train_cfg) as run_id:
        import mlflow

        # which values came from the search, not from the config
        mlflow.set_tags({f"accelflow.tuned.{k}": "search" for k in tuned["best_params"]})
        outcome = run_stage(
            cfg.workdir,
            "train",
            code_version(train.__name__),
            train_key(train_cfg),
            [features, tuned],
            lambda out: train.train_model(features, train_cfg, out, epoch_logger(run_id)),
            resumable=True,
        )
        for plot in outcome.manifest.get("plots", []):
            mlflow.log_artifact(plot, "train")
        publish("train", outcome)
    return outcome


@task(name="compress", cache_policy=NO_CACHE, **RETRY_DASK)
def compress_network(
    cfg: PipelineConfig,
    parent: str,
    partitions: Manifest,
    features: Manifest,
    tuned: Manifest,
    trained: Manifest,
) -> StageOutcome:
    """Compress the trained model by the recipe (or sweep), fine-tuned, measured, chosen."""
    train_cfg = tuned_train(cfg, tuned)

    def build(out):
        # a sweep fine-tunes its points on the cluster; one recipe needs none
        cluster = dask_client(cfg.dask) if cfg.compress.sweep else contextlib.nullcontext()
        with cluster as client:
            return compress.compress_model(
                partitions,
                features,
                trained,
                cfg.compress,
                train_cfg,
                cfg.evaluate,
                out,
                epoch_logger(run_id),
                client,
            )

    with stage_run(parent, "compress", "compress", cfg.compress) as run_id:
        # the fine-tune uses train's optimizer settings and the choice evaluate's rule
        key = {
            **cfg.compress.model_dump(mode="json"),
            "train": train_key(train_cfg),
            "choice": cfg.evaluate.model_dump(
                mode="json", include={"max_accuracy_drop", "objective", "latency_repeats"}
            ),
        }
        outcome = run_stage(
            cfg.workdir,
            "compress",
            code_version(compress.__name__),
            key,
            [partitions, features, trained],
            build,
            resumable=True,
        )
        table = outcome.manifest["table"]
        if table:
            if not outcome.cached:  # a cached sweep's points are under the run that made them
                for row in table:
                    log_compress_point(run_id, row)
            publish_markdown("compress", "pareto", Path(outcome.manifest["report"]).read_text())
            publish_table("compress", "points", table, outcome.manifest["plots"])
        publish("compress", outcome)
    return outcome


def card_facts(cfg, partitions, features, trained, compressed) -> dict[str, str]:
    """What the model card says about the data, features, model and compression."""
    rows = {s: partitions["splits"][s]["rows"] for s in ("train", "val", "test")}
    arch = trained["arch"]
    return {
        "data": f"{mask_text(cfg.data.source)}: {rows['train']:,} train / {rows['val']:,} val / "
        f"{rows['test']:,} test rows, {len(partitions['classes'])} classes",
        "features": features["summary"],
        "model": f"{arch['model']} {arch['hidden']}, trained {trained['summary'].split(':')[0]}",
        "compression": compressed.get("summary", "none"),
        "config digest": cfg.digest(),
    }


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_and_register(
    cfg: PipelineConfig,
    parent: str,
    partitions: Manifest,
    features: Manifest,
    trained: Manifest,
    compressed: Manifest,
) -> StageOutcome:
    """Score the baseline and the compressed model on the test split, pick one, register it
    and gate it against the champion."""
    import mlflow

    with stage_run(parent, "evaluate", "evaluate", cfg.evaluate):
        outcome = run_stage(
            cfg.workdir,
            "evaluate",
            code_version(evaluate.__name__),
            cfg.evaluate.model_dump(mode="json"),
            [partitions, features, trained, compressed],
            lambda out: evaluate.evaluate_model(
                partitions, features, trained, compressed, cfg.evaluate, out
            ),
        )
        log_dataset(partitions, "test", context="evaluation")
        for plot in outcome.manifest["plots"]:
            mlflow.log_artifact(plot, "evaluate")
        # one registration at a time per workdir: two runs of one model register one version
        with stage_lock(
            Path(cfg.workdir).resolve() / "registry", config_digest(cfg.registry.model_name)
        ):
            promotion = registry.register_and_promote(
                outcome.manifest,
                evaluate.input_example(partitions),
                cfg.registry,
                cfg.evaluate,
                card_facts(cfg, partitions, features, trained, compressed),
            )
        gate = promotion.pop("markdown")
        mlflow.set_tags({f"accelflow.registry.{k}": str(v) for k, v in promotion.items()})
        publish_markdown("evaluate", "gate", gate)
        outcome.manifest["promotion"] = promotion
        publish("evaluate", outcome)
    return outcome
