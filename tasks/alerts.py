"""Run over run: compare two pipeline runs, and flag a run that is worse than the last good
one on the same data. Reads the MLflow store only (the orchestration floor: stages never
import this).

    accelflow compare                 # the experiment's last two pipeline runs
    accelflow compare RUN_A RUN_B
"""

from __future__ import annotations

import math
from typing import Any

from tasks.stages import HEADLINE  # the parent-run metrics, and which direction is better
from tasks.stages import NAMES as STAGES

TAG = "accelflow.regression"


def pipeline_runs(client, experiment_id: str, finished_only: bool = True) -> list:
    """The experiment's pipeline (parent) runs, newest first."""
    runs = client.search_runs(
        [experiment_id],
        "tags.`accelflow.config_digest` != ''",
        order_by=["attributes.start_time DESC"],
        max_results=200,
    )
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return [r for r in parents if r.info.status == "FINISHED"] if finished_only else parents


def stage_runs(client, parent) -> dict[str, Any]:
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    return {r.info.run_name: r for r in children if r.info.run_name in STAGES}


def throughput(stages: dict[str, Any]) -> float | None:
    train = stages.get("train")
    return train.data.metrics.get("train/samples_per_second") if train else None


def compare_runs(client, run_a: str, run_b: str) -> dict[str, Any]:
    """What changed from run A to run B: config keys, per-stage seconds, the figures."""
    a, b = client.get_run(run_a), client.get_run(run_b)
    keys = sorted(a.data.params.keys() | b.data.params.keys())
    config = [
        {"key": k, "a": a.data.params.get(k), "b": b.data.params.get(k)}
        for k in keys
        if a.data.params.get(k) != b.data.params.get(k)
    ]
    sa, sb = stage_runs(client, a), stage_runs(client, b)
    stages = []
    for stage in STAGES:
        if stage in sa or stage in sb:
            sec = [
                s[stage].data.metrics.get(f"{stage}/wall_seconds") if stage in s else None
                for s in (sa, sb)
            ]
            cached = [
                s[stage].data.tags.get("accelflow.cached") if stage in s else None for s in (sa, sb)
            ]
            stages.append(
                {
                    "stage": stage,
                    "a_seconds": sec[0],
                    "b_seconds": sec[1],
                    "a_cached": cached[0],
                    "b_cached": cached[1],
                }
            )
    figures = []
    for metric, better in {**HEADLINE, "train/samples_per_second": "higher"}.items():
        va = throughput(sa) if metric == "train/samples_per_second" else a.data.metrics.get(metric)
        vb = throughput(sb) if metric == "train/samples_per_second" else b.data.metrics.get(metric)
        if va is None and vb is None:
            continue
        figures.append(
            {"metric": metric, "a": va, "b": vb, "better": better, "change": change(va, vb)}
        )
    return {"a": run_a, "b": run_b, "config": config, "stages": stages, "metrics": figures}


def change(a: float | None, b: float | None) -> float | None:
    """b relative to a (+0.10 = 10% more), or None."""
    if a is None or b is None or not a or math.isnan(a) or math.isnan(b):
        return None
    return b / a - 1


def format_comparison(c: dict[str, Any]) -> str:
    def num(v) -> str:
        return "-" if v is None else f"{v:.4g}"

    lines = [f"A = {c['a']}", f"B = {c['b']}", "", "config (what differs)"]
    lines += [f"  {r['key']:<36} {r['a']!s:>16} → {r['b']!s}" for r in c["config"]] or ["  (none)"]
    lines += ["", f"  {'stage':<12} {'A s':>8} {'B s':>8}"]
    for r in c["stages"]:
        marks = ["c" if x == "true" else "" for x in (r["a_cached"], r["b_cached"])]
        lines.append(
            f"  {r['stage']:<12} {num(r['a_seconds']):>7}{marks[0]:1} {num(r['b_seconds']):>7}{marks[1]:1}"
        )
    lines += ["  (c: cached)", "", f"  {'metric':<26} {'A':>10} {'B':>10} {'change':>8}"]
    for r in c["metrics"]:
        pct = "-" if r["change"] is None else f"{r['change']:+.1%}"
        lines.append(f"  {r['metric']:<26} {num(r['a']):>10} {num(r['b']):>10} {pct:>8}")
    return "\n".join(lines)


def check_regression(client, run_id: str, max_accuracy_drop: float, max_slowdown: float) -> dict:
    """This run against the champion re-scored on its own test rows (when the gate did so)
    and, for latency, the experiment's previous finished run on the same test data."""
    run = client.get_run(run_id)
    digest = run.data.tags.get("accelflow.data_digest")
    earlier = [
        r
        for r in pipeline_runs(client, run.info.experiment_id)
        if r.info.run_id != run_id
        and r.info.start_time < run.info.start_time
        and r.data.tags.get("accelflow.data_digest") == digest
    ]
    now = run.data.metrics
    prev = earlier[0] if earlier else None
    before = prev.data.metrics if prev else {}
    champion = now.get("gate/champion_accuracy")
    if prev is None and champion is None:
        return {"regressed": False, "previous": None, "why": "no earlier finished run on this data"}
    # like with like: the champion re-scored on this run's test rows when the gate did so,
    # else the previous run on the same test data
    reference, whose = (
        (champion, "the champion's")
        if champion is not None
        else (before.get("test/accuracy", math.nan), "the previous run's")
    )
    reasons = []
    drop = reference - now.get("test/accuracy", math.nan)
    if drop > max_accuracy_drop:
        reasons.append(
            f"test accuracy {now['test/accuracy']:.4f} is {drop:.4f} below {whose} "
            f"{reference:.4f} on the same test rows (alerts.max_accuracy_drop {max_accuracy_drop})"
        )
    slower = change(before.get("test/latency_b256_ms"), now.get("test/latency_b256_ms"))
    if slower is not None and slower > max_slowdown:
        reasons.append(
            f"batch-256 latency {now['test/latency_b256_ms']:.3f} ms is {slower:.0%} above the "
            f"previous run's {before['test/latency_b256_ms']:.3f} ms (alerts.max_slowdown {max_slowdown:.0%})"
        )
    against = f"run {prev.info.run_id}" if prev else "the champion on this run's test rows"
    return {
        "regressed": bool(reasons),
        "previous": prev.info.run_id if prev else None,
        "accuracy_drop": drop,
        "slowdown": slower,
        "why": "; ".join(reasons) or f"no regression against {against}",
    }
