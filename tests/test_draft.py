"""DRaFT (issue 16, model/draft.py) and its rewards (utils/rewards.py), with the world keypoint network
(utils/world/keypoints.py): both rewards against float64 formulas written out here, the gradient only in the LoRA
adapters and only through the last K sampling steps (against a rollout written out here), the reward rising on a
fixed batch, the LoRA merged at scale 0 / 1 / below 1, and the shipped keypoint network against the exact detector
on ground-truth world frames."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import randomize
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_objectives import tiny_batch

from model import objective_registry
from model.draft import DRaFT
from pipeline.conditions import conditions
from pipeline.world import VAL_SEED, WORLD_CONFIG
from scripts import train_world_keypoints
from scripts.evaluate_world import learned_scores
from scripts.merge_lora import main as merge_lora
from trainer.objective import TrainContext, objective_defaults
from trainer.roles import attach_lora
from trainer.trainer import Trainer
from utils.config import load_config
from utils.encoders.tiny_assets import TINY_VAE_CONFIG
from utils.encoders.wan_vae_parallel import decode
from utils.encoders.wan_wrapper import WanVAE
from utils.metrics import keypoint_metrics
from utils.rewards import PoseReward, PreferenceReward
from utils.scheduler import add_noise, flow_to_x0
from utils.world.keypoints import WORLD_KEYPOINTS, WorldKeypointNet, detect, load_keypoint_net
from utils.world.synthetic_pose import detect_markers, generate_sample, load_world_config
from wan.checkpoint import save_weights
from wan.configs import build_model

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
STEPS = [1000.0, 937.5, 833.3333333333334, 625.0]
SHIPPED_PCK = 0.9  # the shipped network's PCK@0.05 on clean ground-truth frames must reach this


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> WanVAE:
    from diffusers import AutoencoderKLWan

    folder = tmp_path_factory.mktemp("vae") / "vae"
    torch.manual_seed(0)
    AutoencoderKLWan(**TINY_VAE_CONFIG).save_pretrained(folder)
    return WanVAE(folder, device="cpu", dtype=torch.float32)


def tiny_net(seed: int = 0) -> WorldKeypointNet:
    torch.manual_seed(seed)
    return WorldKeypointNet(width=8, blocks=1).eval().requires_grad_(False)


def ctx_at(batch: int = 1) -> TrainContext:
    ctx = TrainContext(CPU, torch.float32, seed=0)
    ctx.begin_step(0, list(range(batch)))
    return ctx


def one_block_batch(batch: int = 1) -> dict[str, torch.Tensor]:
    """tiny_batch cut to the first block (3 latent frames, 9 pose frames of 16 x 32)."""
    full = tiny_batch(batch)
    cut = {k: v for k, v in full.items() if k not in ("ode_latents", "ode_t")}
    cut["y"], cut["latents"], cut["pose"] = full["y"][:, :, :3], full["latents"][:, :, :3], full["pose"][:, :, :9]
    return cut


# ----------------------------------------------------------------------------- the rewards against float64


def pose_reward64(net: WorldKeypointNet, frames: torch.Tensor, target: torch.Tensor, visible: torch.Tensor):
    """The pose reward written out in float64: frames [B, 3, F, H, W]; target [B, F, J, 2] pixels; visible [B, F, J]."""
    net = WorldKeypointNet(**net.config).double()
    net.load_state_dict(tiny_net_state)
    b, _, f, h, w = frames.shape
    x = frames.double().permute(0, 2, 1, 3, 4).reshape(b * f, 3, h, w)
    logits = net(x)  # [N, J, h/4, w/4]
    n, j, hh, ww = logits.shape
    e = torch.exp(logits - logits.amax((2, 3), keepdim=True))
    p = e / e.sum((2, 3), keepdim=True)
    cx = torch.tensor([4 * c + 1.5 for c in range(ww)], dtype=torch.float64)
    cy = torch.tensor([4 * r + 1.5 for r in range(hh)], dtype=torch.float64)
    px, py = (p * cx).sum((2, 3)), (p * cy[:, None]).sum((2, 3))  # [N, J]
    pred = torch.stack([px, py], -1).view(b, f, j, 2)
    dist = ((pred - target.double()) ** 2).sum(-1).sqrt() / max(h, w)
    vis = visible.double()
    return -(dist * vis).sum((1, 2)) / vis.sum((1, 2)).clamp_min(1.0)


tiny_net_state: dict = {}


def test_pose_reward_matches_float64_for_both_targets():
    net = tiny_net(seed=1)
    randomize(net, std=0.2, seed=2)
    tiny_net_state.clear()
    tiny_net_state.update({k: v.double() for k, v in net.state_dict().items()})
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(2, 3, 2, 16, 32, generator=g) * 2 - 1
    kp = torch.rand(2, 2, 20, 3, generator=g)  # x, y normalised; visibility in [0, 1)
    reward = PoseReward(net, threshold=0.5)
    target = kp[..., :2] * torch.tensor([32.0, 16.0])
    got = reward(frames, {"keypoints": kp})
    assert got.shape == (2,)
    assert torch.allclose(got.double(), pose_reward64(net, frames, target, kp[..., 2] >= 0.5), rtol=1e-5, atol=1e-6)

    # no keypoints in the batch: the target is what the network reads from the pose frames (0..255)
    pose = torch.rand(2, 3, 5, 16, 32, generator=g) * 255
    with torch.no_grad():
        x = (pose[:, :, :2] / 127.5 - 1).double()
        net64 = WorldKeypointNet(**net.config).double()
        net64.load_state_dict(tiny_net_state)
        logits = net64(x.permute(0, 2, 1, 3, 4).reshape(4, 3, 16, 32))
        peak = torch.sigmoid(logits.flatten(2).amax(-1)).view(2, 2, 20)
    target_pose = reward.target({"pose": pose}, 2, 16, 32)[0]
    expected = pose_reward64(net, frames, target_pose, peak >= 0.5)
    got = reward(frames, {"pose": pose})
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-6)
    frames.requires_grad_(True)
    reward(frames, {"keypoints": kp}).sum().backward()
    assert frames.grad.abs().sum() > 0  # differentiable wrt the frames


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random transformers CLIPModel folder with a word-level tokenizer: the preference reward's stand-in."""
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "assets" / "world_encoders" / "tokenizer" / name, folder / name)
    config = CLIPConfig(
        text_config={"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 16, "eos_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 28, "patch_size": 14},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


def test_preference_reward_matches_float64(tiny_clip):
    from transformers import AutoTokenizer, CLIPModel

    prompt = "a figure in red shirt"
    reward = PreferenceReward.from_path(tiny_clip, prompt, scale=2.5)
    g = torch.Generator().manual_seed(1)
    frames = (torch.rand(2, 3, 2, 40, 56, generator=g) * 2 - 1).requires_grad_(True)
    got = reward(frames, {})
    assert got.shape == (2,)

    model = CLIPModel.from_pretrained(tiny_clip).double().eval()
    tok = AutoTokenizer.from_pretrained(tiny_clip)([prompt], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        text = model.text_projection(
            model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
        )[0]
        # shorter side to 28 (40 -> 28, 56 -> 39), bicubic antialiased, centre crop 28 x 28, CLIP's mean / std
        x = (frames.detach().double().permute(0, 2, 1, 3, 4).reshape(4, 3, 40, 56) + 1) / 2
        x = torch.nn.functional.interpolate(x, size=(28, 39), mode="bicubic", antialias=True)[..., :, 5:33]
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).view(1, 3, 1, 1)
        image = model.visual_projection(model.vision_model(pixel_values=(x - mean) / std).pooler_output)  # [4, D]
        cos = (image @ text) / (image.norm(dim=-1) * text.norm())
    expected = 2.5 * cos.view(2, 2).mean(1)
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-5), (got, expected)
    got.sum().backward()
    assert frames.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- the objective's gradient


