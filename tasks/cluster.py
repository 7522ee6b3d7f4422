"""One place that decides where Dask work runs: a scheduler from config, or a LocalCluster."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from conf.schema import DaskConfig
from tasks.errors import ConfigError, DataError

# LocalClusters shared by the stages of one flow run (see `one_cluster_per_run`), by config
_shared: dict[tuple, object] | None = None
_shared_lock = threading.Lock()


@contextlib.contextmanager
def one_cluster_per_run() -> Iterator[None]:
    """Within this block, stages that need a LocalCluster share one, started by the first
    that asks (a fully cached run starts none) and closed at the end. Saves ~2 s for every
    data stage after the first."""
    global _shared
    _shared = {}
    try:
        yield
    finally:
        with _shared_lock:
            clusters, _shared = list(_shared.values()), None
        for cluster in clusters:
            cluster.close()


@contextlib.contextmanager
def dask_client(cfg: DaskConfig) -> Iterator:
    """A distributed Client for the duration of one stage.

    With `dask.address` set, connect to that scheduler (its workers must see the workdir
    and the source at the same paths: a shared filesystem). Otherwise use this flow run's
    LocalCluster, or start one of worker processes (~2 s on 2 cores) and close it
    afterwards, so no stray processes outlive the stage.
    """
    from dask.distributed import Client

    # Cluster start/stop is logged at INFO (with tracebacks for closed comms at shutdown);
    # under Prefect's log handler that buries the stage logs. Warnings still come through.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    with workers_that_keep_dying_named(cfg):
        if cfg.address:
            with Client(cfg.address, timeout="30s") as client, memory_handed_back(client):
                yield client
            return
        with _shared_lock:
            shared = _shared
            if shared is not None:
                key = (cfg.n_workers, cfg.threads_per_worker, cfg.memory_limit)
                if key not in shared:
                    shared[key] = local_cluster(cfg)
                cluster = shared[key]
        if shared is not None:
            with Client(cluster) as client, memory_handed_back(client):
                yield client
            return
        with local_cluster(cfg) as cluster, Client(cluster) as client:
            yield client


@contextlib.contextmanager
def memory_handed_back(client) -> Iterator[None]:
    """At the end of a stage, its workers give back what its data tasks kept
    (`hand_back_memory`): the next stage's tasks (a tuning trial's torch, say) have the
    whole limit again."""
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # a worker gone already: nothing to give back
            client.run(hand_back_memory, True)


@contextlib.contextmanager
def workers_that_keep_dying_named(cfg: DaskConfig) -> Iterator[None]:
    """Dask gives up on a task after its workers died under it a few times (KilledWorker,
    `distributed.scheduler.allowed-failures`); say so in one message that names the likely
    cause and the key, instead of a scheduler traceback."""
    from distributed import KilledWorker

    try:
        yield
    except KilledWorker as e:
        where = f"the cluster at {cfg.address}" if cfg.address else "the LocalCluster"
        raise ConfigError(
            f"Dask workers keep dying while running {e.task!r} on {where}: most often a "
            f"worker exceeds its memory cap (dask.memory_limit={cfg.memory_limit}); raise "
            "dask.memory_limit, or use fewer dask.n_workers with more memory each"
        ) from e


# glibc's malloc in the LocalCluster's workers (docker/compose.yaml's too) backs its big
# buffers with transparent huge pages where the kernel gives them on request (THP mode
# "madvise"; numpy does so for its own arrays). A task's thread arena hands a freed big
# buffer back at once, so each CSV block faulted its parser's ~100 MB in afresh, 4 KiB at a
# time: 35,000 page faults a 41 MB block, 9,000-10,000 with huge pages (ingest 1.035x
# faster on average, 0.93-1.12x round by round; tuning trials ~7% faster: benchmarks/
# README.md, run J). One arena faulted less still, but slowed the tuning trials (runs I, J).
# Your own GLIBC_TUNABLES wins.
HUGE_PAGES = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def local_cluster(cfg: DaskConfig):
    import dask
    from dask.distributed import LocalCluster

    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 to hand memory back
    # sooner. Any explicit value switches off glibc's adaptive mmap threshold, so every
    # column buffer is mmap'd and page-faulted afresh: measured here, it makes a Parquet
    # chunk write 1.8x slower. Our tasks hold one bounded partition each (and ingest's hand
    # their memory back themselves), so keep glibc's default in the LocalCluster (an
    # external cluster keeps its own settings).
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    environ.update(HUGE_PAGES)
    # No pausing at 80% of the limit: a paused worker waits for its memory to drop, but
    # what a worker holds between our tasks is its own resting size (the interpreter, the
    # imported stack), which no wait frees; with small workers the stage stalled for good.
    # Unpaused, a worker that really outgrows its cap is restarted at 95% and the stage
    # fails with `workers_that_keep_dying_named`'s message instead of hanging.
    settings = {
        "distributed.nanny.pre-spawn-environ": environ,
        "distributed.worker.memory.pause": False,
    }
    driver_had = {key: os.environ.get(key) for key in HUGE_PAGES}
    try:
        with dask.config.set(settings):
            return LocalCluster(
                n_workers=cfg.n_workers,
                threads_per_worker=cfg.threads_per_worker,
                memory_limit=cfg.memory_limit,
                processes=True,
                dashboard_address=":0",  # any free port: two runs on one machine must not collide
                # logging.CRITICAL: keep worker chatter out of the run log, shutdown races too
                # (a heartbeat in flight when the scheduler closes logs an ERROR traceback, seen
                # in a run that failed in train); a task's own error reaches the driver anyway
                silence_logs=50,
            )
    finally:
        # The nannies live in this process and write the workers' environment into its own
        # (distributed/nanny.py): what it starts later (training's processes) keeps its
        # malloc. A worker restarted at its memory cap writes it again (and Dask's thread
        # counts).
        for key, value in driver_had.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def peak_memory_mib() -> float:
    """This process's peak resident memory (VmHWM, Linux). Run it on workers with
    `client.run(peak_memory_mib)`. Not ru_maxrss: that carries the parent's peak across
    fork+exec, so a worker spawned by a big process would report the parent's memory."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class BadInput:
    """A DataError met inside a Dask task, returned rather than raised: a raised one makes
    every worker log a traceback ("Compute Failed") for what is a message about the user's
    data. `checked` raises it again in the driver."""

    message: str


