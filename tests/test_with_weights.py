"""Real checkpoints from WAN_MODELS_DIR (skipped without it): Wan2.1-T2V-1.3B loads strictly into the
official preset and initialises the causal pose student; the UniAnimate pose encoders load lazily.

Expected layout: $WAN_MODELS_DIR/Wan2.1-T2V-1.3B/, $WAN_MODELS_DIR/UniAnimate-DiT/UniAnimate-Wan2.1-14B-Lora-12000.ckpt
"""

import os
from pathlib import Path

import pytest
import torch
from conftest import requires_weights

from wan.checkpoint import load_weights
from wan.configs import build_model

pytestmark = [pytest.mark.weights, requires_weights]


def _models_dir() -> Path:
    return Path(os.environ["WAN_MODELS_DIR"])


def test_t2v_1_3b_loads_strictly_and_initialises_the_student():
    folder = _models_dir() / "Wan2.1-T2V-1.3B"
    if not folder.exists():
        pytest.skip(f"{folder} is absent")
    report = load_weights(build_model("wan_1.3b_t2v", dtype=torch.bfloat16), folder)
    assert len(report.loaded) == 825 and not report.fresh_init
    student = build_model("wan_1.3b_causal_pose", dtype=torch.bfloat16)
    report = load_weights(student, folder, allow_fresh=["i2v", "pose"])
    assert report.partial and report.fresh_zero


def test_unianimate_pose_weights_load_lazily():
    ckpt = _models_dir() / "UniAnimate-DiT" / "UniAnimate-Wan2.1-14B-Lora-12000.ckpt"
    if not ckpt.exists():
        pytest.skip(f"{ckpt} is absent")
    model = build_model("wan_1.3b_causal_pose", dtype=torch.bfloat16, pose_weights_path=str(ckpt))
    tokens, ref_map = model.encode_pose(torch.zeros(1, 3, 5, 64, 64), torch.zeros(1, 3, 64, 64))
    assert tokens.shape == (1, 2 * 16, 1536) and ref_map.shape == (1, 20, 1, 8, 8)
