"""The rest of the distillation toolbox (issue 16): KD, CausalKD, CFG distillation and step distillation (half,
consistency). Each objective's loss against the formula recomputed here in float64 from the same random draws,
an overfit check on one fixed tiny batch, the guidance embedding (zero-initialised, optional in checkpoints,
one forward per guided sampling step), the distilled schedules' samplers, the world configs on CPU, and the
3-stage pipeline script (ODE pairs -> CausalKD -> extract -> Self-Forcing) end to end on the world."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize
from safetensors.torch import load_file
from test_objectives import FRAMES, make, tiny_batch, train

from model import objective_registry
from model.causal_kd import CausalKD
from model.cfg_distill import CFGDistillation
from model.kd import KD
from model.ode_regression import ODERegression
from model.step_distill import StepDistillation
from pipeline.conditions import Conditions, conditions
from pipeline.rollout import sample_latents, stream_latents
from scripts import causal_kd_pipeline, make_toy_dataset
from trainer.ema import EMA
from trainer.objective import TrainContext, objective_defaults
from trainer.trainer import Trainer
from utils.config import load_config
from utils.errors import CheckpointKeyError
from utils.scheduler import euler_flow, euler_step, solver_grid
from wan.checkpoint import load_model, load_weights, save_weights
from wan.configs import build_model

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def ctx_at(iteration: int, batch: int = 1, emas: dict | None = None) -> TrainContext:
    ctx = TrainContext(CPU, torch.float32, seed=0, emas=emas)
    ctx.begin_step(iteration, list(range(batch)))
    return ctx


def sigma_of(t: torch.Tensor) -> torch.Tensor:
    """t [B] -> sigma [B, 1, 1, 1, 1] float64 (written out here, not utils.scheduler)."""
    return (t.double() / 1000.0).view(-1, 1, 1, 1, 1)


def official_grid(num_steps: int, shift: float) -> torch.Tensor:
    """The shifted grid's t with the clean end: 1000 * s b / (1 + (s - 1) b), b = linspace(0.999, 0, N + 1)."""
    b = np.linspace(0.999, 0.0, num_steps + 1)
    return torch.from_numpy(1000 * shift * b / (1 + (shift - 1) * b))


