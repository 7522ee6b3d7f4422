"""One short command that proves (or disproves) the GPU path on a CUDA machine.

    python3 benchmarks/gpu_check.py [--data DIR] [--epochs N] [--batch-size N] [--cases REGEX]
                                    [--no-tests] [--json PATH] [--allow-cpu]

Needs torch with CUDA, numpy, pyarrow (the worker's own imports) and, for the `gpu` tests,
pytest, pandas, pydantic and pyyaml (carry them as wheels where they are missing: the
script says which). It:
1. prints what it runs on (torch, CUDA, GPUs, bf16 support, NCCL);
2. trains through the real worker, one NCCL process per GPU (`torchrun`; one GPU: a single
   process), on Fashion-MNIST (`--data`, the IDX folder) or, without it, scikit-learn's
   digits as 8x8 images: MLP and CNN (channels-last, convolutions [32, 64]) eager in fp32
   and in `precision: auto` (bf16, fp16 + GradScaler where bf16 is missing); the CNN in
   auto precision with `torch.compile`; transformer and GRU in auto precision; a streamed
   split (row groups into pinned memory). For each: samples/s and step ms (last epoch),
   validation accuracy, precision, compile state, backend, data mode;
3. runs `pytest -m gpu tests/test_gpu.py`;
4. prints a table, writes JSON (default: $OUT/gpu_check.json if OUT is set, else
   benchmarks/results/gpu_check.json), and exits non-zero if any check failed.
Without a CUDA device it says so and exits 2.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, benchmark_args, write_json  # noqa: E402  (sets the path)


def environment() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "nccl": torch.distributed.is_nccl_available(),
    }


def write_data(folder: Path, data: Path | None) -> tuple[dict, list[str], list[int]]:
    """Train/val Parquet files (small row groups, so streaming has groups to stream)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    readable = importlib.util.find_spec("pydantic") is not None  # tasks.readers needs it
    if data and (data / "train-images-idx3-ubyte.gz").is_file() and readable:
        from tasks.readers import read_idx

        X = read_idx(data / "train-images-idx3-ubyte.gz").reshape(60000, -1)
        y = read_idx(data / "train-labels-idx1-ubyte.gz").astype(np.int64)
        shape = [1, 28, 28]
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        X, y, shape = digits.data.astype(np.uint8), digits.target.astype(np.int64), [1, 8, 8]
    names = [f"pixel_{i}" for i in range(X.shape[1])]
    cut = int(len(X) * 0.85)
    files = {}
    for split, rows in (("train", slice(0, cut)), ("val", slice(cut, None))):
        table = pa.table({**{n: X[rows, i] for i, n in enumerate(names)}, "label": y[rows]})
        files[split] = str(folder / f"{split}.parquet")
        pq.write_table(table, files[split], row_group_size=max(256, cut // 20))
    return files, names, shape


def spec_for(files, names, shape, out: Path, epochs: int, **changes) -> dict:
    arch = {
        "model": "mlp",
        "n_features": len(names),
        "n_classes": 10,
        "hidden": [512, 256],
        "dropout": 0.1,
        "image_shape": shape,
    }
    arch.update(changes.pop("arch", {}))
    spec = {
        "train_files": [files["train"]],
        "val_files": [files["val"]],
        "features": names,
        "label": "label",
        "arch": arch,
        "phases": [{"sparsity": None, "epochs": epochs, "lr": 0.003}],
        "optimizer": "adamw",
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "scheduler": "onecycle",
        "step_size": 5,
        "gamma": 0.5,
        "label_smoothing": 0.05,
        "nesterov": False,
        "l1": 0.0,
        "clip_grad_norm": None,
        "warmup_epochs": 0,
        "plateau_patience": 2,
        "early_stopping_patience": None,
        "batch_size": 256,
        "precision": "fp32",
        "compile": False,
        "seed": 0,
        "resident_max_gb": "auto",
        "init_from": None,
        "out_dir": str(out),
        "checkpoint_dir": None,
        "metric_prefix": "train",
    }
    spec.update(changes)
    return spec


CASES = {  # fp32 and auto side by side per model: what auto precision buys on its own
    "mlp fp32 eager": {},
    "mlp auto eager": {"precision": "auto"},
    "cnn fp32 eager": {"arch": {"model": "cnn", "hidden": [128]}},
    "cnn auto eager": {
        "arch": {"model": "cnn", "hidden": [128]},
        "precision": "auto",
    },
    "cnn auto + compile": {
        "arch": {"model": "cnn", "hidden": [128]},
        "precision": "auto",
        "compile": True,
    },
    "transformer auto": {
        "arch": {"model": "transformer", "hidden": [64, 64], "heads": 4, "patch": 4},
        "precision": "auto",
    },
    "rnn (gru) auto": {"arch": {"model": "rnn", "hidden": [128]}, "precision": "auto"},
    "mlp auto, streamed": {"precision": "auto", "resident_max_gb": 1e-4},
}


def run_cases(files, names, shape, folder: Path, epochs: int, gpus: int, device: str, args) -> dict:
    from tasks.training.launch import launch

    results = {}
    for name, changes in CASES.items():
        if not re.search(args.cases, name):
            continue
        if changes.get("arch", {}).get("model") == "transformer" and shape[1] % 4:
            changes = {**changes, "arch": {**changes["arch"], "patch": 2}}
        out = folder / name.replace(" ", "_").replace(",", "").replace("+", "")
        out.mkdir()
        t0 = time.perf_counter()
        try:
            # digits: batches of 64 give the sequence models enough steps
            batch = args.batch_size or (256 if shape[1] == 28 else 64)
            spec = spec_for(files, names, shape, out, epochs, batch_size=batch, **changes)
            r = launch(spec, gpus, out)
            history = json.loads((out / "history.json").read_text())
            # the last epoch's figures: the first one's include CUDA's warm-up and compiling
            r["samples_per_second"] = history[-1]["train/samples_per_second"]
            r["last_step_ms"] = history[-1]["train/step_ms"]
            r["ok"] = r["device"] == device and r["val_accuracy"] > 0.7
        except Exception as exc:
            r = {"ok": False, "error": str(exc)[:2000]}
        r["wall_seconds"] = time.perf_counter() - t0
        results[name] = r
        print(f"  {name}: {'ok' if r['ok'] else 'FAILED'}", flush=True)
    return results


def run_gpu_tests() -> dict:
    missing = [
        m for m in ("pytest", "pandas", "pydantic", "yaml") if not importlib.util.find_spec(m)
    ]
    if missing:
        return {"ok": False, "skipped": f"missing packages {missing}: carry them as wheels"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "gpu",
            "tests/test_gpu.py",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return {"ok": proc.returncode == 0, "tail": (proc.stdout + proc.stderr)[-3000:]}


def main() -> int:
    parser = benchmark_args(__doc__, "gpu_check")
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--epochs", type=int, help="default: 3 on Fashion-MNIST, 15 on digits")
    parser.add_argument(
        "--batch-size", type=int, help="default: 256 on Fashion-MNIST, 64 on digits"
    )
    parser.add_argument("--cases", default="", help="regex: run only the cases it matches")
    parser.add_argument("--no-tests", action="store_true", help="skip `pytest -m gpu`")
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="no GPU: run the cases on 2 gloo processes (checks this script)",
    )
    args = parser.parse_args()
    env = environment()
    print(json.dumps(env, indent=2))
    if not env["gpus"] and not args.allow_cpu:
        print("no CUDA device here: nothing to check (run this on a GPU machine)")
        return 2
    device, processes = ("cuda", len(env["gpus"])) if env["gpus"] else ("cpu", 2)
    with tempfile.TemporaryDirectory(prefix="accelflow-gpu-") as tmp:
        files, names, shape = write_data(Path(tmp), args.data)
        print(f"data: {len(names)} features, image {shape}; {processes} {device} process(es)")
        epochs = args.epochs or (3 if shape[1] == 28 else 15)
        cases = run_cases(files, names, shape, Path(tmp), epochs, processes, device, args)
    if args.no_tests or not env["gpus"]:
        tests = {"ok": True, "skipped": "--no-tests" if env["gpus"] else "no GPU"}
    else:
        tests = run_gpu_tests()
    print(
        f"\n{'case':<36} {'ok':>3} {'val acc':>8} {'samples/s':>10} {'step ms':>8} {'precision':>9} {'compile':>18} {'backend':>14} {'data':>9}"
    )
    print("-" * 124)
    for name, r in cases.items():
        if "val_accuracy" not in r:
            print(f"{name:<36} {'no':>3}  {r.get('error', '')[:80]}")
            continue
        print(
            f"{name:<36} {'yes' if r['ok'] else 'no':>3} {r['val_accuracy']:>8.4f} "
            f"{r['samples_per_second']:>10.0f} {r['last_step_ms']:>8.2f} "
            f"{r['precision']:>9} {r['compile']:>18} {r['backend']:>14} {r['data_mode']:>9}"
        )
    print(f"\npytest -m gpu: {'passed' if tests['ok'] else 'FAILED'} {tests.get('skipped', '')}")
    print(tests.get("tail", "")[-1500:])
    report = {"environment": env, "cases": cases, "gpu_tests": tests}
    write_json(args.json, report)
    return 0 if tests["ok"] and all(r["ok"] for r in cases.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
