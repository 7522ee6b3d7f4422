"""Quantization-aware fine-tuning for dynamic int8 (the `qat` compression step).

While a phase with `fake_int8` trains, every layer that `quantize_dynamic_int8` converts (an
exact `nn.Linear`, as `quantize_dynamic` matches types) computes with its weights and inputs
rounded as the int8 kernel rounds them: weights int8, symmetric, one scale per tensor (the
default weight observer); inputs uint8 over each call's own range with 7 bits (fbgemm's
dynamic Linear uses `reduce_range`). `torch.fake_quantize_per_tensor_affine` passes the
gradient straight through the rounding (zero outside the range), so the float weights learn
to sit where rounding costs least; the `quantize` conversion after it then rounds them the
same way. A zero weight rounds to zero, so a magnitude mask's zeros stay zeros.

The layers are switched by class (`FakeInt8Linear` is a Linear with another forward): their
parameters, names and state dict are untouched, so masks, DDP's hooks and checkpoints see
plain Linear weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.training.models import without_fused_encoder


def fake_int8_weight(w: torch.Tensor) -> torch.Tensor:
    """`w` rounded to int8 as the symmetric per-tensor observer does (scale max|w| / 127.5)."""
    scale = (w.detach().abs().amax() / 127.5).clamp(min=1e-12).float().reshape(1)
    zero = torch.zeros(1, dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_tensor_affine(w, scale, zero, -128, 127)


def fake_uint7_input(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded as a dynamic int8 Linear quantizes its input: uint8 with reduce_range (0 to
    127) over this call's range, which always holds 0 (so zero is exact)."""
    lo = x.detach().amin().clamp(max=0.0).float()
    hi = x.detach().amax().clamp(min=0.0).float()
    scale = ((hi - lo) / 127.0).clamp(min=1e-12)
    zero = torch.round(-lo / scale).clamp(0, 127).to(torch.int32)
    return torch.fake_quantize_per_tensor_affine(x, scale.reshape(1), zero.reshape(1), 0, 127)


class FakeInt8Linear(nn.Linear):
    """A Linear that computes as its dynamic int8 conversion will (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_uint7_input(x), fake_int8_weight(self.weight), self.bias)


def int8_layers(model: nn.Module) -> list[nn.Linear]:
    """The layers `quantize_dynamic_int8` converts: exact nn.Linear (not its subclasses, such
    as attention's output projection, which quantize_dynamic leaves in float)."""
    return [m for m in model.modules() if type(m) in (nn.Linear, FakeInt8Linear)]


def simulate_int8(model: nn.Module, on: bool) -> int:
    """Switch the int8 layers' forward to the simulated one (on) or back; how many."""
    layers = int8_layers(model)
    for layer in layers:
        layer.__class__ = FakeInt8Linear if on else nn.Linear
    if on:  # so that validation runs the simulated forward too
        without_fused_encoder(model)
    return len(layers)
