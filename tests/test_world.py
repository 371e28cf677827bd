"""The synthetic world as a training and test bench: its encoders are deterministic and cover every caption,
make_toy_dataset.py --encode writes training samples the teacher stage trains on, evaluation while training
scores held-out clips, a teacher run stopped by train.max_minutes resumes exactly, and the world teacher serves
as roles.teacher of the distillation stages (world configs) and of generate_ode_pairs.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model import objective_registry
from pipeline.world import encode_clips, held_out_clips, world_encoders
from scripts import generate_ode_pairs, make_toy_dataset
from trainer.objective import objective_defaults
from trainer.trainer import Trainer
from utils.config import load_config
from utils.data import to_contract
from utils.world.synthetic_pose import generate_sample, load_world_config, prompt_vocabulary
from wan.checkpoint import save_weights
from wan.configs import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY_WORLD = {"num_frames": 5, "height": 32, "width": 32}  # latents [16, 2, 4, 4]


def cfg_of(path: str, *overrides: str):
    return load_config(ROOT / path, list(overrides), objective_defaults(objective_registry()))


@pytest.fixture(scope="module")
def enc():
    return world_encoders("cpu")


def test_world_captions_are_in_vocabulary_and_embed_deterministically(enc):
    config = load_world_config(None, num_frames=5)
    prompts = [generate_sample(config, seed, draw_pose=False).prompt for seed in range(40)]
    vocab = set(prompt_vocabulary())
    assert all(set(p.split()) <= vocab for p in prompts)
    ids, mask = enc.text_encoder.tokenize(prompts)
    assert not (ids == 2).any()  # no <unk>
    assert int(mask.sum(1).max()) <= enc.text_encoder.text_len  # nothing truncated
    a, b = enc.text_encoder(prompts[:2]), enc.text_encoder(prompts[:2])
    assert torch.equal(a, b)
    assert (a[0] - a[1]).abs().max() > 1e-3  # different captions, different embeddings
    assert a.shape == (2, 32, 64)


def test_batched_encode_equals_one_clip_at_a_time(enc):
    clips = held_out_clips(enc, [7, 8], **TINY_WORLD)
    inputs = []
    for c in clips:
        s = to_contract(c.world.video, c.world.pose, c.world.ref_image, c.world.ref_pose, c.world.prompt, "")
        v, p = s["video"], s["pose"]
        inputs.append((v, s["ref_image"], p, s["ref_pose"], s["prompt"], [(v[:, 1], p[:, 1])]))
    together = encode_clips(enc, inputs)
    for one, both in zip((encode_clips(enc, [x])[0] for x in inputs), together, strict=True):
        assert one.keys() == both.keys()
        for k in one:  # float32 convolutions over batches of other sizes round differently: tolerance
            assert torch.allclose(one[k].float(), both[k].float(), rtol=1e-4, atol=1e-4), k
    assert together[0]["ref_choices_y"].shape == (1, 20, 2, 4, 4)
    assert together[0]["latents"].shape == (16, 2, 4, 4) and together[0]["pose"].dtype == torch.uint8


def test_encoded_world_trains_the_teacher_with_evaluation(tmp_path):
    data = tmp_path / "train"
    argv = ["--encode", "--out", str(data), "--num-samples", "2", "--seed", "1000000", "--workers", "1",
            "--ref-choices", "2", "--device", "cpu", *(f"{k}={v}" for k, v in TINY_WORLD.items())]  # fmt: skip
    assert make_toy_dataset.main(argv) == 0
    files = sorted(data.glob("*.safetensors"))
    assert [f.name for f in files] == ["000000.safetensors", "000001.safetensors"]
    sample = load_file(files[0])
    assert sample["latents"].shape == (16, 2, 4, 4) and sample["ref_choices_clip_fea"].shape[0] == 2
    cfg = cfg_of(
        "configs/world/teacher.yaml", f"data.path={data}", "data.cache=memory", "train.batch_size=2",
        "train.iterations=2", "train.dtype=fp32", f"run.output_dir={tmp_path}", "eval.every=2", "eval.clips=1",
        "eval.num_frames=5", "eval.num_steps=2", "eval.ema=true", "roles.teacher.ema_start=0",
        "roles.teacher.ema_decay=0.5",
    )  # fmt: skip
    trainer = Trainer(cfg, objective_registry())
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss/teacher"])) for h in history)
    scores = history[-1]
    assert 0.0 <= scores["eval/pck@0.05"] <= 1.0 and 0.0 < scores["eval/psnr"] < 60.0
    # eval_ema/* scores the EMA weights (here unlike the raw ones), eval/* the raw ones, restored after the swap
    export = tmp_path / "world_teacher" / "export"
    raw, ema = (load_file(export / f"teacher{s}.safetensors") for s in ("", "_ema"))
    assert max((raw[k] - ema[k]).abs().max().item() for k in raw) > 1e-4
    for prefix, weights in (("eval/", raw), ("eval_ema/", ema)):
        model = build_model("world_teacher")
        model.load_state_dict(weights)
        again = trainer.evaluator(model, 2, tmp_path, write=False)
        assert again["eval/psnr"] == pytest.approx(scores[f"{prefix}psnr"], rel=1e-5), prefix
    assert "eval/pck@0.05" not in history[0]  # every 2 iterations
    logged = [json.loads(line) for line in (tmp_path / "world_teacher" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["eval/ssim"] == pytest.approx(scores["eval/ssim"])
    assert (tmp_path / "world_teacher" / "previews" / "iteration_0000002.mp4").stat().st_size > 0


def test_teacher_stopped_by_max_minutes_resumes_exactly(tmp_path):
    base = ["model=tiny", "data.type=synthetic", "data.num_samples=3", "data.latent_frames=3", "train.dtype=fp32",
            "train.iterations=5", "train.save_every=100", "roles.teacher.ema_decay=0.9",
            "roles.teacher.lr=1e-3"]  # fmt: skip
    straight = Trainer(cfg_of("configs/stages/teacher.yaml", *base, f"run.output_dir={tmp_path / 'a'}"),
                       objective_registry()).train()  # fmt: skip
    out = f"run.output_dir={tmp_path / 'b'}"
    first = Trainer(cfg_of("configs/stages/teacher.yaml", *base, out, "train.max_minutes=0"), objective_registry())
    part = first.train()
    assert first.stopped_early and len(part) == 1
    rest = Trainer(cfg_of("configs/stages/teacher.yaml", *base, out, "run.resume=auto"), objective_registry()).train()
    losses = [h["loss/teacher"] for h in part + rest]
    assert losses == pytest.approx([h["loss/teacher"] for h in straight], rel=1e-6, abs=1e-7)
    for name in ("teacher.safetensors", "teacher_ema.safetensors"):
        a, b = (load_file(tmp_path / run / "teacher" / "export" / name) for run in ("a", "b"))
        assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a)


@pytest.mark.parametrize("stage", ["dmd", "sid", "self_forcing"])
def test_world_teacher_is_the_real_score_of_the_world_stages(tmp_path, stage, world_teacher_file):
    cfg = cfg_of(
        f"configs/world/{stage}.yaml", f"roles.teacher.weights={world_teacher_file}", "data.type=synthetic",
        "data.cache=null", "data.num_samples=1", "data.latent_frames=3", "data.latent_size=[4,4]",
        "train.batch_size=1", "train.iterations=1", "train.dtype=fp32", "eval.every=0", f"run.output_dir={tmp_path}",
    )  # fmt: skip
    trainer = Trainer(cfg, objective_registry())
    loaded = load_file(world_teacher_file)
    assert all(torch.equal(v, loaded[k]) for k, v in trainer.roles["teacher"].state_dict().items())
    history = trainer.train()
    assert set(history[0]) >= {"loss/generator", "loss/critic"}
    assert all(torch.isfinite(torch.tensor(v)) for k, v in history[0].items() if k.startswith("loss/"))


def test_world_teacher_generates_ode_pairs(tmp_path, world_teacher_file):
    out = tmp_path / "pairs"
    argv = ["--preset", "world_teacher", "--weights", str(world_teacher_file), "--synthetic", "1",
            "--latent-frames", "2", "--latent-size", "4", "4", "--out", str(out), "--num-steps", "8",
            "--dtype", "fp32"]  # fmt: skip
    generate_ode_pairs.main(argv)
    pair = load_file(next(out.glob("*.safetensors")))
    assert pair["ode_latents"].shape == (5, 16, 2, 4, 4) and torch.isfinite(pair["ode_latents"]).all()


def test_world_distillation_chain_runs_from_the_world_configs(tmp_path, world_teacher_file):
    """Issue 15's chain at tiny size on CPU, every step from its configs/world/ file: encoded world clips -> the
    world teacher's ODE pairs (batched) -> causal ODE init -> Path A (DMD, generator and critic from the ODE init)
    and Path B (pose finetune -> SiD), Self-Forcing + GAN; each export loads into the next step's roles."""
    data = tmp_path / "train"
    argv = ["--encode", "--out", str(data), "--num-samples", "2", "--seed", "1000000", "--workers", "1",
            "--ref-choices", "1", "--device", "cpu", *(f"{k}={v}" for k, v in TINY_WORLD.items())]  # fmt: skip
    assert make_toy_dataset.main(argv) == 0
    pairs = tmp_path / "pairs"
    argv = ["--preset", "world_teacher", "--weights", str(world_teacher_file), "--source", str(data),
            "--out", str(pairs), "--num-steps", "8", "--dtype", "fp32", "--batch-size", "2",
            "--limit", "2"]  # fmt: skip
    assert generate_ode_pairs.main(argv) == 0
    assert len(list(pairs.glob("*.safetensors"))) == 2
    common = ["train.iterations=2", "train.batch_size=2", "train.dtype=fp32", "eval.every=0",
              f"run.output_dir={tmp_path}"]  # fmt: skip

    def run(config: str, *overrides: str) -> list[dict]:
        history = Trainer(cfg_of(config, *common, *overrides), objective_registry()).train()
        losses = [v for h in history for k, v in h.items() if k.startswith("loss/")]
        assert losses and all(torch.isfinite(torch.tensor(losses))), config
        return history

    run("configs/world/ode_init.yaml", f"data.path={pairs}", "data.cache=memory")
    init = tmp_path / "world_ode_init" / "export" / "generator_ema.safetensors"
    students = [f"roles.generator.weights={init}", f"roles.critic.weights={init}",
                f"roles.teacher.weights={world_teacher_file}", f"data.path={data}", "data.cache=memory"]  # fmt: skip
    run("configs/world/dmd.yaml", *students)
    run("configs/world/pose_finetune.yaml", f"roles.generator.weights={init}", f"data.path={data}")
    tuned = tmp_path / "world_pose_finetune" / "export" / "generator_ema.safetensors"
    run("configs/world/sid.yaml", *students, f"roles.generator.weights={tuned}")
    run("configs/world/self_forcing_gan.yaml", *students, f"roles.discriminator.weights={init}")


