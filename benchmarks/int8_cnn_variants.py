"""Which static int8 graph pays for a CNN in onnxruntime: the compress stage's own (QDQ,
per-channel 7-bit weights, every op) against the options onnxruntime offers.

    .venv/bin/python benchmarks/int8_cnn_variants.py                     # about 1 minute
    .venv/bin/python benchmarks/int8_cnn_variants.py --channels 16 32    # the default CNN

One Fashion-MNIST CNN (seeded weights, its standardisation fitted on real rows: time does
not depend on the weights' values, but the calibrated ranges should look real), exported as
the stage exports it, then quantized statically with each variant, calibrated on 512
training images. Batch 256, one thread, p50 of 30 calls, best of 3 alternating rounds;
"argmax agree" against the float graph on 2,000 images (untrained weights: a check that the
graph is sane, not an accuracy). Speed only: accuracy is the compress stage's to measure.
Writes benchmarks/results/int8_cnn_variants.json.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from common import benchmark_args, best_p50_ms, write_json  # noqa: E402  (sets the path)


def variants(conv_names: list[str]) -> dict[str, dict]:
    from onnxruntime.quantization import QuantFormat

    qdq = {"quant_format": QuantFormat.QDQ, "per_channel": True, "reduce_range": True}
    return {
        "QDQ, per-channel, 7-bit (the stage's)": qdq,
        "QOperator, per-channel, 7-bit": {**qdq, "quant_format": QuantFormat.QOperator},
        "QDQ, per-tensor, 7-bit": {**qdq, "per_channel": False},
        "QDQ, per-channel, 8-bit": {**qdq, "reduce_range": False},
        "QDQ, first conv left float": {**qdq, "nodes_to_exclude": conv_names[:1]},
        "QDQ, convs only": {**qdq, "op_types_to_quantize": ["Conv"]},
        "QDQ, matrix products only": {**qdq, "op_types_to_quantize": ["MatMul", "Gemm"]},
    }


def main() -> None:
    parser = benchmark_args(__doc__, "int8_cnn_variants")
    parser.add_argument("--channels", type=int, nargs=2, default=[32, 64])
    parser.add_argument("--head", type=int, default=512)
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    args = parser.parse_args()

    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from tasks.compress.export import Calibration, export_onnx, quiet_export
    from tasks.readers import read_idx
    from tasks.served.runtime import OnnxNetwork
    from tasks.training.models import build_model

    images = read_idx(args.data / "train-images-idx3-ubyte.gz").reshape(-1, 784)
    X = images[:5000].astype(np.float32)
    torch.manual_seed(0)
    arch = {
        "model": "cnn",
        "n_features": 784,
        "n_classes": 10,
        "hidden": [args.head],
        "channels": args.channels,
        "dropout": 0.0,
        "image_shape": [1, 28, 28],
    }
    model = build_model(arch).eval()
    with torch.no_grad():
        model.standardize.mean.copy_(torch.from_numpy(X.mean(0)))
        model.standardize.std.copy_(torch.from_numpy(X.std(0) + 1e-3))
    with tempfile.TemporaryDirectory(prefix="accelflow-int8-cnn-") as tmp:
        folder = Path(tmp)
        paths = {"float": export_onnx(model, 784, folder / "float.onnx")}
        prepared = folder / "prepared.onnx"
        with quiet_export():
            quant_pre_process(str(paths["float"]), str(prepared), skip_symbolic_shape=True)
        convs = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv"]
        for i, (name, options) in enumerate(variants(convs).items()):
            paths[name] = folder / f"variant-{i}.onnx"
            with quiet_export():
                quantize_static(
                    str(prepared),
                    str(paths[name]),
                    Calibration(X[:512], "features"),
                    weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8,
                    **options,
                )
        nets = {name: OnnxNetwork(path, threads=1) for name, path in paths.items()}
        batch = X[:256]
        best = best_p50_ms({name: lambda n=net: n(batch) for name, net in nets.items()}, 30, 3)
        reference = nets["float"](X[:2000]).argmax(1)
        rows = []
        for name, net in nets.items():
            rows.append(
                {
                    "variant": name,
                    "b256_ms": best[name],
                    "speedup": best["float"] / best[name],
                    "argmax_agree": float((net(X[:2000]).argmax(1) == reference).mean()),
                }
            )
    print(f"\nCNN channels {args.channels}, head {args.head}; batch 256, one thread\n")
    print("| variant | b256 ms | × float | argmax agree |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['b256_ms']:.2f} | {r['speedup']:.2f}× "
            f"| {r['argmax_agree']:.3f} |"
        )
    write_json(args.json, {"arch": arch, "rows": rows})


if __name__ == "__main__":
    main()
