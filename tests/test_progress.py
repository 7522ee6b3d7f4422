"""Live progress: plain lines (with figures and an ETA) when not on a terminal, a rich bar
when asked for one, nothing when off; Dask results gathered in order with one step each;
the launcher's reading of rank 0's epoch rows."""

from __future__ import annotations

import json
import re

import pytest

from tasks import progress
from tasks.training.launch import epoch_figures, epoch_row


def test_lines_when_not_on_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    assert progress.display_mode() == "lines"  # pytest's captured stdout is no terminal
    with progress.Progress("train", "epochs", 3) as p:
        for done in (1, 2, 3):
            p.step(done, f"loss {1 / done:.2f}")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert re.fullmatch(r"train: epochs 1/3 \| loss 1\.00 \| \d+s elapsed, eta \d+s", lines[0])
    assert lines[-1].endswith("eta 0s")


def test_off_prints_nothing_and_a_bad_mode_says_so(capsys, monkeypatch):
    monkeypatch.setenv(progress.ENV, "off")
    with progress.Progress("tune", "trials", 2) as p:
        p.step(1, "x")
    assert capsys.readouterr().out == ""
    monkeypatch.setenv(progress.ENV, "fancy")
    assert progress.display_mode() == "lines"
    assert "ACCELFLOW_PROGRESS='fancy' is not one of" in capsys.readouterr().out


def test_a_bar_on_request_shows_done_of_total_and_the_figures(capsys, monkeypatch):
    monkeypatch.setenv(progress.ENV, "bar")
    with progress.Progress("reduce", "sweep points", 4) as p:
        for done in range(1, 5):
            p.step(done, f"acc 0.9{done}")
    shown = capsys.readouterr().out
    assert "reduce: sweep points" in shown and "4/4" in shown and "acc 0.94" in shown
    with progress.Progress("train", "epochs", 2) as p:  # too wide: the figures give way
        p.step(2, "loss 0.1234, " * 20)
    shown = capsys.readouterr().out.splitlines()[-1]
    assert "2/2" in shown and shown.endswith("…") and len(shown) <= 80
    assert progress._shared == {"live": None, "bars": 0}  # the live display was released


def test_eta_and_duration():
    p = progress.Progress("x", "steps", 10, observed=False)
    p.started -= 20  # 20 s in, 4 of 10 done: 30 s to go
    assert p.eta(4) == pytest.approx(30, abs=1)
    assert p.eta(0) is None and p.eta(10) == 0.0
    assert progress.duration(75) == "1m15s" and progress.duration(None) == "?"


def test_gather_keeps_the_order_and_steps_once_per_result(capsys, monkeypatch):
    from distributed import Client, LocalCluster

    monkeypatch.setenv(progress.ENV, "lines")
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False) as cluster,
        Client(cluster) as client,
        progress.Progress("partition", "partitions written", 6) as p,
    ):
        futures = client.map(lambda x: x * x, range(6), pure=False)
        results = progress.gather(client, futures, p, lambda r: f"got {r}")
    assert results == [0, 1, 4, 9, 16, 25]
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if line.startswith("partition: partitions written")]
    assert [int(re.search(r"(\d)/6", line)[1]) for line in steps] == [1, 2, 3, 4, 5, 6]


def test_the_launcher_reads_rank_zeros_epoch_rows_and_nothing_else():
    row = {"epoch": 2, "phase": 0, "train/loss": 0.41234, "val/loss": 0.5, "val/accuracy": 0.875}
    row["train/samples_per_second"] = 12345.6
    assert epoch_row(json.dumps(row) + "\n") == row
    assert epoch_row("W1129 torch warning {epoch}\n") is None
    assert epoch_row('{"epoch": 1, broken\n') is None
    assert epoch_figures(row, "train") == (
        "loss 0.4123, val loss 0.5000, val acc 0.8750, samples/s 12,346"
    )
    pruned = {"epoch": 0, "compress/loss": 0.3, "compress/sparsity": 0.5}
    assert epoch_figures(pruned, "compress") == "loss 0.3000, sparsity 50.0%"
