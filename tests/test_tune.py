"""The tune stage: an Optuna study whose trials run in parallel on a real Dask LocalCluster,
each a nested MLflow run; the train stage trains with the best trial's settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import make_config, stage_runs
from mlflow import MlflowClient

from conf.schema import TrainConfig, load_config
from tasks.errors import ConfigError
from tasks.tune import CONDITIONAL, suggest, trial_config, trial_epochs, with_defaults

BAD_SPACES = [
    ("tune.space.epochs={type: int, low: 1, high: 5}", r"tune.space.epochs: not a train.\* key"),
    ("tune.space.lrr={type: float, low: 0.1, high: 1}", r"tune.space.lrr: not a train.\* key"),
    ("tune.space.lr={type: float, low: 0.1, high: 0.01}", r"low \(0.1\) must be below high"),
    ("tune.space.lr={type: float, low: 0, high: 0.1, log: true}", r"log needs low > 0"),
    ("tune.space.optimizer={type: categorical, choices: []}", r"non-empty 'choices'"),
    (
        "tune.space.optimizer={type: categorical, choices: [adam, adamm]}",
        r"tune.space.optimizer: train.optimizer would reject 'adamm'",
    ),
    ("tune.space.dropout={type: float, low: 0.1, high: 1.5}", r"train.dropout would reject 1.5"),
    ("tune.trials=0", r"'tune.trials': .*greater than or equal to 1"),
    ("tune.epochs=0", r"'tune.epochs': .*greater than 0, or 'auto'"),
    ("tune.space.lr={type: float, low: 0.1}", r"float needs 'low' and 'high'"),
]


@pytest.mark.parametrize("override,message", BAD_SPACES)
def test_a_bad_space_fails_at_validation_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_momentum_and_nesterov_are_suggested_only_for_the_optimizers_that_use_them():
    cfg = load_config()
    space = with_defaults(cfg.tune.space, cfg.train)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(40):
        params = suggest(study.ask(), space, cfg.train)
        seen.add(params["optimizer"])
        for key, users in CONDITIONAL.items():
            assert (key in params) == (params["optimizer"] in users), params
        TrainConfig.model_validate({**cfg.train.model_dump(), **params})  # train.* accepts it
        assert isinstance(params["hidden"], list)  # list choices come back as lists
    assert seen == {"sgd", "adam", "adamw", "rmsprop"}


def test_a_trial_on_a_small_table_trains_for_tune_min_steps():
    """Three epochs of 455 rows at batch 128 are 12 steps; a trial gets 100 (25 epochs), a
    trial on 10,000 rows keeps tune.epochs, and tune.max_rows caps the rows counted."""
    cfg = load_config(None, ["tune.epochs=3", "tune.min_steps=100", "tune.max_rows=2000"])
    small = trial_config(cfg.train, {"batch_size": 128, "warmup_epochs": 2}, cfg.tune, 455)
    assert (small.epochs, small.warmup_epochs) == (25, 2)
    assert trial_config(cfg.train, {"batch_size": 32}, cfg.tune, 50_000).epochs == 3  # 189 steps
    wider = trial_config(cfg.train, {"batch_size": 512}, cfg.tune, 50_000)
    assert wider.epochs == 25  # 2,000 rows counted: 4 steps an epoch
    off = load_config(None, ["tune.epochs=3", "tune.min_steps=0"]).tune
    assert trial_config(cfg.train, {"batch_size": 128}, off, 455).epochs == 3


def test_asha_trials_grow_with_the_table():
    """tune.epochs auto under ASHA (rungs at 1, 3, 9, 27 epochs of tune.max_rows rows): the
    trials promoted through every rung see every training row, 9 to 27 epochs; 3 under
    the median pruner; a number is kept."""
    tune = load_config(None, []).tune
    assert (tune.pruner, tune.epochs, tune.max_rows) == ("asha", "auto", 10_000)
    rows = (455, 54_000, 90_000, 90_001, 5_000_000)
    assert [trial_epochs(tune, n) for n in rows] == [9, 9, 9, 27, 27]
    assert trial_epochs(load_config(None, ["tune.max_rows=null"]).tune, 54_000) == 9
    assert trial_epochs(load_config(None, ["tune.pruner=median"]).tune, 54_000) == 3
    assert trial_epochs(load_config(None, ["tune.epochs=4"]).tune, 5_000_000) == 4
    assert trial_config(TrainConfig(), {}, tune, 200_000).epochs == 27


def test_the_configs_own_value_joins_a_categorical_axis():
    cfg = load_config(
        None, ["train.optimizer=sgd", "tune.space.optimizer={type: categorical, choices: [adam]}"]
    )
    assert with_defaults(cfg.tune.space, cfg.train)["optimizer"].choices == ["sgd", "adam"]


# ---------------------------------------------------------------- the stage in the flow

TUNED = [
    "tune.enabled=true",
    "tune.trials=6",
    "tune.timeout_s=null",  # all six, however loaded the machine
    "tune.parallel=2",
    "dask.n_workers=2",  # the trials run two at a time, one per worker
    "tune.epochs=2",
    "tune.sampler=random",
    "tune.pruner=asha",  # aggressive: most trials stop after their first epoch
    "tune.confidence=0.9",  # the best must lead the default beyond the validation noise
    "tune.space={optimizer: {type: categorical, choices: [sgd]}, "
    "lr: {type: float, low: 0.00001, high: 0.3, log: true}, "
    "batch_size: {type: categorical, choices: [32, 64]}}",
    "train.optimizer=sgd",
    "train.hidden=[64]",
    # the reduce sweep rides along (its own test reads this run): one flow run, not two
    "reduce.sweep=[0.5, 0.9, 0.99, none]",
    "reduce.tolerance=0.02",
    "reduce.sweep_epochs=4",
]


@pytest.fixture(scope="module")
def tuned_run(prefect_harness, digits_frame, tmp_path_factory):
    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("tune")
    source = tmp / "digits.csv"
    digits_frame.to_csv(source, index=False)
    cfg = make_config(tmp, source, "data.label=digit", *TUNED)
    return cfg, pipeline(cfg), pipeline(cfg)


@pytest.mark.slow
def test_each_trial_is_a_nested_run_and_train_uses_the_best(tuned_run):
    cfg, first, _ = tuned_run
    client = MlflowClient(cfg.tracking.uri)
    runs = stage_runs(client, first["parent_run_id"])
    tune_run = runs["tune"]
    trials = client.search_runs(
        [tune_run.info.experiment_id], f"tags.mlflow.parentRunId = '{tune_run.info.run_id}'"
    )
    assert len(trials) == 6
    states = [t.data.tags["accelflow.trial.state"] for t in trials]
    assert set(states) <= {"complete", "pruned", "failed"}
    assert "pruned" in states  # the pruner stopped at least one poor trial
    # ASHA's first rung is after one epoch, and a trial's last epoch is never judged (a
    # pruned 2-epoch trial would be its training lost)
    for t, state in zip(trials, states, strict=True):
        epochs = len(client.get_metric_history(t.info.run_id, "val/accuracy"))
        assert state == "failed" or epochs == {"pruned": 1, "complete": 2}[state]
    assert [t.data.tags["accelflow.trial.default"] for t in trials].count("true") == 1
    for t in trials:
        assert {"train.optimizer", "train.lr", "train.batch_size"} <= set(t.data.params)
        assert t.info.status == (
            "KILLED" if t.data.tags["accelflow.trial.state"] == "pruned" else "FINISHED"
        )
        assert client.get_metric_history(t.info.run_id, "val/accuracy")  # its curve, per epoch

    metrics = tune_run.data.metrics
    assert (
        metrics["tune/trials_complete"]
        + metrics["tune/trials_pruned"]
        + metrics["tune/trials_failed"]
        == 6
    )
    best = max(
        (t for t in trials if t.data.tags["accelflow.trial.state"] == "complete"),
        key=lambda t: t.data.metrics["trial/val_accuracy"],
    )
    assert metrics["tune/best_val_accuracy"] == pytest.approx(
        best.data.metrics["trial/val_accuracy"]
    )
    parent = client.get_run(first["parent_run_id"]).data.metrics
    assert parent["tune/best_val_accuracy"] == metrics["tune/best_val_accuracy"]
    (default,) = [t for t in trials if t.data.tags["accelflow.trial.default"] == "true"]
    # ASHA never stops the default trial: it is what the best must beat
    assert default.data.tags["accelflow.trial.state"] == "complete"
    assert "tune/gain" in parent and parent["test/accuracy"] > 0.8
    # the best trial's lead over the default, judged on both trials' per-row answers
    judged = best.info.run_id != default.info.run_id
    assert ("tune/lead_lower_bound" in metrics) == judged == ("tune/lead_lower_bound" in parent)
    kept = judged and metrics["tune/lead_lower_bound"] <= 0
    chosen = default if kept else best
    train = runs["train"].data
    for key in ("train.lr", "train.batch_size"):  # trained with the chosen trial's values
        assert float(train.params[key]) == pytest.approx(float(chosen.data.params[key]))
        tag = f"accelflow.tuned.{key.split('.')[1]}"
        assert train.tags.get(tag) == (None if kept else "search")
    assert train.params["train.epochs"] == "3"  # train.*'s own budget, not the trial's
    artifacts = {a.path for a in client.list_artifacts(tune_run.info.run_id, "tune")}
    assert {"tune/tune-history.png", "tune/leaderboard.json"} <= artifacts


@pytest.mark.slow
def test_a_second_run_reuses_the_search_and_the_training(tuned_run):
    cfg, first, second = tuned_run
    status = {row["stage"]: row["status"] for row in second["stages"]}
    assert status["tune"] == "cached" and status["train"] == "cached"
    client = MlflowClient(cfg.tracking.uri)
    tune_run = stage_runs(client, second["parent_run_id"])["tune"]
    nested = client.search_runs(
        [tune_run.info.experiment_id], f"tags.mlflow.parentRunId = '{tune_run.info.run_id}'"
    )
    assert nested == []  # no trial ran again


@pytest.mark.slow
def test_the_reduce_sweep_trains_each_target_and_the_stage_uses_the_pick(tuned_run):
    cfg, first, _ = tuned_run
    client = MlflowClient(cfg.tracking.uri)
    reduce_run = stage_runs(client, first["parent_run_id"])["reduce"]
    points = client.search_runs(
        [reduce_run.info.experiment_id], f"tags.mlflow.parentRunId = '{reduce_run.info.run_id}'"
    )
    by_target = {p.data.params["reduce.variance_target"]: p for p in points}
    assert sorted(by_target) == ["0.5", "0.9", "0.99", "none"]
    accuracy = {t: p.data.metrics["sweep/val_accuracy"] for t, p in by_target.items()}
    features = {t: p.data.metrics["sweep/features"] for t, p in by_target.items()}
    assert features["none"] == 64 and features["0.5"] < features["0.9"] < features["0.99"]
    best = max(accuracy.values())
    expected = min((t for t in accuracy if accuracy[t] >= best - 0.02), key=features.get)
    chosen = [t for t, p in by_target.items() if p.data.tags["accelflow.sweep.chosen"] == "true"]
    assert chosen == [expected]
    assert reduce_run.data.metrics["reduce/components"] == features[expected]  # the pick used
    summary = Path(client.download_artifacts(reduce_run.info.run_id, "reduce/summary.md"))
    assert "reduce.sweep picked" in summary.read_text()
    artifacts = {a.path for a in client.list_artifacts(reduce_run.info.run_id, "reduce")}
    assert {"reduce/reduce-sweep.png", "reduce/sweep.json"} <= artifacts


def test_a_search_that_sees_no_signal_says_so():
    """Every trial at the majority-class rate (too few rows or epochs to learn anything):
    the search warns, naming the keys to change; one trial above it is signal."""
    from tasks.tune import no_signal

    flat = [{"val_accuracy": 0.7621}, {"val_accuracy": 0.7621}, {"val_accuracy": None}]
    warning = no_signal(flat, 0.7621)
    assert "majority-class rate (0.7621" in warning and "tune.max_rows" in warning
    assert no_signal([*flat, {"val_accuracy": 0.80}], 0.7621) is None


def test_a_search_ended_by_its_clock_says_so():
    from tasks.tune import trials_ran, tuned_figure

    cfg = load_config(None, ["tune.trials=16", "tune.timeout_s=60"]).tune
    assert trials_ran(16, cfg) == "16 trials"
    assert trials_ran(6, cfg).startswith("6 of 16 trials (tune.timeout_s 60 s ended the search")
    board = [{"trial": i} for i in range(6)]
    figure = tuned_figure({"planned": 16, "leaderboard": board, "metrics": {}})
    assert figure == "6 of 16 trials"


@pytest.mark.parametrize("metric", ["val_accuracy", "val_macro_f1", "val_loss"])
def test_a_lead_within_the_validation_noise_keeps_the_configs_settings(metric):
    """The same lead, 0.3% of the rows (2% put right, 1.7% put wrong), on 1,000 and on
    30,000 validation rows: chance on the few, beyond the noise on the many; the words say
    which, and what train takes."""
    from tasks.paired import gain_and_bound
    from tasks.tune import verdict

    cfg = load_config(None, [f"tune.metric={metric}", "tune.confidence=0.9"]).tune
    best = {"trial": 7, "params": {"lr": 0.01}}
    for n, holds in ((1_000, False), (30_000, True)):
        row = np.arange(n)
        label = row % 4
        default = {"predicted": np.where(row % 5 == 0, (label + 1) % 4, label)}
        won, lost = (row % 5 == 0) & (row < n // 10), (row % 5 == 1) & (row < n * 85 // 1000)
        mine = np.where(won, label, np.where(lost, (label + 1) % 4, default["predicted"]))
        default["loss"] = (default["predicted"] != label).astype(np.float32)
        point = {"predicted": mine, "loss": (mine != label).astype(np.float32)}
        gain, bound = gain_and_bound(metric, label, default, point, cfg.confidence)
        assert gain > 0 and gain > bound
        assert (bound > 0) == holds
        words = verdict((gain, bound), cfg, best)
        assert ("Train uses: lr=0.01" in words) == holds
        assert ("within the validation noise: train keeps its own settings" in words) != holds
        taken = verdict((gain, bound), cfg.model_copy(update={"confidence": None}), best)
        assert "Train uses: lr=0.01" in taken and ("may be chance" in taken) != holds


def test_train_keeps_its_settings_when_the_best_trials_lead_is_chance(tmp_path):
    """The study's summary, from a real (in-memory) Optuna study and the trials' per-row
    answers on disk: a best trial one row ahead of the default on 400 leaves train.* as
    given (no values to lay over it, the figure says kept); 40 rows ahead, it is taken."""
    from tasks.store import StageDir
    from tasks.tune import answers_path, summarize, tuned_figure

    cfg = load_config(None, ["tune.confidence=0.9"]).tune
    out = StageDir(tmp_path, tmp_path)
    label = np.arange(400) % 2
    for ahead, kept in ((1, True), (40, False)):
        study = optuna.create_study(direction="maximize")
        for number, (right, default) in enumerate(((300, True), (300 + ahead, False))):
            predicted = np.where(np.arange(400) < right, label, 1 - label)
            answers_path(out, number).parent.mkdir(exist_ok=True)
            loss = (predicted != label).astype(np.float32)
            np.savez(answers_path(out, number), label=label, predicted=predicted, loss=loss)
            attrs = {"default": default, "val_accuracy": right / 400, "seconds": 1.0}
            attrs["train_params"] = {"lr": 0.003 if default else 0.01}
            study.add_trial(optuna.trial.create_trial(value=right / 400, user_attrs=attrs))
        summary = summarize(study, cfg, out, 0, 1.0, 1000)
        assert summary["kept_default"] == kept
        assert summary["best_params"] == ({} if kept else {"lr": 0.01})
        assert summary["metrics"]["tune/gain"] == pytest.approx(ahead / 400)
        assert ("kept train.*" in tuned_figure(summary)) == kept