def lora_student(seed: int = 0, rank: int = 2) -> torch.nn.Module:
    model = randomize(build_model("tiny"), std=0.1, seed=seed)
    model.requires_grad_(True)
    targets = ["q", "k", "v", "o", "ffn.0", "ffn.2"]
    attach_lora(model, OmegaConf.create({"rank": rank, "alpha": None, "targets": targets, "dropout": 0.0, "full": []}),
                "generator")  # fmt: skip
    with torch.no_grad():  # B = 0 at init: give the adapters a value so that A gets a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def linear_reward(frames: torch.Tensor, batch: dict) -> torch.Tensor:
    """A fixed differentiable reward: a weighted sum of the pixels per sample."""
    w = torch.linspace(-1, 1, frames[0].numel()).view(frames.shape[1:])
    return (frames * w).flatten(1).sum(1) / frames[0].numel()


def manual_draft_loss(model, vae, batch, grad_steps: int) -> torch.Tensor:
    """DRaFT-K written out for one block: Self-Forcing's few-step sampler with the same noise draws, the steps
    before the last K without gradient, decode of latent frame 0, -reward."""
    ctx = ctx_at(batch["context"].shape[0])
    cond = conditions(model, batch)
    shape = (batch["context"].shape[0], 16, 3, batch["y"].shape[3], batch["y"].shape[4])
    x = ctx.randn(*shape)
    for i, t_value in enumerate(STEPS):
        t = torch.full((shape[0], 3), t_value)
        with torch.set_grad_enabled(i >= len(STEPS) - grad_steps):
            x0 = flow_to_x0(model(x, t, **cond).float(), x, t)
            if i + 1 < len(STEPS):
                x = add_noise(x0, ctx.randn(*shape), torch.full_like(t, STEPS[i + 1]))
    frames = decode(vae.vae, vae.denormalize(x0[:, :, :1]))
    return -linear_reward(frames, batch).mean()


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("grad_steps", [1, 2])
def test_gradient_reaches_only_the_adapters_and_only_the_last_k_steps(tiny_vae, grad_steps):
    batch = one_block_batch()
    model = lora_student()
    objective = DRaFT({"grad_steps": grad_steps, "steps": STEPS}, {"generator": model}, ctx_at(), linear_reward,
                      tiny_vae)  # fmt: skip
    modes = []
    hook = model.register_forward_pre_hook(lambda m, args: modes.append(torch.is_grad_enabled()))
    objective.train_step(batch, 0, ("generator",)).losses["generator"].backward()
    hook.remove()
    ours = grads_of(model)
    assert modes == [False] * (len(STEPS) - grad_steps) + [True] * grad_steps  # one block: no context pass
    assert ours and all(".lora_" in n for n in ours)  # the base weights are frozen
    assert any(g.abs().sum() > 0 for n, g in ours.items() if "lora_A" in n)
    model.zero_grad(set_to_none=True)
    manual_draft_loss(model, tiny_vae, batch, grad_steps).backward()
    theirs = grads_of(model)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-7), name
    if grad_steps == 2:  # K = 2 differs from K = 1: the second-to-last step contributes
        model.zero_grad(set_to_none=True)
        manual_draft_loss(model, tiny_vae, batch, 1).backward()
        assert any(not torch.allclose(ours[n], g, rtol=1e-3, atol=1e-6) for n, g in grads_of(model).items())


