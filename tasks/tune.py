"""tune: an Optuna search over train.* settings, its trials in parallel on the Dask cluster.

The study's first trial is the config's own train.* values, so the default and the best
are measured on the same budget (`tune.epochs`, each on the next `tune.max_rows` rows of one
seeded walk over the training split: a trial the pruner keeps sees more data as it goes; under
ASHA, the default, only the best third of the trials at 1, 3 and 9 epochs trains on).
Each trial is one single-process training inside a Dask task (in the worker's process: Dask
workers are daemonic and may not start children), reporting its validation metric every
epoch to the pruner. The study lives in Optuna's journal file in the stage's resumable
folder (or in the database at `tune.storage`) under a name made from the stage key, so a
run killed mid-search resumes with its finished trials and runs only the rest. The default
trial is never pruned, and the summary weighs the best trial's lead over it on the same
validation rows (a paired bootstrap on both trials' per-row answers, `tasks.paired`); under
`tune.confidence` a lead within the noise leaves train.* as given.

Pure stage logic: MLflow sees each finished trial as a nested run through `Hooks.on_child`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from conf.schema import PipelineConfig, SearchDimension, TrainConfig, TuneConfig, mask_text
from tasks import train
from tasks.cluster import dask_client
from tasks.errors import TrainingError
from tasks.paired import gain_and_bound
from tasks.progress import Progress
from tasks.spec import ChildRun, Hooks, Inputs, StageSpec
from tasks.store import Manifest, StageDir

# keys that only some optimizers read: suggested only for those (define-by-run)
CONDITIONAL = {"momentum": ("sgd", "rmsprop"), "nesterov": ("sgd",)}
INTERRUPTED = "interrupted: the run stopped while this trial ran"
STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}

TrialCallback = Callable[[dict[str, Any], int, int], None]  # (record, finished, budget)


# ---------------------------------------------------------------- the space


def _encode(value: Any) -> Any:
    """Optuna's categorical choices are scalars: a list (layer widths) travels as JSON text."""
    return json.dumps(value) if isinstance(value, list) else value


def _decode(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) and value.startswith("[") else value


def with_defaults(
    space: dict[str, SearchDimension], cfg: TrainConfig
) -> dict[str, SearchDimension]:
    """The space with the config's own value added to every categorical axis, so the default
    trial is a point of the search (Optuna rejects a fixed value outside the choices)."""
    out = {}
    for key, dim in space.items():
        own = getattr(cfg, key)
        if dim.type == "categorical" and own not in (dim.choices or []):
            dim = dim.model_copy(update={"choices": [own, *(dim.choices or [])]})
        out[key] = dim
    return out


def suggest(trial, space: dict[str, SearchDimension], cfg: TrainConfig) -> dict[str, Any]:
    """A trial's train.* values, define-by-run: the optimizer is drawn first, and momentum
    and Nesterov only for the optimizers that use them."""
    params: dict[str, Any] = {}
    for key in sorted(space, key=lambda k: k != "optimizer"):
        if key in CONDITIONAL and params.get("optimizer", cfg.optimizer) not in CONDITIONAL[key]:
            continue
        dim = space[key]
        if dim.type == "float":
            params[key] = trial.suggest_float(key, dim.low, dim.high, log=dim.log)
        elif dim.type == "int":
            params[key] = trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log)
        else:
            choices = [_encode(c) for c in dim.choices or []]
            params[key] = _decode(trial.suggest_categorical(key, choices))
    return params


def trial_epochs(tune: TuneConfig, rows: int) -> int:
    """tune.epochs; auto: under ASHA, whose rungs are at 1, 3, 9 and 27 epochs, the first
    rung from 9 on at which a trial promoted through them all has seen every one of the
    `rows` training rows (tune.max_rows an epoch), 27 at most: the search's budget grows
    with the table, while only a ninth of the trials trains 9 epochs and a 27th 27. Under
    the median pruner or none, 3."""
    if tune.epochs != "auto":
        return tune.epochs
    if tune.pruner != "asha":
        return 3
    per_epoch, epochs = min(rows, tune.max_rows or rows), 9
    while epochs < 27 and epochs * per_epoch < rows:
        epochs *= 3
    return epochs


