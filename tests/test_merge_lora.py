"""scripts/merge_lora.py: every LoRA layout merges to W + s·(α/r)·B@A (checked against the formula written
here), the merged tiny teacher equals the base run with the adapter attached through peft, pose encoders
are copied byte-for-byte, sharded in -> sharded out, failures leave nothing at --out, memory stays flat."""

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, randomize, raw_bytes, tiny_inputs, tiny_pose
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file

from scripts import merge_lora
from scripts.merge_lora import MergeError, build_parser, main, run
from utils.atomic_io import atomic_output
from utils.lora import lora_delta, lora_scale, merge_lora_weight, parse_lora_key, plan_merge
from utils.safetensors_io import WeightFile, load_checkpoint, plan_shards, read_metadata, save_sharded

log = logging.getLogger(__name__)

DIM, FFN, LAYERS, RANK = 8, 12, 2, 4
BLOCK_LINEARS = {  # official block linears: name -> (out, in)
    **{f"self_attn.{p}": (DIM, DIM) for p in "qkvo"},
    **{f"cross_attn.{p}": (DIM, DIM) for p in ("q", "k", "v", "o", "k_img", "v_img")},
    "ffn.0": (FFN, DIM),
    "ffn.2": (DIM, FFN),
}
LORA_MODULES = [  # UniAnimate's targets: self/cross q, k, v, o and the FFN (not k_img / v_img)
    f"blocks.{i}.{m}" for i in range(LAYERS) for m in BLOCK_LINEARS if not m.endswith("_img")
]


def official_base(dim: int = DIM, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small state dict with official I2V key names and layouts (independent of the model code)."""
    g = torch.Generator().manual_seed(seed)
    ffn = FFN * dim // DIM
    sd = {
        "patch_embedding.weight": torch.randn(dim, 36, 1, 2, 2, generator=g),
        "patch_embedding.bias": torch.randn(dim),
    }
    for i in range(LAYERS):
        for name, (out_f, in_f) in BLOCK_LINEARS.items():
            out_f, in_f = (ffn if out_f == FFN else dim), (ffn if in_f == FFN else dim)
            sd[f"blocks.{i}.{name}.weight"] = torch.randn(out_f, in_f, generator=g)
            sd[f"blocks.{i}.{name}.bias"] = torch.randn(out_f, generator=g)
        sd[f"blocks.{i}.self_attn.norm_q.weight"] = torch.randn(dim, generator=g)
        sd[f"blocks.{i}.norm3.weight"] = torch.randn(dim, generator=g)
        sd[f"blocks.{i}.modulation"] = torch.randn(1, 6, dim, generator=g)
    sd["head.head.weight"] = torch.randn(4 * 16, dim, generator=g)
    return sd


def pose_tensors(dtype=torch.bfloat16, seed=5) -> dict[str, torch.Tensor]:
    """Stand-ins for UniAnimate's pose encoders (names as released), in a dtype the merge must not touch."""
    g = torch.Generator().manual_seed(seed)
    return {
        "dwpose_embedding.0.weight": torch.randn(16, 3, 3, 3, 3, generator=g).to(dtype),
        "dwpose_embedding.0.bias": torch.randn(16, generator=g).to(dtype),
        "randomref_embedding_pose.0.weight": torch.randn(16, 3, 3, 3, generator=g).to(dtype),
    }


def random_lora(base, modules=LORA_MODULES, rank=RANK, seed=1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A [r, in], B [out, r]) fitting the base's weights."""
    g = torch.Generator().manual_seed(seed)
    parts = {}
    for m in modules:
        out_f, in_f = base[f"{m}.weight"].shape
        parts[m] = (torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g))
    return parts


