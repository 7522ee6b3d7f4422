"""Run over run, as a nightly schedule sees it: a same-config rerun is not a regression; a
third night brings a shifted column and a deliberately worse model: drift is flagged
against the champion's data contract (tag, Prefect event naming the column, summary line),
the regression too, and the model stays challenger. `accelflow compare` names exactly the
keys that changed; the parent run's description holds the stage table."""

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
    """The same config twice, then the third night's snapshot: other test rows (another
    split seed), one column shifted (a sensor recalibrated), and a learning rate too small
    to learn."""
    tmp = tmp_path_factory.mktemp("alerts")
    source, shifted = tmp / "digits.csv", tmp / "digits-night3.csv"
    # a categorical with more values than data.max_onehot: the MLP learns its embedding
    frame = digits_frame.assign(writer=[f"w{i % 20}" for i in range(len(digits_frame))])
    frame.to_csv(source, index=False)
    frame.assign(pixel_2_3=frame["pixel_2_3"] + 9).to_csv(shifted, index=False)
    cfg = make_config(
        tmp, source, "data.label=digit", "compress.recipe=[]", "evaluate.reference=auto"
    )
    worse = make_config(
        tmp,
        shifted,
        "data.label=digit",
        "compress.recipe=[]",
        "evaluate.reference=auto",
        "train.lr=1e-6",
        "data.seed=1",
    )
    runs = [pipeline(cfg), pipeline(cfg), pipeline(worse)]
    ids = {r["parent_run_id"] for r in runs}
    return cfg, runs, events("accelflow.run.regressed", ids), events("accelflow.data.drifted", ids)