def checked(result):
    """A task's result, or the DataError it met."""
    if isinstance(result, BadInput):
        raise DataError(result.message)
    return result


def data_task(task: Callable) -> Callable:
    """How our data tasks run on Dask workers: bad input comes back as `BadInput`, and freed
    memory goes back to the OS when the worker holds too much of its limit
    (`hand_back_memory`)."""

    @functools.wraps(task)
    def run(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except DataError as exc:
            return BadInput(str(exc))
        finally:  # no gc.collect(): it cost 35 ms a task here, and a block's frames hold no cycles
            hand_back_memory()

    return run


# A worker keeps the memory its last task freed while it holds less than this share of its
# limit (Dask restarts it at 95%; `tables.blocks.block_size` sizes a task to stay under 60%)
HAND_BACK_ABOVE = 0.7


def hand_back_memory(always: bool = False) -> bool:
    """Give freed memory back to the OS, where a worker needs it to stay under its limit.

    pandas and Arrow free a block's buffers, but glibc and Arrow's allocator keep the pages;
    Dask counts them against the worker's memory limit. Measured here: without handing them
    back, two workers of 400 MiB paused for good after a few 16 MB CSV blocks. But handing
    back costs twice: glibc's trim walks the heap (35 ms a call here), and the next task
    faults the pages in afresh. On 41 MB CSV blocks, one 1 GiB worker's scan and write took
    0.87-0.94 s a block, 0.36-0.37 s of it in the kernel (79,000 page faults), against
    0.79-0.82 s, 0.24 s and 38,000-49,000 with the memory kept (`benchmarks/ingest_blocks.py`).
    So the memory is kept while the worker holds less than
    `HAND_BACK_ABOVE` of its limit, until the stage ends (`memory_handed_back`); outside a
    worker, without a limit or `always`, handed back now. Returns whether it handed back.
    """
    limit = 0
    with contextlib.suppress(ImportError, ValueError, AttributeError):
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit or 0
    if limit and not always:
        import psutil

        if psutil.Process().memory_info().rss < HAND_BACK_ABOVE * limit:
            return False
    with contextlib.suppress(ImportError):
        import pyarrow

        pyarrow.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return True


def map_shared(client, func: Callable, *iterables, **shared) -> list:
    """`client.map(func, *iterables)` with `shared` passed to every call inside the function:
    Dask turns a large keyword argument of `map` (a 3,000-column table's names) into a graph
    task keyed by the keyword's own name, which its scheduler then fails to order (TypeError,
    then "No valid workers found")."""
    return client.map(functools.partial(func, **shared), *iterables, pure=False)