def write_lora(folder: Path, layout: str, parts, alpha: float | None, extras) -> Path:
    """Write a LoRA in one of the published layouts; returns what to pass as --lora."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "unianimate":  # DiffSynth: flat torch file, pipe.dit. prefix, peft-style names, no alpha
        assert alpha is None
        sd = {}
        for m, (a, b) in parts.items():
            sd[f"pipe.dit.{m}.lora_A.default.weight"] = a
            sd[f"pipe.dit.{m}.lora_B.default.weight"] = b
        sd.update({f"pipe.dit.{k}": v for k, v in extras.items()})
        path = folder / "UniAnimate-Wan2.1-14B-Lora-12000.ckpt"
        torch.save(sd, path)
        return path
    if layout == "peft":  # save_pretrained folder: adapter name dropped, alpha in adapter_config.json
        sd = {}
        for m, (a, b) in parts.items():
            sd[f"base_model.model.{m}.lora_A.weight"] = a
            sd[f"base_model.model.{m}.lora_B.weight"] = b
        sd.update({f"base_model.model.{k}": v for k, v in extras.items()})
        save_file(sd, folder / "adapter_model.safetensors")
        config = {"peft_type": "LORA", "r": RANK, "lora_alpha": alpha, "target_modules": ["q", "k", "v", "o"]}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return folder
    if layout == "kohya":  # lora_unet_ + underscores, lora_down/lora_up, scalar .alpha per module
        sd = {}
        for m, (a, b) in parts.items():
            stem = "lora_unet_" + m.replace(".", "_")
            sd[f"{stem}.lora_down.weight"] = a
            sd[f"{stem}.lora_up.weight"] = b
            sd[f"{stem}.alpha"] = torch.tensor(float(alpha))
        sd.update(extras)
        path = folder / "kohya_lora.safetensors"
        save_file(sd, path)
        return path
    raise ValueError(layout)


def expected_merge(w, a, b, strength, alpha, rank):
    """The formula, in float64: W + strength · (alpha / r) · B @ A."""
    return w.double() + strength * (alpha / rank) * (b.double() @ a.double())


def merge(*argv) -> int:
    return main([str(a) for a in argv])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- the math


def test_lora_scale_matches_formula():
    assert lora_scale(128) == 1.0  # UniAnimate: no alpha stored, alpha = r
    assert lora_scale(4, 8.0, 0.5) == 0.5 * 8 / 4
    assert lora_scale(4, 8.0, 1.0, rslora=True) == 8 / 2
    with pytest.raises(ValueError):
        lora_scale(0)


def test_lora_delta_linear_and_conv_match_formula():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 10, generator=g), torch.randn(7, 3, generator=g)
    want = 0.25 * (b.double() @ a.double())
    assert (lora_delta(a, b, 0.25, (7, 10)).double() - want).abs().max() < 1e-6
    # conv (kohya LoCon on a Conv3d): A [r, in, kt, kh, kw], B [out, r, 1, 1, 1]
    a, b = torch.randn(3, 5, 1, 2, 2, generator=g), torch.randn(6, 3, 1, 1, 1, generator=g)
    want = torch.einsum("or,rithw->oithw", b[:, :, 0, 0, 0].double(), a.double()) * 2.0
    assert (lora_delta(a, b, 2.0, (6, 5, 1, 2, 2)).double() - want).abs().max() < 1e-6
    with pytest.raises(ValueError, match="does not fit"):
        lora_delta(a, b, 1.0, (6, 4, 1, 2, 2))


def test_merge_lora_weight_is_fp32_then_cast_and_pure():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 5, generator=g).bfloat16()
    a, b = torch.randn(2, 5, generator=g).bfloat16(), torch.randn(6, 2, generator=g).bfloat16()
    w_before = w.clone()
    got = merge_lora_weight(w, a, b, 0.5, torch.bfloat16)
    want = (w.float() + 0.5 * (b.float() @ a.float())).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want) and torch.equal(w, w_before)


def test_parse_lora_key_layouts():
    assert parse_lora_key("pipe.dit.blocks.0.self_attn.q.lora_A.default.weight").part == "down"
    assert parse_lora_key("pipe.dit.blocks.0.self_attn.q.lora_A.default.weight").adapter == "default"
    assert parse_lora_key("base_model.model.blocks.0.ffn.0.lora_B.weight").module == "base_model.model.blocks.0.ffn.0"
    assert parse_lora_key("lora_unet_blocks_0_ffn_2.lora_up.weight").part == "up"
    assert parse_lora_key("lora_unet_blocks_0_ffn_2.alpha").part == "alpha"
    assert parse_lora_key("diffusion_model.blocks.0.norm3.diff_b").part == "diff_b"
    assert parse_lora_key("pipe.dit.dwpose_embedding.0.weight") is None


def test_plan_resolves_kohya_names_and_peft_alpha_pattern():
    base = official_base()
    lora = {}
    for m, (a, b) in random_lora(base, ["blocks.0.self_attn.q", "blocks.1.ffn.2"]).items():
        lora[f"base_model.model.{m}.lora_A.weight"], lora[f"base_model.model.{m}.lora_B.weight"] = a, b
    config = {"lora_alpha": 8, "alpha_pattern": {r"ffn\.2": 2}}
    plan = plan_merge(lora, {k: v.shape for k, v in base.items()}, peft_config=config)
    assert not plan.problems
    assert plan.targets["blocks.0.self_attn.q.weight"].alpha == 8.0
    assert plan.targets["blocks.1.ffn.2.weight"].alpha == 2.0
    kohya = {"lora_unet_blocks_1_cross_attn_k_img.lora_down.weight": torch.zeros(RANK, DIM),
             "lora_unet_blocks_1_cross_attn_k_img.lora_up.weight": torch.zeros(DIM, RANK)}  # fmt: skip
    plan = plan_merge(kohya, {k: v.shape for k, v in base.items()})
    assert list(plan.targets) == ["blocks.1.cross_attn.k_img.weight"]


def test_unianimate_lora_plan_on_the_real_shapes():
    """The released LoRA's layout (r 128 on self/cross q,k,v,o + FFN, pose encoders beside) on meta tensors:
    it fits I2V-14B exactly and fails on T2V-1.3B naming every key, before any data is read."""
    from wan.configs import build_model

    teacher = build_model("wan_14b_i2v_pose_teacher", device="meta").state_dict()
    pose = {k: v for k, v in teacher.items() if k.startswith(("dwpose_embedding.", "randomref_embedding_pose."))}
    i2v_14b = {k: v.shape for k, v in teacher.items() if k not in pose}
    t2v_1_3b = {k: v.shape for k, v in build_model("wan_1.3b_t2v", device="meta").state_dict().items()}
    lora = {f"pipe.dit.{k}": torch.empty(v.shape, device="meta") for k, v in pose.items()}
    modules = [f"blocks.{i}.{m}" for i in range(40) for m in BLOCK_LINEARS if not m.endswith("_img")]
    for m in modules:
        out_f, in_f = i2v_14b[f"{m}.weight"]
        lora[f"pipe.dit.{m}.lora_A.default.weight"] = torch.empty(128, in_f, device="meta")
        lora[f"pipe.dit.{m}.lora_B.default.weight"] = torch.empty(out_f, 128, device="meta")
    plan = plan_merge(lora, i2v_14b)
    assert not plan.problems and len(plan.targets) == 400 and set(plan.copies) == set(pose)
    assert {(t.scale, t.alpha_source) for t in plan.targets.values()} == {(1.0, "rank")}  # no alpha stored
    plan = plan_merge(lora, t2v_1_3b)
    assert len(plan.problems) == 400 and not plan.targets
    assert any("blocks.0.ffn.0.weight" in p and "14B LoRA on the 1.3B base" in p for p in plan.problems)
    assert any("blocks.35.self_attn.q.weight" in p and "the base lacks" in p for p in plan.problems)


# ----------------------------------------------------------------------------- files end to end


@pytest.mark.parametrize("layout, alpha", [("unianimate", None), ("peft", 8.0), ("kohya", 2.0)])
def test_merge_matches_formula_every_layout(tmp_path, layout, alpha):
    base = official_base()
    save_file(base, tmp_path / "base.safetensors")
    parts, extras = random_lora(base), pose_tensors()
    lora = write_lora(tmp_path / "lora", layout, parts, alpha, extras)
    strength = 0.7
    out = tmp_path / "merged.safetensors"
    assert merge("--base", tmp_path / "base.safetensors", "--lora", lora, "--out", out, "--alpha", strength) == 0
    merged = st_load(out)
    assert set(merged) == set(base) | set(extras)
    worst = 0.0
    for m, (a, b) in parts.items():
        want = expected_merge(base[f"{m}.weight"], a, b, strength, RANK if alpha is None else alpha, RANK)
        got = merged[f"{m}.weight"]
        assert got.dtype == torch.float32
        worst = max(worst, (got.double() - want).abs().max().item())
    log.info("%s: max |merged - formula| over %d targets = %.2e", layout, len(parts), worst)
    assert worst < 1e-5
    targets = {f"{m}.weight" for m in parts}
    for k, v in base.items():
        if k not in targets:
            assert torch.equal(merged[k], v), k
    for k, v in extras.items():  # pose encoders: same dtype, same bytes
        assert merged[k].dtype == v.dtype and raw_bytes(merged[k]) == raw_bytes(v), k
    assert leftovers(tmp_path) == []


def test_output_dtype_bfloat16(tmp_path):
    base = official_base()
    save_file(base, tmp_path / "base.safetensors")
    parts, extras = random_lora(base), pose_tensors(torch.float32)
    lora = write_lora(tmp_path / "lora", "unianimate", parts, None, extras)
    out = tmp_path / "merged.safetensors"
    assert merge("--base", tmp_path / "base.safetensors", "--lora", lora, "--out", out, "--dtype", "bfloat16") == 0
    merged = st_load(out)
    for m, (a, b) in parts.items():  # merged in fp32, then one rounding to bf16
        want = (base[f"{m}.weight"] + b @ a).bfloat16()
        assert merged[f"{m}.weight"].dtype == torch.bfloat16
        assert (merged[f"{m}.weight"].float() - want.float()).abs().max() <= 2**-7 * want.float().abs().max()
    assert merged["patch_embedding.weight"].dtype == torch.bfloat16
    assert torch.equal(merged["patch_embedding.weight"], base["patch_embedding.weight"].bfloat16())
    for k, v in extras.items():
        assert merged[k].dtype == torch.float32 and raw_bytes(merged[k]) == raw_bytes(v)


def write_official_shards(folder: Path, sd: dict[str, torch.Tensor], num: int) -> None:
    """Shards + index the way Wan publishes them (written with safetensors itself)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    weight_map = {}
    for i in range(num):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{num:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::num]}
        save_file(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(v.nbytes for v in sd.values())}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_round_trip(tmp_path):
    base = official_base()
    write_official_shards(tmp_path / "base", base, 3)
    (tmp_path / "base" / "Wan2.1_VAE.pth").write_bytes(b"a sibling that is not the transformer")
    parts, extras = random_lora(base), pose_tensors()
    lora = write_lora(tmp_path / "lora", "unianimate", parts, None, extras)
    shard_gb = 3000 / 1e9  # ~3 KB shards: several files from this tiny model
    out = tmp_path / "merged"
    assert merge("--base", tmp_path / "base", "--lora", lora, "--out", out, "--shard-size", shard_gb) == 0
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == set(base) | set(extras)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in {**base, **extras}.values())
    for name in shards:
        tensors = st_load(out / name)
        assert sum(v.nbytes for v in tensors.values()) <= 3000 or len(tensors) == 1
        assert all(index["weight_map"][k] == name for k in tensors)
    single = tmp_path / "merged.safetensors"
    assert merge("--base", tmp_path / "base", "--lora", lora, "--out", single) == 0
    from_shards, from_single = load_checkpoint(out), st_load(single)
    assert from_shards.keys() == from_single.keys()
    assert all(raw_bytes(from_shards[k]) == raw_bytes(from_single[k]) for k in from_single)
    # our sharded output is itself a valid base: merging a zero-strength LoRA gives it back unchanged
    again = tmp_path / "again"
    assert merge("--base", out, "--lora", lora, "--out", again, "--alpha", 0.0, "--shard-size", shard_gb) == 0
    assert all(raw_bytes(v) == raw_bytes(from_single[k]) for k, v in load_checkpoint(again).items())


