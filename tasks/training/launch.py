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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.errors import TrainingError
from tasks.progress import Progress

EpochHook = Callable[[dict[str, Any]], None]  # rank 0's row for one epoch

if TYPE_CHECKING:  # the launcher itself needs no pydantic: a bare GPU box can run it
    from conf.schema import TrainConfig


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


def epoch_row(line: str) -> dict[str, Any] | None:
    """Rank 0 prints one JSON row per epoch (see `Trainer.log_epoch`); anything else is log."""
    if not line.startswith('{"epoch"'):
        return None
    try:
        return json.loads(line)
    except ValueError:
        return None


def epoch_figures(row: dict[str, Any], prefix: str) -> str:
    shown = [
        ("loss", row.get(f"{prefix}/loss"), ".4f"),
        ("val loss", row.get("val/loss"), ".4f"),
        ("val acc", row.get("val/accuracy"), ".4f"),
        ("samples/s", row.get(f"{prefix}/samples_per_second"), ",.0f"),
        ("sparsity", row.get(f"{prefix}/sparsity"), ".1%"),
    ]
    return ", ".join(f"{name} {value:{fmt}}" for name, value, fmt in shown if value is not None)


def torchrun_command(
    spec_path: Path,
    nproc: int,
    nnodes: int = 1,
    endpoint: str | None = None,
    rdzv_id: str = "accelflow",
    max_restarts: int = 0,
) -> list[str]:
    """One node's launcher command: standalone on one node, a c10d rendezvous across many."""
    if nnodes == 1:
        where = ["--standalone", "--nnodes=1"]
    else:
        where = [
            f"--nnodes={nnodes}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={endpoint}",
            f"--rdzv_id={rdzv_id}",
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *where,
        f"--nproc_per_node={nproc}",
        # a worker that dies (OOM-killed, a lost node) restarts the group from the last
        # checkpoint, up to this many times, instead of failing the run
        f"--max-restarts={max_restarts}",
        "-m",
        "tasks.training.worker",
        str(spec_path),
    ]


def launch(
    spec: dict[str, Any],
    world_size: int,
    workdir: Path,
    on_epoch: EpochHook | None = None,
    nnodes: int = 1,
    endpoint: str | None = None,
    max_restarts: int = 0,
) -> dict[str, Any]:
    """Write the spec, run `torch.distributed.run`, return the worker's result.json;
    `on_epoch` gets rank 0's row for each epoch as it arrives (to log it live).

    With `nnodes > 1` this node joins a c10d rendezvous at `endpoint` and waits there for
    the other nodes, which run the command this function prints (the spec, workdir and
    outputs must be on storage every node sees). One process on one node needs no
    rendezvous: the worker is started directly (torchrun's own process would cost another
    interpreter and torch import, about 2 s a launch) and restarted here, as torchrun would.
    """
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
    single = nnodes == 1 and world_size == 1
    if single:
        command = [sys.executable, "-m", "tasks.training.worker", str(spec_path)]
        env |= {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    else:
        command = torchrun_command(
            spec_path, world_size, nnodes, endpoint, workdir.name.lstrip("."), max_restarts
        )
    if nnodes > 1:
        others = " ".join(["torchrun", *command[3:]])
        print(
            f"waiting for {nnodes - 1} more node(s); on each of them run:\n  {others}", flush=True
        )
    log_path = workdir / "train.log"
    stage = spec.get("metric_prefix", "train")
    total = sum(phase["epochs"] for phase in spec["phases"])
    with open(log_path, "w") as log, Progress(stage, "epochs", total) as progress:
        returncode = 0
        for attempt in range(1 + (max_restarts if single else 0)):
            if attempt:  # the worker resumes from its last checkpoint
                log.write(f"worker failed (exitcode: {returncode}); restart {attempt}\n")
            returncode = run_worker(
                command,
                {**env, "TORCHELASTIC_RESTART_COUNT": str(attempt)},
                log,
                progress,
                on_epoch,
                stage,
            )
            if returncode == 0:
                break
    if returncode != 0:
        raise TrainingError(
            f"training workers exited with {returncode}: {root_cause(log_path.read_text())} "
            f"(full log: {log_path})"
        )
    return json.loads((Path(spec["out_dir"]) / "result.json").read_text())


def run_worker(command: list[str], env: dict[str, str], log, progress, on_epoch, stage) -> int:
    """Run the launcher (or the one worker) to its end: the whole log to `log`, rank 0's
    epoch rows (figures named by `stage`) to `progress` and `on_epoch`. Its exit status."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=os.getcwd(),
        text=True,
        bufsize=1,
    )
    for line in proc.stdout:  # the whole log to the file; rank 0's epoch rows to progress
        log.write(line)
        log.flush()  # `tail -f train.log` follows a long run
        row = epoch_row(line)
        if row is not None:
            progress.step(row["epoch"] + 1, epoch_figures(row, stage))
            if on_epoch is not None:
                on_epoch(row)
    return proc.wait()
