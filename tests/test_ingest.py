"""ingest: every format, the deterministic split, and each bad-input case."""

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import tree_digest, write_idx

from conf.schema import DataConfig
from tasks.ingest import ingest_dataset, read_source, split_table
from tasks.readers import DataError
from tasks.store import run_stage


@pytest.fixture(autouse=True)
def _cluster(cluster):
    global CLIENT
    CLIENT = cluster


def ingest(tmp_path, **data):
    cfg = DataConfig(**data)
    return run_stage(
        tmp_path / "work",
        "ingest",
        "1",
        cfg.model_dump(mode="json"),
        [],
        lambda out: ingest_dataset(cfg, out, CLIENT),
    )


def test_idx_folder_keeps_the_shipped_test_set(fmnist_small, tmp_path):
    before = tree_digest(fmnist_small)
    m = ingest(tmp_path, source=str(fmnist_small)).manifest
    assert m["splits"]["test"]["rows"] == 1000  # t10k, untouched by the split
    assert m["splits"]["train"]["rows"] + m["splits"]["val"]["rows"] == 3000
    assert 200 < m["splits"]["val"]["rows"] < 400  # ~10% by hash
    assert m["image_shape"] == [1, 28, 28] and len(m["feature_names"]) == 784
    assert m["classes"] == list(range(10))
    assert tree_digest(fmnist_small) == before


def test_csv_with_string_labels(digits_csv, tmp_path):
    m = ingest(tmp_path, source=str(digits_csv), label="digit").manifest
    assert m["classes"] == [f"d{i}" for i in range(10)]
    assert sum(s["rows"] for s in m["splits"].values()) == 1797
    y = np.load(m["splits"]["train"]["y"]["path"])
    assert y.min() == 0 and y.max() == 9


def test_parquet_and_npz_sources(digits_frame, tmp_path):
    digits_frame.to_parquet(tmp_path / "digits.parquet")
    X = digits_frame.drop(columns="digit").to_numpy().reshape(-1, 8, 8)
    np.savez(tmp_path / "digits.npz", X=X, y=np.arange(len(X)) % 3)
    pq = ingest(tmp_path / "pq", source=str(tmp_path / "digits.parquet"), label="digit").manifest
    assert sum(s["rows"] for s in pq["splits"].values()) == 1797 and len(pq["feature_names"]) == 64
    nz = read_source(DataConfig(source=str(tmp_path / "digits.npz")))
    assert nz.X.shape == (1797, 64) and nz.image_shape == [1, 8, 8]


@pytest.mark.parametrize("name", ["digits.csv.gz", "digits.csv.zst", "parquet_folder", "file_url"])
def test_compressed_csv_parquet_folder_and_file_urls(digits_frame, tmp_path, name):
    if name == "parquet_folder":
        source = tmp_path / "digits_parts"
        source.mkdir()
        for i in range(3):
            digits_frame.iloc[i * 600 : (i + 1) * 600].to_parquet(source / f"part-{i}.parquet")
    elif name == "file_url":
        digits_frame.to_csv(tmp_path / "digits.csv", index=False)
        source = (tmp_path / "digits.csv").as_uri()  # file:///...
    else:
        source = tmp_path / name
        digits_frame.to_csv(source, index=False)  # pandas compresses by the suffix
    m = ingest(tmp_path, source=str(source), label="digit").manifest
    assert sum(s["rows"] for s in m["splits"].values()) == 1797
    assert len(m["feature_names"]) == 64 and m["classes"][0] == "d0"


def test_editing_the_source_in_place_changes_its_fingerprint(digits_frame, tmp_path):
    import os

    from tasks.readers import source_fingerprint

    path = tmp_path / "digits.csv"
    digits_frame.to_csv(path, index=False)
    cfg = DataConfig(source=str(path), label="digit")
    before = source_fingerprint(cfg)
    assert before == source_fingerprint(cfg)
    digits_frame.iloc[:100].to_csv(path, index=False)
    os.utime(path, (1, 1))  # even with an old timestamp, the size differs
    assert source_fingerprint(cfg) != before