def test_dry_run_reports_plan_and_writes_nothing(tmp_path, caplog):
    base = official_base()
    save_file(base, tmp_path / "base.safetensors")
    parts = random_lora(base)
    lora = write_lora(tmp_path / "lora", "kohya", parts, 2.0, pose_tensors())
    out = tmp_path / "merged"
    with caplog.at_level(logging.INFO, logger="merge_lora"):
        assert merge("--base", tmp_path / "base.safetensors", "--lora", lora, "--out", out, "--dry-run") == 0
    text = caplog.text
    assert f"targets: {len(parts)} base tensors" in text
    assert "blocks.*.ffn.0.weight" in text and "rank 4, lora_alpha 2 (from .alpha tensor)" in text
    assert f"shape [{FFN}, {DIM}]" in text and "dwpose_embedding.0.weight <- dwpose_embedding.0.weight" in text
    assert "problems: 0 (none)" in text
    assert not out.exists() and leftovers(tmp_path) == []

    bad = dict(st_load(lora))
    bad["lora_unet_blocks_9_self_attn_q.lora_down.weight"] = torch.zeros(RANK, DIM)
    bad["lora_unet_blocks_9_self_attn_q.lora_up.weight"] = torch.zeros(DIM, RANK)
    save_file(bad, lora)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="merge_lora"):
        assert merge("--base", tmp_path / "base.safetensors", "--lora", lora, "--out", out, "--dry-run") == 1
    assert "problems: 1" in caplog.text and "lora_unet_blocks_9_self_attn_q" in caplog.text
    assert not out.exists()


