"""The causal model: the incremental KV-cache forward equals the full block-causal forward; one block over
all frames equals the bidirectional WanModel; the training-rollout path keeps gradient out of the cache."""

import pytest
import torch
from conftest import randomize, rel_err, tiny_inputs, tiny_pose

from wan.configs import build_model
from wan.modules.attention import BlockCausalSpec
from wan.modules.pose import pose_tokens_for_frames

TOL = 1e-5


def _stream(model, inp, tokens, cache, frames_per_call):
    frames = inp["x"].shape[2]
    tpf = (inp["x"].shape[3] // 2) * (inp["x"].shape[4] // 2)
    outs = []
    for s in range(0, frames, frames_per_call):
        n = min(frames_per_call, frames - s)
        sl = slice(s, s + n)
        outs.append(
            model(
                inp["x"][:, :, sl], inp["t"][:, sl], inp["context"], inp["clip_fea"], inp["y"][:, :, sl],
                pose_tokens_for_frames(tokens, s, n, tpf), kv_cache=cache, current_start_frame=s,
            )
        )  # fmt: skip
    return torch.cat(outs, dim=2)


@pytest.fixture(scope="module")
def posed():
    model = randomize(build_model("tiny")).eval()
    inp = tiny_inputs(frames=9)
    pose, ref = tiny_pose(latent_frames=9)
    with torch.no_grad():
        tokens, ref_map = model.encode_pose(pose, ref)
    inp["y"] = inp["y"] + ref_map
    return model, inp, tokens


@pytest.mark.parametrize(
    "window, sink, frames",
    [(-1, 0, 9), (3, 0, 9), (3, 3, 12), (6, 3, 15), (6, 0, 8)],  # 8: a partial last block
)
def test_kv_cache_equals_full_block_causal(window, sink, frames):
    model = randomize(build_model("tiny", local_attn_size=window, sink_size=sink)).eval()
    inp = tiny_inputs(frames=frames)
    pose, ref = tiny_pose(latent_frames=frames)
    with torch.no_grad():
        tokens, ref_map = model.encode_pose(pose, ref)
        inp["y"] = inp["y"] + ref_map
        full = model(**inp, add_condition=tokens)
        cache = model.new_kv_cache(2, None if window > 0 else frames, torch.float32, "cpu")
        streamed = _stream(model, inp, tokens, cache, model.num_frame_per_block)
    err = rel_err(streamed, full)
    assert err <= TOL, err
    if window > 0:  # the window must matter, or the test shows nothing
        global_model = build_model("tiny")
        global_model.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert rel_err(global_model.eval()(**inp, add_condition=tokens), full) > 1e-3


def test_cache_ring_reuse_across_clips(posed):
    """A cache reset for a new clip gives the same result as a fresh cache (ring slots are overwritten)."""
    model = randomize(build_model("tiny", local_attn_size=3, sink_size=3)).eval()
    _, inp, tokens = posed
    with torch.no_grad():
        cache = model.new_kv_cache(2, None, torch.float32, "cpu")
        first = _stream(model, inp, tokens, cache, 3)
        other = dict(inp, x=torch.randn_like(inp["x"]))
        _stream(model, other, tokens, cache, 3)
        cache.reset()
        again = _stream(model, inp, tokens, cache, 3)
    assert rel_err(again, first) <= TOL


def test_repeated_block_calls_overwrite(posed):
    """Denoising steps re-run a block: only the last call's K/V may remain in the cache."""
    model, inp, tokens = posed
    with torch.no_grad():
        full = model(**inp, add_condition=tokens)
        cache = model.new_kv_cache(2, 9, torch.float32, "cpu")
        tpf = 4 * 6
        outs = []
        for s in range(0, 9, 3):
            sl = slice(s, s + 3)
            args = (inp["t"][:, sl], inp["context"], inp["clip_fea"], inp["y"][:, :, sl])
            pose_blk = pose_tokens_for_frames(tokens, s, 3, tpf)
            model(torch.randn_like(inp["x"][:, :, sl]), *args, pose_blk, kv_cache=cache, current_start_frame=s)
            outs.append(model(inp["x"][:, :, sl], *args, pose_blk, kv_cache=cache, current_start_frame=s))
    assert rel_err(torch.cat(outs, 2), full) <= TOL


def test_one_block_over_all_frames_equals_wan_model():
    causal = randomize(build_model("tiny", num_frame_per_block=9)).eval()
    bidir = build_model("tiny_bidirectional").eval()
    bidir.load_state_dict(causal.state_dict())
    inp = tiny_inputs(frames=9)
    pose, ref = tiny_pose(latent_frames=9)
    with torch.no_grad():
        tokens, ref_map = causal.encode_pose(pose, ref)
        inp["y"] = inp["y"] + ref_map
        a = causal(**inp, add_condition=tokens)
        b = bidir(**inp, add_condition=tokens)
        t_scalar = dict(inp, t=inp["t"][:, 0])  # a [B] timestep broadcasts to every frame
        c = causal(**t_scalar, add_condition=tokens)
        d = bidir(**dict(t_scalar, t=t_scalar["t"][:, None].expand(-1, 9)), add_condition=tokens)
    assert rel_err(a, b) <= TOL
    assert rel_err(c, d) <= TOL


def test_grad_path_equals_no_grad_and_keeps_cache_detached(posed):
    """With autograd on, the cached call attends to detached context + the block's own K/V: same numbers,
    gradient reaches this block's inputs but not the inputs of earlier blocks."""
    model, inp, tokens = posed
    with torch.no_grad():
        full = model(**inp, add_condition=tokens)
    cache = model.new_kv_cache(2, 9, torch.float32, "cpu")
    xs = [inp["x"][:, :, s : s + 3].clone().requires_grad_(True) for s in range(0, 9, 3)]
    outs = []
    for i, s in enumerate(range(0, 9, 3)):
        sl = slice(s, s + 3)
        outs.append(
            model(xs[i], inp["t"][:, sl], inp["context"], inp["clip_fea"], inp["y"][:, :, sl],
                  pose_tokens_for_frames(tokens, s, 3, 24), kv_cache=cache, current_start_frame=s)
        )  # fmt: skip
    assert rel_err(torch.cat(outs, 2).detach(), full) <= TOL
    outs[-1].square().sum().backward()
    assert xs[2].grad is not None and xs[2].grad.abs().sum() > 0
    assert xs[0].grad is None and xs[1].grad is None


def test_block_causal_mask_semantics():
    spec = BlockCausalSpec(num_frames=7, tokens_per_frame=1, frames_per_block=2, window=4, sink=2)
    m = spec.frame_mask()
    # frame 5 is in block [4, 6): sees frames < 6, within the window [2, 6) or in the sink [0, 2)
    assert m[5].tolist() == [True, True, True, True, True, True, False]
    # frame 6 is in the partial block [6, 7): window [3, 7) plus sink
    assert m[6].tolist() == [True, True, False, True, True, True, True]
    glob = BlockCausalSpec(num_frames=4, tokens_per_frame=1, frames_per_block=2).frame_mask()
    assert glob.tolist() == [[True, True, False, False]] * 2 + [[True] * 4] * 2


def test_cache_errors_name_the_problem(posed):
    model, inp, tokens = posed
    cache = model.new_kv_cache(2, 6, torch.float32, "cpu")
    sl = slice(0, 3)
    args = (inp["x"][:, :, sl], inp["t"][:, sl], inp["context"], inp["clip_fea"], inp["y"][:, :, sl], tokens[:, :72])
    with torch.no_grad():
        with pytest.raises(ValueError, match="multiple of num_frame_per_block"):
            model(*args, kv_cache=cache, current_start_frame=1)
        with pytest.raises(ValueError, match="max_frames=6"):
            model(*args, kv_cache=cache, current_start_frame=6)
    with pytest.raises(ValueError, match="local_attn_size"):
        build_model("tiny", local_attn_size=4)
    with pytest.raises(ValueError, match="sink_size"):
        build_model("tiny", sink_size=3)