def test_split_is_independent_of_row_order(digits_frame):
    from tasks.readers import Table

    X = digits_frame.drop(columns="digit").to_numpy()
    y = digits_frame["digit"].to_numpy()
    cfg = DataConfig(source="x.csv", seed=7)
    a = split_table(Table(X, y, []), cfg)
    perm = np.random.default_rng(0).permutation(len(X))
    b = split_table(Table(X[perm], y[perm], []), cfg)
    for name in ("train", "val", "test"):
        rows_a = {r.tobytes() for r in a[name][0]}
        rows_b = {r.tobytes() for r in b[name][0]}
        assert rows_a == rows_b, name
    other_seed = split_table(Table(X, y, []), DataConfig(source="x.csv", seed=8))
    assert {r.tobytes() for r in other_seed["test"][0]} != {r.tobytes() for r in a["test"][0]}


def test_tables_give_the_same_splits_whatever_the_blocks_row_order_or_format(
    digits_frame, tmp_path
):
    """The split, the encoder and the fills depend on row contents only: one block or many,
    rows shuffled, CSV or a folder of Parquet files, the output holds the same rows. A
    block whose own values type a column otherwise than the table's is read again."""
    frame = digits_frame.copy().astype({"pixel_4_4": float})
    frame["writer"] = [f"w{i % 40}" for i in range(len(frame))]
    # text in the table, but numbers alone in its first rows: the blocks cut from them
    # type it as numbers until the whole table is counted
    frame["batch"] = [str(i % 9) if i < 420 else f"b{i % 7}" for i in range(len(frame))]
    frame.loc[[3, 400, 1500], "pixel_4_4"] = np.nan
    frame.to_csv(tmp_path / "one.csv", index=False)
    frame.sample(frac=1, random_state=1).to_csv(tmp_path / "shuffled.csv", index=False)
    (tmp_path / "parts").mkdir()
    for i in range(4):  # a row group of several blocks, only some of them read again
        frame.iloc[i * 450 : (i + 1) * 450].to_parquet(
            tmp_path / "parts" / f"part-{i}.parquet", row_group_size=450
        )
    variants = {
        "one block": ("one.csv", 32),
        "many blocks": ("one.csv", 0.02),
        "shuffled": ("shuffled.csv", 0.03),
        "parquet": ("parts", 0.02),
    }
    outputs, read_twice = {}, {}
    for name, (source, block_mb) in variants.items():
        m = ingest(
            tmp_path / name, source=str(tmp_path / source), label="digit", block_mb=block_mb
        ).manifest
        rows = {
            split: sorted(
                map(
                    bytes,
                    np.column_stack(
                        [
                            np.load(m["splits"][split]["X"]["path"]),
                            np.load(m["splits"][split]["y"]["path"]),
                        ]
                    ),
                )
            )
            for split in ("train", "val", "test")
        }
        outputs[name] = (
            rows,
            Path(m["encoder"]["path"]).read_text(),
            m["classes"],
            m["metrics"]["data/source_blocks"],
        )
        read_twice[name] = m["metrics"]["data/blocks_read_twice"]
    assert outputs["many blocks"][3] > 5 and outputs["parquet"][3] == 8  # really cut into blocks
    reference = outputs["one block"]
    assert reference[3] == 1
    assert read_twice["one block"] == read_twice["shuffled"] == 0
    # the first row group's first block alone (its second holds text: not read again)
    assert read_twice["parquet"] == 1 and read_twice["many blocks"] > 1, read_twice
    for name, output in outputs.items():
        assert output[:3] == reference[:3], name


