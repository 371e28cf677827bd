"""Write the synthetic world's text and image encoders (assets/world_encoders/): a 2-layer UMT5 encoder over a
word-level tokenizer of the world's caption vocabulary, and a 2-layer CLIP vision tower, both with random weights
from a fixed seed. They are shipped, so every machine embeds the same prompt and reference image identically;
this script documents (and can rebuild) them. They load through utils.encoders.wan_wrapper like the real UMT5 and CLIP.

    python scripts/make_world_encoders.py --out assets/world_encoders
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel  # noqa: E402

from utils.encoders.tiny_assets import make_tokenizer  # noqa: E402
from utils.world.synthetic_pose import prompt_vocabulary  # noqa: E402

TEXT_DIM = 64  # the world presets' text_dim
CLIP_DIM = 64  # the world presets' clip_dim
TEXT_LEN = 32  # the world presets' text_len (captions have at most 23 words + </s>)


def world_umt5_config(vocab_size: int) -> UMT5Config:
    return UMT5Config(
        vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=16, relative_attention_max_distance=64, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
    )  # fmt: skip


def world_clip_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=CLIP_DIM, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=56,
        patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("assets/world_encoders"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    words = prompt_vocabulary()
    torch.manual_seed(args.seed)
    UMT5EncoderModel(world_umt5_config(len(words) + 3)).save_pretrained(args.out / "text_encoder")
    make_tokenizer(args.out / "tokenizer", words)
    CLIPVisionModel(world_clip_config()).save_pretrained(args.out / "image_encoder")
    print(f"wrote {args.out}: text_encoder, tokenizer ({len(words)} words), image_encoder")


if __name__ == "__main__":
    main()
