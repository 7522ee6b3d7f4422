"""Shared fixtures: real data (Fashion-MNIST subsets, scikit-learn's digits) and configs."""

from __future__ import annotations

import atexit
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conf.schema import PipelineConfig, load_config
from tasks.tracking import quiet_environment

FMNIST = Path(os.environ.get("ACCELFLOW_FMNIST", "/usr/share/datasets/fashion-mnist"))
CLASS_NAMES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
]

quiet_environment()  # offline and quiet, as the CLI runs (conf/telemetry.env holds the list)


def tree_digest(path: Path) -> str:
    """Digest of every file under `path` (names and bytes): proves input was not touched."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(str(p.relative_to(path.parent)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture(scope="session")
def fmnist_full() -> Path:
    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(
            f"Fashion-MNIST missing in {FMNIST}: run `make data` (Debian's dataset-fashion-mnist)"
        )
    return FMNIST


@pytest.fixture(scope="session")
def fmnist_small(fmnist_full: Path, tmp_path_factory) -> Path:
    """A real Fashion-MNIST subset in IDX form: first 3000 train and 1000 test images."""
    from tasks.readers import read_idx

    out = tmp_path_factory.mktemp("fmnist_small")
    for prefix, n in (("train", 3000), ("t10k", 1000)):
        write_idx(
            out / f"{prefix}-images-idx3-ubyte.gz",
            read_idx(fmnist_full / f"{prefix}-images-idx3-ubyte.gz")[:n],
        )
        write_idx(
            out / f"{prefix}-labels-idx1-ubyte.gz",
            read_idx(fmnist_full / f"{prefix}-labels-idx1-ubyte.gz")[:n],
        )
    return out


def pytest_configure(config):
    """One Prefect API server (on a fresh database, as Prefect's test harness has it) for the
    whole session, started by the process that starts the others (xdist's controller) and
    named to them in PREFECT_API_URL: every flow run of the tests and the CLI runs share it.
    A server boot migrates its database (~15 s of CPU on 2 cores): once per session instead
    of once per xdist worker and per CLI run. The CLI's own temporary server is tested where
    that is the point (tests/test_cli.py)."""
    if hasattr(config, "workerinput"):
        return  # an xdist worker: the controller started it
    if importlib.util.find_spec("prefect") is None:
        return  # a bare GPU box (benchmarks/gpu_check.py) runs only the gpu tests
    # a PREFECT_API_URL of the user's (their own server) is replaced: tests never run there
    from flows.cli import launch_prefect_server

    home = Path(tempfile.mkdtemp(prefix="accelflow-test-prefect-"))
    server, port = launch_prefect_server(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        }
    )
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    config.stash[_PREFECT_SERVER] = (server, home)


_PREFECT_SERVER = pytest.StashKey[tuple]()


def pytest_unconfigure(config):
    started = config.stash.get(_PREFECT_SERVER, None)
    if started:
        from flows.cli import stop_server

        server, home = started
        if "prefect" in sys.modules:  # flows ran in this process (no xdist workers)
            # send the logs and events still queued while the server is up: at exit
            # Prefect's workers would retry a stopped server for over a minute
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            for worker in (APILogWorker, EventsWorker):
                worker.drain_all(timeout=10)
        stop_server(server)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_harness():
    """The session's Prefect API server (see pytest_configure), once it answers."""
    from flows.cli import prefect_answers

    api = os.environ["PREFECT_API_URL"]
    assert prefect_answers(api, limit=180), f"no Prefect API at {api}"


@pytest.fixture(scope="module")
def cluster():
    """A Dask LocalCluster client shared by one file's data-stage tests (2 worker processes).
    Per file, not per session: idle, its processes still take about 3% of a core each
    (heartbeats, memory monitor), which over a whole session cost more than a start (~1 s)."""
    from conf.schema import DaskConfig
    from tasks.cluster import dask_client

    with dask_client(DaskConfig(n_workers=2, memory_limit="1GiB")) as client:
        yield client


@pytest.fixture(scope="session")
def digits_frame() -> pd.DataFrame:
    from sklearn.datasets import load_digits

    digits = load_digits(as_frame=True)
    frame = digits.frame.rename(columns={"target": "digit"})
    frame["digit"] = frame["digit"].map(lambda d: f"d{d}")  # string labels on purpose
    return frame


@pytest.fixture(scope="module")
def digits_parquet(tmp_path_factory, digits_frame):
    """Digits as train/val Parquet files with integer labels, the shape the trainer reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path_factory.mktemp("digits_pq")
    frame = digits_frame.copy()
    frame["label"] = frame.pop("digit").str[1:].astype("int64")
    paths = {}
    for name, part in (("train", frame.iloc[:1400]), ("val", frame.iloc[1400:])):
        paths[name] = str(out / f"{name}.parquet")
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), paths[name])
    return paths, [c for c in frame.columns if c != "label"]


def make_spec(digits_parquet, tmp_path, **overrides):
    """A worker spec training an MLP on `digits_parquet`'s files; any key overridden."""
    from conf.schema import TrainConfig
    from tasks.train import OPTIM_KEYS

    paths, features = digits_parquet
    cfg = TrainConfig(hidden=[64], epochs=4, lr=0.01, batch_size=64)
    spec = {
        "train_files": [paths["train"]],
        "val_files": [paths["val"]],
        "features": features,
        "label": "label",
        "arch": {
            "model": "mlp",
            "n_features": 64,
            "n_classes": 10,
            "hidden": [64],
            "dropout": 0.0,
            "image_shape": None,
        },
        "phases": [{"sparsity": None, "epochs": cfg.epochs, "lr": cfg.lr}],
        **{k: getattr(cfg, k) for k in OPTIM_KEYS},
        "init_from": None,
        "out_dir": str(tmp_path),
        "checkpoint_dir": str(tmp_path / "checkpoints"),
        "metric_prefix": "train",
    }
    spec.update(overrides)
    return spec


@pytest.fixture
def digits_csv(digits_frame, tmp_path) -> Path:
    path = tmp_path / "digits.csv"
    digits_frame.to_csv(path, index=False)
    return path


def stage_runs(client, parent_id: str) -> dict:
    """The nested stage runs of a pipeline's parent run, by stage name."""
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    return {run.info.run_name: run for run in children}


def raw_test_rows(source: Path, cfg: PipelineConfig):
    """The held-out rows of a small CSV as a user holds them (raw text values, gaps and all)
    and their labels, recomputed from the split rule: the whole file is one block."""
    from tasks.splitting import assign_splits, row_uniforms
    from tasks.tables import clean_block, decide_schema, profile_raw

    raw = pd.read_csv(source)
    features, labels, _, _ = clean_block(raw, decide_schema([profile_raw(raw)], cfg.data))
    u = row_uniforms(features, cfg.data.seed)
    test = assign_splits(u, cfg.data.val_fraction, cfg.data.test_fraction) == 2
    held_out = features[test].index  # the table's row numbers
    return raw.drop(columns=[cfg.data.label]).loc[held_out], labels[test].to_numpy()


@functools.cache
def _migrated_mlflow_store() -> Path:
    """One empty MLflow sqlite store per test process, created (and migrated) once."""
    from mlflow import MlflowClient

    folder = tempfile.mkdtemp(prefix="accelflow-mlflow-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = Path(folder) / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def mlflow_store(path: Path) -> str:
    """A sqlite tracking URI at `path`, the store there a copy of an empty migrated one unless
    it exists: MLflow's first-time schema migration costs ~2 s a store, and a user pays it
    once a machine (the two-runs-at-once CLI test keeps a new store: it checks that path)."""
    if not path.exists():
        shutil.copyfile(_migrated_mlflow_store(), path)
    return f"sqlite:///{path}"


def make_config(tmp_path: Path, source: Path | str, *overrides: str) -> PipelineConfig:
    """The default config pointed at `source`, a temporary workdir and MLflow store, small limits."""
    base = [
        f"data.source={source}",
        f"workdir={tmp_path / 'work'}",
        f"tracking.uri={mlflow_store(tmp_path / 'mlflow.db')}",
        "train.model=mlp",  # the tests of train.model auto's CNN: test_integration's runs
        "train.epochs=3",
        "train.min_steps=0",  # tiny tables: train.epochs as given (the default raises them)
        "tune.min_steps=0",  # and tune.epochs per trial
        # one rank: each DDP rank is a process importing torch; the CLI runs, the deployed
        # and cluster runs and test_training's DDP tests keep two
        "train.world_size=1",
        "compress.finetune_epochs=1",
        "compress.min_steps=0",  # as given, however small the table
        "compress.recipe=[magnitude]",  # one recipe (50%); the compress tests sweep
        "dask.memory_limit=1GiB",
        "dask.n_workers=1",  # small tables; each worker is a process importing the stack
        "evaluate.latency_repeats=3",  # the fewest: no test here asserts a latency's precision
        "evaluate.tsne_rows=0",  # no map (seconds of CPU a run); test_pipeline's first run draws it
        "tune.enabled=false",  # the tune tests switch it on
        "evaluate.reference=none",  # the alerts tests' runs fit the gradient-boosting reference
        # torch only: no ONNX export per measured model; the compress sweep, the CLI runs and
        # tests/test_export.py serve from onnxruntime (serve.runtime auto, the default)
        "serve.runtime=torch",
    ]
    return load_config(None, [*base, *overrides])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI every integration test must really run: a skip there is a failure."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and item.get_closest_marker("integration"):
        report.outcome = "failed"
        report.longrepr = f"integration test skipped in CI: {report.longrepr}"


# Two xdist workers take whole files (--dist loadfile) in collection order: the longest
# files go first, so no long file starts last and runs alone at the end (measured on
# 2026-12-03: 575 s and 640 s for the two workers with xdist's own order). The weights are
# the seconds each file took in a recorded run: `make test ARGS=--record-durations`.
DURATIONS = Path(__file__).with_name("durations.json")


def pytest_addoption(parser):
    parser.addoption(
        "--record-durations",
        action="store_true",
        help=f"write each test file's total seconds to {DURATIONS.name} (orders later runs)",
    )


def pytest_collection_modifyitems(config, items):
    seconds = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    # a file not yet recorded goes first: new tests are more often slow than not
    items.sort(key=lambda item: -seconds.get(item.nodeid.split("::")[0], float("inf")))


_file_seconds: defaultdict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    # on xdist's controller too: every worker's reports reach it
    _file_seconds[report.nodeid.split("::")[0]] += report.duration


def pytest_sessionfinish(session):
    is_worker = hasattr(session.config, "workerinput")
    if session.config.getoption("--record-durations") and not is_worker:
        tmp = DURATIONS.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({k: round(v) for k, v in sorted(_file_seconds.items())}, indent=1) + "\n"
        )
        tmp.replace(DURATIONS)
