"""Integration: real servers and workers, started and stopped by the tests themselves.

- `make serve`'s stack on PostgreSQL (Prefect server + worker with the deployments of
  prefect.yaml, MLflow tracking server), a run triggered by the CLI
  `prefect deployment run ... --watch`;
- the MLflow UI rendered in headless Chromium (DOM dump + screenshot in tests/artifacts/);
- docker/compose.yaml validated by docker-compose;
- the cluster profile against those servers, a separate Dask scheduler + 2 workers and
  Optuna on PostgreSQL, with a worse model: the regression alert automation of
  conf/automations/ posts to a local HTTP receiver once, for that run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import stage_runs, write_idx
from mlflow import MlflowClient

from flows import serve
from tasks.cluster import HUGE_PAGES
from tasks.readers import read_idx
from tasks.stages import NAMES

pytestmark = pytest.mark.integration
ARTIFACTS = Path(__file__).parent / "artifacts"
STAGES = set(NAMES)
POSTGRES = os.environ.get(
    "ACCELFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
SMALL = [
    "data.max_rows=1500",
    "train.epochs=3",
    "train.min_steps=0",
    "train.batch_size=64",
    "train.hidden=[128]",
    "compress.recipe=[]",  # compression has its own tests (the deployed run measures one point)
    "evaluate.latency_repeats=3",
    "tune.enabled=false",  # the cluster profile's test runs the search, on PostgreSQL
    "train.model=auto",  # decided after ingest: the CNN for these images
    "evaluate.tsne_rows=300",  # the report's map, on fewer rows than the default 2,000
]
# evaluate's gradient-boosting reference and t-SNE map: only the deployed run's report shows them
EXTRAS_OFF = ["evaluate.reference=none", "evaluate.tsne_rows=0"]


def parent_and_stages(client: MlflowClient, flow_run_id: str):
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiments, f"tags.`accelflow.flow_run_id` = '{flow_run_id}'")
    assert len(parents) == 1, (
        f"expected one parent run for flow run {flow_run_id}, found {len(parents)}"
    )
    return parents[0], stage_runs(client, parents[0].info.run_id)


# ---------------------------------------------------------------- Prefect deployment + MLflow UI


@pytest.fixture(scope="module")
def webhook_receiver():
    """A local HTTP endpoint that keeps the JSON bodies POSTed to it."""
    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/accelflow-alerts", received
    httpd.shutdown()


@pytest.fixture(scope="module")
def postgres_databases():
    """Fresh databases (Prefect, MLflow, Optuna) on the machine's PostgreSQL, dropped
    afterwards; None where there is no PostgreSQL (the stack then runs on sqlite and the
    cluster profile's test skips)."""
    psycopg2 = pytest.importorskip("psycopg2")  # a dev dependency: missing, setup is broken
    try:
        admin = psycopg2.connect(POSTGRES, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        print(f"no PostgreSQL at {POSTGRES} ({exc}); set ACCELFLOW_TEST_POSTGRES")
        yield None
        return
    admin.autocommit = True
    names = [
        f"accelflow_test_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("prefect", "mlflow", "optuna")
    ]
    with admin.cursor() as cur:
        for name in names:
            cur.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES.rsplit("/", 1)[0]
    try:
        yield {
            "prefect": f"{base.replace('postgresql://', 'postgresql+asyncpg://')}/{names[0]}",
            "mlflow": f"{base.replace('postgresql://', 'postgresql+psycopg2://')}/{names[1]}",
            "optuna": f"{base.replace('postgresql://', 'postgresql+psycopg2://')}/{names[2]}",
        }
    finally:
        with admin.cursor() as cur:
            for name in names:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, fmnist_small, webhook_receiver, postgres_databases):
    """What `make serve ALERT_WEBHOOK=...` starts (same entry point, free ports), with both
    servers on PostgreSQL as the scaled-out profile has them: Prefect server, MLflow
    server, deployments from prefect.yaml, the regression alert, a worker on the CPU pool;
    `make stop`'s code stops it."""
    state = tmp_path_factory.mktemp("serve")
    prefect_port, mlflow_port = serve.free_port(), serve.free_port()
    args = [
        "--state-dir",
        str(state),
        "--prefect-port",
        str(prefect_port),
        "--mlflow-port",
        str(mlflow_port),
    ]
    url, alerts = webhook_receiver
    databases = []
    if postgres_databases:
        databases = [
            "--prefect-database",
            postgres_databases["prefect"],
            "--mlflow-backend",
            postgres_databases["mlflow"],
        ]
    # the worker asks for scheduled runs every second instead of Prefect's 10 s: the
    # deployed run is picked up at once instead of idling 5 s on average (the test's only)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PREFECT_WORKER_QUERY_SECONDS", "1")
        assert serve.main(["start", *args, "--alert-webhook", url, *databases]) == 0
    running = json.loads((state / "services.json").read_text())
    assert [r["name"] for r in running] == [
        "prefect-server",
        "mlflow-server",
        "worker-accelflow-cpu",
    ]
    try:
        yield {
            "api": f"http://127.0.0.1:{prefect_port}/api",
            "tracking": f"http://127.0.0.1:{mlflow_port}",
            "state": state,
            "data": fmnist_small,
            "alerts": alerts,
        }
    finally:
        assert serve.main(["stop", *args]) == 0
        assert not any(serve.alive(r["pid"]) for r in running)  # stopped exactly what it started
        assert not (state / "services.json").exists()


@pytest.fixture(scope="module")
def deployed_run(stack):
    """`prefect deployment run 'accelflow/adhoc' --param overrides=[...] --watch`, as a user types it."""
    overrides = [*SMALL, f"data.source={stack['data']}", f"workdir={stack['state'] / 'work'}"]
    # one compressed candidate beside the baseline, so the Models tab has models to compare:
    # int8, which needs no fine-tune (a structured-pruning point cost this run 25 s in CI)
    overrides += ["compress.recipe=[quantize]", "serve.runtime=torch"]
    out = serve.prefect_cli(
        [
            "deployment",
            "run",
            "accelflow/adhoc",
            "--param",
            f"overrides={json.dumps(overrides)}",
            "--watch",
            "--watch-timeout",
            "600",
        ],
        stack["api"],
        timeout=660,
    )
    match = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout)
    assert match, out.stdout
    return match.group(1), out.stdout


