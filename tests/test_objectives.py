"""The training objectives of model/: their math against formulas written out here, the critic/generator
schedule, condition dropout, teacher forcing, and an overfit check per stage (a few AdamW steps on one fixed
tiny batch with fixed noise make its loss fall)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize, tiny_inputs, tiny_pose

from model import REGISTRY
from model.dmd import dmd_gradient, dmd_loss
from model.flow_matching import draw_timesteps, dropout_conditions, timesteps_from_uniform
from model.gan import FeatureDiscriminator, SelfForcingGAN, approx_r1_penalty, discriminator_layers
from model.ode_regression import gather_states
from model.pose_finetune import teacher_forcing_flow
from model.sid import sid_loss
from pipeline.conditions import conditions
from pipeline.rollout import DEFAULT_STEPS
from trainer.objective import Objective, TrainContext
from trainer.trainer import backward_per_role
from utils.scheduler import add_noise, flow_to_x0
from wan.configs import build_model

FRAMES, HEIGHT, WIDTH = 6, 2, 4  # two blocks; pose frames 21 x 16 x 32


def tiny_batch(batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every key of the batch layout for the tiny preset, with an ODE trajectory on the straight path."""
    inputs = tiny_inputs(batch, FRAMES, HEIGHT, WIDTH, seed=seed + 1)
    pose, ref = tiny_pose(batch, FRAMES, HEIGHT, WIDTH, seed=seed + 2)
    g = torch.Generator().manual_seed(seed + 3)
    latents = torch.randn(batch, 16, FRAMES, HEIGHT, WIDTH, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    steps = torch.tensor(DEFAULT_STEPS, dtype=torch.float64)
    states = [add_noise(latents, noise, t.expand(batch)) for t in steps] + [latents]
    return {
        "context": inputs["context"],
        "neg_context": 0.1 * torch.randn(inputs["context"].shape, generator=g),
        "clip_fea": inputs["clip_fea"],
        "y": inputs["y"],
        "pose": pose,
        "ref_pose": ref,
        "latents": latents,
        "ode_latents": torch.stack(states, dim=1),  # [B, S, 16, F, H, W]
        "ode_t": torch.cat([steps, torch.zeros(1, dtype=torch.float64)]).expand(batch, -1),
    }


def tiny_roles(names) -> dict[str, torch.nn.Module]:
    """Random tiny networks per role (the teacher frozen, as the trainer builds it)."""
    presets = {
        "generator": "tiny",
        "teacher": "tiny_teacher",
        "critic": "tiny_bidirectional",
        "discriminator": "tiny_bidirectional",
    }
    roles = {name: randomize(build_model(presets[name]), seed=seed) for seed, name in enumerate(names)}
    if "teacher" in roles:
        roles["teacher"].requires_grad_(False)
    if "discriminator" in roles:
        torch.manual_seed(0)  # the heads' default init draws from the global RNG
        roles["discriminator"] = SelfForcingGAN.prepare_role("discriminator", roles["discriminator"])
    return roles


def make(stage: str, cfg: dict | None = None, ctx: TrainContext | None = None) -> Objective:
    cls = REGISTRY[stage]
    ctx = ctx or TrainContext(torch.device("cpu"), torch.float32, seed=0)
    return cls(cfg or {}, tiny_roles(cls.required_roles), ctx)


def role_params(objective: Objective) -> dict[str, list[torch.nn.Parameter]]:
    return {r: [p for p in m.parameters() if p.requires_grad] for r, m in objective.roles.items()}


def train(
    objective: Objective, batch: dict, iterations: int, lr: float, betas=(0.0, 0.999), steps_roles=None
) -> dict[str, list[float]]:
    """AdamW on one fixed batch with the same random draws every iteration (ctx at iteration 0); returns every
    role's loss per iteration in which it was due. steps_roles limits which optimizers step."""
    optimizers = {
        r: torch.optim.AdamW([p for p in objective.roles[r].parameters() if p.requires_grad], lr=lr, betas=betas)
        for r in objective.trainable_roles
    }
    history: dict[str, list[float]] = {}
    for it in range(iterations):
        objective.ctx.begin_step(0, list(range(batch["context"].shape[0])))
        due = objective.due(it)
        out = objective.train_step(batch, it, due)
        assert set(out.losses) == set(due), (it, due, sorted(out.losses))
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        assert all(torch.isfinite(out.losses[r]) for r in due)
        backward_per_role({r: out.losses[r] for r in due}, role_params(objective))
        for r in due:
            history.setdefault(r, []).append(float(out.losses[r].detach()))
            if steps_roles is None or r in steps_roles:
                optimizers[r].step()
    return history


# ----------------------------------------------------------------------------- registry and schedules


def test_registry_names_roles_and_defaults():
    assert set(REGISTRY) == {"ode_init", "pose_finetune", "dmd", "sid", "self_forcing", "self_forcing_gan", "teacher",
                             "kd", "causal_kd", "cfg_distill", "step_distill", "draft"}  # fmt: skip
    for name, cls in REGISTRY.items():
        assert cls.name == name and issubclass(cls, Objective)
        assert set(cls.trainable_roles) <= set(cls.required_roles)
    assert REGISTRY["dmd"].defaults["gen_every"] == 5
    assert (REGISTRY["dmd"].defaults["min_t"], REGISTRY["dmd"].defaults["max_t"]) == (20.0, 980.0)
    assert REGISTRY["sid"].defaults["alpha"] == 1.0
    assert REGISTRY["pose_finetune"].defaults["pose_dropout"] == 0.05
    assert REGISTRY["teacher"].trainable_roles == ("teacher",) and REGISTRY["teacher"].defaults["uncond_dropout"] == 0.1


@pytest.mark.parametrize("stage", ["dmd", "sid", "self_forcing", "self_forcing_gan"])
@pytest.mark.parametrize("gen_every", [5, 3])
def test_critic_every_step_generator_every_k(stage, gen_every):
    objective = make(stage, {"gen_every": gen_every})
    for it in range(12):
        due = objective.due(it)
        assert "critic" in due
        assert ("generator" in due) == (it % gen_every == 0)
        assert ("discriminator" in due) == (stage == "self_forcing_gan")


# ----------------------------------------------------------------------------- pure math against formulas


def test_dmd_gradient_formula():
    g = torch.Generator().manual_seed(0)
    x, real, fake = (torch.randn(3, 2, 4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    grad = dmd_gradient(x, real, fake)
    for b in range(3):  # element by element: per-sample mean over all 24 non-batch entries
        total = sum(abs(float(x[b].flatten()[i] - real[b].flatten()[i])) for i in range(24))
        expected = (fake[b] - real[b]) / (total / 24)
        assert torch.allclose(grad[b], expected, rtol=1e-12, atol=0)

    x = x.clone().requires_grad_(True)
    loss = dmd_loss(x, grad)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * float(grad.pow(2).mean()), rel=1e-6)
    assert torch.allclose(x.grad.double(), grad / x.numel(), rtol=1e-5, atol=1e-9)  # d loss / dx = grad / numel


def test_sid_loss_formula_and_gradient():
    g = torch.Generator().manual_seed(1)
    x, r, f = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    alpha = 1.2
    norm = (x - r).abs().mean(dim=(1, 2), keepdim=True)
    paper = ((1 - alpha) * (r - f) ** 2 + (r - f) * (f - x)) / norm  # Zhou et al.: (1-a)|r-f|^2 + (r-f)(f-x)
    assert sid_loss(x, r, f, alpha).item() == pytest.approx(float(paper.mean()), rel=1e-6)

    x = x.clone().requires_grad_(True)
    sid_loss(x, r, f, alpha).backward()  # the normaliser is a constant: d/dx = -(r - f) / (norm * numel)
    assert torch.allclose(x.grad.double(), -(r - f) / (norm * x.numel()), rtol=1e-5, atol=1e-9)


def test_ode_init_draws_the_clean_state_as_context_with_no_loss():
    """Blocks at the clean end of the trajectory occur (the clean context inference sees), and the loss is the
    MSE over the other blocks' frames only, recomputed here from the same draws."""
    objective = make("ode_init")
    model, batch = objective.roles["generator"], tiny_batch()
    states, ode_t = batch["ode_latents"], batch["ode_t"]
    s, n = states.shape[1], model.num_frame_per_block
    seen_clean = 0
    for it in range(12):
        objective.ctx.begin_step(it, [0])
        with torch.no_grad():
            out = objective.train_step(batch, it, ("generator",))
        objective.ctx.begin_step(it, [0])
        index = (objective.ctx.rand(1, FRAMES // n) * s).long().clamp(max=s - 1).repeat_interleave(n, dim=1)
        x_t, t = gather_states(states, ode_t, index)
        noisy = (index < s - 1)[0]
        seen_clean += int((~noisy).sum()) // n
        assert torch.equal(t[0, ~noisy], torch.zeros(int((~noisy).sum()), dtype=t.dtype))
        with torch.no_grad():
            x0 = flow_to_x0(model(x_t, t, **conditions(model, batch)).double(), x_t.double(), t)
        err = (x0 - states[:, -1].double())[:, :, noisy]
        expected = err.pow(2).mean() if noisy.any() else torch.zeros((), dtype=torch.float64)
        assert float(out.losses["generator"]) == pytest.approx(float(expected), rel=1e-4, abs=1e-7)
    assert seen_clean >= 2  # 24 block draws, each clean with probability 1/5


def test_timesteps_from_uniform_formula():
    u = torch.tensor([0.0, 0.001, 0.25, 0.5, 0.999])
    expected = [min(max(1000 * 5 * v / (1 + 4 * v), 20), 980) for v in u.double().tolist()]
    assert timesteps_from_uniform(u, 5.0, 20, 980).tolist() == pytest.approx(expected, rel=1e-6)


def test_draw_timesteps_per_sample_streams_and_distribution():
    ctx = TrainContext(torch.device("cpu"), torch.float32, seed=3)
    ctx.begin_step(5, [0, 1, 2, 3])
    opts = {"shift": 5.0, "min_t": 20.0, "max_t": 980.0}
    t = draw_timesteps(ctx, (4, 2), opts)
    ctx.begin_step(5, [0, 1, 2, 3])
    u = ctx.rand(4, 2).double()  # the same per-sample streams
    assert t.shape == (4, 2) and t.dtype == torch.float32
    assert torch.equal(t, (1000 * 5 * u / (1 + 4 * u)).clamp(20, 980).float())  # one rounding of the float64 t

    u = torch.rand(20000, generator=torch.Generator().manual_seed(1))
    t = timesteps_from_uniform(u, 5.0, 20, 980)
    assert t.min() >= 20 and t.max() <= 980
    assert abs(t.median().item() - 1000 * 2.5 / 3) < 10  # u = 0.5 -> 5 * 0.5 / (1 + 4 * 0.5)
    assert abs((t == 980).float().mean().item() - (1 - 0.98 / (5 - 4 * 0.98))) < 0.01  # P(shifted u > 0.98)


def test_gather_states_picks_one_state_per_frame():
    states = torch.arange(2 * 3 * 1 * 4).float().view(2, 3, 1, 4, 1, 1).expand(2, 3, 1, 4, 2, 2)
    ode_t = torch.tensor([[900.0, 500.0, 0.0], [800.0, 400.0, 0.0]])
    index = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]])
    x_t, t = gather_states(states, ode_t, index)
    for b in range(2):
        for f in range(4):
            assert torch.equal(x_t[b, :, f], states[b, index[b, f], :, f])
            assert t[b, f] == ode_t[b, index[b, f]]


def test_discriminator_layers_and_r1():
    assert discriminator_layers(30) == [14, 21, 29]
    assert discriminator_layers(2) == [0, 1]
    g = torch.Generator().manual_seed(0)
    w, x, eps = torch.randn(4, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    sigma = 0.01  # a linear D(x) = w.x: the estimate is exactly 0.5 * mean((w.eps)^2), whose mean over eps is R1
    estimate = approx_r1_penalty(x @ w, (x + sigma * eps) @ w, sigma)
    assert estimate.item() == pytest.approx(float(0.5 * (eps @ w).pow(2).mean()), rel=1e-4)


def test_backward_per_role_keeps_each_loss_in_its_own_role():
    """A generator loss through the critic (differentiated wrt its input) leaves the critic's gradient as the
    critic's own loss alone made it; plain backward of the sum would add the generator loss's share."""
    gen, critic = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    losses = {"generator": critic(gen(x)).pow(2).mean(), "critic": critic(gen(x).detach()).mean()}
    params = {"generator": list(gen.parameters()), "critic": list(critic.parameters())}
    backward_per_role(losses, params)
    expected_critic = torch.autograd.grad(critic(gen(x).detach()).mean(), list(critic.parameters()))
    expected_gen = torch.autograd.grad(critic(gen(x)).pow(2).mean(), list(gen.parameters()))
    for p, g in zip(critic.parameters(), expected_critic, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-7)
    for p, g in zip(gen.parameters(), expected_gen, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-7)
    # accumulation: a second micro-step adds to each role's own gradient only
    before = [p.grad.clone() for p in critic.parameters()]
    backward_per_role({"generator": critic(gen(x)).pow(2).mean()}, params)
    assert all(torch.equal(p.grad, b) for p, b in zip(critic.parameters(), before, strict=True))
    assert all(p.requires_grad for p in critic.parameters())


# ----------------------------------------------------------------------------- conditioning


def test_condition_dropout_zeroes_the_embeddings():
    model = randomize(build_model("tiny"), seed=1)
    batch = tiny_batch(batch=3)
    full = conditions(model, batch)
    keep_pose, keep_image = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0])
    cond = dropout_conditions(model, batch, keep_pose, keep_image)
    assert torch.equal(cond["add_condition"][0], full["add_condition"][0])
    assert torch.count_nonzero(cond["add_condition"][1]) == 0
    assert torch.equal(cond["y"][0], full["y"][0])
    assert torch.equal(cond["y"][1], batch["y"][1])  # pose dropped: no ref-pose map, y itself kept
    _, ref_map = model.encode_pose(batch["pose"], batch["ref_pose"])
    assert torch.allclose(cond["y"][2], ref_map[2].expand_as(cond["y"][2]))  # image dropped: only the ref-pose map
    assert torch.count_nonzero(cond["clip_fea"][2]) == 0 and torch.equal(cond["clip_fea"][1], batch["clip_fea"][1])
    same = dropout_conditions(model, batch, torch.ones(3), torch.ones(3))
    assert all(torch.equal(same[k], full[k]) for k in ("add_condition", "y", "clip_fea", "context"))


