"""Which int8 pays on this CPU: torch.ao's dynamic int8 (what the `quantize` step runs in
torch), torchao's successors to it, and onnxruntime's dynamic int8, against float32.

    .venv/bin/python benchmarks/int8_backends.py             # about 1 minute
    PYTHONPATH=/path/to/torchao .venv/bin/python benchmarks/int8_backends.py   # with torchao
    ... benchmarks/int8_backends.py --compile    # and compiled: about 2 minutes more

torch.ao.quantization is deprecated in favour of torchao (not a dependency: the rows for it
appear when it imports). One MLP of Fashion-MNIST's shape (784-512-256-10, seeded weights:
time does not depend on their values), one thread, p50 over 100 calls at batch 1 and 30 at
batch 256, best of 3 alternating rounds; "max logit diff" against float32 torch on the same
256 inputs. The CPU's vector extensions are printed beside it: int8 kernels gain where the
CPU has VNNI (AVX-512 VNNI or AVX-VNNI) and may not at all where it has AVX2 only.
Writes benchmarks/results/int8_backends.json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import benchmark_args, write_json  # noqa: E402  (sets the path)

ARCH = {
    "model": "mlp",
    "n_features": 784,
    "n_classes": 10,
    "hidden": [512, 256],
    "dropout": 0.0,
    "image_shape": None,
}
CALLS = {1: 100, 256: 30}
ROUNDS = 3
COMPILE_SECONDS: dict[str, float] = {}


def cpu_extensions() -> list[str]:
    """The CPU flags that decide int8 speed (Linux's /proc/cpuinfo)."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return [f for f in wanted if f in flags]


def torch_backends(model_fn, compile_them: bool):
    """name → a callable on a float32 numpy batch, for each torch-side backend that loads;
    with `compile_them`, float32 and torchao's dynamic int8 compiled too (torchao's CPU
    speed-up is said to need torch.compile with inductor's freezing)."""
    import torch

    from tasks.training.models import quantize_dynamic_int8

    def wrap(module):
        def call(x):
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()

        return call

    backends = {
        "float32 (torch)": wrap(model_fn()),
        "torch.ao quantize_dynamic int8": wrap(quantize_dynamic_int8(model_fn())),
    }
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError:
        print("torchao not importable: its rows are left out (pip install torchao==0.18.0)")
        return backends
    for name, config in (
        ("torchao int8 dynamic activations + int8 weights", Int8DynamicActivationInt8WeightConfig),
        ("torchao int8 weight-only", Int8WeightOnlyConfig),
    ):
        model = model_fn()
        quantize_(model, config())
        backends[name] = wrap(model)
    if compile_them:
        import torch._inductor.config

        torch._inductor.config.freezing = True
        int8 = model_fn()
        quantize_(int8, Int8DynamicActivationInt8WeightConfig())
        for name, model in (
            ("float32 (torch), compiled", model_fn()),
            ("torchao int8 dynamic, compiled", int8),
        ):
            compiled = torch.compile(model)
            start = time.perf_counter()
            with torch.inference_mode():
                for batch in CALLS:  # both shapes compiled before any timing
                    compiled(torch.zeros(batch, ARCH["n_features"]))
            COMPILE_SECONDS[name] = time.perf_counter() - start
            print(f"{name}: compiled in {COMPILE_SECONDS[name]:.1f} s")
            backends[name] = wrap(compiled)
    return backends


def onnx_backends(model_fn, folder: Path):
    import onnxruntime as ort

    from tasks.compress.export import export_onnx, quantize_onnx

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    plain = export_onnx(model_fn(), ARCH["n_features"], folder / "float.onnx")
    int8 = quantize_onnx(plain, folder / "int8.onnx", None)
    backends = {}
    for name, path in (("float32 (onnxruntime)", plain), ("onnxruntime dynamic int8", int8)):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        backends[name] = lambda x, s=session, i=input_name: s.run(None, {i: x})[0]
    return backends


def main() -> None:
    import numpy as np
    import torch

    from tasks.served.pyfunc import timed_ms
    from tasks.training.models import build_model

    parser = benchmark_args(__doc__, "int8_backends")
    parser.add_argument(
        "--compile", action="store_true", help="also torch.compile float32 and torchao's int8"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    def model_fn():
        torch.manual_seed(0)
        return build_model(ARCH).eval()

    with tempfile.TemporaryDirectory() as tmp:
        backends = {**torch_backends(model_fn, args.compile), **onnx_backends(model_fn, Path(tmp))}
        inputs = {b: np.random.default_rng(b).standard_normal((b, 784), np.float32) for b in CALLS}
        reference = backends["float32 (torch)"](inputs[256])
        best = {name: dict.fromkeys(CALLS, float("inf")) for name in backends}
        for _ in range(ROUNDS):  # alternating: a slow minute on a shared machine hits all
            for name, call in backends.items():
                for batch, calls in CALLS.items():
                    p50 = timed_ms(lambda c=call, x=inputs[batch]: c(x), calls)[
                        0
                    ]  # the stage's own loop
                    best[name][batch] = min(best[name][batch], p50)
        rows = [
            {
                "backend": name,
                "b1_ms": best[name][1],
                "b256_ms": best[name][256],
                "speedup_b1": best["float32 (torch)"][1] / best[name][1],
                "speedup_b256": best["float32 (torch)"][256] / best[name][256],
                "max_logit_diff": float(np.abs(call(inputs[256]) - reference).max()),
            }
            for name, call in backends.items()
        ]
    extensions = cpu_extensions()
    print(
        f"\nCPU vector extensions: {', '.join(extensions) or 'none found'}; torch {torch.__version__}"
    )
    print(
        f"\n{'backend':50s} {'b1 ms':>8s} {'(×)':>6s} {'b256 ms':>8s} {'(×)':>6s} {'max diff':>9s}"
    )
    for r in rows:
        print(
            f"{r['backend']:50s} {r['b1_ms']:8.3f} {r['speedup_b1']:6.2f} "
            f"{r['b256_ms']:8.2f} {r['speedup_b256']:6.2f} {r['max_logit_diff']:9.4f}"
        )
    result = {"cpu": extensions, "torch": torch.__version__, "rows": rows}
    write_json(args.json, result | {"compile_seconds": COMPILE_SECONDS})


if __name__ == "__main__":
    main()
