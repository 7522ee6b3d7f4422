"""Every stage out of core in one flow, small: `benchmarks/scale_benchmark.py` on a table
built from digits, with Dask workers capped, training streamed from its row groups, then
batch scoring of the whole file. The full-size run (a table several times the workers'
memory) is the benchmark's; here every process's peak is read and the cap must hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_the_whole_flow_and_batch_scoring_stay_under_the_workers_cap(tmp_path):
    script = Path(__file__).parent.parent / "benchmarks" / "scale_benchmark.py"
    done = subprocess.run(
        [sys.executable, str(script), "--gb", "0.01", "--worker-memory", "1GiB"]
        + ["--work", str(tmp_path), "--json", str(tmp_path / "scale.json")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "scale.json").read_text())
    for step in ("run", "score"):
        roles = result[step]["roles"]
        assert not result[step]["workers_restarted"], result[step]["tail"]
        assert 0 < roles["Dask worker"]["peak_mib"] < 1024, roles
    assert result["run"]["roles"]["DDP rank"]["processes"] >= 2  # real DDP processes
    assert result["train_streamed"]  # from its row groups, not loaded whole
    assert result["rows_scored"] == result["table"]["rows"]
    assert result["test_accuracy"] > 0.9
