"""The trainer against a plain PyTorch loop, 1 vs 2 gloo processes, and time to accuracy
for each model on full Fashion-MNIST; side by side in one run.

    .venv/bin/python benchmarks/train_benchmark.py [--json PATH] [--skip-models]

1. Overhead: accelflow's trainer (one process, in this process) vs a plain loop over the
   same in-memory tensors: same MLP, optimizer (AdamW, one-cycle), batch 256, 3 epochs,
   same threads. Goal: samples/s ratio >= 0.9.
2. Data parallel on CPU: the worker under torchrun with 1 and with 2 gloo processes (each
   given cores / processes threads), same global batch of 256 per process; samples/s.
   The CPU default of `train.world_size` should follow from this.
3. Time to accuracy: `accelflow run` per model (`mlp` on PCA features, `cnn`, `rnn`,
   `transformer` on the images; tune and compression off), test accuracy on the 10,000 test
   images and the train stage's seconds.
4. The CNN's memory layout (`--layout`): the default CNN (channels 16, 32; head 512) in
   NCHW and in channels-last (NHWC, what it uses), batch 256, one thread and all cores:
   training steps (AdamW) in samples/s and scoring (inference mode) in ms per batch,
   alternated round by round so both see the same machine.
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
FMNIST = Path("/usr/share/datasets/fashion-mnist")
# epochs per model: what reaches its accuracy goal here on 2 cores in a few minutes
MODELS = {
    "mlp": ["train.model=mlp", "train.epochs=15"],
    "cnn": ["train.model=cnn", "train.epochs=8", "train.hidden=[128]"],
    "rnn": ["train.model=rnn", "train.epochs=10", "train.hidden=[128]", "train.lr=0.005"],
    "transformer": [
        "train.model=transformer",
        "train.epochs=15",
        "train.hidden=[64, 64]",
        "train.heads=4",
        "train.patch=4",
        "train.dropout=0.05",
    ],
}


def fmnist_parquet(folder: Path) -> tuple[dict, list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.readers import read_idx

    X = read_idx(FMNIST / "train-images-idx3-ubyte.gz").reshape(60000, -1)
    y = read_idx(FMNIST / "train-labels-idx1-ubyte.gz").astype("int64")
    names = [f"pixel_{i}" for i in range(784)]
    files = {}
    for split, rows in (("train", slice(0, 54000)), ("val", slice(54000, None))):
        table = pa.table({**{n: X[rows, i] for i, n in enumerate(names)}, "label": y[rows]})
        files[split] = str(folder / f"{split}.parquet")
        pq.write_table(table, files[split])
    return files, names


def spec(files, names, out: Path, epochs: int = 3) -> dict:
    from conf.schema import TrainConfig
    from tasks.train import OPTIM_KEYS

    cfg = TrainConfig(model="mlp", hidden=[512, 256], epochs=epochs)
    return {
        "train_files": [files["train"]],
        "val_files": [files["val"]],
        "features": names,
        "label": "label",
        "arch": {
            "model": "mlp",
            "n_features": 784,
            "n_classes": 10,
            "hidden": cfg.hidden,
            "dropout": cfg.dropout,
            "image_shape": None,
        },
        "phases": [{"sparsity": None, "epochs": epochs, "lr": cfg.lr}],
        **{k: getattr(cfg, k) for k in OPTIM_KEYS},
        "init_from": None,
        "out_dir": str(out),
        "checkpoint_dir": None,
        "metric_prefix": "train",
    }


def plain_loop(trainer, epochs: int) -> float:
    """The same model, data and optimizer settings in the shortest correct loop: samples/s."""
    import torch
    import torch.nn.functional as F

    from tasks.training.models import build_model
    from tasks.training.optim import Schedule, build_optimizer

    s = trainer.spec
    torch.manual_seed(s["seed"])
    X, y = trainer.train_split.X, trainer.train_split.y
    model = build_model(s["arch"])
    model.load_state_dict(trainer.model.state_dict())  # the same standardisation buffers
    opt = build_optimizer(s, model.parameters(), s["phases"][0]["lr"])
    steps = (len(X) + s["batch_size"] - 1) // s["batch_size"]
    sched = Schedule(s, opt, s["phases"][0]["lr"], epochs, steps)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(X))
        for i in range(0, len(X), s["batch_size"]):
            rows = order[i : i + s["batch_size"]]
            loss = F.cross_entropy(model(X[rows]), y[rows], label_smoothing=s["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return epochs * len(X) / (time.perf_counter() - start)


def overhead(files, names, folder: Path) -> dict:
    import torch

    from tasks.training.worker import Rank, Trainer

    torch.set_num_threads(os.cpu_count() or 1)
    out = folder / "overhead"
    out.mkdir()
    trainer = Trainer(spec(files, names, out), Rank(0, 1, torch.device("cpu")))
    plain = plain_loop(trainer, 3)
    trainer.run()
    history = json.loads((out / "history.json").read_text())
    ours = sum(h["train/samples_per_second"] for h in history) / len(history)
    return {"trainer_samples_per_s": ours, "plain_samples_per_s": plain, "ratio": ours / plain}


def data_parallel(files, names, folder: Path) -> dict:
    from tasks.training.launch import launch

    rates = {}
    for world in (1, 2):
        out = folder / f"world{world}"
        out.mkdir()
        launch(spec(files, names, out), world, out)
        history = json.loads((out / "history.json").read_text())
        rates[world] = sum(h["train/samples_per_second"] for h in history) / len(history)
    return {
        "samples_per_s_1": rates[1],
        "samples_per_s_2": rates[2],
        "speedup": rates[2] / rates[1],
    }


def time_to_accuracy(folder: Path, only: list[str] | None = None) -> list[dict]:
    import mlflow

    rows = []
    store = folder / "mlflow.db"
    for model, sets in MODELS.items():
        if only and model not in only:
            continue
        argv = [str(BIN / "accelflow"), "run", "--set", f"workdir={folder / 'work'}"]
        for s in [
            f"tracking.uri=sqlite:///{store}",
            "tune.enabled=false",
            "compress.recipe=[]",
            *sets,
        ]:
            argv += ["--set", s]
        t0 = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            rows.append({"model": model, "error": (out.stdout + out.stderr)[-2000:]})
            continue
        client = mlflow.MlflowClient(f"sqlite:///{store}")
        exp = client.get_experiment_by_name("accelflow").experiment_id
        parent = client.search_runs(
            [exp], "tags.`accelflow.stage` = 'pipeline'", order_by=["attributes.start_time DESC"]
        )[0]
        train = client.search_runs(
            [exp],
            f"tags.mlflow.parentRunId = '{parent.info.run_id}' and attributes.run_name = 'train'",
        )[0]
        rows.append(
            {
                "model": model,
                "settings": sets,
                "test_accuracy": parent.data.metrics["test/accuracy"],
                "train_seconds": train.data.metrics["train/seconds"],
                "parameters": train.data.metrics["train/parameters"],
                "run_wall_seconds": wall,
            }
        )
        print(
            f"  {model}: {rows[-1]['test_accuracy']:.4f} in {rows[-1]['train_seconds']:.0f} s",
            flush=True,
        )
    return rows


def cnn_layouts(rounds: int = 3, steps: int = 20) -> list[dict]:
    """Part 4: the same CNN in NCHW and in NHWC, timed in alternating rounds; best round."""
    import torch
    import torch.nn.functional as F

    from tasks.training.models import build_model

    arch = {"model": "cnn", "n_features": 784, "n_classes": 10, "hidden": [512]}
    arch |= {"dropout": 0.1, "image_shape": [1, 28, 28], "channels": [16, 32]}
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))

    def model_in(layout: str):
        torch.manual_seed(0)
        model = build_model(arch)  # channels-last, as the trainer and the served model run it
        if layout == "NCHW":
            model.features.to(memory_format=torch.contiguous_format)
            model.images = lambda v: model.standardize(v).view(-1, 1, 28, 28)
        return model

    def timed(layout: str) -> tuple[float, float]:
        model = model_in(layout).train()
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        for i in range(steps + 3):  # 3 warm-up steps
            if i == 3:
                start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        train = steps * len(x) / (time.perf_counter() - start)
        model.eval()
        with torch.inference_mode():
            for _ in range(3):
                model(x)
            start = time.perf_counter()
            for _ in range(steps):
                model(x)
        return train, (time.perf_counter() - start) / steps * 1000

    rows = []
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        best: dict[str, list[float]] = {"NCHW": [0.0, float("inf")], "NHWC": [0.0, float("inf")]}
        for _ in range(rounds):
            for layout in best:
                train, score = timed(layout)
                best[layout] = [max(best[layout][0], train), min(best[layout][1], score)]
        for layout, (train, score) in best.items():
            rows.append(
                {
                    "layout": layout,
                    "threads": threads,
                    "train_samples_per_s": train,
                    "score_b256_ms": score,
                }
            )
    return rows


def print_layouts(rows: list[dict]) -> None:
    print(f"\n{'CNN layout, batch 256':<24} {'threads':>8} {'train samples/s':>16} {'score ms':>9}")
    print("-" * 60)
    for r in rows:
        print(
            f"{r['layout']:<24} {r['threads']:>8} {r['train_samples_per_s']:>16.0f} "
            f"{r['score_b256_ms']:>9.2f}"
        )
    for threads in sorted({r["threads"] for r in rows}):
        a, b = (
            next(r for r in rows if r["threads"] == threads and r["layout"] == k)
            for k in ("NCHW", "NHWC")
        )
        print(
            f"{'NHWC / NCHW':<24} {threads:>8} {b['train_samples_per_s'] / a['train_samples_per_s']:>15.2f}x "
            f"{a['score_b256_ms'] / b['score_b256_ms']:>8.2f}x"
        )


def main() -> None:
    parser = benchmark_args(__doc__, "train")
    parser.add_argument("--skip-models", action="store_true", help="parts 1 and 2 only")
    parser.add_argument("--only", nargs="+", choices=list(MODELS), help="part 3, these models only")
    parser.add_argument("--layout", action="store_true", help="part 4 only")
    args = parser.parse_args()
    if args.layout:
        rows = cnn_layouts()
        print_layouts(rows)
        path = (
            args.json.with_name("train_layout.json")
            if args.json.name == "train.json"
            else args.json
        )
        write_json(path, {"cnn_layouts": rows, "cpus": os.cpu_count()})  # parts 1-3 are kept
        return
    with tempfile.TemporaryDirectory(prefix="accelflow-train-bench-") as tmp:
        tmp = Path(tmp)
        over = parallel = None
        if not args.only:
            files, names = fmnist_parquet(tmp)
            over = overhead(files, names, tmp)
            parallel = data_parallel(files, names, tmp)
        models = [] if args.skip_models else time_to_accuracy(tmp, args.only)
    if over:
        print_parts_1_and_2(over, parallel)
    if models:
        print_models(models)
    result = {"overhead": over, "data_parallel": parallel, "models": models, "cpus": os.cpu_count()}
    write_json(args.json, result)


def print_parts_1_and_2(over: dict, parallel: dict) -> None:
    print(
        f"\n{'trainer vs plain loop (1 process, MLP 784-512-256-10, batch 256)':<66} {'samples/s':>10}"
    )
    print("-" * 78)
    print(f"{'plain PyTorch loop':<66} {over['plain_samples_per_s']:>10.0f}")
    print(f"{'accelflow trainer':<66} {over['trainer_samples_per_s']:>10.0f}")
    print(f"{'ratio (goal >= 0.9)':<66} {over['ratio']:>10.2f}")
    print(f"\n{'gloo processes (same per-process batch)':<66} {'samples/s':>10}")
    print("-" * 78)
    print(f"{'1 process':<66} {parallel['samples_per_s_1']:>10.0f}")
    print(f"{'2 processes':<66} {parallel['samples_per_s_2']:>10.0f}")
    print(f"{'speed-up':<66} {parallel['speedup']:>10.2f}")


def print_models(models: list[dict]) -> None:
    if models:
        print(
            f"\n{'model (full Fashion-MNIST)':<14} {'test acc':>9} {'train s':>8} {'params':>9}  settings"
        )
        print("-" * 90)
        for r in models:
            if "error" in r:
                print(f"{r['model']:<14} FAILED {r['error'][-300:]}")
                continue
            print(
                f"{r['model']:<14} {r['test_accuracy']:>9.4f} {r['train_seconds']:>8.0f} "
                f"{r['parameters']:>9.0f}  {' '.join(r['settings'])}"
            )


if __name__ == "__main__":
    main()
