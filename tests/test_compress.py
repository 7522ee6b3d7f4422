"""The compress stage: structured pruning and int8 quantization really shrink the layers,
the slim (and int8) model is rebuilt from its JSON spec and a weights-only state dict; a
sweep measures every point as a nested run with a Pareto table, the choice follows
`evaluate.objective`, and the registered model serves raw rows in a process where the
pruning library cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import make_config, raw_test_rows, stage_runs
from mlflow import MlflowClient

from conf.schema import ConfigError, load_config
from tasks.compress.points import slim_model
from tasks.registry import logged_model_id
from tasks.tracking import split_identity
from tasks.training.models import build_model


@pytest.mark.parametrize(
    "arch, expected",
    [
        (
            {"model": "mlp", "n_features": 64, "n_classes": 10, "hidden": [64, 32], "dropout": 0.1},
            {"hidden": [32, 16]},
        ),
        (  # the periodic numeric embedding keeps its width; the layers after it narrow
            {
                "model": "mlp",
                "n_features": 8,
                "n_classes": 10,
                "hidden": [256, 128],
                "dropout": 0.1,
                "periodic": 0.1,
            },
            {"hidden": [128, 64]},
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


def test_each_layer_narrows_by_its_own_share(tmp_path):
    """compress.search's per-layer shares, in `narrowable_layers`' order: a CNN's two
    convolutions and its head's hidden layer each lose their own share, and the slim spec
    rebuilds the pruned module."""
    arch = {
        "model": "cnn",
        "n_features": 784,
        "n_classes": 10,
        "hidden": [64],
        "dropout": 0.1,
        "image_shape": [1, 28, 28],
        "channels": [16, 32],
    }
    torch.manual_seed(0)
    torch.save(build_model(arch).state_dict(), tmp_path / "trained.pt")
    slim = slim_model(arch, str(tmp_path / "trained.pt"), [0.25, 0.5, 0.75], tmp_path / "s.pt")
    assert (slim["channels"], slim["hidden"]) == ([12, 16], [16])
    build_model(slim).load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))


@pytest.mark.parametrize(
    "arch, dead",
    [
        (  # two stacked GRU layers over a table's features in chunks
            {"model": "rnn", "n_features": 64, "n_classes": 10, "hidden": [32, 32], "dropout": 0.0},
            "rnn",
        ),
        (  # an LSTM over an image's pixel rows
            {
                "model": "rnn",
                "cell": "lstm",
                "n_features": 64,
                "n_classes": 10,
                "hidden": [32],
                "dropout": 0.0,
                "image_shape": [1, 8, 8],
            },
            "rnn",
        ),
        (  # a transformer's heads and feed-forward blocks, one token per feature
            {
                "model": "transformer",
                "n_features": 12,
                "n_classes": 3,
                "hidden": [16, 16],
                "heads": 4,
                "dropout": 0.0,
            },
            "transformer",
        ),
    ],
)
def test_recurrent_and_transformer_narrowing_keeps_the_units_that_matter(arch, dead, tmp_path):
    """Structured pruning of the families Torch-Pruning does not cover, checked where the
    answer is known: half of every layer's units (and attention heads) are made dead (all
    their weights zero), so narrowing by half must remove exactly those and leave the same
    outputs. The slim model loads as the served model does (spec from JSON, weights-only
    file) and scores rows."""
    from tasks.training.models import load_model

    torch.manual_seed(0)
    model = build_model(arch).eval()
    state = model.state_dict()
    with torch.no_grad():
        if dead == "rnn":
            gates, width = (4 if arch.get("cell") == "lstm" else 3), arch["hidden"][0]
            for layer in range(len(arch["hidden"])):
                units = torch.randperm(width)[: width // 2]  # a different half per layer
                rows = (torch.arange(gates).unsqueeze(1) * width + units).flatten()
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    state[f"rnn.{name}_l{layer}"][rows] = 0
                state[f"rnn.weight_hh_l{layer}"][:, units] = 0
                after = f"rnn.weight_ih_l{layer + 1}" if layer + 1 < len(arch["hidden"]) else None
                state[after or "head.1.weight"][:, units] = 0
        else:
            for layer in range(len(arch["hidden"])):
                units = torch.randperm(2 * arch["hidden"][0])[: arch["hidden"][0]]
                for name in ("linear1.weight", "linear1.bias"):
                    state[f"encoder.layers.{layer}.{name}"][units] = 0
                state[f"encoder.layers.{layer}.linear2.weight"][:, units] = 0
                attn, size = f"encoder.layers.{layer}.self_attn", 16 // arch["heads"]
                for head in torch.randperm(arch["heads"])[:2].tolist():  # two of four heads
                    rows = (torch.arange(3).unsqueeze(1) * 16 + head * size).flatten()
                    rows = (rows.unsqueeze(1) + torch.arange(size)).flatten()  # q, k, v rows
                    state[f"{attn}.in_proj_weight"][rows] = 0
                    state[f"{attn}.in_proj_bias"][rows] = 0
                    state[f"{attn}.out_proj.weight"][:, head * size : (head + 1) * size] = 0
    model.load_state_dict(state)
    torch.save(state, tmp_path / "trained.pt")
    slim = slim_model(arch, str(tmp_path / "trained.pt"), 0.5, tmp_path / "slim.pt")
    narrowed = (
        {"hidden": [16] * len(arch["hidden"])} if dead == "rnn" else {"ff": 16, "kept_heads": 2}
    )
    assert slim == {**arch, **narrowed}
    loaded = load_model(json.loads(json.dumps(slim)), tmp_path / "slim.pt")
    x = torch.randn(5, arch["n_features"])
    with torch.inference_mode():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())
    # the work counted falls too (a transformer's fused attention once counted as none)
    from tasks.compress.measure import count_macs

    assert 0 < count_macs(slim) < 0.7 * count_macs(arch)


def test_a_small_table_fine_tunes_for_compress_min_steps():
    from tasks.compress.points import phases, stretched

    cfg = load_config(None, ["compress.rounds=2", "compress.finetune_epochs=2"]).compress
    point = {"recipe": ["magnitude", "cluster"], "sparsity": 0.5, "bits": 5}
    # 6 steps an epoch (1,400 rows, batch 256): 17 epochs make 100 steps, each phase
    assert [p["epochs"] for p in stretched(phases(point, cfg), 100, 6)] == [17, 17, 17]
    assert [p["epochs"] for p in stretched(phases(point, cfg), 100, 211)] == [2, 2, 2]
    assert stretched([{"epochs": 0, "lr": 0.001}], 100, 6)[0]["epochs"] == 0  # none asked

    # auto: the family's own, longer for the families slower to recover from narrowing
    def finetune_epochs(*overrides):
        return load_config(None, list(overrides)).compress.finetune_epochs

    assert {
        m: finetune_epochs(f"train.model={m}") for m in ("mlp", "cnn", "rnn", "transformer")
    } == {
        "mlp": 6,
        "cnn": 2,
        "rnn": 5,
        "transformer": 5,
    }
    assert finetune_epochs("train.model=rnn", "compress.finetune_epochs=2") == 2  # a number wins
    # train.model auto: decided with the model, after ingest (an image set: the cnn)
    assert finetune_epochs() == "auto"
    assert load_config(None, []).with_model_for([28, 28]).compress.finetune_epochs == 2


def test_int8_quantization_keeps_the_outputs_and_loads_from_a_weights_only_file(tmp_path):
    from tasks.compress.points import quantize_saved
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
        (["compress.recipe=[structured]", "compress.rounds=2"], "compress.rounds"),
        (["compress.recipe=[structural]"], "compress.recipe"),
        (["compress.sparsity=1.0"], "compress.sparsity"),
        (["compress.bits=0"], "compress.bits"),
        (["compress.bits=9"], "compress.bits"),
        (["compress.recipe=[quantize, magnitude]"], "out of order"),
        (["compress.recipe=[magnitude, structured]"], "one pruning step"),
        (["compress.recipe=[cluster, quantize]"], "choose one"),
        (["compress.sweep={recipes: []}"], "compress.sweep.recipes is empty"),
        (["compress.sweep={recipes: [[magnitude], []]}"], r"compress.sweep.recipes[1] is empty"),
        (["compress.sweep={recipes: [[magnitude]], sparsity: []}"], "compress.sweep.sparsity"),
        (["compress.sweep={recipes: [[cluster]], bits: [9]}"], "compress.sweep.bits"),
        (["compress.sweep={recipes: [[magnitude]], sparsity: [1.0]}"], "compress.sweep.sparsity"),
        (["prune.method=structured"], "the prune section is now compress"),
        (["compress.recipe=[magnitude]", "compress.sweep={recipes: [[quantize]]}"], "both set"),
    ],
)
def test_bad_compress_config_fails_at_validation_naming_the_key(overrides, named):
    import re

    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(None, overrides)


def test_a_sweep_is_every_recipe_at_every_level_it_uses():
    from tasks.compress.points import sweep_points

    cfg = load_config(
        None,
        [
            "compress.sweep={recipes: [[structured, quantize], [magnitude, cluster], [quantize]],"
            " sparsity: [0.3, 0.5], bits: [4, 6]}"
        ],
    ).compress
    names = [p["name"] for p in sweep_points(cfg)]
    assert names == [
        "structured-0.3+quantize",
        "structured-0.5+quantize",
        "magnitude-0.3+cluster-4b",
        "magnitude-0.3+cluster-6b",
        "magnitude-0.5+cluster-4b",
        "magnitude-0.5+cluster-6b",
        "quantize",
    ]


def test_recipe_auto_sweeps_what_makes_the_model_faster():
    mlp = load_config(None, ["train.model=mlp"]).compress
    assert mlp.recipe == "auto" and mlp.sweep.recipes == [
        ["structured"],
        ["quantize"],
        ["structured", "quantize"],
    ]
    for family in ("rnn", "transformer"):  # narrowed too: hidden units, feed-forward width
        assert load_config(None, [f"train.model={family}"]).compress.sweep == mlp.sweep
    one = load_config(None, ["compress.recipe=[structured, quantize]"]).compress
    assert one.sweep is None and one.recipe == ["structured", "quantize"]
    assert load_config(None, ["compress.recipe=[]"]).compress.sweep is None
    cfg = load_config().with_model_for(None)  # the grid survives a round trip (MLflow)
    assert type(cfg).model_validate(cfg.model_dump()).digest() == cfg.digest()


def row(name, accuracy, latency, size):
    return {
        "name": name,
        "val_accuracy": accuracy,
        "latency_b256_p50_ms": latency,
        "latency_b1_p50_ms": latency / 10,
        "size_zstd_bytes": size,
        "size_encoded_bytes": size,
    }


def test_the_budget_is_judged_with_its_noise_on_the_same_rows():
    """The same measured drop, 1 point, on 300 and on 30,000 validation rows: within a
    1.2-point budget as measured, but at 80% confidence only on the many rows (3 rows
    against 300); the rows both models answer alike change nothing."""
    from conf.schema import EvaluateConfig
    from tasks.compress.choice import ANSWERS, choose
    from tasks.paired import drop_and_bound

    def answered(n: int) -> tuple[np.ndarray, np.ndarray]:
        base = np.arange(n) >= n // 10  # both wrong on the first tenth
        point = base.copy()
        point[n // 10 : n // 10 + n // 100] = False  # the point loses 1% more
        return base, point

    for n, confident in ((300, False), (30_000, True)):
        base, point = answered(n)
        drop, bound = drop_and_bound(base, point, 0.8)
        assert drop == pytest.approx(0.01) and bound > drop
        assert drop_and_bound(base, point, 0.5)[1] == pytest.approx(drop, abs=1 / n)
        rows = [
            {**row("baseline", base.mean(), 10.0, 1000), "runtime": "torch"},
            {**row("int8", point.mean(), 4.0, 500), "runtime": "torch"},
        ]
        rows[0][ANSWERS], rows[1][ANSWERS] = {"torch": base}, {"torch": point}
        for confidence, within in ((0.8, confident), (0.5, True)):
            cfg = EvaluateConfig(max_accuracy_drop=0.012, budget_confidence=confidence)
            chosen, why = choose(rows, cfg)
            assert (chosen is not None) == within, (n, confidence, bound, why)
            assert f"at {confidence:.0%} confidence" in why
        assert rows[1]["val_drop"] == pytest.approx(0.01)  # the table shows both figures


def test_the_choice_is_the_best_objective_within_the_tolerance_and_says_why():
    from conf.schema import EvaluateConfig
    from tasks.compress.choice import choose, pareto

    rows = [
        row("baseline", 0.90, 10.0, 1000),
        row("fast-but-wrong", 0.80, 2.0, 900),  # outside the 1-point tolerance
        row("fast", 0.895, 4.0, 800),
        row("small", 0.892, 6.0, 100),
        {"name": "crashed", "error": "RuntimeError: boom"},
    ]
    latency = EvaluateConfig(objective="latency", max_accuracy_drop=0.01)
    chosen, why = choose(rows, latency)
    assert (
        chosen["name"] == "fast" and "2 of 3 measured points (1 failed)" in why and "2.50×" in why
    )
    chosen, why = choose(rows, EvaluateConfig(objective="size", max_accuracy_drop=0.01))
    assert chosen["name"] == "small" and "10.00×" in why
    chosen, why = choose(rows[:2], latency)
    assert chosen is None and "the trained model is kept" in why
    for latency_ms in (11.0, 9.5):  # within budget, but slower, or faster only by noise
        slower = [rows[0], row("int8-on-avx2", 0.90, latency_ms, 500)]
        chosen, why = choose(slower, latency)
        assert chosen is None and "not better on latency_b256_p50_ms than the baseline" in why
    # dominated: small is beaten by nothing on size; fast-but-wrong is fastest; baseline most
    # accurate; nothing else is on the latency front
    assert pareto(rows, "latency_b1_p50_ms") == {"baseline", "fast", "fast-but-wrong"}
    assert pareto(rows, "size_encoded_bytes") == {"baseline", "fast", "small"}


BLOCKED = """
import json, sys