def events(name: str, run_ids: set[str]) -> list:
    """The events `name` these runs emitted (the harness is shared by the session)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    with get_client(sync_client=True) as client:
        for _ in range(20):  # events are written asynchronously
            page = client.read_events(EventFilter(event=EventNameFilter(name=[name])), limit=50)
            mine = [e for e in page.events if e.payload.get("run_id") in run_ids]
            if mine:
                return mine
            time.sleep(0.5)
    return []


def test_a_same_config_rerun_is_not_a_regression_and_a_worse_run_is(three_runs):
    cfg, (first, second, worse), regressed, _ = three_runs
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
    # the gradient-boosting reference, fitted on the same rows, beside the network
    assert first["headline"]["reference/accuracy"] > 0.85  # digits: boosting does well
    assert worse["headline"]["reference/accuracy"] > 0.85 > worse["headline"]["test/accuracy"]
    assert "on the same test rows" in worse["regression"]["why"]
    # the registry's gate keeps the deliberately worse model out of `champion`
    assert worse["promotion"]["alias"] == "challenger", worse["promotion"]
    assert "re-scored on today's test rows" in worse["promotion"]["why"]
    assert "worse by more than evaluate.max_accuracy_drop" in worse["promotion"]["why"]

    client = MlflowClient(cfg.tracking.uri)
    tags = [client.get_run(r["parent_run_id"]).data.tags for r in (first, second, worse)]
    assert [t[alerts.TAG] for t in tags] == ["false", "false", "true"]
    (event,) = regressed  # one event, for the worse run only
    assert event.payload["run_id"] == worse["parent_run_id"]
    assert event.resource.id == f"accelflow.experiment.{cfg.tracking.experiment}"

    note = tags[2]["mlflow.note.content"]  # the run page's description
    # tomorrow's snapshot (another split seed): every stage ran on it
    assert "regression" in note and "| train | ran |" in note and "| ingest | ran |" in note


def test_the_champion_s_data_contract_flags_the_shifted_column_and_only_it(three_runs):
    cfg, (first, second, worse), _, drifted = three_runs
    assert first["monitor"] is None  # no champion yet: nothing to compare with
    assert "not measured" in first["drift"]
    # the same data against the champion's own contract: no finding, no drift
    assert second["monitor"]["findings"] == [] and second["monitor"]["drifted"] == []
    assert second["monitor"]["max_psi"] < 0.01
    # the shifted column, and only it, beyond monitor.max_psi and out of range (warned)
    night3 = worse["monitor"]
    assert night3["drifted"] == ["pixel_2_3"], night3["drift"][:3]
    assert [(f["kind"], f["column"], f["action"]) for f in night3["findings"]] == [
        ("out_of_range", "pixel_2_3", "warn")
    ]
    assert "outside [0, 16]" in night3["findings"][0]["line"]
    assert "pixel_2_3 (PSI" in worse["drift"]
    (event,) = drifted  # one event, for the third night only, naming the column
    assert event.payload["run_id"] == worse["parent_run_id"]
    assert event.payload["columns"] == ["pixel_2_3"]
    assert (
        event.payload["champion"] == f"{cfg.registry.model_name} v{first['promotion']['version']}"
    )
    client = MlflowClient(cfg.tracking.uri)
    tags = client.get_run(worse["parent_run_id"]).data.tags
    assert tags["accelflow.drift"] == "pixel_2_3"
    assert "drift against" in tags["mlflow.note.content"]
    ingest_run = {
        r.info.run_name: r
        for r in client.search_runs(
            [client.get_run(worse["parent_run_id"]).info.experiment_id],
            f"tags.mlflow.parentRunId = '{worse['parent_run_id']}'",
        )
    }["ingest"]
    drawn = {a.path for a in client.list_artifacts(ingest_run.info.run_id, "ingest")}
    assert "ingest/drift.png" in drawn


def test_compare_reports_exactly_the_changed_key(three_runs):
    cfg, (_, second, worse), _, _ = three_runs
    client = MlflowClient(cfg.tracking.uri)
    table = alerts.compare_runs(client, second["parent_run_id"], worse["parent_run_id"])
    assert [row["key"] for row in table["config"]] == ["data.seed", "data.source", "train.lr"]
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

    cfg, (first, _, worse), _, _ = three_runs
    client = MlflowClient(cfg.tracking.uri)
    logged = client.list_artifacts(worse["parent_run_id"])
    assert "report.html" in {a.path for a in logged}
    out = tmp_path / "again.html"
    assert write_report(cfg, worse["parent_run_id"], str(out)) == f"wrote {out}"
    page = out.read_text()
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in page
    assert "train.lr" in page  # what changed since the previous run
    # the headline card: the worse run against the champion on its rows and the reference
    card = page[page.index('<div class="card">') : page.index("</div>")]
    accuracy = worse["headline"]["test/accuracy"]
    assert f"<td>test accuracy</td><td>{accuracy:.4f}</td>" in card
    champion = worse["headline"]["gate/champion_accuracy"]
    assert f"the champion on the same rows: {champion:.4f} ({accuracy - champion:+.4f})" in card
    assert "gradient boosting: " in card and "ms per 256 rows" in card
    # compress.recipe []: the registered network is the trained one, and the card says so
    assert card.count("the trained model itself (compress kept it)") == 2  # latency, size
    # figures in units, a ratio with its direction
    assert "× smaller on disk than the source" in page and " kB</td>" in page
    assert "<td>drift</td><td>pixel_2_3 (against" in page  # the column that drifted
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    # no reduce picture: auto passes the table through (PCA would mix the writer's codes)
    for stage in ("partition", "train", "evaluate"):
        assert any(c.startswith(f"{stage}:") for c in captions), (stage, captions)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(captions) >= 5
    for data in images:
        pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert pixels.std() > 0.01  # a real picture, not a blank canvas
    first_page = write_report(cfg, first["parent_run_id"], str(tmp_path / "first.html"))
    assert "nothing to compare with" in (tmp_path / "first.html").read_text(), first_page


def test_batch_scoring_reproduces_the_champion_and_refuses_a_broken_contract(three_runs, tmp_path):
    """`accelflow score`'s flow on the first night's test rows, as a user holds them (raw,
    no label): the same predictions as the champion loaded through MLflow, row for row, in
    the file's order; logged as a run; a file without a column the model needs is refused
    before anything is scored."""
    import mlflow
    import numpy as np
    import pandas as pd
    from conftest import raw_test_rows

    from flows.score import score
    from tasks.errors import DataError

    cfg, (first, *_), _, _ = three_runs
    rows, labels = raw_test_rows(cfg.data.source, cfg)
    rows.loc[rows.index[0], "writer"] = "a-writer-never-seen"  # scored with the <rare> code
    source = tmp_path / "today.csv"
    rows.to_csv(source, index=False)
    out = tmp_path / "scored" / "predictions.parquet"
    result = score(str(source), str(out), "champion", None, cfg)
    scored = pd.read_parquet(out)
    assert result["rows"] == len(rows) == len(scored) and result["bad_rows"] == 0
    assert scored["row"].tolist() == list(range(len(rows)))  # the source's order
    mlflow.set_tracking_uri(cfg.tracking.uri)
    champion = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@champion")
    (embedded,) = champion.unwrap_python_model().predictor.model.embeddings  # writer's codes
    assert embedded.num_embeddings == 21  # 20 writers and <rare>
    expected = np.asarray(champion.predict(rows)).astype(str)
    assert (scored["prediction"].to_numpy() == expected).all()
    probabilities = scored.filter(like="proba_").to_numpy()
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert (scored["prediction"] == labels.astype(str)).mean() > 0.8  # it is the good model
    run = mlflow.MlflowClient().get_run(result["run_id"])
    assert run.data.params["score.version"] == str(first["promotion"]["version"])
    assert run.data.metrics["score/rows"] == len(rows)
    assert run.data.tags["accelflow.drift"] == ""  # the champion's own kind of rows

    broken = tmp_path / "broken.csv"
    rows.drop(columns=["pixel_3_3"]).to_csv(broken, index=False)
    with pytest.raises(DataError, match=r"column 'pixel_3_3' \(numeric\) is missing"):
        score(str(broken), str(tmp_path / "never.parquet"), "champion", None, cfg)
    assert not (tmp_path / "never.parquet").exists()