def trial_config(
    cfg: TrainConfig, params: dict[str, Any], tune: TuneConfig, rows: int
) -> TrainConfig:
    """train.* with a trial's values, trained for the trial's budget: trial_epochs, or more
    on a small table, until the trial takes tune.min_steps steps on its `rows` (one process)."""
    trial = TrainConfig.model_validate(
        {
            **cfg.model_dump(),
            **params,
            "epochs": trial_epochs(tune, rows),
            "min_steps": tune.min_steps,
        }
    )
    epochs = train.epochs_for(trial, min(rows, tune.max_rows or rows), 1)
    warmup = min(trial.warmup_epochs, epochs - 1)
    return trial.model_copy(update={"epochs": epochs, "warmup_epochs": warmup})


# ---------------------------------------------------------------- Optuna objects


def open_storage(ref: dict[str, str]):
    """A journal file (parallel-safe through its lock file) or a database URL."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    location = ref["storage"]
    if "://" in location:
        return optuna.storages.RDBStorage(location)
    return optuna.storages.JournalStorage(JournalFileBackend(location))


def make_sampler(cfg: TuneConfig):
    import optuna

    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    # group: the conditional keys (momentum, nesterov) are modelled with the trials that
    # have them; a short budget gets a short random start
    startup = min(10, max(3, cfg.trials // 3))
    return optuna.samplers.TPESampler(
        seed=cfg.seed, n_startup_trials=startup, multivariate=True, group=True
    )


def make_pruner(cfg: TuneConfig):
    import optuna

    if cfg.pruner == "median":
        # from the first epoch on, once a few trials have finished: a trial's budget is a few
        # epochs, so waiting longer would save little
        return optuna.pruners.MedianPruner(
            n_startup_trials=min(5, max(2, cfg.trials // 4)), n_warmup_steps=0
        )
    if cfg.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


VALIDATION = ("val_accuracy", "val_loss", "val_macro_f1")  # what every trial reports per epoch
REPORTED_CONFIDENCE = 0.9  # the best trial's lead over the default, judged in the summary
METRIC_NAMES = {
    "val_accuracy": "val accuracy",
    "val_loss": "val loss",
    "val_macro_f1": "val macro-F1",
}


def direction(metric: str) -> str:
    return "minimize" if metric == "val_loss" else "maximize"


# ---------------------------------------------------------------- one trial (on a Dask worker)


class Diverged(RuntimeError):
    pass


def run_trial(
    spec: dict[str, Any],
    study: dict[str, str],
    trial_id: int,
    metric: str,
    pruner: Any,
    threads: int,
) -> dict[str, Any]:
    """Train one trial in this process, reporting each epoch to the pruner. Never raises:
    a crash or a divergence comes back as a failed trial with its reason."""
    import optuna
    import torch

    from tasks.training.worker import Rank, Trainer

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    torch.set_num_threads(max(1, threads))
    loaded = optuna.load_study(
        study_name=study["name"],
        storage=open_storage(study),
        sampler=optuna.samplers.RandomSampler(),  # this side only reports: no sampling
        pruner=pruner,  # the study's own: a loaded study would get Optuna's default
    )
    trial = optuna.trial.Trial(loaded, trial_id)
    curve: list[dict[str, float]] = []
    epochs = sum(phase["epochs"] for phase in spec["phases"])
    # the default trial runs to its end: it is what the best must beat, and a slow starter
    # (one-cycle's rising learning rate) would lose ASHA's first rung at one epoch
    judged = not trial.user_attrs.get("default")

    def on_epoch(epoch: int, loss: float, val: dict[str, float]) -> None:
        curve.append({"epoch": epoch, "loss": loss, **val})
        if not math.isfinite(loss):
            raise Diverged(f"diverged: training loss {loss} at epoch {epoch}")
        trial.report(val[metric], epoch + 1)  # the step is the epochs trained: ASHA's rungs
        # after its last epoch a trial is done: judged there (ASHA's rung at 9 epochs of a
        # 9-epoch trial) it would be thrown away as pruned, its training spent
        if judged and epoch + 1 < epochs and trial.should_prune():
            raise optuna.TrialPruned(f"pruned after {epoch + 1} of {epochs} epochs")

    device = torch.device("cpu")
    if torch.cuda.is_available():  # one trial per GPU when the cluster has one worker per GPU
        device = torch.device("cuda", trial.number % torch.cuda.device_count())
    record: dict[str, Any] = {"state": "complete", "reason": ""}
    try:
        trainer = Trainer(spec, Rank(0, 1, device), on_epoch)
        result = trainer.run()
        record.update({k: result[k] for k in VALIDATION})
        record["answers"] = trainer.answers()  # per row: the default and the best compare
        if not math.isfinite(result[metric]):
            record.update(state="failed", reason=f"diverged: final {metric} {result[metric]}")
    except optuna.TrialPruned as exc:
        record.update(state="pruned", reason=str(exc))
    except Exception as exc:  # a trial's crash is its own: the study goes on
        record.update(state="failed", reason=f"{type(exc).__name__}: {exc}"[:500])
    record.update(curve=curve, seconds=time.perf_counter() - start)
    return record


# ---------------------------------------------------------------- the study (driver)


def counted(trial) -> bool:
    """A finished trial that spends the budget (an interrupted one does not)."""
    return trial.state.is_finished() and trial.user_attrs.get("reason") != INTERRUPTED


def fail_interrupted(study) -> int:
    """Trials left running by a killed run: mark them failed (they never report again)."""
    import optuna

    stale = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for t in stale:
        optuna.trial.Trial(study, t._trial_id).set_user_attr("reason", INTERRUPTED)
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    return len(stale)


def record_result(study, trial, record: dict[str, Any], metric: str) -> None:
    """Tell the study how the trial ended, keeping its figures in the storage."""
    from optuna.trial import TrialState

    for key in ("reason", "seconds", "curve", *VALIDATION):
        if key in record:
            trial.set_user_attr(key, record[key])
    if record["state"] == "complete":
        study.tell(trial, record[metric])
    else:
        study.tell(
            trial, state=TrialState.PRUNED if record["state"] == "pruned" else TrialState.FAIL
        )


def workers(client) -> tuple[int, int]:
    """(Dask workers, threads per worker) of the cluster."""
    info = client.scheduler_info(n_workers=-1)["workers"].values()
    return max(len(info), 1), max(min((w["nthreads"] for w in info), default=1), 1)


def search(
    features: Manifest,
    cfg: TuneConfig,
    train_cfg: TrainConfig,
    out: StageDir,
    client,
    on_trial: TrialCallback | None = None,
) -> dict[str, Any]:
    """Run (or resume) the study; return the manifest body with the best train.* values."""
    import optuna
    from dask.distributed import wait

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ref = {
        "name": f"accelflow-tune-{out.final.name}",
        "storage": cfg.storage or str(out.path("study.journal")),
    }
    study = optuna.create_study(
        study_name=ref["name"],
        storage=open_storage(ref),
        sampler=make_sampler(cfg),
        pruner=make_pruner(cfg),
        direction=direction(cfg.metric),
        load_if_exists=True,
    )
    interrupted = fail_interrupted(study)
    space = with_defaults(cfg.space, train_cfg)
    if not any(
        t.user_attrs.get("default") and counted(t) or t.state.name == "WAITING"
        for t in study.trials
    ):
        own = {k: _encode(getattr(train_cfg, k)) for k in space}
        study.enqueue_trial(own, user_attrs={"default": True})
    finished = sum(counted(t) for t in study.trials)
    budget = cfg.trials
    n_workers, threads = workers(client)
    parallel = n_workers if cfg.parallel == "auto" else cfg.parallel
    start = time.monotonic()
    running: dict[Any, Any] = {}
    launched = finished
    try:
        while True:
            while (
                len(running) < parallel
                and launched < budget
                and (cfg.timeout_s is None or time.monotonic() - start < cfg.timeout_s)
            ):
                trial = study.ask()
                params = suggest(trial, space, train_cfg)
                trial.set_user_attr("train_params", params)
                trial_cfg = trial_config(
                    train_cfg, params, cfg, features["splits"]["train"]["rows"]
                )
                spec = train.train_spec(features, trial_cfg, None, None)
                if cfg.max_rows:  # each epoch fresh rows: a trial's data grows with its epochs
                    spec["max_train_rows"] = cfg.max_rows * trial_cfg.epochs
                    spec["epoch_train_rows"] = cfg.max_rows
                spec["keep_resident"] = True  # the worker keeps the rows for the next trial
                future = client.submit(
                    run_trial,
                    spec,
                    ref,
                    trial._trial_id,
                    cfg.metric,
                    make_pruner(cfg),
                    threads,
                    pure=False,
                    key=f"tune-{out.final.name}-trial-{trial.number}",
                )
                running[future] = trial
                launched += 1
            if not running:
                break
            done, _ = wait(list(running), return_when="FIRST_COMPLETED")
            for future in done:
                trial = running.pop(future)
                try:
                    record = future.result()
                except Exception as exc:  # the worker itself died (memory, a lost node)
                    record = {"state": "failed", "reason": f"worker lost: {exc}"[:500], "curve": []}
                if answers := record.pop("answers", None):  # beside the journal (resumes keep it)
                    answers_path(out, trial.number).parent.mkdir(exist_ok=True)
                    np.savez(answers_path(out, trial.number), **answers)
                record_result(study, trial, record, cfg.metric)
                finished += 1
                if on_trial:
                    on_trial(trial_row(study, trial.number, cfg.metric), finished, budget)
    finally:  # the rows the workers kept for the next trial (the cluster serves other stages)
        from tasks.training.data import forget_kept

        client.run(forget_kept, on_error="ignore")  # a lost worker has nothing to release
    seconds = time.monotonic() - start
    summary = summarize(study, cfg, out, interrupted, seconds, features["splits"]["train"]["rows"])
    if warning := no_signal(summary["leaderboard"], majority_rate(features)):
        # in the stage's summary (MLflow, Prefect, the report) and as a tag on its run
        summary["tags"] = {"accelflow.tune.warning": warning}
        summary["summary"] += f"\n- warning: {warning}"
    return summary


# ---------------------------------------------------------------- what the stage reports


def answers_path(out: StageDir, trial: int) -> Path:
    return out.path(f"answers/trial-{trial}.npz")


def lead_over_default(
    best: dict[str, Any], default: dict[str, Any], cfg: TuneConfig, out: StageDir
) -> tuple[float, float] | None:
    """The best trial's gain over the default trial in tune.metric, on the same validation
    rows, and its lower bound (paired bootstrap) at `judged_at`; None when a trial's answers
    are missing (a study in a database that another run's folder began)."""
    paths = [answers_path(out, row["trial"]) for row in (default, best)]
    if not all(p.exists() for p in paths):
        return None
    base, point = (read_answers(p) for p in paths)
    return gain_and_bound(cfg.metric, base["label"], base, point, judged_at(cfg))


def read_answers(path: Path) -> dict[str, Any]:
    with np.load(path) as stored:
        return dict(stored)


def judged_at(cfg: TuneConfig) -> float:
    """The confidence the lead is judged at: tune.confidence, or 90% only to report it."""
    return cfg.confidence or REPORTED_CONFIDENCE


def trial_row(study, number: int, metric: str) -> dict[str, Any]:
    """One trial as a leaderboard row (and the record `on_trial` gets)."""
    trials = study.trials
    t, attrs = trials[number], trials[number].user_attrs
    began = min(x.datetime_start for x in trials if x.datetime_start)
    return {
        "trial": t.number,
        "state": STATES.get(t.state.name, t.state.name.lower()),
        metric: t.value if t.value is not None else attrs.get(metric),
        "val_accuracy": attrs.get("val_accuracy"),
        "seconds": round(attrs.get("seconds", float("nan")), 2),
        # wall seconds from the study's first trial to this one's end (parallel trials overlap)
        "finished_s": round((t.datetime_complete - began).total_seconds(), 2)
        if t.datetime_complete
        else None,
        "epochs": len(attrs.get("curve", [])),
        "default": bool(attrs.get("default")),
        "params": attrs.get("train_params", {}),
        "curve": attrs.get("curve", []),
        "reason": attrs.get("reason", ""),
    }


def leaderboard(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Complete trials best first, then pruned, then failed; params flattened for a table."""
    sign = -1 if direction(metric) == "maximize" else 1
    order = {"complete": 0, "pruned": 1, "failed": 2}

    def rank(row):
        value = row[metric]
        return (order.get(row["state"], 3), sign * value if value is not None else 0)

    table = []
    for row in sorted(rows, key=rank):
        flat = {k: v for k, v in row.items() if k not in ("params", "curve")}
        flat.update({k: str(v) if isinstance(v, list) else v for k, v in row["params"].items()})
        table.append(flat)
    return table


def majority_rate(features: Manifest) -> float:
    """The validation accuracy of always answering the most common class."""
    counts = train.class_counts(features, "val" if features["splits"]["val"]["rows"] else "train")
    return float(counts.max() / max(counts.sum(), 1))


def no_signal(leaderboard: list[dict[str, Any]], majority: float) -> str | None:
    """A search whose every completed trial scored the majority-class rate saw no signal:
    its budget (rows, epochs) was too small to tell settings apart. Say so."""
    scores = [r["val_accuracy"] for r in leaderboard if r.get("val_accuracy") is not None]
    if not scores or max(scores) > majority + 0.002:
        return None
    return (
        f"every completed trial scored the majority-class rate ({majority:.4f} val accuracy): "
        "the search saw no signal, so its choice is noise. Give trials more data or time "
        "(tune.max_rows, tune.epochs), or turn tuning off (tune.enabled: false)"
    )


def trials_ran(n: int, cfg: TuneConfig) -> str:
    if n < cfg.trials and cfg.timeout_s:  # a finished search that ran fewer: the clock
        return (
            f"{n} of {cfg.trials} trials (tune.timeout_s {cfg.timeout_s:g} s ended the search; "
            "null runs them all)"
        )
    return f"{n} trials"


def summarize(
    study, cfg: TuneConfig, out: StageDir, interrupted: int, seconds: float, train_rows: int
) -> dict:
    rows = [trial_row(study, t.number, cfg.metric) for t in study.trials if counted(t)]
    complete = [r for r in rows if r["state"] == "complete"]
    if not complete:
        first = next((r for r in rows if r["state"] == "failed"), rows[0] if rows else None)
        raise TrainingError(
            f"tune: none of {len(rows)} trials completed; the first failure, trial "
            f"{first['trial']}: {first['reason']}. Check the space in tune.space"
            if first
            else "tune: no trial ran (tune.timeout_s too short?)"
        )
    best = trial_row(study, study.best_trial.number, cfg.metric)
    default = next((r for r in rows if r["default"]), None)
    default_ok = default is not None and default["state"] == "complete"
    counts = {state: sum(r["state"] == state for r in rows) for state in STATES.values()}
    metrics = {
        "tune/best_val_accuracy": best["val_accuracy"],
        "tune/trials_complete": counts["complete"],
        "tune/trials_pruned": counts["pruned"],
        "tune/trials_failed": counts["failed"],
        "tune/seconds": seconds,
    }
    if cfg.metric != "val_accuracy":  # what the search ranked by, beside the accuracy
        metrics[f"tune/best_{cfg.metric}"] = best[cfg.metric]
    if default_ok:
        metrics["tune/default_val_accuracy"] = default["val_accuracy"]
        metrics["tune/gain"] = best["val_accuracy"] - default["val_accuracy"]
    lead = None
    if default_ok and not best["default"]:
        lead = lead_over_default(best, default, cfg, out)
    # the best trial's lead may be chance: under tune.confidence, train keeps its own settings
    kept = cfg.confidence is not None and lead is not None and lead[1] <= 0
    if lead is not None:
        metrics["tune/lead_lower_bound"] = lead[1]
    plots = [plot_history(rows, cfg.metric, out.path("tune-history.png"))]
    importance = param_importances(study)
    if importance:
        plots.append(plot_importance(importance, out.path("tune-importance.png")))
    compared = (
        f"the config's own settings reached {default['val_accuracy']:.4f}"
        if default_ok
        else f"the config's own settings did not complete ({default['state'] if default else 'not run'})"
    )
    won = "the config's own settings" if best["default"] else f"trial {best['trial']}"
    return {
        "planned": cfg.trials,
        "best_params": {} if kept else best["params"],
        "best_trial": best["trial"],
        "kept_default": kept,
        "metric": cfg.metric,
        "leaderboard": leaderboard(rows, cfg.metric),
        "importance": importance,
        "study": {"name": study.study_name, "storage": mask_text(cfg.storage or "journal file")},
        "plots": [out.final_path(Path(p).name) for p in plots],
        "metrics": metrics,
        "summary": (
            f"{trials_ran(len(rows), cfg)}: {counts['complete']} complete, {counts['pruned']} pruned, "
            f"{counts['failed']} failed, of {'up to ' if cfg.pruner != 'none' else ''}"
            f"{trial_epochs(cfg, train_rows)} epochs (at least {cfg.min_steps} steps) "
            f"each on {'the next ' + str(cfg.max_rows) if cfg.max_rows else 'all the'} training rows, "
            f"{cfg.sampler} sampler, {cfg.pruner} pruner, {seconds:.1f} s. Best: {won} with "
            + (
                f"{METRIC_NAMES[cfg.metric]} {best[cfg.metric]:.4f} and "
                if cfg.metric != "val_accuracy"
                else ""
            )
            + f"val accuracy {best['val_accuracy']:.4f}; {compared}. "
            + verdict(lead, cfg, best)
            + (
                f". {interrupted} trial(s) interrupted by an earlier run were re-run"
                if interrupted
                else ""
            )
        ),
    }


def verdict(lead: tuple[float, float] | None, cfg: TuneConfig, best: dict[str, Any]) -> str:
    """What train takes from the search, and why, in words."""
    uses = "Train uses: " + ", ".join(f"{k}={v}" for k, v in sorted(best["params"].items()))
    if lead is None:
        return uses
    gain, bound = lead
    judged = (
        f"{METRIC_NAMES[cfg.metric]} {gain:+.4f} (lower bound {bound:+.4f} at "
        f"{judged_at(cfg):.0%} confidence, paired bootstrap on the validation rows)"
    )
    if bound > 0:
        return f"Its lead, {judged}, holds. {uses}"
    if cfg.confidence is None:
        return (
            f"Its lead, {judged}, may be chance; train takes it (tune.confidence: "
            f"{REPORTED_CONFIDENCE} would keep train.*'s own settings). {uses}"
        )
    return (
        f"Its lead, {judged}, is within the validation noise: train keeps its own "
        f"settings (tune.confidence: null would take trial {best['trial']}'s)"
    )


def skip_tuning() -> dict[str, Any]:
    return {
        "best_params": {},
        "leaderboard": [],
        "plots": [],
        "metrics": {},
        "summary": "tuning is off (tune.enabled: false): train uses train.* as given",
    }


def param_importances(study) -> dict[str, float]:
    """fANOVA importances over the complete trials (needs a few; empty when it cannot tell)."""
    import optuna

    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (ValueError, RuntimeError):  # too few trials, or nothing varied
        return {}


def plot_history(rows: list[dict[str, Any]], metric: str, path: Path) -> str:
    """Best-so-far against trial number and against wall seconds of trial time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["trial"])
    better = max if direction(metric) == "maximize" else min
    fig, (by_trial, by_time) = plt.subplots(1, 2, figsize=(10, 4))
    best, xs, ys = None, [], []
    for r in rows:
        if r["state"] == "complete":
            best = r[metric] if best is None else better(best, r[metric])
        xs.append(r["trial"])
        ys.append(best if best is not None else float("nan"))
    best, ts, ts_best = None, [], []  # the same, in the order trials finished
    for r in sorted(rows, key=lambda r: r["finished_s"] or 0.0):
        if r["state"] == "complete":
            best = r[metric] if best is None else better(best, r[metric])
        ts.append(r["finished_s"] or 0.0)
        ts_best.append(best if best is not None else float("nan"))
    for r in rows:
        if r["state"] == "complete":
            by_trial.scatter(r["trial"], r[metric], color="tab:blue", s=18)
        elif r[metric] is not None:
            by_trial.scatter(r["trial"], r[metric], color="tab:gray", marker="x", s=18)
    by_trial.step(xs, ys, where="post", color="tab:orange", label="best so far")
    by_trial.set(xlabel="trial", ylabel=metric.replace("_", " "), title="Optimisation history")
    by_trial.legend()
    by_time.step(ts, ts_best, where="post", color="tab:orange")
    by_time.set(
        xlabel="wall seconds since the study began",
        ylabel=f"best {metric.replace('_', ' ')}",
        title="Best so far vs training seconds",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plot_importance(importance: dict[str, float], path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(importance)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(names) + 1.5))
    ax.barh(names, [importance[n] for n in names], color="tab:blue")
    ax.set(xlabel="importance (fANOVA, share of variance)", title="What mattered in the search")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def trial_run(trial: dict[str, Any], metric: str) -> ChildRun:
    """One finished trial as a nested run: its train.* values, per-epoch validation curve,
    state (complete / pruned / failed, with the reason) and seconds."""
    curve = [
        (f"val/{k.removeprefix('val_')}", row[k], int(row["epoch"]))
        for row in trial["curve"]
        for k in VALIDATION
        if k in row
    ]
    figures = [
        (f"trial/{k}", trial.get(k), 0) for k in dict.fromkeys((metric, "val_accuracy", "seconds"))
    ]
    tags = {
        "accelflow.stage": "tune-trial",
        "accelflow.trial.state": trial["state"],
        "accelflow.trial.default": str(trial["default"]).lower(),
    }
    if trial["reason"]:
        tags["accelflow.trial.reason"] = trial["reason"]
    return ChildRun(
        f"trial-{trial['trial']:03d}" + (" (default)" if trial["default"] else ""),
        {f"train.{k}": v for k, v in trial["params"].items()},
        curve + figures,
        tags,
        {"complete": "FINISHED", "pruned": "KILLED"}.get(trial["state"], "FAILED"),
    )


def tune_key(cfg: PipelineConfig, inputs: Inputs) -> dict[str, Any]:
    if not cfg.tune.enabled:
        return {"enabled": False}
    return {  # trials start from train.* (their length is tune.epochs)
        **cfg.tune.model_dump(mode="json"),
        "storage": mask_text(cfg.tune.storage or ""),
        "train": cfg.train.model_dump(mode="json", exclude={"max_restarts", "epochs", "min_steps"}),
    }


def build_tuning(cfg: PipelineConfig, inputs: Inputs, out: StageDir, hooks: Hooks) -> dict:
    if not cfg.tune.enabled:
        return skip_tuning()
    progress = Progress("tune", "trials", cfg.tune.trials)

    def on_trial(trial: dict[str, Any], finished: int, budget: int) -> None:
        if hooks.on_child:
            hooks.on_child(trial_run(trial, cfg.tune.metric))
        value = trial[cfg.tune.metric]
        shown = f"{cfg.tune.metric} {value:.4f}" if value is not None else trial["reason"]
        progress.step(finished, f"trial {trial['trial']} {trial['state']}, {shown}")

    with dask_client(cfg.dask) as client, progress:
        return search(inputs["reduce"], cfg.tune, cfg.train, out, client, on_trial)


def tuned_figure(m: Manifest) -> str:
    ran = len(m["leaderboard"])
    trials = f"{ran} of {m['planned']} trials" if ran < m.get("planned", ran) else f"{ran} trials"
    if "tune/default_val_accuracy" in m["metrics"]:
        kept = ", within noise: kept train.*" if m.get("kept_default") else ""
        return (
            f"val acc {m['metrics']['tune/default_val_accuracy']:.4f} → "
            f"{m['metrics']['tune/best_val_accuracy']:.4f}{kept} ({trials})"
        )
    return trials if m["leaderboard"] else "off"


SPEC = StageSpec(
    name="tune",
    section="tune",
    inputs=("reduce",),
    key=tune_key,
    build=build_tuning,
    figure=tuned_figure,
    headline={
        "tune/default_val_accuracy": "higher",
        "tune/best_val_accuracy": "higher",
        "tune/gain": "higher",
        "tune/lead_lower_bound": "higher",
    },
    tables={"leaderboard": "leaderboard"},
    resumable=True,
    uses_dask=True,
)
