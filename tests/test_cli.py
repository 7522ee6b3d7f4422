"""The `accelflow` command: exit codes and one-paragraph errors, no tracebacks for user errors."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import mlflow_store, raw_test_rows, stage_runs

from tasks.stages import NAMES as STAGES

CLI = [sys.executable, "-m", "flows.cli"]


def accelflow(*args, cwd=None):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600, cwd=cwd)


# The CLI as a user runs it, with no Prefect server named: it starts its own temporary one
# (the CLI runs that go further use the session's server: PREFECT_API_URL, tests/conftest.py)
OWN_PREFECT = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}


def test_validate_checks_config_and_data(digits_csv):
    out = accelflow("validate", "--set", f"data.source={digits_csv}", "--set", "data.label=digit")
    assert out.returncode == 0, out.stderr
    assert "data OK: 64 features" in out.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "train.optimiser=sgd"], "unknown key 'train.optimiser'"),
        (  # a union's members (a number or auto) are one key, one message
            ["--set", "train.epochs=zero"],
            "'train.epochs': Input should be a valid integer, unable to parse string as an "
            "integer, or 'auto' (got 'zero')",
        ),
        (
            ["--set", "data.source=/no/such/data.csv"],
            "/no/such/data.csv: data source does not exist",
        ),
        (["-c", "/no/such/config.yaml"], "config file /no/such/config.yaml does not exist"),
        (
            ["--set", "data.val_fraction=0.6", "--set", "data.test_fraction=0.4"],
            "data.val_fraction (0.6) + data.test_fraction (0.4) leave no rows for training",
        ),
    ],
)
def test_user_errors_exit_2_with_a_message_and_no_traceback(args, expected):
    for command in ("validate", "run"):
        out = accelflow(command, *args)
        assert out.returncode == 2
        assert expected in out.stderr
        assert "Traceback" not in out.stderr


def test_a_workdir_that_is_a_file_is_refused_before_anything_starts(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    out = accelflow("run", "--set", f"workdir={tmp_path / 'taken'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"workdir {tmp_path / 'taken'} is a file, not a folder" in out.stderr


def test_an_unreachable_tracking_server_is_named_before_any_work(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = accelflow(
        "run",
        "--set",
        f"tracking.uri=http://127.0.0.1:{port}",
        "--set",
        f"workdir={tmp_path / 'w'}",
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"tracking.uri http://127.0.0.1:{port}: no MLflow server answers" in out.stderr
    assert "temporary API server" not in out.stdout + out.stderr
    assert not (tmp_path / "w" / "ingest").exists()


def test_secrets_in_config_values_never_reach_mlflow(tmp_path):
    """A password in a URL (a tracking or storage URL, an S3 source) is masked in every param,
    the config artifact, and a published manifest and summary."""
    import mlflow

    from conf.schema import load_config, mask_secrets
    from tasks import tracking
    from tasks.store import StageOutcome

    cfg = load_config(
        None,
        [
            f"tracking.uri={mlflow_store(tmp_path / 'm.db')}",
            "dask.address=tcp://ops:hunter2@10.0.0.5:8786",
            "data.source=s3://AKIA:wJalrXUtnFEMI@bucket/churn.csv?token=abc123",
        ],
    )
    experiment = tracking.configure(cfg)
    with (
        tracking.pipeline_run(cfg, experiment) as parent,
        tracking.stage_run(parent, "ingest", "data", cfg.data) as child,
    ):
        manifest = {
            "key": "k",
            "config": cfg.data.model_dump(),
            "metrics": {},
            "summary": f"read {cfg.data.source}",
        }
        tracking.publish("ingest", StageOutcome(manifest, False, "first run", 0.1))
    client = mlflow.MlflowClient(cfg.tracking.uri)
    shown = []
    artifacts = {
        parent: ["config/pipeline.yaml"],
        child: ["ingest/manifest.json", "ingest/summary.md"],
    }
    for run_id, paths in artifacts.items():
        run = client.get_run(run_id)
        shown += [*map(str, run.data.params.values()), *map(str, run.data.tags.values())]
        shown += [Path(client.download_artifacts(run_id, p, tmp_path)).read_text() for p in paths]
    text = "\n".join(shown)
    assert "s3://AKIA:***@bucket/churn.csv?token=***" in text and "tcp://ops:***@10.0.0.5" in text
    for secret in ("hunter2", "wJalrXUtnFEMI", "abc123"):
        assert secret not in text
    assert mask_secrets({"storage_password": "x", "n": 3}) == {"storage_password": "***", "n": 3}


def finished_trials(journal: Path) -> dict[int, float | None]:
    """Trial number → value of every finished trial in a study's journal file."""
    import optuna

    from tasks.tune import INTERRUPTED, open_storage

    storage = open_storage({"storage": str(journal)})
    names = optuna.get_all_study_names(storage)
    if not names:  # the journal file is there a moment before the study is
        return {}
    (name,) = names
    study = optuna.load_study(study_name=name, storage=storage)
    return {
        t.number: t.value
        for t in study.trials
        if t.state.is_finished() and t.user_attrs.get("reason") != INTERRUPTED
    }


