"""Tests of recalib.renorm: Batch Renormalization against BN and against the paper's formulas."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from recalib.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, renorm_factors

F64 = torch.float64


def _close(actual: Tensor | None, expected: Tensor | None) -> None:
    """Equal up to float64 rounding (the layers are compared in float64)."""
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def _nbt(m: _BatchNorm) -> Tensor:
    assert m.num_batches_tracked is not None
    return m.num_batches_tracked


# (renorm class, torch class, input shape)
LAYERS = [
    (BatchRenorm1d, nn.BatchNorm1d, (8, 3)),
    (BatchRenorm1d, nn.BatchNorm1d, (4, 3, 6)),
    (BatchRenorm2d, nn.BatchNorm2d, (4, 3, 5, 5)),
    (BatchRenorm3d, nn.BatchNorm3d, (2, 3, 3, 4, 4)),
]


def _batch(gen: torch.Generator, shape: tuple[int, ...], *, scale: float = 3.0) -> Tensor:
    channel_shift = torch.tensor([-2.0, 0.5, 4.0], dtype=F64).view((1, 3) + (1,) * (len(shape) - 2))
    return torch.randn(shape, generator=gen, dtype=F64) * scale + channel_shift


def _batch_stats(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean, (var + eps).sqrt(), var


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    return v.view((1, -1) + (1,) * (x.dim() - 2))


def _randomize_affine(m: _BatchNorm, gen: torch.Generator) -> None:
    with torch.no_grad():
        m.weight.copy_(torch.rand(m.num_features, generator=gen, dtype=F64) + 0.5)
        m.bias.copy_(torch.randn(m.num_features, generator=gen, dtype=F64))


def _set_moving_stats(m: _BatchNorm, mean: Tensor, var: Tensor) -> None:
    assert m.running_mean is not None and m.running_var is not None
    with torch.no_grad():
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(("renorm_cls", "bn_cls", "shape"), LAYERS)
def test_no_clipping_matches_batchnorm(
    renorm_cls: Callable[..., _BatchNorm],
    bn_cls: type[_BatchNorm],
    shape: tuple[int, ...],
    momentum: float | None,
) -> None:
    gen = torch.Generator().manual_seed(0)
    bn = bn_cls(3, momentum=momentum, dtype=F64)
    _randomize_affine(bn, gen)
    rn = renorm_cls(3, momentum=momentum, dtype=F64, rmax=1.0, dmax=0.0)
    rn.load_state_dict(bn.state_dict())
    for _ in range(4):
        x = _batch(gen, shape)
        grad_out = torch.randn(shape, generator=gen, dtype=F64)
        x_bn, x_rn = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_bn, y_rn = bn(x_bn), rn(x_rn)
        _close(y_rn, y_bn)
        (y_bn * grad_out).sum().backward()
        (y_rn * grad_out).sum().backward()
        _close(x_rn.grad, x_bn.grad)
        _close(rn.weight.grad, bn.weight.grad)
        _close(rn.bias.grad, bn.bias.grad)
        bn.zero_grad()
        rn.zero_grad()
    _close(rn.running_mean, bn.running_mean)
    _close(rn.running_var, bn.running_var)
    assert int(_nbt(rn)) == int(_nbt(bn)) == 4


def test_moving_stats_do_not_depend_on_clipping() -> None:
    # r and d change the output only; the moving averages follow torch BN's update.
    gen = torch.Generator().manual_seed(1)
    bn = nn.BatchNorm2d(3, dtype=F64)
    rn = BatchRenorm2d(3, dtype=F64, rmax=3.0, dmax=5.0)
    for _ in range(5):
        x = _batch(gen, (4, 3, 5, 5), scale=10.0)
        y_bn, y_rn = bn(x), rn(x)
        assert (y_rn - y_bn).abs().max() > 0.1  # renormalization is active
    _close(rn.running_mean, bn.running_mean)
    _close(rn.running_var, bn.running_var)


def test_renorm_factors_hit_the_bounds() -> None:
    ones = torch.ones(4, dtype=F64)
    batch_mean = torch.tensor([0.0, 0.0, 100.0, -100.0], dtype=F64)
    batch_std = torch.tensor([50.0, 0.01, 1.0, 1.0], dtype=F64)
    r, d = renorm_factors(batch_mean, batch_std, 0 * ones, ones, rmax=3.0, dmax=5.0)
    _close(r, torch.tensor([3.0, 1 / 3.0, 1.0, 1.0], dtype=F64))
    _close(d, torch.tensor([0.0, 0.0, 5.0, -5.0], dtype=F64))
    # The same bounds given as 0-d tensors (the scheduled path).
    r_t, d_t = renorm_factors(
        batch_mean,
        batch_std,
        0 * ones,
        ones,
        rmax=torch.tensor(3.0, dtype=F64),
        dmax=torch.tensor(5.0, dtype=F64),
    )
    _close(r_t, r)
    _close(d_t, d)


def test_renorm_factors_inside_the_bounds_are_unclipped() -> None:
    batch_mean = torch.tensor([0.3, -1.0], dtype=F64, requires_grad=True)
    batch_std = torch.tensor([1.5, 0.8], dtype=F64, requires_grad=True)
    running_mean = torch.tensor([0.1, -0.5], dtype=F64)
    running_std = torch.tensor([1.0, 2.0], dtype=F64)
    r, d = renorm_factors(batch_mean, batch_std, running_mean, running_std, rmax=3.0, dmax=5.0)
    _close(r, torch.tensor([1.5, 0.4], dtype=F64))
    _close(d, torch.tensor([0.2, -0.25], dtype=F64))
    assert not r.requires_grad and not d.requires_grad


def test_training_output_is_clipped_when_moving_stats_are_far() -> None:
    gen = torch.Generator().manual_seed(2)
    x = _batch(gen, (4, 3, 5, 5))
    mean_b, std_b, _ = _batch_stats(x)
    rn = BatchRenorm2d(3, dtype=F64, rmax=2.0, dmax=1.5)
    # Channel 0: moving std far below the batch's (r = rmax), moving mean far below (d = +dmax).
    # Channel 1: moving std far above (r = 1/rmax), same mean (d = 0).
    # Channel 2: same std (r unclipped, ~1), moving mean far above (d = -dmax).
    run_mean = mean_b + torch.tensor([-50.0, 0.0, 50.0], dtype=F64)
    run_var = torch.tensor([1e-3, 1e4, 1.0], dtype=F64) * std_b**2
    _set_moving_stats(rn, run_mean, run_var)
    r2 = (std_b[2] / (run_var[2] + rn.eps).sqrt()).item()
    r = torch.tensor([2.0, 0.5, r2], dtype=F64)
    d = torch.tensor([1.5, 0.0, -1.5], dtype=F64)
    expected = (x - _per_channel(mean_b, x)) / _per_channel(std_b, x) * _per_channel(r, x)
    expected = expected + _per_channel(d, x)
    _close(rn(x), expected)


def test_training_output_uses_moving_stats_when_within_bounds() -> None:
    # Unclipped, (x - mu_B)/sigma_B * sigma_B/sigma + (mu_B - mu)/sigma = (x - mu)/sigma:
    # training normalizes with the moving statistics (those before this step's update).
    gen = torch.Generator().manual_seed(3)
    x = _batch(gen, (4, 3, 5, 5))
    mean_b, std_b, _ = _batch_stats(x)
    rn = BatchRenorm2d(3, dtype=F64, rmax=3.0, dmax=5.0)
    _randomize_affine(rn, gen)
    run_mean = mean_b.detach() + torch.tensor([0.5, -1.0, 2.0], dtype=F64) * std_b.detach()
    run_var = torch.tensor([0.6, 1.7, 2.5], dtype=F64) * std_b.detach() ** 2
    _set_moving_stats(rn, run_mean, run_var)
    expected = F.batch_norm(x, run_mean.clone(), run_var.clone(), rn.weight, rn.bias, False, 0.0)
    _close(rn(x), expected)
    assert int(_nbt(rn)) == 1
    assert rn.running_mean is not None and not torch.equal(rn.running_mean, run_mean)


def test_gradients_treat_r_and_d_as_constants() -> None:
    gen = torch.Generator().manual_seed(4)
    x = _batch(gen, (4, 3, 5, 5))
    grad_out = torch.randn(x.shape, generator=gen, dtype=F64)
    rn = BatchRenorm2d(3, dtype=F64, rmax=3.0, dmax=5.0)
    _randomize_affine(rn, gen)
    mean0, std0, _ = _batch_stats(x)
    run_mean, run_var = mean0 + 0.3 * std0, (0.8 * std0) ** 2 - 1e-5  # r, d unclipped
    _set_moving_stats(rn, run_mean, run_var)

    def manual(inp: Tensor, *, detach: bool) -> tuple[Tensor | None, ...]:
        inp = inp.clone().requires_grad_()
        w, b = (
            rn.weight.detach().clone().requires_grad_(),
            rn.bias.detach().clone().requires_grad_(),
        )
        mean_b, std_b, _ = _batch_stats(inp)
        running_std = (run_var + 1e-5).sqrt()
        r = std_b / running_std
        d = (mean_b - run_mean) / running_std
        if detach:
            r, d = r.detach(), d.detach()
        xhat = (inp - _per_channel(mean_b, inp)) / _per_channel(std_b, inp) * _per_channel(r, inp)
        y = (xhat + _per_channel(d, inp)) * _per_channel(w, inp) + _per_channel(b, inp)
        (y * grad_out).sum().backward()  # type: ignore[no-untyped-call]
        return inp.grad, w.grad, b.grad

    const_grads = manual(x, detach=True)
    live_grads = manual(x, detach=False)
    x_ours = x.clone().requires_grad_()
    (rn(x_ours) * grad_out).sum().backward()
    ours = (x_ours.grad, rn.weight.grad, rn.bias.grad)
    for got, want in zip(ours, const_grads, strict=True):
        _close(got, want)
    # The check has teeth: letting gradients flow through r and d changes the input gradient.
    assert live_grads[0] is not None and const_grads[0] is not None
    assert (live_grads[0] - const_grads[0]).abs().max() > 1e-3


def test_eval_is_batch_norm_with_running_stats() -> None:
    gen = torch.Generator().manual_seed(5)
    rn = BatchRenorm2d(3, dtype=F64)
    _randomize_affine(rn, gen)
    for _ in range(3):
        rn(_batch(gen, (4, 3, 5, 5)))
    rn.eval()
    state = {k: v.clone() for k, v in rn.state_dict().items()}
    x = _batch(gen, (2, 3, 5, 5))
    expected = F.batch_norm(
        x, state["running_mean"], state["running_var"], rn.weight, rn.bias, False, 0.0, rn.eps
    )
    torch.testing.assert_close(rn(x), expected, rtol=0, atol=0)
    for k, v in rn.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("training", [True, False])
def test_without_running_stats_is_batchnorm(training: bool) -> None:
    gen = torch.Generator().manual_seed(6)
    bn = nn.BatchNorm2d(3, track_running_stats=False, dtype=F64).train(training)
    rn = BatchRenorm2d(3, track_running_stats=False, dtype=F64).train(training)
    _randomize_affine(bn, gen)
    rn.load_state_dict(bn.state_dict())
    x = _batch(gen, (4, 3, 5, 5))
    _close(rn(x), bn(x))
    assert rn.running_mean is None and rn.num_batches_tracked is None
    assert rn.current_clipping() == (1.0, 0.0)


def test_state_dict_round_trips_with_batchnorm() -> None:
    gen = torch.Generator().manual_seed(7)
    bn = nn.BatchNorm2d(3, dtype=F64)
    _randomize_affine(bn, gen)
    for _ in range(2):
        bn(_batch(gen, (4, 3, 5, 5)))
    rn = BatchRenorm2d(3, dtype=F64)
    rn.load_state_dict(bn.state_dict())  # strict: same keys
    assert list(rn.state_dict()) == list(bn.state_dict())
    for _ in range(2):
        rn(_batch(gen, (4, 3, 5, 5)))
    back = nn.BatchNorm2d(3, dtype=F64)
    back.load_state_dict(rn.state_dict())
    for k, v in rn.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert int(_nbt(back)) == 4
    x = _batch(gen, (2, 3, 5, 5))
    torch.testing.assert_close(back.eval()(x), rn.eval()(x), rtol=0, atol=0)


def test_is_a_batchnorm_for_model_walkers() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchRenorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    found = [type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm)]
    assert found == ["BatchRenorm2d", "BatchNorm2d"]
    text = repr(BatchRenorm2d(4, rmax=2.0, dmax=1.0))
    assert "rmax=2.0" in text and "dmax=1.0" in text and "momentum=0.1" in text


PAPER: dict[str, Any] = {"warmup_steps": 5000, "rmax_ramp_steps": 35000, "dmax_ramp_steps": 20000}


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (0, (1.0, 0.0)),
        (4999, (1.0, 0.0)),
        (5000, (1.0, 0.0)),
        (22500, (2.0, 4.375)),
        (25000, (1.0 + 2.0 * 20000 / 35000, 5.0)),
        (40000, (3.0, 5.0)),
        (10**6, (3.0, 5.0)),
    ],
)
def test_paper_schedule(steps: int, expected: tuple[float, float]) -> None:
    m = BatchRenorm2d(4, rmax=3.0, dmax=5.0, **PAPER)
    assert m.clipping_at(steps) == pytest.approx(expected, rel=1e-6)
    assert m.num_batches_tracked is not None
    m.num_batches_tracked.fill_(steps)
    assert m.current_clipping() == pytest.approx(expected, rel=1e-6)


def test_default_schedule_is_off_and_warmup_alone_is_a_step() -> None:
    assert BatchRenorm2d(4).clipping_at(0) == (3.0, 5.0)
    assert BatchRenorm2d(4).current_clipping() == (3.0, 5.0)
    m = BatchRenorm2d(4, rmax=2.0, dmax=1.0, warmup_steps=10)
    assert m.clipping_at(9) == (1.0, 0.0)
    assert m.clipping_at(10) == (2.0, 1.0)


def test_forward_follows_the_schedule() -> None:
    gen = torch.Generator().manual_seed(8)
    rn = BatchRenorm2d(3, dtype=F64, momentum=0.0, rmax=3.0, dmax=5.0, **PAPER)
    bn = nn.BatchNorm2d(3, dtype=F64, momentum=0.0)
    far_mean, far_var = torch.full((3,), 100.0, dtype=F64), torch.full((3,), 1e-4, dtype=F64)
    for m in (rn, bn):
        _set_moving_stats(m, far_mean, far_var)
    x = _batch(gen, (4, 3, 5, 5))
    # Warm-up: plain BN however far the moving statistics are.
    _close(rn(x), bn(x))
    assert rn.num_batches_tracked is not None
    rn.num_batches_tracked.fill_(22500)  # rmax 2, dmax 4.375
    mean_b, std_b, _ = _batch_stats(x)
    expected = (x - _per_channel(mean_b, x)) / _per_channel(std_b, x) * 2.0 - 4.375
    _close(rn(x), expected)


def test_clipping_attributes_are_settable_and_validated() -> None:
    m = BatchRenorm2d(3, dtype=F64)
    m.rmax, m.dmax = 1.0, 0.0
    assert m.current_clipping() == (1.0, 0.0)
    with pytest.raises(ValueError, match=r"expected rmax to be a finite number >= 1 \(got 0.9\)"):
        m.rmax = 0.9
    assert m.rmax == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rmax": 0.5}, r"expected rmax to be a finite number >= 1 \(got 0.5\)"),
        ({"rmax": float("nan")}, r"expected rmax .* \(got nan\)"),
        ({"rmax": float("inf")}, r"expected rmax .* \(got inf\)"),
        ({"dmax": -1.0}, r"expected dmax to be a finite number >= 0 \(got -1.0\)"),
        ({"warmup_steps": -1}, r"expected warmup_steps to be an int >= 0 \(got -1\)"),
        ({"rmax_ramp_steps": 2.5}, r"expected rmax_ramp_steps to be an int >= 0 \(got 2.5\)"),
        ({"dmax_ramp_steps": True}, r"expected dmax_ramp_steps to be an int >= 0 \(got True\)"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchRenorm2d(3, **kwargs)


@pytest.mark.parametrize(("renorm_cls", "bn_cls", "shape"), LAYERS)
def test_input_dim_errors_match_torch(
    renorm_cls: Callable[..., _BatchNorm], bn_cls: type[_BatchNorm], shape: tuple[int, ...]
) -> None:
    bad = torch.zeros((2, 3, 4, 4, 4, 4) if len(shape) < 5 else (2, 3, 4, 4))
    with pytest.raises(ValueError) as ours:
        renorm_cls(3)(bad)
    with pytest.raises(ValueError) as theirs:
        bn_cls(3)(bad)
    assert str(ours.value) == str(theirs.value)


def test_one_value_per_channel_error_matches_torch() -> None:
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError) as ours:
        BatchRenorm1d(3)(x)
    with pytest.raises(ValueError) as theirs:
        nn.BatchNorm1d(3)(x)
    assert str(ours.value) == str(theirs.value)
    assert "Expected more than 1 value per channel when training" in str(ours.value)
    BatchRenorm1d(3).eval()(x)  # inference needs no batch statistics


def test_channel_mismatch_is_reported() -> None:
    with pytest.raises(ValueError, match=r"expected input with 3 channels \(got 4 channels\)"):
        BatchRenorm2d(3)(torch.zeros(2, 4, 3, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_float32_statistics(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(9)
    # Standard deviation 300: the batch variance (~9e4) overflows float16 if computed there.
    x32 = torch.randn(8, 3, 6, 6, generator=gen) * 300.0
    x = x32.to(dtype)
    rn, ref = BatchRenorm2d(3), BatchRenorm2d(3)
    y = rn(x)
    y_ref = ref(x.float())
    assert y.dtype == dtype
    assert rn.running_var is not None and ref.running_var is not None
    assert rn.running_var.dtype == torch.float32
    torch.testing.assert_close(rn.running_var, ref.running_var, rtol=1e-6, atol=0)
    torch.testing.assert_close(y.float(), y_ref, rtol=1e-2, atol=1e-2)


def test_eval_exports_to_onnx_as_batch_normalization() -> None:
    onnx = pytest.importorskip("onnx")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchRenorm2d(4)).eval()
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 8, 8),),
        buf,  # type: ignore[arg-type]  # file-like works
        dynamo=False,
        do_constant_folding=False,
    )
    ops = [node.op_type for node in onnx.load_from_string(buf.getvalue()).graph.node]
    assert "BatchNormalization" in ops