def test_all_frames_samples_and_decodes_the_whole_clip(tiny_vae):
    batch = tiny_batch()  # two blocks
    seen = []
    objective = DRaFT({"frames": "all"}, {"generator": lora_student()}, ctx_at(),
                      lambda frames, b: seen.append(frames.shape) or linear_reward(frames, b), tiny_vae)  # fmt: skip
    loss = objective.train_step(batch, 0, ("generator",)).losses["generator"]
    assert seen == [(1, 3, 21, 16, 32)] and math.isfinite(loss.item())
    with pytest.raises(ValueError, match="objective.frames"):
        DRaFT({"frames": "last"}, {"generator": lora_student()}, ctx_at(), linear_reward, tiny_vae)
    with pytest.raises(ValueError, match="objective.grad_steps"):
        DRaFT({"grad_steps": 5}, {"generator": lora_student()}, ctx_at(), linear_reward, tiny_vae)


def test_pose_reward_rises_on_a_fixed_batch(tiny_vae):
    """DRaFT-1 with the pose reward of a tiny random keypoint network: the LoRA student moves the keypoints of its
    decoded first frame toward fixed targets."""
    batch = one_block_batch()
    g = torch.Generator().manual_seed(3)
    batch["keypoints"] = torch.cat([torch.rand(1, 9, 20, 2, generator=g), torch.ones(1, 9, 20, 1)], -1)
    net = tiny_net(seed=4)
    randomize(net, std=1.0, seed=5)  # peaked heatmaps: keypoints that follow the frame
    model = lora_student(seed=1, rank=4)
    objective = DRaFT({}, {"generator": model}, ctx_at(), PoseReward(net, threshold=0.5), tiny_vae)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, betas=(0.9, 0.99))
    rewards = []
    for _ in range(30):
        objective.ctx.begin_step(0, [0])  # the same noise every iteration
        out = objective.train_step(batch, 0, ("generator",))
        opt.zero_grad(set_to_none=True)
        out.losses["generator"].backward()
        opt.step()
        rewards.append(float(out.logs["reward"]))
    first, last = rewards[0], sum(rewards[-3:]) / 3
    assert last > first + 0.1 * abs(first), rewards  # measured: -0.304 -> -0.249


# ----------------------------------------------------------------------------- LoRA scale at inference