def test_one_split_rule_for_every_format(digits_frame, tmp_path):
    """The same numbers as a CSV table and as an .npz array land in the same splits."""
    X = digits_frame.drop(columns="digit").to_numpy(dtype=np.float32)
    labels = digits_frame["digit"].str.removeprefix("d").astype(int).to_numpy()
    np.savez(tmp_path / "digits.npz", X=X, y=labels)
    table = digits_frame.assign(digit=labels)
    table.to_csv(tmp_path / "digits.csv", index=False)
    splits = {}
    for source in ("digits.npz", "digits.csv"):
        m = ingest(  # standard: an array's features are never quantile-mapped
            tmp_path / f"work-{source}",
            source=str(tmp_path / source),
            label="digit",
            numeric_transform="standard",
        ).manifest
        splits[source] = {
            name: sorted(
                map(
                    bytes,
                    np.column_stack(
                        [np.load(s["X"]["path"]).astype(np.float32), np.load(s["y"]["path"])]
                    ),
                )
            )
            for name, s in m["splits"].items()
        }
    assert splits["digits.npz"] == splits["digits.csv"]
    assert len(splits["digits.csv"]["test"]) > 100


def test_max_rows_subsamples_each_split(digits_csv, tmp_path):
    m = ingest(tmp_path, source=str(digits_csv), label="digit", max_rows=50).manifest
    assert {s["rows"] for s in m["splits"].values()} == {50}


# ---------------------------------------------------------------- bad input


def expect_error(tmp_path, pattern, **data):
    with pytest.raises(DataError, match=pattern):
        ingest(tmp_path, **data)
    # nothing half-written that a later run could mistake for a complete stage
    stage = tmp_path / "work" / "ingest"
    assert not stage.exists() or not [p for p in stage.iterdir() if not p.name.startswith(".")]


def test_missing_file(tmp_path):
    expect_error(
        tmp_path, r"nope\.csv: data source does not exist", source=str(tmp_path / "nope.csv")
    )


def test_missing_label_column(digits_csv, tmp_path):
    before = tree_digest(digits_csv)
    expect_error(
        tmp_path,
        r"label column 'target' not found.*data\.label",
        source=str(digits_csv),
        label="target",
    )
    assert tree_digest(digits_csv) == before