def forward64(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(x.float(), t, **cond, **kw).double()


def capture_calls(model: torch.nn.Module) -> list[dict]:
    """Record (x, t, guidance) of every forward of `model`."""
    calls: list[dict] = []

    def hook(module, args, kwargs):
        calls.append({"x": args[0].detach().clone(), "t": args[1].detach().clone(), "guidance": kwargs.get("guidance")})

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def bidirectional(preset_kind: str, seed: int) -> torch.nn.Module:
    """A random tiny bidirectional network: i2v pose (the tiny teacher) or plain t2v."""
    if preset_kind == "i2v":
        return randomize(build_model("tiny_teacher"), seed=seed)
    return randomize(build_model("tiny_bidirectional", model_type="t2v", in_dim=16, pose_dim=None), seed=seed)


def batch_for(kind: str, batch: int = 1) -> dict[str, torch.Tensor]:
    full = tiny_batch(batch)
    if kind == "i2v":
        return full
    return {k: full[k] for k in ("context", "neg_context", "latents")}


# ----------------------------------------------------------------------------- the guidance embedding


def test_guidance_embedding_formula_and_zero_start():
    model = randomize(build_model("tiny_bidirectional", guidance_embed=True), seed=3)
    w = torch.tensor([1.0, 2.5])
    # MLP(sinusoid(w * 1000)) written out: cat[cos, sin] of w * 1000 * 10000^(-i/half), Linear, SiLU, Linear
    half = model.freq_dim // 2
    angles = (w.double() * 1000)[:, None] * torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    s = torch.cat([angles.cos(), angles.sin()], dim=1)
    g0, g2 = model.guidance_embedding[0], model.guidance_embedding[2]
    h = s @ g0.weight.double().T + g0.bias.double()
    expected = (h * torch.sigmoid(h)) @ g2.weight.double().T + g2.bias.double()
    assert torch.allclose(model.embed_guidance(w, 2).double(), expected, rtol=1e-5, atol=1e-6)
    t = torch.tensor([300.0, 700.0])
    e_base, _ = model.time_embedding_per_frame(t, 3)
    e_guided, _ = model.time_embedding_per_frame(t, 3, w)
    assert torch.allclose((e_guided - e_base).double(), expected[:, None].expand(-1, 3, -1), rtol=1e-5, atol=1e-5)

    fresh = build_model("tiny_bidirectional", guidance_embed=True)  # its own init: the last layer is zero
    assert torch.count_nonzero(fresh.guidance_embedding[2].weight) == 0
    assert torch.count_nonzero(fresh.guidance_embedding[0].weight) > 0
    with pytest.raises(ValueError, match="guidance_embed=True"):
        build_model("tiny_bidirectional").embed_guidance(w, 2)


def test_official_checkpoints_load_into_a_guided_model_which_starts_as_its_base(tmp_path):
    base = randomize(build_model("tiny_bidirectional"), seed=4)
    save_weights(base, tmp_path / "base.safetensors")
    guided = randomize(build_model("tiny_bidirectional", guidance_embed=True), seed=9)
    report = load_weights(guided, tmp_path / "base.safetensors")  # strict, and no allow_fresh needed
    assert {"guidance_embedding.2.weight", "guidance_embedding.2.bias"} <= set(report.fresh_zero)
    assert {"guidance_embedding.0.weight", "guidance_embedding.0.bias"} <= set(report.fresh_init)
    batch = tiny_batch(2)
    x, t = batch["latents"], torch.tensor([400.0, 900.0])
    with torch.no_grad():
        plain = base(x, t, **conditions(base, batch))
        with_w = guided(x, t, **conditions(guided, batch), guidance=torch.tensor([1.5, 4.0]))
    assert torch.equal(plain, with_w)

    save_weights(randomize(guided, seed=10), tmp_path / "guided.safetensors")  # a CFG-distilled export
    with pytest.raises(CheckpointKeyError, match="guidance_embed"):
        load_weights(build_model("tiny_bidirectional"), tmp_path / "guided.safetensors")
    rebuilt = load_model(tmp_path / "guided.safetensors")  # the config in the metadata says guidance_embed
    assert rebuilt.guidance_embed
    assert torch.equal(rebuilt.guidance_embedding[2].weight, guided.guidance_embedding[2].weight)


def test_a_guided_network_samples_with_one_forward_per_step():
    """The teacher sampler and the student's stream run the conditional branch alone for a CFG-distilled network,
    with w as its input in every pass (the stream's context pass too); a plain network runs both branches (as one
    batch of 2 in the whole-clip sampler)."""
    batch = tiny_batch(1)
    shape = (1, 16, FRAMES, batch["latents"].shape[3], batch["latents"].shape[4])
    for guided, rows in ((True, 1), (False, 2)):
        model = randomize(build_model("tiny_teacher", guidance_embed=guided), seed=1)
        calls = capture_calls(model)
        sizes = []
        handle = model.register_forward_pre_hook(lambda m, args, kwargs, out=sizes: out.append(args[0].shape[0]),
                                                 with_kwargs=True)  # fmt: skip
        cond = conditions(model, batch)
        sample_latents(model, cond, shape, 3, 5.0, 1.5, cond.unconditional(batch["neg_context"]),
                       torch.Generator().manual_seed(0))  # fmt: skip
        handle.remove()
        assert len(calls) == 3 and sizes == [rows] * 3
        if guided:
            assert all(torch.equal(c["guidance"], torch.tensor([1.5])) for c in calls)
    student = randomize(build_model("tiny", guidance_embed=True), seed=2)
    calls = capture_calls(student)
    cond = conditions(student, batch)
    blocks = list(stream_latents(student, cond, FRAMES, shape[3:], (1000.0, 500.0), guidance_scale=2.0,
                                 generator=torch.Generator().manual_seed(0)))  # fmt: skip
    assert len(blocks) == 2 and len(calls) == 2 * 2 + 1  # 2 steps per block + 1 context pass, no uncond branch
    assert all(torch.equal(c["guidance"], torch.tensor([2.0])) for c in calls)


def test_the_half_schedule_is_every_other_point_of_the_teachers():
    for n in (8, 25, 50):
        assert torch.allclose(solver_grid(n, 5.0), official_grid(n, 5.0), rtol=1e-12, atol=1e-9)
        assert torch.equal(solver_grid(2 * n, 5.0)[::2], solver_grid(n, 5.0))
    g = torch.Generator().manual_seed(0)
    x, flow = torch.randn(2, 3, 2, 2, 2, generator=g, dtype=torch.float64), torch.randn(2, 3, 2, 2, 2, generator=g)
    t, t_next = torch.tensor([900.0, 400.0]), torch.tensor([700.0, 0.0])
    stepped = euler_step(x, flow, t, t_next)
    assert torch.allclose(stepped, x + (sigma_of(t_next) - sigma_of(t)) * flow.double())
    assert torch.allclose(euler_flow(x, stepped, t, t_next), flow.double())


def test_a_cfg_distilled_teacher_is_a_one_forward_real_score():
    """DMD's real score with a CFG-distilled teacher (roles.teacher.guidance_embed=true): one teacher forward, w as
    its input, instead of the two branches of CFG."""
    objective = make("dmd", {"guidance": 1.5})
    objective.roles["teacher"] = randomize(build_model("tiny_teacher", guidance_embed=True), seed=3)
    calls = capture_calls(objective.roles["teacher"])
    batch = tiny_batch(1)
    x_t, t = batch["latents"], torch.tensor([600.0])
    real = objective.real_x0(x_t, t, batch)
    assert len(calls) == 1 and torch.equal(calls[0]["guidance"], torch.tensor([1.5]))
    teacher = objective.roles["teacher"]
    flow = forward64(teacher, x_t, t, conditions(teacher, batch), guidance=torch.tensor([1.5]))
    assert torch.allclose(real.double(), x_t.double() - sigma_of(t) * flow, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver", ["euler", "few_step"])
def test_distilled_schedules_sample_as_written(solver):
    """solver euler: x' = x + (sigma' - sigma) flow on the shifted grid; few_step: x0 = x - sigma flow, then
    re-noised with fresh noise to the next grid t (what a consistency-distilled network does)."""
    model = randomize(build_model("tiny_teacher"), seed=6)
    batch = tiny_batch(1)
    cond = conditions(model, batch)
    shape = (1, 16, FRAMES, batch["latents"].shape[3], batch["latents"].shape[4])
    got = sample_latents(model, cond, shape, 3, 5.0, 1.0, None, torch.Generator().manual_seed(7), solver=solver)
    grid = official_grid(3, 5.0)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen).double()
    for i in range(3):
        t, s_next = grid[i].expand(1), sigma_of(grid[i + 1].expand(1))
        if solver == "euler":
            x = x + (s_next - sigma_of(t)) * forward64(model, x, t, cond)
        else:
            x0 = x - sigma_of(t) * forward64(model, x, t[:, None].expand(1, FRAMES), cond)
            x = (1 - s_next) * x0 + s_next * torch.randn(shape, generator=gen).double() if i < 2 else x0
    assert torch.allclose(got.double(), x, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- KD and CausalKD


@pytest.mark.parametrize("steps,t_list,indices", [
    (4, [1000.0, 937.5, 833.3333333333334, 625.0], [0, 1, 2, 3]),
    (2, [1000.0, 833.3333333333334], [0, 2]),
    (1, [1000.0], [0]),  # single-step KD: from the trajectory's noise
])  # fmt: skip
def test_kd_loss_formula(steps, t_list, indices):
    objective = make("kd", {"student_sample_steps": steps, "t_list": t_list})
    model, batch = objective.roles["generator"], tiny_batch(2)
    states, ode_t = batch["ode_latents"], batch["ode_t"]
    for it in range(6):
        objective.ctx.begin_step(it, [0, 1])
        with torch.no_grad():
            loss = float(objective.train_step(batch, it, ("generator",)).losses["generator"])
        j = (ctx_at(it, 2).rand(2) * steps).long().clamp(max=steps - 1)
        index = torch.tensor(indices)[j]
        x_t, t = states[torch.arange(2), index], ode_t[torch.arange(2), index]
        x0 = x_t.double() - sigma_of(t) * forward64(model, x_t, t, conditions(model, batch))
        assert loss == pytest.approx(float((x0 - states[:, -1].double()).pow(2).mean()), rel=1e-5)


def test_kd_trains_a_bidirectional_network_too():
    model = randomize(build_model("tiny_bidirectional"), seed=8)
    objective = KD({}, {"generator": model}, ctx_at(0))
    history = train(objective, tiny_batch(), iterations=10, lr=3e-3, betas=(0.9, 0.999))
    assert history["generator"][-1] < 0.7 * history["generator"][0], history


@pytest.mark.parametrize("cfg,match", [
    ({"t_list": [1000.0, 900.0, 800.0, 700.0]}, r"t_list .* does not align .*t_tolerance"),
    ({"student_sample_steps": 3, "t_list": [1000.0, 900.0, 800.0]}, "does not divide"),
    ({"student_sample_steps": 2}, "one timestep per student step"),
])  # fmt: skip
@pytest.mark.parametrize("stage", ["kd", "causal_kd"])
def test_student_steps_must_align_with_the_path(stage, cfg, match):
    with pytest.raises(ValueError, match=match):
        make(stage, cfg).train_step(tiny_batch(), 0, ("generator",))


def test_causal_kd_is_ode_init_at_zero_context_noise():
    """Same draws, same loss (the shared regression), when every stored state is a student step."""
    kd, ode = make("causal_kd"), make("ode_init")
    ode.roles["generator"].load_state_dict(kd.roles["generator"].state_dict())
    batch = tiny_batch(2)
    for it in range(4):
        losses = []
        for objective in (kd, ode):
            objective.ctx.begin_step(it, [0, 1])
            with torch.no_grad():
                losses.append(float(objective.train_step(batch, it, ("generator",)).losses["generator"]))
        assert losses[0] == losses[1]
    assert isinstance(kd, ODERegression) and isinstance(kd, CausalKD)


def test_causal_kd_context_noise_and_student_steps_formula():
    """Per block one of the student's steps (path indices 0, 2 of 4) or the clean end; clean blocks enter at
    t = context_noise as (1 - s) x0 + s eps with eps from the per-sample stream, and carry no loss."""
    context_noise, t_list = 50.0, [1000.0, 833.3333333333334]
    objective = make("causal_kd", {"context_noise": context_noise, "student_sample_steps": 2, "t_list": t_list})
    model, batch = objective.roles["generator"], tiny_batch(2)
    states, ode_t = batch["ode_latents"], batch["ode_t"]
    calls = capture_calls(model)
    n, clean_blocks = model.num_frame_per_block, 0
    for it in range(6):
        objective.ctx.begin_step(it, [0, 1])
        with torch.no_grad():
            loss = float(objective.train_step(batch, it, ("generator",)).losses["generator"])
        ctx = ctx_at(it, 2)
        pick = (ctx.rand(2, FRAMES // n) * 3).long().clamp(max=2)
        index = torch.tensor([0, 2, 4])[pick].repeat_interleave(n, dim=1)  # [B, F]
        eps = ctx.randn(*states[:, -1].shape).double()
        clean = index == 4
        clean_blocks += int(clean.sum()) // n
        rows = torch.arange(2)[:, None]
        x = states.permute(0, 3, 1, 2, 4, 5)[rows, torch.arange(FRAMES), index].permute(0, 2, 1, 3, 4).double()
        t = ode_t[rows, index].double()
        s = context_noise / 1000.0
        x = torch.where(clean[:, None, :, None, None], (1 - s) * states[:, -1].double() + s * eps, x)
        t = torch.where(clean, torch.full_like(t, context_noise), t)
        assert torch.allclose(calls[-1]["x"].double(), x, rtol=1e-6, atol=1e-6)
        assert torch.equal(calls[-1]["t"].double(), t)
        x0 = x - (t / 1000.0)[:, None, :, None, None] * forward64(model, x, t, conditions(model, batch))
        err = (x0 - states[:, -1].double()).pow(2)[~clean[:, None, :, None, None].expand_as(x0)]
        assert loss == pytest.approx(float(err.mean()) if err.numel() else 0.0, rel=1e-5, abs=1e-8)
    assert clean_blocks >= 2


@pytest.mark.parametrize("stage", ["kd", "causal_kd"])
def test_kd_stages_overfit(stage):
    history = train(make(stage, {"context_noise": 20.0} if stage == "causal_kd" else {}), tiny_batch(),
                    iterations=10, lr=3e-3, betas=(0.9, 0.999))  # fmt: skip
    assert history["generator"][-1] < 0.7 * history["generator"][0], history


# ----------------------------------------------------------------------------- CFG distillation


def cfg_objective(seed: int = 0, opts: dict | None = None) -> CFGDistillation:
    teacher = randomize(build_model("tiny_teacher"), seed=seed).requires_grad_(False)
    generator = build_model("tiny_teacher", guidance_embed=True)
    load_weights(generator, teacher.state_dict())  # initialised from the teacher: starts as its base
    return CFGDistillation(opts or {}, {"generator": generator, "teacher": teacher}, ctx_at(0, 2))


def test_cfg_distill_loss_formula():
    objective = cfg_objective(opts={"guidance_min": 1.0, "guidance_max": 4.0})
    generator, teacher = objective.roles["generator"], objective.roles["teacher"]
    randomize(generator.guidance_embedding, std=0.05, seed=11)  # w must reach the prediction
    batch = tiny_batch(2)
    objective.ctx.begin_step(3, [0, 1])
    with torch.no_grad():
        loss = float(objective.train_step(batch, 3, ("generator",)).losses["generator"])
    ctx = ctx_at(3, 2)
    w = 1.0 + 3.0 * ctx.rand(2).double()
    u = ctx.rand(2).double()
    t = 1000 * 5 * u / (1 + 4 * u)  # shifted training t, clamped to [0, 1000]
    x0 = batch["latents"].double()
    x_t = (1 - sigma_of(t)) * x0 + sigma_of(t) * ctx.randn(*x0.shape).double()
    cond = conditions(teacher, batch)
    uncond = Conditions(batch["neg_context"], cond.clip_fea, cond.y, None)  # negative prompt, no pose tokens
    c, un = forward64(teacher, x_t, t.float(), cond), forward64(teacher, x_t, t.float(), uncond)
    target = un + w.view(-1, 1, 1, 1, 1) * (c - un)
    pred = forward64(generator, x_t, t.float(), conditions(generator, batch), guidance=w.float())
    assert loss == pytest.approx(float((pred - target).pow(2).mean()), rel=1e-4)
    assert w[0] != w[1]


def test_cfg_distill_overfits_and_names_its_role_key():
    objective = cfg_objective(seed=2)
    history = train(objective, tiny_batch(2), iterations=12, lr=3e-4, betas=(0.9, 0.999))  # starts at the teacher
    assert history["generator"][-1] < 0.25 * history["generator"][0], history
    teacher = objective.roles["teacher"]
    with pytest.raises(TypeError, match="roles.generator.guidance_embed=true"):
        CFGDistillation({}, {"generator": copy.deepcopy(teacher), "teacher": teacher}, ctx_at(0))


# ----------------------------------------------------------------------------- step distillation


def step_objective(kind: str, mode: str, opts: dict | None = None, shadow_seed: int | None = None):
    teacher = bidirectional(kind, seed=1).requires_grad_(False)
    generator = bidirectional(kind, seed=2 if mode == "consistency" else 1)  # consistency: student != teacher
    emas = {}
    if mode == "consistency":
        emas["generator"] = EMA(generator, 0.9)
        if shadow_seed is not None:  # an EMA that differs from the generator
            gen = torch.Generator().manual_seed(shadow_seed)
            for v in emas["generator"].shadow.values():
                v.add_(0.05 * torch.randn(v.shape, generator=gen))
    cfg = {"distill_mode": mode, "teacher_steps": 6, **(opts or {})}
    roles = {"generator": generator, "teacher": teacher}
    return StepDistillation(cfg, roles, ctx_at(0, 2, emas)), emas


def teacher_steps64(teacher, x, start, hops, grid, cond, uncond, guidance):
    for k in range(hops):
        t, t_next = grid[start + k], grid[start + k + 1]
        flow = forward64(teacher, x, t.float(), cond)
        if uncond is not None:
            un = forward64(teacher, x, t.float(), uncond)
            flow = un + guidance * (flow - un)
        x = x + (sigma_of(t_next) - sigma_of(t)) * flow
    return x


@pytest.mark.parametrize("kind", ["i2v", "t2v"])
def test_half_step_loss_formula(kind):
    """The student's one Euler step from t_i must land where the teacher's two (with CFG) land, at t_{i+2}."""
    objective, _ = step_objective(kind, "half", {"guidance": 1.5})
    generator, teacher = objective.roles["generator"], objective.roles["teacher"]
    batch = batch_for(kind, 2)
    grid = official_grid(6, 5.0)
    for it in range(3):
        objective.ctx.begin_step(it, [0, 1])
        with torch.no_grad():
            loss = float(objective.train_step(batch, it, ("generator",)).losses["generator"])
        ctx = ctx_at(it, 2)
        start = (ctx.rand(2) * 3).long().clamp(max=2) * 2  # the student's grid points 0, 2, 4
        x0 = batch["latents"].double()
        t_a, t_c = grid[start], grid[start + 2]
        x_a = (1 - sigma_of(t_a)) * x0 + sigma_of(t_a) * ctx.randn(*x0.shape).double()
        cond = conditions(teacher, batch)
        uncond = cond.unconditional(batch["neg_context"])
        x_c = teacher_steps64(teacher, x_a, start, 2, grid, cond, uncond, 1.5)
        target = (x_c - x_a) / (sigma_of(t_c) - sigma_of(t_a))
        assert torch.allclose(x_a + (sigma_of(t_c) - sigma_of(t_a)) * target, x_c)  # one step lands there
        pred = forward64(generator, x_a, t_a.float(), conditions(generator, batch))
        assert loss == pytest.approx(float((pred - target).pow(2).mean()), rel=1e-4)


@pytest.mark.parametrize("kind", ["i2v", "t2v"])
@pytest.mark.parametrize("k", [1, 6])  # k = teacher_steps: every target sits at t = 0, where it is the state itself
def test_consistency_loss_formula_with_the_ema_target(kind, k):
    objective, emas = step_objective(kind, "consistency", {"consistency_k": k}, shadow_seed=5)
    generator, teacher = objective.roles["generator"], objective.roles["teacher"]
    before = {n: p.detach().clone() for n, p in generator.named_parameters()}
    target_net = copy.deepcopy(generator)
    target_net.load_state_dict({**target_net.state_dict(), **emas["generator"].shadow})
    batch = batch_for(kind, 2)
    grid = official_grid(6, 5.0)
    objective.ctx.begin_step(1, [0, 1])
    with torch.no_grad():
        loss = float(objective.train_step(batch, 1, ("generator",)).losses["generator"])
    assert all(torch.equal(p, before[n]) for n, p in generator.named_parameters())  # the EMA was swapped back out
    ctx = ctx_at(1, 2)
    points = 6 - k + 1
    start = (ctx.rand(2) * points).long().clamp(max=points - 1)
    x0 = batch["latents"].double()
    t_i, t_k = grid[start], grid[start + k]
    x_i = (1 - sigma_of(t_i)) * x0 + sigma_of(t_i) * ctx.randn(*x0.shape).double()
    x_k = teacher_steps64(teacher, x_i, start, k, grid, conditions(teacher, batch), None, 1.0)
    target = x_k - sigma_of(t_k) * forward64(target_net, x_k, t_k.float(), conditions(target_net, batch))
    if k == 6:
        assert torch.equal(t_k, torch.zeros(2, dtype=torch.float64)) and torch.allclose(target, x_k)
    pred = x_i - sigma_of(t_i) * forward64(generator, x_i, t_i.float(), conditions(generator, batch))
    assert loss == pytest.approx(float((pred - target).pow(2).mean()), rel=1e-4)


@pytest.mark.parametrize("mode", ["half", "consistency"])
@pytest.mark.parametrize("kind", ["i2v", "t2v"])
def test_step_distill_overfits(mode, kind):
    objective, emas = step_objective(kind, mode, {"guidance": 1.5} if kind == "i2v" else {})
    generator = objective.roles["generator"]
    opt = torch.optim.AdamW(generator.parameters(), lr=3e-4, betas=(0.9, 0.999))  # it starts at the teacher
    batch, losses = batch_for(kind, 1), []
    for it in range(10):
        objective.ctx.begin_step(0, [0])
        loss = objective.train_step(batch, it, ("generator",)).losses["generator"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if emas:
            emas["generator"].update(generator, it)
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.35 * losses[0], losses  # at least 3x lower after 10 steps


def test_step_distill_config_errors():
    with pytest.raises(ValueError, match="even number"):
        step_objective("t2v", "half", {"teacher_steps": 5})
    with pytest.raises(ValueError, match="roles.generator.ema_decay"):
        StepDistillation({"distill_mode": "consistency"}, {"generator": bidirectional("t2v", 0),
                                                           "teacher": bidirectional("t2v", 0)}, ctx_at(0))  # fmt: skip
    with pytest.raises(ValueError, match="distill_mode"):
        step_objective("t2v", "progressive")


# ----------------------------------------------------------------------------- trainer, world configs, pipeline


def cfg_of(path: str, *overrides: str):
    return load_config(ROOT / path, list(overrides), objective_defaults(objective_registry()))


def test_consistency_mode_trains_under_fsdp2_bf16(tmp_path):
    """The EMA target swapped into FSDP2-sharded (DTensor) parameters, as the shipped bf16 config trains."""
    cfg = cfg_of("configs/stages/step_distill.yaml", "model=tiny", "data.type=synthetic", "data.num_samples=2",
                 "data.latent_frames=3", f"run.output_dir={tmp_path}", "train.iterations=2", "train.log_every=1000",
                 "objective.distill_mode=consistency", "objective.teacher_steps=4")  # fmt: skip
    assert cfg.train.dtype == "bf16"
    trainer = Trainer(cfg, objective_registry())
    history = trainer.train()
    assert len(history) == 2 and all(math.isfinite(h["loss/generator"]) for h in history)
    model, ema = trainer.roles["generator"], trainer.emas["generator"]
    batch, _ = trainer._micro_batch(0, 0)
    x, t = batch["latents"], torch.full((batch["latents"].shape[0],), 500.0)

    def flow() -> torch.Tensor:
        with torch.no_grad():
            return model(x, t, **conditions(model, batch)).float()

    for name, p in model.named_parameters():  # an EMA equal to the weights (sharded after the last backward)
        ema.shadow[name] = p.detach().clone()
    own = flow()  # FSDP2 keeps the root's parameters gathered after it: swapped_in reshards
    with ema.swapped_in(model):  # the swap changes nothing
        assert torch.equal(flow(), own)
    for v in ema.shadow.values():  # an EMA away from the weights (the head too, zero at init): the gathered
        v.add_(0.02)  # weights inside the block are the EMA's
    with ema.swapped_in(model):
        assert not torch.allclose(flow(), own, rtol=1e-2, atol=1e-3)
    assert torch.equal(flow(), own)  # and the generator's own weights are back


WORLD_TINY = ("data.type=synthetic", "data.cache=null", "data.num_samples=1", "data.latent_frames=3",
              "data.latent_size=[4,4]", "train.batch_size=1", "train.iterations=1", "train.dtype=fp32",
              "train.log_every=1000")  # fmt: skip


@pytest.mark.parametrize("stage,extra", [
    ("kd", ["eval.every=0"]),
    ("causal_kd", ["eval.every=0"]),
    ("cfg_distill", ["eval.every=1", "eval.clips=1", "eval.num_frames=5", "eval.num_steps=2", "eval.preview=false"]),
    ("step_distill", ["eval.every=1", "eval.clips=1", "eval.num_frames=5", "eval.num_steps=2", "eval.preview=false",
                      "objective.teacher_steps=4"]),
    ("step_distill", ["eval.every=0", "objective.distill_mode=consistency", "objective.teacher_steps=4"]),
])  # fmt: skip
def test_world_configs_run_on_cpu(tmp_path, stage, extra, world_teacher_file):
    weights = [f"roles.teacher.weights={world_teacher_file}"]
    if stage in ("cfg_distill", "step_distill"):
        weights.append(f"roles.generator.weights={world_teacher_file}")
    cfg = cfg_of(f"configs/world/{stage}.yaml", *WORLD_TINY, *weights, *extra, f"run.output_dir={tmp_path}")
    history = Trainer(cfg, objective_registry()).train()
    assert math.isfinite(history[0]["loss/generator"])
    if "eval.every=1" in extra:
        assert 0.0 <= history[-1]["eval/pck@0.05"] <= 1.0


def test_three_stage_pipeline_runs_end_to_end_on_the_world(tmp_path, world_teacher_file):
    """ODE pairs from the world teacher -> CausalKD -> extract_net_weights -> Self-Forcing, a few iterations each."""
    data = tmp_path / "train"
    argv = ["--encode", "--out", str(data), "--num-samples", "2", "--seed", "1000000", "--workers", "1",
            "--device", "cpu", "num_frames=13", "height=32", "width=32"]  # fmt: skip
    assert make_toy_dataset.main(argv) == 0  # latents [16, 4, 4, 4]: two blocks of the world student
    work = tmp_path / "work"
    common = ["train.iterations=2", "train.batch_size=1", "train.dtype=fp32", "data.cache=null", "eval.every=0",
              "train.log_every=1000"]  # fmt: skip
    code = causal_kd_pipeline.main([
        "--teacher-weights", str(world_teacher_file), "--source", str(data), "--work", str(work),
        "--pairs-arg=--num-steps=8", *(f"--set={o}" for o in common), f"--sf=data.path={data}",
    ])  # fmt: skip
    assert code == 0
    pair = load_file(next((work / "ode_pairs").glob("0*.safetensors")))
    assert pair["ode_latents"].shape == (5, 16, 4, 4, 4)
    student = load_file(work / "causal_kd_student.safetensors")
    assert student.keys() == load_file(work / "self_forcing" / "export" / "generator.safetensors").keys()
    logged = (work / "self_forcing" / "metrics.jsonl").read_text().splitlines()
    assert len(logged) == 2 and '"loss/generator"' in logged[0]


def test_inference_samples_a_cfg_distilled_teacher_with_its_schedule(tmp_path):
    import inference

    out, tiny = tmp_path / "video.mp4", ["--config", str(inference.TINY_CONFIG)]  # random weights
    inference.main([*tiny, "--out", str(out), "preset=tiny_teacher", "guidance_embed=true", "solver=euler",
                    "num_steps=2", "guidance_scale=1.5", "synthetic.num_frames=5"])  # fmt: skip
    assert out.stat().st_size > 0
    with pytest.raises(SystemExit, match="solver"):
        inference.main([*tiny, "--out", str(tmp_path / "b.mp4"), "preset=tiny_teacher", "solver=ddim"])