def test_lora_merged_below_the_training_scale(tmp_path):
    """A DRaFT run's adapter merged with merge_lora.py: scale 0 is the base, 1 the trained export, 0.5 halfway."""
    base = tmp_path / "student.safetensors"
    save_weights(randomize(build_model("tiny"), std=0.1, seed=7), base)
    registry = objective_registry()
    cfg = load_config(ROOT / "configs" / "world" / "draft.yaml", [
        "model=tiny", "roles.generator.preset=tiny", f"roles.generator.weights={base}", "roles.generator.lr=1e-2",
        "roles.generator.lora.rank=2", "data.type=synthetic", "data.cache=null", "data.num_samples=1",
        "data.latent_frames=3", "data.latent_size=[4,4]", "train.batch_size=1", "train.iterations=2",
        "train.dtype=fp32", "eval.every=0", "objective.keypoint_threshold=0.0", f"run.output_dir={tmp_path}",
    ], objective_defaults(registry))  # fmt: skip
    history = Trainer(cfg, registry).train()
    assert all(math.isfinite(h["loss/generator"]) for h in history)
    export = tmp_path / "world_draft" / "export"
    trained, base_w = load_file(export / "generator.safetensors"), load_file(base)
    for scale, expected in ((0.0, base_w), (1.0, trained)):
        out = tmp_path / f"merged_{scale}.safetensors"
        assert merge_lora(["--base", str(base), "--lora", str(export / "generator_lora.safetensors"), "--out",
                           str(out), "--alpha", str(scale)]) == 0  # fmt: skip
        merged = load_file(out)
        assert merged.keys() == expected.keys()
        for key in merged:
            assert torch.allclose(merged[key], expected[key], rtol=0, atol=1e-6), (scale, key)
    half = tmp_path / "merged_half.safetensors"
    merge_lora(["--base", str(base), "--lora", str(export / "generator_lora.safetensors"), "--out", str(half),
                "--alpha", "0.5"])  # fmt: skip
    moved = [k for k in base_w if not torch.equal(trained[k], base_w[k])]
    assert moved
    merged = load_file(half)
    for key in moved:
        assert torch.allclose(merged[key], (base_w[key] + trained[key]) / 2, rtol=0, atol=1e-6), key


# ----------------------------------------------------------------------------- the shipped keypoint network


def test_shipped_keypoint_network_matches_the_exact_detector_on_ground_truth():
    """On validation clips the training never saw: the learned detector's PCK@0.05 on the rendered frames and on
    the drawn pose frames (the reward's target), and the pose reward (evaluate_world's learned_scores): near 0 for
    the clip's own frames, lower for another clip's frames under the same driving pose."""
    net = load_keypoint_net(WORLD_KEYPOINTS)
    assert (WORLD_KEYPOINTS / "keypoints.safetensors").stat().st_size <= 2_000_000
    world = load_world_config(WORLD_CONFIG, num_frames=9)
    samples = [generate_sample(world, seed) for seed in (VAL_SEED + 100, VAL_SEED + 101)]
    scores: dict[str, list[float]] = {"net": [], "exact": [], "net_pose_frames": []}
    for s in samples:
        for name, frames in (("net", s.video), ("net_pose_frames", s.pose)):
            scores[name].append(keypoint_metrics(s.keypoints, detect(net, frames), 128, 128)["pck@0.05"])
        scores["exact"].append(keypoint_metrics(s.keypoints, detect_markers(s.video), 128, 128)["pck@0.05"])
    assert np.mean(scores["exact"]) > 0.99
    assert np.mean(scores["net"]) >= SHIPPED_PCK, scores
    assert np.mean(scores["net_pose_frames"]) >= SHIPPED_PCK - 0.1, scores

    reward = PoseReward(net)
    clips = [SimpleNamespace(world=s, batch={"pose": torch.from_numpy(s.pose).permute(3, 0, 1, 2)[None].float()})
             for s in samples]  # fmt: skip
    own = learned_scores(reward, samples[0].video, clips[0])
    other = learned_scores(reward, samples[1].video, clips[0])
    assert own["net_pck@0.05"] >= SHIPPED_PCK and own["pose_reward"] > -0.02, own
    assert other["pose_reward"] < own["pose_reward"] - 0.02, (own, other)


def test_train_world_keypoints_smoke_writes_a_loadable_network(tmp_path):
    assert train_world_keypoints.main(["--out", str(tmp_path), "--smoke"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 3 and {"net_clean", "net_vae", "exact_vae_tol40"} <= set(metrics["validation"])
    net = load_keypoint_net(tmp_path)
    assert net.config == {"width": 24, "blocks": 3, "num_joints": 20, "groups": 8}
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in net.parameters())
