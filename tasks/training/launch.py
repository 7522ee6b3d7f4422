"""Start the DDP worker with torch's elastic launcher and wait for it.

The worker runs in its own processes (not inside the Prefect task's process), so a crash
or an OOM in training cannot take the orchestrator down, and the same command works by
hand or on many nodes with torchrun.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from conf.schema import TrainConfig


class TrainingError(RuntimeError):
    """The workers failed; the message carries the tail of their log."""


def resolve_world_size(cfg: TrainConfig) -> int:
    if cfg.world_size != "auto":
        return int(cfg.world_size)
    import torch

    return torch.cuda.device_count() or 2


def root_cause(log: str) -> str:
    """The workers' own exception line (first unindented line after a traceback header),
    not torchrun's ChildFailedError summary."""
    in_traceback = False
    for raw in log.splitlines():
        line = re.sub(r"^\[rank\d+\]: ", "", raw)
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():
            return line[:500]
    return "see the log"


def launch(spec: dict[str, Any], world_size: int, workdir: Path, run_id: str | None = None) -> dict[str, Any]:
    """Write the spec, run `torch.distributed.run`, return the worker's result.json."""
    workdir.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    spec = {**spec, "threads_per_process": max(1, cpus // world_size)}
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(spec["threads_per_process"]),  # no oversubscription of cores
    }
    if run_id:
        env["MLFLOW_RUN_ID"] = run_id  # only rank 0 reads it
    else:
        env.pop("MLFLOW_RUN_ID", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
        f"--nproc_per_node={world_size}", "-m", "tasks.training.worker", str(spec_path),
    ]
    log_path = workdir / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
    if proc.returncode != 0:
        raise TrainingError(
            f"training workers exited with {proc.returncode}: {root_cause(log_path.read_text())} "
            f"(full log: {log_path})"
        )
    return json.loads((Path(spec["out_dir"]) / "result.json").read_text())
