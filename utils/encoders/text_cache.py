"""Prompt embeddings cached on disk, so the 11 GB T5 is not even loaded for prompts already seen.

One safetensors file per prompt, named by a hash of (cleaned prompt, text_len, encoder identity), holding
the embeddings up to the prompt's length; written atomically, so concurrent ranks can share the folder.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from utils.encoders.wan_wrapper import PathLike, TextEncoder, clean_prompt, text_encoder_identity
from utils.safetensors_io import atomic_save_safetensors, load_file

logger = logging.getLogger(__name__)


def prompt_key(prompt: str, text_len: int, identity: str) -> str:
    """The cache file stem of a prompt: sha256 of the cleaned prompt, text_len and the encoder identity."""
    payload = "\0".join((clean_prompt(prompt), str(text_len), identity))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class CachedTextEncoder:
    """TextEncoder behind an on-disk cache; the encoder is built only when a prompt is missing."""

    def __init__(
        self,
        cache_dir: PathLike,
        checkpoint: PathLike,
        tokenizer_path: PathLike,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        text_len: int = 512,
        **encoder_kwargs,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.identity = text_encoder_identity(checkpoint, tokenizer_path, dtype)
        self.device, self.dtype, self.text_len = torch.device(device), dtype, text_len
        self._encoder_args = (checkpoint, tokenizer_path)
        self._encoder_kwargs = dict(device=device, dtype=dtype, text_len=text_len, **encoder_kwargs)
        self.encoder: TextEncoder | None = None

    def _path(self, prompt: str) -> Path:
        return self.cache_dir / f"{prompt_key(prompt, self.text_len, self.identity)}.safetensors"

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> [B, text_len, D] embeddings, zero past each prompt's length."""
        paths = [self._path(p) for p in prompts]
        todo = {path: prompt for path, prompt in zip(paths, prompts, strict=True) if not path.exists()}
        if todo:
            if self.encoder is None:
                logger.info("text cache: %d new prompt(s), loading the text encoder", len(todo))
                self.encoder = TextEncoder(*self._encoder_args, **self._encoder_kwargs)
            context, lengths = self.encoder.encode(list(todo.values()))  # [N, text_len, D], [N]
            for path, prompt, emb, length in zip(todo, todo.values(), context, lengths.tolist(), strict=True):
                atomic_save_safetensors(
                    {"context": emb[:length].cpu()}, path, metadata={"prompt": clean_prompt(prompt)}
                )
        out = []
        for path in paths:
            emb = load_file(path)["context"]  # [L, D]
            padded = emb.new_zeros(self.text_len, emb.shape[-1])
            padded[: emb.shape[0]] = emb
            out.append(padded)
        return torch.stack(out).to(device=self.device, dtype=self.dtype)  # [B, text_len, D]