def _case_no_target(base, lora_sd):
    a, b = torch.zeros(RANK, DIM), torch.zeros(DIM, RANK)
    lora_sd["pipe.dit.blocks.7.self_attn.q.lora_A.default.weight"] = a
    lora_sd["pipe.dit.blocks.7.self_attn.q.lora_B.default.weight"] = b
    return "blocks.7.self_attn.q.weight"


def _case_shape(base, lora_sd):  # a LoRA of a wider model (the 14B LoRA on the 1.3B base)
    lora_sd.clear()
    for m, (a, b) in random_lora(official_base(dim=2 * DIM)).items():
        lora_sd[f"pipe.dit.{m}.lora_A.default.weight"], lora_sd[f"pipe.dit.{m}.lora_B.default.weight"] = a, b
    return "14B LoRA on the 1.3B base"


def _case_missing_up(base, lora_sd):
    del lora_sd["pipe.dit.blocks.1.ffn.2.lora_B.default.weight"]
    return "pipe.dit.blocks.1.ffn.2.lora_A.default.weight"


def _case_int_lora(base, lora_sd):
    lora_sd["pipe.dit.blocks.0.self_attn.k.lora_A.default.weight"] = torch.zeros(RANK, DIM, dtype=torch.int8)
    return "pipe.dit.blocks.0.self_attn.k.lora_A.default.weight' has dtype torch.int8"


