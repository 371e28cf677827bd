"""Faults and bad input (issue 20): each numbered case of the issue reproduced and its new behaviour asserted, and a
fault-injection test that kills a tiny training run at random points (SIGKILL) and checks that resuming gives the
straight run's losses and exported weights. docs/reliability.md is the table of these cases."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import io
import json
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _toy_objectives import REGISTRY, ToyTwoRoles
from safetensors.torch import load_file, save_file

import inference
import train as train_script
from scripts import extract_net_weights, merge_lora, preprocess_data
from trainer.data import SyntheticPoseDataset
from trainer.objective import objective_defaults
from trainer.trainer import Trainer
from utils.config import ConfigError, load_config
from utils.safetensors_io import atomic_save_safetensors
from wan.configs import build_model, get_config

ROOT = Path(__file__).resolve().parents[1]
DMD = str(ROOT / "configs" / "stages" / "dmd.yaml")
DMD_TINY = ["model=tiny", "data.type=synthetic", "train.dtype=fp32", "train.gradient_checkpointing=false",
            "train.iterations=1", "data.latent_frames=3"]  # fmt: skip
FAST = ["model=tiny", "data.latent_frames=3", "data.latent_size=[4,4]", "data.num_samples=4", "train.batch_size=1",
        "train.log_every=100", "roles.generator.lr=1e-3", "roles.critic.lr=1e-3"]  # fmt: skip
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


class LateGenerator(ToyTwoRoles):
    """The critic from iteration 0, the generator only from iteration 2: checkpoints before then hold an
    optimizer that has never stepped."""

    name = "late_generator"

    def due(self, iteration):
        return ("generator", "critic") if iteration >= 2 else ("critic",)


REGISTRY = {**REGISTRY, LateGenerator.name: LateGenerator}


def make_cfg(root, *overrides, stage="toy"):
    return load_config(
        None, [f"stage={stage}", f"run.output_dir={root}", *FAST, *overrides], objective_defaults(REGISTRY)
    )


def train(root, *overrides, stage="toy"):
    trainer = Trainer(make_cfg(root, *overrides, stage=stage), REGISTRY)
    return trainer, trainer.train()


def weights(trainer: Trainer, role: str = "generator") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.roles[role].state_dict().items()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol, msg=key)


def rehash(step: Path) -> None:
    """Rewrite a checkpoint's manifest to match its current files, in the manifest's own format: what a crafted
    folder (or a writer that hashed damaged data) carries, so only reading the files can tell."""
    manifest = json.loads((step / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (step / name).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        manifest["files"][name] = {"size": len(data), "sha256": sha} if isinstance(entry, dict) else len(data)
    (step / "manifest.json").write_text(json.dumps(manifest))


def one_line_exit(exit_info) -> str:
    message = str(exit_info.value.code)
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.fixture
def run4(tmp_path):
    """A toy run of 4 iterations with checkpoints after 2 and 4, and a straight 2-iteration reference run."""
    reference, _ = train(tmp_path / "ref", "train.iterations=2")
    train(tmp_path / "run", "train.iterations=4", "train.save_every=2", "train.keep_last=3")
    ckpts = tmp_path / "run" / "toy" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004"]
    return tmp_path / "run", ckpts, weights(reference)


# ------------------------------------------------------------------------------------------ 1. --resume PATH


def test_1_resume_path_loads_exactly_that_checkpoint(run4):
    root, ckpts, at_step_2 = run4
    newest = (ckpts / "step_00000004" / "__0_0.distcp").read_bytes()
    trainer = Trainer(make_cfg(root, "train.iterations=4", f"run.resume={ckpts / 'step_00000002'}"), REGISTRY)
    assert trainer.start == 2  # not 4, the newest in the same folder
    assert_same(weights(trainer), at_step_2)
    # the abandoned newer checkpoint is kept aside, out of reach of rotation and of a later --resume auto
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002"]
    assert (ckpts / "superseded" / "step_00000004" / "__0_0.distcp").read_bytes() == newest


def test_1_mistyped_resume_path_fails_naming_it_and_keeps_the_run(run4, tmp_path):
    root, ckpts, _ = run4
    run_dir = root / "toy"
    kept = [run_dir / "config.yaml", run_dir / "metrics.jsonl", *sorted((run_dir / "export").iterdir())]
    before = {p: p.read_bytes() for p in kept}
    typo = run_dir / "checkpints" / "step_00000004"
    with pytest.raises(ConfigError, match=rf"run.resume={re.escape(str(typo))}: does not exist"):
        Trainer(make_cfg(root, "train.iterations=6", f"run.resume={typo}"), REGISTRY)
    assert {p: p.read_bytes() for p in kept} == before
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004"]
    # the checkpoints folder instead of a checkpoint: the error lists what it holds
    with pytest.raises(ConfigError, match="holds step_00000002, step_00000004: pass one of them"):
        Trainer(make_cfg(root, "train.iterations=6", f"run.resume={ckpts}"), REGISTRY)
    # the command line: one line, no traceback, nothing written
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(["--config", DMD, *DMD_TINY, f"run.output_dir={tmp_path / 'cli'}", "--resume", str(typo)])
    assert one_line_exit(exit_info).startswith(f"error: run.resume={typo}: does not exist")
    assert not (tmp_path / "cli").exists()


# ------------------------------------------------------------------------------------------ 2. same-size corruption


def test_2_same_size_corruption_is_caught_by_the_checksum_and_the_previous_checkpoint_used(run4, caplog):
    root, ckpts, at_step_2 = run4
    victim = max((ckpts / "step_00000004").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(255 - b for b in data[middle : middle + 16])  # 16 bytes, size unchanged
    victim.write_bytes(bytes(data))
    trainer = Trainer(make_cfg(root, "train.iterations=4", "run.resume=auto"), REGISTRY)
    assert trainer.start == 2
    assert_same(weights(trainer), at_step_2)
    assert f"{victim.name} does not match its sha256" in caplog.text
    with pytest.raises(ConfigError, match=r"step_00000004: .*__0_0.distcp does not match its sha256"):
        Trainer(make_cfg(root, "train.iterations=4", f"run.resume={ckpts / 'step_00000004'}"), REGISTRY)


# ------------------------------------------------------------------------------------------ 3. read errors fall back


def test_3_unreadable_checkpoint_falls_back_to_the_previous_one(run4, caplog):
    root, ckpts, at_step_2 = run4
    victim = ckpts / "step_00000004" / "__0_0.distcp"
    victim.write_bytes(b"\0" * 64 + victim.read_bytes()[64:])  # the first tensor's zip header is gone
    rehash(victim.parent)  # checksums agree: only DCP's read can tell, and it raises a BaseException
    trainer = Trainer(make_cfg(root, "train.iterations=4", "run.resume=auto"), REGISTRY)
    assert trainer.start == 2
    assert_same(weights(trainer), at_step_2)
    assert "step_00000004 cannot be read (CheckpointException" in caplog.text
    # every checkpoint unreadable: an error, not a fresh start over them
    other = ckpts / "step_00000002" / "__0_0.distcp"
    other.write_bytes(b"\0" * 64 + other.read_bytes()[64:])
    rehash(ckpts / "step_00000002")
    with pytest.raises(ConfigError, match="none of the checkpoints in .* can be loaded .*nothing was started"):
        Trainer(make_cfg(root, "train.iterations=4", "run.resume=auto"), REGISTRY)


# ------------------------------------------------------------------------------------------ 4. crafted checkpoints


class Payload:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def plant_in_metadata(step: Path, marker: Path) -> None:
    (step / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    rehash(step)


def plant_in_bytes_entry(step: Path, marker: Path) -> None:
    """Point a non-tensor entry (the optimizer's lr) at a torch.save'd payload appended to the data file."""
    metadata = pickle.loads((step / ".metadata").read_bytes())  # the attacker may unpickle their own file
    key = next(k for k in metadata.storage_data if k.fqn == "optimizers.generator.param_groups.0.lr")
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    info = metadata.storage_data[key]
    data_file = step / info.relative_path
    offset = data_file.stat().st_size
    data_file.write_bytes(data_file.read_bytes() + buffer.getvalue())
    metadata.storage_data[key] = dataclasses.replace(info, offset=offset, length=len(buffer.getvalue()))
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    rehash(step)


@pytest.mark.parametrize("plant", [plant_in_metadata, plant_in_bytes_entry])
def test_4_crafted_checkpoint_does_not_run_code_on_resume(run4, tmp_path, caplog, plant):
    root, ckpts, at_step_2 = run4
    marker = tmp_path / "pwned"
    plant(ckpts / "step_00000004", marker)
    trainer = Trainer(make_cfg(root, "train.iterations=4", "run.resume=auto"), REGISTRY)
    assert not marker.exists()
    assert trainer.start == 2  # the crafted checkpoint was refused, the previous one loaded
    assert_same(weights(trainer), at_step_2)
    assert "refusing to load" in caplog.text and "exec" in caplog.text


def test_4_crafted_checkpoint_does_not_run_code_on_extraction(run4, tmp_path, caplog):
    _, ckpts, _ = run4
    marker, out = tmp_path / "pwned", tmp_path / "gen.safetensors"
    plant_in_metadata(ckpts / "step_00000004", marker)
    argv = ["--checkpoint", str(ckpts / "step_00000004"), "--role", "generator", "--out", str(out)]
    assert extract_net_weights.main(argv) == 2
    assert not marker.exists() and not out.exists()
    assert "refusing to load global builtins.exec" in caplog.text


# ------------------------------------------------------------------------------------------ 5. corrupt samples


def latent_folder(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` training samples (the tiny preset's batch layout) as data.type=latents files."""
    dataset = SyntheticPoseDataset(get_config("tiny"), count, 3, (4, 4), [1000.0, 500.0], seed)
    files = [folder / f"{i:04d}.safetensors" for i in range(count)]
    for i, path in enumerate(files):
        atomic_save_safetensors(dataset[i], path)
    return files


def losses(history: list[dict]) -> list[float]:
    return [h["loss/generator"] for h in history]


def assert_same_losses(got: list[dict], want: list[dict]) -> None:
    """Every role's loss of every iteration, equal within 1e-7 (roles not due have none, in both)."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        keys = sorted(k for k in b if k.startswith("loss/"))
        assert sorted(k for k in a if k.startswith("loss/")) == keys
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-7), (b["iteration"], key)


def test_5_corrupt_samples_are_skipped_naming_the_file_and_counted(tmp_path, caplog):
    good = latent_folder(tmp_path / "good", 6)
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "good", mixed)
    data = good[0].read_bytes()
    bad = {
        "0000a.safetensors": data[: len(data) // 2],  # truncated
        "0001a.safetensors": random.Random(0).randbytes(4096),  # random bytes
        "0002a.safetensors": b"",  # empty
    }
    for name, content in bad.items():
        (mixed / name).write_bytes(content)
    sample = load_file(good[1])
    del sample["context"]
    save_file(sample, mixed / "0003a.safetensors")  # a key missing
    common = ["data.type=latents", "train.iterations=4", "train.batch_size=2"]
    _, clean = train(tmp_path / "a", *common, f"data.path={tmp_path / 'good'}")
    caplog.clear()
    _, skipped = train(tmp_path / "b", *common, f"data.path={mixed}", "data.max_bad_fraction=0.5")
    assert losses(skipped) == pytest.approx(losses(clean), abs=1e-7)  # exactly the clean files' batches
    for name in [*bad, "0003a.safetensors"]:
        assert f"skipping {mixed / name}" in caplog.text
    assert "it lacks ['context']" in caplog.text and "(4 of 10 samples bad so far)" in caplog.text
    assert f"4 of 10 samples in {mixed} are unreadable and skipped" in caplog.text
    with pytest.raises(ConfigError, match=r"4 of 10 samples in .*mixed are unreadable, more than "
                                          r"data.max_bad_fraction=0.2 allows \(0000a.safetensors: "):  # fmt: skip
        Trainer(make_cfg(tmp_path / "c", *common, f"data.path={mixed}", "data.max_bad_fraction=0.2"), REGISTRY)


def test_5_sample_that_fails_when_loaded_is_replaced_by_the_next(tmp_path, caplog):
    files = latent_folder(tmp_path / "data", 6)
    sample = load_file(files[2])
    sample["latents"][0, 0, 0, 0] = float("nan")  # a valid file whose contents are not
    save_file(sample, files[2])
    _, history = train(tmp_path, "data.type=latents", f"data.path={tmp_path / 'data'}", "train.iterations=3",
                       "train.batch_size=2", "data.max_bad_fraction=0.2")  # fmt: skip
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(losses(history))))
    assert f"skipping {files[2]}: non-finite values in ['latents'] (1 of 6 samples bad so far)" in caplog.text


def test_5_preprocess_names_the_bad_clips_and_finishes_the_good_ones(tmp_path, caplog):
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionModel, UMT5EncoderModel

    from scripts import make_toy_dataset
    from utils.encoders.tiny_assets import TINY_VAE_CONFIG, make_tokenizer, tiny_clip_config, tiny_umt5_config

    tiny = get_config("tiny")
    AutoencoderKLWan(**TINY_VAE_CONFIG).save_pretrained(tmp_path / "vae")
    clip_cfg, t5_cfg = tiny_clip_config(), tiny_umt5_config()
    clip_cfg.hidden_size, t5_cfg.d_model = tiny["clip_dim"], tiny["text_dim"]
    CLIPVisionModel(clip_cfg).save_pretrained(tmp_path / "clip")
    UMT5EncoderModel(t5_cfg).save_pretrained(tmp_path / "t5")
    make_tokenizer(tmp_path / "tokenizer")
    clips = tmp_path / "clips"
    assert make_toy_dataset.main(["--out", str(clips), "--num-samples", "3", "num_frames=5", "height=32",
                                  "width=32"]) == 0  # fmt: skip
    (clips / "000001" / "video.mp4").write_bytes(b"not a video" * 50)
    (clips / "000002" / "pose.mp4").unlink()
    assets = {"--vae": "vae", "--clip": "clip", "--t5": "t5", "--t5-tokenizer": "tokenizer", "--text-cache": "cache"}
    args = ["--data", str(clips), "--out", str(tmp_path / "latents"), "--device", "cpu"]
    args += ["--text-len", str(tiny["text_len"])]
    args += [x for flag, name in assets.items() for x in (flag, str(tmp_path / name))]
    with pytest.raises(SystemExit) as exit_info:
        preprocess_data.main(args)
    assert one_line_exit(exit_info).startswith("2 of 3 clips could not be read and were skipped")
    assert [p.name for p in (tmp_path / "latents").iterdir()] == ["000000.safetensors"]
    assert str(clips / "000001" / "video.mp4") in caplog.text and str(clips / "000002" / "pose.mp4") in caplog.text


# ------------------------------------------------------------------------------------------ 6. one run per folder


_FORKSERVER = None


def forkserver():
    """Child processes forked from a clean server that has imported this module: fast to start, and safe (a plain
    fork of a process whose OpenMP pool has run can hang)."""
    global _FORKSERVER
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload([__name__])
        # The server imports the preload through PYTHONPATH (Python 3.11's server ignores the sys.path it is given)
        here = os.pathsep.join([str(ROOT), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = here
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
    return _FORKSERVER


def _hold_run_folder(root: str, ready, release) -> None:
    trainer = Trainer(make_cfg(root, "train.iterations=1"), REGISTRY)  # holds the folder while it exists
    ready.set()
    release.wait(120)
    del trainer


def test_6_a_second_run_into_a_busy_folder_is_refused(tmp_path):
    ctx = forkserver()
    ready, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold_run_folder, args=(str(tmp_path), ready, release))
    other.start()
    try:
        assert ready.wait(120)
        config = (tmp_path / "toy" / "config.yaml").read_bytes()
        with pytest.raises(ConfigError, match=rf"run folder .*toy is in use by pid {other.pid} on host "
                                              rf"{re.escape(socket.gethostname())}"):  # fmt: skip
            Trainer(make_cfg(tmp_path, "train.iterations=2", "train.save_every=1"), REGISTRY)
        assert (tmp_path / "toy" / "config.yaml").read_bytes() == config and not (
            tmp_path / "toy" / "checkpoints"
        ).exists()
    finally:
        release.set()
        other.join(60)
    _, history = train(tmp_path, "train.iterations=2", "run.resume=auto")  # the other run is gone: the folder is free
    assert len(history) == 2


def test_6_stale_lock_of_a_dead_run_is_taken_over_and_its_partial_files_removed(tmp_path, caplog):
    run_dir = tmp_path / "toy"
    partial_save = run_dir / "checkpoints" / ".step_00000007.tmp"
    partial_save.mkdir(parents=True)
    (partial_save / "__0_0.distcp").write_bytes(b"x" * 100)
    partial_export = run_dir / "export" / ".generator.safetensors.abcd1234.tmp"
    partial_export.parent.mkdir()
    partial_export.write_bytes(b"half an export")
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = {"pid": dead.pid, "host": socket.gethostname(), "start": None, "since": time.time()}
    (run_dir / "run.lock").write_text(json.dumps(lock))
    trainer, _ = train(tmp_path, "train.iterations=1")
    assert f"removed the stale lock of pid {dead.pid}" in caplog.text
    assert not partial_save.exists() and not partial_export.exists()
    assert (run_dir / "export" / "generator.safetensors").exists()
    del trainer
    gc.collect()
    assert not (run_dir / "run.lock").exists()  # a finished run gives the folder back

    lock.update(host="another-host", pid=1)  # a lock from another machine cannot be checked: refused, with the fix
    (tmp_path / "other" / "toy").mkdir(parents=True)
    (tmp_path / "other" / "toy" / "run.lock").write_text(json.dumps(lock))
    with pytest.raises(ConfigError, match=r"pid 1 on host another-host .*if that run is dead, delete .*run.lock"):
        Trainer(make_cfg(tmp_path / "other", "train.iterations=1"), REGISTRY)


# ------------------------------------------------------------------------------------------ 7. config values


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.grad_accum=0", "train.grad_accum=0 must be >= 1"),
        ("train.iterations=-3", "train.iterations=-3 must be >= 1"),
        ("train.iterations=abc", "train.iterations='abc' must be an integer"),
        ("train.batch_size=0", "train.batch_size=0 must be >= 1"),
        ("train.save_every=0", "train.save_every=0 must be >= 1"),
        ("roles.generator.lr=nan", "roles.generator.lr='nan' must be a number"),
        ("roles.critic.lr=.nan", "roles.critic.lr=nan must be a finite number > 0"),
        ("roles.generator.lr=-1e-4", "roles.generator.lr=-0.0001 must be a finite number > 0"),
    ],
)
def test_7_bad_values_are_one_line_errors_before_anything_is_built(tmp_path, override, needle):
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(["--config", DMD, *DMD_TINY, f"run.output_dir={tmp_path}", override])
    assert one_line_exit(exit_info).startswith(f"config error: {needle}")
    assert not any(tmp_path.iterdir())  # no run folder: nothing was built or written


def test_7_broken_yaml_is_named_with_file_and_line(tmp_path):
    stage = tmp_path / "stage.yaml"
    stage.write_text("stage: dmd\nmodel: tiny\ntrain:\n  iterations: 3\n   batch_size: 1\n")
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(["--config", str(stage), f"run.output_dir={tmp_path / 'runs'}"])
    assert one_line_exit(exit_info).startswith(f"config error: {stage}:5:")
    assert "not valid YAML" in one_line_exit(exit_info)


def test_7_resume_auto_on_a_fresh_folder_equals_a_fresh_run(tmp_path):
    common = ["train.iterations=3", "roles.generator.betas=[0.9,0.99]"]
    fresh, hist_fresh = train(tmp_path / "fresh", *common)
    auto, hist_auto = train(tmp_path / "auto", *common, "run.resume=auto")
    assert losses(hist_auto) == pytest.approx(losses(hist_fresh), abs=1e-7)
    assert_same(weights(auto), weights(fresh))
    steps = [float(s["step"]) for t in (fresh, auto) for s in t.optimizers["generator"].state.values()]
    assert set(steps) == {3.0}  # AdamW counted 3 steps in both runs (not 4 after a zero-lr warm-up step)


def test_7_saving_before_an_optimizers_first_step_does_not_change_its_step_count(tmp_path):
    common = ["train.iterations=4", "roles.generator.betas=[0.9,0.99]"]
    once, hist_once = train(tmp_path / "once", *common, stage="late_generator")  # saved only at the end
    every, hist_every = train(tmp_path / "every", *common, "train.save_every=1", "train.keep_last=4",
                              stage="late_generator")  # fmt: skip
    assert_same_losses(hist_every, hist_once)
    assert_same(weights(every), weights(once))
    ckpts = tmp_path / "every" / "late_generator" / "checkpoints"
    unstepped = [json.loads((ckpts / f"step_0000000{i}" / "manifest.json").read_text())["unstepped_optimizers"]
                 for i in (1, 2, 3, 4)]  # fmt: skip
    assert unstepped == [["generator"], ["generator"], [], []]
    shutil.rmtree(ckpts / "step_00000004")
    shutil.rmtree(ckpts / "step_00000003")
    resumed, hist_resumed = train(tmp_path / "every", *common, "train.save_every=1", "run.resume=auto",
                                  stage="late_generator")  # fmt: skip
    assert resumed.start == 2
    assert_same_losses(hist_resumed, hist_once[2:])
    assert_same(weights(resumed), weights(once))
    steps = {float(s["step"]) for s in resumed.optimizers["generator"].state.values()}
    assert steps == {2.0}  # the generator stepped at iterations 2 and 3 only


# ------------------------------------------------------------------------------------------ 8. inference and scripts


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if inference starts building networks: the error must come before."""

    def started(*args, **kwargs):
        raise AssertionError("the work started before the bad input was reported")

    monkeypatch.setattr(inference, "build_network", started)
    monkeypatch.setattr(inference, "random_networks", started)


def inference_exit(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        inference.main(argv)
    message = one_line_exit(exit_info)
    assert message.startswith("error: "), message
    return message


@pytest.mark.parametrize("kind", ["truncated", "random", "text"])
def test_8_unreadable_weights_are_named_before_any_network_is_built(tmp_path, no_work, kind):
    good = tmp_path / "good.safetensors"
    atomic_save_safetensors(build_model("tiny").state_dict(), good)
    bad = tmp_path / f"{kind}.safetensors"
    content = {"truncated": good.read_bytes()[: good.stat().st_size // 2], "random": random.Random(1).randbytes(5000),
               "text": b"this is not a weight file\n" * 20}[kind]  # fmt: skip
    bad.write_bytes(content)
    assets = []
    for flag in ("--t5", "--t5-tokenizer", "--vae", "--clip"):
        (tmp_path / flag.strip("-")).mkdir()
        assets += [flag, str(tmp_path / flag.strip("-"))]
    config = str(ROOT / "configs/inference/student_1.3b.yaml")
    out = str(tmp_path / "o.mp4")
    message = inference_exit(["--config", config, "--preset", "tiny", "--weights", str(bad), *assets, "--out", out])
    assert message.startswith(f"error: --weights {bad} is not a readable safetensors file") and "again" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_8_device_cuda_without_a_gpu(tmp_path, no_work):
    message = inference_exit(["--device", "cuda", "--out", str(tmp_path / "o.mp4")])
    assert message.startswith("error: --device cuda: torch sees no CUDA GPU here") and "--device cpu" in message


def test_8_unwritable_out_fails_before_the_generation(tmp_path, no_work):
    (tmp_path / "file").write_text("a file, not a folder")
    message = inference_exit(["--out", str(tmp_path / "file" / "video.mp4")])
    assert message == f"error: --out {tmp_path / 'file' / 'video.mp4'}: {tmp_path / 'file'} is a file, not a folder: " \
                      "choose another --out"  # fmt: skip
    message = inference_exit(["--preview", str(tmp_path / "file" / "side.mp4"), "--out", str(tmp_path / "o.mp4")])
    assert message.startswith(f"error: --preview {tmp_path / 'file' / 'side.mp4'}")


def test_8_num_frames_zero_asks_for_a_valid_count(tmp_path, no_work):
    message = inference_exit(["--num-frames", "0", "--out", str(tmp_path / "o.mp4")])
    assert message == "error: --num-frames 0 must be at least 1: use 1 + 4k frames (1, 5, 9, ..., 81)"
    assert inference_exit(["--num-frames", "7", "--out", str(tmp_path / "o.mp4")]).endswith("use 5 or 9")


def _wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_8_sigterm_leaves_no_temp_folder_and_a_later_run_removes_a_killed_ones(tmp_path, monkeypatch):
    temp = tmp_path / "tmp"
    temp.mkdir()
    out = tmp_path / "out" / "video.mp4"
    env = dict(os.environ, TMPDIR=str(temp), OMP_NUM_THREADS="1")
    tiny = ["--config", str(ROOT / "configs" / "inference" / "tiny.yaml")]  # random weights in the temp folder
    proc = subprocess.Popen([sys.executable, str(ROOT / "inference.py"), *tiny, "--out", str(out)], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert _wait_for(lambda: any(p.name.startswith("poseforcing-random-") for p in temp.iterdir()), 120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert list(temp.iterdir()) == [] and not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []

    # kill -9 skips every cleanup; the next run removes what the dead run owned (its temp folder, the partial mp4
    # and its lock beside --out), and nothing of a live process
    dead = subprocess.Popen(["true"])
    dead.wait()
    killed = temp / f"poseforcing-random-{dead.pid}-abcdefgh"
    (killed / "vae").mkdir(parents=True)
    live = temp / f"poseforcing-random-{os.getpid()}-ijklmnop"
    live.mkdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / ".video.mp4.abcdefgh.tmp"  # utils.atomic_io's staging folder, with the half video
    partial.mkdir()
    (partial / "video.mp4").write_bytes(b"half a video")
    lock = {"pid": dead.pid, "host": socket.gethostname(), "start": None, "since": time.time()}
    (out.parent / ".video.mp4.lock").write_text(json.dumps(lock))
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    inference.main([*tiny, "--out", str(out), "synthetic.num_frames=5", "synthetic.height=32", "synthetic.width=32"])
    assert not killed.exists() and live.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["video.mp4"]


def merge_inputs(folder: Path) -> tuple[Path, Path]:
    from test_merge_lora import official_base, pose_tensors, random_lora, write_lora

    base = official_base()
    save_file(base, folder / "base.safetensors")
    return folder / "base.safetensors", write_lora(
        folder / "lora", "unianimate", random_lora(base), None, pose_tensors()
    )


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(
    "flag, value, needle",
    [
        ("--alpha", "nan", "--alpha nan is not a finite number"),
        ("--alpha", "inf", "--alpha inf is not a finite number"),
        ("--lora-alpha", "0", "--lora-alpha 0.0 must be a finite number > 0"),
        ("--shard-size", "nan", "--shard-size must be a finite number of GB > 0, got nan"),
    ],
)
def test_8_merge_refuses_non_finite_numbers_and_writes_nothing(tmp_path, caplog, flag, value, needle):
    base, lora = merge_inputs(tmp_path)
    out = tmp_path / "merged"
    assert merge_lora.main(["--base", str(base), "--lora", str(lora), "--out", str(out), flag, value]) == 2
    assert needle in caplog.text and not out.exists() and hidden(tmp_path) == []


def test_8_merge_unwritable_out_fails_before_reading(tmp_path, caplog, monkeypatch):
    base, lora = merge_inputs(tmp_path)
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(merge_lora, "load_lora", lambda *a: pytest.fail("read the LoRA before checking --out"))
    assert merge_lora.main(["--base", str(base), "--lora", str(lora), "--out", str(tmp_path / "file" / "m")]) == 2
    assert "is a file, not a folder: choose another --out" in caplog.text


MERGE_THAT_SIGNALS_ITSELF = """
import os, signal, sys
from scripts import merge_lora
real, calls = merge_lora.merge_lora_weight, [0]
def merge_then_die(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:
        os.kill(os.getpid(), signal.{signal})
    return real(*args, **kwargs)
merge_lora.merge_lora_weight = merge_then_die
sys.exit(merge_lora.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_8_merge_killed_mid_write_leaves_nothing_or_the_next_run_removes_it(tmp_path, sig):
    base, lora = merge_inputs(tmp_path)
    out = tmp_path / "merged"
    argv = ["--base", str(base), "--lora", str(lora), "--out", str(out), "--shard-size", "1e-6"]  # a file per tensor
    code = MERGE_THAT_SIGNALS_ITSELF.replace("{signal}", sig)
    res = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if sig == "SIGTERM":
        assert res.returncode == 128 + signal.SIGTERM, res.stderr[-2000:]
        assert hidden(tmp_path) == [] and not out.exists()  # the staging folder was removed on the way out
    else:
        assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
        assert any(name.startswith(".merged.") and name.endswith(".tmp") for name in hidden(tmp_path))
        assert not out.exists()
    assert merge_lora.main(argv) == 0
    assert hidden(tmp_path) == [] and (out / "diffusion_pytorch_model.safetensors.index.json").exists()


def test_8_extraction_refuses_unfinished_and_corrupted_checkpoints(run4, tmp_path, caplog):
    _, ckpts, _ = run4
    out = tmp_path / "gen.safetensors"
    unfinished = ckpts.parent / "unfinished"
    shutil.copytree(ckpts / "step_00000004", unfinished)
    (unfinished / "manifest.json").unlink()  # what a save killed before its manifest leaves
    argv = ["--role", "generator", "--out", str(out)]
    assert extract_net_weights.main(["--checkpoint", str(unfinished), *argv]) == 2
    assert "no manifest.json (the save did not finish" in caplog.text and not out.exists()
    victim = ckpts / "step_00000004" / "__0_0.distcp"
    data = bytearray(victim.read_bytes())
    data[-100:-84] = bytes(16)
    victim.write_bytes(bytes(data))
    assert extract_net_weights.main(["--checkpoint", str(ckpts / "step_00000004"), *argv]) == 2
    assert "__0_0.distcp does not match its sha256" in caplog.text and not out.exists() and hidden(tmp_path) == []
    assert extract_net_weights.main(["--checkpoint", str(ckpts / "step_00000002"), *argv]) == 0
    assert len(load_file(out)) > 0


# ------------------------------------------------------------------------------------------ fault injection


FAULT_RUN = ["train.iterations=6", "train.save_every=2", "objective.gen_every=2", "roles.generator.ema_decay=0.5",
             "run.resume=auto"]  # fmt: skip


def _train_child(root: str) -> None:
    torch.set_num_threads(1)
    logging.disable(logging.CRITICAL)
    trainer = Trainer(make_cfg(root, *FAULT_RUN, stage="toy_two"), REGISTRY)
    trainer.train()
    del trainer  # gives the run folder's lock back (a forked child exits without atexit handlers)
    gc.collect()


def _metrics(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "toy_two" / "metrics.jsonl").read_text().splitlines()]


def _exports(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted((root / "toy_two" / "export").glob("*.safetensors"))}


def test_fault_injection_sigkill_at_random_points_then_resume_equals_a_straight_run(tmp_path):
    """Three seeds; each kills the run twice at a random moment (mid-step, mid-save, mid-export...), then lets it
    finish with --resume auto. Losses of every iteration and every exported tensor equal the straight run's."""
    ctx = forkserver()
    start = time.monotonic()
    straight = ctx.Process(target=_train_child, args=(str(tmp_path / "straight"),))
    straight.start()
    straight.join(300)
    duration = time.monotonic() - start
    assert straight.exitcode == 0
    want_metrics, want_exports = _metrics(tmp_path / "straight"), _exports(tmp_path / "straight")
    assert [m["iteration"] for m in want_metrics] == list(range(6))
    assert sorted(want_exports) == ["critic.safetensors", "generator.safetensors", "generator_ema.safetensors"]
    kills = 0
    for seed in range(3):
        rng, root = random.Random(seed), tmp_path / f"seed{seed}"
        for attempt in range(3):
            child = ctx.Process(target=_train_child, args=(str(root),))
            child.start()
            child.join(rng.uniform(0.1, 0.9) * duration if attempt < 2 else 300)
            if child.is_alive() and attempt < 2:
                os.kill(child.pid, signal.SIGKILL)
                kills += 1
            child.join(60)
        assert child.exitcode == 0
        got = _metrics(root)
        assert [m["iteration"] for m in got] == list(range(6))  # one line per iteration: killed runs' lines trimmed
        for a, b in zip(got, want_metrics, strict=True):
            for key in ("loss/generator", "loss/critic"):
                assert (key in a) == (key in b)
                if key in b:
                    assert a[key] == pytest.approx(b[key], abs=1e-6), (seed, a["iteration"], key)
        exports = _exports(root)
        assert exports.keys() == want_exports.keys()
        for name in want_exports:
            assert_same(exports[name], want_exports[name])
        assert hidden(root / "toy_two") == [] and hidden(root / "toy_two" / "checkpoints") == []  # no partial files
        assert not (root / "toy_two" / "run.lock").exists()
    assert kills >= 3  # the runs really were interrupted
