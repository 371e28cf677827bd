"""scripts/extract_net_weights.py: one role's weights out of a DCP folder or a torch file (ours and
Self-Forcing's), canonical keys, byte-identical tensors; an absent or empty role fails naming the roles."""

import logging
import warnings

import pytest
import torch
from conftest import randomize, raw_bytes, tiny_inputs
from safetensors.torch import load_file as st_load

from scripts.extract_net_weights import ExtractError, extract, main
from trainer.checkpoint import CheckpointManager
from utils.safetensors_io import load_checkpoint, read_metadata
from wan.checkpoint import load_weights
from wan.configs import build_model

log = logging.getLogger(__name__)


def network(seed: int) -> dict[str, torch.Tensor]:
    """A tiny causal student's state dict with random values everywhere (canonical keys)."""
    model = randomize(build_model("tiny"), seed=seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def optimizer_state(sd: dict[str, torch.Tensor]) -> dict:
    """Shaped like torch.optim.AdamW.state_dict(): nested dicts, ints and floats beside tensors."""
    state = {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(v)} for i, v in enumerate(sd.values())}
    return {"state": state, "param_groups": [{"lr": 1e-5, "betas": (0.0, 0.999), "params": list(state)}]}


@pytest.fixture(scope="module")
def roles():
    gen, ema, critic = network(1), network(2), network(3)
    ckpt = {
        "generator": gen,
        "generator_ema": ema,
        "critic": critic,
        "optimizers": {"generator": optimizer_state(gen), "critic": optimizer_state(critic)},
        "step": 42,
    }
    return ckpt


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and raw_bytes(got[k]) == raw_bytes(v), k


SINGLE_PROCESS = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture(scope="module")
def dcp_dir(tmp_path_factory, roles):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP in one process, without a process group
        return CheckpointManager(tmp_path_factory.mktemp("ckpt")).save(42, roles)  # what the trainer writes


@SINGLE_PROCESS
@pytest.mark.parametrize("role", ["generator", "generator_ema", "critic"])
def test_dcp_role_extracted_byte_for_byte(tmp_path, dcp_dir, roles, role):
    out = tmp_path / f"{role}.safetensors"
    assert main(["--checkpoint", str(dcp_dir), "--role", role, "--out", str(out)]) == 0
    _assert_same(st_load(out), roles[role])
    assert read_metadata(out)["role"] == role


def test_single_torch_file_and_sharded_output(tmp_path, roles):
    torch.save(roles, tmp_path / "checkpoint.pt")
    out = tmp_path / "ema"
    extract(tmp_path / "checkpoint.pt", "generator_ema", out, shard_gb=20_000 / 1e9)
    assert (
        len(list(out.glob("*.safetensors"))) > 1 and (out / "diffusion_pytorch_model.safetensors.index.json").exists()
    )
    _assert_same(load_checkpoint(out), roles["generator_ema"])


def test_self_forcing_style_prefixed_keys(tmp_path, roles):
    sf = {"generator_ema": {f"model.{k}": v for k, v in roles["generator_ema"].items()}}
    torch.save(sf, tmp_path / "self_forcing_dmd.pt")
    out = tmp_path / "sf.safetensors"
    extract(tmp_path / "self_forcing_dmd.pt", "generator_ema", out)
    _assert_same(st_load(out), roles["generator_ema"])
    fsdp = {"generator": {f"_fsdp_wrapped_module.{k}": v for k, v in roles["generator"].items()}}
    torch.save(fsdp, tmp_path / "fsdp1.pt")
    extract(tmp_path / "fsdp1.pt", "generator", tmp_path / "fsdp1.safetensors")
    _assert_same(st_load(tmp_path / "fsdp1.safetensors"), roles["generator"])


def test_extracted_weights_load_strictly_and_run(tmp_path, dcp_dir, roles):
    out = tmp_path / "gen.safetensors"
    extract(dcp_dir, "generator", out)
    model = build_model("tiny").eval()
    load_weights(model, out)
    reference = randomize(build_model("tiny"), seed=1).eval()
    inp = tiny_inputs(batch=1, frames=3)
    with torch.no_grad():
        assert torch.equal(model(**inp), reference(**inp))


def test_absent_role_fails_naming_roles_present(tmp_path, dcp_dir, roles):
    out = tmp_path / "x.safetensors"
    with pytest.raises(ExtractError) as err:
        extract(dcp_dir, "discriminator", out)
    message = str(err.value)
    n = len(roles["generator"])
    assert "'discriminator'" in message and f"generator ({n} tensors)" in message and "critic" in message
    assert "optimizers" in message and "step" in message
    assert not out.exists()

    torch.save({"generator": roles["generator"], "step": 3}, tmp_path / "no_ema.pt")
    with pytest.raises(ExtractError, match=r"no role 'generator_ema'.*generator \(\d+ tensors\)"):
        extract(tmp_path / "no_ema.pt", "generator_ema", out)
    assert main(["--checkpoint", str(tmp_path / "no_ema.pt"), "--role", "generator_ema", "--out", str(out)]) == 2
    assert not out.exists()


@SINGLE_PROCESS
def test_empty_role_fails(tmp_path, roles):
    torch.save({"generator": roles["generator"], "generator_ema": {}}, tmp_path / "early.pt")
    with pytest.raises(ExtractError, match=r"'generator_ema'.*is empty"):
        extract(tmp_path / "early.pt", "generator_ema", tmp_path / "x.safetensors")
    path = CheckpointManager(tmp_path / "dcp_early").save(1, {"generator": roles["generator"], "generator_ema": {}})
    with pytest.raises(ExtractError, match=r"no tensors for role 'generator_ema' \(absent, or saved empty\)"):
        extract(path, "generator_ema", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_plain_state_dict_is_not_a_training_checkpoint(tmp_path, roles):
    torch.save(roles["generator"], tmp_path / "weights.pt")
    with pytest.raises(ExtractError, match="plain state dict"):
        extract(tmp_path / "weights.pt", "generator", tmp_path / "x.safetensors")


def test_dtype_cast(tmp_path, dcp_dir, roles):
    out = tmp_path / "gen_bf16.safetensors"
    extract(dcp_dir, "generator", out, dtype=torch.bfloat16)
    got = st_load(out)
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    assert all(torch.equal(got[k], v.bfloat16()) for k, v in roles["generator"].items())


def test_existing_output_needs_overwrite(tmp_path, dcp_dir):
    out = tmp_path / "gen.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        extract(dcp_dir, "generator", out)
    assert out.read_bytes() == b"old"
    extract(dcp_dir, "generator", out, overwrite=True)
    assert len(st_load(out)) > 0
