"""utils/scheduler.py against the formulas written out here in float64, the 4-step student list, and the
official UniPC grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.scheduler import (
    add_noise,
    flow_target,
    flow_to_noise,
    flow_to_x0,
    make_unipc_scheduler,
    shift_sigma,
    training_weight,
    unipc_grid,
    warp_timesteps,
    x0_to_flow,
)


def _tensors(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 4, 3, 2, 5, generator=gen).to(dtype)
    noise = torch.randn(2, 4, 3, 2, 5, generator=gen).to(dtype)
    return x0, noise


def _sigma(t: torch.Tensor) -> torch.Tensor:
    """t [B] or [B, F] -> sigma [B, 1, F or 1, 1, 1] in float64, written out independently."""
    s = t.double() / 1000
    return s.reshape(s.shape[0], 1, -1, 1, 1)


TIMESTEPS = {
    "per_sample": torch.tensor([1000.0, 37.5]),
    "per_frame": torch.tensor([[999.0, 500.0, 0.0], [1.0, 250.0, 875.0]]),
}


def test_shift_sigma_formula():
    sigma = np.linspace(0, 1, 101)
    for s in (1.0, 3.0, 5.0, 8.0):
        expected = s * sigma / (1 + (s - 1) * sigma)
        assert np.abs(shift_sigma(sigma, s) - expected).max() == 0
        assert np.abs(shift_sigma(torch.from_numpy(sigma), s).numpy() - expected).max() == 0
    assert shift_sigma(0.0, 5.0) == 0 and shift_sigma(1.0, 5.0) == 1
    assert np.array_equal(shift_sigma(sigma, 1.0), sigma)


def test_warped_student_steps():
    warped = warp_timesteps([1000, 750, 500, 250], shift=5.0)
    assert warped == pytest.approx([1000.0, 937.5, 833.3333333333334, 625.0], abs=1e-9)
    # Self-Forcing's construction: a 1000-step shifted schedule (plus a final 0) indexed by 1000 - t.
    sigmas = np.linspace(1.0, 0.0, 1001)[:-1]
    schedule = np.append(1000 * 5.0 * sigmas / (1 + 4.0 * sigmas), 0.0)
    assert warped == pytest.approx([schedule[1000 - t] for t in (1000, 750, 500, 250)], abs=1e-9)


@pytest.mark.parametrize("kind", TIMESTEPS)
def test_add_noise_and_conversions(kind):
    t = TIMESTEPS[kind]
    x0, noise = _tensors(torch.float64)
    sigma = _sigma(t)
    x_t = add_noise(x0, noise, t)
    assert torch.allclose(x_t, (1 - sigma) * x0 + sigma * noise, rtol=0, atol=1e-15)
    flow = flow_target(x0, noise)
    assert torch.equal(flow, noise - x0)
    assert (flow_to_x0(flow, x_t, t) - x0).abs().max() <= 1e-12
    assert (flow_to_noise(flow, x_t, t) - noise).abs().max() <= 1e-12
    positive = (sigma > 0).expand_as(x0)  # flow from x0 is undefined at t = 0
    assert (x0_to_flow(x0, x_t, t) - flow)[positive].abs().max() <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conversions_run_in_float64_and_keep_dtype(dtype):
    t = TIMESTEPS["per_frame"]
    x0, noise = _tensors(dtype, seed=1)
    flow = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    sigma = _sigma(t)
    x0d, nd, fd = x0.double(), noise.double(), flow.double()
    x_t = add_noise(x0, noise, t)
    x_td = x_t.double()
    cases = [
        (x_t, (1 - sigma) * x0d + sigma * nd),
        (flow_to_x0(flow, x_t, t), x_td - sigma * fd),
        (flow_to_noise(flow, x_t, t), x_td + (1 - sigma) * fd),
        (x0_to_flow(x0, x_t, t[:, [0, 1, 1]]), (x_td - x0d) / _sigma(t[:, [0, 1, 1]])),
    ]
    for got, expected in cases:
        assert got.dtype == dtype
        assert torch.equal(got, expected.to(dtype))  # one rounding, from the float64 result


def test_timestep_shape_is_checked():
    x0, noise = _tensors()
    with pytest.raises(ValueError, match=r"\[B\] or \[B, F\]"):
        add_noise(x0, noise, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\[B, C, F, H, W\]"):
        flow_to_x0(x0[0], noise[0], torch.zeros(2))


@pytest.mark.parametrize(("steps", "shift"), [(50, 5.0), (40, 3.0), (4, 8.0)])
def test_unipc_matches_official_grid(steps, shift):
    base = np.linspace(1 - 1 / 1000, 0, steps + 1)[:-1]
    sigmas = shift * base / (1 + (shift - 1) * base)
    got_sigmas, got_t = unipc_grid(steps, shift)
    assert np.abs(got_sigmas.numpy() - sigmas).max() <= 1e-15
    assert np.abs(got_t.numpy() - 1000 * sigmas).max() <= 1e-12

    scheduler = make_unipc_scheduler(steps, shift)
    # The official FlowUniPC: network timesteps are sigma * 1000 cast to int64; sigmas in float32, then 0.
    assert scheduler.timesteps.dtype == torch.int64
    assert scheduler.timesteps.tolist() == (1000 * sigmas).astype(np.int64).tolist()
    assert torch.equal(scheduler.sigmas, torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32)))


def test_unipc_with_exact_flow_lands_on_x0():
    """Given the true flow eps - x0 of the straight path every x0 prediction is exact: UniPC ends at x0."""
    x0, noise = _tensors(torch.float32, seed=3)
    scheduler = make_unipc_scheduler(8, shift=5.0)
    sample = add_noise(x0, noise, torch.full((2,), 1000 * scheduler.sigmas[0].item()))
    for t in scheduler.timesteps:
        sample = scheduler.step(noise - x0, t, sample).prev_sample
    assert (sample - x0).abs().max() <= 1e-5


def test_training_weight_matches_the_bell_formula_on_the_shifted_grid():
    """Written out in numpy: the bell exp(-2((t-500)/1000)^2) on the 1000-step grid of shifted sigmas, minus its
    minimum, averaging 1 there; zero at the grid's ends, largest at t = 500."""
    shift = 5.0
    sigma = np.linspace(1.0, 0.003 / 1.002, 1000)
    grid = 1000 * shift * sigma / (1 + (shift - 1) * sigma)
    bell = np.exp(-2 * ((grid - 500) / 1000) ** 2)
    expected = (bell - bell.min()) * 1000 / (bell - bell.min()).sum()
    got = training_weight(torch.tensor(grid), shift).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert got.mean() == pytest.approx(1.0, rel=1e-5)
    w = training_weight(torch.tensor([grid.max(), 500.0, 250.0, 750.0]), shift)
    assert float(w[0]) == pytest.approx(0.0, abs=1e-6) and float(w[1]) == float(w.max())
    assert float(w[2]) == pytest.approx(float(w[3]), rel=1e-6)  # symmetric about 500
