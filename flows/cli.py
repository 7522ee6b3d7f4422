"""`accelflow` command line: run the pipeline or check a config and its data.

    accelflow run                                   # conf/pipeline.yaml, embedded defaults
    accelflow run -c my.yaml --set train.epochs=3 --set data.source=/data/x.csv
    accelflow run --profile cluster                 # Dask/MLflow endpoints from the environment
    accelflow validate --set data.label=target      # config + data checks, no stages run

User errors (bad config, bad data, a failed training run) print one paragraph that names
the key, file or column and exit 2; only unexpected errors show a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from tasks.tracking import check_tracking, quiet_environment


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="accelflow", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "run the whole pipeline"),
        ("validate", "check config and data only"),
    ):
        p = sub.add_parser(name, help=text)
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
    print("Review it in the MLflow UI:")
    print(f"  mlflow ui --backend-store-uri {tracking_uri} --port 5000")
    print(
        f"  http://127.0.0.1:5000/#/experiments/{result['experiment_id']}/runs/{result['parent_run_id']}"
    )


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
        from tasks.readers import preflight
        from tasks.stage import check_workdir

        check_workdir(cfg.workdir)  # fail in a second, before Prefect and Dask start
        check_tracking(cfg.tracking.uri)
        preflight(cfg.data)
        from flows.pipeline import pipeline

        start = time.perf_counter()
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


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
