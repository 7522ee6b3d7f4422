"""How a training rank gets its batches: the whole split resident in memory (on the GPU
when there is one) when it fits, or streamed row group by row group when it does not.

Resident is the fast path and the default whenever the split fits under the threshold
(`train.resident_max_gb`; auto: half of the memory available to each process, or half of
the GPU's free memory). Streaming reads only this rank's share of the Parquet row groups,
in an order reshuffled every epoch, shuffles rows within a buffer (the row group being read
plus the rows left over from the last), and reads ahead on a background thread (into
pinned memory on a GPU), so memory stays bounded by a few row groups whatever the split's
size. Every rank takes the same number of steps per epoch (DDP's collectives need it).

Imports torch, numpy and pyarrow only (the DDP worker's rule).
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def table_arrays(table, features: list[str], label: str) -> tuple[np.ndarray, np.ndarray]:
    X = np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in features])
    # the labels copied (8 bytes a row): Arrow's own buffer is read-only, and torch warns on
    # every streamed read that it cannot guard a tensor over one
    y = np.array(table.column(label).to_numpy(zero_copy_only=False), dtype=np.int64)
    return X.astype(np.float32, copy=False), y


def load_split(files: list[str], features: list[str], label: str) -> Batch:
    parts = [
        table_arrays(pq.read_table(f, columns=[*features, label], memory_map=True), features, label)
        for f in files
    ]
    X = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(X), torch.from_numpy(y)


def load_rows(files: list[str], features: list[str], label: str, keep: np.ndarray) -> Batch:
    """Only the rows at `keep` (sorted indices over the files in order), read a row group at
    a time: a tuning trial's subsample never holds the whole split."""
    parts, start = [], 0
    for f in files:
        parquet = pq.ParquetFile(f, memory_map=True)
        for group in range(parquet.num_row_groups):
            n = parquet.metadata.row_group(group).num_rows
            inside = keep[(keep >= start) & (keep < start + n)] - start
            if len(inside):
                X, y = table_arrays(
                    parquet.read_row_group(group, columns=[*features, label]), features, label
                )
                parts.append((X[inside], y[inside]))
            start += n
    X = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, len(features)), np.float32)
    y = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    return torch.from_numpy(X), torch.from_numpy(y)


def split_rows(files: list[str]) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def split_bytes(files: list[str], n_features: int) -> int:
    """What the split takes in memory as float32 features and int64 labels (from metadata)."""
    return split_rows(files) * (4 * n_features + 8)


