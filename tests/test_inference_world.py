"""inference.py's default, configs/inference/world.yaml: it loads the world teacher and encoders the repo ships
(strictly), and what it writes follows the pose of the held-out world clip (the exact marker detector on the
decoded mp4 against the clip's ground-truth keypoints); paths_relative_to puts config paths under the repo root
or --models-dir; the synthetic clip's seed and the caption as prompt (prompt: null)."""

from __future__ import annotations

import pytest
import torch

import inference
from pipeline.world import TEST_SEED, detector
from utils.metrics import evaluate_clip
from utils.video_io import read_video
from wan.checkpoint import load_weights
from wan.modules.causal_model import CausalWanModel

ROOT = inference.ROOT
# The world teacher at 8 UniPC steps with CFG 1.5 on 21 frames of the test clip scores PCK@0.05 0.68-0.72 on the
# decoded mp4 (noise seeds 0-2; 0.87 at the default 50 steps and 81 frames); random weights score 0.00.
PCK_FLOOR = 0.4


def parse(*argv: str):
    return inference.build_parser().parse_args(list(argv))


def test_default_config_loads_the_shipped_world_teacher_strictly():
    args = parse()
    assert args.config == inference.DEFAULT_CONFIG == ROOT / "configs" / "inference" / "world.yaml"
    cfg = inference.load_config(args)
    assert (cfg.preset, cfg.random_weights, cfg.paths_relative_to) == ("world_teacher", False, "repo")
    sampler = (cfg.guidance_scale, cfg.num_steps, cfg.shift, cfg.solver, cfg.negative_prompt)
    assert sampler == (1.5, 50, 5.0, "unipc", "")
    clip = cfg.synthetic
    assert (clip.height, clip.width, clip.num_frames, clip.seed, cfg.prompt) == (128, 128, 81, TEST_SEED, None)
    paths = inference.resolve_paths(cfg, args)
    assert "text_cache" not in paths  # kept in the run's temp folder: nothing is written into the repo
    assert all(path.is_relative_to(ROOT / "assets") and path.exists() for path in paths.values()), paths
    files = inference.required_files(cfg, paths, args.models_dir)
    assert files["weights"] == ROOT / "assets" / "world_teacher" / "teacher.safetensors"
    model = inference.build_network(cfg, torch.device("cpu"), torch.float32)
    assert not isinstance(model, CausalWanModel)  # the bidirectional teacher
    report = load_weights(model, files["weights"])
    assert report.fresh_init == [] and sorted(report.loaded) == sorted(model.state_dict())


def test_default_world_teacher_follows_the_pose(tmp_path, caplog):
    """The default config, shortened (8 steps, 21 frames): the mp4 shows the test clip's pose."""
    out = tmp_path / "video.mp4"
    overrides = ["num_steps=8", "synthetic.num_frames=21"]
    with caplog.at_level("INFO"):
        inference.main(["--out", str(out), *overrides])
    sample = inference.synthetic_clip(inference.load_config(parse(*overrides)), seed=0)
    assert repr(sample.prompt) in caplog.text  # the clip's own caption is the prompt
    frames = read_video(out)
    assert frames.shape == (21, 128, 128, 3)
    scores = evaluate_clip(frames, sample.keypoints, detector(), sample.video)
    assert scores["pck@0.05"] > PCK_FLOOR, scores
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]


def test_paths_relative_to_the_repo_or_models_dir_absolute_paths_and_flags_win(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("paths_relative_to: repo\nvae: assets/toy_vae\nt5: /abs/t5\nclip: enc/clip\n")
    models = tmp_path / "models"
    args = parse("--config", str(config), "--models-dir", str(models), "--clip", str(tmp_path / "my_clip"))
    paths = inference.resolve_paths(inference.load_config(args), args)
    assert paths["vae"] == ROOT / "assets" / "toy_vae"
    assert paths["t5"] == inference.Path("/abs/t5") and paths["clip"] == tmp_path / "my_clip"
    assert paths["text_cache"] == ROOT / "text_cache"

    config.write_text("vae: assets/toy_vae\nt5: /abs/t5\n")  # the default: under --models-dir
    args = parse("--config", str(config), "--models-dir", str(models), "--vae", "~/vae")
    cfg = inference.load_config(args)
    assert cfg.paths_relative_to == "models_dir"
    paths = inference.resolve_paths(cfg, args)
    assert paths["vae"] == inference.Path("~/vae").expanduser() and paths["t5"] == inference.Path("/abs/t5")
    assert paths["text_cache"] == models / "text_cache"
    args = parse("--config", str(config), "--models-dir", str(models))
    assert inference.resolve_paths(inference.load_config(args), args)["vae"] == models / "assets" / "toy_vae"

    missing = {"vae": ROOT / "assets" / "no_vae"}  # a repo asset has no download hint
    with pytest.raises(inference.InputError, match=r"^--vae .*no_vae does not exist \(VAE\): pass the right path"):
        inference.require_file(missing, "vae", "VAE", None)
    with pytest.raises(inference.InputError, match="download_models.py Wan2.1-T2V-1.3B --models-dir"):
        inference.require_file(missing, "vae", "VAE", models)

    args = parse("--config", str(config), "paths_relative_to=cwd")
    with pytest.raises(inference.InputError, match="paths_relative_to='cwd' .* use models_dir or repo"):
        inference.resolve_paths(inference.load_config(args), args)
    for unknown in ("paths_relative=repo", "synthetic.colour=red"):
        with pytest.raises(inference.InputError, match="valid keys: InferenceConfig"):
            inference.load_config(parse("--config", str(config), unknown))


def test_synthetic_clip_seed_and_caption():
    small = ["synthetic.num_frames=5", "synthetic.height=32", "synthetic.width=32"]

    def inputs(*argv: str) -> inference.ClipInputs:
        args = parse(*argv, *small)
        return inference.synthetic_inputs(inference.load_config(args), args)

    held_out = inputs("--seed", "3")  # world.yaml: the clip of TEST_SEED whatever the noise seed, its caption
    assert held_out.ref.tobytes() == inputs("--seed", "9").ref.tobytes()
    cfg = inference.load_config(parse(*small))
    assert held_out.prompt == inference.synthetic_clip(cfg, seed=9).prompt != cfg.prompt
    assert inputs("--seed", "3", "synthetic.seed=null").ref.tobytes() != inputs("--seed", "4", "synthetic.seed=null")\
        .ref.tobytes()  # null: --seed picks the clip  # fmt: skip
    for given in (["--prompt", "a cat"], ["prompt=a cat"]):  # a prompt that is given wins over the caption
        assert inputs(*given).prompt == "a cat"
    args = parse("--ref", "ref.png", "--pose", "pose.json")  # world.yaml's prompt: null needs --prompt here
    with pytest.raises(inference.InputError, match="^--prompt is needed: the config sets prompt: null"):
        inference.load_inputs(args, inference.load_config(args), {})
    tiny = inference.load_config(parse("--config", str(inference.TINY_CONFIG)))
    assert (tiny.synthetic.seed, tiny.prompt) == (None, "a person is dancing")
    assert inputs("--config", str(inference.TINY_CONFIG)).prompt == "a person is dancing"
