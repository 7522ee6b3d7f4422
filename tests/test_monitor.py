"""The data contract: one finding per kind of violation, one line naming the column, with the
action `monitor.on_violation` gives it; drift as PSI on the contract's own bins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conf.schema import DataConfig, MonitorConfig
from tasks.ingest import ingest_dataset
from tasks.monitor import compare, first_few, psi
from tasks.store import run_stage

CHAMPION = "accelflow-classifier v1"


@pytest.fixture(scope="module")
def table(digits_frame):
    """600 digits with a string categorical column: the champion's training data."""
    frame = digits_frame.iloc[:600].copy()
    frame["colour"] = np.array(["red", "green", "blue"])[np.arange(600) % 3]
    return frame


def ingested(tmp_path, cluster, frame, name):
    path = tmp_path / f"{name}.csv"
    frame.to_csv(path, index=False)
    return ingest_into(tmp_path / name, DataConfig(source=str(path), label="digit"), cluster)


def ingest_into(folder, cfg, cluster=None):
    """The ingest stage's manifest for `cfg`, built in `folder` as a run builds it."""
    return run_stage(
        folder,
        "ingest",
        "1",
        cfg.model_dump(mode="json"),
        [],
        lambda out: ingest_dataset(cfg, out, cluster),
    ).manifest


@pytest.fixture(scope="module")
def contract(table, cluster, tmp_path_factory):
    manifest = ingested(tmp_path_factory.mktemp("champion"), cluster, table, "champion")
    with open(manifest["contract"]["path"]) as fh:
        return json.load(fh)


def test_the_contract_describes_the_training_data(contract, table):
    assert contract["rows"] == pytest.approx(0.8 * len(table), rel=0.1)
    assert set(contract["labels"]) == set(table["digit"])
    assert sum(contract["labels"].values()) == pytest.approx(1.0)
    colour = contract["columns"]["colour"]
    assert colour["kind"] == "categorical"
    assert set(colour["categories"]) >= {"red", "green", "blue"}
    pixel = contract["columns"]["pixel_2_3"]
    assert pixel["kind"] == "numeric" and pixel["min"] >= 0 and pixel["max"] <= 16
    assert len(pixel["shares"]) == len(pixel["edges"]) + 1
    assert sum(pixel["shares"]) == pytest.approx(1.0)


def shift(frame, column, by):
    return frame.assign(**{column: frame[column] + by})


@pytest.mark.parametrize(
    "change, kind, column, action, words",
    [
        (
            lambda f: f.drop(columns=["pixel_0_1"]),
            "missing_column",
            "pixel_0_1",
            "error",
            "is missing",
        ),
        (lambda f: f.assign(extra=1.5), "new_column", "extra", "warn", "is new"),
        (
            lambda f: f.assign(pixel_0_2="v" + f["pixel_0_2"].astype(str)),
            "type_change",
            "pixel_0_2",
            "error",
            "is categorical today but was numeric",
        ),
        (
            lambda f: f.assign(colour=np.where(np.arange(len(f)) % 2, "purple", f["colour"])),
            "unseen_categories",
            "colour",
            "warn",
            "hold categories accelflow-classifier v1 never saw",
        ),
        (lambda f: shift(f, "pixel_2_3", 40), "out_of_range", "pixel_2_3", "warn", "lie outside"),
        (
            lambda f: f.assign(digit=f["digit"].replace("d9", "d10")),
            "labels",
            "<label>",
            "error",
            "new label(s) ['d10'] and label(s) ['d9'] vanished",
        ),
    ],
    ids=["missing", "new", "type", "unseen", "range", "labels"],
)
def test_each_violation_is_one_line_naming_its_column(
    change, kind, column, action, words, table, contract, cluster, tmp_path
):
    today = ingested(tmp_path, cluster, change(table.copy()), "today")
    result = compare(contract, today, MonitorConfig(), CHAMPION)
    (finding,) = [f for f in result["findings"] if f["kind"] == kind]
    assert finding["column"] == column and finding["action"] == action
    assert words in finding["line"] and "\n" not in finding["line"]
    if column != "<label>":
        assert f"'{column}'" in finding["line"]
    assert (finding["line"] in result["errors"]) == (action == "error")
    # the action is the config's: the same finding only warns when told to
    relaxed = compare(contract, today, MonitorConfig(on_violation={kind: "warn"}), CHAMPION)
    assert not [f for f in relaxed["findings"] if f["kind"] == kind and f["action"] == "error"]


