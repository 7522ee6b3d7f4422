"""One self-contained HTML report per pipeline run, built from the MLflow store alone, so
`accelflow report RUN_ID` can write it again for any past run.

Sections: the run (config digest, registered model, regression check), what changed since
the previous run of the experiment, the stage table, the headline figures, and every
picture the stages logged (codec comparison, explained variance, reduce sweep, tuning
history and importance, training curves with the learning rate, confusion matrices, t-SNE).
Images are embedded (base64), so the file opens anywhere.
"""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path
from typing import Any

from tasks import alerts

SECTIONS = ("Run", "What changed", "Stages", "Figures", "Pictures")


def stage_pictures(client, run) -> list[tuple[str, bytes]]:
    """Every PNG a stage run logged (under its stage folder), in name order."""
    stage = run.info.run_name
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        for entry in client.list_artifacts(run.info.run_id, stage):
            if entry.path.endswith(".png"):
                local = client.download_artifacts(run.info.run_id, entry.path, tmp)
                found.append(
                    (
                        f"{stage}: {Path(entry.path).stem.replace('_', ' ')}",
                        Path(local).read_bytes(),
                    )
                )
    return sorted(found)


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row.values()) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def build_report(client, run_id: str) -> str:
    """The report of parent run `run_id` as one HTML document."""
    run = client.get_run(run_id)
    tags, metrics = run.data.tags, run.data.metrics
    stages = alerts.stage_runs(client, run)
    earlier = [
        r
        for r in alerts.pipeline_runs(client, run.info.experiment_id)
        if r.info.start_time < run.info.start_time and r.info.run_id != run_id
    ]
    changed = (
        alerts.compare_runs(client, earlier[0].info.run_id, run_id)["config"] if earlier else None
    )
    stage_rows = [
        {
            "stage": name,
            "status": "cached" if s.data.tags.get("accelflow.cached") == "true" else "ran",
            "seconds": s.data.metrics.get(f"{name}/wall_seconds"),
            "why it ran": s.data.tags.get("accelflow.reason", ""),
        }
        for name in alerts.STAGES
        if (s := stages.get(name))
    ]
    pictures: list[tuple[str, bytes]] = []
    for name in alerts.STAGES:
        if name in stages:
            pictures += stage_pictures(client, stages[name])
    regression = tags.get(alerts.TAG)
    run_rows = [
        {"key": "run", "value": run_id},
        {"key": "experiment", "value": run.info.experiment_id},
        {"key": "config digest", "value": tags.get("accelflow.config_digest")},
        {"key": "data digest", "value": tags.get("accelflow.data_digest")},
        {"key": "git commit", "value": tags.get("mlflow.source.git.commit")},
        {"key": "Prefect flow run", "value": tags.get("accelflow.flow_run_id")},
        {
            "key": "registered",
            "value": f"v{tags.get('accelflow.registered_version')} as {tags.get('accelflow.alias')}",
        },
        {"key": "regression", "value": f"{regression}: {tags.get(alerts.TAG + '.why', '')}"},
        {
            "key": "drift",
            "value": f"{tags.get('accelflow.drift') or 'none'} (against "
            f"{tags.get('accelflow.drift.champion')}'s training data; ingest: drift.png)"
            if "accelflow.drift.champion" in tags
            else "not measured (no champion with a data contract)",
        },
    ]
    if changed is None:
        what_changed = "<p>The first finished run of this experiment: nothing to compare with.</p>"
    else:
        what_changed = f"<p>Against the previous run {html.escape(earlier[0].info.run_id)}:</p>" + (
            table(changed) if changed else "<p>No config key changed.</p>"
        )
    figures = table([{"metric": k, "value": v} for k, v in sorted(metrics.items())])
    images = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}"><figcaption>{html.escape(title)}</figcaption></figure>'
        for title, data in pictures
    )
    body = {
        "Run": table(run_rows),
        "What changed": what_changed,
        "Stages": table(stage_rows),
        "Figures": figures,
        "Pictures": images or "<p>(none)</p>",
    }
    sections = "".join(
        f'<section id="{name.lower().replace(" ", "-")}"><h2>{name}</h2>{body[name]}</section>'
        for name in SECTIONS
    )
    title = f"accelflow run {run.info.run_name}"
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{sections}<script>{IMAGE_CHECK}</script></body></html>"
    )


# a browser marks how many pictures decoded: what the headless-Chromium test reads back
IMAGE_CHECK = (
    "window.addEventListener('load', () => { const all = [...document.images];"
    " document.body.dataset.imagesLoaded ="
    " all.filter(i => i.complete && i.naturalWidth > 0).length + '/' + all.length; });"
)
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 1300px; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
figure { display: inline-block; margin: 0 1rem 1.5rem 0; }
img { max-width: 640px; border: 1px solid #ddd; }
figcaption { font-size: 0.85rem; color: #555; }
"""
