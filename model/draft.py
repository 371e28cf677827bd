"""DRaFT (Clark et al. 2023, "Directly fine-tuning diffusion models on differentiable rewards"): the student samples
as it streams at inference (few-step block rollout through its KV cache, fresh noise per step), the gradient flows
back through the last K sampling steps only (DRaFT-K; K = 1 by default, the re-noising between those steps
included), the sample is decoded by the frozen VAE with gradient, and the loss is minus a differentiable reward of
the decoded frames (utils/rewards.py). The generator trains LoRA adapters (roles.generator.lora.rank > 0: the
merged export and the adapter file come from the trainer); a LoRA merged at a lower scale than trained
(scripts/merge_lora.py --alpha) is the usual guard against over-optimising the reward.

frames: "first" scores the decoded first frame only (the reference found it best): then only the first block is
sampled (a block-causal student's first block depends on no later one) and only latent frame 0 is decoded (the
causal VAE decodes it to exactly the first frame); "all" samples and decodes the whole clip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pipeline.conditions import conditions, latent_shape
from pipeline.rollout import DEFAULT_STEPS, block_rollout, few_step
from trainer.objective import Objective, StepOutput, TrainContext
from utils.config import DTYPES
from utils.encoders.wan_vae_parallel import decode
from utils.rewards import PoseReward, PreferenceReward, Reward
from wan.modules.causal_model import CausalWanModel

ROOT = Path(__file__).resolve().parents[1]
FRAMES = ("first", "all")
REWARDS = ("pose", "preference")


def repo_path(path: str | Path) -> Path:
    """A config path as given when it exists (absolute or relative to the working directory), else relative to the
    repository root (the shipped assets/)."""
    path = Path(path)
    return path if path.is_absolute() or path.exists() else ROOT / path


def build_reward(opts: dict[str, Any], device: torch.device) -> Reward:
    """The reward the `objective:` section names (objective.reward: pose or preference)."""
    kind = str(opts["reward"])
    if kind == "pose":
        return PoseReward.from_path(repo_path(opts["keypoint_net"]), device, float(opts["keypoint_threshold"]))
    if kind == "preference":
        if opts["reward_model"] is None:
            raise ValueError(
                "objective.reward=preference needs objective.reward_model: a transformers CLIPModel folder (e.g. "
                "HPSv2.1 converted to that layout)"
            )
        return PreferenceReward.from_path(repo_path(opts["reward_model"]), str(opts["reward_prompt"]),
                                          float(opts["reward_scale"]), device)  # fmt: skip
    raise ValueError(f"objective.reward={kind!r}: expected one of {REWARDS}")


class DRaFT(Objective):
    """Generator only (LoRA). Batch: the conditioning (context, clip_fea, y, pose, ref_pose); no data latents.

    loss = -mean_b reward(decode(sample_b), batch)_b, the sample's gradient through its last `grad_steps` steps.
    `reward` and `vae` may be given directly (tests, notebooks); otherwise the config builds them.
    """

    name = "draft"
    required_roles = ("generator",)
    trainable_roles = ("generator",)
    sequence_parallel = False  # the rollout runs the generator through its KV cache with gradient
    defaults: dict[str, Any] = {
        "steps": list(DEFAULT_STEPS),  # the student's sampling timesteps (as it streams)
        "grad_steps": 1,  # K: the last K sampling steps carry gradient (DRaFT-K)
        "frames": "first",  # first: reward on the decoded first frame; all: on every decoded frame
        "reward": "pose",  # pose (the world's keypoint network) or preference (an image-text model, HPSv2-style)
        "keypoint_net": "assets/world_keypoints",  # pose reward: the network (folder or .safetensors)
        "keypoint_threshold": 0.5,  # pose reward: a target joint counts where its heatmap peak reaches this
        "reward_model": None,  # preference reward: a transformers CLIPModel folder with its tokenizer
        "reward_prompt": "a person is dancing",  # preference reward: the text every sample is scored against
        "reward_scale": 1.0,  # preference reward: x cosine (HPSv2's score is the cosine itself)
        "vae": "assets/toy_vae",  # the decoder (utils.encoders.wan_wrapper.WanVAE: diffusers folder or Wan2.1_VAE.pth)
        "vae_dtype": "fp32",  # the decode's dtype (fp32 or bf16); it runs with gradient wrt the latents
    }

    def __init__(self, cfg: Any, roles: dict[str, nn.Module], ctx: TrainContext, reward: Reward | None = None,
                 vae: nn.Module | None = None):  # fmt: skip
        super().__init__(cfg, roles, ctx)
        self.opts = o = {**self.defaults, **dict(cfg or {})}
        self.steps = [float(s) for s in o["steps"]]
        self.grad_steps = int(o["grad_steps"])
        if not 1 <= self.grad_steps <= len(self.steps):
            raise ValueError(f"objective.grad_steps={self.grad_steps} must be in [1, {len(self.steps)}] (the steps)")
        if o["frames"] not in FRAMES:
            raise ValueError(f"objective.frames={o['frames']!r}: expected one of {FRAMES}")
        if o["vae_dtype"] not in ("fp32", "bf16"):
            raise ValueError(f"objective.vae_dtype={o['vae_dtype']!r}: expected fp32 or bf16")
        if not isinstance(roles["generator"], CausalWanModel):
            raise TypeError("draft fine-tunes the causal student: roles.generator must be a causal preset")
        if vae is None:
            from utils.encoders.wan_wrapper import WanVAE

            vae = WanVAE(repo_path(o["vae"]), device=ctx.device, dtype=DTYPES[o["vae_dtype"]])
        self.vae = vae.requires_grad_(False)
        self.reward = reward if reward is not None else build_reward(o, ctx.device)

    def sample(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The generator's clean latents [B, 16, F', H, W] as it streams (F' = one block for frames=first), the
        gradient through each block's last grad_steps steps."""
        generator = self.roles["generator"]
        _, _, f, h, w = latent_shape(generator, batch)
        frames = f if self.opts["frames"] == "all" else min(generator.num_frame_per_block, f)
        policy = few_step(self.steps, self.ctx.randn, None, self.grad_steps)
        blocks = block_rollout(generator, conditions(generator, batch), frames, (h, w), policy,
                               cache_dtype=self.ctx.dtype)  # fmt: skip
        return torch.cat([x0 for _, x0 in blocks], dim=2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> frames [B, 3, F, H, W] in [-1, 1] (first: latent frame 0 -> frame 0), with
        gradient (the whole-clip decode, equal to WanVAE.decode)."""
        if self.opts["frames"] == "first":
            latents = latents[:, :, :1]
        z = self.vae.denormalize(latents).to(self.vae.dtype)
        return decode(self.vae.vae, z).float()

    def train_step(self, batch: dict[str, torch.Tensor], iteration: int, due: tuple[str, ...]) -> StepOutput:
        frames = self.decode(self.sample(batch))
        reward = self.reward(frames, batch)  # [B]
        if reward.shape != (frames.shape[0],):
            raise ValueError(f"the reward returned shape {tuple(reward.shape)}; a reward gives one value per sample")
        return StepOutput({"generator": -reward.mean()}, {"reward": reward.detach().mean()})