def test_empty_csv(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("a,b,label\n")
    expect_error(tmp_path, re.escape("the dataset is empty (0 rows)"), source=str(path))


def test_nan_is_an_error_when_fills_are_off(digits_frame, tmp_path):
    frame = digits_frame.copy().astype({"pixel_2_3": float})
    frame.loc[17, "pixel_2_3"] = np.nan
    frame.to_csv(tmp_path / "d.csv", index=False)
    expect_error(
        tmp_path,
        r"column 'pixel_2_3' at row 17.*data\.missing: fill",
        source=str(tmp_path / "d.csv"),
        label="digit",
        missing="error",
    )


def test_all_missing_column(digits_frame, tmp_path):
    frame = digits_frame.copy()
    frame["empty"] = np.nan
    frame.to_csv(tmp_path / "d.csv", index=False)
    expect_error(
        tmp_path, r"column 'empty' has no values", source=str(tmp_path / "d.csv"), label="digit"
    )


def test_a_stray_string_in_a_number_column_is_a_bad_row(digits_frame, tmp_path):
    frame = digits_frame.copy().astype({"pixel_0_2": object})
    frame.loc[5, "pixel_0_2"] = "n/a?"
    frame.loc[1500, "digit"] = None
    frame.to_csv(tmp_path / "d.csv", index=False)
    source = str(tmp_path / "d.csv")
    expect_error(
        tmp_path,
        r"2 bad row\(s\), first at row 5: column 'pixel_0_2': 'n/a\?' is not a number.*"
        r"data\.on_bad_rows",
        source=source,
        label="digit",
    )
    dropped = ingest(tmp_path / "drop", source=source, label="digit", on_bad_rows="drop").manifest
    assert sum(s["rows"] for s in dropped["splits"].values()) == 1797 - 2
    assert dropped["metrics"]["data/rejected_rows"] == 2 and dropped["quarantine"] is None
    kept = ingest(
        tmp_path / "quarantine", source=source, label="digit", on_bad_rows="quarantine"
    ).manifest
    import pandas as pd

    quarantine = pd.read_csv(kept["quarantine"]["path"])
    assert sorted(quarantine["_reason"]) == [
        "column 'pixel_0_2': 'n/a?' is not a number",
        "label missing",
    ]
    assert list(quarantine["_row"]) == [5, 1500]  # the table's row numbers, header not counted
    # cut into many blocks, the two bad rows land in different blocks: one file, same rows
    blocks = ingest(
        tmp_path / "blocks", source=source, label="digit", on_bad_rows="quarantine", block_mb=0.05
    )
    assert blocks.manifest["metrics"]["data/source_blocks"] > 5
    assert pd.read_csv(blocks.manifest["quarantine"]["path"]).equals(quarantine)


def test_categorical_columns_and_fills_are_fitted_on_train_and_reused(digits_frame, tmp_path):
    import pandas as pd

    from tasks.encoding import Encoder

    frame = digits_frame.copy()
    frame["ink"] = np.where(frame["pixel_3_3"] > 8, "dark", "light")  # 2 categories → one-hot
    frame["writer"] = [f"w{i % 40}" for i in range(len(frame))]  # 40 categories → integer codes
    frame.loc[:2, "writer"] = ["solo-a", "solo-b", "solo-c"]  # one row each: pooled as <rare>
    frame["const"] = "same"
    frame = frame.astype({"pixel_4_4": float})
    frame.loc[[3, 4], "pixel_4_4"] = np.nan
    frame.loc[7, "ink"] = None
    # a heavy-tailed amount (most rows zero, a few huge): numeric_transform auto maps it
    amount = np.random.default_rng(0).lognormal(3, 2, len(frame)) * (np.arange(len(frame)) % 3 == 0)
    frame["amount"] = amount
    frame.to_csv(tmp_path / "d.csv", index=False)
    m = ingest(tmp_path, source=str(tmp_path / "d.csv"), label="digit", max_onehot=16).manifest
    encoder = Encoder.load(m["encoder"]["path"])
    assert "amount" in encoder.quantiles and "pixel_4_4" not in encoder.quantiles
    # (and the digits' edge pixels, mostly blank: skewed too)
    assert f"numeric_transform auto: {len(encoder.quantiles)} column(s) mapped" in m["summary"]
    assert set(encoder.categorical) == {"ink", "writer", "const"} and "writer" not in encoder.onehot
    assert "ink=dark" in m["feature_names"] and "writer#code" in m["feature_names"]
    # values under data.min_frequency (5) share <rare>; the MLP embeds the codes
    assert set(encoder.categorical["writer"]) == {f"w{i}" for i in range(40)}
    assert 1 <= encoder.pooled["writer"] <= 3  # the solo values that fell in the train split
    assert m["codes"] == {"writer#code": 41}
    assert m["metrics"]["data/missing_values_filled"] == 3
    assert any("'const' is constant" in w for w in m["warnings"])
    # the fill is the training median, not the whole file's
    train_index = np.load(m["splits"]["train"]["X"]["path"])
    # the amount reaches the network as normal scores (raw amounts run up to thousands)
    mapped = train_index[:, m["feature_names"].index("amount")]
    assert np.abs(mapped).max() < 3.1 and abs(np.median(mapped)) < 0.7 and amount.max() > 1000
    assert encoder.fills["pixel_4_4"] == pytest.approx(
        float(np.median(train_index[:, m["feature_names"].index("pixel_4_4")]))
    )
    # raw rows with an unseen category and a missing value still encode, deterministically
    raw = pd.read_parquet(m["raw_example"]["path"])
    raw.loc[0, "writer"] = "never-seen"
    raw.loc[1, "pixel_4_4"] = np.nan
    X = encoder.transform(raw)
    assert X.shape == (len(raw), len(m["feature_names"])) and np.isfinite(X).all()
    assert X[0, m["feature_names"].index("writer#code")] == len(
        encoder.categorical["writer"]
    )  # the unseen slot
    raw.loc[:2, "amount"] = [0.0, 1e12, -5.0]  # beyond the training range: the end scores
    scores = encoder.transform(raw)[:3, m["feature_names"].index("amount")]
    knots, ends = encoder.quantiles["amount"]
    assert scores[1] == pytest.approx(ends[-1]) and scores[2] == pytest.approx(ends[0])
    assert scores[0] == pytest.approx(ends[0])  # zero is the lowest amount: one knot, one score


def test_numeric_transform_modes_pick_their_columns():
    """quantile maps every non-constant numeric column, auto the heavy-tailed ones only (not
    a symmetric column, nor a rare 0/1 flag), standard none; none also tells the network
    not to standardise; the map is monotone and keeps a tie (zero) on one score."""
    import pandas as pd

    from tasks.encoding import fit_encoder

    rng = np.random.default_rng(0)
    sample = {
        "amount": np.where(rng.random(2000) < 0.5, 0.0, rng.lognormal(0, 2, 2000)),
        "height": rng.normal(170, 10, 2000),
        "flag": (rng.random(2000) < 0.02).astype(float),
        "same": np.ones(2000),
        # a symmetric bulk and two typos (a width of 59 mm among 4-10): skewness 18 as it is
        "typos": np.r_[rng.normal(6, 1, 1998), 32.0, 59.0],
    }
    fills = dict.fromkeys(sample, 0.0)

    def fitted(mode):
        return fit_encoder(fills, {}, 16, 1, mode, sample)

    assert list(fitted("auto").quantiles) == ["amount"]
    assert list(fitted("quantile").quantiles) == ["amount", "height", "flag", "typos"]
    assert not fitted("standard").quantiles and not fitted("standard").unscaled
    assert fitted("none").unscaled and not fitted("none").quantiles
    encoder = fitted("quantile")
    X = encoder.transform(pd.DataFrame(sample))
    order = np.argsort(sample["height"])
    assert (np.diff(X[order, 1]) >= -1e-6).all() and abs(X[:, 1].std() - 1) < 0.05
    assert len(np.unique(X[sample["amount"] == 0, 0])) == 1
    assert (X[:, 3] == 1).all()  # a constant column is left as it is
    # a block-sized call looks knots up by bucket (in chunks: 80,000 rows of 4 mapped
    # columns make two); served-sized calls use np.interp: the same scores to the last bit,
    # for values on a knot, next to one and beyond the ends
    knots = {c: np.array(encoder.quantiles[c][0]) for c in encoder.quantiles}
    ends = [-1e9, 1e9]
    rows = pd.DataFrame(
        {
            c: rng.choice(np.r_[k, np.nextafter(k, np.inf), np.nextafter(k, -np.inf), ends], 80_000)
            for c, k in knots.items()
        }
    ).assign(same=1.0)[list(sample)]
    served = [encoder.transform(rows[i : i + 1000]) for i in range(0, len(rows), 1000)]
    assert np.array_equal(encoder.transform(rows), np.vstack(served))


def test_declared_schema_selects_and_types_columns(digits_frame, tmp_path):
    from tasks.encoding import Encoder

    frame = digits_frame.copy()
    frame["zip"] = [
        10115 + (i % 7) for i in range(len(frame))
    ]  # numbers that are really categories
    frame.to_csv(tmp_path / "d.csv", index=False)
    columns = {"pixel_3_3": "numeric", "pixel_4_4": "numeric", "zip": "categorical"}
    m = ingest(tmp_path, source=str(tmp_path / "d.csv"), label="digit", columns=columns).manifest
    encoder = Encoder.load(m["encoder"]["path"])
    assert encoder.numeric == ["pixel_3_3", "pixel_4_4"] and list(encoder.categorical) == ["zip"]
    assert len(m["feature_names"]) == 2 + 7 + 1  # two numbers, zip one-hot (7 values + unseen)
    assert any("not declared" in w for w in m["warnings"])
    expect_error(
        tmp_path / "bad",
        r"declared column\(s\) \['colour'\] \(data\.columns\) are not in the file",
        source=str(tmp_path / "d.csv"),
        label="digit",
        columns={"colour": "categorical"},
    )


def test_single_class_and_continuous_labels_are_named(digits_frame, tmp_path):
    frame = digits_frame.copy()
    frame["digit"] = "same"
    frame.to_csv(tmp_path / "d.csv", index=False)
    expect_error(
        tmp_path / "single",
        re.escape("the label has a single class ('same'); nothing to learn"),
        source=str(tmp_path / "d.csv"),
        label="digit",
    )
    # a regression target: a value of its own on almost every row, not "unseen classes"
    frame["digit"] = np.random.default_rng(0).normal(size=len(frame))
    frame.to_csv(tmp_path / "c.csv", index=False)
    expect_error(
        tmp_path / "continuous",
        re.escape(
            f"the label column 'digit' looks continuous ({len(frame):,} distinct values in "
            f"{len(frame):,} rows); accelflow classifies"
        ),
        source=str(tmp_path / "c.csv"),
        label="digit",
    )


def test_truncated_idx(fmnist_small, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    raw = gzip.decompress((fmnist_small / "train-images-idx3-ubyte.gz").read_bytes())
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(
        (fmnist_small / "train-labels-idx1-ubyte.gz").read_bytes()
    )
    expect_error(
        tmp_path,
        r"train-images-idx3-ubyte\.gz: IDX header promises .* truncated",
        source=str(folder),
    )


def test_corrupt_gzip_and_wrong_magic(tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08garbage")
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8))
    expect_error(tmp_path, "cannot read IDX file", source=str(folder))
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"PK\x03\x04 not idx"))
    expect_error(tmp_path, "bad magic number", source=str(folder))


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    expect_error(tmp_path, r"x\.parquet: cannot read as parquet", source=str(path))