@pytest.mark.parametrize("case", [_case_no_target, _case_shape, _case_missing_up, _case_int_lora])
def test_bad_lora_fails_naming_the_key_and_writes_nothing(tmp_path, case):
    base = official_base()
    save_file(base, tmp_path / "base.safetensors")
    lora = write_lora(tmp_path / "lora", "unianimate", random_lora(base), None, pose_tensors())
    lora_sd = torch.load(lora)
    needle = case(base, lora_sd)
    torch.save(lora_sd, lora)
    out = tmp_path / "merged"
    args = build_parser().parse_args(
        ["--base", str(tmp_path / "base.safetensors"), "--lora", str(lora), "--out", str(out)]
    )
    with pytest.raises(MergeError) as err:
        run(args)
    assert needle in str(err.value) and "Nothing was written" in str(err.value)
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("broken", ["base", "lora", "truncated_base"])
def test_unreadable_file_is_named(tmp_path, broken):
    base = official_base()
    base_path = tmp_path / "base.safetensors"
    save_file(base, base_path)
    lora = write_lora(tmp_path / "lora", "unianimate", random_lora(base), None, pose_tensors())
    if broken == "base":
        base_path.write_bytes(b"\x00" * 64)
    elif broken == "truncated_base":
        base_path.write_bytes(base_path.read_bytes()[:-100])
    else:
        lora.write_bytes(b"not a torch file")
    bad = base_path if broken.endswith("base") else lora
    out = tmp_path / "merged"
    args = build_parser().parse_args(["--base", str(base_path), "--lora", str(lora), "--out", str(out)])
    with pytest.raises(MergeError, match=str(bad)):
        run(args)
    assert merge("--base", base_path, "--lora", lora, "--out", out) == 2  # the CLI reports, no traceback
    assert not out.exists() and leftovers(tmp_path) == []


