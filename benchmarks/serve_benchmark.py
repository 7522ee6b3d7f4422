"""The registered champion behind MLflow's scoring server, under concurrent clients.

    make run                                                    # registers a champion
    .venv/bin/python benchmarks/serve_benchmark.py              # 6 loads x 60 s, ~7 min
    .venv/bin/python benchmarks/serve_benchmark.py --seconds 10 --workers 2

Starts what `make serve-model` starts (`mlflow models serve` on the registry's `champion`,
127.0.0.1, `--workers` uvicorn workers), then drives it with an asyncio HTTP client (httpx)
at 1, 8 and 32 concurrent clients, each sending one raw row or a 256-row batch
(`dataframe_split` JSON) back to back for `--seconds`. Every answer is checked against the
pyfunc's own predictions for the same rows in this process. Client and server share the
machine's cores, as they would on one box. Prints p50/p99 latency, requests/s, rows/s and
errors per load; writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, benchmark_args, write_json  # noqa: E402  (sets the path)

CLIENTS = (1, 8, 32)
BATCHES = (1, 256)


async def drive(url: str, body: bytes, expected: list, clients: int, seconds: float) -> dict:
    """`clients` loops posting `body` until the time is up; latencies, errors, wrong answers."""
    import httpx

    latencies: list[float] = []
    errors = wrong = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors, wrong
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            try:
                reply = await http.post(
                    url, content=body, headers={"Content-Type": "application/json"}
                )
            except httpx.HTTPError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - began)
            if reply.status_code != 200:
                errors += 1
            elif reply.json()["predictions"] != expected:
                wrong += 1

    began = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    elapsed = time.perf_counter() - began
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "requests_per_s": len(latencies) / elapsed,
        "errors": errors,
        "wrong_answers": wrong,
    }


def main() -> None:
    parser = benchmark_args(__doc__, "serve")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", default="models:/accelflow-classifier@champion")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlflow.db'}"),
    )
    args = parser.parse_args()

    import mlflow

    from flows.serve import free_port, model_server, stop

    mlflow.set_tracking_uri(args.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(args.model)
    except mlflow.exceptions.MlflowException as exc:
        sys.exit(f"{args.model} not found in {args.tracking_uri} ({exc}): run `make run` first")
    example = model.input_example
    rows = example.iloc[np.resize(np.arange(len(example)), 256)].reset_index(drop=True)
    runtime = model.unwrap_python_model().predictor.runtime
    port = free_port()
    results = {"model": args.model, "runtime": runtime, "workers": args.workers, "loads": []}
    print(
        f"{args.model} ({runtime}) behind `mlflow models serve -w {args.workers}`, "
        f"{len(example.columns)} raw columns, {args.seconds:.0f} s per load"
    )
    print("| clients | rows/request | p50 ms | p99 ms | requests/s | rows/s | errors | wrong |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="accelflow-serve-bench-") as tmp:
        server = model_server(Path(tmp), port, args.model, args.tracking_uri, args.workers)
        try:
            url = f"http://127.0.0.1:{port}/invocations"
            for batch in BATCHES:
                part = rows.iloc[:batch]
                body = json.dumps({"dataframe_split": part.to_dict(orient="split")}).encode()
                expected = json.loads(json.dumps(np.asarray(model.predict(part)).tolist()))
                for clients in CLIENTS:
                    load = asyncio.run(drive(url, body, expected, clients, args.seconds))
                    load |= {"clients": clients, "rows_per_request": batch}
                    results["loads"].append(load)
                    print(
                        f"| {clients} | {batch} | {load['p50_ms']:.2f} | {load['p99_ms']:.2f} "
                        f"| {load['requests_per_s']:,.0f} | {load['requests_per_s'] * batch:,.0f} "
                        f"| {load['errors']} | {load['wrong_answers']} |",
                        flush=True,
                    )
        finally:
            stop(server)
    write_json(args.json, results)


if __name__ == "__main__":
    sys.exit(main())
