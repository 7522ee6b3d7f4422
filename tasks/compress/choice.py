"""The choice among measured points (validation only), the Pareto fronts, the table and plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conf.schema import EvaluateConfig
from tasks.compress.points import point_name
from tasks.paired import drop_and_bound
from tasks.served.runtime import RUNTIMES

BASELINE = "baseline"
# what `evaluate.objective` minimises, per point (1 thread: a typical serving replica)
OBJECTIVE_KEY = {"latency": "latency_b256_p50_ms", "size": "size_zstd_bytes"}


# each measured row keeps, until the choice is made, its per-row answers on the validation
# split (True: right), per runtime: what the paired budget judges (never written out)
ANSWERS = "_correct"


def within_budget(
    point: dict[str, Any], baseline: dict[str, Any], cfg: EvaluateConfig, runtime: str = ""
) -> bool:
    """Whether `point` (in `runtime`, else its settled figures) loses no more than
    evaluate.max_accuracy_drop of the baseline's validation accuracy at
    evaluate.budget_confidence: on a few thousand rows half a point is a handful of rows,
    so a point estimate alone passes by chance. Records `val_drop` and `val_drop_bound` on a
    settled point. Rows measured without their answers are judged on the point estimate."""
    prefix = f"{runtime}_" if runtime else ""
    mine = point.get(ANSWERS, {}).get(runtime or point.get("runtime"))
    theirs = baseline.get(ANSWERS, {}).get(baseline.get("runtime"))
    if mine is None or theirs is None:
        drop = baseline["val_accuracy"] - point[f"{prefix}val_accuracy"]
        bound = drop
    else:
        drop, bound = drop_and_bound(theirs, mine, cfg.budget_confidence)
    if not runtime:
        point["val_drop"], point["val_drop_bound"] = drop, bound
    return bound <= cfg.max_accuracy_drop + 1e-12


def qat_retries(rows: list[dict[str, Any]], cfg: EvaluateConfig) -> list[dict[str, Any]]:
    """The sweep's int8 points worth fine-tuning again in simulated int8 (compress.qat): those
    that post-training int8 put outside the accuracy budget while the same point in float
    (the baseline, for int8 alone) is within it, so the rounding is what costs. Each comes
    back as a new point whose recipe ends in `qat` instead of `quantize`; the choice then
    keeps whichever of the two is better. Search points (per-layer shares) are not retried."""
    baseline, by_name = rows[0], {r["name"]: r for r in rows if "error" not in r}
    retries = []
    for row in rows[1:]:
        if "error" in row or "quantize" not in row["recipe"] or row.get("ratios") is not None:
            continue
        in_float = [step for step in row["recipe"] if step != "quantize"]
        parent = by_name.get(point_name(in_float, row["sparsity"], row["bits"]))
        float_within = not in_float or (parent and within_budget(parent, baseline, cfg))
        if not float_within or within_budget(row, baseline, cfg):
            continue
        recipe = [*in_float, "qat"]
        retries.append(
            {
                "name": point_name(recipe, row["sparsity"], row["bits"]),
                "recipe": recipe,
                "sparsity": row["sparsity"],
                "bits": row["bits"],
            }
        )
    return retries


def settle_runtimes(rows: list[dict[str, Any]], cfg: EvaluateConfig, setting: str) -> None:
    """Each row's served runtime; its figures become that runtime's (unprefixed keys).
    `torch` / `onnxruntime`: that one; `auto`: of those measured, the best on the objective
    whose validation accuracy is within the budget (`within_budget`) of the baseline's
    most accurate runtime (a float export answers as torch does; int8 differs by runtime),
    else the more accurate (the better on the objective if they tie).
    A row that no allowed runtime measured (its export failed) gets an error."""
    measured = [r for r in rows if "error" not in r]
    base = rows[0]
    measured_base = [r for r in RUNTIMES if f"{r}_val_accuracy" in base]
    best = max(measured_base, key=lambda r: base[f"{r}_val_accuracy"], default=None)
    reference = {
        "val_accuracy": base.get(f"{best}_val_accuracy", 0.0),
        "runtime": best,
        ANSWERS: base.get(ANSWERS, {}),
    }
    for row in measured:
        candidates = [r for r in RUNTIMES if f"{r}_val_accuracy" in row]
        if setting != "auto":
            candidates = [r for r in candidates if r == setting]
        if not candidates:
            row["error"] = row.get("onnx_error") or f"not measured in {setting}"
            continue
        accuracy = {r: row[f"{r}_val_accuracy"] for r in candidates}
        within = [r for r in candidates if within_budget(row, reference, cfg, r)]
        cost = OBJECTIVE_KEY[cfg.objective]
        runtime = (
            min(within, key=lambda r: row[f"{r}_{cost}"])
            if within
            else max(candidates, key=lambda r: (accuracy[r], -row[f"{r}_{cost}"]))
        )
        row["runtime"] = runtime
        prefix = f"{runtime}_"
        row |= {k.removeprefix(prefix): v for k, v in list(row.items()) if k.startswith(prefix)}


def choose(rows: list[dict[str, Any]], cfg: EvaluateConfig) -> tuple[dict[str, Any] | None, str]:
    """The best point on the objective within the accuracy tolerance of the baseline (the
    first row); None (keep the baseline) when no point is, or the best is not better than
    the baseline on the objective by evaluate.objective_margin. Returns the point and why."""
    baseline, points = rows[0], [r for r in rows[1:] if "error" not in r]
    failed = f" ({len(rows) - 1 - len(points)} failed)" if len(points) < len(rows) - 1 else ""
    key = OBJECTIVE_KEY[cfg.objective]
    budget = (
        f"evaluate.max_accuracy_drop {cfg.max_accuracy_drop} at "
        f"{cfg.budget_confidence:.0%} confidence (paired bootstrap on the validation rows)"
    )
    within = [p for p in points if within_budget(p, baseline, cfg)]
    if not within:
        return None, (
            f"no point is within {budget} of the baseline's validation accuracy "
            f"{baseline['val_accuracy']:.4f}: the trained model is kept"
        )
    best = min(within, key=lambda p: (p[key], -p["val_accuracy"]))
    shown = "{:.3f} ms" if cfg.objective == "latency" else "{:,.0f} bytes"
    if best[key] > baseline[key] * (1 - cfg.objective_margin):
        # e.g. int8 on a CPU without fast int8 kernels, or zeros under a latency objective:
        # within evaluate.objective_margin (latency is noisy) it is no gain for a changed model
        return None, (
            f"the best point within {budget}, "
            f"**{best['name']}** ({shown.format(best[key])}), is not better on {key} than the "
            f"baseline ({shown.format(baseline[key])}) by evaluate.objective_margin "
            f"{cfg.objective_margin:.0%}: the trained model is kept"
        )
    return best, (
        f"**{best['name']}**: the lowest {key} ({shown.format(best[key])}, baseline "
        f"{shown.format(baseline[key])}: {baseline[key] / max(best[key], 1e-12):.2f}×) of the "
        f"{len(within)} of {len(points)} measured points{failed} whose validation accuracy is "
        f"within {budget} of the baseline's {baseline['val_accuracy']:.4f} (this point: "
        f"{best['val_accuracy']:.4f}, a drop of {best['val_drop']:+.4f}, at most "
        f"{best['val_drop_bound']:+.4f} at that confidence)"
    )


def pareto(rows: list[dict[str, Any]], cost: str) -> set[str]:
    """Names of the rows no other row beats on both validation accuracy and `cost`."""
    ok = [r for r in rows if "error" not in r]
    return {
        r["name"]
        for r in ok
        if not any(
            o["val_accuracy"] >= r["val_accuracy"]
            and o[cost] <= r[cost]
            and (o["val_accuracy"] > r["val_accuracy"] or o[cost] < r[cost])
            for o in ok
        )
    }


TABLE_COLUMNS = [
    "name",
    "runtime",
    "layer_removed",
    "val_accuracy",
    "val_drop",
    "val_drop_bound",
    "val_macro_f1",
    "latency_b1_p50_ms",
    "latency_b256_p50_ms",
    "served_b1_ms",
    "served_b256_ms",
    "torch_latency_b256_p50_ms",
    "onnxruntime_latency_b256_p50_ms",
    "onnxruntime_val_accuracy",
    "parameters",
    "nonzero_parameters",
    "macs",
    "size_zstd_bytes",
    "size_encoded_bytes",
    "pareto",
    "chosen",
]


def pareto_markdown(rows: list[dict[str, Any]], why: str) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if v < 10 else f"{v:,.1f}"
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|---" * len(TABLE_COLUMNS) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |")
        else:
            lines.append("| " + " | ".join(cell(r.get(c, "")) for c in TABLE_COLUMNS) + " |")
    return (
        "\n".join(lines)
        + "\n\nChosen: "
        + why
        + "\n\nValidation split; latencies are medians of one-thread calls (p95 and all-core "
        "figures in the JSON table). runtime: where the point's network runs when served "
        "(serve.runtime), its figures in the unprefixed columns; torch_ / onnxruntime_: "
        "each runtime measured the same way. layer_removed: a search trial's share of each layer "
        "removed. pareto: L = on the accuracy/batch-1 latency front, "
        "S = on the accuracy/encoded size front.\n"
    )


def plot_pareto(rows: list[dict[str, Any]], path: Path, floor: float) -> None:
    """Accuracy against three costs, fronts dashed, baseline ★, chosen circled and the
    accuracy floor (baseline − evaluate.max_accuracy_drop) dotted unless far below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    for ax, cost, label in (
        (axes[0], "latency_b1_p50_ms", "batch-1 latency p50, ms (1 thread)"),
        # the latency objective's own axis, so the choice can be read off a picture
        (axes[1], "latency_b256_p50_ms", "batch-256 latency p50, ms (1 thread)"),
        (axes[2], "size_encoded_bytes", "encoded size, bytes"),
    ):
        front = pareto(rows, cost)
        on_front = sorted((r for r in ok if r["name"] in front), key=lambda r: r[cost])
        ax.plot(
            [r[cost] for r in on_front],
            [r["val_accuracy"] for r in on_front],
            color="tab:gray",
            linestyle="--",
            label="Pareto front",
        )
        for r in ok:
            marker, color = ("o", "tab:blue")  # the sweep's points
            if r["name"] == BASELINE:
                marker, color = ("*", "black")
            elif r.get("layer_removed") is not None:  # compress.search's trials
                marker, color = ("^", "tab:green")
            ax.scatter([r[cost]], [r["val_accuracy"]], marker=marker, s=90, color=color)
            ax.annotate(
                r["name"],
                (r[cost], r["val_accuracy"]),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
            if r["chosen"]:
                ax.scatter(
                    [r[cost]],
                    [r["val_accuracy"]],
                    s=220,
                    facecolors="none",
                    edgecolors="tab:red",
                    label="chosen",
                )
        low, high = ax.get_ylim()
        if floor >= low - (high - low) / 2:  # in view, or near enough to widen the view
            ax.axhline(floor, color="tab:red", linestyle=":", label="accuracy floor")
            ax.set_ylim(min(low, floor - (high - low) / 20), high)
        ax.set(
            xscale="log",
            xlabel=label,
            ylabel="validation accuracy",
            title=f"Accuracy vs {label.split(',')[0]} (★ baseline, ▲ search)",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
