"""Distillation in the compress stage's fine-tunes: every sweep point with and without it,
the same epochs, from the same trained model.

    .venv/bin/python benchmarks/distill_benchmark.py       # ~5 min on 2 cores

Two `accelflow run`s on full Fashion-MNIST in one workdir (the MLP, tuning off to
save time). The first trains and sweeps with `compress.distill.enabled=false`; the second
changes only that key, so ingest → train are cache hits and every point is fine-tuned again
from the same weights, now with the trained model as teacher (alpha 0.5, T 4, the defaults).
Validation accuracy per point, as the stage measured it (its table in each run's compress
manifest); the drop is against the same uncompressed baseline in both runs.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from common import benchmark_args, write_json  # noqa: E402  (sets the path)
from compress_benchmark import ratios, run_sweep

SWEEP = [
    "train.model=mlp",  # auto, the default, picks the CNN for images
    "tune.enabled=false",
    # points where fine-tuning has something to win back: narrow layers, most weights zeroed
    "compress.sweep={recipes: [[structured], [magnitude]], sparsity: [0.7, 0.9]}",
    "compress.rounds=2",
    "compress.finetune_epochs=2",
]


def main() -> None:
    args = benchmark_args(__doc__, "distill").parse_args()
    runs: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="accelflow-distill-bench-") as tmp:
        for label, enabled in (("labels only", "false"), ("distilled", "true")):
            manifest = run_sweep(Path(tmp), [*SWEEP, f"compress.distill.enabled={enabled}"])
            runs[label] = ratios(manifest["table"])
            seconds[label] = manifest["metrics"]["compress/seconds"]
    plain = {r["point"]: r for r in runs["labels only"]}
    rows = []
    print("| point | val acc, labels only (drop, pt) | val acc, distilled (drop, pt) | gain, pt |")
    print("|---|---|---|---|")
    for r in runs["distilled"]:
        before = plain.get(r["point"])
        if before is None or "error" in r or "error" in before:
            continue
        gain = 100 * (r["val_accuracy"] - before["val_accuracy"])
        rows.append({"point": r["point"], "labels_only": before, "distilled": r, "gain_pt": gain})
        print(
            f"| {r['point']} | {before['val_accuracy']:.4f} ({before['drop_pt']:+.2f}) "
            f"| {r['val_accuracy']:.4f} ({r['drop_pt']:+.2f}) | {gain:+.2f} |"
        )
    print(
        f"compress stage: {seconds['labels only']:.1f} s labels only, "
        f"{seconds['distilled']:.1f} s distilled (the teacher's forward pass in every step)"
    )
    write_json(args.json, {"sweep": SWEEP, "rows": rows, "compress_seconds": seconds})


if __name__ == "__main__":
    sys.exit(main())
