"""Register the chosen model as a pyfunc and gate it against the current champion.

Idempotent: a model whose weights were already registered (a cached rerun) reuses its
version instead of adding a new one. Promotion uses aliases (`champion`, `challenger`),
never the deprecated stages. The gate (`decide`) compares like with like: the champion is
loaded by alias as a user loads it and re-scored on today's test rows (nightly data brings
a new test split every night), then a new model takes `champion` only when its accuracy is not worse beyond
`evaluate.max_accuracy_drop` and it is better — on `evaluate.objective` (batch-256 latency
or zstd size) by more than `evaluate.objective_margin`, or more accurate without being
worse on the objective beyond that margin. Otherwise it is registered as `challenger`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from conf.schema import EvaluateConfig, RegistryConfig, run_link
from tasks.served.pyfunc import pyfunc_arguments
from tasks.store import Manifest

# today's test rows, a batch at a time: (raw rows as a DataFrame, label codes)
TestRows = Callable[[], Iterator[tuple[Any, np.ndarray]]]


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

    info = mlflow.pyfunc.log_model(
        name="model", registered_model_name=name, **pyfunc_arguments(bundle, example)
    )
    return mlflow.MlflowClient().get_model_version(name, info.registered_model_version)


def logged_model_id(version) -> str | None:
    """The MLflow 3 logged model behind a registered version: `model_id` where the store
    fills it, else the `models:/m-…` source it was registered from (sqlite leaves it empty)."""
    if version.model_id:
        return version.model_id
    source = version.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


OBJECTIVES = {  # evaluate.objective → the figure compared, lower is better
    "latency": ("latency_b256_ms", "batch-256 latency", "ms"),
    "size": ("size_zstd_bytes", "zstd size", "bytes"),
}


def decide(
    candidate: dict[str, float], champion: dict[str, float] | None, cfg: EvaluateConfig
) -> tuple[str, str]:
    """(alias, why) for a candidate against the champion's figures on the same test set:
    `accuracy` and the objective's figure (missing for a champion registered before it was
    recorded: then accuracy alone decides)."""
    if champion is None:
        return "champion", "no champion on this test set"
    key, label, unit = OBJECTIVES[cfg.objective]
    gain = candidate["accuracy"] - champion["accuracy"]
    accuracy = f"accuracy {candidate['accuracy']:.4f} vs {champion['accuracy']:.4f} ({gain:+.4f})"
    if gain < -cfg.max_accuracy_drop:
        return "challenger", (
            f"{accuracy}: worse by more than evaluate.max_accuracy_drop ({cfg.max_accuracy_drop})"
        )
    if champion.get(key) is None:
        if gain >= 0:
            return "champion", f"{accuracy}; the champion has no recorded {label}"
        return "challenger", f"{accuracy}; the champion has no recorded {label} to trade against"
    ratio = candidate[key] / max(champion[key], 1e-12)
    objective = (
        f"{label} {candidate[key]:.4g} vs {champion[key]:.4g} {unit} (×{ratio:.2f}, "
        f"evaluate.objective: {cfg.objective})"
    )
    if ratio < 1 - cfg.objective_margin:
        return "champion", f"better {label}: {objective}; {accuracy}"
    if gain > 0 and ratio <= 1 + cfg.objective_margin:
        return "champion", f"more accurate: {accuracy}; {objective}"
    return "challenger", (
        f"not better: {objective}, needs < ×{1 - cfg.objective_margin:.2f} "
        f"(evaluate.objective_margin), or higher accuracy within ×{1 + cfg.objective_margin:.2f}; "
        f"{accuracy}"
    )


def gate_markdown(
    alias: str, why: str, candidate: dict[str, float], champion: dict[str, float] | None, cfg
) -> str:
    """The decision with its numbers, as the markdown artifact a reviewer reads."""
    lines = [f"## Gate: `{alias}`", "", why, ""]
    if champion is not None:
        lines += ["| figure | this model | champion |", "|---|---|---|"]
        for key in ("accuracy", "latency_b256_ms", "size_zstd_bytes"):
            theirs = champion.get(key)
            lines.append(
                f"| {key} | {candidate[key]:.6g} | {'—' if theirs is None else f'{theirs:.6g}'} |"
            )
        lines += [
            "",
            f"Rule: accuracy not worse than the champion's by more than {cfg.max_accuracy_drop}, "
            f"and better on {cfg.objective} by more than {cfg.objective_margin:.0%} (or more "
            "accurate and not worse beyond that margin).",
        ]
    return "\n".join(lines)


def _figures(tags: dict[str, str]) -> dict[str, float | None]:
    def number(key: str) -> float | None:
        return float(tags[key]) if key in tags else None

    return {"accuracy": number("test_accuracy") or float("nan")} | {
        key: number(key) for key, _, _ in OBJECTIVES.values()
    }


def model_card(
    name: str, version: str, alias: str, why: str, evaluation: Manifest, facts: dict[str, str]
) -> str:
    """The version's description in the registry (markdown): what it is, what it was
    trained and tested on, how it scores, and why it holds its alias."""
    chosen = evaluation["results"][evaluation["chosen"]]
    figures = (
        f"accuracy {chosen['accuracy']:.4f}, macro-F1 {chosen['macro_f1']:.4f}, latency "
        f"{chosen['latency_b1_ms']:.3f} ms (batch 1) / {chosen['latency_b256_ms']:.3f} ms "
        f"(batch 256), {chosen['nonzero_parameters']:,} of {chosen['parameters']:,} weights "
        f"non-zero, {chosen['size_zstd_bytes'] / 1024:.0f} KiB zstd"
    )
    lines = [
        f"### {name} v{version}: `{alias}`",
        f"- **gate**: {why}",
        *(f"- **{k}**: {v}" for k, v in facts.items()),
        f"- **variant**: {evaluation['chosen']} (the {'compressed' if evaluation['chosen'] == 'compressed' else 'uncompressed'} model)",
        f"- **test** (digest `{evaluation['test_digest']}`): {figures}",
        "- **input**: a DataFrame of raw feature columns; the model applies its own encoding and reduction",
    ]
    return "\n".join(lines)


CONTRACT = "contract/contract.json"  # beside the model, in the run that registered it


def champion_contract(cfg: RegistryConfig) -> tuple[dict[str, Any], str] | None:
    """The current champion's data contract and its name ("accelflow-classifier v3"); None
    when there is no champion, or it was registered before models carried one."""
    import json

    import mlflow

    client = mlflow.MlflowClient()
    champion = _champion(client, cfg.model_name)
    if champion is None:
        return None
    try:
        path = client.download_artifacts(champion.run_id, CONTRACT)
    except Exception:  # registered before contracts were logged
        return None
    with open(path) as fh:
        return json.load(fh), f"{cfg.model_name} v{champion.version}"


def fetch_model(cfg: RegistryConfig, model: str, dest: str) -> dict[str, Any]:
    """A registered version (`model`: an alias such as champion, or a version number)
    downloaded into `dest`: its version, the bundle folder its pyfunc wraps, and the data
    contract of its training data (empty for a version registered before contracts)."""
    import json
    from pathlib import Path

    import mlflow

    from tasks.errors import ConfigError

    client = mlflow.MlflowClient()
    try:
        version = (
            client.get_model_version(cfg.model_name, model)
            if model.isdigit()
            else client.get_model_version_by_alias(cfg.model_name, model)
        )
    except Exception:
        raise ConfigError(
            f"--model {model}: registered model '{cfg.model_name}' has no "
            f"{'version' if model.isdigit() else 'alias'} '{model}' in {mlflow.get_tracking_uri()}; "
            "run the pipeline first, or pass --model with an existing alias or version"
        ) from None
    local = Path(mlflow.artifacts.download_artifacts(version.source, dst_path=dest))
    (meta,) = local.rglob("meta.json")  # the bundle: meta.json, model.pt, encoder.json, ...
    try:
        contract = json.loads(
            Path(client.download_artifacts(version.run_id, CONTRACT, dest)).read_text()
        )
    except Exception:  # registered before models carried a contract
        contract = {"columns": {}, "labels": {}}
    return {
        "name": f"{cfg.model_name} v{version.version}",
        "version": int(version.version),
        "bundle": str(meta.parent),
        "contract": contract,
    }


def rescore(name: str, version: str, test_rows: TestRows, classes: list[Any]) -> float:
    """The accuracy of registered version `version` on today's test rows, loaded and called
    exactly as a user does (`mlflow.pyfunc`, raw rows in, labels out), a batch at a time."""
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    names = np.asarray([str(c) for c in classes])
    right = total = 0
    for frame, codes in test_rows():
        predicted = np.asarray(model.predict(frame)).astype(str)
        right += int((predicted == names[codes]).sum())
        total += len(codes)
    return right / max(total, 1)


def register_and_promote(
    evaluation: Manifest,
    example,
    cfg: RegistryConfig,
    gate: EvaluateConfig,
    facts: dict[str, str] | None = None,
    test_rows: TestRows | None = None,
    classes: list[Any] | None = None,
    contract: str | None = None,
) -> dict[str, Any]:
    """Register (once), set the `champion` or `challenger` alias and write the version's
    model card; return what happened, with the gate's markdown. Like with like: the current
    champion is re-scored on today's test rows (`test_rows`) and the decision made on them."""
    import mlflow

    client = mlflow.MlflowClient()
    chosen = evaluation["results"][evaluation["chosen"]]
    model_digest = evaluation["model_digest"]
    version = _existing_version(client, cfg.model_name, model_digest)
    if version is None:
        version = log_pyfunc(evaluation["bundle"], example, cfg.model_name)
        if contract:  # the training data's contract travels with the version (its run)
            mlflow.log_artifact(contract, CONTRACT.split("/")[0])
        for key, value in {
            "accelflow.model_digest": model_digest,
            "accelflow.test_digest": evaluation["test_digest"],
            "accelflow.variant": evaluation["chosen"],
            "test_accuracy": repr(chosen["accuracy"]),  # exact: the gate compares it
            "latency_b256_ms": repr(chosen["latency_b256_ms"]),
            "size_zstd_bytes": repr(chosen["size_zstd_bytes"]),
        }.items():
            client.set_model_version_tag(cfg.model_name, version.version, key, value)

    champion = _champion(client, cfg.model_name)
    theirs, rescored = None, None
    alias, why = "champion", "no champion yet"
    if champion is not None and champion.version == version.version:
        why = "already the champion"
    elif champion is not None:
        theirs = _figures(champion.tags)
        same_rows = champion.tags.get("accelflow.test_digest") == evaluation["test_digest"]
        if not same_rows and test_rows is not None:
            try:
                rescored = rescore(cfg.model_name, champion.version, test_rows, classes or [])
                theirs["accuracy"] = rescored
            except Exception as exc:  # it cannot read today's rows (columns changed): say so
                why = (
                    f"champion v{champion.version} could not score today's test rows "
                    f"({type(exc).__name__}: {str(exc)[:300]}); the new model takes over"
                )
                theirs = None
        if theirs is not None:
            alias, why = decide(chosen, theirs, gate)
            where = "on the same test rows" if same_rows else "re-scored on today's test rows"
            why = f"against champion v{champion.version} ({where}): {why}"
    client.set_registered_model_alias(cfg.model_name, alias, version.version)
    source = client.get_run(version.run_id).info  # the run that logged the model
    links = {"MLflow run": run_link(mlflow.get_tracking_uri(), source.experiment_id, source.run_id)}
    card = model_card(
        cfg.model_name, version.version, alias, why, evaluation, {**(facts or {}), **links}
    )
    client.update_model_version(cfg.model_name, version.version, description=card)
    return {
        "model_name": cfg.model_name,
        "version": int(version.version),
        "model_id": logged_model_id(version),
        "alias": alias,
        "why": why,
        "champion_version": int(champion.version) if champion is not None else None,
        "champion_accuracy": theirs["accuracy"] if theirs else None,
        "markdown": gate_markdown(alias, why, chosen, theirs, gate),
    }
