"""scripts/toy_vae_probe.py: the latent-cell patching is exact and the PCA baseline scores what it should."""

from __future__ import annotations

import numpy as np

from scripts import toy_vae_probe


def test_patches_are_latent_cells_and_invert_exactly():
    video = np.random.default_rng(0).integers(0, 256, (8, 16, 24, 3), dtype=np.uint8)
    rows = toy_vae_probe._patches(video)
    assert rows.shape == (2 * 2 * 3, 4 * 8 * 8 * 3)
    # row 0 is frames 0-3 of the top-left 8x8 cell, frame-major
    np.testing.assert_array_equal(rows[0].reshape(4, 8, 8, 3), video[:4, :8, :8])
    np.testing.assert_array_equal(toy_vae_probe._unpatch(rows, video.shape), video)


def test_pca_with_every_component_is_lossless_and_16_is_not(capsys):
    toy_vae_probe.main(["pca", "--train-clips", "2", "--clips", "1", "--components", "768"])
    full = [float(line.split("PCA-768 ")[1].split(" dB")[0]) for line in capsys.readouterr().out.splitlines()]
    toy_vae_probe.main(["pca", "--train-clips", "2", "--clips", "1", "--components", "16"])
    few = [float(line.split("PCA-16 ")[1].split(" dB")[0]) for line in capsys.readouterr().out.splitlines()]
    assert len(full) == len(few) == 2  # hard-edged and anti-aliased worlds
    assert min(full) > 60 and max(few) < 35