def test_teacher_forcing_sees_clean_context():
    """Block 1's flow equals the block-causal full forward on [clean block 0 at t = 0, noisy block 1]."""
    model = randomize(build_model("tiny"), seed=2)
    batch = tiny_batch(batch=2)
    cond = conditions(model, batch)
    clean = batch["latents"]
    x_t = add_noise(
        clean, torch.randn(clean.shape, generator=torch.Generator().manual_seed(4)), torch.full((2,), 700.0)
    )
    t = torch.tensor([[800.0] * 3 + [600.0] * 3, [300.0] * 3 + [950.0] * 3])
    with torch.no_grad():
        tf = teacher_forcing_flow(model, x_t, t, clean, cond, torch.float32)
        mixed = torch.cat([clean[:, :, :3], x_t[:, :, 3:]], dim=2)
        t_mixed = torch.cat([torch.zeros(2, 3), t[:, 3:]], dim=1)
        full = model(mixed, t_mixed, **cond)
        first = model(x_t, t, **cond)
    assert torch.allclose(tf[:, :, 3:], full[:, :, 3:], rtol=1e-5, atol=1e-5)
    assert torch.allclose(tf[:, :, :3], first[:, :, :3], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- overfit checks


@pytest.mark.parametrize("stage", ["ode_init", "pose_finetune"])
def test_regression_stages_overfit(stage):
    history = train(make(stage), tiny_batch(), iterations=10, lr=3e-3, betas=(0.9, 0.999))
    losses = history["generator"]
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("stage", ["dmd", "self_forcing"])
def test_dmd_stages_overfit(stage):
    """Critic every iteration, generator every 2nd: both losses fall (the generator's DMD loss is 0.5 |grad|^2,
    which shrinks as generator and critic meet)."""
    history = train(make(stage, {"gen_every": 2}), tiny_batch(), iterations=9, lr=3e-3)
    assert len(history["generator"]) == 5 and len(history["critic"]) == 9
    assert history["critic"][-1] < 0.9 * history["critic"][0], history
    assert history["generator"][-1] < 0.85 * history["generator"][0], history


def test_sid_overfit():
    """With the critic held fixed the generator minimises the SiD loss itself (it may be negative)."""
    objective = make("sid", {"gen_every": 1})
    history = train(objective, tiny_batch(), iterations=6, lr=3e-3, steps_roles=("generator",))
    losses = history["generator"]
    assert losses[-1] < losses[0] - 0.2 * abs(losses[0]), losses
    assert all(torch.isfinite(torch.tensor(history["critic"])))


def test_sid_gradient_reaches_generator_not_critic():
    objective = make("sid")
    objective.ctx.begin_step(0, [0])
    out = objective.train_step(tiny_batch(), 0, ("generator",))
    backward_per_role({"generator": out.losses["generator"]}, role_params(objective))
    assert all(p.grad is None for p in objective.roles["critic"].parameters())
    assert all(p.grad is None for p in objective.roles["teacher"].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.roles["generator"].parameters())
    assert all(p.requires_grad for p in objective.roles["critic"].parameters())


@pytest.mark.parametrize("stage", ["sid", "self_forcing_gan"])
def test_generator_gradient_with_checkpointing_equals_without(stage):
    """The generator's loss runs through the critic / discriminator with activation checkpointing on every role
    (as the shipped configs train); its gradient equals the run without checkpointing, and it leaves no gradient
    on the other roles."""
    grads = {}
    for checkpointing in (False, True):
        objective = make(stage)
        for module in objective.roles.values():
            backbone = getattr(module, "backbone", module)
            backbone.gradient_checkpointing = checkpointing
        objective.ctx.begin_step(0, [0])
        out = objective.train_step(tiny_batch(), 0, ("generator",))
        backward_per_role({"generator": out.losses["generator"]}, role_params(objective))
        for name in ("critic", "discriminator", "teacher"):
            if name in objective.roles:
                assert all(p.grad is None for p in objective.roles[name].parameters()), (name, checkpointing)
        grads[checkpointing] = [p.grad.clone() for p in objective.roles["generator"].parameters() if p.grad is not None]
    assert len(grads[True]) == len(grads[False]) > 0
    for a, b in zip(grads[True], grads[False], strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), float((a - b).abs().max())


def test_self_forcing_gan_overfit():
    objective = make("self_forcing_gan", {"gen_every": 2, "r1_weight": 0.1})
    assert isinstance(objective.roles["discriminator"], FeatureDiscriminator)
    history = train(objective, tiny_batch(), iterations=5, lr=3e-3)
    assert len(history["discriminator"]) == 5 and len(history["generator"]) == 3
    assert history["discriminator"][-1] < 0.9 * history["discriminator"][0], history
    assert history["critic"][-1] < history["critic"][0], history


def test_missing_batch_keys_are_explained():
    batch = tiny_batch()
    with pytest.raises(ValueError, match="ode_latents"):
        make("ode_init").train_step({k: v for k, v in batch.items() if k != "ode_latents"}, 0, ("generator",))
    with pytest.raises(ValueError, match="latents"):
        make("pose_finetune").train_step({k: v for k, v in batch.items() if k != "latents"}, 0, ("generator",))
    with pytest.raises(ValueError, match="neg_context"):
        make("dmd").train_step({k: v for k, v in batch.items() if k != "neg_context"}, 0, ("generator", "critic"))
