"""Where a run's seconds go: the default pipeline cold, then fully cached, side by side.

    .venv/bin/python benchmarks/cached_run_benchmark.py [--json PATH]

Runs `accelflow run` twice on a fresh workdir and MLflow store (the default config: full
Fashion-MNIST): the first builds every stage, the second finds every stage cached. For the
cached run it splits the wall time into phases read off the run's own log lines: start-up
(Python, config, checks) until the temporary Prefect API is launched; waiting for that
server (the flow's import and the MLflow store open overlap it); the flow itself; and exit
(Prefect's last logs and events sent, the server stopped). It also times, alone, the two
things the start-up overlaps: importing the flow's stack and booting Prefect's server.
Prints a table and writes JSON.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from common import ROOT, benchmark_args, write_json  # noqa: E402  (sets the path)

from tasks.stages import NAMES

BIN = Path(sys.executable).parent
STAMP = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \| \w+\s+\| (.*)$")


def timed_run(workdir: Path, store: Path) -> dict:
    """One `accelflow run`; the wall time and the offsets of its log lines from the start."""
    argv = [
        str(BIN / "accelflow"),
        "run",
        "--set",
        f"workdir={workdir}",
        "--set",
        f"tracking.uri=sqlite:///{store}",
    ]
    started, t0 = datetime.now(), time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    lines = []
    for line in (out.stdout + out.stderr).splitlines():
        m = STAMP.match(line)
        if m:
            at = datetime.combine(started.date(), datetime.strptime(m[1], "%H:%M:%S.%f").time())
            lines.append(((at - started).total_seconds(), m[2]))
    return {"wall": wall, "lines": lines, "stdout": out.stdout}


def first(lines: list[tuple[float, str]], pattern: str) -> float:
    return next(t for t, text in lines if re.search(pattern, text))


def phases(run: dict) -> dict[str, float]:
    """Cached-run phases from its log: flow start (server up), last stage, flow end."""
    lines = run["lines"]
    begin = first(lines, r"Beginning flow run")
    stages_done = first(lines, r"Task run 'evaluate-.*Finished")
    flow_done = first(lines, r"Flow run .* Finished in state Completed")
    return {
        "start-up and waiting for the Prefect API": begin,
        "flow: config, MLflow parent run, seven cached stages": stages_done - begin,
        "flow: headline metrics, closing the runs": flow_done - stages_done,
        "exit: last logs/events sent, server stopped": run["wall"] - flow_done,
    }


def import_seconds() -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import flows.pipeline, mlflow, tasks.steps"], cwd=ROOT, check=True
    )
    return time.perf_counter() - t0


def server_boot_seconds() -> float:
    """Prefect's temporary API alone: launch to first healthy answer, as the CLI does it
    (the server stops when this process exits)."""
    from flows.cli import start_prefect_api

    os.environ.pop("PREFECT_API_URL", None)
    t0 = time.perf_counter()
    start_prefect_api().result()
    return time.perf_counter() - t0


def main() -> None:
    parser = benchmark_args(__doc__, "cached_run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="accelflow-bench-") as tmp:
        cold = timed_run(Path(tmp) / "work", Path(tmp) / "mlflow.db")
        cached = timed_run(Path(tmp) / "work", Path(tmp) / "mlflow.db")
    stages = len(NAMES)
    assert cached["stdout"].count("| cached |") == stages, "the second run was not fully cached"
    parts = phases(cached)
    alone = {
        "importing the flow's stack (overlapped)": import_seconds(),
        "Prefect API boot alone (overlapped)": server_boot_seconds(),
    }
    print(f"\n{'what':<54} {'seconds':>8}")
    print("-" * 63)
    print(f"{'cold run (every stage built), wall':<54} {cold['wall']:>8.1f}")
    print(f"{'fully cached run, wall':<54} {cached['wall']:>8.1f}")
    print(f"{'cached / cold':<54} {cached['wall'] / cold['wall']:>8.1%}")
    print("\nthe cached run, phase by phase (from its log lines):")
    for name, seconds in {**parts, **alone}.items():
        print(f"  {name:<52} {seconds:>8.2f}")
    result = {
        "cold_seconds": cold["wall"],
        "cached_seconds": cached["wall"],
        "ratio": cached["wall"] / cold["wall"],
        "cached_phases": parts,
        "alone": alone,
        "cpus": os.cpu_count(),
    }
    write_json(args.json, result)


if __name__ == "__main__":
    main()
