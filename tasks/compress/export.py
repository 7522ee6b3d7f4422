"""ONNX: each measured model exported for onnxruntime (`serve.runtime`), and int8 there.

The export goes through `torch.export` (`torch.onnx.export(..., dynamo=True)`) with a
dynamic batch. A float export must give torch's answers: its logits are compared with
torch's on every validation row by the caller (`parity`), and a point whose export breaks
is not served by onnxruntime. int8 is onnxruntime's own quantization of the float export
(torch.ao's int8 modules do not export, and that API is deprecated):
- dynamic int8 (weights int8, activations quantized per call) for MLP / RNN / transformer:
  no calibration, the ranges come from each batch;
- static int8 for the CNN (QDQ, per-channel weights), its activation ranges calibrated on
  `compress.calibration_rows` training rows: convolutions then run in int8 too, which the
  dynamic flow leaves in float32.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

# float exports: largest |logit difference| to torch tolerated (float32 kernels differ in
# summation order, ~1e-5 on these models); any larger and the export is not served
PARITY_ATOL = 1e-3


@contextlib.contextmanager
def quiet_export():
    """torch.onnx's exporter logs its progress and optional-op registrations (torchvision)
    as warnings; a pipeline log only needs its errors."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(model, n_features: int, dest: Path) -> Path:
    """A float torch model → `dest` (ONNX, input `features` with a dynamic batch, output
    `logits`), written atomically."""
    import torch

    example = torch.zeros(2, n_features)  # a batch of 2: torch.export specialises 0 and 1
    with quiet_export():
        program = torch.onnx.export(
            model.eval(),
            (example,),
            dynamo=True,
            input_names=["features"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    tmp = dest.with_name(dest.name + ".tmp")
    program.save(str(tmp))
    os.replace(tmp, dest)
    return dest


class Calibration:
    """onnxruntime's CalibrationDataReader protocol over training rows, 64 at a time."""

    def __init__(self, rows: np.ndarray, input_name: str):
        self.batches = iter(
            [{input_name: rows[i : i + 64].astype(np.float32)} for i in range(0, len(rows), 64)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def quantize_onnx(src: Path, dest: Path, calibration: np.ndarray | None) -> Path:
    """int8 in onnxruntime: static QDQ with per-channel weights when calibration rows are
    given (the CNN), else dynamic; `dest` written atomically."""
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = dest.with_name(dest.name + ".pre")
    tmp = dest.with_name(dest.name + ".tmp")
    with quiet_export():
        # shape inference and graph fusions first, as onnxruntime's quantization guide asks
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        # reduce_range: 7-bit weights. x86 CPUs without VNNI add uint8 x int8 pairs in 16-bit
        # registers that saturate at full range (onnxruntime's quantization guide); measured
        # on 8x8 digits, a CNN lost 2.5 points of accuracy without it and none with it
        if calibration is None:
            quantize_dynamic(
                str(prepared), str(tmp), weight_type=QuantType.QInt8, reduce_range=True
            )
        else:
            quantize_static(
                str(prepared),
                str(tmp),
                Calibration(calibration, "features"),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8,
                reduce_range=True,
            )
    prepared.unlink()
    os.replace(tmp, dest)
    return dest


def export_point(
    arch: dict[str, Any], folder: Path, calibration: np.ndarray | None
) -> tuple[Path, bool]:
    """A measured model's `model.onnx` in its folder: the float network, or for an int8
    point its float weights (`model_float.pt`) quantized by onnxruntime. Returns the path
    and whether it is quantized (then parity with torch is not expected)."""
    from tasks.training.models import load_model

    float_arch = {k: v for k, v in arch.items() if k != "quantize"}
    quantized = "quantize" in arch
    weights = folder / ("model_float.pt" if quantized else "model.pt")
    dest = folder / "model.onnx"
    model = load_model(float_arch, str(weights))
    if not quantized:
        return export_onnx(model, arch["n_features"], dest), False
    float_onnx = export_onnx(model, arch["n_features"], folder / "model_float.onnx")
    static = calibration if arch["model"] == "cnn" else None
    quantize_onnx(float_onnx, dest, static)
    float_onnx.unlink()
    return dest, True


def fold_reduction(network: Path, reduction: dict[str, np.ndarray], dest: Path) -> Path:
    """The served graph: the reduction (centring, standardising and projection, all linear)
    as Sub + MatMul nodes in front of `network`, so one onnxruntime call takes encoded rows
    to logits and the ONNX file alone scores rows. `dest` written atomically."""
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper

    net = onnx.load(str(network))
    from tasks.reduce.pca import projection as reduction_projection

    projection = reduction_projection(reduction)
    raw, reduced = projection.shape[1], projection.shape[0]
    pre = helper.make_graph(
        [
            helper.make_node("Sub", ["raw_features", "pca_mean"], ["pca_centred"]),
            helper.make_node("MatMul", ["pca_centred", "pca_projection"], ["pca_reduced"]),
        ],
        "reduce",
        [helper.make_tensor_value_info("raw_features", TensorProto.FLOAT, ["batch", raw])],
        [helper.make_tensor_value_info("pca_reduced", TensorProto.FLOAT, ["batch", reduced])],
        [
            numpy_helper.from_array(reduction["mean"].astype(np.float32), "pca_mean"),
            numpy_helper.from_array(
                np.ascontiguousarray(projection.T, dtype=np.float32), "pca_projection"
            ),
        ],
    )
    pre_model = helper.make_model(
        pre, opset_imports=list(net.opset_import), ir_version=net.ir_version
    )
    entry = net.graph.input[0].name
    served = compose.merge_models(pre_model, net, io_map=[("pca_reduced", entry)])
    tmp = dest.with_name(dest.name + ".tmp")
    onnx.save(served, str(tmp))
    os.replace(tmp, dest)
    return dest


def served_network(
    model: dict[str, Any], runtime: str, reduction_path: str | None, scratch: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A bundle's model files and meta for `runtime`: for onnxruntime with a reduction, the
    ONNX export with the reduction folded in (written to `scratch`), which the bundle's
    Predictor then feeds encoded rows directly."""
    meta = {"runtime": runtime}
    if runtime != "onnxruntime" or not reduction_path:
        return model, meta
    from tasks.reduce.pca import load_reduction

    folded = fold_reduction(Path(model["onnx"]["path"]), load_reduction(reduction_path), scratch)
    return {**model, "onnx": {"path": str(folded)}}, meta | {"reduction_in_graph": True}


def parity(torch_logits: np.ndarray, onnx_logits: np.ndarray) -> tuple[float, int]:
    """Largest |logit difference| and how many rows' answers differ, near-ties aside (rows
    whose two best torch logits are within PARITY_ATOL may go either way in either runtime)."""
    diff = float(np.abs(torch_logits - onnx_logits).max()) if len(torch_logits) else 0.0
    top2 = np.sort(torch_logits, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > PARITY_ATOL
    differ = torch_logits.argmax(1) != onnx_logits.argmax(1)
    return diff, int((differ & decided).sum())
