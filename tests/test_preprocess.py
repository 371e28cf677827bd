"""From the synthetic world to training: clips -> scripts/preprocess_data.py (tiny VAE, CLIP and T5 with random
weights, loaded through the real wrappers) -> samples in the batch layout -> a training stage runs on them."""

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file
from transformers import CLIPVisionModel, UMT5EncoderModel

from model import objective_registry
from scripts import make_toy_dataset, preprocess_data
from trainer.objective import objective_defaults
from trainer.trainer import Trainer
from utils.config import ROOT, load_config
from utils.encoders.tiny_assets import TINY_VAE_CONFIG, make_tokenizer, tiny_clip_config, tiny_umt5_config
from wan.configs import get_config


def test_world_to_latents_to_training(tmp_path):
    tiny = get_config("tiny")
    torch.manual_seed(0)
    AutoencoderKLWan(**TINY_VAE_CONFIG).save_pretrained(tmp_path / "vae")
    clip_cfg = tiny_clip_config()
    clip_cfg.hidden_size = tiny["clip_dim"]
    CLIPVisionModel(clip_cfg).save_pretrained(tmp_path / "clip")
    t5_cfg = tiny_umt5_config()
    t5_cfg.d_model = tiny["text_dim"]
    UMT5EncoderModel(t5_cfg).save_pretrained(tmp_path / "t5")
    make_tokenizer(tmp_path / "tokenizer")
    assert make_toy_dataset.main(["--out", str(tmp_path / "clips"), "--num-samples", "2", "num_frames=9",
                                  "height=64", "width=64"]) == 0  # fmt: skip
    args = ["--data", str(tmp_path / "clips"), "--out", str(tmp_path / "latents"), "--device", "cpu",
            "--vae", str(tmp_path / "vae"), "--clip", str(tmp_path / "clip"), "--t5", str(tmp_path / "t5"),
            "--t5-tokenizer", str(tmp_path / "tokenizer"), "--text-cache", str(tmp_path / "cache"),
            "--text-len", str(tiny["text_len"])]  # fmt: skip
    preprocess_data.main(args)
    files = sorted((tmp_path / "latents").glob("*.safetensors"))
    assert len(files) == 2
    sample = load_file(files[0])
    assert sample["latents"].shape == (16, 3, 8, 8) and sample["y"].shape == (20, 3, 8, 8)
    assert torch.equal(sample["y"][:4, 0], torch.ones(4, 8, 8)) and sample["y"][:4, 1:].abs().sum() == 0
    assert sample["clip_fea"].shape[-1] == tiny["clip_dim"] and sample["context"].shape == (16, tiny["text_dim"])
    assert sample["pose"].dtype == torch.uint8 and sample["pose"].shape == (3, 9, 64, 64)
    mtime = files[0].stat().st_mtime_ns
    preprocess_data.main(args)  # resumable: nothing redone
    assert files[0].stat().st_mtime_ns == mtime

    registry = objective_registry()
    overrides = ["model=tiny", "data.type=latents", f"data.path={tmp_path / 'latents'}", "train.dtype=fp32",
                 "train.gradient_checkpointing=false", "train.iterations=2",
                 f"run.output_dir={tmp_path / 'runs'}"]  # fmt: skip
    cfg = load_config(ROOT / "configs" / "stages" / "pose_finetune.yaml", overrides, objective_defaults(registry))
    history = Trainer(cfg, registry).train()
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss/generator"])) for h in history)
