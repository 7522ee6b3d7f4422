"""The reduce sweep's rule and validation. The sweep in a real flow run (one proxy training
per target on the Dask cluster, each a nested run under `reduce`) is tested in test_tune.py,
on the run that test makes anyway."""

from __future__ import annotations

import pytest

from conf.schema import ReduceConfig, load_config
from tasks.errors import ConfigError
from tasks.reduce.sweep import pick


def test_smallest_within_takes_the_fewest_features_near_the_best():
    points = [
        {"target": 0.8, "features": 10, "val_accuracy": 0.90},
        {"target": 0.95, "features": 30, "val_accuracy": 0.946},
        {"target": 0.99, "features": 50, "val_accuracy": 0.95},
        {"target": "none", "features": 64, "val_accuracy": 0.949},
    ]
    chosen, why = pick(points, ReduceConfig(sweep=[0.8, 0.95], tolerance=0.005))
    assert chosen["target"] == 0.95 and "30" in why
    assert pick(points, ReduceConfig(sweep=[0.8, 0.95], pick="best"))[0]["target"] == 0.99
    assert pick(points, ReduceConfig(sweep=[0.8, 0.95], tolerance=0.1))[0]["target"] == 0.8


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["reduce.sweep=[0.9]"], "at least two targets"),
        (["reduce.sweep=[0.9, 1.5]"], r"in \(0, 1\] or 'none'; got \[1.5\]"),
        (["reduce.sweep=[0.9, none]", "reduce.method=none"], "reduce.method is 'none'"),
        (["reduce.sweep=[0.9, none]", "train.model=cnn"], "needs the raw images"),
    ],
)
def test_a_bad_sweep_fails_at_validation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