def test_failure_mid_write_leaves_old_output_or_nothing(tmp_path, monkeypatch):
    base = official_base()
    save_file(base, tmp_path / "base.safetensors")
    lora = write_lora(tmp_path / "lora", "unianimate", random_lora(base), None, pose_tensors())
    calls = {"n": 0}
    real = merge_lora.merge_lora_weight

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated failure while writing")
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_lora, "merge_lora_weight", failing)
    out = tmp_path / "merged"
    argv = [
        "--base",
        str(tmp_path / "base.safetensors"),
        "--lora",
        str(lora),
        "--out",
        str(out),
        "--shard-size",
        "1e-6",
    ]
    with pytest.raises(RuntimeError, match="simulated"):
        run(build_parser().parse_args(argv))
    assert not out.exists() and leftovers(tmp_path) == []

    out.mkdir()
    (out / "old.txt").write_text("previous output")
    with pytest.raises(MergeError, match="--overwrite"):
        run(build_parser().parse_args(argv))
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="simulated"):
        run(build_parser().parse_args([*argv, "--overwrite"]))
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"] and leftovers(tmp_path) == []
    monkeypatch.setattr(merge_lora, "merge_lora_weight", real)
    assert run(build_parser().parse_args([*argv, "--overwrite"])) == 0
    assert not (out / "old.txt").exists() and (out / "diffusion_pytorch_model.safetensors.index.json").exists()


def test_help_documents_every_flag():
    result = subprocess.run(
        [sys.executable, "scripts/merge_lora.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for action in build_parser()._actions:
        assert action.help and action.help.strip(), action.option_strings
        for flag in action.option_strings:
            assert flag in result.stdout


# ----------------------------------------------------------------------------- streaming IO


def test_weight_file_and_sharded_writer_agree_with_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 4, generator=g), "bf16": torch.randn(5, generator=g).bfloat16(),
        "f16": torch.randn(2, 2, generator=g).half(), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
        "empty_inner": torch.zeros(3, 0), "bool": torch.tensor([True, False, True]), "i64": torch.arange(7),
        "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
    }  # fmt: skip
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"a": "b"})
    torch.save(tensors, tmp_path / "ref.pth")
    for ref in ("ref.safetensors", "ref.pth"):
        with WeightFile(tmp_path / ref) as weights:
            assert set(weights.specs) == set(tensors), ref
            for k, v in tensors.items():
                spec, got = weights.specs[k], weights.get(k)
                assert spec.device.type == "meta" and spec.dtype == v.dtype and spec.shape == v.shape, (ref, k)
                assert got.dtype == v.dtype and got.shape == v.shape and raw_bytes(got) == raw_bytes(v), (ref, k)
    assert read_metadata(tmp_path / "ref.safetensors") == {"a": "b"}
    with WeightFile(tmp_path / "ref.safetensors") as weights:
        files = save_sharded(tmp_path / "out", weights.specs, weights.get, 16, {"m": "1"})
        split = plan_shards(weights.specs, 16)
    assert [f.name for f in files] == list(split.filename_to_tensors) and len(files) > 1
    assert all(f.name.startswith("diffusion_pytorch_model-0000") for f in files)
    assert all(read_metadata(f) == {"m": "1"} for f in files)
    back = load_checkpoint(tmp_path / "out")
    assert back.keys() == tensors.keys()
    assert all(raw_bytes(back[k]) == raw_bytes(v) and back[k].dtype == v.dtype for k, v in tensors.items())
    planned = {"x": torch.empty(2, device="meta")}
    with pytest.raises(ValueError, match=r"'x': produced torch.float32 \[3\]"):  # a wrong plan fails at its tensor
        save_sharded(tmp_path / "bad.safetensors", planned, lambda name: torch.zeros(3), 1)
    assert not (tmp_path / "bad.safetensors").exists() and leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt), atomic_output(tmp_path / "never") as staging:
        staging.write_text("partial")
        raise KeyboardInterrupt
    assert not (tmp_path / "never").exists() and leftovers(tmp_path) == []
    (tmp_path / "ref.safetensors").write_bytes((tmp_path / "ref.safetensors").read_bytes()[:-3])
    with pytest.raises(ValueError, match="ref.safetensors is not a readable safetensors file"):
        WeightFile(tmp_path / "ref.safetensors")