def test_drift_is_psi_on_the_contract_s_bins(table, contract, cluster, tmp_path):
    same = compare(contract, ingested(tmp_path, cluster, table, "same"), MonitorConfig(), CHAMPION)
    assert same["findings"] == [] and same["drifted"] == [] and same["max_psi"] < 1e-6
    moved = ingested(tmp_path, cluster, shift(table, "pixel_4_4", 3), "moved")
    result = compare(contract, moved, MonitorConfig(), CHAMPION)
    assert result["drifted"] == ["pixel_4_4"]  # within range mostly, but its deciles moved
    assert result["drift"][0]["column"] == "pixel_4_4"
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.4 * np.log(1.8) - 0.4 * np.log(0.2))
    # 180 rows drawn from the very same 40 categories: noise, not drift, once bins expected
    # to hold fewer than 5 of them are pooled; a real shift still shows
    rng = np.random.default_rng(0)
    expected = np.full(40, 1 / 40)
    drawn = np.bincount(rng.integers(0, 40, 180), minlength=40) / 180
    assert psi(expected, drawn) > 0.2 > 0.1 > psi(expected, drawn, rows=180)
    shifted = np.bincount(rng.integers(0, 10, 180), minlength=40) / 180  # a quarter of them
    assert psi(expected, shifted, rows=180) > 0.2


def test_a_drift_line_names_the_most_drifted_columns_and_counts_the_rest():
    """An image drifts in hundreds of pixel columns: the tag and the summary line name the
    first ten (the lists are sorted by PSI) and count the others."""
    columns = [f"pixel_{i}" for i in range(700)]
    assert first_few(columns) == ", ".join(columns[:10]) + " and 690 more"
    assert first_few(columns[:10]) == ", ".join(columns[:10])
    assert first_few(["pixel_2_3"]) == "pixel_2_3"


def test_images_drift_by_brightness_and_contrast_not_pixel_by_pixel(fmnist_small, tmp_path):
    """Fashion-MNIST as the champion saw it, then the same photographs over-exposed (a camera
    re-set): the contract holds each image's brightness and contrast deciles; the same
    images read as no drift, the over-exposed ones drift in both statistics (and are out of
    the champion's range), and images of another size are a type change."""
    from conftest import write_idx

    from tasks.readers import read_idx

    def images(name, change=None):
        folder = tmp_path / name
        folder.mkdir()
        for kind in ("train", "t10k"):
            pixels = read_idx(fmnist_small / f"{kind}-images-idx3-ubyte.gz")
            write_idx(folder / f"{kind}-images-idx3-ubyte.gz", change(pixels) if change else pixels)
            labels = fmnist_small / f"{kind}-labels-idx1-ubyte.gz"
            (folder / labels.name).write_bytes(labels.read_bytes())
        return ingest_into(tmp_path / f"{name}-work", DataConfig(source=str(folder)))

    champion = images("champion")
    with open(champion["contract"]["path"]) as fh:
        contract = json.load(fh)
    assert contract["image_shape"] == [1, 28, 28] and contract["columns"] == {}
    brightness = contract["images"]["<brightness>"]
    assert 0 < brightness["min"] < brightness["quantiles"]["p50"] < brightness["max"] <= 255
    assert sum(brightness["shares"]) == pytest.approx(1.0)

    # the same images ingested again: the same contract, so compare reads no split (the
    # counts are the champion's own); it needs today's split only when the data differ
    again = images("same")
    Path(again["splits"]["train"]["X"]["path"]).unlink()
    same = compare(contract, again, MonitorConfig(), CHAMPION)
    assert same["drifted"] == [] and same["findings"] == [] and same["max_psi"] == 0.0
    assert {r["column"] for r in same["drift"] if r["kind"] == "image"} == {
        "<brightness>",
        "<contrast>",
    }

    exposed = images("exposed", lambda x: (x * 0.5 + 128).astype(np.uint8))
    result = compare(contract, exposed, MonitorConfig(), CHAMPION)
    assert set(result["drifted"]) == {"<brightness>", "<contrast>"}  # not the label
    assert [(f["kind"], f["column"]) for f in result["findings"]] == [
        ("out_of_range", "<brightness>")  # many brighter than any the champion saw
    ]

    cropped = images("cropped", lambda x: x[:, 4:24, 4:24])
    result = compare(contract, cropped, MonitorConfig(), CHAMPION)
    assert [(f["kind"], f["column"], f["action"]) for f in result["findings"]] == [
        ("type_change", "<image>", "error")
    ]
    assert "images are 1×20×20 today but were 1×28×28" in result["findings"][0]["line"]