def test_ragged_and_truncated_csv(digits_csv, tmp_path):
    lines = digits_csv.read_text().splitlines()
    lines[10] += ",99"  # one field too many
    (tmp_path / "ragged.csv").write_text("\n".join(lines) + "\n")
    expect_error(
        tmp_path / "a",
        r"ragged\.csv \(bytes \d+-\d+\): cannot parse as CSV .*Expected 65 fields",
        source=str(tmp_path / "ragged.csv"),
        label="digit",
    )
    packed = gzip.compress(digits_csv.read_bytes())
    (tmp_path / "cut.csv.gz").write_bytes(packed[: len(packed) // 2])
    expect_error(
        tmp_path / "b",
        r"cut\.csv\.gz: cannot read as csv .*complete\?",
        source=str(tmp_path / "cut.csv.gz"),
        label="digit",
    )


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_a_cut_off_compressed_csv_is_a_file_error_whatever_the_bad_row_policy(
    digits_csv, tmp_path, suffix
):
    """Cut well past the header, so only the stream's end can tell: under on_bad_rows: drop
    a quiet reader would train on part of the file, losing the rest without a word."""
    import zstandard

    body = digits_csv.read_bytes()
    big = body + b"".join(body.split(b"\n", 1)[1] for _ in range(30))  # ~30x the rows
    pack = gzip.compress if suffix == ".gz" else zstandard.ZstdCompressor().compress
    packed = pack(big)
    source = tmp_path / f"cut.csv{suffix}"
    source.write_bytes(packed[: int(len(packed) * 0.7)])
    expect_error(
        tmp_path,
        rf"(?i)cut\.csv\{suffix}: cannot read as csv .*EOFError.*complete\?",
        source=str(source),
        label="digit",
        on_bad_rows="drop",
    )


def test_a_repeated_column_name_is_refused_naming_it(tmp_path):
    source = tmp_path / "twice.csv"
    source.write_text(
        "a,b,a,label\n" + "".join(f"{i},{i % 3},{i * 2},{i % 2}\n" for i in range(60))
    )
    expect_error(
        tmp_path, r"twice\.csv: column name\(s\) \['a'\] appear more than once", source=str(source)
    )


def test_parquet_parts_with_different_columns(digits_frame, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    digits_frame.iloc[:900].to_parquet(folder / "part-0.parquet")
    digits_frame.iloc[900:].drop(columns="pixel_0_0").to_parquet(folder / "part-1.parquet")
    expect_error(
        tmp_path,
        r"part-1\.parquet \(row group 0\): columns .* differ from the first part's",
        source=str(folder),
        label="digit",
    )


def test_a_code_column_reads_the_same_whatever_type_a_block_gave_it():
    """One block of a CSV may read a code column as floats (it has a gap), another as text:
    both must give the same categories and the same row hashes, or the split would depend
    on where blocks begin."""
    import pandas as pd

    from tasks.encoding import as_text
    from tasks.splitting import row_uniforms

    as_floats = as_text(pd.Series([12.0, None, 2.5]))
    as_strings = as_text(pd.Series(["12", None, "2.5"], dtype=object))
    assert as_floats.tolist() == as_strings.tolist() == ["12", None, "2.5"]
    assert (
        row_uniforms(as_floats.to_frame("c"), 0) == row_uniforms(as_strings.to_frame("c"), 0)
    ).all()


def test_row_hashes_are_pandas_hashes_to_the_bit():
    """Every split (and the test digest) was drawn from pandas' row hashes: the faster
    chunked hash must give the very same numbers, missing values, -0.0, NaN payloads, text
    and integer columns included, across chunk boundaries."""
    import pandas as pd

    from tasks import splitting

    rng = np.random.default_rng(0)
    rows = splitting.HASH_CHUNK_ROWS + 1000
    prices = rng.normal(size=rows).round(2)
    prices[::97] = np.nan
    prices[::89] = -0.0
    prices[5] = np.frombuffer(np.uint64(0x7FF8000000000001).tobytes())[0]  # another NaN
    frame = pd.DataFrame(
        {
            "price": prices,
            "count": rng.integers(0, 9, rows),
            "plan": pd.array(rng.choice(["a", "b", None], rows), dtype="str"),
            "ratio": rng.random(rows),
        }
    )
    for case in (frame, frame.iloc[:3], frame.iloc[:0], frame.iloc[:, :0]):
        expected = pd.util.hash_pandas_object(case, index=False).to_numpy()
        assert np.array_equal(splitting.row_hashes(case), expected)


@pytest.mark.parametrize("pooled_missing", [False, True])
def test_arrow_text_and_python_text_get_the_same_codes(pooled_missing):
    """Ingest reads its cleaned blocks back as Arrow-backed text and looks codes up in Arrow;
    a served frame holds Python strings. Missing values take the <missing> category where the
    vocabulary has one, unseen values the last slot, either way."""
    import pandas as pd

    from tasks.encoding import MISSING, fit_encoder

    vocab = ["a", MISSING, "b"] if pooled_missing else ["a", "b", "c"]
    encoder = fit_encoder({}, {"x": dict.fromkeys(vocab, 10)}, 100, 1, "none", {})
    values = ["a", None, "b", "never seen", "c", None]
    python, arrow = (encoder.codes("x", pd.Series(values, dtype=t)) for t in (object, "str"))
    assert pd.Series(values, dtype="str").dtype.storage == "pyarrow"  # the Arrow path ran
    assert encoder.categorical["x"] == sorted(vocab)  # <missing> first where it is kept
    expected = [1, 0, 2, 3, 3, 0] if pooled_missing else [0, 3, 1, 3, 2, 3]
    assert python.tolist() == arrow.tolist() == expected


def test_scratch_blocks_are_compressed_only_where_the_disk_is_short():
    from tasks.tables.blocks import scratch_compression

    gib = 2**30
    assert scratch_compression(gib, packed=False, free_bytes=20 * gib) == "uncompressed"
    assert scratch_compression(gib, packed=False, free_bytes=5 * gib) == "lz4"
    assert scratch_compression(gib, packed=True, free_bytes=20 * gib) == "lz4"  # a .gz or Parquet