def test_evaluate_world_scores_students_against_the_teacher(tmp_path, world_teacher_file):
    from scripts import evaluate_world

    torch.manual_seed(1)
    student = tmp_path / "student.safetensors"
    save_weights(build_model("world_student"), student)
    world = [f"{k}={v}" for k, v in TINY_WORLD.items()]
    argv = ["--weights", str(world_teacher_file), "--rows", "ceiling,steps4", "--reference-row", "steps4",
            "--clips", "2", "--device", "cpu", "--student", f"s={student}", "--ablate", "s",
            "--save-frames", str(tmp_path / "frames"),
            "--out", str(tmp_path / "a"), *world]  # fmt: skip
    assert evaluate_world.main(argv) == 0
    rows = json.loads((tmp_path / "a" / "metrics.json").read_text())["rows"]
    assert list(rows) == ["ceiling", "steps4", "s", "s_no_pose"]
    assert rows["s"]["nfe"] == 4 and rows["steps4"]["nfe"] == 8
    assert "agree_psnr" in rows["s"]["mean"] and "agree_psnr" not in rows["steps4"]["mean"]
    assert len(rows["ceiling"]["clips"][0]["pck_per_frame"]) == TINY_WORLD["num_frames"]
    assert rows["ceiling"]["mean"]["psnr"] > rows["steps4"]["mean"]["psnr"] + 1  # random weights vs the toy VAE
    # agreement against frames saved by the earlier run equals agreement measured in the same run
    argv = ["--rows", "", "--clips", "2", "--device", "cpu", "--student", f"s={student}",
            "--reference-frames", str(tmp_path / "frames" / "steps4"), "--out", str(tmp_path / "b"),
            "--keypoint-net", str(ROOT / "assets" / "world_keypoints"), *world]  # fmt: skip
    assert evaluate_world.main(argv) == 0
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())["rows"]["s"]["mean"]
    assert {"net_pck@0.05", "net_kpt_l2", "pose_reward_first", "pose_reward"} <= set(again)  # the learned detector
    for key in ("agree_psnr", "agree_ssim", "pck@0.05"):
        assert again[key] == pytest.approx(rows["s"]["mean"][key], rel=1e-6), key
    with pytest.raises(SystemExit, match="not among --student"):
        evaluate_world.main(["--rows", "ceiling", "--ablate", "x", "--out", str(tmp_path / "c")])


