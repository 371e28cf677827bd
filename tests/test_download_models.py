"""download_models.py against a fake Hub (huggingface_hub is mocked: no test touches the network): --list,
--dry-run, resuming after an interruption, and the message when the Hub cannot be reached."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

import download_models
from download_models import ASSETS, main

FILES = {  # the fake Hub: repo id -> {path: size}
    "ZheWang123/UniAnimate-DiT": {
        "UniAnimate-Wan2.1-14B-Lora-12000.ckpt": 30, "yolox_l.onnx": 20, "dw-ll_ucoco_384.onnx": 10, "README.md": 5,
    },
    "gdhe17/Self-Forcing": {"checkpoints/self_forcing_dmd.pt": 12, "checkpoints/ode_init.pt": 8, "other.txt": 3},
}  # fmt: skip


class FakeApi:
    def list_repo_tree(self, repo_id, recursive=False):
        assert recursive
        yield SimpleNamespace(path="checkpoints", tree_id="x")  # a folder: no size
        for path, size in FILES[repo_id].items():
            yield SimpleNamespace(path=path, size=size, lfs=None)


class FakeHub:
    """snapshot_download: writes the requested files (optionally failing after `fail_after` of them)."""

    def __init__(self, fail_after: int | None = None):
        self.calls: list[tuple[str, Path, list[str]]] = []
        self.fail_after = fail_after

    def __call__(self, repo_id, local_dir, allow_patterns):
        self.calls.append((repo_id, Path(local_dir), list(allow_patterns)))
        for i, path in enumerate(allow_patterns):
            if self.fail_after is not None and i == self.fail_after:
                raise ConnectionError("connection reset by peer")
            target = Path(local_dir) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"x" * FILES[repo_id][path])
        return str(local_dir)


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(download_models, "HfApi", FakeApi)
    monkeypatch.setattr(download_models, "snapshot_download", fake)
    return fake


def test_list_names_every_asset_without_network(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(download_models, "HfApi", None)  # any Hub call would fail
    monkeypatch.setattr(download_models, "snapshot_download", None)
    (tmp_path / "Self-Forcing" / "checkpoints").mkdir(parents=True)
    (tmp_path / "Self-Forcing" / "checkpoints" / "ode_init.pt").write_bytes(b"x")
    with caplog.at_level("INFO"):
        main(["--list", "--models-dir", str(tmp_path)])
    for name, asset in ASSETS.items():
        assert name in caplog.text and asset.repo_id in caplog.text
    assert "1 files in" in caplog.text and "group student" in caplog.text


def test_dry_run_lists_files_and_fetches_nothing(tmp_path, hub, caplog):
    (tmp_path / "UniAnimate-DiT").mkdir()
    (tmp_path / "UniAnimate-DiT" / "yolox_l.onnx").write_bytes(b"x" * 20)  # already complete
    with caplog.at_level("INFO"):
        main(["UniAnimate-DiT", "--dry-run", "--models-dir", str(tmp_path)])
    assert hub.calls == []
    assert "2 of 3 files to fetch, 40.0 B" in caplog.text
    assert re.search(r"have +20.0 B  yolox_l.onnx", caplog.text) and "README.md" not in caplog.text
    assert sorted(p.name for p in (tmp_path / "UniAnimate-DiT").iterdir()) == ["yolox_l.onnx"]


def test_download_fetches_named_files_and_resumes_after_interruption(tmp_path, hub):
    hub.fail_after = 1  # the connection drops after the first file
    with pytest.raises(SystemExit, match="cannot reach the Hugging Face Hub .* interrupted ones resume"):
        main(["Self-Forcing", "--models-dir", str(tmp_path)])
    dest = tmp_path / "Self-Forcing"
    assert hub.calls == [("gdhe17/Self-Forcing", dest, ["checkpoints/self_forcing_dmd.pt", "checkpoints/ode_init.pt"])]
    (dest / "checkpoints" / "ode_init.pt").write_bytes(b"x" * 3)  # a truncated leftover: fetched again
    hub.fail_after = None
    main(["Self-Forcing", "--models-dir", str(tmp_path)])
    assert hub.calls[1] == ("gdhe17/Self-Forcing", dest, ["checkpoints/ode_init.pt"])  # only what is missing
    assert (dest / "checkpoints" / "ode_init.pt").stat().st_size == 8
    main(["Self-Forcing", "--models-dir", str(tmp_path)])  # complete: nothing to fetch
    assert len(hub.calls) == 2


@pytest.mark.parametrize("error", [ConnectionError("Failed to resolve 'huggingface.co'"), TimeoutError("timed out")])
def test_unreachable_hub_is_one_clear_line(tmp_path, monkeypatch, error):
    class DownApi:
        def list_repo_tree(self, repo_id, recursive=False):
            raise error

    monkeypatch.setattr(download_models, "HfApi", DownApi)
    with pytest.raises(SystemExit) as exit_info:
        main(["student", "--models-dir", str(tmp_path)])
    message = str(exit_info.value.code)
    assert message.startswith("error: cannot reach the Hugging Face Hub") and "\n" not in message
    assert "Wan-AI/Wan2.1-T2V-1.3B" in message and "HF_ENDPOINT" in message and str(tmp_path) in message
    assert not any(tmp_path.iterdir())


def test_unknown_asset_names_the_choices(tmp_path, hub):
    with pytest.raises(SystemExit, match="unknown asset 'Wan3'; assets: Wan2.1-T2V-1.3B"):
        main(["Wan3", "--models-dir", str(tmp_path)])
