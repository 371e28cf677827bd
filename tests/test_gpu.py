"""GPU-only paths: flex_attention's block mask equals the masked SDPA reference; the cached forward equals
the full forward on CUDA and never synchronises the host."""

import pytest
import torch
from conftest import randomize, rel_err, requires_cuda, tiny_inputs, tiny_pose

from wan.configs import build_model
from wan.modules.attention import BlockCausalSpec, attention, block_causal_attention
from wan.modules.pose import pose_tokens_for_frames

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.mark.parametrize("window, sink", [(-1, 0), (6, 3)])
@pytest.mark.parametrize("tokens_per_frame", [40, 64])  # 40: sequence not a multiple of flex's 128 tile
def test_flex_equals_masked_sdpa(window, sink, tokens_per_frame):
    spec = BlockCausalSpec(
        num_frames=12, tokens_per_frame=tokens_per_frame, frames_per_block=3, window=window, sink=sink
    )
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 12 * tokens_per_frame, 4, 64, device="cuda", generator=g) for _ in range(3))
    flex = block_causal_attention(q, k, v, spec)
    ref = attention(q, k, v, mask=spec.token_mask("cuda"))
    assert rel_err(flex, ref) < 1e-5


def test_cached_forward_on_cuda_equals_full_and_never_syncs():
    model = randomize(build_model("tiny")).cuda().eval()
    inp = {k: v.cuda() for k, v in tiny_inputs(frames=9).items()}
    pose, ref = (p.cuda() for p in tiny_pose(latent_frames=9))
    with torch.no_grad():
        tokens, ref_map = model.encode_pose(pose, ref)
        inp["y"] = inp["y"] + ref_map
        full = model(**inp, add_condition=tokens)
        cache = model.new_kv_cache(2, 9, torch.float32, "cuda", latent_size=(8, 12))
        outs = []
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for s in range(0, 9, 3):
                sl = slice(s, s + 3)
                outs.append(model(inp["x"][:, :, sl], inp["t"][:, sl], inp["context"], inp["clip_fea"],
                                  inp["y"][:, :, sl], pose_tokens_for_frames(tokens, s, 3, 24),
                                  kv_cache=cache, current_start_frame=s))  # fmt: skip
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert rel_err(torch.cat(outs, 2), full) < 1e-5