def memory_budget_bytes(device: torch.device, processes_here: int) -> int:
    """auto: half the GPU's free memory, or half the memory available to each process."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with open("/proc/meminfo") as info:  # MemAvailable counts reclaimable cache, unlike AVPHYS
        for line in info:
            if line.startswith("MemAvailable"):
                available = int(line.split()[1]) * 1024
    return available // 2 // max(processes_here, 1)


@dataclass
class Shard:
    rank: int
    world: int
    device: torch.device
    seed: int


def epoch_seed(shard: Shard, epoch: int) -> int:
    return shard.seed * 100_003 + epoch


# A tuning study's splits, kept in the Dask worker's process from one trial to the next
# (spec["keep_resident"]): every trial of a study reads the same rows (one seed), and a trial
# the pruner stops after its first epoch would otherwise spend much of its time reading
# them. At most a study's two (train, val); tasks.tune releases them when the study ends.
_kept: dict[tuple, Batch] = {}
_kept_lock = threading.Lock()  # a worker with two threads runs two trials at once


def kept(key: tuple, load: Callable[[], Batch]) -> Batch:
    with _kept_lock:
        if key not in _kept:
            if len(_kept) >= 2:
                _kept.pop(next(iter(_kept)))  # the oldest: another study's
            _kept[key] = load()
        return _kept[key]


def forget_kept() -> int:
    """Release the kept splits (run on every worker when a study ends); how many there were."""
    with _kept_lock:
        n = len(_kept)
        _kept.clear()
    return n


class ResidentSplit:
    """The whole split as two tensors on the device, or a tuning trial's share of it: a
    seeded subset of `rows`, of which each epoch trains on the next `epoch_rows` (so a trial
    that survives the pruner's rungs sees more of the data with every epoch, not the same
    rows again)."""

    mode = "resident"
    class_draws: torch.Tensor | None = None  # train.sampler: balanced (open_split sets it)

    def __init__(
        self,
        files,
        features,
        label,
        device,
        rows: int | None = None,
        seed: int = 0,
        epoch_rows: int | None = None,
        keep: bool = False,
    ):
        total = split_rows(files)
        subset = rows if rows is not None and total > rows else None  # None: the whole split

        def load() -> Batch:
            if subset is not None:  # a tuning trial's budget: a seeded subset, read row
                # group by row group (in file order), never the whole split
                chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
                X, y = load_rows(files, features, label, np.sort(chosen[:subset].numpy()))
            else:
                X, y = load_split(files, features, label)
            return X.to(device), y.to(device)

        # trials of different lengths (tune.min_steps) ask for different row counts: every
        # count beyond the split is the whole split, one entry
        key = (tuple(files), tuple(features), label, subset, seed, str(device))
        self.X, self.y = kept(key, load) if keep else load()
        self.epoch_rows = epoch_rows if epoch_rows and epoch_rows < len(self.X) else None
        # the epochs' windows walk one seeded permutation: read in file order, the rows
        # would otherwise come in the source's order (often sorted by class or date)
        g = torch.Generator().manual_seed(seed)
        self.walk = torch.randperm(len(self.X), generator=g) if self.epoch_rows else None

    def __len__(self) -> int:
        return len(self.X)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.X.mean(dim=0), self.X.std(dim=0)

    def epoch_window(self, epoch: int) -> torch.Tensor | None:
        """The rows epoch `epoch` trains on (None: all of them): the next `epoch_rows` of
        the walk, wrapping round once every row has had its turn."""
        if self.walk is None:
            return None
        start = epoch * self.epoch_rows % len(self.X)
        return self.walk.roll(-start)[: self.epoch_rows]

    def order(self, shard: Shard, epoch: int, shuffle: bool) -> torch.Tensor:
        """This rank's rows: a seeded shuffle, padded so every rank takes as many steps."""
        n = len(self.X)
        if not shuffle:
            return torch.arange(n)[shard.rank :: shard.world].to(self.X.device)
        g = torch.Generator().manual_seed(epoch_seed(shard, epoch))
        window = self.epoch_window(epoch)
        if window is not None:
            n = len(window)
        if self.class_draws is not None:  # the same draw on every rank; each takes its share
            y = self.y.cpu() if window is None else self.y.cpu()[window]
            order = drawn(y, self.class_draws, n + (-n) % shard.world, g)
        else:
            order = torch.randperm(n, generator=g)
            if n % shard.world:
                order = torch.cat([order, order[: shard.world - n % shard.world]])
        if window is not None:
            order = window[order]
        return order[shard.rank :: shard.world].to(self.X.device)

    def steps(self, shard: Shard, batch: int) -> int:
        n = self.epoch_rows or len(self.X)
        return math.ceil(math.ceil(n / shard.world) / batch)

    def batches(
        self, shard: Shard, epoch: int, batch: int, shuffle: bool = True
    ) -> Iterator[Batch]:
        index = self.order(shard, epoch, shuffle)
        for i in range(0, len(index), batch):
            rows = index[i : i + batch]  # a gather from memory (on a GPU only queued here)
            yield self.X[rows], self.y[rows]


