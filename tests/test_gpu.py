"""The GPU path, on a CUDA machine (skipped without one; `benchmarks/gpu_check.py` runs them
there): bf16 autocast (fp16 + GradScaler where bf16 is missing), channels-last convolutions,
the split resident on the GPU, NCCL DDP with one process per GPU, torch.compile."""

from __future__ import annotations

import pytest
import torch
from conftest import make_spec

from tasks.training.launch import launch
from tasks.training.worker import Rank, Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CNN = {
    "model": "cnn",
    "n_features": 64,
    "n_classes": 10,
    "hidden": [32],
    "dropout": 0.0,
    "image_shape": [1, 8, 8],
}


def gpu_trainer(digits_parquet, tmp_path, **overrides) -> Trainer:
    spec = make_spec(digits_parquet, tmp_path, **overrides)
    return Trainer(spec, Rank(0, 1, torch.device("cuda", 0)))


def test_auto_precision_is_bf16_or_fp16_with_a_scaler_and_the_split_lives_on_the_gpu(
    digits_parquet, tmp_path
):
    trainer = gpu_trainer(digits_parquet, tmp_path, precision="auto")
    assert trainer.train_split.mode == "resident"
    assert trainer.train_split.X.device.type == "cuda"
    if torch.cuda.is_bf16_supported():
        assert trainer.amp == torch.bfloat16 and not trainer.scaler.is_enabled()
    else:
        assert trainer.amp == torch.float16 and trainer.scaler.is_enabled()
    result = trainer.run()
    assert result["device"] == "cuda" and result["val_accuracy"] > 0.8, result


def test_fp16_trains_with_a_grad_scaler(digits_parquet, tmp_path):
    trainer = gpu_trainer(digits_parquet, tmp_path, precision="fp16")
    assert trainer.scaler.is_enabled()
    assert trainer.run()["val_accuracy"] > 0.8


def test_the_cnn_runs_channels_last(digits_parquet, tmp_path):
    trainer = gpu_trainer(digits_parquet, tmp_path, arch=CNN)
    convs = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)]
    conv = convs[1]  # the second conv (many in and out channels): its layout is unambiguous
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert trainer.run()["val_accuracy"] > 0.8


def test_compile_on_the_gpu(digits_parquet, tmp_path):
    result = gpu_trainer(digits_parquet, tmp_path, arch=CNN, compile=True).run()
    assert result["compile"] == "compiled" and result["val_accuracy"] > 0.8, result


def test_nccl_ddp_one_process_per_gpu(digits_parquet, tmp_path):
    world = torch.cuda.device_count()
    spec = make_spec(digits_parquet, tmp_path)
    result = launch(spec, world_size=world, workdir=tmp_path)
    assert result["device"] == "cuda" and result["world_size"] == world
    assert result["backend"] == ("nccl" if world > 1 else "single process")
    assert result["val_accuracy"] > 0.8


def test_streaming_to_the_gpu_uses_pinned_memory(digits_parquet, tmp_path):
    trainer = gpu_trainer(digits_parquet, tmp_path, resident_max_gb=1e-6)
    assert trainer.train_split.mode == "streaming"
    X, _ = trainer.train_split.read(trainer.train_split.groups[0])
    assert X.is_pinned()
    assert trainer.run()["val_accuracy"] > 0.7