def test_plot_world_writes_curves_and_per_frame_pngs(tmp_path):
    from scripts import plot_world

    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"iteration": i, "loss/generator": float(i)} | ({"eval/pck@0.05": i / 10} if i % 5 == 4
                        else {})) for i in range(10)]  # fmt: skip
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"iteration\": 10, \"loss/gen")  # a torn last line
    x, y = plot_world.series(plot_world.read_jsonl(run), "loss/generator", smooth=4)
    np.testing.assert_allclose(x, np.arange(3, 10))
    np.testing.assert_allclose(y, np.arange(3, 10) - 1.5)  # the mean of i-3..i
    metrics = tmp_path / "metrics.json"
    clips = [{"pck_per_frame": [1.0, 0.5, float("nan")]}, {"pck_per_frame": [0.0, 0.5, 1.0]}]
    metrics.write_text(json.dumps({"clips": [0, 1], "rows": {"a": {"clips": clips}}}))
    np.testing.assert_allclose(plot_world.mean_per_frame(clips), [0.5, 0.5, 1.0])
    assert plot_world.main(["curves", "--run", f"A={run}", "--keys", "loss/generator,eval/pck@0.05",
                            "--smooth", "4", "--out", str(tmp_path / "c.png")]) == 0  # fmt: skip
    assert plot_world.main(["per-frame", "--metrics", str(metrics), "--out", str(tmp_path / "f.png")]) == 0
    for png in ("c.png", "f.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(SystemExit, match="not in"):
        plot_world.main(["per-frame", "--metrics", str(metrics), "--rows", "b", "--out", str(tmp_path / "x.png")])
