"""One self-contained HTML report per pipeline run, built from the MLflow store alone, so
`accelflow report RUN_ID` can write it again for any past run.

Sections: a headline card (test accuracy and macro-F1 against the champion on the same
rows and the gradient-boosting reference, latency and size against the trained model, the
drift verdict, the registered version), the run (digests, links, regression check), what
changed since the previous run of the experiment, and the stages: their table, then one
section per stage with its figures in units (ms per 256 rows, MB, "4.8× smaller") and its
pictures beside them. Images are embedded (base64), so the file opens anywhere.
"""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path
from typing import Any

from tasks import alerts

SECTIONS = ("Headline", "Run", "What changed", "Stages")

# ratios whose direction a bare number hides (each is "old ÷ new": above 1 is better)
RATIOS = {
    "compress/size_ratio": "smaller (zstd) than the trained model",
    "compress/speedup_b256": "faster at batch 256 than the trained model",
    "data/compression_ratio": "smaller on disk than the source",
}


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


def human(key: str, value: Any) -> str:
    """A metric as a reader wants it: units, thousands, and the direction of a ratio."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return fmt(value)
    name = key.rsplit("/", 1)[-1]
    if key in RATIOS:
        return f"{value:.2f}× {RATIOS[key]}"
    if name.endswith("_ms"):
        per = " per 256 rows" if "b256" in name else " per row" if "b1" in name else ""
        return f"{value:.3g} ms{per}"
    if "bytes" in name:
        for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if abs(value) >= size:
                return f"{value / size:.3g} {unit}"
        return f"{value:.0f} B"
    if name.endswith("seconds"):
        return f"{value:.1f} s"
    if name.endswith("_pct"):
        return f"{value:.1f}%"
    if float(value).is_integer():  # counts (and an exact 0 or 1)
        return f"{int(value):,}"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"


def headline_rows(
    metrics: dict[str, float], tags: dict[str, str], gate: str = ""
) -> list[dict[str, str]]:
    """The card a reviewer reads first: quality against the champion (on the same rows) and
    the gradient-boosting reference, speed and size against the trained model, drift."""

    def versus(value: float, other: float, who: str) -> str:
        return f"{who}: {other:.4f} ({value - other:+.4f})"

    rows = []
    for key, what in (("test/accuracy", "accuracy"), ("test/macro_f1", "macro-F1")):
        if key not in metrics:
            continue
        against = []
        if what == "accuracy" and "gate/champion_accuracy" in metrics:
            champion = metrics["gate/champion_accuracy"]
            against.append(versus(metrics[key], champion, "the champion on the same rows"))
        reference = key.replace("test/", "reference/")
        if reference in metrics:
            against.append(versus(metrics[key], metrics[reference], "gradient boosting"))
        rows.append(
            {
                "": f"test {what}",
                "this run": f"{metrics[key]:.4f}",
                "against": "; ".join(against) or "—",
            }
        )
    for key, what, ratio in (
        ("test/latency_b256_ms", "network latency", "compress/speedup_b256"),
        ("test/served_latency_b256_ms", "served latency (raw rows)", None),
        ("test/size_zstd_bytes", "size", "compress/size_ratio"),
    ):
        if key in metrics:
            against = human(ratio, metrics[ratio]) if ratio in metrics else "—"
            if ratio and tags.get("accelflow.kept_trained") == "true":
                against = "the trained model itself (compress kept it)"
            rows.append({"": what, "this run": human(key, metrics[key]), "against": against})
    if "accelflow.drift.champion" in tags:
        drifted = tags.get("accelflow.drift") or "no column"
        rows.append(
            {
                "": "data drift",
                "this run": drifted,
                "against": f"{tags['accelflow.drift.champion']}'s training data",
            }
        )
    if "accelflow.alias" in tags:
        version = f"v{tags.get('accelflow.registered_version')} as {tags['accelflow.alias']}"
        rows.append(
            {
                "": "registered",
                "this run": version,
                "against": gate,
            }
        )
    return rows


def ran_or_cached(run) -> str:
    return "cached" if run.data.tags.get("accelflow.cached") == "true" else "ran"


def stage_section(client, name: str, run) -> str:
    """One stage: ran or cached and why, its figures with units, its pictures beside them."""
    seconds = run.data.metrics.get(f"{name}/wall_seconds")
    why = run.data.tags.get("accelflow.reason", "")
    figures = table(
        [
            # the stage's own prefix goes; others stay (evaluate has test/, baseline/, reference/)
            {"figure": k.removeprefix(f"{name}/").replace("_", " "), "value": human(k, v)}
            for k, v in sorted(run.data.metrics.items())
            if not k.endswith(("/cached", "/wall_seconds"))
        ]
    )
    images = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}"><figcaption>{html.escape(title)}</figcaption></figure>'
        for title, data in stage_pictures(client, run)
    )
    took = f", {seconds:.1f} s" if seconds is not None else ""
    return (
        f'<section class="stage" id="stage-{name}"><h3>{name}</h3>'
        f"<p>{ran_or_cached(run)}{took}: {html.escape(why)}</p>"
        f'<div class="side">{figures}<div>{images}</div></div></section>'
    )


def build_report(client, run_id: str) -> str:
    """The report of parent run `run_id` as one HTML document."""
    from conf.schema import run_link

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
            "status": ran_or_cached(s),
            "seconds": human("seconds", s.data.metrics.get(f"{name}/wall_seconds")),
            "why it ran": s.data.tags.get("accelflow.reason", ""),
        }
        for name in alerts.STAGES
        if (s := stages.get(name))
    ]
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
    evaluate = stages.get("evaluate")  # the reference's macro-F1 is not a headline figure
    evaluated = evaluate.data.metrics if evaluate else {}
    gate_why = evaluate.data.tags.get("accelflow.registry.why", "") if evaluate else ""
    links = [("MLflow run", run_link(client.tracking_uri, run.info.experiment_id, run_id))]
    if tags.get("accelflow.flow_run_url", "none") != "none":
        links.append(("Prefect flow run", tags["accelflow.flow_run_url"]))
    body = {
        "Headline": '<div class="card">'
        + table(headline_rows({**evaluated, **metrics}, tags, gate_why))
        + "</div>",
        "Run": table(run_rows),
        "What changed": what_changed,
        "Stages": table(stage_rows)
        + "".join(stage_section(client, n, stages[n]) for n in alerts.STAGES if n in stages),
    }
    sections = "".join(
        f'<section id="{name.lower().replace(" ", "-")}"><h2>{name}</h2>{body[name]}</section>'
        for name in SECTIONS
    )
    title = f"accelflow run {run.info.run_name}"
    nav = " · ".join(f'<a href="{html.escape(u)}">{html.escape(t)}</a>' for t, u in links)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1><p>{nav}</p>{sections}"
        f"<script>{IMAGE_CHECK}</script></body></html>"
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
.card table { font-size: 1.05rem; border: 2px solid #888; }
.side { display: flex; gap: 1.5rem; align-items: flex-start; flex-wrap: wrap; }
.stage { border-top: 1px solid #ddd; margin-top: 1rem; }
img { max-width: 640px; border: 1px solid #ddd; }
figcaption { font-size: 0.85rem; color: #555; }
"""
