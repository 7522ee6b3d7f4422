"""The whole flow on a Fashion-MNIST subset: Prefect's test harness, a real Dask
LocalCluster, 2 gloo DDP processes and a temporary MLflow sqlite store."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import make_config, raw_test_rows, stage_runs
from mlflow import MlflowClient

from conf.schema import config_digest
from flows.pipeline import pipeline
from tasks.readers import read_idx, source_fingerprint
from tasks.stages import NAMES as STAGES
from tasks.store import files_digest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(prefect_harness, fmnist_small, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    # 3 epochs on 3,000 images: the 50% prune's one fine-tune epoch may not win back the
    # last point, and this test is about what a compressed model logs. Zeros make no dense
    # call faster (compress keeps a model no faster than the baseline), but a smaller file
    cfg = make_config(
        tmp,
        fmnist_small,
        "evaluate.max_accuracy_drop=0.05",
        "evaluate.objective=size",
        "serve.runtime=onnxruntime",  # served from ONNX, the PCA folded into the graph
        "evaluate.tsne_rows=500",
    )
    return cfg, pipeline(cfg)


def test_parent_run_and_seven_stage_runs_with_their_metrics(first_run):
    cfg, result = first_run
    client = MlflowClient(cfg.tracking.uri)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    assert tags["accelflow.config_digest"] == cfg.digest()
    # a name a person can read in the runs table: the data, the model family, the config
    assert parent.info.run_name == f"{Path(cfg.data.source).name} · mlp · {cfg.digest()[:8]}"
    assert tags["accelflow.stage"] == "pipeline" and tags["accelflow.model"] == "mlp"
    # its Datasets: what it read and the splits it made, each with its context
    inputs = {
        (d.dataset.name, {t.key: t.value for t in d.tags}.get("mlflow.data.context"))
        for d in parent.inputs.dataset_inputs
    }
    splits = {(f"partition-{s}", s) for s in ("train", "val", "test")}
    assert {("source", "source"), *splits} <= inputs, inputs
    from prefect import get_client

    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(tags["accelflow.flow_run_id"])
        assert flow_run.state.is_completed()
        assert flow_run.name == f"accelflow-{cfg.digest()[:8]}"
    assert parent.data.params["train.optimizer"] == "adamw"
    for key in ("test/accuracy", "baseline/accuracy", "prune/sparsity", "data/compression_ratio"):
        assert key in parent.data.metrics, key
    assert parent.data.metrics["test/accuracy"] > 0.7  # 3000 training images, 3 epochs
    assert parent.data.metrics["prune/sparsity"] == pytest.approx(0.5, abs=0.01)

    runs = stage_runs(client, parent.info.run_id)
    assert sorted(runs) == sorted(STAGES)
    for stage, run in runs.items():
        assert run.info.experiment_id == parent.info.experiment_id
        assert f"{stage}/seconds" in run.data.metrics
        assert run.data.tags["accelflow.cached"] == "false"
    assert runs["partition"].data.metrics["data/compression_ratio"] > 0
    assert runs["reduce"].data.metrics["reduce/explained_variance"] >= 0.95
    assert runs["train"].data.params["train.epochs"] == "3"
    train = runs["train"].data.metrics  # the workers' own training time, not the wrapper's wall
    assert 0 < train["train/seconds"] < train["train/wall_seconds"]
    assert 0 <= train["train/data_wait_pct"] <= 100 and train["train/step_ms"] > 0
    history = client.get_metric_history(runs["train"].info.run_id, "val/accuracy")
    assert [m.step for m in history] == [0, 1, 2]  # logged live by rank 0, once per epoch
    artifacts = {a.path for a in client.list_artifacts(runs["evaluate"].info.run_id, "evaluate")}
    assert {
        "evaluate/confusion_baseline.png",
        "evaluate/summary.md",
        "evaluate/tsne.png",
    } <= artifacts
    evaluated = runs["evaluate"].data.metrics
    assert 0 < evaluated["test/log_loss"] < 2.3  # better than a uniform guess over 10 classes
    summary = Path(
        client.download_artifacts(runs["evaluate"].info.run_id, "evaluate/summary.md")
    ).read_text()
    header = "| class | support | baseline precision | baseline recall |"
    table = summary[summary.index(header) :].split("\n\n")[0].splitlines()[2:]
    per_class = [line for line in table if re.match(r"\| \S+ \| \d+ \|", line)]
    assert len(per_class) == 10 and sum(int(line.split("|")[2]) for line in per_class) == 1000
    tsne = Path(client.download_artifacts(runs["evaluate"].info.run_id, "evaluate/tsne.png"))
    import matplotlib.image

    assert tsne.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(tsne)
    assert pixels.shape[0] > 300 and pixels[..., :3].std() > 0.05  # a picture, not a blank
    inputs = runs["partition"].inputs.dataset_inputs
    assert {d.dataset.name for d in inputs} == {
        "partition-train",
        "partition-val",
        "partition-test",
    }
    manifest = json.loads(
        Path(
            client.download_artifacts(runs["partition"].info.run_id, "partition/manifest.json")
        ).read_text()
    )
    for d in inputs:  # the digest covers every file of the split
        files = manifest["splits"][d.dataset.name.removeprefix("partition-")]["files"]
        assert d.dataset.digest == files_digest(files)
    (source,) = runs["ingest"].inputs.dataset_inputs
    assert source.dataset.name == "source" and str(cfg.data.source) in source.dataset.source
    assert source.dataset.digest == config_digest(source_fingerprint(cfg.data))


def test_champion_scores_raw_test_pixels_with_the_logged_accuracy(first_run, fmnist_small):
    cfg, result = first_run
    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@champion")
    pixels = read_idx(fmnist_small / "t10k-images-idx3-ubyte.gz").reshape(1000, -1)
    labels = read_idx(fmnist_small / "t10k-labels-idx1-ubyte.gz")
    frame = pd.DataFrame(pixels, columns=[f"pixel_{i}" for i in range(784)])
    predictions = np.asarray(model.predict(frame))
    logged = (
        MlflowClient(cfg.tracking.uri)
        .get_run(result["parent_run_id"])
        .data.metrics["test/accuracy"]
    )
    assert float((predictions == labels).mean()) == pytest.approx(logged, abs=1e-9)
    assert result["promotion"]["alias"] == "champion"
    # onnxruntime runs the network with the reduction folded in: the ONNX file alone takes
    # the 784 pixels to logits, as the pyfunc does
    predictor = model.unwrap_python_model().predictor
    assert predictor.runtime == "onnxruntime" and predictor.reduction_in_graph
    from tasks.served.runtime import OnnxNetwork

    alone = OnnxNetwork(predictor.bundle / "model.onnx")(pixels.astype(np.float32))
    assert (predictor.class_array[alone.argmax(1)] == predictions).all()
    # the signature leaves the input out (MLflow's per-column check cost 46 ms a call at 784
    # columns); the model checks its own input, takes arrays too, and says what is wrong
    assert model.metadata.get_input_schema() is None
    assert (np.asarray(model.predict(pixels[:50].astype(np.float32))) == predictions[:50]).all()
    with pytest.raises(ValueError, match=r"missing feature column\(s\) \['pixel_5'\]"):
        model.predict(frame.drop(columns=["pixel_5"]))
    with pytest.raises(ValueError, match=r"\['pixel_7'\] hold values that are not numbers"):
        model.predict(frame.head(3).astype({"pixel_7": object}).assign(pixel_7="dark"))
    headline = result["headline"]
    assert headline["test/latency_b256_ms"] > 0 and headline["test/served_latency_b256_ms"] > 0
    assert headline["test/size_zstd_bytes"] > 0
    # the version's model card: what it is, what it was tested on, why it holds its alias
    card = (
        MlflowClient(cfg.tracking.uri)
        .get_model_version(cfg.registry.model_name, str(result["promotion"]["version"]))
        .description
    )
    assert card.startswith(f"### {cfg.registry.model_name} v1: `champion`")
    assert "**gate**: no champion yet" in card
    assert f"accuracy {logged:.4f}" in card and "**data**" in card and "**features**" in card
    # and a link to the run that logged it, opening MLflow's model-training view
    version = MlflowClient(cfg.tracking.uri).get_model_version(cfg.registry.model_name, "1")
    assert f"/runs/{version.run_id}?workflowType=machine_learning" in card


def test_validation_chooses_and_the_test_split_only_reports(first_run):
    """Evaluate keeps what compress chose on validation, whatever the test split says."""
    rows = {row["stage"]: row for row in first_run[1]["stages"]}
    picked_on_validation = rows["compress"]["figure"].split(":")[0]
    # serve.runtime onnxruntime (first_run): the point compress picked, run there
    assert rows["evaluate"]["figure"].endswith(f"({picked_on_validation} by onnxruntime)"), rows


def test_rerun_is_all_cache_hits_and_reuses_the_registered_version(first_run):
    cfg, result = first_run
    again = pipeline(cfg)
    assert [row["status"] for row in again["stages"]] == ["cached"] * 7
    client = MlflowClient(cfg.tracking.uri)
    first_name = client.get_run(result["parent_run_id"]).info.run_name
    assert client.get_run(again["parent_run_id"]).info.run_name == f"{first_name} #2"  # unique
    assert again["promotion"]["version"] == result["promotion"]["version"]
    runs = stage_runs(MlflowClient(cfg.tracking.uri), again["parent_run_id"])
    assert all(run.data.tags["accelflow.cached"] == "true" for run in runs.values())
    assert (
        "test/accuracy" in runs["evaluate"].data.metrics
    )  # a cached stage still reports its figures


def test_changed_config_or_code_reruns_that_stage_and_after(first_run, tmp_path, monkeypatch):
    """No hand-kept lists: a stage's key holds its own config section and its code version,
    which digests its import closure, read from the source. One rerun with two changes: the
    learning rate (train's config: train and after rerun, and only train's reason names it),
    and one byte more in tasks/training/optim.py, reached only through the DDP worker, which
    the trainer starts by name (`-m tasks.training.worker`): every stage that trains (reduce's
    sweep and tune's trials train too) and after reruns, ingest and partition stay cached.
    The edit goes to a copy of the source tree (tests run in parallel and read the real
    files). The new model is a new version, judged against the champion."""
    import shutil

    import tasks.store

    cfg, first = first_run
    copy = tmp_path / "src"
    for package in tasks.store.project_packages(tasks.store.PROJECT_ROOT):
        shutil.copytree(tasks.store.PROJECT_ROOT / package, copy / package)
    with (copy / "tasks/training/optim.py").open("a") as fh:
        fh.write("# one more line of the optimizer's code\n")
    changed = cfg.model_copy(
        update={
            "train": cfg.train.model_copy(update={"lr": 0.002}),
            # compress and evaluate rerun anyway: without the first run's ONNX and t-SNE
            "serve": cfg.serve.model_copy(update={"runtime": "torch"}),
            "evaluate": cfg.evaluate.model_copy(update={"tsne_rows": 0}),
        }
    )
    with monkeypatch.context() as patch:
        patch.setattr(tasks.store, "PROJECT_ROOT", copy)
        result = pipeline(changed)
    status = {row["stage"]: row for row in result["stages"]}
    assert [status[s]["status"] for s in STAGES] == ["cached"] * 2 + ["ran"] * 5
    assert "stage code changed" in status["reduce"]["reason"]
    for stage in ("reduce", "tune"):  # lr is in neither's key: their code alone changed
        assert "config changed" not in status[stage]["reason"], status[stage]
    assert "stage code changed" in status["train"]["reason"]
    assert "config changed: lr" in status["train"]["reason"]
    assert "input changed" in status["evaluate"]["reason"]
    # the gate (its branches: test_gate.py): a new version, judged against the champion
    promotion = result["promotion"]
    assert promotion["version"] == first["promotion"]["version"] + 1
    assert promotion["why"].startswith(f"against champion v{first['promotion']['version']}")
    champion_accuracy = first["headline"]["test/accuracy"]
    if result["headline"]["test/accuracy"] < champion_accuracy - cfg.evaluate.max_accuracy_drop:
        assert promotion["alias"] == "challenger", promotion
    restored = pipeline(cfg)["stages"]
    assert [row["status"] for row in restored] == ["cached"] * 7


def test_each_stage_publishes_a_prefect_artifact(first_run):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        keys = {f"accelflow-{stage}" for stage in STAGES}
        found = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=sorted(keys)))
        )
    assert {a.key for a in found} == keys
    evaluate = next(a for a in found if a.key == "accelflow-evaluate")
    assert "| accuracy |" in evaluate.data and "Chosen:" in evaluate.data


def test_float16_storage_reports_its_accuracy_impact(prefect_harness, tmp_path):
    """Lossy storage on real float features (scikit-learn's breast-cancer table): evaluate
    scores the chosen model on stored and on full-precision features and logs the gap."""
    from sklearn.datasets import load_breast_cancer

    load_breast_cancer(as_frame=True).frame.to_csv(tmp_path / "cancer.csv", index=False)
    cfg = make_config(
        tmp_path,
        tmp_path / "cancer.csv",
        "data.label=target",
        "partition.storage_dtype=float16",
        "train.batch_size=32",
        "train.epochs=5",
        "reduce.variance_target=0.99",
        "compress.recipe=[]",  # what storage costs, measured on the trained model
    )
    result = pipeline(cfg)
    runs = stage_runs(MlflowClient(cfg.tracking.uri), result["parent_run_id"])
    metrics = runs["evaluate"].data.metrics
    assert metrics["test/accuracy"] > 0.85  # scored on the full-precision rows a user sends
    assert metrics["evaluate/storage_accuracy_delta"] == pytest.approx(
        metrics["evaluate/stored_features_accuracy"] - metrics["test/accuracy"]
    )
    assert abs(metrics["evaluate/storage_accuracy_delta"]) <= 0.03  # float16 costs little here
    # the logged figure is the registered model's own, on the raw held-out rows
    raw_X, raw_y = raw_test_rows(tmp_path / "cancer.csv", cfg)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@champion")
    served = float((np.asarray(model.predict(raw_X)) == raw_y).mean())
    assert served == pytest.approx(metrics["test/accuracy"], abs=1e-9)
    # the rows the gate re-scores a champion on are those rows: ingest kept them, raw
    from tasks.evaluate import raw_test_batches
    from tasks.registry import rescore

    (stored,) = (Path(cfg.workdir) / "partition").glob("*/manifest.json")
    partitions = json.loads(stored.read_text())
    batches = list(raw_test_batches(partitions))
    assert sum(len(frame) for frame, _ in batches) == len(raw_y)
    again = rescore(cfg.registry.model_name, "1", lambda: iter(batches), partitions["classes"])
    assert again == pytest.approx(metrics["test/accuracy"], abs=1e-9)


@pytest.mark.parametrize("failing", STAGES[1:])
def test_a_user_error_in_any_stage_fails_the_run_with_its_paragraph_only(
    first_run, failing, monkeypatch, capfd, caplog
):
    """Whatever stage meets bad input, the run fails with the user's one paragraph as its
    state message, and no traceback reaches the terminal."""
    import tasks.steps
    from tasks.errors import StageInputError

    cfg, _ = first_run
    real = tasks.steps.run_stage

    def run_stage(workdir, stage, *args, **kwargs):
        if stage == failing:
            raise StageInputError(f"{stage}: its input was edited by hand; delete it and run again")
        return real(workdir, stage, *args, **kwargs)

    monkeypatch.setattr(tasks.steps, "run_stage", run_stage)
    capfd.readouterr()
    state = pipeline(cfg, return_state=True)
    assert state.is_failed()
    assert state.message == (
        f"accelflow: error: {failing}: its input was edited by hand; delete it and run again"
    )
    with pytest.raises(StageInputError, match=f"^{failing}: its input"):
        state.result()
    out, err = capfd.readouterr()
    logged = out + err + caplog.text
    assert "Traceback" not in logged
    assert f"accelflow: error: {failing}: its input was edited" in logged


def test_the_tsne_map_draws_a_test_split_smaller_than_its_pca(tmp_path):
    """Wine's test split is about 20 rows: fewer than the 50 PCA dimensions t-SNE starts
    from (found by running the default config on it)."""
    import json

    import matplotlib.image
    import torch
    from sklearn.datasets import load_wine

    from tasks.evaluate import plot_tsne
    from tasks.served.predictor import Predictor
    from tasks.training.models import build_model

    X, y = load_wine(return_X_y=True)
    arch = {"model": "mlp", "n_features": 13, "n_classes": 3, "hidden": [128], "dropout": 0.0}
    (tmp_path / "meta.json").write_text(
        json.dumps({"feature_names": [f"f{i}" for i in range(13)], "classes": [0, 1, 2]})
    )
    (tmp_path / "model.json").write_text(json.dumps(arch))
    torch.save(build_model(arch).state_dict(), tmp_path / "model.pt")
    plot_tsne(Predictor(tmp_path), X[:21], y[:21], tmp_path / "tsne.png")
    assert matplotlib.image.imread(tmp_path / "tsne.png").std() > 0.01
