"""Every checkpoint format, written here in its published layout, loads strictly and gives identical
outputs; a missing or misnamed key fails naming the keys; a T2V checkpoint initialises the pose student."""

import json

import pytest
import torch
from conftest import randomize, rel_err, tiny_inputs, tiny_pose
from safetensors.torch import save_file

from wan.checkpoint import CheckpointKeyError, load_model, load_pose_weights, load_weights, save_weights
from wan.configs import build_model

# diffusers WanTransformer3DModel names, written from the published conversion table (independent of
# wan/checkpoint.py): official block-local / top-level prefix -> diffusers.
DIFFUSERS_BLOCK = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "norm3": "norm2",
    "modulation": "scale_shift_table",
}
DIFFUSERS_TOP = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj", "head.modulation": "scale_shift_table",
    "head.head": "proj_out", "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}  # fmt: skip


def to_diffusers_name(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "blocks":
        head, rest = ".".join(parts[:2]), ".".join(parts[2:])
        table = DIFFUSERS_BLOCK
    else:
        head, rest, table = None, key, DIFFUSERS_TOP
    for src in sorted(table, key=len, reverse=True):
        if rest == src or rest.startswith(src + "."):
            rest = table[src] + rest[len(src) :]
            break
    return f"{head}.{rest}" if head else rest


@pytest.fixture(scope="module")
def reference():
    model = randomize(build_model("tiny_teacher"), seed=3).eval()
    inp = tiny_inputs(batch=1, frames=3)
    pose, ref = tiny_pose(batch=1, latent_frames=3)
    with torch.no_grad():
        tokens, ref_map = model.encode_pose(pose, ref)
        inp["y"] = inp["y"] + ref_map
        out = model(**inp, add_condition=tokens)
    return model, inp, tokens, out


def _fresh_output(source, inp, tokens, **kw):
    model = build_model("tiny_teacher").eval()
    report = load_weights(model, source, **kw)
    with torch.no_grad():
        return model(**inp, add_condition=tokens), report


def _sd(model):
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def test_official_single_file(tmp_path, reference):
    model, inp, tokens, out = reference
    save_file(_sd(model), tmp_path / "diffusion_pytorch_model.safetensors")
    got, report = _fresh_output(tmp_path, inp, tokens)  # a Wan model folder
    assert torch.equal(got, out) and len(report.loaded) == len(model.state_dict())


def test_official_sharded_with_index(tmp_path, reference):
    model, inp, tokens, out = reference
    sd = _sd(model)
    keys = sorted(sd)
    weight_map = {}
    for i in range(3):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-00003.safetensors"
        part = {k: sd[k] for k in keys[i::3]}
        save_file(part, tmp_path / name)
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": sum(v.numel() * 4 for v in sd.values())}, "weight_map": weight_map}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(b"not the transformer")  # a real model folder has siblings
    got, _ = _fresh_output(tmp_path, inp, tokens)
    assert torch.equal(got, out)


def test_diffusers_format_folder(tmp_path, reference):
    model, inp, tokens, out = reference
    sd = {to_diffusers_name(k): v for k, v in _sd(model).items() if not k.startswith(("dwpose", "randomref"))}
    assert "blocks.0.attn2.add_k_proj.weight" in sd and "condition_embedder.time_proj.weight" in sd
    (tmp_path / "transformer").mkdir()
    save_file(sd, tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    pose_only = {k: v for k, v in _sd(model).items() if k.startswith(("dwpose", "randomref"))}
    model2 = build_model("tiny_teacher").eval()
    load_weights(model2, tmp_path, allow_fresh=["pose"])
    load_pose_weights(model2, pose_only)  # the pose encoders come from their own file
    with torch.no_grad():
        assert torch.equal(model2(**inp, add_condition=tokens), out)


def test_self_forcing_style_generator_checkpoint(tmp_path, reference):
    model, inp, tokens, out = reference
    other = randomize(build_model("tiny_teacher"), seed=9)
    ckpt = {
        "generator": {f"model.{k}": v for k, v in _sd(other).items()},
        "generator_ema": {f"model.{k}": v for k, v in _sd(model).items()},
    }
    torch.save(ckpt, tmp_path / "self_forcing_dmd.pt")
    got, report = _fresh_output(tmp_path / "self_forcing_dmd.pt", inp, tokens)  # EMA by default
    assert torch.equal(got, out) and "generator_ema" in report.source
    got_raw, _ = _fresh_output(tmp_path / "self_forcing_dmd.pt", inp, tokens, ema=False)
    assert not torch.equal(got_raw, out)


def test_our_format_round_trip_rebuilds_the_network(tmp_path, reference):
    model, inp, tokens, out = reference
    save_weights(model, tmp_path / "ours.safetensors")
    assert not list(tmp_path.glob(".*tmp"))  # the temp file was renamed away
    rebuilt = load_model(tmp_path / "ours.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(**inp, add_condition=tokens), out)


def test_missing_and_misnamed_keys_fail_naming_them(tmp_path, reference):
    model = reference[0]
    sd = _sd(model)
    del sd["blocks.1.ffn.2.bias"]
    with pytest.raises(CheckpointKeyError, match=r"missing 1 keys: blocks\.1\.ffn\.2\.bias"):
        load_weights(build_model("tiny_teacher"), sd)
    sd = _sd(model)
    sd["blocks.0.self_attn.q_proj.weight"] = sd.pop("blocks.0.self_attn.q.weight")
    with pytest.raises(CheckpointKeyError) as err:
        load_weights(build_model("tiny_teacher"), sd)
    assert "blocks.0.self_attn.q.weight" in str(err.value) and "blocks.0.self_attn.q_proj.weight" in str(err.value)
    sd = _sd(model)
    sd["head.head.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointKeyError, match=r"head\.head\.weight has shape \(3, 3\)"):
        load_weights(build_model("tiny_teacher"), sd)
    sd = _sd(model)
    sd["blocks.0.self_attn.q.lora_A.default.weight"] = torch.zeros(2, 32)
    with pytest.raises(CheckpointKeyError, match="merge_lora"):
        load_weights(build_model("tiny_teacher"), sd)
    with pytest.raises(FileNotFoundError, match="download_models.py"):
        load_weights(build_model("tiny_teacher"), tmp_path / "nope.safetensors")


def test_t2v_checkpoint_initialises_the_pose_student_exactly(tmp_path, caplog):
    """T2V weights -> causal i2v pose student: the new i2v and pose paths start silent, so the student's
    output equals the T2V model's for any y, CLIP features and pose; the fresh parameters are reported."""
    t2v = randomize(build_model("tiny", model_type="t2v", in_dim=16, pose_dim=None), seed=5).eval()
    save_file(_sd(t2v), tmp_path / "t2v.safetensors")
    student = build_model("tiny").eval()
    with pytest.raises(CheckpointKeyError, match="img_emb"):
        load_weights(student, tmp_path / "t2v.safetensors")
    with caplog.at_level("INFO", logger="wan.checkpoint"):
        report = load_weights(student, tmp_path / "t2v.safetensors", allow_fresh=["i2v", "pose"])
    line = str(report)
    assert "\n" not in line and "pose_proj" in line and "cross_attn.v_img" in line and "in_channels 16->36" in line
    assert any("fresh" in r.message for r in caplog.records)
    inp = tiny_inputs(batch=1, frames=6)
    pose, ref = tiny_pose(batch=1, latent_frames=6)
    with torch.no_grad():
        tokens, ref_map = student.encode_pose(pose, ref)
        got = student(inp["x"], inp["t"], inp["context"], inp["clip_fea"], inp["y"] + ref_map, tokens)
        want = t2v(inp["x"], inp["t"], inp["context"])
    assert rel_err(got, want) < 1e-6
