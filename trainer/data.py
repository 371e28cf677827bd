"""Training data in the batch layout of trainer/objective.py, and the per-iteration batch selection.

The batch of an iteration is a pure function of (seed, iteration, rank): no iterator state, so a resumed
run continues with exactly the batches a straight run would have seen, and N ranks with batch b see the
same global batch as one process with batch N*b.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from utils.config import ConfigError
from utils.safetensors_io import load_file, open_safetensors
from utils.scheduler import add_noise
from wan.configs import get_config

log = logging.getLogger(__name__)


class SyntheticPoseDataset(Dataset):
    """Deterministic random samples for a network config: every key of the batch layout, plus an ODE
    trajectory along the straight flow path (what a perfect teacher would produce) at `ode_steps`."""

    def __init__(
        self,
        net_cfg: dict[str, Any],
        num_samples: int,
        latent_frames: int,
        latent_size: tuple[int, int],
        ode_steps: list[float],
        seed: int = 0,
    ):
        self.cfg, self.num_samples, self.frames = net_cfg, num_samples, latent_frames
        self.size, self.ode_steps, self.seed = tuple(latent_size), list(ode_steps), seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + index)
        c, f, (h, w) = self.cfg, self.frames, self.size
        text_tokens = min(8, c["text_len"])
        y_channels = c["in_dim"] - c["out_dim"]
        latents = torch.randn(c["out_dim"], f, h, w, generator=g)
        y = torch.zeros(y_channels, f, h, w)
        if y_channels:
            y[:4, 0] = 1.0  # the reference-frame mask
            y[4:, 0] = latents[: y_channels - 4, 0]  # its latent (the reference frame is the clip's first)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.tensor(self.ode_steps)
        states = [add_noise(latents[None], noise[None], ti.view(1))[0] for ti in t]
        return {
            "latents": latents,
            "context": torch.randn(text_tokens, c["text_dim"], generator=g),
            "neg_context": torch.randn(text_tokens, c["text_dim"], generator=g) * 0.1,
            "clip_fea": torch.randn(7, c["clip_dim"], generator=g),
            "y": y,
            "pose": torch.rand(3, 4 * f - 3, 8 * h, 8 * w, generator=g) * 255,
            "ref_pose": torch.rand(3, 8 * h, 8 * w, generator=g) * 255,
            "ode_latents": torch.stack(states + [latents]),  # [S+1, C, F, H, W], the last one clean
            "ode_t": torch.cat([t, torch.zeros(1)]),
        }


class TensorFolderDataset(Dataset):
    """A folder of samples, one safetensors file each, whose tensors use the batch layout's keys
    (scripts/generate_ode_pairs.py and the preprocessing scripts write these)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"data.path={self.folder} is not a folder of *.safetensors samples")
        self.files = sorted(self.folder.glob("*.safetensors"))
        if not self.files:
            raise ValueError(
                f"data.path={self.folder} holds no *.safetensors samples: generate them first "
                "(scripts/generate_ode_pairs.py for ode_pairs) or point data.path at the right folder"
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = load_file(self.files[index])
        return {k: v.float() if v.dtype == torch.uint8 else v for k, v in sample.items()}  # pose frames, 0..255


class TooManyBadSamples(ConfigError):
    """More of data.path is unreadable than data.max_bad_fraction allows."""


class CheckedSamples(Dataset):
    """A folder dataset whose unreadable samples are skipped instead of crashing the run.

    Up front, every file's safetensors header is read (cheap: no tensor data): empty, truncated and non-safetensors
    files, and files whose keys differ from the most common key set, are left out. A sample that still fails
    when it is loaded (or holds NaN/inf) is replaced by the next readable one, so the batch of an iteration stays
    a pure function of the files (resume and N-rank runs agree). Every skip is a warning naming the file with
    the running count; more than `max_bad_fraction` of the files bad stops the run with TooManyBadSamples.
    """

    def __init__(self, dataset: Dataset, files: list[Path], max_bad_fraction: float, required: tuple[str, ...] = ()):
        self.dataset, self.files, self.max_bad_fraction = dataset, list(files), max_bad_fraction
        self.bad: dict[int, str] = {}  # index into files -> problem
        keys: dict[int, frozenset[str]] = {}
        for i, path in enumerate(self.files):
            try:
                with open_safetensors(path) as f:
                    keys[i] = frozenset(f.keys())
            except Exception as err:  # any header the reader rejects: the file is not a usable sample
                self._mark(i, _one_line(err).replace(f"{path}: ", "").replace(str(path), "the file"), check=False)
        counts = Counter(keys.values())
        usual = max(counts, key=lambda k: (counts[k], len(k))) if counts else frozenset()
        for i, have in keys.items():
            lacking = sorted((usual | set(required)) - have)
            if lacking:
                self._mark(i, f"it lacks {lacking}, which the other samples have", check=False)
        self.good = [i for i in range(len(self.files)) if i not in self.bad]
        self._check()
        if self.bad:
            log.warning("data: %d of %d samples in %s are unreadable and skipped (data.max_bad_fraction=%g)",
                        len(self.bad), len(self.files), self.files[0].parent, self.max_bad_fraction)  # fmt: skip

    def _mark(self, i: int, problem: str, check: bool = True) -> None:
        self.bad[i] = problem
        log.warning("data: skipping %s: %s (%d of %d samples bad so far)", self.files[i], problem, len(self.bad),
                    len(self.files))  # fmt: skip
        if check:
            self._check()

    def _check(self) -> None:
        if len(self.bad) <= self.max_bad_fraction * len(self.files) and len(self.bad) < len(self.files):
            return
        shown = "; ".join(f"{self.files[j].name}: {p}" for j, p in list(self.bad.items())[:3])
        raise TooManyBadSamples(
            f"{len(self.bad)} of {len(self.files)} samples in {self.files[0].parent} are unreadable, more than "
            f"data.max_bad_fraction={self.max_bad_fraction:g} allows ({shown}): regenerate or remove them, or raise "
            "data.max_bad_fraction"
        )

    def __len__(self) -> int:
        return len(self.good)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for step in range(len(self.good)):
            i = self.good[(index + step) % len(self.good)]
            if i in self.bad:
                continue
            try:
                sample = self.dataset[i]
                nonfinite = [k for k, v in sample.items() if v.is_floating_point() and not torch.isfinite(v).all()]
                if nonfinite:
                    raise ValueError(f"non-finite values in {nonfinite}")
                return sample
            except Exception as err:  # safetensors raises its own error type; any failure means a bad file
                self._mark(i, _one_line(err))
        raise TooManyBadSamples(f"no sample in {self.files[0].parent} is readable any more")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


POSE_KEYS = ("pose", "ref_pose")


class CachedDataset(Dataset):
    """Every sample of a dataset held in memory as one stacked tensor per key (uint8 pose frames stay uint8), on
    the CPU or the training device: batches are one index_select per key, with no file reads in the loop. For
    datasets that fit (the synthetic world: ~4.4 MB a clip)."""

    def __init__(self, dataset: Dataset, device: torch.device | str):
        samples = [dataset[i] for i in range(len(dataset))]
        keys = samples[0].keys()
        self.tensors = {k: torch.stack([s[k] for s in samples]).to(device) for k in keys}
        for k in POSE_KEYS:  # integers 0..255: kept as uint8 (4x smaller), float again per batch
            if k in self.tensors:
                self.tensors[k] = self.tensors[k].round().to(torch.uint8)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batch([index], None, squeeze=True)

    def batch(self, ids: list[int], device: torch.device | None, squeeze: bool = False) -> dict[str, torch.Tensor]:
        index = torch.tensor(ids, device=next(iter(self.tensors.values())).device)
        out = {}
        for k, v in self.tensors.items():
            value = v.index_select(0, index).to(device) if device is not None else v.index_select(0, index)
            value = value.float() if value.dtype == torch.uint8 else value
            out[k] = value[0] if squeeze else value
        return out


def build_dataset(
    data_cfg: Any, generator_preset: str | None, seed: int, device: torch.device | None = None
) -> Dataset:
    """The dataset of data.type, held in memory (data.cache=memory) or on the training device (device) if asked."""
    dataset = _build_dataset(data_cfg, generator_preset, seed)
    if data_cfg.cache in ("memory", "device"):
        return CachedDataset(dataset, device if data_cfg.cache == "device" and device is not None else "cpu")
    if data_cfg.cache is not None:
        raise ValueError(f"data.cache={data_cfg.cache!r}: expected null, memory or device")
    return dataset


def _build_dataset(data_cfg: Any, generator_preset: str | None, seed: int) -> Dataset:
    if data_cfg.type == "synthetic":
        if generator_preset is None:
            raise ValueError("data.type=synthetic sizes its tensors from roles.generator.preset; set it")
        return SyntheticPoseDataset(
            get_config(generator_preset), data_cfg.num_samples, data_cfg.latent_frames,
            tuple(data_cfg.latent_size), list(data_cfg.ode_steps), seed,
        )  # fmt: skip
    if data_cfg.type in ("ode_pairs", "latents"):
        if data_cfg.path is None:
            raise ValueError(f"data.type={data_cfg.type} needs data.path (a folder of samples)")
        fraction = float(data_cfg.get("max_bad_fraction", 0.0))
        if data_cfg.type == "ode_pairs":  # checks the generation manifest, returns pose frames as float
            from pipeline.ode_pairs import ODEPairDataset

            pairs = ODEPairDataset(data_cfg.path)
            return CheckedSamples(pairs, pairs.files, fraction, required=("ode_latents", "ode_t"))
        folder = TensorFolderDataset(data_cfg.path)
        return CheckedSamples(folder, folder.files, fraction)
    raise ValueError(f"data.type={data_cfg.type!r}: expected synthetic, ode_pairs or latents")


def global_indices(num_samples: int, iteration: int, global_batch: int, seed: int, shuffle: bool) -> list[int]:
    """The dataset indices of one iteration's global batch (epochs reshuffled with a per-epoch seed)."""
    out = []
    position = iteration * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(position, num_samples)
        order = (
            torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
            if shuffle
            else list(range(num_samples))
        )
        take = min(global_batch - len(out), num_samples - offset)
        out.extend(order[offset : offset + take])
        position += take
    return out


def local_batch(
    dataset: Dataset, ids: list[int], device: torch.device, float_dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Stack the samples `ids` into a batch on the device (floating tensors cast to float_dtype if given)."""
    if isinstance(dataset, CachedDataset):
        batch = dataset.batch(ids, device)
        return {k: v.to(float_dtype) if float_dtype is not None and v.is_floating_point()
                and k not in ("ode_t", "pose", "ref_pose") else v for k, v in batch.items()}  # fmt: skip
    samples = [dataset[i] for i in ids]
    keys = samples[0].keys()
    missing = [k for k in keys if any(k not in s for s in samples)]
    if missing:
        raise ValueError(f"samples disagree on their keys (e.g. {missing[:3]}): regenerate the dataset")
    batch = {}
    for key in keys:
        value = torch.stack([s[key] for s in samples]).to(device)
        if float_dtype is not None and value.is_floating_point() and key not in ("ode_t", "pose", "ref_pose"):
            value = value.to(float_dtype)
        batch[key] = value
    return batch
