"""Start and stop the local serving stack: Prefect server + worker, MLflow tracking server.

    make serve        # python -m flows.serve start [--alert-webhook URL]
    make stop         # python -m flows.serve stop
    python -m flows.serve alerts --webhook URL --api URL   # alerts on a server of your own

`start` launches each service in its own process group on 127.0.0.1, waits until it
answers, creates the work pools, registers the deployments in prefect.yaml (and, given a
webhook, the regression alert of conf/automations/), and records the pids in <state>/services.json; `stop` stops exactly those process groups. The same
helpers start the real servers (on PostgreSQL too) and Dask processes in the integration
tests, so what the tests exercise is what users run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.tracking import TELEMETRY_OFF

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
QUIET = {
    **TELEMETRY_OFF,
    # lean MLflow server: no job-execution workers (15 processes and 3 GB otherwise)
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}


class ServiceError(RuntimeError):
    """A service did not start; the message carries the end of its log."""


@dataclass
class Running:
    name: str
    pid: int
    log: str
    url: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: str, lines: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _answers(url: str) -> bool:
    if url.startswith("tcp://"):
        host, port = url.removeprefix("tcp://").rsplit(":", 1)
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex((host, int(port))) == 0
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start(
    name: str,
    argv: list[str],
    state: Path,
    env: dict[str, str] | None = None,
    health: str | None = None,
    timeout: float = 120,
    cwd: Path = PROJECT,
) -> Running:
    """Start a process in its own session (so `stop` can end its whole group) and wait for it."""
    state.mkdir(parents=True, exist_ok=True)
    log = state / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **QUIET, **(env or {})},
            cwd=cwd,
        )
    deadline = time.monotonic() + timeout
    while health and not _answers(health):
        if proc.poll() is not None:
            raise ServiceError(
                f"{name} exited with {proc.returncode} while starting:\n{_log_tail(str(log))}"
            )
        if time.monotonic() > deadline:
            stop(Running(name, proc.pid, str(log)))
            raise ServiceError(
                f"{name} did not answer at {health} within {timeout:.0f} s:\n{_log_tail(str(log))}"
            )
        time.sleep(0.5)
    if proc.poll() is not None:
        raise ServiceError(f"{name} exited with {proc.returncode}:\n{_log_tail(str(log))}")
    return Running(name, proc.pid, str(log), health)


def stop(service: Running, grace: float = 20) -> None:
    """SIGTERM the service's process group, again after 5 s (an idle Prefect worker may need
    it), SIGKILL at the end of the grace period."""
    try:
        os.killpg(service.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    began, nudged = time.monotonic(), False
    while time.monotonic() - began < grace:
        _reap(service.pid)  # a child of this process stays a zombie (and "alive") until reaped
        if not alive(service.pid):
            return
        if not nudged and time.monotonic() - began > 5:
            _signal_group(service.pid, signal.SIGTERM)
            nudged = True
        time.sleep(0.25)
    _signal_group(service.pid, signal.SIGKILL)
    _reap(service.pid)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# ---------------------------------------------------------------- the services


def prefect_server(state: Path, port: int, database_url: str | None = None) -> Running:
    env = {"PREFECT_HOME": str(state / "prefect")}
    if database_url:  # e.g. postgresql+asyncpg://user@host:5432/prefect
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return start("prefect-server", argv, state, env, health=f"http://127.0.0.1:{port}/api/health")


def mlflow_server(state: Path, port: int, backend_uri: str | None = None) -> Running:
    backend_uri = backend_uri or f"sqlite:///{state / 'mlflow.db'}"
    argv = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        str(state / "mlartifacts"),
    ]
    return start("mlflow-server", argv, state, health=f"http://127.0.0.1:{port}/health")


def model_argv(model_uri: str, port: int, workers: int = 1) -> list[str]:
    """MLflow's scoring server on 127.0.0.1 for one model (the registry's `champion` by
    default), in this environment: POST /invocations, GET /ping."""
    return [
        str(BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        str(workers),
    ]


def model_env() -> dict[str, str]:
    """MLflow starts `uvicorn` by name: this environment's bin first on PATH."""
    return {**QUIET, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def model_server(
    state: Path, port: int, model_uri: str, tracking_uri: str | None = None, workers: int = 1
) -> Running:
    env = model_env()
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return start(
        "model-server",
        model_argv(model_uri, port, workers),
        state,
        env,
        health=f"http://127.0.0.1:{port}/ping",
    )


def prefect_worker(
    state: Path, api_url: str, pool: str, env: dict[str, str] | None = None
) -> Running:
    argv = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", f"{pool}-local"]
    running = start(f"worker-{pool}", argv, state, {"PREFECT_API_URL": api_url, **(env or {})})
    time.sleep(2)  # it exits at once on a bad pool or API URL: catch that here
    if not alive(running.pid):
        raise ServiceError(f"the {pool} worker exited:\n{_log_tail(running.log)}")
    return running


def dask_scheduler(state: Path, port: int) -> Running:
    argv = [
        str(BIN / "dask"),
        "scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-dashboard",
    ]
    return start("dask-scheduler", argv, state, health=f"tcp://127.0.0.1:{port}")


def dask_workers(state: Path, address: str, n: int = 2, memory_limit: str = "1GiB") -> Running:
    argv = [
        str(BIN / "dask"),
        "worker",
        address,
        "--nworkers",
        str(n),
        "--nthreads",
        "1",
        "--memory-limit",
        memory_limit,
        "--no-dashboard",
    ]
    # as the LocalCluster (tasks/cluster.py) and docker/compose.yaml: no pause at 80%
    return start("dask-workers", argv, state, {"DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE": "False"})


def prefect_cli(
    args: list[str], api_url: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run the `prefect` CLI against a server; raise with its output if it fails."""
    out = subprocess.run(
        [str(BIN / "prefect"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=PROJECT,
        env={**os.environ, **QUIET, "PREFECT_API_URL": api_url, **(env or {})},
    )
    if out.returncode != 0:
        raise ServiceError(
            f"prefect {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
        )
    return out


def register_deployments(api_url: str) -> None:
    """Create the work pools (the GPU pool runs one flow at a time) and deploy prefect.yaml."""
    create_work_pools(api_url, {"accelflow-cpu": None, "accelflow-gpu": 1})
    prefect_cli(
        ["--no-prompt", "deploy", "--all"], api_url, {"ACCELFLOW_PROJECT_DIR": str(PROJECT)}
    )


def create_work_pools(api_url: str, pools: dict[str, int | None]) -> None:
    """Process-type work pools with their concurrency limits (None: unlimited), replaced when
    they exist: what `prefect work-pool create --type process --overwrite` does, through the
    client (each CLI call was a process importing Prefect, 3-4 s)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for name, limit in pools.items():
            pool = WorkPoolCreate(
                name=name, type="process", base_job_template=template, concurrency_limit=limit
            )
            client.create_work_pool(pool, overwrite=True)


AUTOMATIONS = PROJECT / "conf" / "automations"  # one YAML file per alert
ALERT_BLOCK = "accelflow-alerts"


def register_alerts(api_url: str, webhook_url: str) -> dict[str, str]:
    """Save `webhook_url` as the Webhook block `accelflow-alerts` and (re)create every
    automation in conf/automations/ (a regression, drift) with its call-webhook actions
    pointed at that block; returns each automation's name and id. Rerunning replaces them,
    so the URL can change."""
    return {
        name: automation_id
        for spec in sorted(AUTOMATIONS.glob("*.yaml"))
        for name, automation_id in [register_alert(api_url, webhook_url, spec)]
    }


def register_alert(api_url: str, webhook_url: str, spec_path: Path) -> tuple[str, str]:
    import yaml
    from prefect.blocks.webhook import Webhook
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore
    from prefect.settings import PREFECT_API_URL, temporary_settings

    spec = yaml.safe_load(spec_path.read_text())
    with temporary_settings({PREFECT_API_URL: api_url}):
        block_id = Webhook(url=webhook_url, headers={"Content-Type": "application/json"}).save(
            ALERT_BLOCK, overwrite=True
        )
        for action in spec["actions"]:
            if action.get("type") == "call-webhook" and not action.get("block_document_id"):
                action["block_document_id"] = str(block_id)
        automation = AutomationCore.model_validate(spec)
        with get_client(sync_client=True) as client:
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)
            return automation.name, str(client.create_automation(automation))


def alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False


# ---------------------------------------------------------------- make serve / make stop


def serve(
    state: Path,
    prefect_port: int,
    mlflow_port: int,
    alert_webhook: str | None = None,
    prefect_database: str | None = None,
    mlflow_backend: str | None = None,
) -> list[Running]:
    started: list[Running] = []
    try:
        # the two servers boot side by side (each migrates its database first)
        with ThreadPoolExecutor(2) as pool:
            booting = [
                pool.submit(prefect_server, state, prefect_port, prefect_database),
                pool.submit(mlflow_server, state, mlflow_port, mlflow_backend),
            ]
        started.extend(b.result() for b in booting if b.exception() is None)
        for b in booting:
            b.result()  # the first failure, once `started` holds the server that did start
        api_url, tracking = (
            f"http://127.0.0.1:{prefect_port}/api",
            f"http://127.0.0.1:{mlflow_port}",
        )
        register_deployments(api_url)
        if alert_webhook:
            register_alerts(api_url, alert_webhook)
        started.append(
            prefect_worker(state, api_url, "accelflow-cpu", {"MLFLOW_TRACKING_URI": tracking})
        )
    except BaseException:
        for service in reversed(started):
            stop(service)
        raise
    return started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.serve", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=["start", "stop", "status", "alerts", "model"])
    parser.add_argument("--state-dir", default=str(PROJECT / ".accelflow" / "serve"))
    parser.add_argument(
        "--prefect-port", type=int, default=int(os.environ.get("ACCELFLOW_PREFECT_PORT", 4200))
    )
    parser.add_argument(
        "--mlflow-port", type=int, default=int(os.environ.get("ACCELFLOW_MLFLOW_PORT", 5000))
    )
    parser.add_argument(
        "--alert-webhook",
        "--webhook",
        default=os.environ.get("ACCELFLOW_ALERT_WEBHOOK") or None,
        help="URL to POST regression alerts to (start, alerts); see conf/automations/",
    )
    parser.add_argument(
        "--prefect-database",
        default=os.environ.get("ACCELFLOW_PREFECT_DATABASE") or None,
        help="start: the Prefect server's database URL (default: sqlite in the state dir), "
        "e.g. postgresql+asyncpg://user@host:5432/prefect",
    )
    parser.add_argument(
        "--mlflow-backend",
        default=os.environ.get("ACCELFLOW_MLFLOW_BACKEND") or None,
        help="start: the MLflow server's backend store URI (default: sqlite in the state "
        "dir), e.g. postgresql+psycopg2://user@host:5432/mlflow",
    )
    parser.add_argument("--api", default=None, help="Prefect API URL for `alerts`")
    parser.add_argument("--model", default="models:/accelflow-classifier@champion")
    parser.add_argument("--model-port", type=int, default=5001)
    parser.add_argument("--workers", type=int, default=1, help="model: uvicorn workers")
    args = parser.parse_args(argv)
    state = Path(args.state_dir)
    if args.command == "model":  # in the foreground, until Ctrl-C
        print(
            f"scoring {args.model} at http://127.0.0.1:{args.model_port}/invocations "
            f"({args.workers} worker(s); Ctrl-C stops)",
            flush=True,
        )
        argv = model_argv(args.model, args.model_port, args.workers)
        os.execve(argv[0], argv, {**os.environ, **model_env()})
    if args.command == "alerts":
        if not args.alert_webhook:
            parser.error("alerts needs --webhook URL (or ACCELFLOW_ALERT_WEBHOOK)")
        api = args.api or os.environ.get("PREFECT_API_URL")
        api = api or f"http://127.0.0.1:{args.prefect_port}/api"
        for name, automation in register_alerts(api, args.alert_webhook).items():
            print(f"automation {name} ({automation}) posts to the webhook")
        return 0
    record = state / "services.json"
    running = [Running(**r) for r in json.loads(record.read_text())] if record.is_file() else []
    running = [r for r in running if alive(r.pid)]

    if args.command == "status":
        for r in running:
            print(f"{r.name:<22} pid {r.pid:<8} {r.url or ''}  log {r.log}")
        print("nothing running" if not running else "")
        return 0
    if args.command == "stop":
        for r in reversed(running):
            stop(r)
            print(f"stopped {r.name} (pid {r.pid})")
        record.unlink(missing_ok=True)
        print("nothing was running" if not running else "all stopped")
        return 0
    if running:
        print("already running (make stop first):", ", ".join(r.name for r in running))
        return 0
    try:
        started = serve(
            state,
            args.prefect_port,
            args.mlflow_port,
            args.alert_webhook,
            args.prefect_database,
            args.mlflow_backend,
        )
    except ServiceError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 1
    record.write_text(json.dumps([asdict(s) for s in started], indent=2))
    api = f"http://127.0.0.1:{args.prefect_port}/api"
    print(f"""
Prefect UI   http://127.0.0.1:{args.prefect_port}
MLflow UI    http://127.0.0.1:{args.mlflow_port}
Deployments  accelflow/nightly (02:00 UTC), accelflow/adhoc, accelflow/cluster (pool accelflow-cpu),
             accelflow/gpu (pool accelflow-gpu, one run at a time; start a worker on a GPU node)

Alerts       {"a worse run or drifted data POSTs to the webhook (conf/automations/)" if args.alert_webhook else "none: make serve ALERT_WEBHOOK=URL posts when a run regresses or data drift"}

Trigger a run and follow it:
  export PREFECT_API_URL={api}
  {BIN / "prefect"} deployment run 'accelflow/adhoc' --param overrides='["train.epochs=3"]' --watch

Logs in {state}; stop everything with: make stop""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
