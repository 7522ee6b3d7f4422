"""The network where users run it: every model family exports to ONNX with torch's answers,
int8 in onnxruntime (static, calibrated, for the CNN) is served by the pyfunc in a process
that cannot import the export tooling and by MLflow's scoring server, and the runtime each
point is served by follows what was measured."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_digits

from conf.schema import ConfigError, EvaluateConfig, load_config
from tasks.compress.choice import settle_runtimes
from tasks.compress.export import PARITY_ATOL, export_onnx, export_point, parity
from tasks.served.runtime import OnnxNetwork
from tasks.training.models import build_model

IMAGE = {"n_features": 64, "n_classes": 10, "dropout": 0.1, "image_shape": [1, 8, 8]}
FAMILIES = {
    "mlp-embeddings": {
        "model": "mlp",
        "n_features": 6,
        "n_classes": 3,
        "hidden": [16, 8],
        "dropout": 0.1,
        "embeddings": [[4, 7, 3], [5, 3, 2]],  # columns 4 and 5 are category codes
        "periodic": 0.5,  # and columns 0-3 enter through sin/cos (train.numeric_embedding)
    },
    "cnn": {"model": "cnn", **IMAGE, "hidden": [16], "channels": [4, 8]},
    "gru": {"model": "rnn", **IMAGE, "hidden": [16], "cell": "gru"},
    "lstm-2-layers": {"model": "rnn", **IMAGE, "hidden": [8, 8], "cell": "lstm"},
    "transformer-image": {"model": "transformer", **IMAGE, "hidden": [16], "heads": 2, "patch": 4},
    "transformer-pruned": {  # 2 of its 4 heads kept, a narrower feed-forward (compress)
        "model": "transformer",
        **IMAGE,
        "hidden": [16],
        "heads": 4,
        "kept_heads": 2,
        "ff": 8,
    },
    "transformer-table": {
        "model": "transformer",
        "n_features": 5,
        "n_classes": 2,
        "hidden": [8],
        "dropout": 0.0,
        "heads": 2,
    },
}


@pytest.mark.parametrize("arch", FAMILIES.values(), ids=FAMILIES.keys())
def test_every_family_exports_to_onnx_with_torch_s_answers(arch, tmp_path):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    model.standardize.mean.uniform_(0, 5)  # fitted statistics, not the identity
    model.standardize.std.uniform_(0.5, 3)
    path = export_onnx(model, arch["n_features"], tmp_path / "model.onnx")
    network = OnnxNetwork(path, threads=1)
    X = np.random.default_rng(0).uniform(0, 10, (37, arch["n_features"])).astype(np.float32)
    for i, _, _ in arch.get("embeddings", []):
        X[:, i] = np.arange(len(X)) % 9  # codes 0..8: in range, and past <rare>
    for batch in (1, 37):  # the batch is dynamic
        with torch.inference_mode():
            expected = model(torch.from_numpy(X[:batch])).numpy()
        worst, differ = parity(expected, network(X[:batch]))
        assert worst < PARITY_ATOL and differ == 0, (worst, differ)


def test_the_reduction_folds_into_the_graph(tmp_path):
    """Standardised PCA as Sub + MatMul in front of the exported network: the ONNX file
    alone takes encoded rows to the logits torch gives on their principal components."""
    from tasks.compress.export import fold_reduction
    from tasks.reduce.pca import apply_reduction

    rng = np.random.default_rng(0)
    reduction = {
        "mean": rng.normal(5, 2, 12).astype(np.float32),
        "scale": rng.uniform(0.5, 4, 12).astype(np.float32),
        "components": rng.normal(0, 1, (4, 12)).astype(np.float32),
    }
    torch.manual_seed(0)
    arch = {"model": "mlp", "n_features": 4, "n_classes": 3, "hidden": [8], "dropout": 0.0}
    model = build_model(arch).eval()
    network = export_onnx(model, 4, tmp_path / "network.onnx")
    folded = fold_reduction(network, reduction, tmp_path / "served.onnx")
    X = rng.normal(5, 3, (33, 12)).astype(np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(apply_reduction(X, reduction))).numpy()
    worst, differ = parity(expected, OnnxNetwork(folded, threads=1)(X))
    assert worst < PARITY_ATOL and differ == 0


def test_parity_counts_answers_that_differ_but_not_near_ties():
    torch_logits = np.array([[0.0, 5.0], [1.0, 1.0 + PARITY_ATOL / 2], [3.0, 0.0]])
    onnx_logits = np.array([[0.0, 5.0], [1.0 + PARITY_ATOL, 1.0], [0.0, 3.0]])
    worst, differ = parity(torch_logits, onnx_logits)
    assert worst == pytest.approx(3.0) and differ == 1  # the tie in row 2 may go either way


def measured(name, **figures):
    return {"name": name, **{k: float(v) for k, v in figures.items()}}


def test_the_runtime_each_point_is_served_by_follows_the_measurement():
    """auto: the faster runtime within the accuracy budget, else the more accurate one; a
    named runtime is used as named; a point onnxruntime could not run fails only there."""
    cfg = EvaluateConfig(max_accuracy_drop=0.01, objective="latency")

    def rows():
        return [
            measured(
                "baseline",
                torch_val_accuracy=0.9,
                torch_latency_b256_p50_ms=4,
                onnxruntime_val_accuracy=0.9,
                onnxruntime_latency_b256_p50_ms=1,
            ),
            measured(  # int8 in onnxruntime: faster but over the budget
                "int8",
                torch_val_accuracy=0.895,
                torch_latency_b256_p50_ms=2,
                onnxruntime_val_accuracy=0.85,
                onnxruntime_latency_b256_p50_ms=0.5,
            ),
            {
                **measured("unexportable", torch_val_accuracy=0.9, torch_latency_b256_p50_ms=3),
                "onnx_error": "export: boom",
            },
        ]

    auto = rows()
    settle_runtimes(auto, cfg, "auto")
    assert [r["runtime"] for r in auto] == ["onnxruntime", "torch", "torch"]
    assert auto[0]["latency_b256_p50_ms"] == 1 and auto[1]["latency_b256_p50_ms"] == 2
    assert auto[1]["val_accuracy"] == 0.895
    over = rows()  # nothing within the budget: the more accurate runtime
    over[1]["torch_val_accuracy"] = 0.8
    over.append(  # a float point over the budget: both runtimes answer alike, the faster
        measured(
            "float",
            torch_val_accuracy=0.7,
            torch_latency_b256_p50_ms=3,
            onnxruntime_val_accuracy=0.7,
            onnxruntime_latency_b256_p50_ms=2,
        )
    )
    settle_runtimes(over, cfg, "auto")
    assert over[1]["runtime"] == "onnxruntime" and over[1]["val_accuracy"] == 0.85
    assert over[3]["runtime"] == "onnxruntime"
    named = rows()
    settle_runtimes(named, cfg, "onnxruntime")
    assert [r.get("runtime") for r in named] == ["onnxruntime", "onnxruntime", None]
    assert named[2]["error"] == "export: boom"
    torch_only = rows()
    settle_runtimes(torch_only, cfg, "torch")
    assert {r["runtime"] for r in torch_only} == {"torch"}


NO_EXPORT_TOOLING = """
import json, sys

