"""compress.search: an Optuna NSGA-II study over each layer's width and int8, beside the sweep.

A trial removes its own share of each narrowable layer (an MLP's hidden layers, a CNN's
convolutions and its head's hidden layer; one width for a GRU/LSTM/transformer, whose specs
have one), in steps of 0.125 up to `compress.search.max_ratio`, and may add int8 or, when
`evaluate.objective` is size, k-means weight sharing at one of `compress.search.cluster_bits`
(clustering shrinks the stored model; it does not make it faster); under the size objective
a trial may instead zero its smallest weights at one of `compress.search.magnitude`'s
sparsities, the zeros making the stored model small (not faster). It is
then a point like the sweep's: slimmed, fine-tuned (distilled from the trained model) on
the Dask cluster, measured here in each runtime, its runtime settled. The two objectives
are `evaluate.objective`'s cost (batch-256 latency or size) and validation accuracy; the
accuracy budget (`evaluate.max_accuracy_drop` at `evaluate.budget_confidence`, the paired
bootstrap the choice uses) is the study's constraint, so NSGA-II ranks the points within
the budget first. Trials run a generation at a time, one per Dask worker, so the
measurements stay side by side on a machine the fine-tunes have left. On this coarse grid
NSGA-II asks for a point again; a repeat is told the first one's figures, not run again.

The study lives in Optuna's journal file in the stage's resumable folder: a run killed
mid-search re-measures its finished trials (their fine-tunes resume from the last
checkpoint, so none trains again) and runs only the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from conf.schema import CompressSearch, EvaluateConfig
from tasks.compress.choice import OBJECTIVE_KEY, settle_runtimes, within_budget
from tasks.progress import Progress
from tasks.store import StageDir

STEP = 0.125  # one eighth of a layer: coarse enough for a few trials to cover the space


def layer_count(arch: dict[str, Any]) -> int:
    """How many widths a trial chooses: one per layer `narrowable_layers` lists (Torch-Pruning's
    families), one for a GRU/LSTM/transformer (sliced here, one width for every layer)."""
    from tasks.compress.points import NARROWERS
    from tasks.training.models import build_model, narrowable_layers

    if arch["model"] in NARROWERS:
        return 1
    return len(narrowable_layers(build_model(arch)))


def last_steps(cfg: CompressSearch, objective: str) -> list[str]:
    """What a trial may do after narrowing: nothing, int8, or (when the objective is size:
    clustering makes a model smaller, not faster) k-means weight sharing at some bits."""
    steps = ["none", *(["quantize"] if cfg.quantize else [])]
    if objective == "size":
        steps += [f"cluster-{bits}" for bits in cfg.cluster_bits]
    return steps


def prunings(cfg: CompressSearch, objective: str) -> list[str]:
    """How a trial may prune: narrowing each layer by its own share, or (when the objective
    is size: zeros store small, they do not run faster) zeroing the smallest weights."""
    extra = [f"magnitude-{s:g}" for s in cfg.magnitude] if objective == "size" else []
    return ["structured", *extra]


def trial_point(
    trial,
    layers: int,
    max_ratio: float,
    steps: list[str],
    prunes: tuple[str, ...] = ("structured",),
) -> dict[str, Any]:
    """The point a trial asks for: how it prunes (each layer's removed share, or a
    magnitude sparsity), and its last step. Every trial draws every parameter, so NSGA-II
    sees one fixed space; a magnitude point ignores the shares."""
    prune = trial.suggest_categorical("prune", list(prunes)) if len(prunes) > 1 else "structured"
    ratios = [trial.suggest_float(f"remove_{i}", 0.0, max_ratio, step=STEP) for i in range(layers)]
    last = trial.suggest_categorical("last_step", steps) if len(steps) > 1 else "none"
    step, _, bits = last.partition("-")
    method, _, sparsity = prune.partition("-")
    narrowed = method == "structured"
    return {
        "name": f"search-{trial.number:02d}",
        "recipe": [method, *([step] if step != "none" else [])],
        "sparsity": None if narrowed else float(sparsity),
        "bits": int(bits) if bits else None,
        "ratios": ratios if narrowed else None,
        "layer_removed": " ".join(f"{r:g}" for r in ratios) if narrowed else "",
    }


def make_study(out: StageDir, cfg: CompressSearch):
    """The study (resumed from the stage's journal when a killed run left one)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.NSGAIISampler(
        # a generation of a few trials: a default population of 50 would be a random search
        population_size=max(4, min(50, cfg.trials // 3)),
        seed=cfg.seed,
    )
    return optuna.create_study(
        study_name=f"accelflow-compress-search-{out.final.name}",
        storage=optuna.storages.JournalStorage(JournalFileBackend(str(out.path("search.journal")))),
        sampler=sampler,
        directions=["minimize", "maximize"],
        load_if_exists=True,
    )


def point_key(point: dict[str, Any]) -> tuple:
    """What makes two trials the same point (NSGA-II on a coarse grid asks again)."""
    return (tuple(point["ratios"] or ()), tuple(point["recipe"]), point["sparsity"], point["bits"])


RunPoints = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


def search(
    baseline: dict[str, Any],
    arch: dict[str, Any],
    cfg: CompressSearch,
    evaluate_cfg: EvaluateConfig,
    runtime: str,
    parallel: int,
    out: StageDir,
    run_points: RunPoints,
) -> tuple[list[dict[str, Any]], str]:
    """Run (or resume) the study; its points' measured rows (runtimes settled), and a line
    for the summary. `run_points` fine-tunes and measures a generation of points (the
    stage's own machinery, so a trial is a point like the sweep's)."""
    import optuna
    from optuna.trial import TrialState

    from tasks.tune import fail_interrupted

    study = make_study(out, cfg)
    fail_interrupted(study)
    layers = layer_count(arch)
    steps = last_steps(cfg, evaluate_cfg.objective)
    prunes = tuple(prunings(cfg, evaluate_cfg.objective))
    cost = OBJECTIVE_KEY[evaluate_cfg.objective]
    rows: list[dict[str, Any]] = []
    seen: dict[tuple, dict[str, Any]] = {}  # each distinct point's row: a repeat is not re-run

    def measure_new(points: list[dict[str, Any]]) -> None:
        new: dict[tuple, dict[str, Any]] = {}
        for p in points:  # the first trial that asked for a point names it
            if point_key(p) not in seen:
                new.setdefault(point_key(p), p)
        measured = run_points(list(new.values())) if new else []
        settle_runtimes([baseline, *measured], evaluate_cfg, runtime)
        seen.update({point_key(r): r for r in measured})
        rows.extend(measured)

    # finished before a kill: measured again (their fine-tunes resume at their end)
    measure_new(
        [
            trial_point(
                optuna.trial.FixedTrial(t.params, t.number), layers, cfg.max_ratio, steps, prunes
            )
            for t in study.trials
            if t.state == TrialState.COMPLETE
        ]
    )
    launched = sum(t.state.is_finished() for t in study.trials)
    start = time.monotonic()
    with Progress("compress", "search trials", cfg.trials) as progress:
        while launched < cfg.trials and (
            cfg.timeout_s is None or time.monotonic() - start < cfg.timeout_s
        ):
            asked = [study.ask() for _ in range(min(parallel, cfg.trials - launched))]
            points = [trial_point(t, layers, cfg.max_ratio, steps, prunes) for t in asked]
            measure_new(points)
            for trial, point in zip(asked, points, strict=True):
                row = seen[point_key(point)]  # a repeat is told the first one's figures
                if "error" in row:
                    trial.set_user_attr("error", row["error"])
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                within_budget(row, baseline, evaluate_cfg)  # sets val_drop_bound
                # NSGA-II ranks feasible trials first: a drop bound beyond the budget is not
                trial.set_constraint(
                    "accuracy_budget", row["val_drop_bound"] - evaluate_cfg.max_accuracy_drop
                )
                trial.set_user_attr("point", row["name"])
                study.tell(trial, [row[cost], row["val_accuracy"]])
            launched += len(asked)
            progress.step(launched, ", ".join(p["name"] for p in points))
    feasible = [r for r in rows if "error" not in r and within_budget(r, baseline, evaluate_cfg)]
    ran = f"{launched} of {cfg.trials}" if launched < cfg.trials else f"{launched}"
    ran += " search trial" + ("" if launched == 1 else "s")
    if len(rows) < launched:
        ran += f", {len(rows)} distinct points"
    return rows, f"{ran} (NSGA-II, {len(feasible)} within the accuracy budget)"
