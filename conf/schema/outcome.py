"""What happens to a trained model: evaluate's choice and gate, alerts, where MLflow
tracks runs, the registered model's name."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from conf.schema.base import Section


class EvaluateConfig(Section):
    max_accuracy_drop: float = Field(
        0.005,
        ge=0.0,
        le=1.0,
        description="a compressed model is chosen, and a new model may replace the "
        "champion, only within this accuracy drop of the baseline",
    )
    budget_confidence: float = Field(
        0.8,
        ge=0.5,
        lt=1.0,
        description="a compressed point is within max_accuracy_drop only when its validation "
        "accuracy drop is at this confidence (the upper bound of a paired bootstrap of the "
        "point against the baseline on the same validation rows); 0.5: the drop as measured",
    )
    latency_repeats: int = Field(30, ge=3, description="timed calls per latency figure")
    tsne_rows: int = Field(
        2000,
        ge=0,
        description="test rows on the t-SNE map of the chosen model's last hidden layer "
        "(evaluate/tsne.png; about 10 s at 2,000 rows on 2 cores); 0: no map",
    )
    objective: Literal["latency", "size"] = Field(
        "latency",
        description="what the compress choice and the champion gate reward: batch-256 "
        "latency or zstd size",
    )
    reference: Literal["auto", "gbm", "none"] = Field(
        "auto",
        description="fit scikit-learn's HistGradientBoostingClassifier on the same training "
        "rows and score it on the same test rows, beside the network; auto: for tables (on "
        "raw pixels it is slow and weak)",
    )
    reference_rows: int = Field(
        50_000, ge=100, description="training rows the reference fits on (a seeded sample)"
    )
    objective_margin: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="an objective counts as better only beyond this share (latency is noisy)",
    )


class ServeConfig(Section):
    """How the registered model runs its network where a user scores with it."""

    runtime: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto",
        description="torch | onnxruntime (the network exported to ONNX, its logits checked "
        "against torch's on every validation row; int8 quantized by onnxruntime) | auto: "
        "per compress point, the faster of the two measured within "
        "evaluate.max_accuracy_drop",
    )


class AlertsConfig(Section):
    """When a run is flagged as a regression against the previous run on the same data."""

    max_accuracy_drop: float = Field(
        0.01, ge=0.0, le=1.0, description="test accuracy lower than the last run's by more"
    )
    max_slowdown: float = Field(
        0.5, ge=0.0, description="batch-256 latency more than this much slower (0.5 = +50%)"
    )


# what the data contract checks, each `error` (stop before training) or `warn` (go on, say so)
VIOLATIONS = (
    "missing_column",
    "new_column",
    "type_change",
    "unseen_categories",
    "out_of_range",
    "labels",
)
Violation = Literal[VIOLATIONS]  # type: ignore[valid-type]


class MonitorConfig(Section):
    """Today's data against the champion's data contract and training data, checked right
    after ingest, before anything expensive runs."""

    enabled: bool = Field(
        True, description="check the contract and measure drift when a champion exists"
    )
    on_violation: dict[Violation, Literal["error", "warn"]] = Field(
        default_factory=lambda: {
            "missing_column": "error",
            "new_column": "warn",
            "type_change": "error",
            "unseen_categories": "warn",
            "out_of_range": "warn",
            "labels": "error",
        },
        description="per kind of finding, error (the run stops, one line per finding) or "
        "warn (the run goes on; the findings are logged and tagged); kinds left out warn",
    )
    max_unseen_share: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="a categorical column whose rows hold categories the champion never saw, "
        "beyond this share, is a finding",
    )
    max_out_of_range_share: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="a numeric column with more rows outside the champion's training range "
        "than this share is a finding",
    )
    max_psi: float = Field(
        0.2,
        gt=0.0,
        description="population stability index above which a column (or the label) has "
        "drifted: the run is tagged accelflow.drift and emits accelflow.data.drifted",
    )


class TrackingConfig(Section):
    uri: str = Field(
        "sqlite:///mlflow.db",
        description="the MLflow tracking store: sqlite:///file.db, postgresql://…, http://host:5000",
    )
    experiment: str = Field("accelflow", description="the MLflow experiment")


# MLflow 3's UI opens a run in its GenAI view unless the link asks for the model-training one
UI_VIEW = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a file or sqlite store


def ui_base(tracking_uri: str) -> str:
    """The UI's address for a store: a tracking server's own (credentials removed), else
    the local `mlflow ui` the CLI tells the user to start."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        return LOCAL_UI
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}?{UI_VIEW}"


def model_link(tracking_uri: str, name: str, version: str) -> str:
    return f"{ui_base(tracking_uri)}/#/models/{name}/versions/{version}?{UI_VIEW}"


class RegistryConfig(Section):
    model_name: str = Field(
        "accelflow-classifier", description="the registered model (aliases champion, challenger)"
    )
