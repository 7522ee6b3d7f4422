"""partition + reduce on a real Dask LocalCluster."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from conf.schema import DaskConfig, DataConfig, PartitionConfig, ReduceConfig
from tasks.cluster import dask_client
from tasks.ingest import ingest_dataset
from tasks.partition import partition_dataset
from tasks.reduce import apply_reduction, fit_reduction, load_reduction, read_features
from tasks.stage import run_stage


@pytest.fixture(scope="module")
def client():
    with dask_client(DaskConfig(n_workers=2, memory_limit="1GiB")) as c:
        yield c


@pytest.fixture(scope="module")
def partitioned(fmnist_small, tmp_path_factory, client):
    work = tmp_path_factory.mktemp("work")
    data = DataConfig(source=str(fmnist_small))
    ingested = run_stage(work, "ingest", "1", {}, [], lambda out: ingest_dataset(data, out)).manifest
    cfg = PartitionConfig(target_partition_mb=0.5, compression_level=5)
    parts = run_stage(work, "partition", "1", cfg.model_dump(), [ingested],
                      lambda out: partition_dataset(ingested, cfg, out)).manifest
    return work, ingested, parts


def test_partitions_hold_every_row_compressed_with_zstd(partitioned):
    _, ingested, parts = partitioned
    for name, split in parts["splits"].items():
        files = [f["path"] for f in split["files"]]
        assert sum(pq.ParquetFile(f).metadata.num_rows for f in files) == ingested["splits"][name]["rows"]
        column = pq.ParquetFile(files[0]).metadata.row_group(0).column(0)
        assert column.compression == "ZSTD"
    assert len(parts["splits"]["train"]["files"]) > 1  # 0.5 MB target splits ~2 MB of train
    X = np.concatenate([read_features(f["path"], parts["feature_names"]) for f in parts["splits"]["test"]["files"]])
    assert np.array_equal(X, np.load(ingested["splits"]["test"]["X"]["path"]))  # lossless
    m = parts["metrics"]
    assert m["data/compression_ratio"] == pytest.approx(m["data/bytes_in"] / m["data/bytes_out"], rel=1e-3)


def test_pca_matches_scikit_learn_and_meets_the_variance_target(partitioned, client, tmp_path):
    from sklearn.decomposition import PCA

    work, _, parts = partitioned
    cfg = ReduceConfig(variance_target=0.9)
    m = run_stage(work, "reduce", "1", cfg.model_dump(), [parts],
                  lambda out: fit_reduction(parts, cfg, out, client)).manifest
    X = np.concatenate([read_features(f["path"], parts["feature_names"]) for f in parts["splits"]["train"]["files"]])
    reference = PCA(svd_solver="full").fit(X)
    k = int(np.searchsorted(np.cumsum(reference.explained_variance_ratio_), 0.9) + 1)
    assert m["metrics"]["reduce/components"] == k
    assert m["metrics"]["reduce/explained_variance"] >= 0.9
    reduction = load_reduction(m["reduction"]["path"])
    ours, theirs = apply_reduction(X[:50], reduction), reference.transform(X[:50])[:, :k]
    signs = np.sign((ours * theirs).sum(axis=0))  # components are defined up to sign
    assert np.allclose(ours, theirs * signs, atol=1e-2 * np.abs(theirs).max())
    rows = sum(pq.ParquetFile(f["path"]).metadata.num_rows for f in m["splits"]["val"]["files"])
    assert rows == parts["splits"]["val"]["rows"]