class NoPruningLibrary:  # as on a serving box where torch-pruning was never installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch_pruning", "onnx", "onnxscript") or name == "torch.onnx":
            raise ImportError(name + " is not installed here")

sys.meta_path.insert(0, NoPruningLibrary())
import mlflow, pandas as pd

mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
predictions = model.predict(pd.read_parquet(sys.argv[3]))
assert "torch_pruning" not in sys.modules
print(json.dumps([str(p) for p in predictions]))
"""


def test_the_search_keeps_its_budget_as_a_constraint_and_resumes(tmp_path):
    """compress.search's study, driven through `search` with figures computed from each
    point (so the test knows the answer: removing more is faster and less accurate): every
    trial is told its cost, accuracy and drop bound, a trial beyond the accuracy budget is
    infeasible to NSGA-II; a second call on the same folder (a killed run resumed) measures
    the finished trials again and runs only the rest; a per-layer ratio of 1 fails at
    validation naming the key."""
    import optuna

    from conf.schema import CompressSearch, EvaluateConfig
    from tasks.compress.search import make_study, search
    from tasks.store import StageDir

    baseline = {"name": "baseline", "torch_val_accuracy": 0.9, "torch_latency_b256_p50_ms": 10.0}
    asked: list[str] = []

    def figures(points):
        asked.extend(p["name"] for p in points)
        rows = []
        for p in points:
            removed = float(np.mean(p["ratios"]))
            rows.append(
                {
                    **p,
                    "torch_val_accuracy": 0.9 - 0.03 * removed,
                    "torch_latency_b256_p50_ms": 10.0 * (1 - removed) + 0.5,
                }
            )
        return rows

    # one layer, four widths (0 to 0.375 removed): six trials must ask for one again
    cfg = CompressSearch(enabled=True, trials=6, quantize=False, max_ratio=0.375)
    evaluate = EvaluateConfig(max_accuracy_drop=0.01)
    out = StageDir(tmp=tmp_path / "partial", final=tmp_path / "final")
    out.tmp.mkdir()
    arch = {"model": "mlp", "n_features": 8, "n_classes": 3, "hidden": [64], "dropout": 0.0}
    first = cfg.model_copy(update={"trials": 4})
    rows, line = search(dict(baseline), arch, first, evaluate, "torch", 2, out, figures)
    assert asked == [r["name"] for r in rows] and "4 search trials" in line
    asked.clear()
    rows, line = search(dict(baseline), arch, cfg, evaluate, "torch", 2, out, figures)
    study = make_study(out, cfg)
    trials = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(trials) == 6 and line.startswith("6 search trials")
    # one row per distinct point: the 4 measured again, then only the new ones
    distinct = {tuple(t.params.values()) for t in trials}
    assert asked == [r["name"] for r in rows] and len(rows) == len(distinct) < 6
    by_name = {r["name"]: r for r in rows}
    for trial in trials:
        row = by_name[trial.user_attrs["point"]]  # a repeat is told the first one's figures
        assert row["layer_removed"] == f"{trial.params['remove_0']:g}"
        assert trial.values == [row["latency_b256_p50_ms"], row["val_accuracy"]]
        (constraint,) = trial.constraints.values()  # NSGA-II: feasible at or below zero
        assert constraint == pytest.approx(row["val_drop_bound"] - evaluate.max_accuracy_drop)
        feasible = constraint <= 0
        assert feasible == (trial.params["remove_0"] <= 0.25)
    # when size is the objective a trial may cluster instead (smaller, not faster): its point
    # is narrowed, then k-means shared at the bits it chose, fine-tuned like the sweep's
    from tasks.compress.points import phases
    from tasks.compress.search import last_steps, trial_point

    assert last_steps(cfg, "latency") == ["none"]  # quantize false, latency: widths only
    steps = last_steps(CompressSearch(cluster_bits=[4, 6]), "size")
    assert steps == ["none", "quantize", "cluster-4", "cluster-6"]
    fixed = optuna.trial.FixedTrial({"remove_0": 0.25, "last_step": "cluster-4"}, 7)
    point = trial_point(fixed, 1, 0.5, steps)
    assert point["recipe"] == ["structured", "cluster"] and point["bits"] == 4
    compress = load_config(None, []).compress
    assert [ph.get("cluster_bits") for ph in phases(point, compress)] == [None, 4]
    # its fine-tune is its own: not the plain narrowing's, nor one clustered at other bits
    from tasks.compress import trunk_name

    names = {
        trunk_name(
            trial_point(
                optuna.trial.FixedTrial({"remove_0": 0.25, "last_step": s}, 8), 1, 0.5, steps
            ),
            trunk,
        )
        for s, trunk in (
            ("none", ["structured"]),
            ("cluster-4", ["structured", "cluster"]),
            ("cluster-6", ["structured", "cluster"]),
        )
    }
    assert names == {
        "structured-r0.25",
        "structured-r0.25+cluster-4b",
        "structured-r0.25+cluster-6b",
    }
    # and under size a trial may zero weights instead of narrowing: a magnitude point, its
    # shares ignored, fine-tuned as the sweep's point of the same recipe and level would be
    from tasks.compress.search import point_key, prunings

    assert prunings(cfg, "latency") == ["structured"]
    prunes = prunings(CompressSearch(magnitude=[0.7]), "size")
    assert prunes == ["structured", "magnitude-0.7"]
    zeroed = [
        trial_point(
            optuna.trial.FixedTrial(
                {"prune": "magnitude-0.7", "remove_0": removed, "last_step": "cluster-4"}, 9
            ),
            1,
            0.5,
            steps,
            tuple(prunes),
        )
        for removed in (0.25, 0.5)
    ]
    assert point_key(zeroed[0]) == point_key(zeroed[1]) != point_key(point)  # one point
    assert zeroed[0]["recipe"] == ["magnitude", "cluster"] and zeroed[0]["sparsity"] == 0.7
    assert [(ph["sparsity"], ph.get("cluster_bits")) for ph in phases(zeroed[0], compress)] == [
        (0.7, None),
        (0.7, 4),
    ]
    assert trunk_name(zeroed[0], ["magnitude", "cluster"]) == "magnitude-0.7+cluster-4b"
    with pytest.raises(ConfigError, match=r"compress\.search\.magnitude"):
        load_config(None, ["compress.search={enabled: true, magnitude: [1.0]}"])
    with pytest.raises(ConfigError, match=r"compress\.search\.cluster_bits"):
        load_config(None, ["compress.search={enabled: true, cluster_bits: [9]}"])
    with pytest.raises(ConfigError, match=r"compress\.search\.max_ratio"):
        load_config(None, ["compress.search={enabled: true, max_ratio: 1.0}"])
    with pytest.raises(ConfigError, match=r"compress\.search\.enabled"):
        load_config(None, ["compress.recipe=[]", "compress.search.enabled=true"])


@pytest.mark.slow
def test_a_sweep_registers_a_slim_clustered_model_served_from_its_codebooks(
    prefect_harness, digits_frame, tmp_path
):
    """The uncompressed model first (the champion), then a sweep over the same training:
    one nested run per point and a Pareto table; the smallest point (structured + 4-bit
    k-means sharing) is chosen under `evaluate.objective: size` and takes `champion`. It is
    registered as its codebooks and packed indices (`encoded.npz`, decoded at load, no
    model.pt), which is the size compress reports, and served without the pruning library
    it reproduces its test accuracy."""
    from flows.pipeline import pipeline

    source = tmp_path / "digits.csv"
    digits_frame.to_csv(source, index=False)
    common = [
        "data.label=digit",
        "train.hidden=[128, 64]",
        "train.epochs=8",
        "train.batch_size=32",
        "evaluate.objective=size",
        "evaluate.max_accuracy_drop=1.0",  # the smallest point whatever it scores
    ]
    unpruned = make_config(tmp_path, source, *common, "compress.recipe=[]")
    cfg = make_config(
        tmp_path,
        source,
        *common,
        "compress.recipe=auto",
        "compress.sweep={recipes: [[structured, quantize], [structured, qat],"
        " [structured, cluster], [magnitude]], sparsity: [0.5], bits: [4]}",
        "compress.finetune_epochs=2",
        # and a trial of the per-layer search (float: the cluster point stays smallest)
        "compress.search={enabled: true, trials: 1, quantize: false, max_ratio: 0.5, magnitude: []}",
        "serve.runtime=auto",  # each point measured in torch and onnxruntime
    )
    champion = pipeline(unpruned)
    result = pipeline(cfg)
    assert champion["promotion"]["alias"] == "champion"
    assert result["promotion"]["alias"] == "champion", result["promotion"]
    assert "better zstd size" in result["promotion"]["why"]
    assert f"against champion v{champion['promotion']['version']}" in result["promotion"]["why"]
    client = MlflowClient(cfg.tracking.uri)
    runs = stage_runs(client, result["parent_run_id"])
    stage = runs["compress"]
    assert stage.data.tags["accelflow.cached"] == "false"
    points = client.search_runs(
        [stage.info.experiment_id], f"tags.mlflow.parentRunId = '{stage.info.run_id}'"
    )
    by_name = {p.info.run_name: p.data for p in points}
    assert set(by_name) == {
        "baseline",
        "structured-0.5+quantize",
        "structured-0.5+qat",
        "structured-0.5+cluster-4b",
        "magnitude-0.5",
        "search-00",
    }
    summary = client.download_artifacts(stage.info.run_id, "compress/summary.md", str(tmp_path))
    assert "1 search trial (NSGA-II" in Path(summary).read_text()
    # the trial's share of each layer removed, in its params; the MACs it took away
    removed = [float(r) for r in by_name["search-00"].params["compress.layer_removed"].split()]
    assert len(removed) == 2 and all(0 <= r <= 0.5 for r in removed)
    macs = by_name["search-00"].metrics["point/macs"]
    assert (macs < by_name["baseline"].metrics["point/macs"]) == any(removed)
    assert [n for n, p in by_name.items() if p.tags["accelflow.point.chosen"] == "true"] == [
        "structured-0.5+cluster-4b"
    ]
    # the quantization-aware point is int8 as structured+quantize is: the same widths, in int8
    qat, ptq = (by_name[f"structured-0.5+{s}"].metrics for s in ("qat", "quantize"))
    assert qat["point/torch_size_bytes"] == pytest.approx(ptq["point/torch_size_bytes"], rel=0.02)
    assert qat["point/torch_size_bytes"] < 0.5 * by_name["baseline"].metrics["point/size_bytes"]
    for name, point in by_name.items():
        for key in ("val_accuracy", "latency_b1_p95_ms", "served_b256_ms", "macs"):
            assert point.metrics[f"point/{key}"] > 0, (name, key)
        # measured in both runtimes; served by the smaller file (the objective) within budget
        m, runtime = point.metrics, point.tags["accelflow.point.runtime"]
        sizes = {r: m[f"point/{r}_size_zstd_bytes"] for r in ("torch", "onnxruntime")}
        assert runtime == min(sizes, key=sizes.get), (name, sizes)
        assert m["point/size_zstd_bytes"] == sizes[runtime]
        assert m["point/onnxruntime_latency_b256_p50_ms"] > 0
        in_int8 = any(step in name for step in ("quantize", "qat"))
        if not in_int8:  # a float export answers as torch does, row for row
            assert m["point/onnx_max_abs_diff"] < 1e-3 and m["point/onnx_differing_rows"] == 0
    # each point is a logged model too: the Models tab compares them, their validation
    # figures linked to them and to the split measured on; the pipeline's run lists them
    models = client.search_logged_models([stage.info.experiment_id])
    run_names = {p.info.run_id: p.info.run_name for p in points}
    points_of_run = {run_names[m.source_run_id]: m for m in models if m.source_run_id in run_names}
    assert set(points_of_run) == set(by_name)
    assert points_of_run["structured-0.5+cluster-4b"].name == "structured-0_5+cluster-4b"
    (partitions,) = (tmp_path / "work" / "partition").glob("[!.]*/manifest.json")
    val = split_identity(json.loads(partitions.read_text()), "val")
    for name, model in points_of_run.items():
        assert model.model_type == "compress-point" and model.status == "READY"
        linked = {m.key: m for m in model.metrics}
        # the Models tab's columns: accuracy, macro-F1, latency, size (the run keeps the rest)
        assert set(linked) == {
            "point/val_accuracy",
            "point/val_macro_f1",
            "point/latency_b256_p50_ms",
            "point/size_zstd_bytes",
        }
        assert linked["point/val_accuracy"].value == by_name[name].metrics["point/val_accuracy"]
        assert (
            linked["point/val_accuracy"].dataset_name,
            linked["point/val_accuracy"].dataset_digest,
        ) == val
    outputs = client.get_run(result["parent_run_id"]).outputs.model_outputs
    registered = client.get_model_version(
        cfg.registry.model_name, str(result["promotion"]["version"])
    )
    registered_model = logged_model_id(registered)
    assert {o.model_id for o in outputs} == {m.model_id for m in points_of_run.values()} | {
        registered_model
    }
    served = {m.key: m.value for m in client.get_logged_model(registered_model).metrics}
    assert served["test/accuracy"] == result["headline"]["test/accuracy"]
    # beside the points' columns, its own validation figures: the chosen point's
    chosen = by_name["structured-0.5+cluster-4b"].metrics
    assert served["point/val_accuracy"] == chosen["point/val_accuracy"]
    assert served["point/size_zstd_bytes"] == chosen["point/size_zstd_bytes"]
    # structured halves the MACs; magnitude's zeros leave them
    assert (
        by_name["structured-0.5+cluster-4b"].metrics["point/macs"]
        < 0.45 * by_name["baseline"].metrics["point/macs"]
    )
    assert (
        by_name["magnitude-0.5"].metrics["point/macs"] == by_name["baseline"].metrics["point/macs"]
    )
    assert (
        by_name["magnitude-0.5"].metrics["point/size_encoded_bytes"]
        < 0.7 * by_name["baseline"].metrics["point/size_bytes"]
    )
    pareto = Path(
        client.download_artifacts(stage.info.run_id, "compress/pareto.md", str(tmp_path))
    ).read_text()
    rows = [line for line in pareto.splitlines() if line.startswith("| ")][1:]  # not the header
    assert len(rows) == 6 and "Chosen: **structured-0.5+cluster-4b**" in pareto
    for artifact in ("compress/points.json", "compress/pareto.png"):
        assert client.download_artifacts(stage.info.run_id, artifact, str(tmp_path))
    compress = stage.data
    gate = client.download_artifacts(
        runs["evaluate"].info.run_id, "evaluate/gate.md", str(tmp_path)
    )
    assert Path(gate).read_text().startswith("## Gate: `champion`")
    (built,) = (tmp_path / "work" / "compress").glob("[!.]*/model.json")
    arch = json.loads(built.read_text())
    assert arch["hidden"] == [64, 32] and "quantize" not in arch
    trained = runs["train"].data.metrics["train/parameters"]
    assert compress.metrics["compress/parameters"] < 0.45 * trained
    parent = client.get_run(result["parent_run_id"]).data
    assert parent.metrics["prune/sparsity"] == pytest.approx(
        1 - compress.metrics["compress/nonzero_parameters"] / trained
    )
    # 4-bit indices for a quarter of the hidden weights: the registered file is that small
    assert parent.metrics["compress/size_ratio"] > 4
    chosen = by_name["structured-0.5+cluster-4b"].metrics
    assert chosen["point/size_bytes"] == chosen["point/size_encoded_bytes"]
    mlflow.set_tracking_uri(cfg.tracking.uri)
    version = result["promotion"]["version"]
    model_dir = mlflow.artifacts.download_artifacts(
        f"models:/{cfg.registry.model_name}/{version}", dst_path=str(tmp_path / "registered")
    )
    (meta,) = Path(model_dir).rglob("meta.json")  # the bundle's folder
    registered = meta.parent
    assert {p.name for p in registered.iterdir()} >= {"encoded.npz", "model.json"}
    assert not (registered / "model.pt").exists()
    assert (registered / "encoded.npz").stat().st_size == chosen["point/size_bytes"]
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


def test_figures_summed_over_chunks_are_scikit_learn_s():
    """Compress and evaluate score a split a chunk at a time and derive accuracy, precision,
    recall and macro-F1 from the summed confusion matrix: the same as scikit-learn's on the
    whole split, a class that is never predicted or never present included."""
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    from tasks.evaluate import class_figures, confusion_of, weak_classes

    rng = np.random.default_rng(0)
    for n in (2, 5, 7):
        y = rng.integers(0, n, 500)
        p = np.where(rng.random(500) < 0.6, y, rng.integers(0, n - 1, 500))  # n-1: never guessed
        confusion = sum(confusion_of(y[i : i + 64], p[i : i + 64], n) for i in range(0, 500, 64))
        figures = class_figures(confusion)
        assert figures["accuracy"] == pytest.approx((y == p).mean())
        assert figures["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
        precision, recall, _, _ = precision_recall_fscore_support(
            y, p, labels=list(range(n)), zero_division=0
        )
        assert np.allclose(figures["precision"], precision)
        assert np.allclose(figures["recall"], recall)
    # a class the model mostly misses is named above evaluate's tables; absent ones are not
    rows = [
        {"class": "common", "recall": 0.98, "support": 900},
        {"class": "rare", "recall": 0.0, "support": 7},
        {"class": "absent", "recall": 0.0, "support": 0},
    ]
    assert weak_classes(rows).startswith(
        "**Missed classes** (test recall under 50%): `rare` 0.00 of 7 rows. "
    )
    assert weak_classes([{"class": "a", "recall": 0.9, "support": 3}]) == ""


def test_kept_heads_attention_answers_as_multihead_attention_with_every_head():
    """The attention a head-pruned transformer runs, given all of nn.MultiheadAttention's
    heads (its weights in the same layout), answers as it does: same q/k/v/head order."""
    from tasks.training.models import KeptHeadsAttention

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    kept = KeptHeadsAttention(16, 4, 4, 0.0).eval()
    kept.load_state_dict(
        {
            "qkv.weight": mha.in_proj_weight,
            "qkv.bias": mha.in_proj_bias,
            "out_proj.weight": mha.out_proj.weight,
            "out_proj.bias": mha.out_proj.bias,
        }
    )
    x = torch.randn(3, 7, 16)
    with torch.inference_mode():
        expected = mha(x, x, x, need_weights=False)[0]
        assert torch.allclose(kept(x, x, x)[0], expected, atol=1e-5)


def test_an_int8_transformer_scores_in_eval_mode(tmp_path):
    """int8 of a transformer's linear layers, loaded as serving loads it, scores a batch in
    inference mode (PyTorch's fused encoder path read an int8 Linear's weight as a tensor and
    failed on every call) with answers close to the float model's."""
    from tasks.compress.points import quantize_saved
    from tasks.training.models import load_model

    arch = {"model": "transformer", **{"n_features": 64, "n_classes": 10, "dropout": 0.0}}
    arch |= {"hidden": [16, 16], "heads": 2, "image_shape": [1, 8, 8]}
    torch.manual_seed(0)
    float_model = build_model(arch).eval()
    torch.save(float_model.state_dict(), tmp_path / "model.pt")
    quantized = quantize_saved(arch, tmp_path / "model.pt", tmp_path / "model.json")
    model = load_model(quantized, str(tmp_path / "model.pt"))
    x = torch.randn(8, 64)
    with torch.inference_mode():
        expected, got = float_model(x), model(x)
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
    # the qat step's simulation computes as this int8 model does (each converted layer, and
    # attention's output projection left in float by both), so a quantization-aware
    # fine-tune learns the rounding serving will do
    from tasks.training.fake_int8 import simulate_int8

    converted = [m for m in model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert simulate_int8(float_model, True) == len(converted) > 0
    with torch.inference_mode():
        simulated = float_model(x)
    assert (simulated - got).abs().max() < 1e-4 < (expected - got).abs().max()


def test_int8_points_that_post_training_rounding_breaks_are_retried_with_qat():
    """compress.qat: an int8 point outside the budget whose float point is within it (or int8
    alone, the baseline being its float point) comes back as the same point with `qat`; one
    within the budget, or whose float point already fails, does not. Its fine-tune runs the
    recipe's phases in simulated int8, and a recipe cannot both quantize and qat."""
    from conf.schema import EvaluateConfig
    from tasks.compress.choice import qat_retries
    from tasks.compress.points import phases

    def point(name, recipe, accuracy, sparsity=None):
        return {**row(name, accuracy, 1.0, 1), "recipe": recipe, "sparsity": sparsity, "bits": None}

    rows = [
        point("baseline", [], 0.90),
        point("quantize", ["quantize"], 0.885),  # int8 alone costs 1.5 points
        point("structured-0.3", ["structured"], 0.899, 0.3),
        point("structured-0.3+quantize", ["structured", "quantize"], 0.88, 0.3),
        point("structured-0.5", ["structured"], 0.85, 0.5),  # narrowing already costs too much
        point("structured-0.5+quantize", ["structured", "quantize"], 0.84, 0.5),
        point("magnitude-0.5+quantize", ["magnitude", "quantize"], 0.899, 0.5),  # within
    ]
    retries = qat_retries(rows, EvaluateConfig(max_accuracy_drop=0.005))
    assert [(r["name"], r["recipe"]) for r in retries] == [
        ("qat", ["qat"]),
        ("structured-0.3+qat", ["structured", "qat"]),
    ]
    assert qat_retries(rows, EvaluateConfig(max_accuracy_drop=0.07)) == []  # all within

    cfg = load_config(None, ["compress.rounds=2", "compress.finetune_epochs=2"]).compress
    assert phases({**retries[0], "bits": None}, cfg) == [
        {"sparsity": None, "fake_int8": True, "epochs": 2, "lr": cfg.finetune_lr}
    ]
    ramp = phases({"recipe": ["magnitude", "qat"], "sparsity": 0.75, "bits": None}, cfg)
    assert [(p["sparsity"], p["fake_int8"]) for p in ramp] == [(0.5, True), (0.75, True)]
    with pytest.raises(ConfigError, match=r"quantize and qat each re-encode"):
        load_config(None, ["compress.recipe=[structured, quantize, qat]"])