# ----------------------------------------------------------------------------- memory


# The child reports its own VmHWM (peak RSS of its address space, reset by exec) when it exits. The parent's
# view (wait4's ru_maxrss) is useless here: Linux carries the forking pytest process's peak into the child.
_HWM_LAUNCHER = """
import atexit, runpy, sys
def _report(path=sys.argv[1]):
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    open(path, "w").write(str(int(hwm.split()[1]) * 1024))
atexit.register(_report)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__") if sys.argv[0].endswith(".py") else exec(sys.argv[0])
"""


def _peak_rss_bytes(cmd: list[str], report: Path) -> tuple[int, int]:
    """Run `script.py args` or a code string in a fresh interpreter; return (VmHWM at exit, psutil peak)."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-c", _HWM_LAUNCHER, str(report), *cmd],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    sampled = 0
    watched = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            sampled = max(sampled, watched.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.005)
    stderr = proc.communicate()[1].decode()
    assert proc.returncode == 0, stderr[-2000:]
    return int(report.read_text()), sampled


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units and wait4 are Linux-specific")
def test_peak_rss_of_four_shard_merge_stays_under_1_5x_largest_shard(tmp_path):
    g = torch.Generator().manual_seed(0)
    rows, cols, per_shard = 1920, 2048, 4  # 15.7 MB fp32 tensors, 4 per shard: 4 shards of 62.9 MB
    base = {}
    modules = [f"blocks.{i}.self_attn.{p}" for i in range(4) for p in "qkvo"]
    for m in modules:
        base[f"{m}.weight"] = torch.randn(rows, cols, generator=g)
    write_official_shards(tmp_path / "base", base, 4)
    largest = max(p.stat().st_size for p in (tmp_path / "base").glob("*.safetensors"))
    lora = {}
    for m in modules:
        lora[f"pipe.dit.{m}.lora_A.default.weight"] = torch.randn(8, cols, generator=g)
        lora[f"pipe.dit.{m}.lora_B.default.weight"] = torch.randn(rows, 8, generator=g)
    torch.save(lora, tmp_path / "lora.ckpt")
    del base, lora
    out = tmp_path / "merged"
    args = ["--base", tmp_path / "base", "--lora", tmp_path / "lora.ckpt", "--out", out]
    args += ["--shard-size", largest / 1e9]
    merge_cmd = ["scripts/merge_lora.py", *map(str, args)]
    peak, sampled = _peak_rss_bytes(merge_cmd, tmp_path / "hwm_merge")
    torch_baseline, _ = _peak_rss_bytes(["import torch"], tmp_path / "hwm_torch")
    script_baseline, _ = _peak_rss_bytes(["import scripts.merge_lora"], tmp_path / "hwm_script")
    assert len(list(out.glob("*.safetensors"))) == 4
    # The interpreter + imports of the script are a constant (and vary with the environment's packages): what
    # must stay under 1.5x the largest shard is the memory the merge itself adds on top of them.
    above = peak - script_baseline
    log.info(
        "peak RSS (VmHWM) of the merge %.1f MB (psutil sampling every 5 ms saw %.1f MB); baselines: "
        "import torch %.1f MB, import scripts.merge_lora %.1f MB; merge - script baseline = %.1f MB = %.2fx "
        "the largest shard (%.1f MB, %d tensors of %.1f MB)",
        peak / 1e6, sampled / 1e6, torch_baseline / 1e6, script_baseline / 1e6, above / 1e6, above / largest,
        largest / 1e6, per_shard, rows * cols * 4 / 1e6,
    )  # fmt: skip
    assert above < 1.5 * largest


# ----------------------------------------------------------------------------- against peft, on WanModel


@pytest.mark.parametrize("lora_alpha", [RANK, 2 * RANK])
def test_merged_teacher_equals_base_with_peft_adapter(tmp_path, lora_alpha):
    """Merged tiny teacher == tiny teacher with the LoRA attached through peft (fp32, <= 1e-5).

    lora_alpha = r is the released UniAnimate LoRA (no alpha stored: scale 1); 2r goes through --lora-alpha.
    """
    from peft import LoraConfig, get_peft_model

    from wan.checkpoint import load_weights
    from wan.configs import build_model

    model = randomize(build_model("tiny_teacher"), seed=11).eval()
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pose = {k: v for k, v in full.items() if k.startswith(("dwpose_embedding.", "randomref_embedding_pose."))}
    official = {k: v for k, v in full.items() if k not in pose}  # the I2V base has no pose encoders
    write_official_shards(tmp_path / "base", official, 2)

    targets = r"blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)|blocks\.\d+\.ffn\.(0|2)"
    config = LoraConfig(r=RANK, lora_alpha=lora_alpha, target_modules=targets, lora_dropout=0.0)
    peft_model = get_peft_model(randomize(build_model("tiny_teacher"), seed=11), config).eval()
    g = torch.Generator().manual_seed(12)
    lora_file = {}
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                lora_file["pipe.dit." + name.removeprefix("base_model.model.")] = p.detach().clone()
    assert lora_file and all(".lora_A.default." in k or ".lora_B.default." in k for k in lora_file)
    lora_file.update({f"pipe.dit.{k}": v for k, v in pose.items()})
    torch.save(lora_file, tmp_path / "unianimate.ckpt")

    out = tmp_path / "teacher"
    argv = [
        "--base",
        tmp_path / "base",
        "--lora",
        tmp_path / "unianimate.ckpt",
        "--out",
        out,
        "--shard-size",
        1e-5,
    ]
    if lora_alpha != RANK:  # the UniAnimate layout stores no alpha: say it, as for a LoRA trained with alpha != r
        argv += ["--lora-alpha", lora_alpha]
    assert merge(*argv) == 0

    merged_sd = load_checkpoint(out)
    worst = 0.0
    for key, a in lora_file.items():
        if ".lora_A." in key:
            module = key.removeprefix("pipe.dit.").split(".lora_A.")[0]
            b = lora_file[key.replace(".lora_A.", ".lora_B.")]
            want = expected_merge(official[f"{module}.weight"], a, b, 1.0, lora_alpha, RANK)
            worst = max(worst, (merged_sd[f"{module}.weight"].double() - want).abs().max().item())
    assert worst < 1e-6
    for k, v in pose.items():
        assert raw_bytes(merged_sd[k]) == raw_bytes(v), k

    merged = build_model("tiny_teacher").eval()
    load_weights(merged, out)
    inp = tiny_inputs(batch=1, frames=3)
    frames, ref = tiny_pose(batch=1, latent_frames=3)
    with torch.no_grad():
        outs = {}
        for name, net in (("merged", merged), ("peft", peft_model.get_base_model()), ("base", model)):
            tokens, ref_map = net.encode_pose(frames, ref)
            outs[name] = net(**{**inp, "y": inp["y"] + ref_map}, add_condition=tokens)
    diff = (outs["merged"] - outs["peft"]).abs().max().item()
    effect = (outs["peft"] - outs["base"]).abs().max().item()
    log.info("merged vs peft: max |diff| %.2e (the LoRA itself changes the output by %.2e); formula %.2e",
             diff, effect, worst)  # fmt: skip
    assert effect > 1e-2  # the adapter matters, so agreement is not trivial
    assert diff <= 1e-5
