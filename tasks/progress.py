"""Live progress for long work: partitions written, PCA passes, epochs, trials, sweep points.

In a terminal, a rich bar per piece of work: done/total, elapsed, ETA and the latest
figures. Anywhere else (CI, a Prefect worker, a pipe) one plain line per step with the same
figures, so a log stays readable and greppable. `ACCELFLOW_PROGRESS=bar|lines|off`
overrides the choice. The orchestration floor may `observe` every progress (inside a Prefect
task run a progress artifact follows along): this module knows nothing of Prefect, so the
stages that report through it stay free of it.

Stdlib only at import time (rich is imported when used): the training launcher, which must
run on a bare GPU box, reports its epochs through this module too.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

ENV = "ACCELFLOW_PROGRESS"
MODES = ("auto", "bar", "lines", "off")

# rich allows one live display per process: the bars alive at once share it
_lock = threading.Lock()
_shared: dict[str, Any] = {"live": None, "bars": 0}

# (stage, what) → a callback (done, total) for that progress, or None to skip it
Observer = Callable[[str, str], Callable[[int, int], None] | None]
_observers: list[Observer] = []


def observe(observer: Observer) -> None:
    """Call `observer(stage, what)` for every progress opened from now on (once per observer)."""
    if observer not in _observers:
        _observers.append(observer)


def display_mode() -> str:
    chosen = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if chosen not in MODES:
        print(f"note: {ENV}={chosen!r} is not one of {', '.join(MODES)}; using auto")
        chosen = "auto"
    if chosen == "auto":
        return "bar" if sys.stdout.isatty() else "lines"
    return chosen


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """`with Progress("partition", "partitions", 12) as p: ... p.step(done, "figures")`."""

    def __init__(self, stage: str, what: str, total: int, observed: bool = True):
        self.stage, self.what, self.total = stage, what, max(int(total), 0)
        self.started = time.monotonic()
        self.mode = display_mode()
        self.bar: int | None = None
        self.followers = [f for o in _observers if (f := o(stage, what))] if observed else []
        if self.mode == "bar":
            self.bar = _open_bar(f"{stage}: {what}", self.total)

    def eta(self, done: int) -> float | None:
        if done <= 0 or self.total <= done:
            return None if done <= 0 else 0.0
        return (time.monotonic() - self.started) / done * (self.total - done)

    def step(self, done: int, figures: str = "") -> None:
        if self.mode == "bar" and self.bar is not None:
            _shared["live"].update(self.bar, completed=done, figures=figures)
        elif self.mode != "off":
            elapsed = time.monotonic() - self.started
            print(
                f"{self.stage}: {self.what} {done}/{self.total}"
                + (f" | {figures}" if figures else "")
                + f" | {duration(elapsed)} elapsed, eta {duration(self.eta(done))}",
                flush=True,
            )
        for follow in self.followers:
            follow(done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            _close_bar(self.bar)
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def gather(client, futures: Sequence, progress: Progress, figures: Callable[[Any], str] = str):
    """`client.gather(futures)` in order, stepping `progress` as each one finishes."""
    from distributed import as_completed

    index = {f.key: i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    for done, future in enumerate(as_completed(futures), start=1):
        results[index[future.key]] = value = future.result()
        progress.step(done, figures(value))
    return results


# ---------------------------------------------------------------- rich, shared


def _open_bar(description: str, total: int) -> int | None:
    try:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress
        from rich.table import Column
    except ImportError:  # rich comes with Prefect; without it, lines are fine
        return None
    with _lock:
        if _shared["live"] is None:
            # the figures give way (cut with an ellipsis) on a narrow terminal, not the bar
            figures = Column(no_wrap=True, overflow="ellipsis", ratio=1)
            _shared["live"] = RichProgress(
                TextColumn("{task.description}", table_column=Column(no_wrap=True)),
                BarColumn(bar_width=20),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[figures]}", table_column=figures),
                expand=True,
            )
            _shared["live"].start()
        _shared["bars"] += 1
        return _shared["live"].add_task(description, total=total, figures="")


def _close_bar(bar: int) -> None:
    with _lock:
        live = _shared["live"]
        if live is None:
            return
        live.refresh()
        _shared["bars"] -= 1
        if _shared["bars"] <= 0:  # the finished bars stay on screen as a record
            live.stop()
            _shared.update(live=None, bars=0)
