"""pipeline/rollout.py and pipeline/self_forcing_rollout.py: gradient reaches only each block's exit step (hooks
on every generator call's input), no gradient crosses blocks through the KV cache; without gradient the
Self-Forcing rollout is exactly the streaming sampler (the same block_rollout), and the causal ODE trajectory
agrees with both where their settings agree (one Euler step)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize, tiny_inputs, tiny_pose

from pipeline.conditions import cfg_conditions, conditions, latent_shape
from pipeline.ode_pairs import ODEPairSettings, causal_trajectory
from pipeline.rollout import DEFAULT_STEPS, stream_latents
from pipeline.self_forcing_rollout import backward_simulation, self_forcing_rollout
from trainer.objective import TrainContext
from utils.scheduler import unipc_grid
from wan.configs import build_model

FRAMES, HEIGHT, WIDTH = 9, 2, 4  # three blocks of three latent frames


def _setup(batch: int = 1):
    model = randomize(build_model("tiny"), seed=3)
    inputs = tiny_inputs(batch, FRAMES, HEIGHT, WIDTH)
    pose, ref = tiny_pose(batch, FRAMES, HEIGHT, WIDTH)
    data = {
        "context": inputs["context"],
        "clip_fea": inputs["clip_fea"],
        "y": inputs["y"],
        "pose": pose,
        "ref_pose": ref,
    }
    return model, data


def _noise(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(shape, generator=gen)


class CallRecorder:
    """A forward pre-hook that swaps each call's x for a leaf that requires grad (when autograd is on) and
    remembers it, so every denoising call's input gradient can be read after backward."""

    def __init__(self, model):
        self.calls: list[dict] = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        x = args[0]
        grad = torch.is_grad_enabled()
        if grad:
            x = x.detach().requires_grad_(True)
        self.calls.append({"x": x, "grad": grad, "start": kwargs.get("current_start_frame", 0), "t": args[1]})
        return (x, *args[1:]), kwargs


@pytest.mark.parametrize("exit_index", [0, 2])
def test_gradient_reaches_only_each_blocks_exit_step(exit_index):
    model, data = _setup()
    cond = conditions(model, data)
    rec = CallRecorder(model)
    shape = latent_shape(model, data)
    out = self_forcing_rollout(model, cond, shape, DEFAULT_STEPS, exit_index, _noise(), torch.float32)
    rec.handle.remove()

    blocks = FRAMES // model.num_frame_per_block
    grad_calls = [c for c in rec.calls if c["grad"]]
    # per block: exit_index no-grad steps, one exit step with grad, one no-grad context pass (not after the last)
    assert len(grad_calls) == blocks
    assert len(rec.calls) == blocks * (exit_index + 1) + blocks - 1
    assert [c["start"] for c in grad_calls] == [0, 3, 6]
    assert all(float(c["t"][0, 0]) == pytest.approx(DEFAULT_STEPS[exit_index]) for c in grad_calls)

    last = out[:, :, 6:].pow(2).sum()  # a loss on the last block only
    last.backward(retain_graph=True)
    for call in grad_calls[:-1]:  # earlier blocks: exactly zero (nothing leaks back through the cache)
        assert call["x"].grad is None or torch.count_nonzero(call["x"].grad) == 0
    assert grad_calls[-1]["x"].grad.abs().sum() > 0

    for call in grad_calls:
        call["x"].grad = None
    out.pow(2).sum().backward()
    for call in grad_calls:  # a loss on every block reaches every exit step
        assert call["x"].grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.blocks.parameters())


