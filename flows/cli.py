"""`accelflow` command line: run the pipeline or check a config and its data.

    accelflow run                                   # conf/pipeline.yaml, embedded defaults
    accelflow run -c my.yaml --set train.epochs=3 --set data.source=/data/x.csv
    accelflow run --profile cluster                 # Dask/MLflow endpoints from the environment
    accelflow validate --set data.label=target      # config + data checks, no stages run
    accelflow compare [RUN_A RUN_B]                 # what changed between two runs (default: last two)
    accelflow report RUN_ID [-o report.html]        # a past run's HTML report, written again
    accelflow score --source new.csv --out predictions.parquet [--model champion|3]

User errors (bad config, bad data, a failed training run) print one paragraph that names
the key, file or column and exit 2; only unexpected errors show a traceback.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from tasks.tracking import check_tracking, quiet_environment


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="accelflow", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "run the whole pipeline"),
        ("validate", "check config and data only"),
        ("compare", "compare two pipeline runs (default: the experiment's last two)"),
        ("report", "write a run's HTML report again"),
        ("score", "score a table with a registered model into a Parquet file"),
    ):
        p = sub.add_parser(name, help=text)
        if name == "score":
            p.add_argument(
                "--source", required=True, help="CSV or Parquet file (or folder) to score"
            )
            p.add_argument("--out", required=True, help="Parquet file to write")
            p.add_argument(
                "--model", default="champion", help="alias or version (default: champion)"
            )
            p.add_argument(
                "--id-column",
                default=None,
                help="a column to pass through instead of the row number",
            )
        if name == "compare":
            p.add_argument("runs", nargs="*", metavar="RUN_ID", help="two parent run ids")
        if name == "report":
            p.add_argument("run", metavar="RUN_ID", help="a pipeline (parent) run id")
            p.add_argument("-o", "--output", default=None, help="file (default: report-<run>.html)")
        p.add_argument(
            "-c", "--config", default=None, help="YAML config (default: conf/pipeline.yaml)"
        )
        p.add_argument(
            "-p",
            "--profile",
            default=None,
            help="overlay from conf/profiles (serve, cluster, gpu) or a YAML path",
        )
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set train.epochs=3 (repeatable)",
        )
    return parser.parse_args(argv)


def validate(cfg) -> str:
    from tasks.ingest import check_source

    return f"config OK; data OK: {check_source(cfg.data, cfg.dask)}"


def compare(cfg, runs: list[str]) -> str:
    """The side-by-side table, printed and logged to run B (`compare/<A>.json`)."""
    import mlflow

    from tasks import alerts
    from tasks.errors import ConfigError

    check_tracking(cfg.tracking.uri)
    client = mlflow.MlflowClient(cfg.tracking.uri)
    if len(runs) not in (0, 2):
        raise ConfigError("accelflow compare takes two run ids, or none for the last two runs")
    if not runs:
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        found = alerts.pipeline_runs(client, experiment.experiment_id) if experiment else []
        if len(found) < 2:
            raise ConfigError(
                f"experiment '{cfg.tracking.experiment}' at {cfg.tracking.uri} has "
                f"{len(found)} finished pipeline run(s); compare needs two (or pass two run ids)"
            )
        runs = [found[1].info.run_id, found[0].info.run_id]
    for run in runs:
        try:
            client.get_run(run)
        except mlflow.exceptions.MlflowException:
            raise ConfigError(
                f"run {run} is not in the tracking store {cfg.tracking.uri}"
            ) from None
    table = alerts.compare_runs(client, *runs)
    client.log_dict(runs[1], table, f"compare/{runs[0]}.json")
    return alerts.format_comparison(table)


def write_report(cfg, run_id: str, output: str | None) -> str:
    import mlflow

    from tasks.errors import ConfigError
    from tasks.report import build_report

    check_tracking(cfg.tracking.uri)
    client = mlflow.MlflowClient(cfg.tracking.uri)
    try:
        client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(f"run {run_id} is not in the tracking store {cfg.tracking.uri}") from None
    path = output or f"report-{run_id}.html"
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(build_report(client, run_id))
    os.replace(tmp, path)  # written whole or not at all
    return f"wrote {path}"


def print_summary(result: dict, tracking_uri: str, seconds: float) -> None:
    rows = result["stages"]
    print("\n stage      | status | seconds | key figure")
    print("------------|--------|---------|------------------------------")
    for r in rows:
        print(f" {r['stage']:<10} | {r['status']:<6} | {r['seconds']:>7.1f} | {r['figure']}")
    p = result["promotion"]
    print(
        f"\nTotal {seconds:.1f} s. Registered {p['model_name']} v{p['version']} as '{p['alias']}' ({p['why']})."
    )
    regression = result.get("regression") or {}
    if regression.get("regressed"):
        against = f"run {regression['previous']}" if regression["previous"] else "the champion"
        print(f"REGRESSION against {against}: {regression['why']}")
    elif regression.get("previous"):
        print(f"No regression against the previous run {regression['previous']}.")
    monitored = result.get("monitor")
    if monitored:
        print(("DRIFT: " if monitored["drifted"] else "") + result["drift"])
        for finding in monitored["findings"]:
            print(f"data contract ({finding['kind']}, {finding['action']}): {finding['line']}")
    print(f"Report: {result['report']}")
    from conf.schema import model_link, run_link

    print("Review it in the MLflow UI:")
    if not tracking_uri.startswith(("http://", "https://")):  # a store, no server: start one
        print(f"  mlflow ui --backend-store-uri {tracking_uri} --port 5000")
    print(f"  {run_link(tracking_uri, result['experiment_id'], result['parent_run_id'])}")
    print(f"  {model_link(tracking_uri, p['model_name'], p['version'])}")


def _die_with_parent() -> None:
    """In the server's process, before exec: Linux sends it SIGTERM when this CLI dies, even
    by SIGKILL, so a killed run leaves no server behind (atexit runs only on a clean exit)."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):  # not Linux: atexit still stops it
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def launch_prefect_server(env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """Prefect's API server (no UI) as a plain `uvicorn` process on a free local port, with
    `env` added to this process's environment; it dies with this process. Returns the
    process and its port; it answers at http://127.0.0.1:<port>/api/health once up."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_FINAL": "1", **env}
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]
    return subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent), port


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL if it has not exited within 10 s."""
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def prefect_answers(api: str, server: subprocess.Popen | None = None, limit: float = 90.0) -> bool:
    """Whether the Prefect API at `api` answers within `limit` seconds (False as soon as its
    `server` process, if given, has exited)."""
    import urllib.request

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and (server is None or server.poll() is None):
        try:
            urllib.request.urlopen(f"{api}/health", timeout=2).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def start_prefect_api() -> Future:
    """Prefect's temporary API server for this run, unless PREFECT_API_URL names one.

    Prefect would start the same server itself, but only once the flow is called, and after
    importing its whole server package in this process (~3 s on 2 cores) just to launch it.
    Started here as a plain `uvicorn` process, it boots while this process imports the flow
    and opens the MLflow store: a fully cached run takes about half the time. Returns a
    future that is done once the server answers (its result() raises if it never does):
    wait on it before the flow starts.
    """
    if os.environ.get("PREFECT_API_URL"):
        done: Future = Future()
        done.set_result(None)
        return done
    import fcntl

    # Two runs started at once on a fresh machine would both migrate Prefect's database
    # (alembic fails the second: "Online migration expected to match one row"): one server
    # boots at a time, the lock held from launch until it answers.
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()  # Prefect's default
    home.mkdir(parents=True, exist_ok=True)
    boot_lock = open(home / ".accelflow-server-boot.lock", "w")  # noqa: SIM115 (closed below)
    fcntl.flock(boot_lock, fcntl.LOCK_EX)
    server, port = launch_prefect_server({"PREFECT__SERVER_EPHEMERAL": "1"})

    # registered before Prefect's own exit handlers, so it runs after them (last in, first
    # out): Prefect sends its last logs and events while the server still listens
    atexit.register(stop_server, server)
    os.environ["PREFECT_API_URL"] = api = f"http://127.0.0.1:{port}/api"
    os.environ["ACCELFLOW_PREFECT_TEMPORARY"] = "1"  # no UI, gone after the run: link nothing
    print(
        f"Prefect: a temporary API server for this run at {api} (set PREFECT_API_URL to use yours)"
    )

    def wait_until_up() -> None:
        try:
            if prefect_answers(api, server):
                return
        finally:
            boot_lock.close()  # releases the lock
        raise RuntimeError(
            f"the temporary Prefect server did not answer at {api} (exit code "
            f"{server.poll()}); start one with `prefect server start` and set "
            "PREFECT_API_URL"
        )

    waiter = ThreadPoolExecutor(1, thread_name_prefix="prefect-server-wait")
    try:
        return waiter.submit(wait_until_up)
    finally:
        waiter.shutdown(wait=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_environment()
    from conf.schema import load_config
    from tasks.errors import UserError

    try:
        cfg = load_config(args.config, args.overrides, args.profile)
        if args.command == "validate":
            print(validate(cfg))
            return 0
        if args.command == "compare":
            print(compare(cfg, args.runs))
            return 0
        if args.command == "report":
            print(write_report(cfg, args.run, args.output))
            return 0
        if args.command == "score":
            return score(cfg, args)
        from tasks.readers import preflight
        from tasks.store import check_workdir

        check_workdir(cfg.workdir)  # fail in a second, before Prefect and Dask start
        check_tracking(cfg.tracking.uri)
        preflight(cfg.data)
        start = time.perf_counter()
        server_up = start_prefect_api()
        # while the Prefect API boots in its own process: import the flow and open the MLflow
        # store (a few seconds on 2 cores: most of a fully cached run)
        from flows.pipeline import pipeline
        from tasks.tracking import configure

        configure(cfg)
        server_up.result()
        result = pipeline(cfg)
        print_summary(result, cfg.tracking.uri, time.perf_counter() - start)
        return 0
    except UserError as exc:
        print(f"accelflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "accelflow: interrupted; completed stages are kept and the next run reuses them",
            file=sys.stderr,
        )
        return 130


def score(cfg, args: argparse.Namespace) -> int:
    check_tracking(cfg.tracking.uri)
    server_up = start_prefect_api()
    from flows.score import score as score_flow

    server_up.result()
    result = score_flow(args.source, args.out, args.model, args.id_column, cfg)
    drift = result["drift"]
    print(
        f"{result['rows']} rows scored with {result['model']} into {result['out']} in "
        f"{result['seconds']:.1f} s ({result['bad_rows']} bad row(s)"
        + (f", kept in {result['quarantine']}" if result["quarantine"] else "")
        + ")"
    )
    if drift:
        print(
            ("DRIFT in " + ", ".join(drift["drifted"]) if drift["drifted"] else "no drift")
            + f" against the model's training data (largest PSI {drift['max_psi']:.3f})"
        )
    print(f"MLflow run: {result['run_id']}")
    return 0


def console_main() -> None:
    """The `accelflow` command. After every exit handler has run (Prefect's last logs and
    events, the temporary server's stop, registered later, so run earlier), the process
    ends without Python's finalization: it tears torch, MLflow, Prefect and Dask down
    module by module, 1.4 s on 2 cores with nothing left to save, a fifth of a cached run.
    Only for the command: `main()` called in-process leaves the interpreter alone."""
    exit_code: list[int] = []

    def end_now() -> None:
        if not exit_code:  # an unexpected error: let Python finish as usual
            return
        import logging

        logging.shutdown()  # registered before this handler, so it would not run after it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code[0])

    atexit.register(end_now)  # first registered, last run
    exit_code.append(main())
    sys.exit(exit_code[0])


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    console_main()
