"""Register the chosen model as a pyfunc and gate it against the current champion.

Idempotent: a model whose weights were already registered (a cached rerun) reuses its
version instead of adding a new one. Promotion uses aliases (`champion`, `challenger`),
never the deprecated stages. A new model takes `champion` unless the current champion was
measured on the same test set and scores higher; otherwise it becomes `challenger`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conf.schema import RegistryConfig
from tasks.stage import Manifest

ENTRY = Path(__file__).resolve().with_name("pyfunc_model.py")
CODE_DIRS = [Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "conf"]
PIP_REQUIREMENTS = [
    "torch>=2.4",
    "numpy",
    "pandas",
    "pyarrow",
    "pydantic>=2.7",
    "pyyaml",
    "zstandard",
]


def _existing_version(client, name: str, model_digest: str):
    for version in client.search_model_versions(f"name='{name}'"):
        if version.tags.get("accelflow.model_digest") == model_digest:
            return version
    return None


def _champion(client, name: str):
    try:
        return client.get_model_version_by_alias(name, "champion")
    except Exception:  # no registered model yet, or no champion alias
        return None


def log_pyfunc(bundle: str, example, name: str):
    """Log the bundle as a pyfunc in the active run and register it; return the ModelVersion."""
    import mlflow
    from mlflow.models import infer_signature

    from tasks.serving import Predictor

    numeric = example.select_dtypes("number").columns
    example = example.astype({c: "float64" for c in numeric})  # a float schema accepts integers too
    predictor = Predictor(bundle)
    output = predictor.predict_frame(example)
    signature = infer_signature(example, output)
    if predictor.encoder is not None:
        # A table's raw rows come as the user has them: a number column read as text because
        # one value is "n/a", a category coded as integers. The model's own encoder parses,
        # fills and maps them; MLflow's type check would refuse such a frame outright, so
        # the signature names the columns (still required) and leaves their types to it.
        from mlflow.types.schema import AnyType, ColSpec, Schema

        signature.inputs = Schema([ColSpec(AnyType(), c) for c in example.columns])
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(ENTRY),
        artifacts={"bundle": bundle},
        code_paths=[str(p) for p in CODE_DIRS],
        signature=signature,
        input_example=example,
        pip_requirements=PIP_REQUIREMENTS,  # skips MLflow's slow requirement inference
        registered_model_name=name,
    )
    return mlflow.MlflowClient().get_model_version(name, info.registered_model_version)


def register_and_promote(evaluation: Manifest, example, cfg: RegistryConfig) -> dict[str, Any]:
    """Register (once) and set the `champion` or `challenger` alias; return what happened."""
    import mlflow

    client = mlflow.MlflowClient()
    chosen = evaluation["results"][evaluation["chosen"]]
    model_digest = evaluation["model_digest"]
    version = _existing_version(client, cfg.model_name, model_digest)
    if version is None:
        version = log_pyfunc(evaluation["bundle"], example, cfg.model_name)
        for key, value in {
            "accelflow.model_digest": model_digest,
            "accelflow.test_digest": evaluation["test_digest"],
            "accelflow.variant": evaluation["chosen"],
            "test_accuracy": repr(chosen["accuracy"]),  # exact: the gate compares it
        }.items():
            client.set_model_version_tag(cfg.model_name, version.version, key, value)

    champion = _champion(client, cfg.model_name)
    alias, why = "champion", "no champion yet"
    if champion is not None and champion.version == version.version:
        why = "already the champion"
    elif champion is not None:
        same_test = champion.tags.get("accelflow.test_digest") == evaluation["test_digest"]
        champion_accuracy = float(champion.tags.get("test_accuracy", "nan"))
        if same_test and champion_accuracy > chosen["accuracy"]:
            alias = "challenger"
            why = f"champion v{champion.version} scores {champion_accuracy:.4f} > {chosen['accuracy']:.4f}"
        elif same_test:
            why = f"beats or ties champion v{champion.version} ({champion_accuracy:.4f})"
        else:
            why = f"champion v{champion.version} was tested on other data; the newest model takes over"
    client.set_registered_model_alias(cfg.model_name, alias, version.version)
    return {
        "model_name": cfg.model_name,
        "version": int(version.version),
        "alias": alias,
        "why": why,
    }