class NoExportTooling:  # as on a serving box with onnxruntime but no exporter installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("onnx", "onnxscript", "torch_pruning") or name == "torch.onnx":
            raise ImportError(name + " is not installed here")

sys.meta_path.insert(0, NoExportTooling())
import mlflow, pandas as pd

model = mlflow.pyfunc.load_model(sys.argv[1])
predictions = model.predict(pd.read_parquet(sys.argv[2]))
print(json.dumps({"predictions": [int(p) for p in predictions], "torch": "torch" in sys.modules}))
"""


def test_a_static_int8_cnn_is_served_by_its_pyfunc_without_the_export_tooling(tmp_path):
    """A CNN trained on real 8x8 digits, quantized by onnxruntime (QDQ, per-channel weights,
    activations calibrated on training rows): its convolutions are int8, it keeps its
    accuracy, and the saved pyfunc scores raw rows in a process where onnx, onnxscript and
    torch.onnx cannot be imported, as the Predictor does here."""
    import mlflow
    import onnx

    from tasks.compress.points import quantize_saved
    from tasks.served.predictor import Predictor, write_bundle
    from tasks.served.pyfunc import pyfunc_arguments

    digits = load_digits()
    X, y = digits.data.astype(np.float32), digits.target
    train, test = slice(0, 1400), slice(1400, None)
    arch = FAMILIES["cnn"] | {"channels": [8, 16], "hidden": [32]}
    torch.manual_seed(0)
    model = build_model(arch)
    model.standardize.mean.fill_(float(X[train].mean()))
    model.standardize.std.fill_(float(X[train].std()))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(8):
        for i in torch.randperm(1400).split(64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(
                model(torch.from_numpy(X[i])), torch.from_numpy(y[i])
            )
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.inference_mode():
        float_accuracy = float(
            (model(torch.from_numpy(X[test])).argmax(1).numpy() == y[test]).mean()
        )
    assert float_accuracy > 0.9
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save(model.state_dict(), tmp_path / "model_float.pt")
    quantized = quantize_saved(arch, tmp_path / "model.pt", tmp_path / "model.json")
    onnx_path, is_int8 = export_point(quantized, tmp_path, X[train][:256])
    assert is_int8
    graph = onnx.load(str(onnx_path)).graph
    conv_inputs = {i for n in graph.node if n.op_type == "Conv" for i in n.input}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert sum(1 for n in graph.node if n.op_type == "Conv") == 2
    assert len(conv_inputs & dequantized) >= 4  # each conv's input and weights come int8

    bundle = write_bundle(
        tmp_path / "bundle",
        {
            "weights": {"path": str(tmp_path / "model.pt")},
            "arch": {"path": str(tmp_path / "model.json")},
            "onnx": {"path": str(onnx_path)},
        },
        None,
        {
            "feature_names": digits.feature_names,
            "classes": list(range(10)),
            "runtime": "onnxruntime",
        },
    )
    predictor = Predictor(bundle)
    rows = pd.DataFrame(X[test], columns=digits.feature_names)
    expected = predictor.predict_frame(rows)
    assert float((expected == y[test]).mean()) > float_accuracy - 0.02  # int8 kept it
    arguments = pyfunc_arguments(str(bundle), rows.head(5))
    assert "onnxruntime" in arguments["pip_requirements"]
    mlflow.pyfunc.save_model(path=str(tmp_path / "pyfunc"), **arguments)
    rows.to_parquet(tmp_path / "rows.parquet")
    served = subprocess.run(
        [
            sys.executable,
            "-c",
            NO_EXPORT_TOOLING,
            str(tmp_path / "pyfunc"),
            str(tmp_path / "rows.parquet"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert served.returncode == 0, served.stderr[-3000:]
    answer = json.loads(served.stdout.strip().splitlines()[-1])
    assert answer["predictions"] == expected.tolist()
    assert answer["torch"] is False  # onnxruntime serves it: torch is not even imported

    # behind MLflow's scoring server (what `make serve-model` starts): one batch, same answers
    from flows.serve import free_port, model_server, stop

    port = free_port()
    server = model_server(tmp_path / "server", port, str(tmp_path / "pyfunc"))
    try:
        reply = httpx.post(
            f"http://127.0.0.1:{port}/invocations",
            json={"dataframe_split": rows.head(64).to_dict(orient="split")},
            timeout=60,
        )
    finally:
        stop(server)
    assert reply.status_code == 200, reply.text[-2000:]
    assert [int(p) for p in reply.json()["predictions"]] == expected[:64].tolist()


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["serve.runtime=tensorrt"], "serve.runtime"),
        (
            [
                "train.model=cnn",
                "reduce.method=none",
                "compress.recipe=[quantize]",
                "compress.calibration_rows=0",
            ],
            "compress.calibration_rows",
        ),
    ],
)
def test_bad_serving_settings_fail_at_validation_naming_the_key(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, overrides)
    if "compress.calibration_rows=0" in overrides:  # torch's int8 needs no calibration
        load_config(None, [*overrides, "serve.runtime=torch"])


def test_a_batch_of_256_is_timed_on_256_rows_however_small_the_split():
    """A 9-column table's validation split can hold 67 rows: timed on those, its network
    looked 3.6x faster at "batch 256" than on 256 rows, and the served path (timed on 256)
    looked 4.4x slower than the network. The rows are repeated up to the batch instead."""
    from tasks.served.pyfunc import timing_rows

    small = np.arange(67 * 3, dtype=np.float32).reshape(67, 3)
    rows = timing_rows(small)
    assert rows.shape == (256, 3)
    assert (rows[:67] == small).all() and (rows[67:134] == small).all()
    assert timing_rows(np.zeros((1000, 3))).shape == (256, 3)  # a large split: its first rows
    frame = pd.DataFrame(small, columns=["a", "b", "c"], index=range(100, 167))
    assert len(timing_rows(frame)) == 256 and list(timing_rows(frame).index) == list(range(256))
    assert len(timing_rows(frame.iloc[:0])) == 0  # nothing to time on: nothing made up