@pytest.mark.slow
def test_a_killed_run_resumes_its_search_then_its_training(prefect_harness, digits_csv, tmp_path):
    """SIGKILL the whole `accelflow run` (its Dask and DDP workers) twice: mid-search, then
    mid-training. Each next run keeps what was finished: the search its finished trials
    (the study maximises macro-F1), the training its epochs up to the last checkpoint."""
    import json
    import os
    import signal
    import time

    sets = [
        f"data.source={digits_csv}",
        "data.label=digit",
        f"workdir={tmp_path / 'w'}",
        f"tracking.uri={mlflow_store(tmp_path / 'm.db')}",
        "tune.enabled=true",
        "tune.trials=4",
        "tune.timeout_s=null",  # all four, however slow the machine
        "tune.parallel=2",
        "tune.epochs=2",
        "tune.max_rows=null",
        "tune.pruner=none",
        "tune.metric=val_macro_f1",
        "tune.space={lr: {type: float, low: 0.0001, high: 0.01, log: true}}",
        "train.epochs=6",
        "train.world_size=1",  # one training process (started directly): the two-rank kill
        # and restart are test_training's; here, what a killed run keeps
        "train.batch_size=8",  # small batches: slow trials and epochs, so each kill lands mid-way
        "train.hidden=[512, 512]",
        "compress.recipe=[]",
        "evaluate.latency_repeats=3",
        "evaluate.reference=none",  # the third run's evaluate: what this test is not about
        "evaluate.tsne_rows=0",
        "serve.runtime=torch",
    ]
    argv = [*CLI, "run", *[a for s in sets for a in ("--set", s)]]
    work = tmp_path / "w"

    def run_until(reached, what: str) -> None:
        """Start the run, SIGKILL its whole process group once `reached()` holds."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        run = subprocess.Popen(
            argv,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline, hit = time.monotonic() + 300, False
        try:
            while time.monotonic() < deadline and run.poll() is None and not hit:
                hit = reached()
                time.sleep(0.1)
        finally:
            # the run and its Dask workers (the Prefect server is the session's)
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(30)
        assert hit, f"never {what}: " + run.stdout.read().decode()[-3000:]

    def journal(partial: bool) -> Path | None:
        return next(
            iter((work / "tune").glob(f"{'.partial-' if partial else ''}*/study.journal")), None
        )

    # 1: killed once two trials have finished
    run_until(
        lambda: (j := journal(True)) is not None and len(finished_trials(j)) >= 2,
        "finished two trials",
    )
    before = finished_trials(journal(True))
    assert 2 <= len(before) < 4

    # 2: the search completes with those trials kept; killed a few epochs into training
    def training_checkpointed() -> bool:
        if not list((work / "train").glob(".partial-*/checkpoints/last.pt")):
            return False
        time.sleep(1.5)  # a few more epochs
        return True

    run_until(training_checkpointed, "checkpointed the training")
    time.sleep(1)  # the DDP workers run in sessions of their own: they must die with the run
    survivors = [p for p in Path("/proc").glob("[0-9]*/cmdline") if _reads(p, str(work))]
    assert not survivors, "training workers outlived the killed run"
    after = finished_trials(journal(False))
    assert len(after) == 4  # the budget, completed
    assert {n: after[n] for n in before} == before  # the trials finished before the kill, kept
    manifest = json.loads(journal(False).with_name("manifest.json").read_text())
    best = manifest["leaderboard"][0]
    assert (
        best["val_macro_f1"] == max(after.values()) == manifest["metrics"]["tune/best_val_macro_f1"]
    )
    assert "val macro-F1" in manifest["summary"]
    (partial,) = (work / "train").glob(".partial-*")
    assert not (partial / "history.json").exists()  # it really died mid-training

    # 3: everything before train is reused; train runs only the epochs that were not done
    # (what the killed runs left is what matters: this last run goes in process, sparing
    # a third CLI start)
    from conf.schema import load_config
    from flows.pipeline import pipeline

    third = {row["stage"]: row["status"] for row in pipeline(load_config(None, sets))["stages"]}
    assert [third[s] for s in ("ingest", "partition", "reduce", "tune")] == ["cached"] * 4
    assert third["train"] == "ran"
    (trained,) = [
        p for p in (work / "train").iterdir() if p.is_dir() and not p.name.startswith(".")
    ]
    log = (trained / "train.log").read_text()
    ran = [json.loads(line)["epoch"] for line in log.splitlines() if line.startswith('{"epoch"')]
    assert ran and ran[0] > 0 and ran[-1] == 5  # the third run trained only what was left
    history = json.loads((trained / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(6))


def test_the_temporary_prefect_server_dies_with_a_killed_cli(digits_csv, tmp_path):
    """SIGKILL the CLI alone (no atexit runs): its temporary Prefect API must not live on."""
    import os
    import signal
    import time

    argv = [
        *CLI,
        "run",
        "--set",
        f"data.source={digits_csv}",
        "--set",
        "data.label=digit",
        "--set",
        f"workdir={tmp_path / 'w'}",
        "--set",
        f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
    ]
    cli = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=OWN_PREFECT,
    )
    line = cli.stdout.readline()
    while "temporary API server" not in line:
        assert line, "the CLI ended before starting its Prefect server"
        line = cli.stdout.readline()
    port = re.search(r"127\.0\.0\.1:(\d+)/api", line)[1]
    server = [p for p in Path("/proc").glob("[0-9]*/cmdline") if _reads(p, f"--port\0{port}")]
    assert len(server) == 1
    os.kill(cli.pid, signal.SIGKILL)
    cli.wait(10)
    deadline = time.time() + 15
    while time.time() < deadline and _reads(server[0], "uvicorn"):
        time.sleep(0.2)
    assert not _reads(server[0], "uvicorn"), "the Prefect server outlived the killed CLI"


def _reads(cmdline: Path, text: str) -> bool:
    try:
        return text.encode() in cmdline.read_bytes()
    except OSError:  # the process is gone
        return False


def test_run_rejects_a_missing_label_before_starting_anything(digits_csv):
    out = accelflow("run", "--set", f"data.source={digits_csv}")
    assert out.returncode == 2
    assert "label column 'label' not found" in out.stderr and "data.label" in out.stderr
    assert "temporary API server" not in out.stdout + out.stderr  # failed before Prefect started


def _table(path, rows):
    path.write_text("\n".join([",".join(r) for r in rows]) + "\n")
    return path


# A user error met inside the flow (by train: a model that needs images, known only once
# ingest has read the data): the CLI prints its paragraph alone. The messages ingest raises
# (a bad row named, an empty file, a single class) are checked where it raises them
# (tests/test_ingest.py), every stage's paragraph as the flow's state in tests/test_pipeline.py.
@pytest.mark.slow
def test_an_error_met_inside_the_flow_is_one_paragraph_too(prefect_harness, tmp_path):
    rows = [["a", "b", "label"], *[[str(i), str(i % 7), str(i % 2)] for i in range(200)]]
    source = _table(tmp_path / "table.csv", rows)
    sets = [
        f"data.source={source}",
        f"workdir={tmp_path / 'w'}",
        f"tracking.uri={mlflow_store(tmp_path / 'm.db')}",
        "train.epochs=1",
        "tune.enabled=false",  # no search before train
        "train.model=cnn",
    ]
    out = accelflow("run", *[a for s in sets for a in ("--set", s)], cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "accelflow: error: train.model" in out.stderr
    lines = out.stderr.splitlines()
    assert "train.model: 'cnn' needs image data" in lines[-2] + lines[-1]
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.slow
def test_two_runs_at_once_on_a_messy_csv_build_each_stage_once_and_serve_it(
    prefect_harness, digits_frame, tmp_path
):
    """The user's path with a real-world table: string labels, a categorical column, missing
    values and a bad row, through the CLI, local Prefect and a sqlite MLflow store, training
    streamed from the Parquet row groups (real DDP ranks). Two such runs start at once on one
    workdir and store (a schedule overlapping a run by hand): each stage is built by one of
    them while the other waits on its lock and reuses it; one version is registered and
    nothing is corrupt. The registered model then scores raw rows with the accuracy evaluate
    logged."""
    import json

    import mlflow
    import numpy as np
    from mlflow import MlflowClient

    from conf.schema import load_config

    frame = digits_frame.copy().astype({"pixel_4_4": float, "pixel_0_2": object})
    frame["ink"] = np.where(frame["pixel_3_3"] > 8, "dark", "light")
    frame.loc[[3, 4], "pixel_4_4"] = np.nan
    frame.loc[5, "pixel_0_2"] = "n/a?"
    source = tmp_path / "messy.csv"
    frame.to_csv(source, index=False)
    sets = [
        f"data.source={source}",
        "data.label=digit",
        "data.on_bad_rows=quarantine",
        f"workdir={tmp_path / 'work'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "train.epochs=2",
        "train.min_steps=0",
        "train.hidden=[128]",
        "reduce.method=pca",  # standardised PCA on the way to serving, not auto's pass-through
        "train.batch_size=32",
        "train.resident_max_gb=0.00001",  # 10 KiB: streamed from its row groups, as a large table is
        "compress.recipe=[structured]",  # one point, fine-tuned (the sweeps: test_compress)
        "compress.finetune_epochs=1",
        "compress.min_steps=0",  # one epoch, as given
        "tune.enabled=false",
        "evaluate.latency_repeats=3",
        "evaluate.reference=none",  # evaluate's extras have their own tests
        "evaluate.tsne_rows=0",
        "serve.runtime=torch",  # no ONNX export: test_pipeline and test_export serve from it
    ]
    argv = [*CLI, "run", *[a for s in sets for a in ("--set", s)]]
    runs = [
        subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
        )
        for _ in range(2)
    ]
    outputs = [r.communicate(timeout=600) for r in runs]
    for run, (_, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err[-3000:]
    for stage in STAGES:
        ran = [
            len(re.findall(rf"^ {stage}\s+\| ran\s+\|", out, re.MULTILINE)) for out, _ in outputs
        ]
        assert sorted(ran) == [0, 1], (stage, ran)  # built once, by one of the two
        built = [p for p in (tmp_path / "work" / stage).iterdir() if p.is_dir()]
        assert len([p for p in built if not p.name.startswith(".")]) == 1, stage
    versions = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_model_versions(
        "name='accelflow-classifier'"
    )
    assert len(versions) == 1
    for out, _ in outputs:
        assert "Registered accelflow-classifier v1 as 'champion'" in out
        assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in out
    # not a terminal: live progress is one plain log line per step (Prefect's log lines, so
    # the Prefect UI has them too), with the figures and an ETA, from the run that built it
    assert not any("\x1b[" in out + err for out, err in outputs)
    lines = [line for _, err in outputs for line in err.splitlines()]
    for stage, what, last in (
        ("partition", r"partitions written \(\S+\)", r"\d+"),
        ("reduce", "PCA pass over train partitions", r"\d+"),
        ("train", "epochs", "2"),
        ("compress", "epochs", "1"),
    ):
        steps = [x for x in lines if re.search(rf" - {stage}: {what} \d+/{last} \| ", x)]
        assert steps and re.search(r"elapsed, eta 0s$", steps[-1]), (stage, lines[-60:])
    (trained,) = (tmp_path / "work" / "train").glob("*/manifest.json")
    metrics = json.loads(trained.read_text())["metrics"]
    assert metrics["train/streamed"] and metrics["train/world_size"] == 2
    epoch = next(x for x in lines if " - train: epochs 2/2 | " in x)
    assert re.search(
        r"loss \d\.\d{4}, val loss \d\.\d{4}, val acc \d\.\d{4}, samples/s [\d,]+", epoch
    )

    cfg = load_config(None, sets)
    raw_X, raw_y = raw_test_rows(source, cfg)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@champion")
    predictions = np.asarray(model.predict(raw_X))
    client = MlflowClient(cfg.tracking.uri)
    parents = client.search_runs(
        [client.get_experiment_by_name("accelflow").experiment_id],
        "tags.`accelflow.stage` = 'pipeline'",
    )
    assert len(parents) == 2  # one parent run each; the run that reused a stage reports it too
    for parent in parents:
        assert float((predictions == raw_y).mean()) == pytest.approx(
            parent.data.metrics["test/accuracy"], abs=1e-9
        )
    assert parent.data.metrics["test/accuracy"] > 0.8
    # serve.runtime auto: the registered model runs where compress measured it faster
    compress = stage_runs(client, parent.info.run_id)["compress"].data
    served_by = "onnxruntime" if compress.metrics["compress/onnxruntime"] else "torch"
    assert model.unwrap_python_model().predictor.runtime == served_by
    # and the run's table says what was registered, compress's point and its runtime
    figure = rf"^ evaluate\s+\| ran\s+\|\s+[\d.]+ \| test acc [\d.]+ \((\S+) by {served_by}\)$"
    assert any(re.search(figure, out, re.MULTILINE) for out, _ in outputs), outputs[0][0][-1500:]