def test_without_grad_the_rollout_is_the_streaming_sampler():
    """At the last exit step with the same noise stream, the rollout equals stream_latents exactly."""
    model, data = _setup(batch=2)
    cond = conditions(model, data)
    shape = latent_shape(model, data)
    with torch.no_grad():
        rollout = self_forcing_rollout(
            model, cond, shape, DEFAULT_STEPS, len(DEFAULT_STEPS) - 1, _noise(7), torch.float32
        )
    blocks = stream_latents(model, cond, FRAMES, (HEIGHT, WIDTH), generator=torch.Generator().manual_seed(7))
    streamed = torch.cat([x0 for _, x0 in blocks], dim=2)
    assert torch.equal(rollout, streamed)


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_causal_ode_trajectory_agrees_with_the_stream_and_the_rollout(guidance):
    """One Euler step from the grid's first t is one few-step denoising step at that t: x + (0 - sigma) flow is
    flow_to_x0, and the Euler update re-noises that x0 to t = 0, (1 - 0) x0 + 0 eps, which is x0 exactly. Both
    run the same block_rollout (same network calls on the same shapes, the same clean context pass, CFG with a
    cache per branch), so the ODE's clean end equals the streamed clip bit for bit, with and without guidance,
    and equals the Self-Forcing rollout when unguided."""
    model, data = _setup(batch=2)
    data["neg_context"] = 0.3 * data["context"].flip(1)
    t0 = float(unipc_grid(1, 5.0)[1][0])  # the official grid's first t (999.8 on the shift-5 grid)
    settings = ODEPairSettings(num_steps=1, solver="euler", guidance=guidance, student_steps=(t0,))
    gen = torch.Generator().manual_seed(5)
    noise = torch.cat([torch.randn(2, 16, 3, HEIGHT, WIDTH, generator=gen) for _ in range(3)], dim=2)  # per block
    ode_latents, ode_t = causal_trajectory(model, data, noise, settings)
    assert ode_t.tolist() == [t0, 0.0] and torch.equal(ode_latents[:, 0], noise)

    cond, uncond = cfg_conditions(model, data, guidance)
    blocks = stream_latents(model, cond, FRAMES, (HEIGHT, WIDTH), [t0], generator=torch.Generator().manual_seed(5),
                            uncond=uncond, guidance_scale=guidance)  # fmt: skip
    streamed = torch.cat([x0 for _, x0 in blocks], dim=2)
    assert torch.equal(ode_latents[:, -1], streamed)
    if guidance == 1.0:
        with torch.no_grad():
            rollout = self_forcing_rollout(model, cond, latent_shape(model, data), [t0], 0, _noise(5), torch.float32)
        assert torch.equal(rollout, streamed)
    else:  # guidance steers: the guided clip is not the unguided one
        seed = torch.Generator().manual_seed(5)
        unguided = stream_latents(model, cond, FRAMES, (HEIGHT, WIDTH), [t0], generator=seed)
        plain = torch.cat([x0 for _, x0 in unguided], dim=2)
        assert (plain - streamed).abs().max() > 1e-3


def test_backward_simulation_grad_only_at_exit():
    model, data = _setup()
    cond = conditions(model, data)
    rec = CallRecorder(model)
    out = backward_simulation(model, cond, latent_shape(model, data), DEFAULT_STEPS, 2, _noise())
    rec.handle.remove()
    assert [c["grad"] for c in rec.calls] == [False, False, True]
    assert [c["t"].unique().tolist() for c in rec.calls] == [[pytest.approx(t)] for t in DEFAULT_STEPS[:3]]
    out.sum().backward()
    assert rec.calls[-1]["x"].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="exit_index"):
        backward_simulation(model, cond, latent_shape(model, data), DEFAULT_STEPS, 4, _noise())


def test_exit_step_is_shared_across_ranks():
    """The exit step comes from the shared stream: ranks with different samples draw the same one."""
    from model.dmd import SelfForcing

    model, data = _setup()
    teacher = randomize(build_model("tiny_teacher"), seed=4).requires_grad_(False)
    critic = randomize(build_model("tiny_bidirectional"), seed=5)
    counts = []
    for rank in (0, 1):
        ctx = TrainContext(torch.device("cpu"), torch.float32, seed=3, rank=rank, world_size=2)
        ctx.begin_step(11, [rank])
        objective = SelfForcing({}, {"generator": model, "teacher": teacher, "critic": critic}, ctx)
        rec = CallRecorder(model)
        with torch.no_grad():
            objective.generate(data)
        rec.handle.remove()
        counts.append(len(rec.calls))
    assert counts[0] == counts[1]


def test_gradient_checkpointing_gives_the_same_gradients():
    """Under activation checkpointing the exit steps are recomputed through the cache in backward; the cache
    contents they read must be the ones of the forward (later blocks are differentiated first)."""
    model, data = _setup()

    def grads(checkpointing: bool) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = checkpointing
        cond = conditions(model, data)
        out = self_forcing_rollout(model, cond, latent_shape(model, data), DEFAULT_STEPS, 1, _noise(), torch.float32)
        (out * torch.linspace(0, 1, out.numel()).view_as(out)).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    assert torch.equal(grads(False), grads(True))
