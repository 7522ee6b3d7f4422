"""What every benchmark script shares: the project on the import path, the offline and
quiet environment (tasks/tracking.py's, the one list), the `--json` option, the JSON out.

    from common import ROOT, accelflow_run, benchmark_args, best_p50_ms, write_json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tasks.tracking import quiet_environment  # noqa: E402  (after the path is set)

quiet_environment()


def benchmark_args(doc: str | None, name: str) -> argparse.ArgumentParser:
    """A parser titled by the script's docstring, with `--json` defaulting to
    benchmarks/results/<name>.json ($OUT/<name>.json on a device machine)."""
    default = (
        Path(os.environ["OUT"]) / f"{name}.json"
        if os.environ.get("OUT")
        else RESULTS / f"{name}.json"
    )
    parser = argparse.ArgumentParser(description=(doc or name).strip().split("\n")[0])
    parser.add_argument(
        "--json", type=Path, default=default, help=f"where to write (default {default})"
    )
    return parser


def accelflow_run(sets: list[str]):
    """One `accelflow run` with these `--set` overrides, in the project root, progress bars
    off, its output captured (a CompletedProcess; the caller checks the exit status)."""
    import subprocess

    argv = [str(ROOT / ".venv" / "bin" / "accelflow"), "run"]
    argv += [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "ACCELFLOW_PROGRESS": "off"}
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, check=False)


def best_p50_ms(calls: dict, repeats: int, rounds: int) -> dict:
    """Each call's p50 in ms by the stages' own timing loop (`timed_ms`, one thread), the
    best of `rounds` alternating rounds: a slow spell of this shared machine hits every
    contender alike, so their ratios hold within one run."""
    from tasks.served.pyfunc import timed_ms

    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for key, call in calls.items():
            best[key] = min(best[key], timed_ms(call, repeats)[0])
    return best


def write_json(path: Path | str, result: Any) -> None:
    """The results as JSON (the folder made if missing), and a line saying where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {path}")
