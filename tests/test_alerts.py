"""Run over run: a same-config rerun is not a regression, a deliberately worse run is (tag,
Prefect event, summary line); `accelflow compare` names exactly the key that changed; the
parent run's description holds the stage table."""

from __future__ import annotations

import time

import pytest
from conftest import make_config
from mlflow import MlflowClient

from flows.cli import compare
from flows.pipeline import pipeline
from tasks import alerts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def three_runs(prefect_harness, digits_frame, tmp_path_factory):
    """The same config twice, then tomorrow's snapshot as a nightly run sees it: other test
    rows (another split seed) and a learning rate too small to learn."""
    tmp = tmp_path_factory.mktemp("alerts")
    source = tmp / "digits.csv"
    digits_frame.to_csv(source, index=False)
    cfg = make_config(tmp, source, "data.label=digit", "compress.recipe=[]")
    worse = make_config(
        tmp, source, "data.label=digit", "compress.recipe=[]", "train.lr=1e-6", "data.seed=1"
    )
    runs = [pipeline(cfg), pipeline(cfg), pipeline(worse)]
    return cfg, runs, regression_events({r["parent_run_id"] for r in runs})


def regression_events(run_ids: set[str]) -> list:
    """The regression events these runs emitted (the harness is shared by the session)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    with get_client(sync_client=True) as client:
        for _ in range(20):  # events are written asynchronously
            page = client.read_events(
                EventFilter(event=EventNameFilter(name=["accelflow.run.regressed"])), limit=50
            )
            mine = [e for e in page.events if e.payload.get("run_id") in run_ids]
            if mine:
                return mine
            time.sleep(0.5)
    return []


def test_a_same_config_rerun_is_not_a_regression_and_a_worse_run_is(three_runs):
    cfg, (first, second, worse), events = three_runs
    assert first["regression"] == {
        "regressed": False,
        "previous": None,
        "why": "no earlier finished run on this data",
    }
    assert second["regression"]["regressed"] is False
    assert second["regression"]["previous"] == first["parent_run_id"]
    # like with like on new rows: the champion is re-scored on the worse run's own test rows
    # (their digest differs), the gate and the alert both judge on those rows
    assert worse["headline"]["gate/champion_accuracy"] > 0.8 > worse["headline"]["test/accuracy"]
    assert worse["regression"]["regressed"] is True
    assert worse["regression"]["previous"] is None  # no earlier run on these rows
    assert "below the champion's" in worse["regression"]["why"]
    assert "on the same test rows" in worse["regression"]["why"]
    # the registry's gate keeps the deliberately worse model out of `champion`
    assert worse["promotion"]["alias"] == "challenger", worse["promotion"]
    assert "re-scored on today's test rows" in worse["promotion"]["why"]
    assert "worse by more than evaluate.max_accuracy_drop" in worse["promotion"]["why"]

    client = MlflowClient(cfg.tracking.uri)
    tags = [client.get_run(r["parent_run_id"]).data.tags for r in (first, second, worse)]
    assert [t[alerts.TAG] for t in tags] == ["false", "false", "true"]
    (event,) = events  # one event, for the worse run only
    assert event.payload["run_id"] == worse["parent_run_id"]
    assert event.resource.id == f"accelflow.experiment.{cfg.tracking.experiment}"

    note = tags[2]["mlflow.note.content"]  # the run page's description
    # tomorrow's snapshot (another split seed): every stage ran on it
    assert "regression" in note and "| train | ran |" in note and "| ingest | ran |" in note


def test_compare_reports_exactly_the_changed_key(three_runs):
    cfg, (_, second, worse), _ = three_runs
    client = MlflowClient(cfg.tracking.uri)
    table = alerts.compare_runs(client, second["parent_run_id"], worse["parent_run_id"])
    assert [row["key"] for row in table["config"]] == ["data.seed", "train.lr"]
    assert {row["stage"] for row in table["stages"]} == set(alerts.STAGES)
    accuracy = next(r for r in table["metrics"] if r["metric"] == "test/accuracy")
    assert accuracy["b"] < accuracy["a"] and accuracy["change"] < 0
    loss = next(r for r in table["metrics"] if r["metric"] == "test/log_loss")
    assert loss["b"] > loss["a"] > 0  # the run that cannot learn is less sure of every row
    printed = compare(cfg, [])  # no ids: the experiment's last two runs, the same pair
    assert "train.lr" in printed and "0.003 → 1e-06" in printed
    logged = client.list_artifacts(worse["parent_run_id"], "compare")
    assert [a.path for a in logged] == [f"compare/{second['parent_run_id']}.json"]


def test_each_run_has_one_report_with_every_section_and_real_pictures(three_runs, tmp_path):
    import base64
    import io
    import re

    import matplotlib.image

    from flows.cli import write_report
    from tasks.report import SECTIONS

    cfg, (first, _, worse), _ = three_runs
    client = MlflowClient(cfg.tracking.uri)
    logged = client.list_artifacts(worse["parent_run_id"])
    assert "report.html" in {a.path for a in logged}
    out = tmp_path / "again.html"
    assert write_report(cfg, worse["parent_run_id"], str(out)) == f"wrote {out}"
    page = out.read_text()
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in page
    assert "train.lr" in page  # what changed since the previous run
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    for stage in ("partition", "reduce", "train", "evaluate"):
        assert any(c.startswith(f"{stage}:") for c in captions), (stage, captions)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(captions) >= 5
    for data in images:
        pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert pixels.std() > 0.01  # a real picture, not a blank canvas
    first_page = write_report(cfg, first["parent_run_id"], str(tmp_path / "first.html"))
    assert "nothing to compare with" in (tmp_path / "first.html").read_text(), first_page
