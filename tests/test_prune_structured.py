"""Structured pruning and int8 quantization: layers really shrink, the slim (and int8) model
is rebuilt from its JSON spec and a weights-only state dict, and the registered model serves
raw rows in a process where the pruning library cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_config, raw_test_rows, stage_runs
from mlflow import MlflowClient

from conf.schema import ConfigError, load_config
from tasks.prune import slim_model
from tasks.training.models import build_model


@pytest.mark.parametrize(
    "arch, expected",
    [
        (
            {"model": "mlp", "n_features": 64, "n_classes": 10, "hidden": [64, 32], "dropout": 0.1},
            {"hidden": [32, 16]},
        ),
        (
            {
                "model": "cnn",
                "n_features": 784,
                "n_classes": 10,
                "hidden": [32],
                "dropout": 0.1,
                "image_shape": [1, 28, 28],
            },
            {"channels": [16, 32], "hidden": [16]},
        ),
    ],
)
def test_structured_pruning_leaves_a_smaller_dense_model_rebuilt_from_json(
    arch, expected, tmp_path
):
    torch.manual_seed(0)
    torch.save(build_model(arch).state_dict(), tmp_path / "trained.pt")
    slim = slim_model(arch, str(tmp_path / "trained.pt"), 0.5, tmp_path / "slim.pt")
    assert {k: slim[k] for k in expected} == expected
    assert {k: v for k, v in slim.items() if k not in expected} == {
        k: v for k, v in arch.items() if k not in expected
    }
    model = build_model(json.loads(json.dumps(slim)))  # the spec survives JSON
    model.load_state_dict(torch.load(tmp_path / "slim.pt", weights_only=True))
    before = sum(p.numel() for p in build_model(arch).parameters())
    after = sum(p.numel() for p in model.parameters())
    assert after < 0.45 * before  # both sides of each hidden layer narrowed
    assert model.eval()(torch.randn(3, arch["n_features"])).shape == (3, 10)


def test_int8_quantization_keeps_the_outputs_and_loads_from_a_weights_only_file(tmp_path):
    from tasks.prune import quantize_saved
    from tasks.training.models import load_model, weight_counts

    arch = {"model": "mlp", "n_features": 64, "n_classes": 10, "hidden": [64, 32], "dropout": 0.1}
    torch.manual_seed(0)
    float_model = build_model(arch).eval()
    torch.save(float_model.state_dict(), tmp_path / "model.pt")
    before = (tmp_path / "model.pt").stat().st_size
    quantized = quantize_saved(arch, tmp_path / "model.pt", tmp_path / "model.json")
    assert quantized == {**arch, "quantize": "dynamic_int8"}
    assert json.loads((tmp_path / "model.json").read_text()) == quantized
    model = load_model(quantized, str(tmp_path / "model.pt"))
    int8 = [m for m in model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(int8) == 3 and not any(type(m) is torch.nn.Linear for m in model.modules())
    assert (tmp_path / "model.pt").stat().st_size < 0.5 * before
    x = torch.randn(16, 64) * 3
    with torch.inference_mode():
        expected, got = float_model(x), model(x)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert weight_counts(model)[0] == weight_counts(float_model)[0]


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["prune.method=structured", "train.model=rnn"], "prune.method 'structured'"),
        (["prune.method=structured", "prune.rounds=2"], "prune.rounds"),
        (["prune.method=structural"], "prune.method"),
        (["prune.method=structured", "prune.sparsity=1.0"], "prune.sparsity"),
        (["prune.quantize=int4"], "prune.quantize"),
    ],
)
def test_structured_pruning_config_errors_name_the_key(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, overrides)


BLOCKED = """
import json, sys

class NoPruningLibrary:  # as on a serving box where torch-pruning was never installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch_pruning":
            raise ImportError("torch_pruning is not installed here")

sys.meta_path.insert(0, NoPruningLibrary())
import mlflow, pandas as pd

mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
predictions = model.predict(pd.read_parquet(sys.argv[3]))
assert "torch_pruning" not in sys.modules
print(json.dumps([str(p) for p in predictions]))
"""


@pytest.mark.slow
def test_a_structured_run_registers_a_slim_model_served_without_the_pruning_library(
    digits_frame, tmp_path
):
    """The unpruned model first (the champion), then the same training pruned: smaller by
    far, it takes `champion` under `evaluate.objective: size`."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    source = tmp_path / "digits.csv"
    digits_frame.to_csv(source, index=False)
    common = [
        "data.label=digit",
        "train.hidden=[128, 64]",
        "train.epochs=8",
        "train.batch_size=32",
        "evaluate.objective=size",
        "evaluate.max_accuracy_drop=1.0",  # the pruned variant whatever it scores
    ]
    unpruned = make_config(tmp_path, source, *common, "prune.method=none")
    cfg = make_config(  # a recipe: structured pruning, fine-tuning, then int8
        tmp_path,
        source,
        *common,
        "prune.method=structured",
        "prune.finetune_epochs=3",
        "prune.quantize=dynamic_int8",
    )
    with prefect_test_harness(server_startup_timeout=120):
        champion = pipeline(unpruned)
        result = pipeline(cfg)
    assert champion["promotion"]["alias"] == "champion"
    assert result["promotion"]["alias"] == "champion", result["promotion"]
    assert "better zstd size" in result["promotion"]["why"]
    assert f"against champion v{champion['promotion']['version']}" in result["promotion"]["why"]
    client = MlflowClient(cfg.tracking.uri)
    runs = stage_runs(client, result["parent_run_id"])
    prune = runs["prune"].data
    assert prune.tags["accelflow.cached"] == "false"
    gate = client.download_artifacts(
        runs["evaluate"].info.run_id, "evaluate/gate.md", str(tmp_path)
    )
    assert Path(gate).read_text().startswith("## Gate: `champion`")
    (built,) = (tmp_path / "work" / "prune").glob("[!.]*/model.json")
    arch = json.loads(built.read_text())
    assert arch["hidden"] == [64, 32] and arch["quantize"] == "dynamic_int8"
    trained = runs["train"].data.metrics["train/parameters"]
    assert prune.metrics["prune/parameters"] < 0.45 * trained
    parent = client.get_run(result["parent_run_id"]).data
    assert parent.metrics["prune/sparsity"] == pytest.approx(
        1 - prune.metrics["prune/nonzero_parameters"] / trained
    )
    assert parent.metrics["test/accuracy"] > 0.8, dict(parent.metrics)

    raw_X, raw_y = raw_test_rows(source, cfg)
    raw_X.to_parquet(tmp_path / "raw.parquet")
    served = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCKED,
            cfg.tracking.uri,
            f"models:/{cfg.registry.model_name}@champion",
            str(tmp_path / "raw.parquet"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert served.returncode == 0, served.stderr[-3000:]
    predictions = np.asarray(json.loads(served.stdout.strip().splitlines()[-1]))
    assert float((predictions == raw_y).mean()) == pytest.approx(
        parent.metrics["test/accuracy"], abs=1e-9
    )
