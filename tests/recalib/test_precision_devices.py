"""Reduced-precision models and the CUDA path of the recalibration core."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from recalib.recalibrate import recalibrate


def _mlp(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_accumulated_in_float64(dtype: torch.dtype) -> None:
    model = _mlp(dtype).eval()
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(500, 6, generator=gen) * 3 + 40).to(dtype)
    report = recalibrate(model, x, batch_size=7, method="exact", mode="eval")
    # Reference: the same half-precision Linear outputs, reduced in float64.
    with torch.no_grad():
        h = model[0](x).double()
    bn = model[1]
    assert bn.running_mean.dtype == dtype
    ref_mean, ref_var = h.mean(0), h.var(0, unbiased=True)
    # Stored in half precision: compare at half-precision resolution of each value.
    res = 1e-2 if dtype is torch.bfloat16 else 2e-3
    torch.testing.assert_close(bn.running_mean.double(), ref_mean, rtol=res, atol=res)
    torch.testing.assert_close(bn.running_var.double(), ref_var, rtol=res, atol=res)
    assert report.layers[0].samples == 500


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_statistics_equal_cpu() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
    ).eval()
    x = torch.randn(64, 3, 16, 16) * 2 + 1
    cpu = copy.deepcopy(model)
    recalibrate(cpu, x, batch_size=16, mode="eval")
    gpu = copy.deepcopy(model).cuda()
    # cuDNN convolutions default to TF32 on Ampere and newer (10-bit mantissa): that is the
    # convolution's precision, not the estimator's, so it is off for the comparison.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        report = recalibrate(gpu, x, batch_size=16, mode="eval", device="cuda")
    assert report.device == "cuda"
    auto = recalibrate(copy.deepcopy(model).cuda(), x, batch_size=16, mode="eval")
    assert auto.device.startswith("cuda")  # taken from the model when device= is not given
    for (name, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items(), strict=True):
        if "running" in name:
            torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)