def test_deployments_are_registered_with_schedule_and_pools(stack):
    out = serve.prefect_cli(["deployment", "ls"], stack["api"]).stdout
    for name in ("accelflow/nightly", "accelflow/adhoc", "accelflow/cluster", "accelflow/gpu"):
        assert name in out
    nightly = serve.prefect_cli(["deployment", "inspect", "accelflow/nightly"], stack["api"]).stdout
    assert "0 2 * * *" in nightly
    gpu = serve.prefect_cli(["work-pool", "inspect", "accelflow-gpu"], stack["api"]).stdout
    assert re.search(r"concurrency_limit['\"]?[:=]\s*1\b", gpu), gpu


def test_prefect_deployment_run_completes_and_lands_in_mlflow(stack, deployed_run):
    flow_run_id, output = deployed_run
    assert "Completed" in output
    parent, stages = parent_and_stages(MlflowClient(stack["tracking"]), flow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["accelflow.deployment"] == "adhoc"
    assert set(stages) == STAGES
    assert parent.data.metrics["test/accuracy"] > 0.5
    assert parent.data.params["data.max_rows"] == "1500"
    # train.model auto, decided once ingest read the data: the CNN for these images
    assert (
        parent.data.params["train.model"] == "auto" and parent.data.tags["accelflow.model"] == "cnn"
    )
    assert " · cnn · " in parent.info.run_name
    assert stages["train"].data.params["train.model"] == "cnn"
    inspect = serve.prefect_cli(["flow-run", "inspect", flow_run_id], stack["api"]).stdout
    assert re.search(r"name='accelflow-[0-9a-f]{8}'", inspect), (
        inspect
    )  # run name carries the config digest


def chromium(*args: str, width: int = 1500, timeout: int = 120) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary:
        pytest.skip(
            "chromium not installed (apt-get install chromium; `make test` does it as root)"
        )
    profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"chromium-{uuid.uuid4().hex[:8]}"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        f"--window-size={width},1100",
        "--virtual-time-budget=25000",
    ]
    try:
        return subprocess.run(
            [binary, *flags, *args], capture_output=True, text=True, timeout=timeout
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_mlflow_ui_renders_the_run_its_stages_and_the_model(stack, deployed_run):
    flow_run_id, _ = deployed_run
    parent, stages = parent_and_stages(MlflowClient(stack["tracking"]), flow_run_id)
    ARTIFACTS.mkdir(exist_ok=True)
    experiment = parent.info.experiment_id
    view = "workflowType=machine_learning"  # the links the product prints open this view
    pages = {
        "runs": f"{stack['tracking']}/#/experiments/{experiment}/runs?{view}",
        "run": f"{stack['tracking']}/#/experiments/{experiment}/runs/{parent.info.run_id}?{view}",
        "model": f"{stack['tracking']}/#/models/accelflow-classifier?{view}",
        "models": f"{stack['tracking']}/#/experiments/{experiment}/models?{view}",
    }
    dom = {}
    for name, url in pages.items():  # one browser per page: its DOM and a screenshot
        shot = f"--screenshot={ARTIFACTS / f'mlflow-{name}.png'}"
        # the Models table draws only the columns in view: wide enough for its metrics
        out = chromium("--dump-dom", shot, url, width=3400 if name == "models" else 1500)
        dom[name] = out.stdout
        (ARTIFACTS / f"mlflow-{name}.html").write_text(out.stdout)
        assert (ARTIFACTS / f"mlflow-{name}.png").stat().st_size > 10_000, name
    assert parent.info.run_name in dom["runs"]  # the pipeline run in the runs table
    assert "test/accuracy" in dom["run"]  # its headline metric on the run page
    for stage in STAGES:  # the six nested stage runs, linked as child runs
        assert f">{stage}<" in dom["run"], stage
    assert "accelflow.flow_run_id" in dom["run"] or flow_run_id in dom["run"]
    assert "champion" in dom["model"] and "Version 1" in dom["model"]
    # the Models tab, in the model-training view: the registered version's logged model,
    # ready, from the evaluate run, linked to its registry version
    assert ">Models<" in dom["models"] and ">Traces<" in dom["models"]
    for genai in (">Judges<", ">Prompts<", ">Sessions<"):  # no GenAI sidebar items
        assert genai not in dom["models"] and genai not in dom["run"], genai
    assert "Ready" in dom["models"] and ">evaluate<" in dom["models"]
    assert "accelflow-classifier" in dom["models"] and "v1" in dom["models"]
    # with the test figures measured on it, grouped by the split they were measured on
    assert "test/accuracy" in dom["models"] and "Dataset: " in dom["models"]
    # beside the candidates compress measured, with their validation figures
    for candidate in (">baseline<", ">quantize<", "point/val_accuracy", "test/macro_f1"):
        assert candidate in dom["models"], candidate


def test_the_run_report_renders_in_chromium_with_every_picture(stack, deployed_run, tmp_path):
    from tasks.report import SECTIONS

    flow_run_id, _ = deployed_run
    client = MlflowClient(stack["tracking"])
    parent, _ = parent_and_stages(client, flow_run_id)
    report = Path(client.download_artifacts(parent.info.run_id, "report.html", str(tmp_path)))
    ARTIFACTS.mkdir(exist_ok=True)
    dom = chromium("--dump-dom", f"--screenshot={ARTIFACTS / 'report.png'}", report.as_uri()).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[-2000:]
    assert loaded[1] == loaded[2] and int(loaded[2]) >= 5  # every picture decoded
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in dom
    assert f"/runs/flow-run/{flow_run_id}" in dom  # linked to the deployed flow run's page
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


# ---------------------------------------------------------------- docker/


def test_compose_file_is_valid_and_needs_the_secret():
    binary = shutil.which("docker-compose")
    if not binary:
        pytest.skip(
            "docker-compose not installed (apt-get install docker-compose; `make test` does it as root)"
        )
    compose = Path(__file__).parent.parent / "docker" / "compose.yaml"
    env = {**os.environ, "POSTGRES_PASSWORD": "test-only"}
    services = subprocess.run(
        [binary, "-f", str(compose), "--profile", "gpu", "config", "--services"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert services.returncode == 0, services.stderr
    assert set(services.stdout.split()) == {
        "postgres",
        "prefect-server",
        "mlflow",
        "dask-scheduler",
        "dask-worker",
        "prefect-worker",
        "prefect-worker-gpu",
    }
    resolved = subprocess.run(
        [binary, "-f", str(compose), "--profile", "gpu", "config"],
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    assert "postgresql+psycopg2://accelflow:test-only@postgres:5432/mlflow" in resolved
    assert "driver: nvidia" in resolved
    # telemetry off in every container that runs Prefect, MLflow or the pipeline: the same
    # file the CLI reads
    from tasks.tracking import TELEMETRY_OFF

    spec = yaml.safe_load(resolved)["services"]
    for name, service in spec.items():
        if name != "postgres":
            for key, value in TELEMETRY_OFF.items():
                assert str(service["environment"].get(key)) == value, (name, key)
    # Dask workers as the LocalCluster runs them: no pause at 80% of their memory limit
    assert spec["dask-worker"]["environment"]["DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE"] == "False"
    for key, value in HUGE_PAGES.items():  # the LocalCluster's workers' malloc
        assert spec["dask-worker"]["environment"][key] == value, key
    assert spec["dask-worker"]["environment"]["ACCELFLOW_WORKDIR"] == "/shared/accelflow"
    env.pop("POSTGRES_PASSWORD")
    missing = subprocess.run(
        [binary, "-f", str(compose), "config", "-q"], capture_output=True, text=True, env=env
    )
    assert missing.returncode != 0 and "set POSTGRES_PASSWORD" in missing.stderr


# ---------------------------------------------------------------- cluster profile on PostgreSQL


def test_a_worse_run_on_drifted_data_on_the_cluster_profile_fires_both_alerts_once(
    stack, deployed_run, postgres_databases, tmp_path
):
    """After the deployed run (the first: nothing to regress against), `accelflow run
    --profile cluster` from the CLI against the same servers (Prefect and MLflow on
    PostgreSQL), a separate Dask scheduler + 2 workers and Optuna on PostgreSQL, on the
    deployed run's images with the classes' shares changed (every image of classes 0-4,
    a fifth of the others) and with a learning rate too small to learn: its search runs on
    the cluster, its PCA passes too, and each automation POSTs once, for that run: the
    regression and the label drift. (A same-config rerun is not a regression:
    tests/test_alerts.py, in process.)"""
    if postgres_databases is None:
        pytest.skip(f"no PostgreSQL at {POSTGRES}; set ACCELFLOW_TEST_POSTGRES")
    state, tracking, api = tmp_path / "cluster", stack["tracking"], stack["api"]
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    for prefix in ("train", "t10k"):
        images, labels = (
            read_idx(Path(stack["data"]) / f"{prefix}-{kind}-idx{d}-ubyte.gz")
            for kind, d in (("images", 3), ("labels", 1))
        )
        keep = (labels < 5) | (np.arange(len(labels)) % 5 == 0)
        write_idx(shifted / f"{prefix}-images-idx3-ubyte.gz", images[keep])
        write_idx(shifted / f"{prefix}-labels-idx1-ubyte.gz", labels[keep])
    started = []
    try:
        scheduler_port = serve.free_port()
        started.append(serve.dask_scheduler(state, scheduler_port))
        scheduler = f"tcp://127.0.0.1:{scheduler_port}"
        started.append(serve.dask_workers(state, scheduler, n=2))

        env = {
            **os.environ,
            **serve.QUIET,
            "PREFECT_API_URL": api,
            "MLFLOW_TRACKING_URI": tracking,
            "DASK_SCHEDULER_ADDRESS": scheduler,
            "ACCELFLOW_WORKDIR": str(tmp_path / "work"),
            "ACCELFLOW_DATA": str(shifted),
            "OPTUNA_STORAGE": postgres_databases["optuna"],
        }
        # two trials, one epoch each: one round on the cluster's two workers
        tuning = ["tune.enabled=true", "tune.trials=2", "tune.epochs=1", "tune.max_rows=600"]
        tuning.append("tune.min_steps=0")  # one epoch, however few steps
        # the search leaves the learning rate alone: every trial keeps the one that cannot learn
        tuning.append("tune.space={batch_size: {type: categorical, choices: [32, 64]}}")
        tuning.append("train.model=mlp")  # on PCA features, so reduce's passes run on the cluster
        # one training process: the deployed run trains on two DDP ranks
        worse = ["train.lr=1e-6", "train.epochs=1", "train.world_size=1"]
        sets = [arg for o in [*SMALL, *tuning, *worse, *EXTRAS_OFF] for arg in ("--set", o)]
        out = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", "--profile", "cluster", *sets],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

        client = MlflowClient(tracking)
        experiments = [e.experiment_id for e in client.search_experiments()]
        (parent,) = client.search_runs(experiments, "tags.`accelflow.deployment` = 'none'")
        flow_run_id = parent.data.tags["accelflow.flow_run_id"]
        parent, stages = parent_and_stages(client, flow_run_id)
        assert set(stages) == STAGES and parent.data.params["dask.address"] == scheduler
        import optuna  # the study lives in PostgreSQL, its trials ran on the cluster's workers

        storage = optuna.storages.RDBStorage(postgres_databases["optuna"])
        (study,) = optuna.get_all_study_summaries(storage)
        assert study.n_trials == 2
        trials = [
            run for run in client.search_runs(experiments, "tags.`accelflow.stage` = 'tune-trial'")
        ]
        assert len(trials) == 2
        inspect = serve.prefect_cli(["flow-run", "inspect", flow_run_id], api).stdout
        assert "COMPLETED" in inspect  # the flow run is recorded on the PostgreSQL-backed server

        from dask.distributed import Client

        with Client(scheduler, timeout="20s") as dask:
            prefixes = set(
                dask.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))
            )
        assert {"partition_moments", "project_partition"} <= prefixes, (
            prefixes
        )  # PCA ran on this cluster
    finally:
        for service in reversed(started):
            serve.stop(service)
    assert not any(serve.alive(s.pid) for s in started)

    # the regression, judged against the deployed champion on today's rows, and the drift
    # from its training data: each automation POSTs once
    worse_run = parent.info.run_id
    assert "REGRESSION against the champion" in out.stdout, out.stdout[-2000:]
    assert "DRIFT: drift against accelflow-classifier v1's training data in <label>" in out.stdout
    alerts, deadline = stack["alerts"], time.monotonic() + 90
    while len(alerts) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # a late third POST (for the deployed run) would show up here
    by_event = {a["event"]: a for a in alerts}
    assert len(alerts) == 2 and set(by_event) == {
        "accelflow.run.regressed",
        "accelflow.data.drifted",
    }, alerts
    drifted = by_event["accelflow.data.drifted"]
    assert drifted["run_id"] == worse_run and drifted["champion"] == "accelflow-classifier v1"
    # the class shares moved; each image's brightness and contrast much less (PSI ~0.04, ~0.02)
    assert drifted["columns"] == ["<label>"]
    alert = by_event["accelflow.run.regressed"]
    assert alert["run_id"] == worse_run
    assert alert["accuracy_drop"] > 0.01 and "test accuracy" in alert["why"]
    assert worse_run in alert["text"]
    # a link that opens the run in MLflow's model-training view, on the stack's server
    assert alert["run_url"].startswith(tracking + "/#/experiments/")
    assert alert["run_url"].endswith(f"/runs/{worse_run}?workflowType=machine_learning")
    assert f"{tracking}/#/experiments/" in out.stdout  # the CLI prints the same kind