class StreamedSplit:
    """The split read row group by row group: only this rank's share, reshuffled each epoch."""

    mode = "streaming"
    class_draws: torch.Tensor | None = None

    def __init__(self, files, features, label, device):
        self.features, self.label, self.device = features, label, device
        # each file's footer, kept; the file itself is opened for each read: an open
        # ParquetFile keeps what it has read in Arrow's memory pool, so a rank streaming
        # 2 GiB peaked at 1,394 MiB (731 MiB of it Arrow's) against 727 MiB this way, flat
        # whatever the split's size, and faster (10.7 vs 14.7 s an epoch)
        self.metadata = {f: pq.read_metadata(f) for f in files}
        self.groups = [
            (f, g, meta.row_group(g).num_rows)
            for f, meta in self.metadata.items()
            for g in range(meta.num_row_groups)
        ]
        self.rows = sum(n for _, _, n in self.groups)

    def __len__(self) -> int:
        return self.rows

    def read(self, group: tuple[str, int, int]) -> Batch:
        path, index, _ = group
        # one thread: Arrow's pool threads would each keep an allocator arena of their own
        table = pq.ParquetFile(path, metadata=self.metadata[path]).read_row_group(
            index, columns=[*self.features, self.label], use_threads=False
        )
        X, y = table_arrays(table, self.features, self.label)
        X, y = torch.from_numpy(X), torch.from_numpy(y)
        if self.device.type == "cuda":  # pinned: the copy to the GPU can overlap compute
            X, y = X.pin_memory(), y.pin_memory()
        return X, y

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (unbiased) std in one pass, in float64."""
        n, total, squares = 0, 0.0, 0.0
        for group in self.groups:
            X = self.read(group)[0].double()
            n, total, squares = n + len(X), total + X.sum(0), squares + (X * X).sum(0)
        mean = total / n
        var = (squares - n * mean * mean) / max(n - 1, 1)
        return mean.float().to(self.device), var.clamp_min(0).sqrt().float().to(self.device)

    def mine(self, shard: Shard, epoch: int, shuffle: bool) -> list[tuple[str, int, int]]:
        groups = self.groups
        if shuffle:
            g = torch.Generator().manual_seed(epoch_seed(shard, epoch))
            groups = [groups[i] for i in torch.randperm(len(groups), generator=g).tolist()]
        # fewer groups than ranks: every rank reads them all rather than none
        return groups[shard.rank :: shard.world] or groups

    def steps(self, shard: Shard, batch: int) -> int:
        return max(1, self.rows // (shard.world * batch))

    def read_ahead(self, groups: list, stop: threading.Event) -> Iterator[Batch]:
        """The groups' arrays, read on a background thread two groups ahead."""
        ahead: queue.Queue = queue.Queue(maxsize=2)

        def hand_over(item) -> bool:
            """Queue `item` unless the consumer has stopped (it may never take another)."""
            while not stop.is_set():
                try:
                    ahead.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def reader():
            try:
                for group in groups:
                    if not hand_over(self.read(group)):
                        return
                hand_over(None)
            except BaseException as exc:  # surface a read error in the training thread
                hand_over(exc)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        try:
            while (item := ahead.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()

    def batches(
        self, shard: Shard, epoch: int, batch: int, shuffle: bool = True
    ) -> Iterator[Batch]:
        mine = self.mine(shard, epoch, shuffle)
        if not shuffle:  # validation: each of this rank's rows once, in order
            for X, y in self.read_ahead(mine, threading.Event()):
                for i in range(0, len(X), batch):
                    yield self.to_device(X[i : i + batch], y[i : i + batch])
            return
        steps, produced = self.steps(shard, batch), 0
        share = sum(n for _, _, n in mine)
        laps = math.ceil(steps * batch / max(share, 1)) + 1  # a small share goes round again
        g = torch.Generator().manual_seed(epoch_seed(shard, epoch) * 31 + shard.rank)
        left_X, left_y = None, None
        for X, y in self.read_ahead(mine * laps, threading.Event()):
            if left_X is not None:  # the shuffle buffer: leftovers plus the new group
                X, y = torch.cat([left_X, X]), torch.cat([left_y, y])
            if self.class_draws is not None:  # balanced within each shuffle buffer
                perm = drawn(y, self.class_draws, len(X), g)
            else:
                perm = torch.randperm(len(X), generator=g)
            X, y = X[perm], y[perm]
            full = len(X) // batch * batch
            for i in range(0, full, batch):
                yield self.to_device(X[i : i + batch], y[i : i + batch])
                produced += 1
                if produced == steps:
                    return
            left_X, left_y = X[full:], y[full:]

    def to_device(self, X: torch.Tensor, y: torch.Tensor) -> Batch:
        if self.device.type == "cuda":
            return X.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return X, y


def open_split(
    spec: dict,
    files: list[str],
    device: torch.device,
    training: bool,
    processes_here: int,
    stream: bool = False,
):
    """Resident when the split fits under `resident_max_gb` (auto: see memory_budget_bytes),
    else (or when `stream`) streamed. A tuning trial's subsample (`max_train_rows`,
    `epoch_train_rows` of it per epoch) is always resident."""
    features, label = spec["features"], spec["label"]
    rows = spec.get("max_train_rows") if training else None
    epoch_rows = spec.get("epoch_train_rows") if training else None
    limit = spec.get("resident_max_gb", "auto")
    budget = (
        memory_budget_bytes(device, processes_here) if limit in (None, "auto") else limit * 2**30
    )
    if rows is not None or (not stream and split_bytes(files, len(features)) <= budget):
        split = ResidentSplit(
            files,
            features,
            label,
            device,
            rows,
            spec["seed"],
            epoch_rows,
            spec.get("keep_resident", False),
        )
    else:
        split = StreamedSplit(files, features, label, device)
    draws = spec.get("class_draws") if training else None  # train.sampler: balanced
    split.class_draws = torch.tensor(draws, dtype=torch.float64) if draws else None
    return split


def drawn(y: torch.Tensor, class_draws: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """`n` row positions of `y`, drawn with replacement, each row as likely as its class's
    draw weight says (train.sampler: balanced): every class comes up equally often."""
    return torch.multinomial(class_draws[y.cpu()], n, replacement=True, generator=g)
