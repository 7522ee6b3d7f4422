"""The data sections: ingest (`data`), the Dask cluster, partition and reduce."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from conf.schema.base import Section


class DataConfig(Section):
    source: str = Field(
        "/usr/share/datasets/fashion-mnist",
        description="a path or fsspec URL: an IDX folder, a CSV (also .gz/.zst/.bz2/.xz), "
        "Parquet (a file or a folder) or .npz with X and y",
    )
    format: Literal["auto", "idx", "csv", "parquet", "npz"] = Field(
        "auto", description="the source's format; auto: guessed from the path"
    )
    label: str = Field("label", description="the label column (CSV, Parquet)")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of rows for validation")
    test_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="share of rows for test (an IDX folder's own t10k test set is kept instead)",
    )
    seed: int = Field(0, description="salts each row's hash, which decides its split")
    max_rows: int | None = Field(None, ge=10, description="deterministic subsample per split")
    missing: Literal["fill", "error"] = Field(
        "fill", description="fill: the training median / a <missing> category; error: refuse"
    )
    on_bad_rows: Literal["error", "drop", "quarantine"] = Field(
        "error",
        description="rows with a missing label or a stray string in a number column: error "
        "names them, drop skips them, quarantine keeps them with a reason in the ingest output",
    )
    max_onehot: int = Field(
        16,
        ge=1,
        description="categoricals with more values get a learned embedding (mlp) fed by "
        "integer codes",
    )
    min_frequency: int = Field(
        5,
        ge=1,
        description="embedded categoricals: values with fewer training rows share one <rare> "
        "code (with values unseen in training)",
    )
    numeric_transform: Literal["auto", "standard", "quantile", "none"] = Field(
        "auto",
        description="numeric columns of a table: standard: the network standardises them; "
        "quantile: each mapped through its training quantiles to a normal score; auto: quantile "
        "for heavy-tailed columns (|skew| >= 2 within the 0.1-99.9th percentiles), standard for "
        "the rest; none: as they are",
    )
    columns: dict[str, Literal["numeric", "categorical"]] | None = Field(
        None,
        description="a declared schema, e.g. {age: numeric, plan: categorical}: only these "
        "feature columns, with these types; null: inferred",
    )
    block_mb: float = Field(
        32.0,
        gt=0,
        description="tables are read in blocks of about this size, one Dask task each (made "
        "smaller when dask.memory_limit calls for it; the output does not depend on it)",
    )

    @model_validator(mode="after")
    def _room_for_training(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"data.val_fraction ({self.val_fraction}) + data.test_fraction "
                f"({self.test_fraction}) leave no rows for training; keep their sum below 1"
            )
        return self


# A Dask worker process holds ~150-250 MiB before its first task (measured: Python, pandas,
# pyarrow); the stages that train in a worker also hold torch (~360 MiB, batch scoring).
WORKER_FLOOR_MIB = 256


class DaskConfig(Section):
    address: str | None = Field(
        None,
        description="a Dask scheduler (tcp://host:8786); null: a LocalCluster for the flow run",
    )
    n_workers: int = Field(2, ge=1, description="LocalCluster: worker processes")
    threads_per_worker: int = Field(1, ge=1, description="LocalCluster: threads per worker")
    memory_limit: str = Field(
        "2GiB",
        description="LocalCluster: memory cap per worker (at least 256MiB; 'auto' shares "
        "the machine's memory; '0' sets no cap)",
    )

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _worker_floor(cls, v) -> str:
        """Below a worker's own footprint the nanny restarts it forever and the run hangs."""
        v = str(v)  # YAML reads 0 and 4e9 as numbers
        if v.strip().lower() == "auto":
            return v
        from dask.utils import parse_bytes  # Dask's own reading of the limit

        try:
            size = parse_bytes(v)
        except ValueError:
            raise ValueError(f"{v!r} is not a size; write e.g. 2GiB or 500MB") from None
        if 0 < size < WORKER_FLOOR_MIB * 2**20:
            raise ValueError(
                f"{v!r} is below {WORKER_FLOOR_MIB} MiB, what a Dask worker needs before any "
                "task (Python, pandas, pyarrow); set 1GiB or more, 'auto', or '0' for no cap"
            )
        return v


class PartitionConfig(Section):
    codec: Literal["auto", "zstd", "snappy", "gzip", "lz4", "none"] = Field(
        "zstd",
        description="Parquet codec; auto: the best ratio among codecs reading within 20% of "
        "the fastest, by the codec report",
    )
    compression_level: int = Field(
        3, ge=1, le=22, description="zstd 1-22, gzip 1-9; others have none"
    )
    target_partition_mb: float = Field(32.0, gt=0, description="size of each Parquet file")
    row_group_mb: float = Field(
        64.0, gt=0, description="capped by the file size; large groups let dictionaries pay"
    )
    sample_mb: float = Field(4.0, gt=0, description="training rows the codec report measures")
    storage_dtype: Literal["native", "float16"] = Field(
        "native", description="float16 halves float columns (lossy; evaluate reports the cost)"
    )

    @model_validator(mode="after")
    def _level_fits_codec(self) -> PartitionConfig:
        if self.codec == "gzip" and self.compression_level > 9:
            raise ValueError("partition.compression_level: gzip takes 1-9")
        return self

    @property
    def level(self) -> int | None:
        return self.compression_level if self.codec in ("zstd", "gzip") else None


class ReduceConfig(Section):
    method: Literal["auto", "pca", "none"] = Field(
        "auto",
        description="auto: fit PCA when the input is wide enough and use it only when it "
        "keeps few components",
    )
    standardize: bool | Literal["auto"] = Field(
        "auto",
        description="auto: on for tables (columns in unrelated units), off for images "
        "(pixels share one scale)",
    )
    variance_target: float = Field(
        0.95, gt=0.0, le=1.0, description="keep the fewest components explaining this share"
    )
    max_components: int | None = Field(None, ge=1, description="at most this many components")
    auto_min_features: int = Field(
        32, ge=1, description="auto: inputs narrower than this are never reduced"
    )
    auto_min_table_features: int = Field(
        256,
        ge=1,
        description="auto: a table narrower than this is never reduced (its columns are few "
        "and each may carry signal the dropped variance held)",
    )
    auto_max_kept: float = Field(
        0.5, gt=0.0, le=1.0, description="auto: reduce only when PCA keeps at most this share"
    )
    sweep: list[float | Literal["none"]] | None = Field(
        None,
        description="measure instead of assume, e.g. [0.8, 0.9, 0.99, none]: a proxy "
        "training per variance target (none: the raw features), in parallel",
    )
    pick: Literal["smallest_within", "best"] = Field(
        "smallest_within",
        description="sweep: the fewest features within reduce.tolerance of the best, or the best",
    )
    tolerance: float = Field(
        0.005, ge=0.0, le=1.0, description="smallest_within: accuracy this close to the best"
    )
    sweep_epochs: int = Field(3, ge=1, description="epochs of each sweep point's proxy training")
    sweep_rows: int = Field(10000, ge=10, description="training rows each point trains on")

    @field_validator("sweep")
    @classmethod
    def _targets(cls, v: list | None) -> list | None:
        if v is None:
            return v
        if len(v) < 2:
            raise ValueError("a sweep needs at least two targets, e.g. [0.9, 0.99, none]")
        bad = [t for t in v if t != "none" and not 0 < t <= 1]
        if bad:
            raise ValueError(f"variance targets must be in (0, 1] or 'none'; got {bad}")
        return v
