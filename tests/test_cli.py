"""The `accelflow` command: exit codes and one-paragraph errors, no tracebacks for user errors."""

import re
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "flows.cli"]


def accelflow(*args, cwd=None):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_validate_checks_config_and_data(digits_csv):
    out = accelflow("validate", "--set", f"data.source={digits_csv}", "--set", "data.label=digit")
    assert out.returncode == 0, out.stderr
    assert "data OK: 64 features" in out.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "train.optimiser=sgd"], "unknown key 'train.optimiser'"),
        (["--set", "train.epochs=zero"], "'train.epochs'"),
        (["--set", "data.source=/no/such/data.csv"], "/no/such/data.csv: data source does not exist"),
        (["-c", "/no/such/config.yaml"], "config file /no/such/config.yaml does not exist"),
    ],
)
def test_user_errors_exit_2_with_a_message_and_no_traceback(args, expected):
    for command in ("validate", "run"):
        out = accelflow(command, *args)
        assert out.returncode == 2
        assert expected in out.stderr
        assert "Traceback" not in out.stderr


def test_run_rejects_a_missing_label_before_starting_anything(digits_csv):
    out = accelflow("run", "--set", f"data.source={digits_csv}")
    assert out.returncode == 2
    assert "label column 'label' not found" in out.stderr and "data.label" in out.stderr
    assert "Starting temporary server" not in out.stdout + out.stderr  # failed before Prefect started


@pytest.mark.slow
def test_run_on_a_csv_end_to_end(digits_csv, tmp_path):
    """The user's path: a CSV with string labels through the CLI, local Prefect, sqlite MLflow."""
    out = accelflow(
        "run", "--set", f"data.source={digits_csv}", "--set", "data.label=digit",
        "--set", f"workdir={tmp_path / 'work'}", "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "--set", "train.epochs=5", "--set", "train.hidden=[128]", "--set", "prune.finetune_epochs=1",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in ("ingest", "partition", "reduce", "train", "prune", "evaluate"):
        assert re.search(rf"^ {stage}\s+\| ran\s+\|", out.stdout, re.MULTILINE), stage
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in out.stdout
    assert "as 'champion'" in out.stdout
    assert not (tmp_path / "mlruns").exists()  # artifacts live beside the store, not in the cwd
